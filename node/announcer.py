"""Joining the DHT and keeping this node's expert records alive in it.

``start_dht`` starts hivemind's DHTNode in the node's own event loop (``dmoe.dht.access.InLoopDHT``,
records signed by hivemind's ``RSASignatureValidator``). Its p2pd daemon is started in a session
of its own with ``PR_SET_PDEATHSIG=SIGKILL``: a SIGTERM sent to the node's process group (what
the launcher does for a graceful leave) then reaches only the node, whose shutdown still needs
p2pd to withdraw its records; a crash of the node still takes p2pd down with it.

``Announcer`` stores every expert's records through ``dmoe.dht.registry.ExpertRegistry`` (key layout
documented there) with expiration ``ttl`` and refreshes them every ``ttl / 3`` with the current
load, so a node that dies disappears from lookups within one ttl while a live one never blinks
out even if one refresh is lost. ``stop(withdraw=True)`` overwrites them with tombstones.

Rounds start on a fixed schedule and each may take up to ``ttl`` (its records are worthless
after that): a store waits for hivemind's RPC timeout on every DHT peer that is frozen (several
seconds, once to find the nearest peers and once to store), and rounds cut short at the next
refresh never landed while any peer was frozen -- every node's records then expired together
and whole layers vanished from lookups. A slow round does not delay the next one; at most three
(one ttl's worth) run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hivemind.utils.crypto import RSAPrivateKey

from dmoe.config import NodeConfig, default_of
from dmoe.dht.access import InLoopDHT, load_or_create_signing_key
from dmoe.dht.registry import ExpertRegistry

log = logging.getLogger(__name__)

async def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] | None = None,
    identity_dir: Path | None = None,
    signing_key: RSAPrivateKey | None = None,
    client_mode: bool = False,
    join_timeout: float = default_of(NodeConfig, "join_timeout"),
) -> InLoopDHT:
    """Join (or start) the DHT; with ``identity_dir`` the peer id and the records' signing key survive restarts.

    ``client_mode`` joins without serving DHT requests (until ``InLoopDHT.become_server``); the p2p daemon is
    started as for a full peer either way, so a promoted node is one in every respect.
    """
    identity: dict[str, Any] = {}
    if identity_dir is not None:
        identity_dir.mkdir(parents=True, exist_ok=True)
        identity = {"identity_path": str(identity_dir / "p2p.key"),
                    "signing_key": signing_key or load_or_create_signing_key(identity_dir / "signing.key")}
    elif signing_key is not None:
        identity = {"signing_key": signing_key}
    dht = await InLoopDHT.create(initial_peers=initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                                 client_mode=client_mode, dht_mode="server", join_timeout=join_timeout, **identity)
    if initial_peers:
        log.info("joined the swarm through %d initial peer(s) as %s", len(initial_peers), dht.peer_id)
    else:
        log.info("started a new swarm as %s", dht.peer_id)
    return dht


class Announcer:
    def __init__(
        self,
        registry: ExpertRegistry,
        *,
        uids: Sequence[str],
        endpoint: str | None,
        node_id: str,
        ttl: float,
        load: Callable[[], float],
        node_info: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.uids = list(uids)
        self.endpoint = endpoint
        self.node_id = node_id
        self.ttl = ttl
        self.load = load
        self.node_info = node_info or dict
        self.interval = ttl / 3
        self.round_timeout = ttl  # a round may land until the records it carries would expire
        self.max_rounds = 3
        self._task: asyncio.Task | None = None
        self._rounds: set[asyncio.Task[bool]] = set()
        self.on_result: Callable[[bool], None] | None = None
        self.certificate: bytes | None = None  # the node's TLS certificate, published with its records
        self.membership: Callable[[], dict[str, str]] | None = None  # a closed swarm: our token + proof
        self._failures = 0

    def reannounce(self, endpoint: str | None) -> None:
        """The node's route changed (a relay died, reachability changed): announce the new one now."""
        self.endpoint = endpoint
        if endpoint is not None and self._task is not None and len(self._rounds) < self.max_rounds:
            self._start_round()

    def _start_round(self) -> None:
        task = asyncio.create_task(self._round(), name="dmoe-announce-round")
        self._rounds.add(task)
        task.add_done_callback(self._rounds.discard)

    async def announce_once(self, timeout: float | None = None) -> bool:
        if self.endpoint is None:  # no route yet (waiting for a relay): nothing to announce
            return False
        try:
            ok = await asyncio.wait_for(
                self.registry.announce(
                    self.uids, endpoint=self.endpoint, node_id=self.node_id, load=self.load(), ttl=self.ttl,
                    node_info=self.node_info(), certificate=self.certificate,
                    membership=self.membership() if self.membership is not None else None,
                ),
                timeout or self.interval,
            )
        except (TimeoutError, OSError, RuntimeError) as e:
            log.warning("announce failed: %s", f"{type(e).__name__}: {e}" if str(e) else
                        f"no answer within {timeout or self.interval:.1f}s")
            ok = False
        if self.on_result is not None:
            self.on_result(ok)
        return ok

    async def start(self, first_attempts: int = 3) -> bool:
        """Announce once (a few tries), then keep refreshing in the background."""
        ok = False
        for attempt in range(first_attempts if self.endpoint is not None else 0):
            ok = await self.announce_once()
            if ok:
                break
            await asyncio.sleep(min(1.0 * (attempt + 1), self.interval))
        if ok:
            log.info("announced %d expert(s) at %s (ttl %.0fs)", len(self.uids), self.endpoint, self.ttl)
        elif self.endpoint is None:
            log.warning("experts not announced: no route to this node yet (waiting for a relay)")
        else:
            log.warning("could not announce experts yet; will keep trying every %.1fs", self.interval)
        self._task = asyncio.create_task(self._refresh_loop(), name="dmoe-announcer")
        return ok

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + self.interval, loop.time())
            if len(self._rounds) >= self.max_rounds:
                log.debug("announce: %d rounds still running, skipping one", len(self._rounds))
                continue
            self._start_round()

    async def _round(self) -> bool:
        if self.endpoint is None:
            return False
        started = asyncio.get_running_loop().time()
        ok = await self.announce_once(self.round_timeout)
        took = asyncio.get_running_loop().time() - started
        if ok and took > self.interval:
            log.info("announce round took %.1fs (a DHT peer is slow or gone)", took)
        if ok and self._failures:
            log.info("announce works again after %d failed round(s)", self._failures)
            self._failures = 0
        elif not ok:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning("announce round failed (%d in a row)", self._failures)
        return ok

    async def stop(self, *, withdraw: bool = True, timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._rounds):
            task.cancel()
        if self._rounds:
            await asyncio.gather(*self._rounds, return_exceptions=True)
        if withdraw:
            try:
                ok = await asyncio.wait_for(
                    self.registry.withdraw(self.uids, node_id=self.node_id, ttl=self.ttl), timeout
                )
            except (TimeoutError, OSError, RuntimeError) as e:
                ok = False
                log.warning("withdraw failed (%s); records expire within %.0fs", type(e).__name__, self.ttl)
            if ok:
                log.info("withdrew %d expert record(s) from the DHT", len(self.uids))
