"""An expert's state as it travels between replicas: pack, check, average, apply.

A state is everything a replica needs to continue training an expert where another one is: the module's
``state_dict``, the optimizer's ``state_dict`` (Adam's moments and step counts) and the update counter (the
expert's *lineage*: optimizer steps behind these weights, synced ones included). It travels as one
``torch.save``'d dict, loadable with ``weights_only=True`` (no pickled code runs), cut into ``CHUNK_BYTES``
chunks of the ``GetState`` stream; the first chunk's header names its size and SHA-256.

Nothing received is used before ``check_state`` passed: size (bounded by what this node's own copy of the
expert weighs, so a hostile peer cannot make us buffer gigabytes), digest, the exact tensor names, shapes and
dtypes of our own module and optimizer, and finiteness of every float. A state that fails any of these is
dropped with a ``StateError`` naming the problem; our expert is untouched.

Merging (``average``): replicas trained on different batches since their last merge; averaging their weights
would keep only ``1/n`` of each one's progress (n replicas, each trained by a share of the traffic, would
learn n times slower than one). So each round snapshot also carries its *delta*, what the replica trained
since its last merge, and the merged weights are ``weighted mean(snapshots) + sum(deltas) - weighted
mean(deltas)``: with a common base ``B`` (replicas that merged together last round) that is exactly ``B +
sum(deltas)``, every replica's steps counted in full, as if applied one after the other; with different
bases it still only depends on the set of snapshots, so every replica that saw the same set gets the same
result and they agree after one complete round. Optimizer moments are statistics, not progress: weighted
means; step counts take the maximum. ``apply_merge`` moves a live expert from its round snapshot to the
merged state while keeping whatever it trained since the snapshot (``current += merged - snapshot``), so a
sync never throws away steps taken during the round.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dmoe.errors import DmoeError

CHUNK_BYTES = 1 << 20  # one gRPC message each, far below the message size limit
_SLACK_BYTES = 1 << 20  # torch.save's own structure on top of the tensors' bytes


class StateError(DmoeError):
    """A received expert state is unusable (wrong size, digest, shapes, non-finite values)."""


@dataclass
class ExpertState:
    module: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim state_dict: {"state": {index: {...}}, "param_groups": [...]}
    updates: int
    weight: float = 1.0  # averaging weight (round snapshots); unused for transfers
    # round snapshots: what this replica trained since its last merge (its weights minus that merge's result);
    # None: nothing known (a transfer, or the first round), counts as zero
    delta: dict[str, torch.Tensor] | None = None

    def pack(self) -> bytes:
        buffer = io.BytesIO()
        body: dict[str, Any] = {"module": self.module, "optimizer": self.optimizer, "updates": int(self.updates)}
        if self.delta is not None:
            body["delta"] = self.delta
        torch.save(body, buffer)
        return buffer.getvalue()


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def chunks(payload: bytes) -> Iterator[bytes]:
    for start in range(0, max(len(payload), 1), CHUNK_BYTES):
        yield payload[start:start + CHUNK_BYTES]


def max_state_bytes(module: torch.nn.Module) -> int:
    """The largest payload a state of this module may have: parameters and buffers plus two Adam moments each."""
    tensors = list(module.state_dict().values())
    return 3 * sum(t.numel() * t.element_size() for t in tensors) + _SLACK_BYTES


def module_fingerprint(module_state: dict[str, torch.Tensor]) -> str:
    """A short digest of a module's weights (what the tests and logs compare replicas by)."""
    h = hashlib.sha256()
    for name in sorted(module_state):
        h.update(name.encode())
        h.update(module_state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all float tensors of two module states (same names)."""
    num = den = 0.0
    for name, tb in b.items():
        if tb.is_floating_point():
            num += float(torch.linalg.vector_norm(a[name] - tb)) ** 2
            den += float(torch.linalg.vector_norm(tb)) ** 2
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


def state_norm(state: dict[str, torch.Tensor]) -> float:
    """L2 norm over all float tensors of a module state."""
    return sum(float(torch.linalg.vector_norm(t)) ** 2 for t in state.values() if t.is_floating_point()) ** 0.5


def _finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise StateError(f"{name} holds NaN or Inf")


def check_state(payload: bytes, *, size: int, sha256: str, module: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> ExpertState:
    """Unpack a received payload into an ``ExpertState`` after every check in the module docstring."""
    if len(payload) != size:
        raise StateError(f"got {len(payload)} bytes, the header announced {size}")
    if digest(payload) != sha256:
        raise StateError("payload does not match its SHA-256")
    try:
        raw = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure: not a state we produced
        raise StateError(f"not a loadable state: {type(e).__name__}") from None
    if not isinstance(raw, dict) or not {"module", "optimizer", "updates"} <= set(raw):
        raise StateError("not an expert state (missing module, optimizer or updates)")
    theirs, ours = raw["module"], module.state_dict()
    if not isinstance(theirs, dict) or set(theirs) != set(ours):
        raise StateError("module tensors differ from this node's expert (another expert class or size)")
    for name, mine in ours.items():
        t = theirs[name]
        if not isinstance(t, torch.Tensor) or t.shape != mine.shape or t.dtype != mine.dtype:
            raise StateError(f"module tensor {name}: {getattr(t, 'shape', '?')} {getattr(t, 'dtype', '?')}, "
                             f"expected {tuple(mine.shape)} {mine.dtype}")
        _finite(f"module tensor {name}", t)
    delta = raw.get("delta")
    if delta is not None:
        if not isinstance(delta, dict) or set(delta) != set(ours):
            raise StateError("the delta's tensors differ from this node's expert")
        for name, mine in ours.items():
            t = delta[name]
            if not isinstance(t, torch.Tensor) or t.shape != mine.shape or t.dtype != mine.dtype:
                raise StateError(f"delta tensor {name}: {getattr(t, 'shape', '?')}, expected {tuple(mine.shape)}")
            _finite(f"delta tensor {name}", t)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt = raw["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) \
            or not isinstance(opt.get("param_groups"), list) \
            or len(opt["param_groups"]) != len(optimizer.param_groups):
        raise StateError("optimizer state has another structure than this node's optimizer")
    for index, entry in opt["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise StateError(f"optimizer state for parameter {index!r} of {len(params)}")
        for key, t in entry.items():
            if not isinstance(t, torch.Tensor):
                continue
            if key != "step" and t.shape != params[index].shape:
                raise StateError(f"optimizer {key} of parameter {index}: shape {tuple(t.shape)}, "
                                 f"expected {tuple(params[index].shape)}")
            _finite(f"optimizer {key} of parameter {index}", t)
    updates = raw["updates"]
    if not isinstance(updates, int) or updates < 0:
        raise StateError(f"updates {updates!r} is not a non-negative integer")
    return ExpertState(module=theirs, optimizer=opt, updates=updates, delta=delta)


def average(states: Sequence[ExpertState]) -> ExpertState:
    """Weighted mean of replica states (see the module docstring); weights need not be normalized."""
    total = sum(s.weight for s in states)
    weights = [s.weight / total for s in states] if total > 0 else [1.0 / len(states)] * len(states)
    module = {}
    for name, first in states[0].module.items():
        if not first.is_floating_point():
            module[name] = first.clone()
            continue
        merged = _mean([(w, s.module[name]) for w, s in zip(weights, states, strict=True)])
        deltas = [(w, s.delta[name]) for w, s in zip(weights, states, strict=True) if s.delta is not None]
        if deltas:  # + sum of the deltas - their weighted mean: every replica's training counts in full
            merged.add_(_mean([(1.0, d) for _, d in deltas])).sub_(_mean(deltas))
        module[name] = merged
    merged_state: dict[int, dict[str, Any]] = {}
    for index in sorted({i for s in states for i in s.optimizer["state"]}):
        have = [(w, s.optimizer["state"][index]) for w, s in zip(weights, states, strict=True)
                if index in s.optimizer["state"]]
        norm = sum(w for w, _ in have) or 1.0
        entry: dict[str, Any] = {}
        for key, value in have[0][1].items():
            values = [(w, e[key]) for w, e in have if key in e]
            if key == "step":
                entry[key] = max((v for _, v in values), key=float).clone() if isinstance(value, torch.Tensor) \
                    else max(v for _, v in values)
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                n = sum(w for w, _ in values) or norm
                entry[key] = _mean([(w / n, v) for w, v in values])
            else:
                entry[key] = value
        merged_state[index] = entry
    optimizer = {"state": merged_state, "param_groups": states[0].optimizer["param_groups"]}
    return ExpertState(module=module, optimizer=optimizer, updates=max(s.updates for s in states),
                       weight=sum(s.weight for s in states))


def _mean(weighted: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum(w * t), accumulated in place in the tensors' own dtype (float32: exact enough, 10x faster than double)."""
    (w0, t0), rest = weighted[0], weighted[1:]
    out = t0.mul(w0)
    for w, t in rest:
        out.add_(t, alpha=w)
    return out


@torch.no_grad()
def apply_merge(module: torch.nn.Module, optimizer: torch.optim.Optimizer, snapshot: ExpertState,
                merged: ExpertState) -> None:
    """``current += merged - snapshot`` for weights and optimizer moments (call under the expert's lock)."""
    for name, current in module.state_dict().items():
        if current.is_floating_point():
            current.add_(merged.module[name].to(current.device) - snapshot.module[name].to(current.device))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in merged.optimizer["state"].items():
        param = params[index]
        current = optimizer.state.get(param)
        before = snapshot.optimizer["state"].get(index, {})
        if not current:  # never stepped here: take the merged moments as they are
            optimizer.state[param] = {k: v.clone().to(param.device) if isinstance(v, torch.Tensor) else v
                                      for k, v in entry.items()}
            continue
        for key, value in entry.items():
            if key not in current or not isinstance(value, torch.Tensor):
                continue
            if key == "step":
                current[key] = torch.maximum(current[key], value.to(current[key].device))
            elif value.is_floating_point():
                base = before.get(key)
                if base is None:
                    current[key].copy_(value)
                else:
                    current[key].add_(value.to(param.device) - base.to(param.device))
                if key.endswith("_sq"):  # second moments stay non-negative whatever the deltas did
                    current[key].clamp_(min=0)
