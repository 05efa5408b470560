"""Moving bytes between two sockets, optionally under a bandwidth budget shared fairly between tunnels.

``splice`` joins two connected sockets until either side closes, then closes both (a
half-closed gRPC connection is of no use to anyone). It takes the sockets over from their
asyncio streams and pipes them with plain ``asyncio.Protocol`` callbacks: each chunk the kernel
hands over is written to the other transport at once, with no coroutine wake-up or extra copy
in between, which is what keeps a relay's added latency well under a millisecond on loopback.
Flow control is the transports' own: when one side's write buffer fills, reading from the other
side pauses until it drains.

``FairShare`` is the relay's bandwidth policy: every tunnel has a token bucket (the link emulator's,
``dmoe.ratelimit``) whose rate is
``min(per-tunnel cap, total / busy tunnels)``, recomputed as tunnels become busy or idle (busy =
moved bytes within the last ``BUSY_WINDOW`` seconds). An idle tunnel takes no share, so one busy
node may use up to its own cap, and N busy nodes split the relay's total evenly, whoever sends
more. Over budget, the reading side pauses for as long as the debt takes to pay off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from dmoe.ratelimit import TokenBucket

CHUNK = 1 << 20
BUSY_WINDOW = 1.0  # seconds after its last bytes a tunnel still counts as busy


class TunnelBudget:
    """One tunnel's share of the relay's bandwidth: a ``TokenBucket`` whose rate follows ``FairShare``."""

    def __init__(self, share: FairShare) -> None:
        self.share = share
        self.bucket = TokenBucket(share.tunnel_rate * 8 / 1e6)
        self.bucket.tokens = self.bucket.burst  # a fresh tunnel's first calls are not throttled
        self.last_used = 0.0
        self.throttled = 0.0  # seconds reading was paused for budget

    def charge(self, nbytes: int) -> float:
        """Take ``nbytes``; returns the seconds to pause before taking more (0 within budget)."""
        self.last_used = time.monotonic()
        rate = self.share.rate_for(self)
        if rate != self.bucket.rate:
            self.bucket.set_rate(rate * 8 / 1e6)
        wait = self.bucket.reserve(nbytes)
        self.throttled += wait
        return wait


class FairShare:
    """The relay-wide budget: per-tunnel cap, total split evenly between busy tunnels."""

    def __init__(self, *, tunnel_bytes_per_s: float, total_bytes_per_s: float) -> None:
        self.tunnel_rate = tunnel_bytes_per_s
        self.total_rate = total_bytes_per_s
        self.buckets: set[TunnelBudget] = set()

    def bucket(self) -> TunnelBudget:
        bucket = TunnelBudget(self)
        self.buckets.add(bucket)
        return bucket

    def release(self, bucket: TunnelBudget) -> None:
        self.buckets.discard(bucket)

    def rate_for(self, bucket: TunnelBudget) -> float:
        now = time.monotonic()
        busy = sum(1 for b in self.buckets if b is bucket or now - b.last_used < BUSY_WINDOW)
        return min(self.tunnel_rate, self.total_rate / max(1, busy))


class _Pipe(asyncio.Protocol):
    """Receives from one transport and writes to the other side's; pauses on backpressure or budget."""

    def __init__(self, transport: asyncio.Transport, done: asyncio.Future[None], bucket: TunnelBudget | None,
                 count: Callable[[int], None] | None) -> None:
        self.transport = transport
        self.peer: _Pipe | None = None
        self.done = done
        self.bucket = bucket
        self.count = count
        self._blocked_by_peer = False  # the other side's write buffer is full
        self._blocked_by_budget = False

    def _update_reading(self) -> None:
        if self.transport.is_closing():
            return
        if self._blocked_by_peer or self._blocked_by_budget:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)
        if self.count is not None:
            self.count(len(data))
        if self.bucket is not None:
            wait = self.bucket.charge(len(data))
            if wait > 0 and not self._blocked_by_budget:
                self._blocked_by_budget = True
                self._update_reading()
                asyncio.get_running_loop().call_later(wait, self._budget_ok)

    def _budget_ok(self) -> None:
        self._blocked_by_budget = False
        self._update_reading()

    # our transport's write buffer (filled by the peer's data_received) is full or drained again
    def pause_writing(self) -> None:
        assert self.peer is not None
        self.peer._blocked_by_peer = True
        self.peer._update_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None
        self.peer._blocked_by_peer = False
        self.peer._update_reading()

    def eof_received(self) -> bool:
        return False  # close: see the module docstring

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    bucket: TunnelBudget | None = None,
    count_ab: Callable[[int], None] | None = None,
    count_ba: Callable[[int], None] | None = None,
) -> None:
    """Pipe a <-> b until one side ends (EOF, reset, cancellation), then close both."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    transports = [a[1].transport, b[1].transport]
    pipe_a = _Pipe(transports[0], done, bucket, count_ab)  # reads a, writes b
    pipe_b = _Pipe(transports[1], done, bucket, count_ba)
    pipe_a.peer, pipe_b.peer = pipe_b, pipe_a
    try:
        for (reader, _), pipe in ((a, pipe_a), (b, pipe_b)):
            # what the stream already read must go first; the stream's buffer has no public accessor
            leftover = bytes(reader._buffer)  # noqa: SLF001
            reader._buffer.clear()  # noqa: SLF001
            if leftover:
                pipe.data_received(leftover)
            ended = reader.at_eof() or reader.exception() is not None or pipe.transport.is_closing()
            if ended and not done.done():
                done.set_result(None)
        if not done.done():
            for pipe in (pipe_a, pipe_b):
                pipe.transport.set_protocol(pipe)
                pipe._update_reading()
            await done
    finally:
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.close()


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
