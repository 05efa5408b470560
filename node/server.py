"""ExpertServicer: the grpc.aio implementation of ``dmoe.ExpertService`` (proto/expert.proto).

Every call goes: a concurrency slot (total and per peer address) -> size limit -> uid lookup ->
queue admission (from the declared shape, before any decoding) -> decode tensors -> schema check
-> queue -> reply.
Decoding, the NaN scan and stream reassembly of payloads from ``OFF_LOOP_BYTES`` on run in a
worker thread, so one client's megabytes never stall the loop every other client's calls need.
A peer over its ``--max-calls-per-peer``, or streaming a request over ``--max-request-mb``, gets its
refusal after ``_HOLD_SECONDS`` (at most ``_HELD_REFUSALS`` held at once, the rest at once): a flooder
retrying in a tight loop would otherwise spend this loop's time on refusals that every other caller
needs. The rest of a refused stream is read (so stock grpc clients see the status, ``_drain``) once per
peer per ``_DRAIN_EVERY_SECONDS``; a peer that keeps at it gets the early status without its
megabytes being read. Each refusal becomes a gRPC status
with a message naming the problem:

=====================================  ====================
unknown uid                            NOT_FOUND
bad tensor count/dtype/rank/shape,     INVALID_ARGUMENT
NaN/Inf, malformed bytes, bad
compression
payload over ``--max-request-mb``,     RESOURCE_EXHAUSTED (at once, so the client can fall back)
queue over ``--max-queued-rows``       (checked before decoding),
over ``--max-calls`` in progress, or
a peer over ``--max-calls-per-peer``
deadline passed while queued           DEADLINE_EXCEEDED (dropped without compute)
node shutting down                     UNAVAILABLE
=====================================  ====================

Payloads over ``dmoe.wire.codec.MAX_UNARY_BYTES`` come through the ``*Stream`` RPCs: the client cuts a
serialized ``ExpertRequest`` into ``Chunk`` messages, the reply comes back the same way.

``ForwardBatch`` / ``BackwardBatch`` carry several calls (up to ``MAX_BATCH_PARTS``; ``dmoe.client.coalesce``):
each part holds a call slot of its own and goes through the same path as a call on its own, concurrently,
and gets its own reply or status in the answer. A closed swarm's node refuses batches
(``FAILED_PRECONDITION``): its calls are signed one by one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import torch
from dmoe.node.backend import ExpertBackend
from dmoe.node.batching import BatchScheduler
from dmoe.node.guards import BackwardRateLimit, GradientGuard
from dmoe.node.keeper import ExpertKeeper
from dmoe.node.metrics import NodeMetrics
from dmoe.node.peers import ADOPT, GET_STATE
from dmoe.node.replicas import NoSnapshot, ReplicaSync
from dmoe.node.state import chunks, digest
from dmoe.node.validation import RpcFailure, batch_signature, check_request, invalid
from google.protobuf.message import DecodeError

from dmoe.config import NodeConfig, default_of
from dmoe.dht.uids import split_uid
from dmoe.errors import ConfigError, WireFormatError, clip
from dmoe.logs import RateLimitedLog
from dmoe.membership import MembershipCheck, MembershipError, payload_digest
from dmoe.wire.codec import (
    BACKWARD,
    EIGHT_BIT,
    FORWARD,
    OFF_LOOP_BYTES,
    check_compression,
    deserialize_tensor,
    iter_chunks,
    payload_bytes,
    warm_up,
)
from dmoe.wire.endpoints import parse_endpoint
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
_DRAINS = 8  # refused request streams read to their end at once
_DRAIN_SECONDS = 2.0
_DRAIN_EVERY_SECONDS = 30.0  # a peer's oversized streams are drained (courtesy) at most once per this
_MAX_DRAINED_PEERS = 4096  # peers remembered for that; forgotten all at once beyond (a flood of addresses)
_HELD_REFUSALS = 64  # refusals of peers over their share held back at once (_slow_down)
_HOLD_SECONDS = 0.5


def _address(peer: str) -> str:
    """A gRPC peer string without its port: "ipv4:1.2.3.4:5678" -> "ipv4:1.2.3.4" (a new port per connection)."""
    return peer.rsplit(":", 1)[0]


class Undecodable:
    """A request body protobuf could not parse; the handler answers INVALID_ARGUMENT (no traceback in the log)."""

    def __init__(self, size: int, error: str) -> None:
        self.size = size
        self.error = error
        self.uid = ""


def _tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as e:  # grpc would log a traceback per request and answer UNKNOWN
            return Undecodable(len(data), str(e))

    return deserialize


# method -> (unary or stream, request type, reply type): the service of proto/expert.proto
_METHODS = {
    "Forward": ("unary", pb.ExpertRequest, pb.ExpertReply),
    "Backward": ("unary", pb.ExpertRequest, pb.ExpertReply),
    "ForwardStream": ("stream", pb.Chunk, pb.Chunk),
    "BackwardStream": ("stream", pb.Chunk, pb.Chunk),
    "Info": ("unary", pb.InfoRequest, pb.InfoReply),
    "Ping": ("unary", pb.PingRequest, pb.PingReply),
    "ForwardBatch": ("unary", pb.ExpertBatch, pb.ExpertBatchReply),
    "BackwardBatch": ("unary", pb.ExpertBatch, pb.ExpertBatchReply),
    "GetState": ("unary_stream", pb.StateRequest, pb.StateChunk),
    "Adopt": ("unary", pb.AdoptRequest, pb.AdoptReply),
}
_HANDLERS = {"unary": grpc.unary_unary_rpc_method_handler, "stream": grpc.stream_stream_rpc_method_handler,
             "unary_stream": grpc.unary_stream_rpc_method_handler}
MAX_CALL_ID = 64
MAX_BATCH_PARTS = 64  # calls one ForwardBatch / BackwardBatch may carry
_STATE_SERVES = 2  # expert states serialized and streamed at once (each is a copy of the expert in memory)


def add_to_server(servicer: ExpertServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_ExpertServiceServicer_to_server``, but with request
    deserializers that turn undecodable bytes into ``Undecodable`` instead of a logged exception."""
    handlers = {}
    for name, (shape, request, reply) in _METHODS.items():
        handlers[name] = _HANDLERS[shape](getattr(servicer, name), request_deserializer=_tolerant(request.FromString),
                              response_serializer=reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("dmoe.ExpertService", handlers),))


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(
        self,
        backends: dict[str, ExpertBackend],
        scheduler: BatchScheduler,
        *,
        metrics: NodeMetrics,
        node_id: Callable[[], str],
        max_request_bytes: int,
        max_calls: int = default_of(NodeConfig, "max_calls"),
        max_calls_per_peer: int = default_of(NodeConfig, "max_calls_per_peer"),
        membership: MembershipCheck | None = None,
        members_only: Sequence[str] = (BACKWARD,),
        backward_rate: float = default_of(NodeConfig, "backward_rate"),
        grad_norm_band: float = default_of(NodeConfig, "grad_norm_band"),
    ) -> None:
        self._held = 0  # refusals being held (_slow_down)
        self._draining = 0  # refused request streams being read to their end (_drain)
        self._drained: dict[str, float] = {}  # peer address -> when its last refused stream was drained
        self._state_serves = 0  # GetState streams in progress
        self._adopting = False  # an Adopt in progress (one at a time)
        self.replicas: ReplicaSync | None = None  # round snapshots for GetState(round > 0)
        self.keeper: ExpertKeeper | None = None  # takes Adopt requests
        self._warmed: set[str] = set()  # 8-bit codecs warmed up (dmoe.wire.codec.warm_up)
        self.backward_rate = BackwardRateLimit(backward_rate)  # open swarms only
        self.gradients = GradientGuard(grad_norm_band)
        self.membership = membership  # a closed swarm's authority check; None: an open swarm
        self.members_only = tuple(members_only)  # FORWARD / BACKWARD: what needs membership
        self.backends = backends
        self.max_calls, self.max_calls_per_peer = max_calls, max_calls_per_peer
        self.calls = 0
        self.calls_by_peer: dict[str, int] = {}
        self.scheduler = scheduler
        self.metrics = metrics
        self.node_id = node_id
        self.max_request_bytes = max_request_bytes
        self.rejections = RateLimitedLog(log)
        # a decoded tensor can never have more elements than this many bytes allow
        self.max_elements = max_request_bytes

    # ---- core ----

    async def _handle(self, kind: str, request: pb.ExpertRequest, timeout: float | None,
                      metadata: Sequence[tuple[str, str | bytes]] = (), peer: str = "") -> pb.ExpertReply:
        if isinstance(request, Undecodable):
            raise invalid(f"undecodable ExpertRequest ({request.size} bytes): {clip(request.error, 120)}", "malformed")
        size = payload_bytes(request.tensors)
        if size > self.max_request_bytes:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request payload {size / 2**20:.2f} MB exceeds --max-request-mb "
                f"{self.max_request_bytes / 2**20:g}",
                reason="too_large",
            )
        if self.membership is not None and kind in self.members_only:
            await self._check_member(kind, request.uid, [t.data for t in request.tensors], metadata, size)
        if self.membership is None and kind == BACKWARD and not self.backward_rate.allow(peer):
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"more than {self.backward_rate.rate:g} Backward calls/s from your address "
                             "(--backward-rate); retry later", reason="backward_rate")
        backend = self.backends.get(request.uid)
        if backend is None:
            listed = ", ".join(list(self.backends)[:8]) + (", ..." if len(self.backends) > 8 else "")
            raise RpcFailure(
                grpc.StatusCode.NOT_FOUND,
                f"expert {clip(request.uid)} is not served by this node (serves {len(self.backends)}: {listed})",
                reason="unknown_uid",
            )
        if len(request.call_id) > MAX_CALL_ID:
            raise invalid(f"call_id of {len(request.call_id)} characters (at most {MAX_CALL_ID})", "malformed")
        try:
            compression = check_compression(request.compression)
        except WireFormatError as e:
            raise invalid(str(e), "compression") from None
        if compression in EIGHT_BIT and compression not in self._warmed:  # its first use costs ~0.6 s: not here
            self._warmed.add(compression)
            asyncio.get_running_loop().run_in_executor(None, warm_up, compression)
        n_expected = len(backend.schema.inputs) + (len(backend.schema.outputs) if kind == BACKWARD else 0)
        if len(request.tensors) != n_expected:
            check_request(backend.schema, [None] * len(request.tensors), backward=kind == BACKWARD)  # raises
        if request.tensors and request.tensors[0].shape:  # admission before decoding: a full queue costs nothing
            self.scheduler.admit(max(0, int(request.tensors[0].shape[0])))
        if size < OFF_LOOP_BYTES:  # a thread hop costs more than decoding a few KB
            tensors, rows = self._decode(backend, kind, request)
        else:  # megabytes to decode and scan for NaN: off the loop, which every other caller needs
            tensors, rows = await asyncio.to_thread(self._decode, backend, kind, request)
        if self.membership is None and kind == BACKWARD:  # an open swarm: is this gradient plausible?
            why = self.gradients.check(request.uid, tensors[len(backend.schema.inputs)])
            if why is not None:
                raise invalid(why, "grad_norm")
        self.metrics.bytes_in.labels(kind).inc(size)
        reply_tensors = await self.scheduler.submit(
            request.uid, kind, tensors, rows=rows, signature=batch_signature(tensors),
            compression=compression, timeout=timeout, call_id=request.call_id, peer=peer,
        )
        self.metrics.bytes_out.labels(kind).inc(payload_bytes(reply_tensors))
        return pb.ExpertReply(tensors=reply_tensors)

    async def _check_member(self, kind: str, uid: str, chunks: list[bytes],
                            metadata: Sequence[tuple[str, str | bytes]], size: int) -> None:
        """A closed swarm: the call must carry a member's valid token and signature (``dmoe.membership``)."""
        assert self.membership is not None
        digest = payload_digest(chunks) if size < OFF_LOOP_BYTES else await asyncio.to_thread(payload_digest, chunks)
        try:
            self.membership.check(metadata, method=kind, uid=uid, digest=digest)
        except MembershipError as e:
            code = grpc.StatusCode.UNAUTHENTICATED if e.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
            raise RpcFailure(code, str(e), reason="unauthenticated" if e.unauthenticated else "not_member") from None

    def _decode(self, backend: ExpertBackend, kind: str, request: pb.ExpertRequest) -> tuple[list[torch.Tensor], int]:
        """Decode and check a request's tensors against the expert's schema; (tensors, rows) or RpcFailure."""
        tensors = []
        for i, msg in enumerate(request.tensors):
            try:
                tensors.append(deserialize_tensor(msg, max_elements=self.max_elements))
            except WireFormatError as e:
                raise invalid(f"tensor {i}: {e}", "malformed") from None
        return tensors, check_request(backend.schema, tensors, backward=kind == BACKWARD)

    def _reject(self, method: str, uid: str, failure: RpcFailure, peer: str) -> None:
        self.metrics.rejections.labels(failure.reason).inc()
        level_reason = failure.reason
        self.rejections.warning(level_reason, f"rejected {method} {clip(uid)} from {peer}: {failure.code.name}: "
                                              f"{failure.details}")

    def _acquire(self, peer: str) -> str:
        """Take one of the node's ``max_calls`` and of this peer's ``max_calls_per_peer``, or RESOURCE_EXHAUSTED."""
        address = _address(peer)
        mine = self.calls_by_peer.get(address, 0)
        if mine >= self.max_calls_per_peer:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{mine} calls from your address are in progress (--max-calls-per-peer "
                             f"{self.max_calls_per_peer}); retry later", reason="peer_limit")
        if self.calls >= self.max_calls:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{self.calls} calls in progress (--max-calls {self.max_calls}); retry later",
                             reason="node_limit")
        self.calls += 1
        self.calls_by_peer[address] = mine + 1
        return address

    async def _slow_down(self) -> None:
        """Hold a refusal for a peer over its share a moment (bounded), so its retries cost this loop less."""
        if self._held >= _HELD_REFUSALS:
            return
        self._held += 1
        try:
            await asyncio.sleep(_HOLD_SECONDS)
        finally:
            self._held -= 1

    def _release(self, address: str) -> None:
        self.calls -= 1
        left = self.calls_by_peer[address] - 1
        if left:
            self.calls_by_peer[address] = left
        else:
            del self.calls_by_peer[address]

    async def _unary(self, method: str, kind: str, request: pb.ExpertRequest,
                     context: grpc.aio.ServicerContext) -> pb.ExpertReply:
        start = time.perf_counter()
        status = "OK"
        address = None
        try:
            address = self._acquire(context.peer())
            return await self._handle(kind, request, context.time_remaining(), context.invocation_metadata() or (),
                                      address)
        except RpcFailure as failure:
            status = failure.code.name
            self._reject(method, request.uid, failure, context.peer())
            if failure.reason == "peer_limit":
                await self._slow_down()
            await context.abort(failure.code, failure.details)
            raise  # unreachable: abort raises
        finally:
            if address is not None:
                self._release(address)
            self.metrics.requests.labels(method, status).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    async def _stream(self, method: str, kind: str, chunks: AsyncIterator[pb.Chunk],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        start = time.perf_counter()
        status = "OK"
        uid = ""
        address = None
        received = False  # the whole request stream was read (the client half-closed)
        buffer = bytearray()
        try:
            address = self._acquire(context.peer())  # held until the reply is streamed (released in finally)
            # the serialized request may exceed the tensor payload by headers; allow a little slack
            limit = self.max_request_bytes + 64 * 1024
            async for chunk in chunks:
                if isinstance(chunk, Undecodable):
                    raise invalid(f"undecodable Chunk ({chunk.size} bytes)", "malformed")
                buffer += chunk.payload
                if len(buffer) > limit:
                    raise RpcFailure(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"streamed request exceeds --max-request-mb {self.max_request_bytes / 2**20:g}",
                        reason="too_large",
                    )
            received = True
            try:  # streamed requests are large by definition: parse them off the loop
                request = await asyncio.to_thread(pb.ExpertRequest.FromString, bytes(buffer))
            except DecodeError as e:
                raise invalid(f"malformed streamed ExpertRequest: {e}", "malformed") from None
            uid = request.uid
            reply = await self._handle(kind, request, context.time_remaining(), context.invocation_metadata() or (),
                                       address)
            for chunk in iter_chunks(await asyncio.to_thread(reply.SerializeToString)):
                yield chunk
        except RpcFailure as failure:
            status = failure.code.name
            self._reject(method, uid, failure, context.peer())
            if failure.reason in ("peer_limit", "too_large"):
                await self._slow_down()
            if not received and self._courtesy(_address(context.peer())):
                await self._drain(chunks, already=len(buffer))
            await context.abort(failure.code, failure.details)
        finally:
            if address is not None:
                self._release(address)
            self.metrics.requests.labels(method, status).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    def _courtesy(self, address: str) -> bool:
        """Whether to drain this peer's refused stream: once per ``_DRAIN_EVERY_SECONDS`` per address. An honest
        client's mistake gets its clean status; a peer that keeps sending oversized streams does not get its
        megabytes read for it (it gets the early status; see ``_drain``)."""
        now = time.monotonic()
        if now - self._drained.get(address, -_DRAIN_EVERY_SECONDS) < _DRAIN_EVERY_SECONDS:
            return False
        if len(self._drained) >= _MAX_DRAINED_PEERS:
            self._drained.clear()
        self._drained[address] = now
        return True

    async def _drain(self, chunks: AsyncIterator[pb.Chunk], *, already: int) -> None:
        """Read (and drop) the rest of a refused request stream, within bounds, before answering.

        grpc's asyncio client reports a status that arrives while it is still writing as INTERNAL ("Internal
        error from Core", grpc/grpc#36066): a refused stream would look like a broken node instead of, say,
        RESOURCE_EXHAUSTED. dmoe's own clients carry a fix (``dmoe.wire.aio_status``); for everyone else,
        letting the client finish writing first keeps the status. Bounded: streams up to twice
        ``max_request_bytes`` in all (``already`` read), ``_DRAIN_SECONDS``, ``_DRAINS`` streams at once, so a
        flood of endless streams costs little (those get the early status, however their grpc shows it)."""
        if self._draining >= _DRAINS:
            return
        self._draining += 1
        try:
            budget = 2 * self.max_request_bytes - already
            async with asyncio.timeout(_DRAIN_SECONDS):
                async for chunk in chunks:
                    budget -= len(getattr(chunk, "payload", b""))
                    if budget < 0:
                        return
        except (TimeoutError, grpc.RpcError, asyncio.CancelledError):
            pass
        finally:
            self._draining -= 1

    # ---- RPCs ----

    async def Forward(self, request: pb.ExpertRequest, context: grpc.aio.ServicerContext) -> pb.ExpertReply:  # noqa: N802
        return await self._unary("Forward", FORWARD, request, context)

    async def Backward(self, request: pb.ExpertRequest, context: grpc.aio.ServicerContext) -> pb.ExpertReply:  # noqa: N802
        return await self._unary("Backward", BACKWARD, request, context)

    async def ForwardStream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        async for chunk in self._stream("ForwardStream", FORWARD, request_iterator, context):
            yield chunk

    async def BackwardStream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        async for chunk in self._stream("BackwardStream", BACKWARD, request_iterator, context):
            yield chunk

    def expert_info(self, backend: ExpertBackend, *, with_schema: bool = True) -> pb.ExpertInfo:
        info = pb.ExpertInfo(
            uid=backend.uid, expert_cls=backend.expert_cls, hidden_dim=backend.hidden_dim,
            num_parameters=backend.num_parameters, updates=backend.updates,
        )
        if with_schema:
            info.inputs.extend(pb.TensorSpec(dtype=s.dtype, shape=list(s.shape)) for s in backend.schema.inputs)
            info.outputs.extend(pb.TensorSpec(dtype=s.dtype, shape=list(s.shape)) for s in backend.schema.outputs)
        return info

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:  # noqa: N802
        status = "OK"
        try:
            if isinstance(request, Undecodable):
                status = "INVALID_ARGUMENT"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable InfoRequest ({request.size} bytes)")
            if not request.uid:
                experts = [self.expert_info(b, with_schema=False) for b in self.backends.values()]
                return pb.InfoReply(experts=experts, node_id=self.node_id())
            backend = self.backends.get(request.uid)
            if backend is None:
                status = "NOT_FOUND"
                await context.abort(grpc.StatusCode.NOT_FOUND, f"expert {clip(request.uid)} is not served by this node")
            return pb.InfoReply(experts=[self.expert_info(backend)], node_id=self.node_id())
        finally:
            self.metrics.requests.labels("Info", status).inc()

    async def Ping(self, request: pb.PingRequest, context: grpc.aio.ServicerContext) -> pb.PingReply:  # noqa: N802
        self.metrics.requests.labels("Ping", "OK").inc()
        return pb.PingReply(
            node_id=self.node_id(), time=time.time(), load=self.scheduler.load, num_experts=len(self.backends)
        )

    # ---- batched calls: one RPC carrying several experts' calls (dmoe.client.coalesce) ----

    async def _batch(self, method: str, kind: str, batch: pb.ExpertBatch,
                     context: grpc.aio.ServicerContext) -> pb.ExpertBatchReply:
        start = time.perf_counter()
        if isinstance(batch, Undecodable):
            self.metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable ExpertBatch ({batch.size} bytes)")
        if self.membership is not None:  # each call of a closed swarm is signed on its own: send them one by one
            self.metrics.requests.labels(method, "FAILED_PRECONDITION").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this closed swarm's node takes signed calls one by one, not batched")
        parts = list(batch.requests)
        if not 0 < len(parts) <= MAX_BATCH_PARTS:
            self.metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a batch carries 1 to {MAX_BATCH_PARTS} calls, not {len(parts)}")
        peer = context.peer()
        held: list[str] = []
        try:
            for _ in parts:  # every part holds a call slot, as it would on its own: batching bypasses no limit
                held.append(self._acquire(peer))
        except RpcFailure as failure:
            for address in held:
                self._release(address)
            self._reject(method, parts[0].uid, failure, peer)
            self.metrics.requests.labels(method, failure.code.name).inc()
            await context.abort(failure.code, failure.details)
        try:
            timeout = context.time_remaining()
            results = await asyncio.gather(*(self._handle(kind, part, timeout, (), held[0]) for part in parts),
                                           return_exceptions=True)
        finally:
            for address in held:
                self._release(address)
        reply = pb.ExpertBatchReply()
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, pb.ExpertReply):
                reply.replies.append(result)
                reply.statuses.append(pb.PartStatus(code=grpc.StatusCode.OK.value[0]))
                status = "OK"
            else:
                failure = result if isinstance(result, RpcFailure) else RpcFailure(
                    grpc.StatusCode.INTERNAL, f"{type(result).__name__}: {clip(str(result), 200)}", reason="internal")
                self._reject(method, part.uid, failure, peer)
                reply.replies.append(pb.ExpertReply())
                reply.statuses.append(pb.PartStatus(code=failure.code.value[0], details=failure.details))
                status = failure.code.name
            self.metrics.requests.labels(method, status).inc()
        self.metrics.latency.labels(method).observe(time.perf_counter() - start)
        return reply

    async def ForwardBatch(self, request: pb.ExpertBatch, context: grpc.aio.ServicerContext) -> pb.ExpertBatchReply:  # noqa: N802
        return await self._batch("ForwardBatch", FORWARD, request, context)

    async def BackwardBatch(self, request: pb.ExpertBatch, context: grpc.aio.ServicerContext) -> pb.ExpertBatchReply:  # noqa: N802
        return await self._batch("BackwardBatch", BACKWARD, request, context)

    # ---- replicas: state transfer and adoption (dmoe.node.replicas, dmoe.node.keeper) ----

    async def GetState(  # noqa: N802
        self, request: pb.StateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StateChunk]:
        status = "OK"
        serving = False
        try:
            if isinstance(request, Undecodable):
                raise invalid(f"undecodable StateRequest ({request.size} bytes)", "malformed")
            if self.membership is not None:  # a closed swarm's weights are for its members
                await self._check_member(GET_STATE, request.uid, [], context.invocation_metadata() or (), 0)
            backend = self.backends.get(request.uid)
            if backend is None:
                raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"expert {clip(request.uid)} is not served by this node",
                                 reason="unknown_uid")
            if self._state_serves >= _STATE_SERVES:
                raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{self._state_serves} expert states are being sent already; retry later",
                                 reason="state_busy")
            self._state_serves += 1
            serving = True
            if request.round > 0:
                if self.replicas is None:
                    raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "this node does not sync replicas",
                                     reason="no_snapshot")
                try:
                    state = self.replicas.snapshot_of(request.uid, request.round)
                except NoSnapshot as e:
                    raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(e), reason="no_snapshot") from None
            else:
                state = await asyncio.to_thread(backend.current_state)
            payload = await asyncio.to_thread(state.pack)
            header = pb.StateHeader(uid=backend.uid, expert_cls=backend.expert_cls, hidden_dim=backend.hidden_dim,
                                    updates=state.updates, weight=state.weight, round=max(0, request.round),
                                    size=len(payload), sha256=await asyncio.to_thread(digest, payload))
            for i, piece in enumerate(chunks(payload)):
                yield pb.StateChunk(header=header, payload=piece) if i == 0 else pb.StateChunk(payload=piece)
            self.metrics.state_transfers.labels("out", "ok").inc()
        except RpcFailure as failure:
            status = failure.code.name
            if failure.reason != "no_snapshot":  # a replica asking a little early is normal
                self._reject("GetState", getattr(request, "uid", ""), failure, context.peer())
            await context.abort(failure.code, failure.details)
        finally:
            if serving:
                self._state_serves -= 1
            self.metrics.requests.labels("GetState", status).inc()

    async def Adopt(self, request: pb.AdoptRequest, context: grpc.aio.ServicerContext) -> pb.AdoptReply:  # noqa: N802
        status = "OK"
        try:
            if isinstance(request, Undecodable):
                raise invalid(f"undecodable AdoptRequest ({request.size} bytes)", "malformed")
            if self.membership is not None:
                await self._check_member(ADOPT, request.uid, [], context.invocation_metadata() or (), 0)
            try:
                split_uid(request.uid)
                parse_endpoint(request.source)
            except (ConfigError, ValueError):
                raise invalid(f"adopt {clip(request.uid)} from {clip(request.source)}: not a grid uid and an "
                              "endpoint", "malformed") from None
            if self.keeper is None:
                return pb.AdoptReply(accepted=False, detail="this node does not adopt experts")
            if self._adopting:
                raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "adopting another expert right now; retry later",
                                 reason="adopt_busy")
            self._adopting = True
            try:
                accepted, detail = await self.keeper.accept_adoption(request.uid, request.source)
            finally:
                self._adopting = False
            return pb.AdoptReply(accepted=accepted, detail=detail)
        except RpcFailure as failure:
            status = failure.code.name
            self._reject("Adopt", getattr(request, "uid", ""), failure, context.peer())
            await context.abort(failure.code, failure.details)
            raise  # unreachable: abort raises
        finally:
            self.metrics.requests.labels("Adopt", status).inc()
