"""Per-endpoint health as seen by one client: recent round-trip time and bans.

* **RTT** is an exponentially weighted moving average of successful call latencies (request sent
  to reply decoded, so it includes the node's queueing and compute: what a caller actually waits).
  Replicas of an expert are tried in order of lowest EWMA; an endpoint never measured sorts first,
  so a new replica gets explored once instead of starving behind a measured one.
* **Bans.** A failed call (unreachable, deadline, rejected, garbage, or given up on as stuck by
  ``dmoe.client.dispatch``) bans the endpoint for ``ban_base`` seconds;
  every further consecutive failure doubles the ban (capped at ``ban_max``); one success clears
  the ban and resets the doubling. Failures of calls that were already in flight when the ban
  began belong to the same incident and do not double it (a crashed node fails all its
  concurrent calls at once: that is one failure, not eight). Callers skip banned endpoints when
  they have a choice and try them anyway when they do not (see ``order``).

* **Seen alive.** The time of the last answer is kept: an endpoint that answered a moment ago is
  alive whatever the DHT says, which lets expert lookups ride out a DHT that briefly serves
  stale or late records (see ``dmoe.client.beam_search``).

Written from the asyncio loop thread, read from torch threads (beam search): a lock keeps the
small state consistent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dmoe.config.client import HealthOptions


@dataclass
class _Peer:
    rtt: float | None = None
    failures: int = 0  # consecutive incidents
    banned_until: float = 0.0
    banned_since: float = float("-inf")  # when the current ban (incident) began
    last_failure_kind: str = ""
    last_success: float = float("-inf")  # when it last answered (same clock)


class PeerHealth:
    def __init__(self, options: HealthOptions | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options or HealthOptions()
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()

    def record_success(self, endpoint: str, latency: float) -> None:
        with self._lock:
            peer = self._peers.setdefault(endpoint, _Peer())
            alpha = self.options.rtt_alpha
            peer.rtt = latency if peer.rtt is None else (1 - alpha) * peer.rtt + alpha * latency
            peer.failures = 0
            peer.banned_until = 0.0
            peer.last_success = self._clock()

    def record_failure(self, endpoint: str, kind: str, *, started: float | None = None) -> float:
        """Ban ``endpoint``; returns the new ban's duration in seconds, 0.0 if the ban is unchanged.

        ``started``: when the failed call began (same clock); a call begun before the current ban
        was imposed is part of that incident and leaves the ban as it is.
        """
        with self._lock:
            peer = self._peers.setdefault(endpoint, _Peer())
            peer.last_failure_kind = kind
            now = self._clock()
            if started is not None and started < peer.banned_since and peer.failures:
                return 0.0
            peer.failures += 1
            duration = min(self.options.ban_base * 2 ** (peer.failures - 1), self.options.ban_max)
            peer.banned_until = now + duration
            peer.banned_since = now
            return duration

    def is_banned(self, endpoint: str) -> bool:
        with self._lock:
            peer = self._peers.get(endpoint)
            return peer is not None and peer.banned_until > self._clock()

    def answered_within(self, endpoint: str, seconds: float) -> bool:
        """True if ``endpoint`` answered in the last ``seconds`` and is not banned since."""
        with self._lock:
            peer = self._peers.get(endpoint)
            if peer is None:
                return False
            now = self._clock()
            return now - peer.last_success <= seconds and peer.banned_until <= now

    def rtt(self, endpoint: str) -> float | None:
        with self._lock:
            peer = self._peers.get(endpoint)
            return None if peer is None else peer.rtt

    def order(self, endpoints: Iterable[str]) -> list[str]:
        """Unbanned endpoints first, each group by lowest RTT EWMA (unmeasured first), then by name."""
        now = self._clock()
        with self._lock:
            def key(endpoint: str) -> tuple[bool, float, str]:
                peer = self._peers.get(endpoint)
                if peer is None:
                    return False, 0.0, endpoint
                return peer.banned_until > now, peer.rtt if peer.rtt is not None else 0.0, endpoint

            return sorted(dict.fromkeys(endpoints), key=key)

    def banned(self) -> dict[str, float]:
        """Currently banned endpoints -> seconds of ban left."""
        now = self._clock()
        with self._lock:
            return {ep: p.banned_until - now for ep, p in self._peers.items() if p.banned_until > now}

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        now = self._clock()
        with self._lock:
            return {
                ep: {
                    "rtt": p.rtt,
                    "failures": p.failures,
                    "banned_for": max(0.0, p.banned_until - now),
                    "last_failure": p.last_failure_kind,
                }
                for ep, p in self._peers.items()
            }
