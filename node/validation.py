"""Request checks that turn bad input into a gRPC status naming the problem.

Everything a client sends is checked against the expert's schema *before* it is queued, so a
malformed request fails alone and never poisons a batch shared with other clients:
tensor count, dtype, rank, fixed dimensions, one batch size across tensors, and NaN/Inf.
``RpcFailure`` carries the status code and message the servicer aborts with.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import torch

from dmoe.experts import ExpertSchema, TensorSchema
from dmoe.wire.codec import DTYPES

# dtype names the schema may use, mapped to torch dtypes
_SCHEMA_DTYPES = DTYPES


class RpcFailure(Exception):
    """A request the node refuses: ``code`` is the gRPC status, ``details`` the message sent back."""

    def __init__(self, code: grpc.StatusCode, details: str, *, reason: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason or code.name.lower()  # short label for metrics and logs


def invalid(details: str, reason: str = "invalid") -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, details, reason=reason)


def _check_tensor(tensor: torch.Tensor, spec: TensorSchema, *, what: str, expected_shape: Sequence[int]) -> None:
    if tensor.dtype != _SCHEMA_DTYPES[spec.dtype]:
        name = str(tensor.dtype).removeprefix("torch.")
        raise invalid(f"{what}: dtype {name}, expected {spec.dtype}", "dtype")
    if tensor.dim() != len(spec.shape):
        raise invalid(
            f"{what}: rank {tensor.dim()} (shape {list(tensor.shape)}), expected rank {len(spec.shape)} "
            f"(shape {list(expected_shape)})",
            "shape",
        )
    for dim, (got, want) in enumerate(zip(tensor.shape, expected_shape, strict=True)):
        if want != -1 and got != want:
            raise invalid(f"{what}: shape {list(tensor.shape)}, expected {list(expected_shape)} (dim {dim})", "shape")
    if tensor.shape[0] == 0:
        raise invalid(f"{what}: empty batch (shape {list(tensor.shape)})", "shape")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise invalid(f"{what}: contains NaN or Inf", "non_finite")


def check_request(schema: ExpertSchema, tensors: Sequence[torch.Tensor], *, backward: bool) -> int:
    """Validate a Forward (inputs) or Backward (inputs + grad_outputs) request; returns its batch size."""
    n_in, n_out = len(schema.inputs), len(schema.outputs)
    expected = n_in + (n_out if backward else 0)
    if len(tensors) != expected:
        want = f"{n_in} inputs" + (f" + {n_out} grad_outputs" if backward else "")
        raise invalid(f"got {len(tensors)} tensors, expected {want}", "tensor_count")
    inputs, grads = tensors[:n_in], tensors[n_in:]
    for i, (t, spec) in enumerate(zip(inputs, schema.inputs, strict=True)):
        _check_tensor(t, spec, what=f"input {i}", expected_shape=spec.shape)
    rows = inputs[0].shape[0]
    for i, t in enumerate(inputs):
        if t.shape[0] != rows:
            raise invalid(f"input {i}: batch size {t.shape[0]} differs from input 0's {rows}", "shape")
    first = inputs[0].shape
    for i, (g, spec) in enumerate(zip(grads, schema.outputs if backward else (), strict=True)):
        # free dims of an output follow the first input at the same position (see dmoe.experts)
        shape = [
            rows if d == 0 else (first[d] if want == -1 and d < len(first) else want)
            for d, want in enumerate(spec.shape)
        ]
        _check_tensor(g, spec, what=f"grad_output {i}", expected_shape=shape)
    return rows


def batch_signature(tensors: Sequence[torch.Tensor]) -> tuple:
    """Requests with equal signatures can be concatenated along dim 0."""
    return tuple((t.dtype, tuple(t.shape[1:])) for t in tensors)
