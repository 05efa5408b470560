"""The node side of a relay: stay attached, answer OPENs with data connections, fail over when a relay dies.

``RelayAttachment`` is one attached relay: a control connection (handshake in
``dmoe.relay.protocol``), heartbeats, and for every ``OPEN <id> <client ip>`` a new outbound data
connection spliced onto the node's own gRPC server on this machine. Everything is dialed *out*;
nothing needs to reach the node.

The node's server limits calls per peer address; through a relay every caller would arrive from
127.0.0.1 and share one budget. So the local leg is opened from a loopback source address
derived from the client's address (``127.x.y.z``, Linux routes all of 127/8 to the loopback),
which keeps per-peer limits per client. Where binding such an address fails, 127.0.0.1 is used.

``RelayLink`` keeps up to ``relay_attachments`` relays attached, announces through the first
live one and, when it dies, switches to a spare (or attaches to another) and tells the node to
re-announce at once (``on_change``), so clients see the new route within one announce round;
until then their calls to the dead relay fail like calls to any failed endpoint and reroute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

from hivemind.utils.crypto import RSAPrivateKey

from dmoe.config.relay import ReachabilityOptions, RelayOptions
from dmoe.relay import protocol
from dmoe.relay.protocol import ProtocolError, read_line
from dmoe.relay.splice import CHUNK, close, splice
from dmoe.wire.endpoints import relayed_endpoint, split_host_port

log = logging.getLogger(__name__)

_HEARTBEAT = RelayOptions().relay_heartbeat
_HANDSHAKE_TIMEOUT = RelayOptions().relay_handshake_timeout


class AttachRefused(ConnectionError):
    """The relay answered the attach with an error (full, bad signature, unsupported version)."""


def loopback_source(client_ip: str) -> str:
    """A 127.x.y.z address standing for ``client_ip`` on the local leg (never 127.0.0.0 or .255 hosts)."""
    digest = hashlib.sha256(client_ip.encode()).digest()
    return f"127.{digest[0]}.{digest[1]}.{1 + digest[2] % 254}"


async def open_local(host: str, port: int, client_ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the node's own server; from a per-client loopback address when the server is on loopback."""
    if host.startswith("127."):
        with contextlib.suppress(OSError):
            return await asyncio.open_connection(host, port, local_addr=(loopback_source(client_ip), 0), limit=CHUNK)
    return await asyncio.open_connection(host, port, limit=CHUNK)


