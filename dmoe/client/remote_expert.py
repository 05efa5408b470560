"""``RemoteExpert``: one expert on one node, used as a ``torch.nn.Module``.

Forward sends the inputs to the node's ``Forward`` RPC; backward sends the same inputs plus the
output gradients to ``Backward`` and returns the gradients w.r.t. the inputs (the node also
applies its optimizer to the expert). Both have finite deadlines and raise the ``dmoe.errors``
tree (``DeadlineExceeded``, ``NodeUnreachable``, ``RequestRejected``, ``BadAnswer``).

Answers are validated against the expert's schema, fetched once with the ``Info`` RPC (outputs:
dtype and shape with free dimensions; gradients: exactly the inputs' shapes), and must be finite.

Without a ``swarm`` the module uses one process-wide gRPC-only ``Swarm`` (no DHT), so a
``RemoteExpert`` with a known endpoint works on its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dmoe.client.remote_call import BACKWARD, FORWARD, TensorSpec, build_request, map_rpc_error, new_call_id
from dmoe.client.swarm import BRIDGE_GRACE, Swarm
from dmoe.config.client import MoEOptions
from dmoe.errors import BadAnswer
from dmoe.wire.codec import check_compression, serialize_tensors, warm_up
from dmoe.wire.proto import expert_pb2 as pb

_DEFAULTS = MoEOptions()  # the same call deadlines as RemoteMixtureOfExperts
_DUMMY = torch.empty(0, requires_grad=True)  # backward must run (it trains the expert) even for leaf inputs
_default_swarm: Swarm | None = None
_default_lock = threading.Lock()


def default_swarm() -> Swarm:
    """The process-wide gRPC-only Swarm used by RemoteExperts created without one."""
    global _default_swarm
    with _default_lock:
        if _default_swarm is None or _default_swarm._closed:
            _default_swarm = Swarm(use_dht=False)
        return _default_swarm


class RemoteExpert(nn.Module):
    def __init__(
        self,
        uid: str,
        endpoint: str,
        *,
        swarm: Swarm | None = None,
        forward_timeout: float = _DEFAULTS.forward_timeout,
        backward_timeout: float = _DEFAULTS.backward_timeout,
        compression: str = "",
    ) -> None:
        super().__init__()
        for name, value in (("forward_timeout", forward_timeout), ("backward_timeout", backward_timeout)):
            if value is None or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        self.uid = uid
        self.endpoint = endpoint
        self.swarm = swarm if swarm is not None else default_swarm()
        self.forward_timeout = float(forward_timeout)
        self.backward_timeout = float(backward_timeout)
        self.compression = check_compression(compression)
        warm_up(self.compression)
        self._info: pb.ExpertInfo | None = None

    def info(self, timeout: float | None = None) -> pb.ExpertInfo:
        """The expert's schema and counters from the node's Info RPC (cached after the first call)."""
        if self._info is None:
            self._info = self.fetch_info(timeout)
        return self._info

    def fetch_info(self, timeout: float | None = None) -> pb.ExpertInfo:
        timeout = self.forward_timeout if timeout is None else timeout

        async def _info() -> pb.ExpertInfo:
            try:
                stub = await self.swarm.stub_for(self.endpoint)
                reply = await stub.Info(pb.InfoRequest(uid=self.uid), timeout=timeout)
            except grpc.aio.AioRpcError as e:
                raise map_rpc_error(e, method="info", uid=self.uid, endpoint=self.endpoint, timeout=timeout) from None
            for expert in reply.experts:
                if expert.uid == self.uid:
                    return expert
            raise BadAnswer(f"{self.endpoint} answered Info without expert {self.uid}", uid=self.uid,
                            endpoint=self.endpoint)

        return self.swarm.run(_info(), timeout=timeout + BRIDGE_GRACE)

    def output_specs(self, rows: int) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec((rows, *list(spec.shape)[1:]), spec.dtype or None) for spec in self.info().outputs
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not inputs:
            raise ValueError(f"RemoteExpert {self.uid} needs at least one input tensor")
        outputs = _RemoteExpertFunction.apply(_DUMMY, self, *inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return f"uid={self.uid!r}, endpoint={self.endpoint!r}"


class _RemoteExpertFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, _dummy: torch.Tensor, expert: RemoteExpert, *inputs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        rows = inputs[0].shape[0]
        expected = expert.output_specs(rows)
        wire_inputs = serialize_tensors(inputs, expert.compression)
        call_id = new_call_id() if any(ctx.needs_input_grad[2:]) else ""  # a backward follows: nodes may keep
        request = build_request(expert.uid, wire_inputs, expert.compression, call_id)
        deadline = time.monotonic() + expert.forward_timeout
        _, outputs = expert.swarm.run(
            expert.swarm.call((expert.endpoint,), request, method=FORWARD, deadline=deadline, expected=expected,
                              retry=False),
            timeout=expert.forward_timeout + BRIDGE_GRACE,
        )
        ctx.expert = expert
        ctx.wire_inputs = wire_inputs
        ctx.call_id = call_id
        ctx.input_meta = [(t.shape, t.dtype, t.device) for t in inputs]
        device = inputs[0].device
        return tuple(o.to(device) for o in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        expert: RemoteExpert = ctx.expert
        request = build_request(expert.uid, ctx.wire_inputs, expert.compression, ctx.call_id)
        request.tensors.extend(serialize_tensors([g.contiguous() for g in grad_outputs], expert.compression))
        expected = tuple(TensorSpec(tuple(shape), str(dtype).removeprefix("torch."))
                         for shape, dtype, _ in ctx.input_meta)
        deadline = time.monotonic() + expert.backward_timeout
        _, grads = expert.swarm.run(
            expert.swarm.call((expert.endpoint,), request, method=BACKWARD, deadline=deadline, expected=expected,
                              retry=False),
            timeout=expert.backward_timeout + BRIDGE_GRACE,
        )
        grad_inputs = [
            g.to(device=device, dtype=dtype) if ctx.needs_input_grad[2 + i] else None
            for i, (g, (_, dtype, device)) in enumerate(zip(grads, ctx.input_meta, strict=True))
        ]
        return None, None, *grad_inputs
