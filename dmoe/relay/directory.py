"""Relays in the DHT: a relay keeps its record fresh; a node lists the relays it may use.

The record (``_dmoe.relays``, layout in ``dmoe.dht.registry``) carries the relay's address and
load, is signed by the relay's key and expires after ``RELAY_TTL``, so a dead relay leaves the
list within one TTL; nodes that find it dead meanwhile try the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from dmoe.dht.registry import ExpertRegistry
from dmoe.relay.server import RelayServer

log = logging.getLogger(__name__)

RELAY_TTL = 30.0  # seconds a relay record lives; refreshed every third of it


class RelayAnnouncer:
    """Keeps ``address`` (where nodes reach ``server``) announced while the relay runs."""

    def __init__(self, registry: ExpertRegistry, server: RelayServer, address: str, ttl: float = RELAY_TTL) -> None:
        self.registry = registry
        self.server = server
        self.address = address
        self.ttl = ttl
        self._task: asyncio.Task[None] | None = None

    async def announce_once(self) -> bool:
        stats = self.server.stats()
        try:
            return await asyncio.wait_for(self.registry.announce_relay(
                self.address, tunnels=stats["tunnels"], max_tunnels=stats["max_tunnels"], ttl=self.ttl), self.ttl / 3)
        except (TimeoutError, OSError, RuntimeError) as e:
            log.warning("relay announce failed: %s", type(e).__name__)
            return False

    async def start(self) -> None:
        if await self.announce_once():
            log.info("relay announced at %s", self.address)
        self._task = asyncio.create_task(self._loop(), name="dmoe-relay-announcer")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.announce_once()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.registry.withdraw_relay(ttl=self.ttl), 5.0)


async def relay_candidates(registry: ExpertRegistry | None, explicit: Sequence[str], *,
                           exclude: Sequence[str] = ()) -> list[str]:
    """Relay addresses to try, best first: the explicit ones, then the DHT's by free capacity."""
    found: list[str] = list(explicit)
    if registry is not None:
        with contextlib.suppress(TimeoutError, OSError, RuntimeError):
            found += [r.address for r in await asyncio.wait_for(registry.list_relays(), 10.0) if r.free > 0]
    return [a for a in dict.fromkeys(found) if a not in exclude]
