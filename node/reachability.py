"""How a node gets reached: directly, or through a relay when nothing can dial it.

Order at start (``NodeRoute.start``, after the gRPC server listens and the DHT is joined, since
the check needs relays the DHT lists):

The DHT is joined in client mode (except with ``--reachability direct``) and promoted to a full
peer once the node is known to be reachable: peers should not put a node they cannot dial into
their routing tables (``dmoe.dht.patches.become_dht_server`` says why it cannot go the other way).

1. ``--reachability direct``: announce the configured address, no check. ``relay``: go to 3.
2. ``auto`` (default): ask relays to dial the node back (``dmoe.relay.reachability``). Reached ->
   ``direct``, announcing the address the relays saw unless ``--announce-host`` was given (a
   guessed private address is useless outside). No relay answered -> ``unknown``: serve directly
   as before, and say so.
3. Not reachable -> the DHT stays in client mode and a ``RelayLink`` attaches to relays; the
   node announces ``name@relay``. No relay accepts ->
   ``unreachable``: nothing is announced until one does, and the log says what the volunteer can
   do about it.

With ``--reachability-check-interval`` the check repeats (a port forward added, the network
changed) and the route follows: direct -> relayed or back (the DHT mode stays what it became).
``on_endpoint`` tells the announcer whenever what to announce changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dmoe.config.node import NodeConfig
from dmoe.config.relay import RELAY_PORT
from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertRegistry
from dmoe.relay.directory import relay_candidates
from dmoe.relay.reachability import DIRECT, UNKNOWN, UNREACHABLE, Reachability, check_reachability
from dmoe.relay.tunnel import RelayLink
from dmoe.wire.endpoints import guess_public_host, host_port, tls_endpoint
from dmoe.wire.tls import certificate_fingerprint

log = logging.getLogger(__name__)

RELAYED = "relayed"
ATTACH_WAIT = 15.0  # seconds start-up waits for a first relay before printing the ready line without one


class NodeRoute:
    def __init__(
        self,
        config: NodeConfig,
        *,
        dht: InLoopDHT,
        registry: ExpertRegistry,
        grpc_port: int,
        local: tuple[str, int],
        own_relay: str | None,
        on_endpoint: Callable[[str | None], None],
        certificate: bytes | None = None,
    ) -> None:
        self.config = config
        self.options = config.reachability
        self.dht = dht
        self.registry = registry
        self.grpc_port = grpc_port
        self.local = local  # where a relay's data connections reach this node's server
        self.own_relay = own_relay
        self.on_endpoint = on_endpoint
        self.certificate = certificate  # TLS: every endpoint announced names its key (dmoe.wire.tls)
        self.fingerprint = certificate_fingerprint(certificate) if certificate else None
        self.status = UNKNOWN
        self.endpoint: str | None = None
        self.last_check: Reachability | None = None
        self.link: RelayLink | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._wildcard = config.host in ("0.0.0.0", "::", "")

    @property
    def relay(self) -> str | None:
        return self.link.relay if self.link is not None else None

    def direct_endpoint(self, observed_host: str | None = None) -> str:
        cfg = self.config
        host = cfg.announce_host or observed_host or (guess_public_host() if self._wildcard else cfg.host)
        return self._named(host_port(host, cfg.announce_port or self.grpc_port))

    def _named(self, endpoint: str) -> str:
        return tls_endpoint(self.fingerprint, endpoint) if self.fingerprint else endpoint

    async def candidates(self) -> list[str]:
        return await relay_candidates(self.registry, self.options.relays,
                                      exclude=[self.own_relay] if self.own_relay else [])

    async def start(self) -> str | None:
        mode = self.options.reachability
        if mode == "direct":
            await self._go_direct(self.direct_endpoint(), "as configured (--reachability direct)")
        elif mode == "relay":
            await self._go_relayed("as configured (--reachability relay)")
        else:
            await self._check_and_route()
            if self.options.reachability_check_interval > 0:
                self._recheck = asyncio.create_task(self._recheck_loop(), name="dmoe-reachability")
        return self.endpoint

    async def _check_and_route(self) -> None:
        relays = await self.candidates()
        port = self.config.announce_port or self.grpc_port
        result = await check_reachability(relays, port=port, node_id=self.dht.peer_id, certificate=self.certificate)
        self.last_check = result
        observed = None if self.config.announce_host else result.observed_host
        if result.status == DIRECT:
            if self.status != DIRECT or self.endpoint != self.direct_endpoint(observed):
                await self._go_direct(self.direct_endpoint(observed), f"reachable ({result.describe()})")
        elif result.status == UNREACHABLE:
            if self.status not in (RELAYED, UNREACHABLE):
                await self._go_relayed(f"not reachable from outside ({result.describe()})")
        elif self.status == UNKNOWN and self.endpoint is None:
            await self._go_direct(self.direct_endpoint(), "could not be checked (no relay answered; "
                            "pass --relays HOST:PORT to check), serving directly", status=UNKNOWN)

    async def _go_direct(self, endpoint: str, why: str, *, status: str = DIRECT) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            await link.stop()
        if self.dht.client_mode:
            await self.dht.become_server()
        self.status = status
        log.info("reachability: %s; announcing %s", why, endpoint)
        self._set_endpoint(endpoint)

    async def _go_relayed(self, why: str) -> None:
        log.warning("reachability: %s; serving through a relay", why)
        if not self.dht.client_mode:
            log.info("the DHT stays a full peer (it was one before this change of route)")
        self.status = UNREACHABLE
        self.link = RelayLink(key=self.dht.signing_key, local=self.local, candidates=self.candidates,
                              options=self.options, on_change=self._relay_changed)
        await self.link.start(timeout=ATTACH_WAIT)
        if self.link.endpoint is None:
            log.error(
                "this node cannot be dialed from outside (behind NAT or a firewall) and no relay accepted it, so its "
                "experts are not announced. Either forward TCP port %d on your router to this machine and restart "
                "with --announce-host <your public address> --reachability direct, or point --relays at a relay "
                "(every coordinator runs one, port %d by default; any reachable node can with --relay). Retrying "
                "relays in the background.", self.config.announce_port or self.grpc_port, RELAY_PORT)

    def _relay_changed(self, endpoint: str | None) -> None:
        if self.link is None:
            return
        self.status = RELAYED if endpoint is not None else UNREACHABLE
        self._set_endpoint(self._named(endpoint) if endpoint is not None else None)

    def _set_endpoint(self, endpoint: str | None) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            self.on_endpoint(endpoint)

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.reachability_check_interval)
            try:
                await self._check_and_route()
            except Exception as e:  # a failed re-check keeps the current route
                log.warning("reachability re-check failed: %s: %s", type(e).__name__, e)

    async def stop(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        if self.link is not None:
            await self.link.stop()