class RelayAttachment:
    """One relay this node is attached to (until ``closed`` is set)."""

    def __init__(self, relay: str, *, key: RSAPrivateKey, local: tuple[str, int]) -> None:
        self.relay = relay
        self.key = key
        self.public_key = key.get_public_key().to_bytes()
        self.name = protocol.relay_name(self.public_key)
        self.local = local
        self.closed = asyncio.Event()
        self.connections = 0
        self._control: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._data_tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return relayed_endpoint(self.name, self.relay)

    async def attach(self) -> None:
        """Connect and prove the name; raises OSError/AttachRefused/ProtocolError if that fails."""
        host, port = split_host_port(self.relay)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _HANDSHAKE_TIMEOUT)
        try:
            writer.write(f"{protocol.ATTACH} {protocol.PROTOCOL_VERSION} {protocol.encode_key(self.public_key)}\n"
                         .encode())
            line = await read_line(reader, _HANDSHAKE_TIMEOUT)
            verb, _, nonce = line.partition(" ")
            if verb != "CHALLENGE":
                raise AttachRefused(f"relay {self.relay} refused: {line[:80]}")
            writer.write(f"SIGNED {protocol.sign_challenge(self.key, nonce)}\n".encode())
            line = await read_line(reader, _HANDSHAKE_TIMEOUT)
            if line != f"ATTACHED {self.name}":
                raise AttachRefused(f"relay {self.relay} refused: {line[:80]}")
        except BaseException:
            close(writer)
            raise
        self._control = writer
        self._task = asyncio.create_task(self._serve(reader, writer), name=f"dmoe-relay-{self.relay}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(writer))
        try:
            while True:
                line = await read_line(reader, 3 * _HEARTBEAT)
                verb, _, rest = line.partition(" ")
                if verb == "OPEN":
                    connection_id, _, client_ip = rest.partition(" ")
                    task = asyncio.create_task(self._open(connection_id, client_ip))
                    self._data_tasks.add(task)
                    task.add_done_callback(self._data_tasks.discard)
                elif verb == "PING":
                    writer.write(b"PONG\n")
                elif verb != "PONG":
                    raise ProtocolError(f"unexpected line {line[:40]!r}")
        except (ProtocolError, ConnectionError, OSError) as e:
            log.warning("relay %s lost (%s)", self.relay, e)
        finally:
            heartbeat.cancel()
            close(writer)
            self.closed.set()

    @staticmethod
    async def _heartbeat(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await asyncio.sleep(_HEARTBEAT)
                writer.write(b"PING\n")
                await writer.drain()

    async def _open(self, connection_id: str, client_ip: str) -> None:
        host, port = split_host_port(self.relay)
        try:
            relay = await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), _HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.debug("relay %s: data connection failed: %s", self.relay, e)
            return
        try:
            relay[1].write(f"{protocol.DATA} {self.name} {connection_id}\n".encode())
            local = await open_local(*self.local, client_ip or "?")
        except OSError as e:
            log.warning("relay %s: cannot reach this node's own server at %s:%d: %s", self.relay, *self.local, e)
            close(relay[1])
            return
        self.connections += 1
        try:
            await splice(relay, local)
        finally:
            self.connections -= 1

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._data_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if self._control is not None:
            close(self._control)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.closed.set()


class RelayLink:
    """Keeps this node reachable through relays; ``endpoint`` is what to announce (None while no relay holds)."""

    def __init__(
        self,
        *,
        key: RSAPrivateKey,
        local: tuple[str, int],
        candidates: Callable[[], Awaitable[Sequence[str]]],
        options: ReachabilityOptions | None = None,
        on_change: Callable[[str | None], None] | None = None,
    ) -> None:
        self.key = key
        self.local = local
        self.candidates = candidates  # relay addresses to try, best first (explicit ones, then the DHT's)
        self.options = options or ReachabilityOptions()
        self.on_change = on_change
        self.attached: list[RelayAttachment] = []
        self.endpoint: str | None = None
        self.failovers = 0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._failed_at: dict[str, float] = {}

    @property
    def name(self) -> str:
        return protocol.relay_name(self.key.get_public_key().to_bytes())

    async def start(self, timeout: float) -> str | None:
        """Attach to the first relays that accept (waiting up to ``timeout``); keep it so in the background."""
        self._task = asyncio.create_task(self._keep(), name="dmoe-relay-link")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_attached(), timeout)
        return self.endpoint

    async def _wait_attached(self) -> None:
        while self.endpoint is None:
            self._changed.clear()
            await self._changed.wait()

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.attached = [a for a in self.attached if not a.closed.is_set()]
            self._publish()  # a spare takes over at once, before any slow attempt to attach elsewhere
            if len(self.attached) < self.options.relay_attachments:
                try:
                    addresses = list(await self.candidates())
                except Exception as e:  # a DHT lookup failing must not end the link
                    log.debug("relay candidates unavailable: %s", e)
                    addresses = []
                mine = {a.relay for a in self.attached}
                # relays that failed lately go last, so one dead relay in the DHT does not stall failover
                addresses = sorted((a for a in addresses if a not in mine),
                                   key=lambda a: self._failed_at.get(a, 0.0))
                for address in addresses:
                    if len(self.attached) >= self.options.relay_attachments:
                        break
                    attachment = RelayAttachment(address, key=self.key, local=self.local)
                    try:
                        await attachment.attach()
                    except (OSError, TimeoutError, ProtocolError, ValueError) as e:
                        if address not in self._failed_at:  # once per relay until it accepts again
                            log.info("cannot attach to relay %s: %s", address, e or type(e).__name__)
                        self._failed_at[address] = loop.time()
                        continue
                    self._failed_at.pop(address, None)
                    log.info("attached to relay %s as %s", address, attachment.name)
                    self.attached.append(attachment)
            self._publish()
            waits = [asyncio.ensure_future(a.closed.wait()) for a in self.attached]
            if len(self.attached) < self.options.relay_attachments:  # retry for more relays later
                waits.append(asyncio.ensure_future(asyncio.sleep(self.options.relay_retry * (1 + random.random()))))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _publish(self) -> None:
        live = [a for a in self.attached if not a.closed.is_set()]
        endpoint = live[0].endpoint if live else None
        if endpoint != self.endpoint:
            if self.endpoint is not None:
                self.failovers += 1
                log.warning("relay route changed: %s -> %s", self.endpoint, endpoint or "none (no relay accepts)")
            self.endpoint = endpoint
            self._changed.set()
            if self.on_change is not None:
                self.on_change(endpoint)

    @property
    def relay(self) -> str | None:
        live = [a for a in self.attached if not a.closed.is_set()]
        return live[0].relay if live else None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(a.close() for a in self.attached), return_exceptions=True)
        self.attached = []

