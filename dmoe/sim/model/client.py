"""A trainer in the model: dmoe's own client policies on a modelled network.

``ModelSwarm`` *is* a ``dmoe.client.swarm.Swarm``: ``call`` (replica choice by
``PeerHealth.choose``, retries, hedging within its budget), ``_failed`` (bans and their
doubling), ``check_alive`` and ``_probe`` (Pings that lift or extend bans) are the production
methods. Only what touches a socket is replaced: ``_attempt`` and ``_ping`` go through
``dmoe.sim.model.network.ExpertCalls``, the DHT is a ``ModelDHT`` under the real
``ExpertRegistry`` and ``PrefixTable``; there is no loop thread (the model's one loop runs
everything).

``ModelTrainer.step`` does what ``RemoteMixtureOfExperts`` does for each layer, minus torch:
gate scores drawn at random per token (a trained gate is not uniform, but the model studies
discovery and faults, not quality), the real ``BeamSearch`` generator fed by the real
``PrefixTable.fetch`` (as ``find_best_experts`` drives it), a real ``Dispatch`` for the forward
(k_min rule, stuck detection, rerouting through the same search) and one for the backward to
the endpoints that answered; a step is skipped when a token ends short of ``k_min`` forward
answers (the layer raises ``NotEnoughExperts`` there, and the trainer skips the batch).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dmoe.client.beam_search import BeamSearch
from dmoe.client.candidates import FoundExpert
from dmoe.client.dispatch import CallSummary, Dispatch
from dmoe.client.peer_health import PeerHealth
from dmoe.client.prefix_table import PrefixTable
from dmoe.client.remote_call import BACKWARD, FORWARD, TensorSpec
from dmoe.client.swarm import Swarm, SwarmStats
from dmoe.config.client import HealthOptions, HedgeOptions, LookupOptions, MoEOptions
from dmoe.dht.registry import ExpertRegistry
from dmoe.errors import DeadlineExceeded, ExpertCallError, NodeUnreachable
from dmoe.logs import RateLimitedLog
from dmoe.sim.model.network import ExpertCalls, ModelDHT, Node, Peer
from dmoe.wire.proto import expert_pb2 as pb

logger = logging.getLogger(__name__)
_EMPTY = torch.empty(0)
_Answered = tuple[str, str, np.ndarray, np.ndarray, np.ndarray]  # uid, endpoint, rows, slots, rows still its own


class ModelSwarm(Swarm):
    """A ``Swarm`` whose transport is the model's network (see module docstring)."""

    def __init__(self, peer: Peer, dht: ModelDHT, calls: ExpertCalls, nodes: dict[str, Node], *,
                 health: HealthOptions, lookup: LookupOptions, hedge: HedgeOptions, seed: int) -> None:
        # deliberately not Swarm.__init__: that starts a loop thread and a real DHT node
        import random

        self.peer = peer
        self.calls = calls
        self.nodes = nodes  # endpoint -> node
        self.health = PeerHealth(health, clock=lambda: asyncio.get_running_loop().time(),
                                 rng=random.Random(seed))
        self.coalescer = None
        self.member = None
        self.certificates = {}
        self._refusals = RateLimitedLog(logger, interval=30.0)
        self.hedge = hedge
        self._hedge_tokens = hedge.burst
        self._probes = {}
        self._checks = {}
        self.stats_counters = SwarmStats()
        self.lookup_options = lookup
        self.max_channels = 0
        self._channels = {}  # type: ignore[assignment]
        self._closed = False
        self.dht = dht
        self.registry = ExpertRegistry(dht)
        self.prefixes = PrefixTable(self.registry, lookup, self.stats_counters, vouch=self.health.answered_within,
                                    on_endpoints=self._note_loads)

    def _note_loads(self, found: Sequence[tuple[str, float]]) -> None:
        for endpoint, load in found:
            self.health.note_load(endpoint, load)

    async def _attempt(self, endpoint: str, request: pb.ExpertRequest, *, method: str, timeout: float,
                       expected: Sequence[TensorSpec] | None) -> list[torch.Tensor]:
        node = self.nodes.get(endpoint)
        self.health.call_started(endpoint)
        try:
            if node is None:
                raise NodeUnreachable(f"{endpoint}: no such host")
            rows = expected[0].shape[0] if expected else 1
            try:
                await asyncio.wait_for(self.calls.call(self.peer, node, method, int(rows)), max(timeout, 0.0))
            except TimeoutError:
                raise DeadlineExceeded(f"{method} {request.uid} at {endpoint}: no answer within {timeout:.2f}s",
                                       uid=request.uid) from None
            return [_EMPTY]
        finally:
            self.health.call_ended(endpoint)

    async def _ping(self, endpoint: str, timeout: float) -> pb.PingReply | None:
        self.stats_counters.probes += 1
        node = self.nodes.get(endpoint)
        if node is None:
            return None
        try:
            alive = await asyncio.wait_for(self.calls.ping(self.peer, node), timeout)
        except TimeoutError:
            return None
        return pb.PingReply(node_id=node.name, load=float(node.queued)) if alive else None


