"""Replica synchronisation: nodes serving the same expert bring its state into agreement every round.

Design (pull-only rounds over the nodes' own RPC, no coordinator, no group formation):

* Time is cut into rounds of ``--sync-interval`` seconds on the wall clock (round ``R`` starts at
  ``R * interval``), so replicas agree on round numbers without talking.
* At the start of round ``R`` a node looks up, in one batched DHT lookup, who else announces each of its
  experts. For every expert with another holder it takes a **snapshot** (weights, optimizer moments,
  update counter, and a *weight*: the optimizer steps it trained since its previous snapshot) and keeps
  it for most of the round, served to replicas as ``GetState(uid, round=R)``.
* After a short settle delay it downloads the round-``R`` snapshots of the other holders (retrying while a
  holder has not taken its own yet), checks them (``dmoe.node.state.check_state``), and merges all
  snapshots it got, its own included: the weighted mean plus every replica's progress since its last merge
  counted in full (``dmoe.node.state.average``: averaging alone would divide the experts' learning by the
  number of replicas). It then moves its live expert by ``merged - own snapshot``, keeping the steps it
  trained during the round.
* Every replica that reached every other one averages the *same* snapshots with the same weights, so after
  one complete round the replicas differ only by what they trained since the snapshot (nothing, when
  idle). A replica that vanishes mid-round is skipped at its deadline: the others finish without it and
  still come closer; nothing waits beyond ``interval / 2``, and a node never hangs on a peer.
* A replica whose lineage (update counter) is below half of the best one's gets weight 0: a node that
  joined with initial weights (or came back with a stale checkpoint) takes the swarm's state instead of
  pulling the others back toward its own. Such nodes normally never get here: they take a live
  replica's state before announcing (``dmoe.node.keeper``).
* Weights and lineages are what each replica claims. So that no replica takes an expert over by its
  claims alone (an open swarm's peers are nobody's), a replica's weight is capped at ``_WEIGHT_CAP``
  times ours, and a snapshot farther than ``MAX_SYNC_DISTANCE`` (relative L2) from ours is refused and
  counted (``dmoe_node_replica_syncs{result="refused"}``): one round can move an expert only a bounded
  step. In a closed swarm only members' replicas take part (``dmoe.dht.members``).

Staleness: replicas of one expert drift apart for at most one round of training (their gradients come
from different trainers' batches) and are then averaged, as in local SGD; the trainer, which sees one
replica per call, sees weights at most one round apart. Cost per round and expert with ``n`` holders:
one snapshot in memory (about 3x the weights with Adam) and ``n - 1`` downloads of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from dmoe.node.backend import ExpertBackend
from dmoe.node.metrics import NodeMetrics
from dmoe.node.peers import PeerClient
from dmoe.node.state import ExpertState, StateError, average, relative_distance, state_norm

from dmoe.dht.registry import ExpertRegistry

log = logging.getLogger(__name__)
_LINEAGE_FLOOR = 0.5  # a replica below this share of the best lineage adopts instead of averaging
_WEIGHT_CAP = 4.0  # a replica's weight is at most this many times ours (+1): nobody outvotes us by claims alone
# replicas one round apart differ by a few percent; a snapshot this far from ours is another lineage or poison
MAX_SYNC_DISTANCE = 0.5


class NoSnapshot(LookupError):
    """This node holds no snapshot of that expert for that round (not taken yet, or already dropped)."""


def round_weights(states: list[ExpertState]) -> list[ExpertState]:
    """Weights of one round: ours first in ``states``, then the replicas' (see the module docstring)."""
    own = states[0]
    for state in states[1:]:  # claimed by the peer: never more than _WEIGHT_CAP times our own share
        state.weight = min(state.weight, _WEIGHT_CAP * (own.weight + 1.0))
    best = max(s.updates for s in states)
    for state in states:
        if state.updates < _LINEAGE_FLOOR * best:
            state.weight = 0.0
    return states


def too_far(own: ExpertState, theirs: ExpertState) -> float | None:
    """How far a replica's snapshot (or its delta) is from ours, relative, when beyond ``MAX_SYNC_DISTANCE``."""
    distance = relative_distance(theirs.module, own.module)
    if theirs.delta is not None:  # its claimed progress: never more than that distance either
        distance = max(distance, state_norm(theirs.delta) / max(state_norm(own.module), 1e-30))
    return distance if distance > MAX_SYNC_DISTANCE else None


