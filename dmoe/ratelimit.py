"""A byte-rate limiter: the link emulator's lines (``dmoe.sim.links``) and the relay's tunnels (``dmoe.relay``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

_MIN_CHUNK = 2048
_MAX_CHUNK = 64 * 1024


class TokenBucket:
    """A byte-rate limiter shared by every connection of one link direction.

    ``reserve(n)`` takes ``n`` tokens at once (the balance may go negative) and returns how long the
    caller must wait before its bytes have left the link: FIFO serialization across callers.
    """

    def __init__(self, rate_mbit: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._updated = clock()
        self.rate = 0.0
        self.burst = 0.0
        self.set_rate(rate_mbit)
        self.tokens = 0.0  # a fresh line serializes its first bytes like any others

    def set_rate(self, rate_mbit: float) -> None:
        self._refill()
        self.rate = rate_mbit * 1e6 / 8  # bytes/s
        # Credit an idle line may bank: 50 ms of line rate (at least two chunks). It is also what
        # lets a sender that woke up late (a busy machine) catch up, so the average rate stays the
        # configured one instead of losing every oversleep.
        self.burst = math.inf if math.isinf(self.rate) else max(2 * self.chunk_size(), self.rate * 0.05)

    def chunk_size(self) -> int:
        if math.isinf(self.rate):
            return _MAX_CHUNK
        return int(min(_MAX_CHUNK, max(_MIN_CHUNK, self.rate * 0.005)))

    def _refill(self) -> None:
        now = self._clock()
        if self.rate:
            self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self, nbytes: int) -> float:
        if math.isinf(self.rate):
            return 0.0
        self._refill()
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
