"""RelayServer: carries client connections to nodes that cannot be dialed, over connections the nodes opened.

Why a byte-level reverse tunnel behind gRPC's HTTP CONNECT support
------------------------------------------------------------------
A node behind NAT can dial out but nothing can dial in. It keeps one *control* connection to the
relay; when a client wants it, the relay asks (``OPEN``) and the node dials a fresh *data*
connection, which the relay splices onto the client's. The client side needs nothing of ours:
gRPC's channel option ``grpc.http_proxy`` sends ``CONNECT <node name>`` to the relay and then
speaks plain HTTP/2 through it (see ``dmoe.wire.endpoints``). Because the relay copies bytes and
never parses gRPC, every gRPC semantic holds end to end with no code of ours in the way:
deadlines (``grpc-timeout`` travels inside), cancellation (an RST_STREAM), status codes and
messages, streaming, flow control, and TLS when nodes use it (the relay cannot read or alter
what it carries). The alternatives were weighed: re-issuing each call from the relay (a gRPC
proxy) would re-implement all of those and break end-to-end TLS; libp2p circuit relays through
hivemind's p2pd would route tensors through a second daemon per process with its own framing
and no gRPC. Connection setup costs one extra round trip to the node, once per client
connection (gRPC keeps a connection per node for the whole run).

What a relay refuses (hygiene)
------------------------------
* It only reaches nodes that attached to it, by name: ``CONNECT`` to anything else is ``404``,
  so it cannot be used to reach arbitrary addresses.
* Names are proven: a node attaches by signing a fresh challenge with the key its name is
  derived from (``dmoe.relay.protocol``).
* Bounded: ``relay_max_tunnels`` nodes, ``relay_max_connections`` client connections per node,
  ``relay_max_connections_per_client`` per client address and node, bandwidth per tunnel with a
  fair split of the relay's total between busy tunnels (``dmoe.relay.splice.FairShare``), and a
  rate limit on dial-back checks per client address. Refusals are HTTP statuses the client's
  gRPC reports as ``UNAVAILABLE`` (so it reroutes like for any failed endpoint) and are counted in
  ``dmoe_relay_refused{reason}``.

The dial-back check
-------------------
``DMOE-DIALBACK <port>`` makes the relay open a gRPC channel to the *caller's own address* (as
the relay sees it) at that port and Ping it. Only the caller's address: the relay cannot be made
to probe third parties. The answer carries the address the relay saw and the node id that
answered, so the node knows it reached itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import grpc

from dmoe.config.relay import RelayOptions
from dmoe.logs import RateLimitedLog
from dmoe.relay import protocol
from dmoe.relay.metrics import RelayMetrics
from dmoe.relay.protocol import ProtocolError, read_line
from dmoe.relay.splice import CHUNK, FairShare, TunnelBudget, close, splice
from dmoe.wire.endpoints import host_port, open_channel, tls_endpoint
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc
from dmoe.wire.tls import certificate_fingerprint

log = logging.getLogger(__name__)

_MAX_HEADERS = 32
_STREAM_LIMIT = CHUNK  # StreamReader buffer; lines are still capped at protocol.MAX_LINE
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(eq=False)
class Tunnel:
    """One attached node: its control connection and the client connections it carries."""

    name: str
    control: asyncio.StreamWriter
    peer: str  # the node's address as this relay sees it
    bucket: TunnelBudget
    attached_at: float = field(default_factory=time.monotonic)
    pending: dict[str, asyncio.Future[Stream]] = field(default_factory=dict)
    connections: int = 0
    by_client: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_heard: float = field(default_factory=time.monotonic)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, line: str) -> None:
        self.control.write(line.encode() + b"\n")


class RelayServer:
    def __init__(self, options: RelayOptions | None = None, *, metrics: RelayMetrics | None = None) -> None:
        self.options = options or RelayOptions()
        self.metrics = metrics
        self.tunnels: dict[str, Tunnel] = {}
        self.share = FairShare(tunnel_bytes_per_s=self.options.relay_tunnel_mbit * 1e6 / 8,
                               total_bytes_per_s=self.options.relay_total_mbit * 1e6 / 8)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dialbacks: dict[str, deque[float]] = defaultdict(deque)
        self._refusals = RateLimitedLog(log)
        if metrics is not None:
            self.use_metrics(metrics)

    def use_metrics(self, metrics: RelayMetrics) -> None:
        self.metrics = metrics
        metrics.max_tunnels.set(self.options.relay_max_tunnels)
        self._gauges()

    # ---- lifecycle ----

    async def start(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Listen; returns the bound port. OSError (with the address) if it is taken."""
        try:
            self._server = await asyncio.start_server(self._handle, host, port, limit=_STREAM_LIMIT)
        except OSError as e:
            raise OSError(f"relay cannot listen on {host_port(host, port)}: {e.strerror or e}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("relay listening on %s (up to %d nodes)", host_port(host, self.port), self.options.relay_max_tunnels)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for tunnel in list(self.tunnels.values()):
            close(tunnel.control)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def stats(self) -> dict[str, int]:
        return {"tunnels": len(self.tunnels), "max_tunnels": self.options.relay_max_tunnels,
                "connections": sum(t.connections for t in self.tunnels.values())}

    # ---- dispatch on the first line ----

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = _peer_host(writer)
        keep_open = False
        try:
            line = await read_line(reader, self.options.relay_handshake_timeout)
            verb, _, rest = line.partition(" ")
            if verb == protocol.CONNECT:
                await self._connect(reader, writer, rest, peer)
            elif verb == protocol.ATTACH:
                await self._attach(reader, writer, rest, peer)
            elif verb == protocol.DATA:
                keep_open = await self._data(reader, writer, rest)
            elif verb == protocol.DIALBACK:
                await self._dialback(writer, rest, peer)
            else:
                self._refuse("unknown", f"relay: unknown first line from {peer}: {line[:40]!r}")
        except ProtocolError as e:
            self._refuse("protocol", f"relay: dropped a connection from {peer}: {e}")
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the relay stops (asyncio's stream callback would log a cancelled handler as an error)
        finally:
            self._tasks.discard(task)
            if not keep_open:
                close(writer)

    def _refuse(self, reason: str, message: str) -> None:
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        self._refusals.warning(reason, message)

    # ---- nodes: attach and data connections ----

    async def _attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: str, peer: str) -> None:
        version, _, key_text = rest.partition(" ")
        if version != protocol.PROTOCOL_VERSION:
            writer.write(f"ERROR unsupported protocol version {version[:16]!r}\n".encode())
            return
        public_key = protocol.decode_key(key_text)
        name = protocol.relay_name(public_key)
        if name not in self.tunnels and len(self.tunnels) >= self.options.relay_max_tunnels:
            writer.write(b"ERROR relay full\n")
            self._refuse("full", f"relay: refused node {name} from {peer}: {len(self.tunnels)} nodes attached")
            return
        nonce = secrets.token_hex(16)
        writer.write(f"CHALLENGE {nonce}\n".encode())
        answer = await read_line(reader, self.options.relay_handshake_timeout)
        verb, _, signature = answer.partition(" ")
        if verb != "SIGNED" or not protocol.verify_challenge(public_key, nonce, signature):
            writer.write(b"ERROR bad signature\n")
            self._refuse("signature", f"relay: refused an attach from {peer}: bad signature")
            return
        old = self.tunnels.get(name)
        if old is not None:  # the same node again (its old control connection died): the new one wins
            close(old.control)
            old.closed.set()
        tunnel = Tunnel(name=name, control=writer, peer=peer, bucket=self.share.bucket())
        self.tunnels[name] = tunnel
        self._gauges()
        tunnel.send(f"ATTACHED {name}")
        log.info("relay: node %s attached from %s (%d nodes)", name, peer, len(self.tunnels))
        heartbeat = asyncio.ensure_future(self._heartbeat(tunnel))
        try:
            while not tunnel.closed.is_set():
                line = await read_line(reader, 3 * self.options.relay_heartbeat)
                tunnel.last_heard = time.monotonic()
                if line == "PING":
                    tunnel.send("PONG")
                elif line != "PONG":
                    raise ProtocolError(f"unexpected line on a control connection: {line[:40]!r}")
        except ProtocolError as e:
            if not tunnel.closed.is_set():
                log.info("relay: node %s detached (%s)", name, e)
        finally:
            heartbeat.cancel()
            tunnel.closed.set()
            for future in tunnel.pending.values():
                future.cancel()
            if self.tunnels.get(name) is tunnel:
                del self.tunnels[name]
                self.share.release(tunnel.bucket)
            self._gauges()

    async def _heartbeat(self, tunnel: Tunnel) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while not tunnel.closed.is_set():
                await asyncio.sleep(self.options.relay_heartbeat)
                tunnel.send("PING")
                await tunnel.control.drain()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: str) -> bool:
        name, _, connection_id = rest.partition(" ")
        tunnel = self.tunnels.get(name)
        future = tunnel.pending.pop(connection_id, None) if tunnel is not None else None
        if future is None or future.done():
            raise ProtocolError("data connection for no pending client connection")
        future.set_result((reader, writer))
        return True  # the client's handler owns (and closes) this connection now

    # ---- clients ----

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: str,
                       client: str) -> None:
        target = rest.split(" ", 1)[0]
        for _ in range(_MAX_HEADERS):  # the rest of the HTTP request head, ignored
            if not await read_line(reader, self.options.relay_handshake_timeout):
                break
        else:
            raise ProtocolError("CONNECT with too many header lines")
        name = target.rpartition(":")[0] or target
        tunnel = self.tunnels.get(name)

        def http(status: str, reason: str, message: str) -> None:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            self._refuse(reason, f"relay: {message} (from {client})")

        if tunnel is None:
            return http("404 Not Found", "unknown_node", f"CONNECT to {name[:40]!r}, which is not attached here")
        if tunnel.connections >= self.options.relay_max_connections:
            return http("503 Service Unavailable", "node_connections",
                        f"node {name} already has {tunnel.connections} relayed connections")
        if tunnel.by_client[client] >= self.options.relay_max_connections_per_client:
            return http("429 Too Many Requests", "client_connections",
                        f"client already has {tunnel.by_client[client]} connections to node {name}")
        tunnel.connections += 1
        tunnel.by_client[client] += 1
        self._gauges()
        try:
            connection_id = secrets.token_hex(16)
            future: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()
            tunnel.pending[connection_id] = future
            tunnel.send(f"OPEN {connection_id} {client}")
            try:
                node = await asyncio.wait_for(future, self.options.relay_open_timeout)
            except (TimeoutError, asyncio.CancelledError):
                tunnel.pending.pop(connection_id, None)
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
                return http("504 Gateway Timeout", "open_timeout", f"node {name} did not open a data connection")
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if self.metrics is not None:
                self.metrics.opened.inc()
            to_node = self.metrics.bytes.labels("to_node").inc if self.metrics else None
            to_client = self.metrics.bytes.labels("to_client").inc if self.metrics else None
            throttled_before = tunnel.bucket.throttled
            try:
                await splice((reader, writer), node, bucket=tunnel.bucket, count_ab=to_node, count_ba=to_client)
            finally:
                if self.metrics is not None:
                    self.metrics.throttled.inc(tunnel.bucket.throttled - throttled_before)
        finally:
            tunnel.connections -= 1
            tunnel.by_client[client] -= 1
            if not tunnel.by_client[client]:
                del tunnel.by_client[client]
            self._gauges()

    # ---- reachability checks ----

    async def _dialback(self, writer: asyncio.StreamWriter, rest: str, client: str) -> None:
        port_text, _, cert_text = rest.partition(" ")
        certificate = None
        if cert_text:  # a TLS node: dial it with its certificate pinned
            with contextlib.suppress(ValueError, binascii.Error):
                certificate = base64.b64decode(cert_text, validate=True)
            if certificate is None or certificate_fingerprint(certificate) is None:
                writer.write(b"ERROR not a certificate\n")
                return
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            writer.write(b"ERROR expected DMOE-DIALBACK <port> [<base64 certificate>]\n")
            return
        now = time.monotonic()
        recent = self._dialbacks[client]
        while recent and now - recent[0] > 60.0:
            recent.popleft()
        if len(recent) >= self.options.relay_dialbacks_per_minute:
            writer.write(b"ERROR too many reachability checks; retry in a minute\n")
            self._refuse("dialback_rate", f"relay: too many reachability checks from {client}")
            return
        recent.append(now)
        address = host_port(client, int(port_text))
        if certificate is not None:
            address = tls_endpoint(certificate_fingerprint(certificate) or "", address)
        node_id = await ping(address, self.options.dialback_timeout, certificate=certificate)
        result = "reachable" if node_id is not None else "unreachable"
        if self.metrics is not None:
            self.metrics.dialbacks.labels(result).inc()
        writer.write((f"REACHABLE {client} {node_id or '-'}" if node_id is not None
                      else f"UNREACHABLE {client}").encode() + b"\n")
        await writer.drain()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.tunnels.set(len(self.tunnels))
            self.metrics.connections.set(sum(t.connections for t in self.tunnels.values()))


async def ping(endpoint: str, timeout: float, *, certificate: bytes | None = None) -> str | None:
    """The node id a dmoe node at ``endpoint`` answers a Ping with, or None (no dmoe node answered in time)."""
    channel = open_channel(endpoint, certificate=certificate)
    try:
        reply = await pb_grpc.ExpertServiceStub(channel).Ping(pb.PingRequest(), timeout=timeout,
                                                              wait_for_ready=False)
        return reply.node_id or ""
    except (TimeoutError, grpc.aio.AioRpcError):
        return None
    finally:
        await channel.close(grace=None)


def _peer_host(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if peer else "?"
