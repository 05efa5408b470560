"""One Forward or Backward call to one endpoint, with a deadline, mapped onto dmoe's error tree.

* **Transport.** A request whose tensor payload fits ``MAX_UNARY_BYTES`` goes as one unary
  message; a bigger one is serialized once and cut into chunks for the ``*Stream`` RPC, and the
  streamed reply is reassembled. The node learns the deadline from gRPC's own timeout, so it can
  drop work nobody waits for.
* **Deadline.** The gRPC deadline plus an asyncio timeout a little later: a frozen peer whose
  TCP connection stays open can never hold the caller past ``timeout`` (+ a small grace).
* **Validation.** An answer is accepted only if it decodes, has the expected number of tensors,
  shapes (``-1`` = any size) and dtypes, and holds no NaN/Inf. Anything else is ``BadAnswer``:
  the caller treats it exactly like a node that did not answer. Replies of ``OFF_LOOP_BYTES`` or
  more are reassembled, decoded and checked in a worker thread, so the loop keeps serving the
  other calls' answers (a blocked loop would make *their* nodes look stuck).
* **Errors.** ``DEADLINE_EXCEEDED`` / asyncio timeout -> ``DeadlineExceeded``; ``UNAVAILABLE``
  (refused, reset) -> ``NodeUnreachable``; any other status -> ``RequestRejected`` carrying the
  status name (``RESOURCE_EXHAUSTED``, ``INVALID_ARGUMENT``...). Cancellation by the caller is
  *not* mapped: it propagates as ``asyncio.CancelledError``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch
from google.protobuf.message import DecodeError

from dmoe.errors import BadAnswer, DeadlineExceeded, ExpertCallError, NodeUnreachable, RequestRejected, WireFormatError
from dmoe.wire.codec import (  # noqa: F401 - FORWARD/BACKWARD: re-exported for the client's modules
    BACKWARD,
    FORWARD,
    MAX_UNARY_BYTES,
    OFF_LOOP_BYTES,
    deserialize_tensors,
    has_non_finite,
    iter_chunks,
    payload_bytes,
)
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc


class UnarySender(Protocol):
    """Sends one unary call, maybe batched with others to the same node (``dmoe.client.coalesce``)."""

    async def unary(self, stub: pb_grpc.ExpertServiceStub, endpoint: str, method: str, request: pb.ExpertRequest,
                    timeout: float) -> pb.ExpertReply: ...


_GRACE = 0.25  # seconds the asyncio guard waits beyond the gRPC deadline


@dataclass(frozen=True)
class TensorSpec:
    """What one answer tensor must look like: shape with -1 for any size, dtype name or None for any float."""

    shape: tuple[int, ...]
    dtype: str | None = None


def build_request(uid: str, tensors: Sequence[pb.Tensor], compression: str = "", call_id: str = ""
                  ) -> pb.ExpertRequest:
    return pb.ExpertRequest(uid=uid, tensors=list(tensors), compression=compression, call_id=call_id)


def new_call_id() -> str:
    """An id for one forward call whose backward will follow: the node may keep its activations until then."""
    return secrets.token_hex(8)


async def call_expert(
    stub: pb_grpc.ExpertServiceStub,
    request: pb.ExpertRequest,
    *,
    method: str,
    endpoint: str,
    timeout: float,
    expected: Sequence[TensorSpec] | None = None,
    metadata: Sequence[tuple[str, str]] | None = None,
    coalescer: UnarySender | None = None,
) -> list[torch.Tensor]:
    """Send ``request`` (built by ``build_request``) and return the validated answer tensors.

    ``metadata`` travels with the call (a closed swarm's membership proof, ``dmoe.membership``); a
    ``coalescer`` may send it together with other calls to the same node (unsigned unary calls only)."""
    uid = request.uid
    if timeout <= 0:
        raise DeadlineExceeded(f"no time left to call {uid} at {endpoint}", uid=uid, endpoint=endpoint)
    try:
        async with asyncio.timeout(timeout + _GRACE):
            if payload_bytes(request.tensors) <= MAX_UNARY_BYTES and coalescer is not None and metadata is None:
                reply = await coalescer.unary(stub, endpoint, method, request, timeout)
            elif payload_bytes(request.tensors) <= MAX_UNARY_BYTES:
                rpc = stub.Forward if method == FORWARD else stub.Backward
                reply = await rpc(request, timeout=timeout, metadata=metadata)
            else:
                rpc = stub.ForwardStream if method == FORWARD else stub.BackwardStream
                call = rpc(iter_chunks(request.SerializeToString()), timeout=timeout, metadata=metadata)
                parts = [chunk.payload async for chunk in call]
                # reassembling megabytes is real work: off the loop, which other calls' answers need
                reply = await asyncio.to_thread(lambda: pb.ExpertReply.FromString(b"".join(parts)))
    except TimeoutError:
        raise DeadlineExceeded(
            f"{method} of {uid} at {endpoint} got no answer within {timeout:.2f}s", uid=uid, endpoint=endpoint
        ) from None
    except grpc.aio.AioRpcError as e:
        raise map_rpc_error(e, method=method, uid=uid, endpoint=endpoint, timeout=timeout) from None
    except DecodeError as e:
        raise BadAnswer(
            f"{method} of {uid} at {endpoint}: undecodable reply ({e})", uid=uid, endpoint=endpoint
        ) from None
    if payload_bytes(reply.tensors) < OFF_LOOP_BYTES:  # a thread hop costs more than decoding a few KB
        return check_answer(reply, method=method, uid=uid, endpoint=endpoint, expected=expected)
    return await asyncio.to_thread(check_answer, reply, method=method, uid=uid, endpoint=endpoint, expected=expected)


def map_rpc_error(e: grpc.aio.AioRpcError, *, method: str, uid: str, endpoint: str, timeout: float) -> ExpertCallError:
    code = e.code()
    details = (e.details() or "").strip()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            f"{method} of {uid} at {endpoint} got no answer within {timeout:.2f}s", uid=uid, endpoint=endpoint
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return NodeUnreachable(f"{method} of {uid}: {endpoint} unreachable ({details})", uid=uid, endpoint=endpoint)
    name = code.name if code is not None else "UNKNOWN"
    return RequestRejected(
        f"{method} of {uid} rejected by {endpoint}: {name}: {details}", uid=uid, endpoint=endpoint, status=name
    )


def check_answer(
    reply: pb.ExpertReply, *, method: str, uid: str, endpoint: str, expected: Sequence[TensorSpec] | None
) -> list[torch.Tensor]:
    """Decode and validate a reply; BadAnswer names what is wrong."""

    def bad(what: str) -> BadAnswer:
        return BadAnswer(f"{method} of {uid} at {endpoint} returned garbage: {what}", uid=uid, endpoint=endpoint)

    try:
        tensors = deserialize_tensors(reply.tensors)
    except WireFormatError as e:
        raise bad(str(e)) from None
    if expected is not None:
        if len(tensors) != len(expected):
            raise bad(f"{len(tensors)} tensors instead of {len(expected)}")
        for i, (tensor, spec) in enumerate(zip(tensors, expected, strict=True)):
            shape_ok = len(tensor.shape) == len(spec.shape) and all(
                want in (-1, got) for got, want in zip(tensor.shape, spec.shape, strict=True)
            )
            if not shape_ok:
                raise bad(f"tensor {i} has shape {list(tensor.shape)}, expected {list(spec.shape)}")
            if spec.dtype is not None and str(tensor.dtype).removeprefix("torch.") != spec.dtype:
                raise bad(f"tensor {i} has dtype {tensor.dtype}, expected {spec.dtype}")
    for i, tensor in enumerate(tensors):
        if has_non_finite(tensor):
            raise bad(f"tensor {i} contains NaN or Inf")
    return tensors
