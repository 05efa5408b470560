"""``Swarm``: the client's handle on a dmoe swarm, shared by every layer of a model and the trainer.

One background thread runs one uvloop asyncio loop that owns everything networked:

* the DHT access: by default an in-loop ``hivemind.dht.DHTNode`` joined through
  ``initial_peers`` (client mode when joining, so a trainer behind NAT needs no open port), or an
  existing ``hivemind.DHT`` wrapped with ``Swarm.from_dht`` (shared with e.g. an averager);
* the ``ExpertRegistry`` and the ``PrefixTable`` cache of DHT lookups used by beam search;
* one gRPC aio channel per expert endpoint (reused by every call; least recently used are closed
  past ``max_channels``);
* ``PeerHealth``: each endpoint's own latency, load and bans; hedged calls, liveness Pings and
  probes of banned endpoints run here too.

Torch code (autograd functions, beam search bookkeeping) runs in the caller's thread and hands
coroutines to the loop with ``run(coro, timeout)``: a blocking bridge that always has a finite
timeout and cancels the coroutine when it expires. Requests are serialized in the caller's
thread; replies are decoded and checked (shapes, finiteness) in the loop, by ``remote_call``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import hivemind
import torch
import uvloop

from dmoe.client import metrics
from dmoe.client.coalesce import CallCoalescer
from dmoe.client.peer_health import PeerHealth
from dmoe.client.prefix_table import PrefixTable
from dmoe.client.remote_call import TensorSpec, call_expert
from dmoe.config.client import HealthOptions, HedgeOptions, LookupOptions, SwarmOptions
from dmoe.dht.access import DHTAccess, InLoopDHT, ProcessDHT
from dmoe.dht.members import MemberNodes
from dmoe.dht.registry import ExpertRegistry
from dmoe.errors import DeadlineExceeded, DmoeError, ExpertCallError, NodeUnreachable
from dmoe.logs import RateLimitedLog
from dmoe.membership import Member, payload_digest
from dmoe.wire.codec import OFF_LOOP_BYTES, payload_bytes
from dmoe.wire.endpoints import open_channel, parse_endpoint
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc
from dmoe.wire.tls import certificate_fingerprint

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SWARM = SwarmOptions()
BRIDGE_GRACE = 2.0  # seconds a caller thread waits past a deadline the loop enforces itself (Swarm.run)
_MIN_ATTEMPT = 0.005  # seconds: below this there is no point starting another replica attempt
# our request was bad, or we are no member of a closed swarm: another node would say the same
_NO_BAN_STATUSES = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED")
_MEMBERSHIP_STATUSES = ("UNAUTHENTICATED", "PERMISSION_DENIED")
_LIVE_SWARMS: weakref.WeakSet[Swarm] = weakref.WeakSet()


@dataclass
class CallProgress:
    """Which endpoint a running ``Swarm.call`` is trying, since when (``time.monotonic()``)."""

    endpoint: str | None = None
    started: float = 0.0


@dataclass
class SwarmStats:
    """Counters of one Swarm (all layers using it); ``Swarm.stats`` returns a snapshot dict."""

    calls: Counter[str] = field(default_factory=Counter)  # by method, one per endpoint attempt
    answers: Counter[str] = field(default_factory=Counter)  # successful calls by method
    failures: Counter[str] = field(default_factory=Counter)  # by failure kind
    late: Counter[str] = field(default_factory=Counter)  # by method: cancelled once enough answers were in
    retries: int = 0
    hedges: int = 0  # second requests sent to another replica of a slow call
    hedge_wins: int = 0  # ... that answered first
    probes: int = 0  # Pings to banned endpoints
    recovered: int = 0  # bans lifted because a probe answered
    bans: int = 0
    lookups: int = 0  # DHT prefix keys fetched
    lookup_batches: int = 0
    lookup_failures: int = 0
    lookup_seconds: float = 0.0
    cache_hits: int = 0
    searches: int = 0


class Swarm:
    """Client handle on a swarm. ``Swarm(initial_peers=[...])`` joins; ``Swarm.from_dht(dht)`` reuses a DHT.

    ``use_dht=False`` gives a handle with gRPC only (for ``RemoteExpert`` with known endpoints).
    Always ``shutdown()`` (or use ``with Swarm(...) as swarm``); it is also done at exit.
    """

    def __init__(
        self,
        initial_peers: Sequence[str] = (),
        *,
        client_mode: bool | None = None,
        host_maddrs: Sequence[str] | None = None,
        use_dht: bool = True,
        dht_kwargs: dict[str, Any] | None = None,
        health: HealthOptions | None = None,
        lookup: LookupOptions | None = None,
        hedge: HedgeOptions | None = None,
        max_channels: int = _SWARM.max_channels,
        start_timeout: float = _SWARM.start_timeout,
        coalesce: bool = _SWARM.coalesce,
        _dht: hivemind.DHT | None = None,
    ) -> None:
        self.health = PeerHealth(health)
        self.coalescer = CallCoalescer() if coalesce else None  # one batch RPC per node for a step's calls
        # a closed swarm's member (key + current token): every call it makes is signed; None in an open swarm
        self.member: Member | None = None
        self.certificates: dict[str, bytes] = {}  # key fingerprint -> the node's TLS certificate (pinned)
        self._refusals = RateLimitedLog(logger, interval=30.0)
        self.hedge = hedge or HedgeOptions()
        self._hedge_tokens = self.hedge.burst
        self._probes: dict[str, asyncio.Task[None]] = {}  # banned endpoints being probed until they answer
        self._checks: dict[str, asyncio.Task[None]] = {}  # liveness checks of endpoints suspected stuck
        self.stats_counters = SwarmStats()
        self.lookup_options = lookup or LookupOptions()
        self.max_channels = max_channels
        self.dht: DHTAccess | None = None
        self.registry: ExpertRegistry | None = None
        self.prefixes: PrefixTable | None = None
        self._channels: OrderedDict[str, tuple[grpc.aio.Channel, pb_grpc.ExpertServiceStub]] = OrderedDict()
        self._closed = False
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="dmoe-swarm", daemon=True)
        self._thread.start()
        _LIVE_SWARMS.add(self)
        if not use_dht:
            return
        try:
            if _dht is not None:
                dht: DHTAccess = ProcessDHT(_dht)
            else:
                peers = list(initial_peers)
                mode = bool(peers) if client_mode is None else client_mode
                # most of start_timeout for retrying the initial peers, the rest for the p2p daemon's start
                kwargs: dict[str, Any] = {"initial_peers": peers, "client_mode": mode,
                                          "join_timeout": 0.75 * start_timeout, **(dht_kwargs or {})}
                if host_maddrs is not None:
                    kwargs["host_maddrs"] = list(host_maddrs)
                dht = self.run(InLoopDHT.create(**kwargs), timeout=start_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.dht = dht
        self.registry = ExpertRegistry(dht)
        self.prefixes = PrefixTable(self.registry, self.lookup_options, self.stats_counters,
                                    vouch=self.health.answered_within, on_endpoints=self._found_endpoints)

    @classmethod
    def from_dht(cls, dht: hivemind.DHT, **kwargs: Any) -> Swarm:
        """Use an existing ``hivemind.DHT`` (it stays running after ``shutdown``).

        Call ``dmoe.dht.patches.apply()`` before starting that DHT: it runs in a child process, which
        has dmoe's fixes to hivemind only if they were applied before it started.
        """
        return cls(_dht=dht, **kwargs)

    # ---- loop thread and sync bridge ----

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` in the swarm's loop and wait at most ``timeout`` seconds for it (then cancel it)."""
        if self._closed:
            coro.close()
            raise DmoeError("this Swarm was shut down")
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise RuntimeError("Swarm.run called from the swarm's own loop thread; await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(max(timeout, 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"swarm operation did not finish within {timeout:.2f}s") from None
        except BaseException:
            future.cancel()  # KeyboardInterrupt in the caller: do not leave the coroutine running
            raise

    # ---- gRPC channels and calls (loop thread only) ----

    def stub(self, endpoint: str) -> pb_grpc.ExpertServiceStub:
        """The stub of a plaintext endpoint, or of a TLS one whose certificate is known (``stub_for`` fetches it)."""
        entry = self._channels.get(endpoint)
        if entry is not None:
            self._channels.move_to_end(endpoint)
            return entry[1]
        tls = parse_endpoint(endpoint).tls
        certificate = self.certificates.get(tls) if tls else None
        if tls and certificate is None:
            raise NodeUnreachable(f"{endpoint}: no TLS certificate known for key {tls} (not in the DHT)",
                                  endpoint=endpoint)
        channel = open_channel(endpoint, certificate=certificate)  # direct or through its relay; TLS pinned
        stub = pb_grpc.ExpertServiceStub(channel)
        self._channels[endpoint] = (channel, stub)
        while len(self._channels) > self.max_channels:
            _, (old, _) = self._channels.popitem(last=False)
            asyncio.get_running_loop().create_task(old.close(grace=None))
        return stub

    async def stub_for(self, endpoint: str) -> pb_grpc.ExpertServiceStub:
        """``stub``, after looking up the node's TLS certificate in the DHT when the endpoint needs one."""
        if endpoint in self._channels:  # every call after the first: no parsing on the hot path
            return self.stub(endpoint)
        tls = parse_endpoint(endpoint).tls
        if tls and tls not in self.certificates:
            certificate = await self.registry.find_certificate(tls) if self.registry is not None else None
            if certificate is not None:
                self.certificates[tls] = certificate
        return self.stub(endpoint)

    def restrict_to_members(self, authority: str) -> None:
        """A closed swarm: use only experts of nodes that are members of ``authority`` (its coordinator's peer id)."""
        if self.registry is None:
            raise ValueError("restrict_to_members needs a Swarm with a DHT")
        self.registry.admit = MemberNodes(self.registry, authority)
        if self.prefixes is not None:
            self.prefixes.clear()

    def trust(self, certificate: bytes) -> str:
        """Pin a node's TLS certificate by hand (no DHT, e.g. ``Swarm(use_dht=False)``); returns its fingerprint."""
        fingerprint = certificate_fingerprint(certificate)
        if fingerprint is None:
            raise ValueError("not an RSA certificate")
        self.certificates[fingerprint] = certificate
        return fingerprint

    async def _preconnect(self, endpoint: str) -> None:
        with contextlib.suppress(Exception):  # best effort: the first call connects anyway
            await self.stub_for(endpoint)
            await self._connect(self._channels[endpoint][0])

    def _found_endpoints(self, found: Sequence[tuple[str, float]]) -> None:
        """Expert lookups saw these (endpoint, announced load): note the loads, connect to new endpoints.

        Connecting ahead (TCP + HTTP/2 set-up through a home link is a few round trips) keeps that
        cost out of the first call, which would otherwise look slow through no fault of the node.
        """
        for endpoint, load in found:
            self.health.note_load(endpoint, load)
            if endpoint not in self._channels and len(self._channels) < self.max_channels:
                asyncio.get_running_loop().create_task(self._preconnect(endpoint))

    @staticmethod
    async def _connect(channel: grpc.aio.Channel) -> None:
        with contextlib.suppress(Exception):  # best effort: the first call connects anyway
            channel.get_state(try_to_connect=True)
            await asyncio.wait_for(channel.channel_ready(), 10.0)

    async def call(
        self,
        endpoints: Sequence[str],
        request: pb.ExpertRequest,
        *,
        method: str,
        deadline: float,
        expected: Sequence[TensorSpec] | None = None,
        retry: bool = True,
        progress: CallProgress | None = None,
        rows: int | None = None,
    ) -> tuple[str, list[torch.Tensor]]:
        """Call one expert: a replica chosen by ``PeerHealth.choose``, others on failure, a hedge when slow.

        ``deadline`` is a ``time.monotonic()`` instant. Returns (endpoint that answered, tensors);
        raises the last ``ExpertCallError`` if none answered. Each attempt gets an equal share of
        the time left, so one frozen replica cannot eat the time of the others. With ``retry``
        (forward) and another replica at hand, an attempt still running after the 95th percentile
        of the best replica's own latency is hedged: the same request goes to the next replica, the
        first answer wins and the other call is cancelled, within the ``HedgeOptions`` budget.
        ``progress`` shows the caller which endpoint is being tried (to judge a call it cancels).
        """
        order = self.health.choose(endpoints) if retry else list(endpoints[:1])
        queue = list(order)
        attempts: dict[asyncio.Task[list[torch.Tensor]], tuple[str, float]] = {}
        last_error: ExpertCallError | None = None
        hedged: str | None = None  # the endpoint a hedge went to
        tried = 0  # attempts started after a failure or not: retries are those after the first
        self._hedge_tokens = min(self.hedge.burst, self._hedge_tokens + self.hedge.budget)
        try:
            while True:
                if not attempts:
                    if not queue or deadline - time.monotonic() < _MIN_ATTEMPT:
                        break
                    self._start_attempt(queue.pop(0), request, method=method, deadline=deadline,
                                        share=len(queue) + 1, expected=expected, progress=progress,
                                        attempts=attempts, retry=tried > 0)
                    tried += 1
                # every attempt ends by itself (its own timeout), so only a hedge is worth waking for
                hedge_at = self._hedge_at(attempts, order, queue, method, rows) if retry and not hedged else None
                timeout = None if hedge_at is None else max(0.0, hedge_at - time.monotonic())
                done, _ = await asyncio.wait(attempts, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the hedge delay passed
                    hedged = queue[0]
                    self._hedge_tokens -= 1.0
                    self.stats_counters.hedges += 1
                    metrics.HEDGES.labels(method, "sent").inc()
                    self._start_attempt(queue.pop(0), request, method=method, deadline=deadline,
                                        share=len(queue) + 1, expected=expected, progress=progress,
                                        attempts=attempts, retry=False)
                    continue
                for task in done:
                    endpoint, started = attempts.pop(task)
                    try:
                        tensors = task.result()
                    except ExpertCallError as e:
                        status = getattr(e, "status", "")
                        if status in _MEMBERSHIP_STATUSES:  # the user must act: say so loudly, once in a while
                            self._refusals.warning(status, f"{e}. This swarm is closed to non-members: start dmoe "
                                                           "train with --member-key and --token-url (or --token)")
                        self._failed(endpoint, method, e.kind, str(e), ban=status not in _NO_BAN_STATUSES,
                                     started=started)
                        last_error = e
                        continue
                    latency = time.monotonic() - started
                    self.health.record_success(endpoint, latency, method=method, rows=rows)
                    self.stats_counters.answers[method] += 1
                    metrics.CALL_SECONDS.labels(method).observe(latency)
                    if endpoint == hedged:
                        self.stats_counters.hedge_wins += 1
                        metrics.HEDGES.labels(method, "won").inc()
                    for other, (other_endpoint, other_started) in attempts.items():
                        other.cancel()  # it lost the race, which says it is at least that slow (not a failure)
                        self.health.record_slow(other_endpoint, time.monotonic() - other_started, method=method,
                                                rows=rows)
                    return endpoint, tensors
        finally:
            for task in attempts:  # cancelled by our caller, or a hedge race ended: stop what still runs
                task.cancel()
            if attempts:
                await asyncio.gather(*attempts, return_exceptions=True)
        if last_error is not None:
            raise last_error
        raise DeadlineExceeded(
            f"no time left to call {request.uid} (endpoints: {', '.join(order) or 'none'})", uid=request.uid
        )

    def _start_attempt(
        self, endpoint: str, request: pb.ExpertRequest, *, method: str, deadline: float, share: int,
        expected: Sequence[TensorSpec] | None, progress: CallProgress | None,
        attempts: dict[asyncio.Task[list[torch.Tensor]], tuple[str, float]], retry: bool,
    ) -> None:
        started = time.monotonic()
        if progress is not None:
            progress.endpoint, progress.started = endpoint, started
        if retry:
            self.stats_counters.retries += 1
            metrics.RETRIES.labels(method).inc()
        self.stats_counters.calls[method] += 1
        metrics.CALLS.labels(method).inc()
        task = asyncio.get_running_loop().create_task(self._attempt(
            endpoint, request, method=method, timeout=(deadline - started) / share, expected=expected))
        attempts[task] = (endpoint, started)

    async def _attempt(self, endpoint: str, request: pb.ExpertRequest, *, method: str, timeout: float,
                       expected: Sequence[TensorSpec] | None) -> list[torch.Tensor]:
        self.health.call_started(endpoint)
        try:
            metadata = None
            if self.member is not None:  # signed per attempt: a node accepts one signature once
                chunks = [t.data for t in request.tensors]
                digest = payload_digest(chunks) if payload_bytes(request.tensors) < OFF_LOOP_BYTES \
                    else await asyncio.to_thread(payload_digest, chunks)
                metadata = self.member.metadata(method, request.uid, digest)
            return await call_expert(await self.stub_for(endpoint), request, method=method, endpoint=endpoint,
                                     timeout=timeout, expected=expected, metadata=metadata,
                                     coalescer=self.coalescer)
        finally:
            self.health.call_ended(endpoint)

    def _hedge_at(self, attempts: dict[asyncio.Task[list[torch.Tensor]], tuple[str, float]], order: Sequence[str],
                  queue: Sequence[str], method: str, rows: int | None) -> float | None:
        """When the single running attempt should be hedged (``time.monotonic()``); None: not at all."""
        if not self.hedge.enabled or len(attempts) != 1 or not queue or self._hedge_tokens < 1.0:
            return None
        if self.health.is_banned(queue[0]):
            return None
        # the 95th percentile of the best replica's own latency: the class this request belongs to
        estimates = [e for e in (self.health.expected(ep, method, rows, spread=2.0) for ep in order) if e is not None]
        if not estimates:
            return None
        (_, started), = attempts.values()
        return started + max(self.hedge.min_delay, min(estimates))

    def penalize(self, endpoint: str, method: str, kind: str, message: str, *, started: float | None = None) -> None:
        """A call the caller gave up on was stuck (no progress while others answered): count and ban."""
        self._failed(endpoint, method, kind, message, started=started)

    def note_late(self, method: str) -> None:
        """A call was cancelled only because enough answers had arrived: counted (not a failure), not banned."""
        self.stats_counters.late[method] += 1
        metrics.LATE.labels(method).inc()

    def _failed(
        self, endpoint: str, method: str, kind: str, message: str, *, ban: bool = True, started: float | None = None
    ) -> None:
        self.stats_counters.failures[kind] += 1
        metrics.FAILURES.labels(method, kind).inc()
        if not ban:
            logger.info("%s", message)
            return
        duration = self.health.record_failure(endpoint, kind, started=started)
        if duration > 0:  # one ban and one log line per incident, not per concurrent call
            self.stats_counters.bans += 1
            metrics.BANS.inc()
            logger.info("%s; banning %s for %.1fs", message, endpoint, duration)
            self._probe_later(endpoint)
        else:
            logger.debug("%s (same incident, already banned)", message)

    def check_alive(self, endpoint: str, method: str, *, started: float) -> None:
        """A call to ``endpoint`` made no progress for long: Ping it; no answer bans it as stuck (one incident)."""
        self._once(self._checks, endpoint, lambda: self._check_alive(endpoint, method, started))

    async def checked(self, endpoints: Sequence[str], timeout: float) -> None:
        """Wait (at most ``timeout``) for the liveness checks of ``endpoints`` still running."""
        tasks = [t for e in endpoints if (t := self._checks.get(e)) is not None and not t.done()]
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    @staticmethod
    def _once(tasks: dict[str, asyncio.Task[None]], endpoint: str,
              make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start ``make()`` for ``endpoint`` unless one is still running (no running loop: nothing to start)."""
        task = tasks.get(endpoint)
        if task is not None and not task.done():
            return
        with contextlib.suppress(RuntimeError):
            tasks[endpoint] = asyncio.get_running_loop().create_task(make())

    async def _ping(self, endpoint: str, timeout: float) -> pb.PingReply | None:
        """One cheap Ping (counted as a probe); None if it got no answer within ``timeout``."""
        self.stats_counters.probes += 1
        metrics.PROBES.labels("sent").inc()
        try:
            return await (await self.stub_for(endpoint)).Ping(pb.PingRequest(), timeout=timeout)
        except (grpc.aio.AioRpcError, TimeoutError, NodeUnreachable):
            return None

    async def _check_alive(self, endpoint: str, method: str, started: float) -> None:
        options = self.health.options
        rtt = self.health.rtt(endpoint)
        timeout = options.probe_timeout if rtt is None else min(options.probe_timeout, max(0.25, 4 * rtt))
        reply = await self._ping(endpoint, timeout)
        if reply is None:
            self._failed(endpoint, method, "stuck", f"{method} at {endpoint} made no progress and did not answer "
                         f"a Ping within {timeout:.2f}s", started=started)
            return
        self.health.note_load(endpoint, reply.load)  # alive: slow or busy, not stuck
        logger.debug("%s is slow but answers a Ping (load %.2f): not stuck", endpoint, reply.load)

    def _probe_later(self, endpoint: str) -> None:
        """Ping a node banned for not answering until it answers (ban lifted) or the ban runs out."""
        self._once(self._probes, endpoint, lambda: self._probe(endpoint))

    async def _probe(self, endpoint: str) -> None:
        options = self.health.options
        while self.health.needs_probe(endpoint):
            await asyncio.sleep(options.probe_interval)
            if not self.health.needs_probe(endpoint):
                break
            reply = await self._ping(endpoint, options.probe_timeout)
            if reply is None:
                self.health.probe_unanswered(endpoint, until=options.probe_interval + options.probe_timeout + 0.5)
                continue
            if self.health.probe_answered(endpoint, load=reply.load):
                self.stats_counters.recovered += 1
                metrics.PROBES.labels("recovered").inc()
                logger.info("%s answered a probe: ban lifted", endpoint)
            break

    # ---- introspection ----

    @property
    def stats(self) -> dict[str, Any]:
        s = self.stats_counters
        return {
            "calls": dict(s.calls),
            "answers": dict(s.answers),
            "failures": dict(s.failures),
            "late": dict(s.late),
            "retries": s.retries,
            "hedges": s.hedges,
            "hedge_wins": s.hedge_wins,
            "probes": s.probes,
            "recovered": s.recovered,
            "bans": s.bans,
            "banned": self.health.banned(),
            "lookups": s.lookups,
            "lookup_batches": s.lookup_batches,
            "lookup_failures": s.lookup_failures,
            "lookup_seconds": s.lookup_seconds,
            "cache_hits": s.cache_hits,
            "searches": s.searches,
            "channels": len(self._channels),
            "batched_rpcs": self.coalescer.batches if self.coalescer is not None else 0,
            "batched_calls": self.coalescer.coalesced if self.coalescer is not None else 0,
        }

    @property
    def peer_id(self) -> str | None:
        return self.dht.peer_id if self.dht is not None else None

    def visible_maddrs(self, timeout: float = 10.0) -> list[str]:
        if self.dht is None:
            return []
        return self.run(self.dht.visible_maddrs(), timeout=timeout)

    # ---- shutdown ----

    async def _close(self) -> None:
        for task in (*self._probes.values(), *self._checks.values()):
            task.cancel()
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(c.close(grace=None) for c in channels), return_exceptions=True)
        if self.dht is not None:
            await self.dht.shutdown()
        # whatever is left (background lookups, library housekeeping) ends with the loop
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=2.0)

    def shutdown(self, timeout: float = 15.0) -> None:
        """Close channels and the DHT node (a wrapped hivemind.DHT stays up) and stop the loop thread."""
        if self._closed:
            return
        if self._thread.is_alive():
            try:
                self.run(self._close(), timeout=timeout)
            except Exception as e:  # shutting down: report, never raise
                logger.warning("swarm shutdown was not clean: %s", e)
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._closed = True
        if not self._thread.is_alive():
            self._loop.close()
        _LIVE_SWARMS.discard(self)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Swarm(peer_id={self.peer_id}, closed={self._closed})"


def _shutdown_all() -> None:
    for swarm in list(_LIVE_SWARMS):
        swarm.shutdown(timeout=5.0)


atexit.register(_shutdown_all)