class ReplicaSync:
    def __init__(self, backends: dict[str, ExpertBackend], registry: ExpertRegistry, peers: PeerClient, *,
                 interval: float, own_owner: str, own_endpoint: Callable[[], str | None], metrics: NodeMetrics,
                 settle: float | None = None) -> None:
        self.backends = backends
        self.registry = registry
        self.peers = peers
        self.interval = interval
        self.own_owner = own_owner
        self.own_endpoint = own_endpoint
        self.metrics = metrics
        self.settle = min(2.0, interval / 5) if settle is None else settle
        self.snapshots: dict[tuple[str, int], ExpertState] = {}
        self._task: asyncio.Task | None = None
        self._rounds: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dmoe-replica-sync")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._rounds) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.snapshots.clear()

    def snapshot_of(self, uid: str, round_: int) -> ExpertState:
        try:
            return self.snapshots[(uid, round_)]
        except KeyError:
            raise NoSnapshot(f"no snapshot of {uid} for round {round_} here (not taken yet or already dropped)") \
                from None

    async def _loop(self) -> None:
        while True:
            next_round = int(time.time() // self.interval) + 1
            await asyncio.sleep(max(0.0, next_round * self.interval - time.time()))
            task = asyncio.create_task(self.sync_round(next_round), name=f"dmoe-sync-{next_round}")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def sync_round(self, round_: int) -> dict[str, int]:
        """One round (see the module docstring); uid -> number of replicas merged with."""
        deadline = asyncio.get_running_loop().time() + self.interval / 2
        try:
            found = await asyncio.wait_for(self.registry.find_experts(list(self.backends)), self.interval / 4)
        except (TimeoutError, OSError, RuntimeError) as e:
            log.warning("sync round %d: DHT lookup failed (%s); skipping it", round_, type(e).__name__)
            return {}
        me = self.own_endpoint()
        others = {uid: sorted({e.endpoint for e in eps if e.owner != self.own_owner and e.endpoint != me})
                  for uid, eps in found.items() if uid in self.backends}
        others = {uid: eps for uid, eps in others.items() if eps}
        if not others:
            return {}
        for uid in others:
            self.snapshots[(uid, round_)] = await asyncio.to_thread(self.backends[uid].snapshot)
        self._account()
        asyncio.get_running_loop().call_later(self.interval * 0.8, self._drop, round_)
        await asyncio.sleep(self.settle)
        merged_with = dict(zip(others, await asyncio.gather(
            *(self._sync_expert(uid, eps, round_, deadline) for uid, eps in others.items())), strict=True))
        return merged_with

    async def _sync_expert(self, uid: str, endpoints: list[str], round_: int, deadline: float) -> int:
        backend = self.backends.get(uid)
        own = self.snapshots.get((uid, round_))
        if backend is None or own is None:
            return 0
        got = await asyncio.gather(*(self._fetch(uid, ep, backend, round_, deadline) for ep in endpoints))
        states = []
        for endpoint, state in zip(endpoints, got, strict=True):
            far = too_far(own, state) if state is not None and own.updates > 0 else None
            if far is not None:
                self.metrics.syncs.labels("refused").inc()
                log.warning("sync round %d: %s from %s is %.2f away from ours (more than %.2f): not averaged",
                            round_, uid, endpoint[:80], far, MAX_SYNC_DISTANCE)
            elif state is not None:
                states.append(state)
        if not states:
            self.metrics.syncs.labels("alone").inc()
            log.info("sync round %d: no replica of %s answered (%d tried)", round_, uid, len(endpoints))
            return 0
        mine = dataclasses.replace(own)  # its weight may be zeroed for this merge, not in what peers fetch
        merged = await asyncio.to_thread(average, round_weights([mine, *states]))
        if uid in self.backends:  # not dropped meanwhile
            await asyncio.to_thread(backend.merge, own, merged)
        self.metrics.syncs.labels("merged").inc()
        log.info("sync round %d: %s merged with %d of %d replica(s) (weights %s)", round_, uid, len(states),
                 len(endpoints), ", ".join(f"{s.weight:g}" for s in [mine, *states]))
        return len(states)

    async def _fetch(self, uid: str, endpoint: str, backend: ExpertBackend, round_: int,
                     deadline: float) -> ExpertState | None:
        loop = asyncio.get_running_loop()
        last = ""
        while (left := deadline - loop.time()) > 0:
            try:  # the peer client bounds downloads in flight
                state = await self.peers.fetch_state(endpoint, uid, module=backend.module,
                                                     optimizer=backend.optimizer, round_=round_, timeout=left)
                self.metrics.state_transfers.labels("in", "ok").inc()
                return state
            except StateError as e:
                last = str(e)
            if "FAILED_PRECONDITION" not in last:  # anything but "no snapshot yet" will not improve by waiting
                break
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
        self.metrics.state_transfers.labels("in", "failed").inc()
        log.debug("sync round %d: %s from %s failed: %s", round_, uid, endpoint[:80], last)
        return None

    def _drop(self, round_: int) -> None:
        for key in [k for k in self.snapshots if k[1] <= round_]:
            del self.snapshots[key]
        self._account()

    def _account(self) -> None:
        self.metrics.snapshot_bytes.set(sum(
            sum(t.numel() * t.element_size() for t in s.module.values()) * 3 for s in self.snapshots.values()))
