"""Emulated home links: a shaping TCP proxy that sits in front of a node's gRPC port.

Linux ``tc netem`` is not available on our machines, so a node's home line is reproduced in user
space. The node announces the proxy's address (``--announce-port``), so every trainer reaches it
only *through* its link, and the address stays stable across restarts of the node behind it (like
a home IP); when the node is down the proxy refuses the connections it cannot forward.

Model (``LinkModel``), per node:

* **Rates.** ``down_mbit`` shapes bytes flowing *to* the node (requests), ``up_mbit`` bytes flowing
  *from* it (answers). Each direction has one ``TokenBucket`` shared by **all** connections of the
  node, as on a real line: two trainers calling the same node split its upload. The bucket is
  allowed to go into debt: a chunk that does not fit waits until the debt is paid back, which is
  the serialization delay of a FIFO link of that rate (with a small burst allowance).
* **Latency.** Each chunk, once "serialized", is delivered ``latency_ms`` later (one way, in each
  direction, so a ping sees ``2 * latency_ms``), plus Gaussian jitter (``jitter_ms`` standard
  deviation, clipped at zero). Delivery times are kept monotonic per connection, so jitter never
  reorders a TCP stream.
* **Drops.** Every second, with probability ``drop_prob``, all the node's connections are reset
  (a home line glitch); clients see UNAVAILABLE and reconnect.
* **Runtime changes.** ``set_model`` changes rates/latency live; ``partition(seconds, mode)`` cuts
  the node off: ``blackhole`` stops moving bytes (calls hang until their deadline, like lost
  packets) and ``refuse`` resets every connection and refuses new ones; ``heal`` ends it early.

The proxy lives in ``dmoe`` (not ``coordinator``) because docker containers run it too:
``python -m dmoe.sim.links --listen PORT --target HOST:PORT --up-mbit 20 --down-mbit 100 --latency-ms 20``
(SIGUSR1 starts a blackhole partition, SIGUSR2 heals it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dmoe.config import non_negative_float, option, positive_float
from dmoe.errors import ConfigError
from dmoe.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

_QUEUE_CHUNKS = 256  # bytes "on the wire" per direction per connection, in chunks (bounds memory)
PARTITION_MODES = ("blackhole", "refuse")


@dataclass(frozen=True)
class LinkModel:
    """One node's home line. Rates in Mbit/s (``math.inf`` = unshaped), times in ms."""

    up_mbit: float = option(20.0, parse=positive_float)
    """upload rate from the node (its reply traffic), Mbit/s"""
    down_mbit: float = option(100.0, parse=positive_float)
    """download rate to the node (its request traffic), Mbit/s"""
    latency_ms: float = option(20.0, parse=non_negative_float)
    """one-way latency, ms"""
    jitter_ms: float = option(0.0, parse=non_negative_float)
    """latency standard deviation, ms"""
    drop_prob: float = option(0.0, parse=non_negative_float)
    """probability per second that all connections are reset"""

    def __post_init__(self) -> None:
        for name in ("up_mbit", "down_mbit"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"link {name} must be a number > 0 (Mbit/s; inf = unshaped), got {value!r}")
        for name in ("latency_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ConfigError(f"link {name} must be a finite number >= 0 (ms), got {value!r}")
        if not (isinstance(self.drop_prob, int | float) and 0 <= self.drop_prob <= 1):
            raise ConfigError(f"link drop_prob must be a probability in [0, 1] (per second), got {self.drop_prob!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class LinkStats:
    bytes_down: int = 0  # to the node
    bytes_up: int = 0  # from the node
    connections: int = 0
    refused: int = 0
    dropped: int = 0  # connections reset by drop_prob glitches or a refuse partition


@dataclass(eq=False)  # hashed by identity: kept in a set of live connections
class _Connection:
    client_writer: asyncio.StreamWriter
    target_writer: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for w in (self.client_writer, self.target_writer):
            if w is not None:
                _reset(w)
        for t in self.tasks:
            t.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or cut line looks to the peer."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class LinkEmulator:
    """A shaping TCP proxy ``listen -> target`` applying one ``LinkModel``; runs in the current loop."""

    def __init__(
        self,
        model: LinkModel,
        *,
        target: tuple[str, int] | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
        name: str = "link",
    ) -> None:
        self.model = model
        self.target = target
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.name = name
        self.stats = LinkStats()
        self._rng = random.Random(seed)
        self._down = TokenBucket(model.down_mbit)
        self._up = TokenBucket(model.up_mbit)
        self._open = asyncio.Event()
        self._open.set()
        self._refusing = False
        self._partition_task: asyncio.Task[None] | None = None
        self._glitch_task: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()

    # ----- lifecycle -------------------------------------------------------------------------
    async def start(self) -> LinkEmulator:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        self._glitch_task = asyncio.create_task(self._glitches())
        return self

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    async def close(self) -> None:
        for task in (self._glitch_task, self._partition_task):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
        self.drop_connections(count=False)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- runtime changes -------------------------------------------------------------------
    def set_target(self, target: tuple[str, int] | None) -> None:
        """Point the proxy at a (re)started node; ``None`` refuses new connections."""
        self.target = target

    def set_model(self, model: LinkModel) -> None:
        self.model = model
        self._down.set_rate(model.down_mbit)
        self._up.set_rate(model.up_mbit)

    def update(self, **changes: float) -> LinkModel:
        self.set_model(replace(self.model, **changes))
        return self.model

    def drop_connections(self, *, count: bool = True) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        self._conns.clear()
        if count:
            self.stats.dropped += len(conns)
        return len(conns)

    def partition(self, seconds: float | None, mode: str = "blackhole") -> None:
        """Cut the node off for ``seconds`` (None: until ``heal``)."""
        if mode not in PARTITION_MODES:
            raise ConfigError(f"partition mode must be one of {PARTITION_MODES}, got {mode!r}")
        self.heal()
        if mode == "blackhole":
            self._open.clear()
        else:
            self._refusing = True
            self.drop_connections()
        if seconds is not None:
            self._partition_task = asyncio.create_task(self._heal_after(seconds))

    def heal(self) -> None:
        if self._partition_task is not None and self._partition_task is not asyncio.current_task():
            self._partition_task.cancel()
        self._partition_task = None
        self._refusing = False
        self._open.set()

    @property
    def partitioned(self) -> bool:
        return self._refusing or not self._open.is_set()

    async def _heal_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.heal()

    async def _glitches(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.model.drop_prob > 0 and self._conns and self._rng.random() < self.model.drop_prob:
                n = self.drop_connections()
                logger.info("%s: line glitch, reset %d connection(s)", self.name, n)

    # ----- data path -------------------------------------------------------------------------
    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        conn = _Connection(client_writer)
        target = self.target
        if self._refusing or target is None:
            self.stats.refused += 1
            _reset(client_writer)
            return
        self._conns.add(conn)
        self.stats.connections += 1
        try:
            await self._open.wait()  # blackholed: the client's handshake hangs, as with lost SYNs
            try:
                target_reader, target_writer = await asyncio.open_connection(*target)
            except OSError:
                self.stats.refused += 1
                _reset(client_writer)
                return
            conn.target_writer = target_writer
            _nodelay(client_writer)
            _nodelay(target_writer)
            conn.tasks = [
                asyncio.create_task(self._pipe(client_reader, target_writer, self._down, "bytes_down")),
                asyncio.create_task(self._pipe(target_reader, client_writer, self._up, "bytes_up")),
            ]
            done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                conn.abort()
            else:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            conn.abort()
        finally:
            self._conns.discard(conn)
            for w in (client_writer, conn.target_writer):
                if w is not None and not w.is_closing():
                    w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket, counter: str
    ) -> None:
        """One direction of one connection: a reader paced by the shared bucket feeds a delay line."""
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)

        async def deliver() -> None:
            while True:
                due, data = await line.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._open.wait()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))

        async def read() -> None:
            last_due = 0.0
            while True:
                await self._open.wait()
                data = await reader.read(bucket.chunk_size())
                if data:
                    wait = bucket.reserve(len(data))
                    if wait > 0:
                        await asyncio.sleep(wait)
                due = max(last_due, time.monotonic() + self._one_way_delay())
                last_due = due
                await line.put((due, data))
                if not data:
                    return

        tasks = [asyncio.create_task(read()), asyncio.create_task(deliver())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await tasks[1]  # reader hit EOF: let the delay line drain
        finally:
            for task in tasks:
                task.cancel()

    def _one_way_delay(self) -> float:
        m = self.model
        delay = m.latency_ms
        if m.jitter_ms > 0:
            delay = max(0.0, self._rng.gauss(m.latency_ms, m.jitter_ms))
        return delay / 1000.0


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ----- standalone runner (docker containers, manual experiments) ----------------------------------
def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"--target must be HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    from dmoe.config import add_options, make_parser, options_from, port_number, setup_logging

    parser = make_parser("python -m dmoe.sim.links", "Shaping TCP proxy: one emulated home link in front of HOST:PORT.")
    parser.add_argument("--listen", type=port_number, required=True, help="port to listen on (0 = any free port)")
    parser.add_argument("--listen-host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT the traffic is forwarded to")
    add_options(parser, LinkModel, title="link")
    parser.add_argument("--seed", type=int, default=None, help="seed of the jitter/drop random generator")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        model = options_from(LinkModel, args)
        target = _parse_hostport(args.target)
    except ConfigError as e:
        print(f"dmoe.sim.links: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the proxy works without it
        runner = asyncio.run
    return runner(_serve(model, target, args.listen_host, args.listen, args.seed))


async def _serve(model: LinkModel, target: tuple[str, int], host: str, port: int, seed: int | None) -> int:
    from dmoe.ready import print_ready

    link = LinkEmulator(model, target=target, listen_host=host, listen_port=port, seed=seed, name="link")
    await link.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: link.partition(None, "blackhole"))
    loop.add_signal_handler(signal.SIGUSR2, link.heal)
    print_ready("link", listen=link.address, target=f"{target[0]}:{target[1]}", model=model.to_dict())
    logger.info("link %s -> %s:%d: %s", link.address, *target, model)
    await stop.wait()
    await link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
