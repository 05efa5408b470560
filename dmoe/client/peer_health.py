"""Per-endpoint health as seen by one client: its own latency, its load, and bans.

Volunteers sit on slow, uneven home links, so every judgement here is made against the
endpoint's *own* record, never against the fastest peer:

* **Latency**, per endpoint and method (a backward carries a recompute and an optimizer step, so
  it is judged against backwards): an EWMA of successful call latencies (request sent to reply
  decoded: what a caller actually waits), an EWMA of their deviation (Jacobson's estimator, as
  TCP uses for its retransmission timer) and an EWMA of the rows per call. ``expected(endpoint,
  method, rows, spread)`` is ``mean * max(1, rows / usual rows) + spread * deviation``: with
  ``spread`` 2 about the 95th percentile: a call is hedged past it, and suspected stuck past
  ``stuck_factor`` times it (``dmoe.client.dispatch``; only a Ping left unanswered makes that a
  failure).
  A call that lost a hedge race is a censored sample: its elapsed time is a lower bound, folded in
  with ``record_slow`` so ordering learns, without any ban.
* **Load** is what the node announced (queued batches, from the DHT record or a Ping): the work
  of *all* its clients. This client's own calls in flight are counted too, but only to order
  replicas nobody has measured yet; a measured mean already includes this client's usual
  concurrency.
* **Choice of replica** (``choose``): an endpoint never measured goes first (so a new replica is
  explored, and unmeasured ones are taken least loaded first, ties broken by a per-client random
  salt rather than by name, so trainers spread their first calls). Otherwise the first attempt is
  drawn with weight ``1 / wait**2``, where ``wait = mean * (1 + announced load)``: a replica twice as slow
  gets a quarter of the calls, never none, so it keeps its measurement fresh and contributes its
  compute, and no fastest replica is herded by every trainer at once. Retries follow in order of
  ``wait`` (``order``).
* **Bans.** A failed call (unreachable, deadline, rejected, garbage, or given up on as stuck)
  bans the endpoint for ``ban_base`` seconds; every further consecutive failure doubles the ban
  (capped at ``ban_max``); one success clears the ban and resets the doubling. Failures of calls
  already in flight when the ban began belong to the same incident and do not double it (a crashed
  node fails all its concurrent calls at once: one failure, not eight). A node that was banned for
  not answering (stuck, deadline, unreachable) is probed by the ``Swarm`` with a cheap Ping:
  ``probe_answered`` lifts such a ban, so a recovered node is back before its ban can grow, and
  ``probe_unanswered`` keeps it from running out while the node still does not answer. Bans for
  wrong answers are not lifted by a Ping.
* **Seen alive.** The time of the last answer is kept: an endpoint that answered a moment ago is
  alive whatever the DHT says (see ``dmoe.client.prefix_table``).

Written from the asyncio loop thread, read from torch threads (beam search): a lock keeps the
small state consistent.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dmoe.config.client import HealthOptions
from dmoe.wire.endpoints import is_relayed

LIVENESS_FAILURES = frozenset({"stuck", "deadline", "unreachable"})  # what a Ping answer disproves


@dataclass
class _Latency:
    mean: float
    deviation: float
    rows: float


@dataclass
class _Peer:
    latency: dict[str, _Latency] = field(default_factory=dict)  # by method
    failures: int = 0  # consecutive incidents
    banned_until: float = 0.0
    banned_since: float = float("-inf")  # when the current ban (incident) began
    last_failure_kind: str = ""
    last_success: float = float("-inf")  # when it last answered (same clock)
    announced_load: float = 0.0  # queued batches, as the node last said
    in_flight: int = 0  # this client's calls to it right now
    answers: int = 0  # successful calls, ever


class PeerHealth:
    def __init__(
        self,
        options: HealthOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or HealthOptions()
        self._clock = clock
        self._rng = rng or random.Random(int.from_bytes(os.urandom(8), "little"))
        self._salt = self._rng.getrandbits(64).to_bytes(8, "little")
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()

    def _peer(self, endpoint: str) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._peers[endpoint] = _Peer()
        return peer

    # ---- observations ----

    def _observe(self, peer: _Peer, method: str, latency: float, rows: int | None) -> None:
        o = self.options
        stats = peer.latency.get(method)
        if stats is None:
            peer.latency[method] = _Latency(latency, latency / 2, float(rows or 1))
            return
        stats.deviation = (1 - o.rtt_beta) * stats.deviation + o.rtt_beta * abs(latency - stats.mean)
        stats.mean = (1 - o.rtt_alpha) * stats.mean + o.rtt_alpha * latency
        if rows:
            stats.rows = (1 - o.rtt_alpha) * stats.rows + o.rtt_alpha * rows

    def record_success(self, endpoint: str, latency: float, *, method: str = "forward",
                       rows: int | None = None) -> None:
        with self._lock:
            peer = self._peer(endpoint)
            self._observe(peer, method, latency, rows)
            peer.answers += 1
            peer.failures = 0
            peer.banned_until = 0.0
            peer.last_success = self._clock()

    def record_slow(self, endpoint: str, elapsed: float, *, method: str = "forward", rows: int | None = None) -> None:
        """A call cancelled after ``elapsed`` seconds without failing (it lost a hedge race): at least that slow."""
        with self._lock:
            peer = self._peer(endpoint)
            stats = peer.latency.get(method)
            if stats is None or elapsed > stats.mean:
                self._observe(peer, method, elapsed, rows)

    def note_load(self, endpoint: str, load: float) -> None:
        with self._lock:
            self._peer(endpoint).announced_load = max(0.0, float(load))

    def call_started(self, endpoint: str) -> None:
        with self._lock:
            self._peer(endpoint).in_flight += 1

    def call_ended(self, endpoint: str) -> None:
        with self._lock:
            peer = self._peer(endpoint)
            peer.in_flight = max(0, peer.in_flight - 1)

    def record_failure(self, endpoint: str, kind: str, *, started: float | None = None) -> float:
        """Ban ``endpoint``; returns the new ban's duration in seconds, 0.0 if the ban is unchanged.

        ``started``: when the failed call began (same clock); a call begun before the current ban
        was imposed is part of that incident and leaves the ban as it is.
        """
        with self._lock:
            peer = self._peer(endpoint)
            peer.last_failure_kind = kind
            now = self._clock()
            if started is not None and started < peer.banned_since and peer.failures:
                return 0.0
            peer.failures += 1
            duration = min(self.options.ban_base * 2 ** (peer.failures - 1), self.options.ban_max)
            peer.banned_until = now + duration
            peer.banned_since = now
            return duration

    def probe_answered(self, endpoint: str, load: float | None = None) -> bool:
        """A Ping answered: lift a ban for not answering (True if one was lifted)."""
        with self._lock:
            peer = self._peer(endpoint)
            if load is not None:
                peer.announced_load = max(0.0, float(load))
            if peer.banned_until <= self._clock() or peer.last_failure_kind not in LIVENESS_FAILURES:
                return False
            peer.banned_until = 0.0
            peer.failures = 0
            return True

    def probe_unanswered(self, endpoint: str, until: float) -> None:
        """A Ping got no answer: keep a ban for not answering at least ``until`` seconds from now.

        A ban must not run out by itself while the node still does not answer (a long freeze, a
        partition): the next call would find out the hard way again.
        """
        with self._lock:
            peer = self._peers.get(endpoint)
            if peer is not None and peer.last_failure_kind in LIVENESS_FAILURES:
                peer.banned_until = max(peer.banned_until, self._clock() + until)

    # ---- judgements ----

    def is_banned(self, endpoint: str) -> bool:
        with self._lock:
            peer = self._peers.get(endpoint)
            return peer is not None and peer.banned_until > self._clock()

    def needs_probe(self, endpoint: str) -> bool:
        """Banned for not answering: a Ping may show it is back."""
        with self._lock:
            peer = self._peers.get(endpoint)
            return (peer is not None and peer.banned_until > self._clock()
                    and peer.last_failure_kind in LIVENESS_FAILURES)

    def answered_within(self, endpoint: str, seconds: float) -> bool:
        """True if ``endpoint`` answered in the last ``seconds`` and is not banned since."""
        with self._lock:
            peer = self._peers.get(endpoint)
            if peer is None:
                return False
            now = self._clock()
            return now - peer.last_success <= seconds and peer.banned_until <= now

    def rtt(self, endpoint: str, method: str = "forward") -> float | None:
        """Mean latency of ``method`` calls to ``endpoint`` (None: never measured)."""
        with self._lock:
            peer = self._peers.get(endpoint)
            stats = peer.latency.get(method) if peer is not None else None
            return None if stats is None else stats.mean

    def expected(self, endpoint: str, method: str = "forward", rows: int | None = None, *,
                 spread: float = 4.0) -> float | None:
        """``mean * max(1, rows / usual rows) + spread * deviation`` of the endpoint's own calls; None if unmeasured."""
        with self._lock:
            peer = self._peers.get(endpoint)
            stats = peer.latency.get(method) if peer is not None else None
            if stats is None:
                return None
            scale = max(1.0, (rows or 0) / stats.rows) if stats.rows > 0 else 1.0
            return stats.mean * scale + spread * stats.deviation

    def _wait(self, endpoint: str, peer: _Peer | None) -> float | None:
        stats = peer.latency.get("forward") if peer is not None else None
        if stats is None:
            return None
        # not stretched by this client's calls in flight: the mean was measured at this client's usual
        # concurrency (a step sends all its calls at once), so counting them again would flatten every choice.
        # A relayed endpoint's latency already includes the relay's hop; the penalty prefers a direct replica
        # of about the same speed (a relay is a shared, bounded resource, and one more thing that can fail)
        penalty = self.options.relayed_penalty if is_relayed(endpoint) else 1.0
        return stats.mean * (1.0 + peer.announced_load) * penalty

    def _salted(self, endpoint: str) -> bytes:
        return hashlib.blake2b(endpoint.encode(), key=self._salt, digest_size=8).digest()

    def order(self, endpoints: Iterable[str]) -> list[str]:
        """Unbanned endpoints first; unmeasured ones first (least loaded, then salted), then by expected wait."""
        now = self._clock()
        with self._lock:
            def key(endpoint: str) -> tuple[bool, bool, bool, float, bytes]:
                peer = self._peers.get(endpoint)
                banned = peer is not None and peer.banned_until > now
                wait = self._wait(endpoint, peer)
                if wait is None:  # unmeasured: direct ones are explored first
                    load = (peer.announced_load + peer.in_flight) if peer is not None else 0.0
                    return banned, False, is_relayed(endpoint), load, self._salted(endpoint)
                return banned, True, False, wait, self._salted(endpoint)

            return sorted(dict.fromkeys(endpoints), key=key)

    def choose(self, endpoints: Sequence[str]) -> list[str]:
        """``order``, except that the first attempt among measured, unbanned replicas is drawn by ``1 / wait**2``."""
        ordered = self.order(endpoints)
        now = self._clock()
        with self._lock:
            peers = [self._peers.get(e) for e in ordered]
            candidates = []
            for endpoint, peer in zip(ordered, peers, strict=True):
                if peer is not None and peer.banned_until > now:
                    break  # banned ones come last in `order`
                wait = self._wait(endpoint, peer)
                if wait is None:
                    return ordered  # explore the unmeasured one first
                candidates.append((endpoint, wait))
        if len(candidates) < 2:
            return ordered
        weights = [1.0 / max(wait, 1e-6) ** 2 for _, wait in candidates]
        first = self._rng.choices([e for e, _ in candidates], weights=weights)[0]
        return [first, *(e for e in ordered if e != first)]

    def banned(self) -> dict[str, float]:
        """Currently banned endpoints -> seconds of ban left."""
        now = self._clock()
        with self._lock:
            return {ep: p.banned_until - now for ep, p in self._peers.items() if p.banned_until > now}

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        now = self._clock()
        with self._lock:
            out: dict[str, dict[str, float | int | str | None]] = {}
            for ep, p in self._peers.items():
                forward = p.latency.get("forward")
                out[ep] = {
                    "rtt": forward.mean if forward else None,
                    "deviation": forward.deviation if forward else None,
                    "load": p.announced_load,
                    "in_flight": p.in_flight,
                    "answers": p.answers,
                    "failures": p.failures,
                    "banned_for": max(0.0, p.banned_until - now),
                    "last_failure": p.last_failure_kind,
                }
            return out
