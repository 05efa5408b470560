"""The emulated home link, measured through the real proxy on loopback with plain sockets.

The proxy runs in its own thread with its own (uvloop) event loop, exactly as it runs inside the
simulator; the test's client and server are ordinary blocking sockets, so what we time is what a
process on the other side of the link would see.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loop_thread import LoopThread

from dmoe.errors import ConfigError
from dmoe.ready import parse_ready
from dmoe.sim.links import LinkEmulator, LinkModel, TokenBucket

MB = 1_000_000


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


class Server:
    """A plain-socket server on loopback; ``handler(conn)`` runs in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.handler, args=(conn,), daemon=True).start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread; close alone may not
        except OSError:
            pass
        self.sock.close()


def recv_exactly(conn: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = conn.recv(min(1 << 20, n - got))
        if not chunk:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += len(chunk)


def start_link(lt: LoopThread, model: LinkModel, port: int, **kw: Any) -> LinkEmulator:
    async def _start() -> LinkEmulator:
        return await LinkEmulator(model, target=("127.0.0.1", port), **kw).start()

    return lt.run(_start())


def connect(link: LinkEmulator) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", link.listen_port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# ----- rate ----------------------------------------------------------------------------------------
def test_download_rate_matches_configured_mbit(loop_thread):
    """Client -> node bytes (requests) flow at down_mbit."""
    size, rate, latency = 4 * MB, 32.0, 10.0
    done: dict[str, float] = {}

    def sink(conn: socket.socket) -> None:
        recv_exactly(conn, size)
        done["t"] = time.monotonic()
        conn.sendall(b"k")
        conn.close()

    server = Server(sink)
    link = start_link(loop_thread, LinkModel(up_mbit=1000, down_mbit=rate, latency_ms=latency), server.port)
    try:
        with connect(link) as s:
            t0 = time.monotonic()
            s.sendall(os.urandom(size))
            assert s.recv(1) == b"k"
        measured_mbit = size * 8 / 1e6 / (done["t"] - t0 - latency / 1000)
        assert measured_mbit == pytest.approx(rate, rel=0.10), f"measured {measured_mbit:.2f} Mbit/s"
        assert loop_thread.call(lambda: link.stats.bytes_down) == size
    finally:
        loop_thread.run(link.close())
        server.close()


def test_upload_rate_is_shared_by_all_connections(loop_thread):
    """Node -> client bytes flow at up_mbit in total, however many connections share the line."""
    per_conn, n_conns, rate = 1_500_000, 2, 24.0

    def source(conn: socket.socket) -> None:
        recv_exactly(conn, 1)
        conn.sendall(os.urandom(per_conn))
        conn.close()

    server = Server(source)
    link = start_link(loop_thread, LinkModel(up_mbit=rate, down_mbit=1000, latency_ms=5), server.port)
    finished: list[float] = []

    def client() -> None:
        with connect(link) as s:
            s.sendall(b"g")
            recv_exactly(s, per_conn)
            finished.append(time.monotonic())

    try:
        threads = [threading.Thread(target=client) for _ in range(n_conns)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(finished) == n_conns
        total_mbit = per_conn * n_conns * 8 / 1e6 / (max(finished) - t0 - 0.010)
        assert total_mbit == pytest.approx(rate, rel=0.10), f"aggregate {total_mbit:.2f} Mbit/s"
        # fair enough sharing: neither connection got the whole line first
        assert max(finished) - min(finished) < 0.5 * (max(finished) - t0)
    finally:
        loop_thread.run(link.close())
        server.close()


# ----- latency -------------------------------------------------------------------------------------
def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass  # reset by the link: that is what several tests do on purpose


def _rtts_ms(s: socket.socket, n: int) -> list[float]:
    rtts = []
    for i in range(n):
        t0 = time.perf_counter()
        s.sendall(bytes([i % 256]))
        assert s.recv(1) == bytes([i % 256])
        rtts.append((time.perf_counter() - t0) * 1000)
    return rtts


def _median_rtt_ms(s: socket.socket, n: int = 25) -> float:
    return statistics.median(_rtts_ms(s, n))


def _min_rtt_ms(s: socket.socket, n: int = 40) -> float:
    """Like ping's min: the link never delivers early, so the minimum is the configured delay plus
    the path's own cost, free of the scheduling noise a busy machine adds to the other samples."""
    return min(_rtts_ms(s, n))


def test_latency_adds_configured_one_way_delay(loop_thread):
    server = Server(_echo)
    latency = 15.0
    link = start_link(loop_thread, LinkModel(up_mbit=50, down_mbit=50, latency_ms=latency), server.port)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as direct:
            direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            base = _min_rtt_ms(direct)
        with connect(link) as s:
            _min_rtt_ms(s, 3)  # warm-up
            one_way = (_min_rtt_ms(s) - base) / 2
            typical = (_median_rtt_ms(s, 15) - base) / 2
        assert one_way == pytest.approx(latency, abs=2.0), f"one-way {one_way:.2f} ms"
        assert typical >= latency - 0.5  # never early
        # live change: the next pings see the new latency
        loop_thread.call(lambda: link.update(latency_ms=40.0))
        with connect(link) as s:
            one_way = (_min_rtt_ms(s, 15) - base) / 2
        assert one_way == pytest.approx(40.0, abs=2.0), f"one-way after change {one_way:.2f} ms"
    finally:
        loop_thread.run(link.close())
        server.close()


def test_jitter_never_reorders_the_stream(loop_thread):
    server = Server(_echo)
    link = start_link(loop_thread, LinkModel(up_mbit=200, down_mbit=200, latency_ms=5, jitter_ms=5), server.port,
                      seed=1)
    payload = os.urandom(300_000)
    try:
        with connect(link) as s:
            got = bytearray()

            def reader() -> None:
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    got.extend(chunk)

            t = threading.Thread(target=reader)
            t.start()
            for i in range(0, len(payload), 1000):  # many small writes -> many chunks, each jittered
                s.sendall(payload[i : i + 1000])
            t.join(30)
        assert bytes(got) == payload
    finally:
        loop_thread.run(link.close())
        server.close()


# ----- partitions, drops, refusals -----------------------------------------------------------------
def test_blackhole_partition_stalls_then_heals(loop_thread):
    server = Server(_echo)
    link = start_link(loop_thread, LinkModel(up_mbit=50, down_mbit=50, latency_ms=1), server.port)
    try:
        with connect(link) as s:
            assert _median_rtt_ms(s, 3) < 50
            loop_thread.call(lambda: link.partition(1.0, "blackhole"))
            t0 = time.monotonic()
            s.sendall(b"x")
            s.settimeout(0.4)
            with pytest.raises(TimeoutError):
                s.recv(1)  # nothing gets through while partitioned
            s.settimeout(10)
            assert s.recv(1) == b"x"  # ...and the byte arrives once the partition heals
            assert time.monotonic() - t0 >= 0.9
    finally:
        loop_thread.run(link.close())
        server.close()


def _refused(link: LinkEmulator) -> bool:
    """True if a new connection through the link is reset without service."""
    try:
        with connect(link) as s:
            s.settimeout(5)
            s.sendall(b"x")
            return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_refuse_partition_resets_connections_and_refuses_new_ones(loop_thread):
    server = Server(_echo)
    link = start_link(loop_thread, LinkModel(up_mbit=50, down_mbit=50, latency_ms=1), server.port)
    try:
        s = connect(link)
        _median_rtt_ms(s, 2)
        loop_thread.call(lambda: link.partition(None, "refuse"))
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, BrokenPipeError, EOFError)):
            s.sendall(b"x")
            if not s.recv(1):
                raise EOFError("closed by the link")
        s.close()
        assert _refused(link)
        loop_thread.call(link.heal)
        assert not _refused(link)
        with connect(link) as s3:
            assert _median_rtt_ms(s3, 2) < 50
    finally:
        loop_thread.run(link.close())
        server.close()


