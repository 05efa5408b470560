"""One model run: a scenario's swarm, its churn timeline, trainers' steps, on the virtual clock.

The swarm is built from a ``Scenario`` exactly as ``dmoe simulate`` reads it: ``ChurnModel``
draws every node's link and its crash/leave/freeze/rejoin timeline, ``place_experts`` assigns
experts, a ``nat_share`` of nodes is reached through a relay (relayed endpoints, which the real
``PeerHealth`` penalizes) and serves no DHT requests. Each node announces through the real
``Announcer`` (refresh every ttl/3, withdraw on a graceful leave, nothing on a crash or freeze);
trainers run ``ModelTrainer.step`` back to back, pausing after a skipped step as
``dmoe train`` does.

Invariants are checked while the run goes (``Invariants``): a chosen expert must be alive in the
model (an unexpired record of that endpoint, or an answer from it within the vouch window), a ban
must never outlive ``ban_max`` (plus the probe's extension while a node stays silent), and a
crashed node's records must be gone from the DHT one TTL after the crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dmoe.config.client import HealthOptions, HedgeOptions, LookupOptions, MoEOptions
from dmoe.config.train import TrainOptions
from dmoe.dht.placement import place_experts
from dmoe.dht.registry import NODE_SHARDS, NODES_KEY
from dmoe.dht.uids import cell_key, split_uid
from dmoe.sim.churn import ChurnModel
from dmoe.sim.links import LinkModel
from dmoe.sim.model.client import ModelSwarm, ModelTrainer, StepRecord
from dmoe.sim.model.clock import VirtualClockLoop, virtual_time
from dmoe.sim.model.network import DhtNetwork, ExpertCalls, ModelDHT, Node, Peer, ServiceCost, owner_marker
from dmoe.sim.scenario import Scenario

log = logging.getLogger(__name__)
_TRAIN = TrainOptions()
BYTES_PER_VALUE = {"none": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0}


@dataclass(frozen=True)
class ModelOptions:
    duration_s: float = 600.0  # virtual seconds
    trainers: int | None = None  # None: the scenario's
    tokens_per_step: int | None = None  # per layer; None: the scenario's batch_size x block_size
    trainer_compute_ms: float = 60.0  # the trainer's own forward+backward per step, without its experts
    per_call_ms: float = 0.5  # a node's fixed cost per call (RPC, decoding, batching)
    dht_rtt_ms: float | None = None  # fixed DHT hop time (loopback DHT, as in dmoe simulate); None: the links'
    relay_latency_ms: float = 10.0  # a relay's own one-way latency (it sits on a fast link)
    sample_every_s: float = 10.0
    warmup_s: float = 3.0  # nodes announce during this, trainers start after it
    seed: int | None = None


@dataclass
class Invariants:
    chosen_not_alive: int = 0
    longest_ban_s: float = 0.0
    ban_limit_s: float = 0.0
    crashed_checked: int = 0
    records_after_ttl: int = 0  # entries of a crashed node still in the DHT one TTL after its crash

    @property
    def ok(self) -> bool:
        return self.chosen_not_alive == 0 and self.longest_ban_s <= self.ban_limit_s and self.records_after_ttl == 0


@dataclass
class RunResult:
    steps: list[StepRecord] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    invariants: Invariants = field(default_factory=Invariants)
    events: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    experts: int = 0
    wall_s: float = 0.0
    announces: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})


def measure_service_cost(expert_cls: str, hidden_dim: int, per_call_ms: float, rows: int = 64) -> ServiceCost:
    """Seconds per row of one expert's forward, and of its backward with the optimizer step, on this CPU."""
    import torch

    from dmoe.experts import create_expert

    expert = create_expert(expert_cls, hidden_dim=hidden_dim)
    opt = torch.optim.Adam(expert.parameters())
    x = torch.randn(rows, hidden_dim)
    with torch.no_grad():
        expert(x)

    def timed(fn: Callable[[], Any], repeat: int = 20) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - started) / repeat

    def forward() -> None:
        with torch.no_grad():
            expert(x)

    def backward() -> None:
        xi = x.detach().requires_grad_(True)
        expert(xi).sum().backward()
        opt.step()
        opt.zero_grad()

    return ServiceCost({"forward": timed(forward) / rows, "backward": timed(backward) / rows}, per_call_ms / 1000.0)


