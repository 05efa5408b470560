"""Expert modules and their input/output schema.

Nodes host experts; the client and trainer build the very same modules for local baselines, so
this lives in the library. An expert is any ``torch.nn.Module`` built as ``Class(hidden_dim=N)``:

* ``ffn``: pre-LayerNorm feed-forward block with residual, ``[rows, hidden] -> [rows, hidden]``
  (inner size 4 x hidden, GELU).
* ``transformer``: one pre-LayerNorm encoder layer, ``[batch, seq, hidden] -> [batch, seq, hidden]``.
* ``package.module:Class``: any importable module class.

Schema hook
-----------
The node validates requests against an ``ExpertSchema`` (dtype and shape per input/output tensor,
``-1`` for a free dimension). Dimension 0 of every tensor is the batch dimension: requests to
one expert are merged along it. A class declares its schema with an optional method::

    def expert_schema(self) -> ExpertSchema: ...

Without it the schema is one float32 ``[-1, hidden_dim]`` input and one output of the same spec.
Free non-batch dimensions of an output take their size from the same position of the first
input (``transformer``'s ``seq``); that is how a node checks ``grad_outputs`` before computing.

Seeding
-------
``create_expert(..., seed=S, uid=U)`` initialises the weights from a seed derived from ``(S, U)``,
so every replica and every local baseline built with the same seed and uid starts identical,
while different experts of one node start different.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from dmoe.errors import ConfigError


@dataclass(frozen=True)
class TensorSchema:
    """dtype name (see dmoe.wire.codec.DTYPES) and shape with -1 for free dimensions; dim 0 is the batch."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertSchema:
    inputs: tuple[TensorSchema, ...]
    outputs: tuple[TensorSchema, ...]

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise ConfigError("an expert schema needs at least one input and one output")
        for spec in (*self.inputs, *self.outputs):
            if not spec.shape or spec.shape[0] != -1:
                raise ConfigError(f"schema shape {spec.shape} must start with the free batch dimension -1")


def default_schema(hidden_dim: int) -> ExpertSchema:
    spec = TensorSchema("float32", (-1, hidden_dim))
    return ExpertSchema(inputs=(spec,), outputs=(spec,))


class FeedForwardExpert(nn.Module):
    """Pre-LayerNorm FFN with residual: x + W2 gelu(W1 LN(x)); [rows, hidden] -> [rows, hidden]."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.norm = nn.LayerNorm(hidden_dim)
        self.inner = nn.Linear(hidden_dim, 4 * hidden_dim)
        self.outer = nn.Linear(4 * hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.nn.functional.gelu(self.inner(self.norm(x))))  # (rows, hidden)

    def expert_schema(self) -> ExpertSchema:
        return default_schema(self.hidden_dim)


class TransformerExpert(nn.Module):
    """One pre-LayerNorm transformer encoder layer (no dropout): [batch, seq, hidden] -> same."""

    def __init__(self, hidden_dim: int, num_heads: int | None = None) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        if num_heads is None:  # 64-wide heads when possible, else the largest divisor up to 8
            num_heads = hidden_dim // 64 if hidden_dim % 64 == 0 else max(
                h for h in range(1, 9) if hidden_dim % h == 0
            )
        self.layer = nn.TransformerEncoderLayer(
            d_model=hidden_dim,
            nhead=num_heads,
            dim_feedforward=4 * hidden_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # (batch, seq, hidden)

    def expert_schema(self) -> ExpertSchema:
        spec = TensorSchema("float32", (-1, -1, self.hidden_dim))
        return ExpertSchema(inputs=(spec,), outputs=(spec,))


EXPERT_CLASSES: dict[str, type[nn.Module]] = {"ffn": FeedForwardExpert, "transformer": TransformerExpert}


def load_expert_class(name: str) -> type[nn.Module]:
    """``ffn`` / ``transformer`` or ``package.module:Class``; ConfigError with the reason otherwise."""
    if name in EXPERT_CLASSES:
        return EXPERT_CLASSES[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown expert class {name!r}: use one of {', '.join(EXPERT_CLASSES)} or package.module:Class"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import expert module {module_name!r}: {e}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{name!r} is not a torch.nn.Module class")
    return cls


def expert_seed(seed: int, uid: str) -> int:
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def create_expert(expert_cls: str, *, hidden_dim: int, seed: int = 0, uid: str = "") -> nn.Module:
    """Build an expert with weights determined by ``(seed, uid)`` (global RNG state is left untouched)."""
    cls = load_expert_class(expert_cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(expert_seed(seed, uid))
        try:
            return cls(hidden_dim=hidden_dim)
        except Exception as e:  # a user class failing to build is a configuration problem
            raise ConfigError(f"cannot build expert {expert_cls!r} with hidden_dim={hidden_dim}: {e}") from e


def expert_schema(module: nn.Module, hidden_dim: int) -> ExpertSchema:
    hook = getattr(module, "expert_schema", None)
    if callable(hook):
        schema = hook()
        if not isinstance(schema, ExpertSchema):
            raise ConfigError(f"{type(module).__name__}.expert_schema() must return an ExpertSchema")
        return schema
    return default_schema(hidden_dim)