class _Router:
    """What ``dmoe.client.moe._LayerRouter`` does, without tensors: requests carry only their row count."""

    def __init__(self, search: BeamSearch, scores: list[np.ndarray], hidden: int, search_timeout: float) -> None:
        self.search = search
        self.scores = scores
        self.hidden = hidden
        self.search_timeout = search_timeout

    def build(self, uid: str, rows: np.ndarray) -> tuple[pb.ExpertRequest, tuple[TensorSpec, ...]]:
        return pb.ExpertRequest(uid=uid), (TensorSpec((len(rows), self.hidden), "float32"),)

    async def alternatives(self, tokens: np.ndarray, need: Sequence[int], exclude: Sequence[set[tuple[int, ...]]],
                           is_banned: Any, deadline: float) -> tuple[list[list[FoundExpert]], bool]:
        loop = asyncio.get_running_loop()
        result = await self.search.find_best_experts_async(
            [s[tokens] for s in self.scores], need, deadline=min(deadline, loop.time() + self.search_timeout),
            exclude=exclude, is_banned=is_banned)
        return result.experts, not result.budget_exhausted


@dataclass
class StepRecord:
    trainer: int
    step: int
    t: float  # virtual seconds at the end of the step
    step_s: float
    search_s: float
    lookups: int  # prefixes looked up in the DHT during the step (cache misses)
    dht_bytes: int
    skipped: bool
    short_tokens: int  # tokens with fewer than k_best forward answers (all layers)
    tokens: int
    failed: dict[str, int] = field(default_factory=dict)
    reroutes: int = 0
    chosen_not_alive: int = 0  # chosen endpoints with no unexpired record and no recent answer

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class ModelTrainer:
    """One trainer's steps over ``layers`` MoE layers (see module docstring)."""

    def __init__(self, index: int, swarm: ModelSwarm, *, prefixes: Sequence[str], grid: Sequence[int], tokens: int,
                 hidden: int, moe: MoEOptions, k_best: int, compute_s: float, rng: np.random.Generator,
                 alive: Any) -> None:
        self.index = index
        self.swarm = swarm
        self.searches = [BeamSearch(swarm, p, grid) for p in prefixes]
        self.grid = tuple(grid)
        self.tokens = tokens
        self.hidden = hidden
        self.moe = moe
        self.k_best = k_best
        self.compute_s = compute_s  # the trainer's own forward+backward per step (its model without the experts)
        self.rng = rng
        self.alive = alive  # (endpoint, uid) -> the model's truth: an unexpired record or a recent answer
        self.steps = 0

    async def _forward(self, search: BeamSearch, record: StepRecord) -> tuple[list[_Answered], bool]:
        loop = asyncio.get_running_loop()
        moe = self.moe
        started = loop.time()
        deadline = started + moe.forward_timeout
        scores = [self.rng.standard_normal((self.tokens, g)) for g in self.grid]
        gen = search._search(scores, [self.k_best] * self.tokens, k_min=moe.k_min)
        budget_end = started + min(moe.search_timeout, 0.5 * moe.forward_timeout)
        assert self.swarm.prefixes is not None
        try:  # exactly BeamSearch.find_best_experts, awaited instead of bridged from a thread
            prefixes = next(gen)
            while True:
                fetched = await self.swarm.prefixes.fetch(prefixes, timeout=max(budget_end - loop.time(), 0.0))
                prefixes = gen.send(fetched)
        except StopIteration as stop:
            result = stop.value
        record.search_s += loop.time() - started
        distinct = {(e.uid, e.endpoints) for chosen in result.experts for e in chosen}
        record.chosen_not_alive += sum(1 for uid, endpoints in distinct
                                       if not any(self.alive(ep, uid) for ep in endpoints))
        router = _Router(search, scores, self.hidden, moe.search_timeout)
        dispatch = Dispatch(self.swarm, method=FORWARD, num_tokens=self.tokens, num_slots=self.k_best,
                            need=np.full(self.tokens, moe.k_min), deadline=deadline,
                            timeout_after_k_min=moe.timeout_after_k_min, retry=True, router=router)
        dispatch.add_chosen(result.experts, router)
        await dispatch.run()
        self._count(dispatch, record)
        answers = dispatch.slot_ok.sum(axis=1)
        record.short_tokens += int((answers < self.k_best).sum())
        answered = [(job.uid, job.endpoint, job.rows, job.slots, dispatch.used(job.index))
                    for job in dispatch.jobs if job.tensors is not None and job.endpoint is not None]
        return answered, bool((answers < moe.k_min).any())

    async def _backward(self, answered: list[_Answered], record: StepRecord) -> None:
        loop = asyncio.get_running_loop()
        moe = self.moe
        # as the layer's backward: every token that had forward answers waits for max(backward_k_min, 1)
        dispatch = Dispatch(self.swarm, method=BACKWARD, num_tokens=self.tokens, num_slots=self.k_best,
                            need=np.full(self.tokens, max(moe.backward_k_min, 1)),
                            deadline=loop.time() + moe.backward_timeout,
                            timeout_after_k_min=moe.timeout_after_k_min, retry=False, router=None)
        for uid, endpoint, rows, slots, used in answered:
            if not used.any():
                continue
            dispatch.add_job(uid, (endpoint,), rows, slots, pb.ExpertRequest(uid=uid),
                             (TensorSpec((len(rows), self.hidden), "float32"),), assign=used)
        if dispatch.jobs:
            await dispatch.run()
            self._count(dispatch, record)

    @staticmethod
    def _count(dispatch: Dispatch, record: StepRecord) -> None:
        summary = CallSummary.of(dispatch)
        for kind, n in summary.failures.items():
            record.failed[kind] = record.failed.get(kind, 0) + n
        record.reroutes += dispatch.stats.reroutes

    async def step(self) -> StepRecord:
        loop = asyncio.get_running_loop()
        started = loop.time()
        stats = self.swarm.stats_counters
        dht = self.swarm.dht
        assert isinstance(dht, ModelDHT)
        lookups0, bytes0 = stats.lookups, dht.counters.bytes_down + dht.counters.bytes_up
        record = StepRecord(self.index, self.steps, 0.0, 0.0, 0.0, 0, 0, False, 0, self.tokens)
        done: list[list[_Answered]] = []
        skipped = False
        for search in self.searches:
            answered, short = await self._forward(search, record)
            done.append(answered)
            if short:
                skipped = True  # NotEnoughExperts: the batch is dropped here, no backward
                break
            await asyncio.sleep(self.compute_s / (2 * len(self.searches)))
        if not skipped:
            for answered in reversed(done):
                await asyncio.sleep(self.compute_s / (2 * len(self.searches)))
                await self._backward(answered, record)
        self.steps += 1
        record.t = loop.time()
        record.step_s = record.t - started
        record.skipped = skipped
        record.lookups = stats.lookups - lookups0
        record.dht_bytes = dht.counters.bytes_down + dht.counters.bytes_up - bytes0
        return record


def failures_total(records: Sequence[StepRecord]) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in records:
        total.update(r.failed)
    return total


__all__ = ["ModelSwarm", "ModelTrainer", "StepRecord", "failures_total", "ExpertCallError"]
