"""One RPC per node: unary expert calls to the same endpoint issued together travel as one batch call.

A MoE layer's forward calls every chosen expert; several of them usually live on one node. Sent one by one
they cost one HTTP/2 stream, one request/response header exchange and one trip through the node's RPC
machinery each; over a home link the calls also queue behind each other on the uplink. ``CallCoalescer``
gathers the calls issued to one endpoint within one turn of the event loop (``Dispatch`` starts all of a
step's jobs together, so they all land in the same turn) and sends them as one ``ForwardBatch`` /
``BackwardBatch`` (proto/expert.proto). The node answers every part separately (its own tensors or its own
status), so to each caller nothing changes: same reply, same status codes, same deadline, and a caller that
gives up (a hedge won elsewhere, a deadline) simply ignores its part.

Not coalesced: a lone call (nothing to gain), streamed (large) calls, calls carrying per-call metadata (a
closed swarm's signatures: each call is signed on its own), and endpoints that answered a batch with
``UNIMPLEMENTED`` or ``FAILED_PRECONDITION`` (older nodes, closed swarms), which are remembered and get
single calls from then on. A batch is cut at ``MAX_PARTS`` parts or ``MAX_UNARY_BYTES`` of payload.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from dmoe.wire.codec import FORWARD, MAX_UNARY_BYTES, payload_bytes
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_PARTS = 64  # the node's limit too (node/server.py)
_NO_BATCH = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass
class _Bucket:
    stub: pb_grpc.ExpertServiceStub
    method: str  # FORWARD | BACKWARD
    parts: list[tuple[pb.ExpertRequest, float, asyncio.Future[pb.ExpertReply]]] = field(default_factory=list)
    size: int = 0


class CallCoalescer:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.single_only: set[str] = set()  # endpoints that do not take batches
        self.batches = self.coalesced = 0  # batch RPCs sent, calls that travelled in one

    async def unary(self, stub: pb_grpc.ExpertServiceStub, endpoint: str, method: str, request: pb.ExpertRequest,
                    timeout: float) -> pb.ExpertReply:
        """What ``stub.Forward(request)`` / ``stub.Backward(request)`` returns, possibly inside a batch."""
        if endpoint in self.single_only:
            return await _single(stub, method, request, timeout)
        loop = asyncio.get_running_loop()
        key = (endpoint, method)
        bucket = self._buckets.get(key)
        size = payload_bytes(request.tensors)
        if bucket is not None and (len(bucket.parts) >= MAX_PARTS or bucket.size + size > MAX_UNARY_BYTES):
            self._flush(key)
            bucket = None
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(stub, method)
            loop.call_soon(self._flush, key)
        future: asyncio.Future[pb.ExpertReply] = loop.create_future()
        bucket.parts.append((request, loop.time() + timeout, future))
        bucket.size += size
        return await future

    def _flush(self, key: tuple[str, str]) -> None:
        bucket = self._buckets.pop(key, None)
        if bucket is not None and bucket.parts:
            asyncio.get_running_loop().create_task(self._send(key[0], bucket))

    async def _send(self, endpoint: str, bucket: _Bucket) -> None:
        loop = asyncio.get_running_loop()
        live = [(r, d, f) for r, d, f in bucket.parts if not f.done()]
        if not live:
            return
        if len(live) == 1:
            request, deadline, future = live[0]
            await _settle(future, _single(bucket.stub, bucket.method, request, deadline - loop.time()))
            return
        timeout = max(d for _, d, _ in live) - loop.time()
        rpc = bucket.stub.ForwardBatch if bucket.method == FORWARD else bucket.stub.BackwardBatch
        try:
            reply = await rpc(pb.ExpertBatch(requests=[r for r, _, _ in live]), timeout=max(timeout, 0.001))
        except grpc.aio.AioRpcError as e:
            if e.code() in _NO_BATCH:  # an older node, or a closed swarm's: one call each, now and from now on
                self.single_only.add(endpoint)
                log.debug("%s takes no batched calls (%s): single calls from now on", endpoint[:80], e.code().name)
                await asyncio.gather(*(_settle(f, _single(bucket.stub, bucket.method, r, d - loop.time()))
                                       for r, d, f in live))
                return
            for _, _, future in live:  # the batch as a whole failed (unreachable, deadline): so did every part
                if not future.done():
                    future.set_exception(e)
            return
        except BaseException as e:
            for _, _, future in live:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        self.batches += 1
        self.coalesced += len(live)
        for i, (_, _, future) in enumerate(live):
            if future.done():
                continue
            status = reply.statuses[i] if i < len(reply.statuses) else None
            if status is None or i >= len(reply.replies):
                future.set_exception(_error(grpc.StatusCode.INTERNAL, "batch reply is missing this part"))
            elif status.code != grpc.StatusCode.OK.value[0]:
                code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
                future.set_exception(_error(code, status.details))
            else:
                future.set_result(reply.replies[i])


async def _single(stub: pb_grpc.ExpertServiceStub, method: str, request: pb.ExpertRequest,
                  timeout: float) -> pb.ExpertReply:
    rpc = stub.Forward if method == FORWARD else stub.Backward
    return await rpc(request, timeout=max(timeout, 0.001))


async def _settle(future: asyncio.Future[pb.ExpertReply], call: object) -> None:
    try:
        result = await call  # type: ignore[misc]
    except Exception as e:
        if not future.done():
            future.set_exception(e)
        return
    if not future.done():
        future.set_result(result)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a single call would have raised with this status (callers map it as usual)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
