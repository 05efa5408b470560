"""Moving bytes between two sockets, optionally under a bandwidth budget shared fairly between tunnels.

``splice`` copies both directions until either side closes, then closes both (a half-closed
gRPC connection is of no use to anyone). Reads are large (``CHUNK``) so a 256 KB activation
crosses in a few system calls.

``FairShare`` is the relay's bandwidth policy: every tunnel has a token bucket whose rate is
``min(per-tunnel cap, total / busy tunnels)``, recomputed as tunnels become busy or idle (busy =
moved bytes within the last ``BUSY_WINDOW`` seconds). An idle tunnel takes no share, so one busy
node may use up to its own cap, and N busy nodes split the relay's total evenly, whoever sends
more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

CHUNK = 1 << 20
BUSY_WINDOW = 1.0  # seconds after its last bytes a tunnel still counts as busy
BURST_SECONDS = 0.05  # a bucket holds this many seconds of its rate (at least one CHUNK)


class TokenBucket:
    """Bytes/s budget of one tunnel; ``take`` may run into debt (a chunk is never split) and then sleeps it off."""

    def __init__(self, share: FairShare) -> None:
        self.share = share
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.last_used = 0.0
        self.throttled = 0.0  # seconds spent waiting for budget

    async def take(self, nbytes: int) -> None:
        now = time.monotonic()
        self.last_used = now
        rate = self.share.rate_for(self)
        burst = max(float(CHUNK), rate * BURST_SECONDS)
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate) - nbytes
        self.stamp = now
        if self.tokens < 0:
            wait = -self.tokens / rate
            self.throttled += wait
            await asyncio.sleep(wait)


class FairShare:
    """The relay-wide budget: per-tunnel cap, total split evenly between busy tunnels."""

    def __init__(self, *, tunnel_bytes_per_s: float, total_bytes_per_s: float) -> None:
        self.tunnel_rate = tunnel_bytes_per_s
        self.total_rate = total_bytes_per_s
        self.buckets: set[TokenBucket] = set()

    def bucket(self) -> TokenBucket:
        bucket = TokenBucket(self)
        self.buckets.add(bucket)
        return bucket

    def release(self, bucket: TokenBucket) -> None:
        self.buckets.discard(bucket)

    def rate_for(self, bucket: TokenBucket) -> float:
        now = time.monotonic()
        busy = sum(1 for b in self.buckets if b is bucket or now - b.last_used < BUSY_WINDOW)
        return min(self.tunnel_rate, self.total_rate / max(1, busy))


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket | None,
                count: Callable[[int], None] | None) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        if bucket is not None:
            await bucket.take(len(data))
        writer.write(data)
        if count is not None:
            count(len(data))
        await writer.drain()


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    bucket: TokenBucket | None = None,
    count_ab: Callable[[int], None] | None = None,
    count_ba: Callable[[int], None] | None = None,
) -> None:
    """Copy a -> b and b -> a until one side ends (EOF, reset, cancellation), then close both."""
    tasks = [asyncio.ensure_future(_copy(a[0], b[1], bucket, count_ab)),
             asyncio.ensure_future(_copy(b[0], a[1], bucket, count_ba))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in (a, b):
            close(writer)
        await asyncio.gather(*tasks, return_exceptions=True)


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