class ModelRun:
    def __init__(self, scenario: Scenario, options: ModelOptions, cost: ServiceCost,
                 progress: Callable[[float], None] | None = None) -> None:
        self.sc = scenario if options.seed is None else scenario.with_seed(options.seed)
        self.options = options
        self.cost = cost
        self.progress = progress
        self.rng = random.Random(self.sc.seed)
        self.result = RunResult()

    # ---- building the swarm ----

    def _build(self) -> None:
        sc, o = self.sc, self.options
        self.timeline = ChurnModel(sc).timeline()
        n = sc.swarm.total_nodes
        self.prefixes = [f"layer{i}.ffn" for i in range(sc.swarm.layers)]
        placement = place_experts(self.prefixes, sc.swarm.grid, nodes=n, replicas=sc.swarm.replicas)
        self.result.nodes = n
        self.result.experts = len(self.prefixes) * math.prod(sc.swarm.grid)
        self.dht_net = DhtNetwork(random.Random(self.rng.random()),
                                  fixed_rtt=None if o.dht_rtt_ms is None else o.dht_rtt_ms / 1000.0)
        self.nodes: list[Node] = []
        self.by_endpoint: dict[str, Node] = {}
        nat_rng = random.Random(self.sc.seed + 1)
        for i in range(n):
            nat = nat_rng.random() < sc.swarm.nat_share
            node = Node(name=f"node{i}", link=self.timeline.links[i], nat=nat, dht_server=not nat,
                        uids=placement[i], cpu_cores=sc.node.cpu_cores or 1.0,
                        state="up" if i < sc.swarm.nodes else "down",
                        endpoint=f"n{i}@relay.model:7000" if nat else f"node{i}.model:5000")
            self.nodes.append(node)
            self.by_endpoint[node.endpoint] = node
            if node.dht_server:
                self.dht_net.servers.append(node)
        compression = sc.trainer.compression
        self.calls = ExpertCalls(random.Random(self.rng.random()), self.cost, relay_latency_ms=o.relay_latency_ms,
                                 bytes_per_value=BYTES_PER_VALUE.get(compression, 1.0), hidden_dim=sc.swarm.hidden_dim)
        self.ttl = sc.node.announce_ttl_s
        self.health = HealthOptions()
        self.lookup = LookupOptions()
        moe = MoEOptions()
        self.moe = replace(moe, k_min=sc.trainer.k_min, forward_timeout=sc.trainer.forward_timeout_s,
                           backward_timeout=sc.trainer.backward_timeout_s,
                           timeout_after_k_min=sc.trainer.timeout_after_k_min_s)
        self.announcers: dict[int, Any] = {}
        self.starting: dict[int, asyncio.Future[bool]] = {}  # announcers still in their first attempts
        self.down_since: dict[int, float] = {}

    def alive(self, endpoint: str, uid: str) -> bool:
        """The model's truth for a chosen expert: its node's record is unexpired, or it answered lately."""
        node = self.by_endpoint.get(endpoint)
        if node is None:
            return False
        now = asyncio.get_running_loop().time()
        prefix, coords = split_uid(uid)
        key = cell_key(prefix, coords[:-1])
        record = self.dht_net.store.records.get(key, {})
        for subkey, (value, expiration, _) in record.items():
            if expiration >= now and isinstance(value, list | tuple) and value and value[0] == endpoint \
                    and subkey.startswith(str(coords[-1]).encode() + b"["):
                return True
        return any(t.swarm.health.answered_within(endpoint, self.lookup.vouch_window) for t in self.trainers)

    # ---- nodes ----

    def _announcer(self, i: int) -> Any:
        from dmoe.node.announcer import Announcer  # the node's own refresh policy

        node = self.nodes[i]
        dht = ModelDHT(self.dht_net, node, owner_marker(i))
        from dmoe.dht.registry import ExpertRegistry

        announcer = Announcer(ExpertRegistry(dht), uids=node.uids, endpoint=node.endpoint,
                              node_id=node.name, ttl=self.ttl, load=lambda: float(node.queued))
        announcer.on_result = lambda ok: self.result.announces.__setitem__(
            "ok" if ok else "failed", self.result.announces["ok" if ok else "failed"] + 1)
        return announcer

    async def _up(self, i: int, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        node = self.nodes[i]
        node.state = "up"
        node.since = asyncio.get_running_loop().time()
        self.down_since.pop(i, None)
        announcer = self._announcer(i)
        self.announcers[i] = announcer
        # a task of its own, so a crash during the first announce attempts cancels them (a killed process
        # does not go on to announce, and its records must be gone one TTL later)
        self.starting[i] = asyncio.ensure_future(announcer.start())
        with contextlib.suppress(asyncio.CancelledError):
            await self.starting[i]
        self.starting.pop(i, None)

    async def _stop(self, i: int, *, state: str, withdraw: bool) -> None:
        node = self.nodes[i]
        announcer = self.announcers.pop(i, None)
        starting = self.starting.pop(i, None)
        if starting is not None:
            starting.cancel()
        if state != "down" or not withdraw:
            node.state = state
        if announcer is not None:
            await announcer.stop(withdraw=withdraw)
        node.state = state
        if state == "down":
            self.down_since[i] = asyncio.get_running_loop().time()
            if not withdraw:
                asyncio.get_running_loop().call_later(self.ttl + 0.5, self._check_expired, i, self.down_since[i])

    def _check_expired(self, i: int, crashed_at: float) -> None:
        if self.nodes[i].state != "down" or self.down_since.get(i) != crashed_at:
            return  # up again since, or down from a later crash (which has a check of its own)
        node = self.nodes[i]
        now = asyncio.get_running_loop().time()
        inv = self.result.invariants
        inv.crashed_checked += 1
        for uid in node.uids:
            prefix, coords = split_uid(uid)
            record = self.dht_net.store.records.get(cell_key(prefix, coords[:-1]), {})
            inv.records_after_ttl += sum(1 for value, expiration, _ in record.values()
                                         if expiration >= now and isinstance(value, list | tuple) and value
                                         and value[0] == node.endpoint)

    async def _apply(self, event: Any) -> None:
        i, action = event.node, event.action
        self.result.events[action] = self.result.events.get(action, 0) + 1
        if action == "crash":
            await self._stop(i, state="down", withdraw=False)
        elif action == "leave":
            await self._stop(i, state="down", withdraw=True)
        elif action in ("freeze", "partition"):
            await self._stop(i, state="frozen", withdraw=False)
        elif action in ("resume", "rejoin", "heal", "join"):
            if self.nodes[i].state != "up":
                await self._up(i)
        elif action == "link" and event.link:
            self.nodes[i].link = LinkModel(**dict(event.link))

    async def _timeline(self) -> None:
        loop = asyncio.get_running_loop()
        for event in self.timeline.events:
            wait = event.t + self.options.warmup_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            loop.create_task(self._apply(event))

    # ---- trainers ----

    async def _train(self, trainer: ModelTrainer) -> None:
        skips = 0
        while True:
            record = await trainer.step()
            self.result.steps.append(record)
            if record.skipped:
                skips += 1
                await asyncio.sleep(min(_TRAIN.max_skip_pause, _TRAIN.skip_pause * 2 ** (skips - 1)))
            else:
                skips = 0

    # ---- sampling ----

    def _sample(self) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        store = self.dht_net.store
        sizes: dict[str, Any] = {}
        for prefix in self.prefixes[:1]:
            root = cell_key(prefix, ())
            sizes["root_entries"], sizes["root_bytes"] = store.size(root, now)
            inner = [store.size(cell_key(prefix, (c,)), now) for c in range(self.sc.swarm.grid[0])]
            sizes["cell_entries_max"] = max((e for e, _ in inner), default=0)
            sizes["cell_bytes_max"] = max((b for _, b in inner), default=0)
        shards = [store.size(f"{NODES_KEY}.{shard}", now) for shard in range(NODE_SHARDS)]
        sizes["nodes_entries"] = max(e for e, _ in shards)  # the largest shard: what one lookup of it moves
        sizes["nodes_bytes"] = max(b for _, b in shards)
        inv = self.result.invariants
        limit = self.health.ban_max + self.health.probe_interval + self.health.probe_timeout + 0.5
        inv.ban_limit_s = limit
        for t in self.trainers:
            for left in t.swarm.health.banned().values():  # a ban's time left never exceeds the longest ban
                inv.longest_ban_s = max(inv.longest_ban_s, left)
        up = sum(1 for n in self.nodes if n.state == "up")
        return {"t": round(now, 3), "nodes_up": up, "dht_lookups": self.dht_net.counters.lookups,
                "dht_bytes": self.dht_net.counters.bytes_down + self.dht_net.counters.bytes_up, **sizes}

    async def _sampler(self) -> None:
        while True:
            self.result.samples.append(self._sample())
            if self.progress is not None:
                self.progress(asyncio.get_running_loop().time())
            store_prune = self.dht_net.store.prune
            store_prune(asyncio.get_running_loop().time())
            await asyncio.sleep(self.options.sample_every_s)

    # ---- the run ----

    async def _main(self) -> None:
        self._build()
        o, sc = self.options, self.sc
        loop = asyncio.get_running_loop()
        trainers = o.trainers if o.trainers is not None else sc.swarm.trainers
        tokens = o.tokens_per_step or sc.trainer.batch_size * sc.trainer.block_size
        self.trainers = []
        for j in range(trainers):
            peer = Peer(name=f"trainer{j}", link=LinkModel(up_mbit=100.0, down_mbit=500.0, latency_ms=5.0),
                        dht_server=False)
            dht = ModelDHT(self.dht_net, peer, owner_marker(j, "t"))
            swarm = ModelSwarm(peer, dht, self.calls, self.by_endpoint, health=self.health, lookup=self.lookup,
                               hedge=HedgeOptions(), seed=self.sc.seed * 1000 + j)
            self.trainers.append(ModelTrainer(
                j, swarm, prefixes=self.prefixes, grid=sc.swarm.grid, tokens=tokens, hidden=sc.swarm.hidden_dim,
                moe=self.moe, k_best=sc.trainer.k_best, compute_s=o.trainer_compute_ms / 1000.0,
                rng=np.random.default_rng(self.sc.seed * 7919 + j), alive=self.alive))
        tasks = [loop.create_task(self._up(i, delay=self.rng.uniform(0, min(1.0, o.warmup_s))))
                 for i, n in enumerate(self.nodes) if n.state == "up"]
        await asyncio.sleep(o.warmup_s)
        tasks.append(loop.create_task(self._timeline()))
        tasks.append(loop.create_task(self._sampler()))
        tasks += [loop.create_task(self._train(t)) for t in self.trainers]
        await asyncio.sleep(o.duration_s)
        self.result.samples.append(self._sample())
        for task in asyncio.all_tasks(loop) - {asyncio.current_task(loop)}:
            task.cancel()

    def run(self) -> RunResult:
        loop = VirtualClockLoop()
        started = time.perf_counter()
        quiet = logging.getLogger("dmoe")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # thousands of nodes' bans and announce rounds: counted, not logged
        try:
            with virtual_time(loop):
                asyncio.set_event_loop(loop)
                loop.run_until_complete(self._main())
                pending = asyncio.all_tasks(loop)
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            quiet.setLevel(level)
            asyncio.set_event_loop(None)
            loop.close()
        self.result.wall_s = time.perf_counter() - started
        return self.result


__all__ = ["ModelOptions", "ModelRun", "RunResult", "measure_service_cost"]