def test_node_down_behind_link_means_connection_refused(loop_thread):
    server = Server(_echo)
    port = server.port
    server.close()  # nothing listens there any more: a crashed node behind its link
    link = start_link(loop_thread, LinkModel(), port)
    try:
        try:
            with connect(link) as s:
                s.settimeout(5)
                assert s.recv(1) == b""
        except ConnectionResetError:
            pass  # the reset may already arrive during connect() on loopback
        assert loop_thread.call(lambda: link.stats.refused) == 1
    finally:
        loop_thread.run(link.close())


def test_drop_probability_resets_live_connections(loop_thread):
    server = Server(_echo)
    link = start_link(loop_thread, LinkModel(latency_ms=1, drop_prob=1.0), server.port, seed=3)
    try:
        with connect(link) as s:
            _median_rtt_ms(s, 2)
            s.settimeout(5)
            deadline = time.monotonic() + 3
            with pytest.raises((ConnectionError, OSError)):
                while time.monotonic() < deadline:
                    s.sendall(b"p")
                    if not s.recv(1):
                        raise ConnectionError("closed by the link")
                    time.sleep(0.05)
        assert loop_thread.call(lambda: link.stats.dropped) >= 1
    finally:
        loop_thread.run(link.close())
        server.close()


# ----- model validation and the standalone runner -------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [({"up_mbit": 0}, "up_mbit"), ({"down_mbit": -1}, "down_mbit"), ({"latency_ms": -5}, "latency_ms"),
     ({"drop_prob": 1.5}, "drop_prob"), ({"jitter_ms": float("inf")}, "jitter_ms")],
)
def test_bad_link_model_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LinkModel(**kwargs)


def test_token_bucket_serializes_in_fifo_order():
    now = [0.0]
    bucket = TokenBucket(8.0, clock=lambda: now[0])  # 1 MB/s
    bucket.tokens = 0
    assert bucket.reserve(500_000) == pytest.approx(0.5)
    assert bucket.reserve(500_000) == pytest.approx(1.0)  # queued behind the first one
    now[0] = 1.0
    assert bucket.reserve(0) == pytest.approx(0.0)


@pytest.mark.integration
def test_standalone_runner_forwards_and_rejects_bad_flags(tmp_path):
    server = Server(_echo)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dmoe.sim.links", "--listen", "0", "--listen-host", "127.0.0.1",
                             "--target", f"127.0.0.1:{server.port}", "--latency-ms", "10", "--up-mbit", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        ready = None
        for line in proc.stdout:  # type: ignore[union-attr]
            ready = parse_ready(line)
            if ready:
                break
        assert ready and ready["role"] == "link"
        host, port = ready["listen"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert _median_rtt_ms(s, 5) >= 19
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        server.close()
    bad = subprocess.run([sys.executable, "-m", "dmoe.sim.links", "--listen", "0", "--target", "nowhere"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "dmoe.sim.links", "--listen", "0", "--target", "h:1", "--up-mbit", "0"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "up-mbit" in bad.stderr
