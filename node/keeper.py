"""ExpertKeeper: which experts this node holds, and that their trained state survives the volunteers.

Three duties, all policy; the mechanics live elsewhere (state transfer in ``dmoe.node.peers``, averaging in
``dmoe.node.replicas``, the choice in ``dmoe.dht.placement``):

* **State transfer at start.** Before announcing an expert, the node asks its live holders for their update
  counters and, if one is ahead of what the node restored from its checkpoint (or of fresh weights), takes
  that holder's state. A volunteer who comes back without a checkpoint, or with an old one, continues from
  the swarm's weights instead of dragging the swarm back to its own.
* **Adoption.** Every ``--placement-interval`` a node with spare ``--capacity`` looks up the wanted experts
  (``--grid``, or the grids trainers publish) and adopts the neediest one with fewer than ``--replicas``
  live holders: download its state first, announce it after. An ``--experts auto`` node fills all its
  free room with the neediest experts (an empty one that started before any grid was published, too);
  at capacity it moves at most one expert per check, and only from one with more than ``--replicas``
  holders to one with fewer (``dmoe.dht.placement.swap_candidate``), so placement follows the swarm
  slowly and never flaps.
* **Hand-off.** On SIGTERM, for every expert this node is the last live holder of, it asks other nodes with
  spare capacity (from ``_dmoe.nodes``) to adopt it (``Adopt``: they pull the state from us while we still
  serve, and announce it) before we withdraw. A SIGKILL cannot hand off: that is what ``--replicas`` 2 and
  adoption are for.

An expert nobody holds any more (all holders left without hand-off) is started from its initial weights and
logged as lost; the simulator's report counts these.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from dmoe.node.backend import ExpertBackend
from dmoe.node.metrics import NodeMetrics
from dmoe.node.peers import PeerClient
from dmoe.node.state import ExpertState, StateError

from dmoe.config.node import NodeConfig
from dmoe.dht.placement import grid_uids, neediest, swap_candidate
from dmoe.dht.registry import ExpertEndpoint, ExpertRegistry, NodeRecord
from dmoe.dht.uids import parse_expert_pattern

log = logging.getLogger(__name__)
_LOOKUP_TIMEOUT = 15.0
_HANDOFF_SHARDS = 4  # _dmoe.nodes shards a hand-off reads first
_TRANSFER_TIMEOUT = 120.0  # one expert's state, through a home uplink


class ExpertKeeper:
    def __init__(self, config: NodeConfig, *, backends: dict[str, ExpertBackend], registry: ExpertRegistry,
                 peers: PeerClient, metrics: NodeMetrics, own_owner: str, node_id: Callable[[], str],
                 make_backend: Callable[[str], ExpertBackend],
                 add: Callable[[str, ExpertBackend], Awaitable[bool]],
                 drop: Callable[[str], Awaitable[None]]) -> None:
        self.config = config
        self.backends = backends
        self.registry = registry
        self.peers = peers
        self.metrics = metrics
        self.own_owner = own_owner
        self.node_id = node_id
        self.make_backend = make_backend  # a fresh backend (seed weights) for a uid, not yet served
        self.add = add  # serve and announce a backend; True once announced
        self.drop = drop  # stop serving and withdraw a uid
        self.capacity = config.max_experts
        self._task: asyncio.Task | None = None
        self._adopting: set[str] = set()
        self.closing = False

    # ---- what the swarm holds and wants ----

    async def wanted(self) -> list[str]:
        """Uids the swarm wants served: ``--grid``, else every published grid matching this node's experts."""
        if self.config.grid:
            return parse_expert_pattern(self.config.grid)
        grids = await asyncio.wait_for(self.registry.list_grids(), _LOOKUP_TIMEOUT)
        cfg = self.config
        matching = [g for g in grids if g.expert_cls == cfg.expert_cls and g.hidden_dim == cfg.hidden_dim]
        if grids and not matching:
            log.warning("the swarm's grids need %s; this node serves %s experts of hidden size %d: nothing to pick",
                        ", ".join(f"{g.expert_cls} experts of hidden size {g.hidden_dim} ({g.prefix})" for g in grids),
                        self.config.expert_cls, self.config.hidden_dim)
        return [uid for g in matching for uid in grid_uids(g.prefix, g.grid)]

    async def holders(self, uids: Sequence[str]) -> dict[str, list[ExpertEndpoint]]:
        """Live holders of each uid other than this node (one batched lookup per grid level)."""
        found = await asyncio.wait_for(self.registry.find_experts(list(uids)), _LOOKUP_TIMEOUT)
        return {uid: _distinct_owners([e for e in eps if e.owner != self.own_owner]) for uid, eps in found.items()}

    def _need(self, found: dict[str, list[ExpertEndpoint]]) -> tuple[dict[str, int], dict[str, float]]:
        """Live holders (this node included) and announced load of each uid: what placement ranks by."""
        counts = {u: len(eps) + (1 if u in self.backends else 0) for u, eps in found.items()}
        return counts, {u: sum(e.load for e in eps) for u, eps in found.items()}

    # ---- state transfer ----

    async def take_state(self, uid: str, backend: ExpertBackend,
                         holders: Sequence[ExpertEndpoint]) -> tuple[bool, str]:
        """Load the most advanced live holder's state of ``uid`` into ``backend`` if one is ahead of it.

        (usable, what happened): not usable when holders are ahead but none could hand its state over."""
        if not self.config.state_transfer:
            return True, "own state (--no-state-transfer)"
        counts = await asyncio.gather(*(self.peers.updates_of(h.endpoint, uid) for h in holders))
        ahead = sorted(((n, h) for n, h in zip(counts, holders, strict=True) if n is not None and n > backend.updates),
                       key=lambda nh: -nh[0])
        for _, holder in ahead:
            try:
                state: ExpertState = await self.peers.fetch_state(holder.endpoint, uid, module=backend.module,
                                                                   optimizer=backend.optimizer,
                                                                   timeout=_TRANSFER_TIMEOUT)
            except StateError as e:
                self.metrics.state_transfers.labels("in", "failed").inc()
                log.warning("state of %s from %s unusable: %s", uid, holder.endpoint[:80], e)
                continue
            await asyncio.to_thread(backend.load_state, state)
            self.metrics.state_transfers.labels("in", "ok").inc()
            return True, f"took its state from {holder.endpoint} ({state.updates} updates)"
        if ahead:
            return False, f"{len(ahead)} holder(s) ahead ({ahead[0][0]} updates), none could hand its state over"
        if holders:
            return True, f"kept its own state ({backend.updates} updates; {len(holders)} live holder(s), none ahead)"
        return True, "no live holder"

    async def catch_up(self) -> None:
        """At start, before announcing: take the swarm's state of every expert a live holder is ahead on."""
        if not self.backends:
            return
        try:
            found = await self.holders(list(self.backends))
        except (TimeoutError, OSError, RuntimeError) as e:
            log.warning("could not look up other holders of this node's experts (%s): serving our own state",
                        type(e).__name__)
            return
        results = await asyncio.gather(*(self.take_state(uid, b, found.get(uid, []))
                                         for uid, b in self.backends.items()))
        for uid, (usable, what) in zip(self.backends, results, strict=True):
            (log.info if usable else log.warning)("expert %s: %s", uid, what)

    async def choose_initial(self) -> list[str]:
        """``--experts auto``: the experts to fill this node's free capacity with, neediest first."""
        count = self.capacity - len(self.backends)
        wanted = await self.wanted() if count > 0 else []
        if count > 0 and not wanted:
            log.warning("--experts auto: no grid known yet (no --grid, no trainer has published one); "
                        "will look again every %.0fs", self.config.placement_interval)
        if not wanted:
            return []
        found = await self.holders(wanted)
        counts, loads = self._need(found)
        chosen = neediest(wanted, counts, loads, exclude=list(self.backends), salt=self.node_id())[:count]
        log.info("--experts auto: chose %s (live holders: %s)", ", ".join(chosen),
                 ", ".join(str(counts.get(u, 0)) for u in chosen))
        return chosen

    async def adopt(self, uid: str, *, holders: Sequence[ExpertEndpoint] | None = None, how: str = "adopted") -> bool:
        """Take over ``uid``: its state from a live holder first (initial weights if none), then serve and announce."""
        if uid in self.backends or uid in self._adopting:
            return uid in self.backends
        self._adopting.add(uid)
        try:
            if holders is None:
                holders = (await self.holders([uid])).get(uid, [])
            backend = self.make_backend(uid)
            usable, what = await self.take_state(uid, backend, holders)
            if not usable:
                log.warning("not adopting expert %s: %s", uid, what)
                return False
            if not holders:
                log.warning("expert %s has no live holder: serving it from its initial weights (its trained state, "
                            "if any, is lost)", uid)
            ok = await self.add(uid, backend)
            self.metrics.adoptions.labels(how).inc()
            log.info("%s expert %s: %s; %s", how, uid, what, "announced" if ok else "announce pending")
            return True
        finally:
            self._adopting.discard(uid)

    # ---- the placement loop ----

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dmoe-keeper")

    async def stop(self) -> None:
        self.closing = True  # leaving: take nothing over any more
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.placement_interval)
            try:
                await self.check()
            except (TimeoutError, OSError, RuntimeError) as e:
                log.warning("placement check failed: %s", f"{type(e).__name__}: {e}")

    async def check(self) -> str | None:
        """One placement check (see the module docstring); what it changed, if anything."""
        spare = self.capacity - len(self.backends)
        if spare <= 0 and not self.config.auto:
            return None
        wanted = await self.wanted()
        if not wanted:
            return None
        mine = list(self.backends)
        found = await self.holders(wanted)
        counts, loads = self._need(found)
        if spare > 0:
            ranked = neediest(wanted, counts, loads, exclude=mine, salt=self.node_id())
            needy = [u for u in ranked if counts.get(u, 0) < self.config.replicas]
            # a node with explicit experts adopts one under-replicated expert per check (others decide from the
            # same view at the same time: one each spreads them); an auto node fills all its free room
            chosen = ranked[:spare] if self.config.auto else needy[:1]
            adopted = [uid for uid in chosen if await self.adopt(uid, holders=found.get(uid, []))]
            return f"adopted {', '.join(adopted)}" if adopted else None
        move = swap_candidate(mine, wanted, counts, loads, replicas=self.config.replicas, salt=self.node_id())
        if move is None:
            return None
        give, take = move
        if await self.adopt(take, holders=found.get(take, []), how="moved to"):
            await self.drop(give)
            log.info("placement: gave up %s (%d holders) for %s (%d)", give, counts[give], take, counts.get(take, 0))
            return f"moved {give} -> {take}"
        return None

    # ---- hand-off ----

    async def accept_adoption(self, uid: str, source: str) -> tuple[bool, str]:
        """Another node is leaving and asks us to take ``uid`` (``Adopt``); (accepted, why)."""
        if uid in self.backends:
            return True, "already served here"
        if not self.config.state_transfer:
            return False, "this node runs with --no-state-transfer"
        if self.closing:
            return False, "this node is shutting down"
        if len(self.backends) >= self.capacity:
            return False, f"no spare capacity ({len(self.backends)} of --capacity {self.capacity})"
        found = await self.holders([uid])
        holders = [h for h in found.get(uid, []) if h.endpoint == source]
        if not holders:
            return False, "the source does not announce this expert"
        if not await self.adopt(uid, holders=holders, how="took over"):
            return False, "its state could not be transferred"
        return True, "adopted and announced"

    def _room(self, nodes: list[NodeRecord]) -> dict[str, int]:
        """Endpoint -> free expert slots of the other nodes that could serve this node's experts."""
        me = self.node_id()
        return {n.endpoint: int(n.info.get("capacity", 0)) - len(n.experts) for n in nodes
                if n.node_id != me and n.info.get("expert_cls") == self.config.expert_cls
                and n.info.get("hidden_dim") == self.config.hidden_dim}

    async def hand_off(self, endpoint: str | None) -> None:
        """SIGTERM: find another node for every expert only this node holds (bounded by --handoff-timeout)."""
        if endpoint is None or not self.backends or not self.config.state_transfer:
            return
        self.peers.own_endpoint = endpoint
        try:
            found = await self.holders(list(self.backends))
            orphans = [uid for uid in self.backends if not found.get(uid)]
            if not orphans:
                return
            # a few shards of _dmoe.nodes first (a large swarm's full list is megabytes), all if they lack room
            room = self._room(await asyncio.wait_for(self.registry.list_nodes(sample=_HANDOFF_SHARDS),
                                                     _LOOKUP_TIMEOUT))
            if sum(max(r, 0) for r in room.values()) < 2 * len(orphans):
                room = self._room(await asyncio.wait_for(self.registry.list_nodes(), _LOOKUP_TIMEOUT))
        except (TimeoutError, OSError, RuntimeError) as e:
            log.warning("hand-off skipped: DHT lookup failed (%s)", type(e).__name__)
            return
        log.info("handing off %d expert(s) only this node holds: %s", len(orphans), ", ".join(orphans))
        handed = 0
        for uid in orphans:
            for target in sorted((e for e, r in room.items() if r > 0), key=lambda e: -room[e]):
                ok, detail = await self.peers.ask_adopt(target, uid, timeout=self.config.handoff_timeout)
                if ok:
                    room[target] -= 1
                    handed += 1
                    self.metrics.adoptions.labels("handed off").inc()
                    log.info("handed %s off to %s", uid, target)
                    break
                log.info("%s declined %s: %s", target, uid, detail)
            else:
                log.warning("could not hand %s off: no node with spare capacity took it; its trained state %s", uid,
                            "lives on only in this node's checkpoint" if self.config.checkpoint_dir else "is lost")
        if handed < len(orphans):
            log.warning("%d of %d expert(s) not handed off", len(orphans) - handed, len(orphans))


def _distinct_owners(endpoints: list[ExpertEndpoint]) -> list[ExpertEndpoint]:
    """One endpoint per owner key (a node announced twice while its route changed counts once)."""
    best: dict[str, ExpertEndpoint] = {}
    for e in endpoints:
        key = e.owner or e.endpoint
        if key not in best or e.expiration > best[key].expiration:
            best[key] = e
    return list(best.values())
