"""Test-only experts that answer garbage, for client fault-handling tests.

Load them in a node started with ``PYTHONPATH=tests`` (the ``launch`` fixture sets it), e.g.
``dmoe node --experts bad.[0:2] --expert-cls bad_experts:NaNExpert``. Each declares the normal
``[-1, hidden]`` float32 schema (so the node accepts ordinary requests) and then misbehaves in
its answer, the way a buggy or malicious volunteer would.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from dmoe.experts import FeedForwardExpert


class NaNExpert(FeedForwardExpert):
    """Answers NaN everywhere (forward outputs and input gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


class WrongShapeExpert(FeedForwardExpert):
    """Answers [rows, hidden + 1] instead of [rows, hidden]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return torch.cat([y, y[:, :1]], dim=1)


class WrongDtypeExpert(FeedForwardExpert):
    """Answers float64 instead of float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).double()


class SlowExpert(FeedForwardExpert):
    """Correct answers after sleeping ``DMOE_SLOW_EXPERT_S`` seconds (default 2) per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("DMOE_SLOW_EXPERT_S", "2")))
        return super().forward(x)


class FailingExpert(FeedForwardExpert):
    """Raises on every call (the node answers INTERNAL and keeps serving)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert always fails")


class TwoInputExpert(nn.Module):
    """Custom schema via the ``expert_schema`` hook: (x [-1, h], scale [-1, 1]) -> x * scale + W x."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * scale + self.proj(x)

    def expert_schema(self):  # noqa: ANN201 - imported lazily to keep this file dependency-light
        from dmoe.experts import ExpertSchema, TensorSchema

        x = TensorSchema("float32", (-1, self.hidden_dim))
        return ExpertSchema(inputs=(x, TensorSchema("float32", (-1, 1))), outputs=(x,))
