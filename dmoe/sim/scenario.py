"""Scenario: what a simulated swarm looks like and what happens to it, as plain data.

A scenario is a TOML file (read with ``tomllib``) turned into frozen dataclasses. It says nothing
about *how* it is run: ``dmoe simulate`` runs it as local processes behind emulated links, and the
docker-compose chaos service runs the same model against containers. The churn timeline derived
from it (``dmoe.sim.churn.ChurnModel``) is likewise plain data.

Validation happens entirely at load time, before anything is launched: every key is checked for
type and range, unknown keys are rejected (a typo must not silently fall back to a default), and
the one error raised is a ``ConfigError`` naming the key path (``churn.online.shape``,
``events[1].nodes``) and what was expected.

Layout (all sections optional except where noted; see ``scenarios/*.toml`` for documented examples)::

    name = "churn"                  # required
    description = "..."
    duration_s = 180                # required: how long the swarm runs, s
    seed = 0                        # seeds links, churn and every process

    [swarm]     nodes, trainers, layers, grid, replicas, hidden_dim, expert_cls, bootstrap, nat_share,
                late_nodes, capacity
    [node]      announce_ttl_s, checkpoint_interval_s, extra_args, cpu_cores
    [trainer]   batch_size, micro_batches, block_size, n_head, k_best, k_min, lr, eval_every, eval_batches,
                steps, forward_timeout_s, backward_timeout_s, timeout_after_k_min_s, compression, max_data_mb,
                target_batch_size, extra_args
    [links]     up_mbit, down_mbit, latency_ms, jitter_ms, drop_prob  (number or distribution)
    [churn]     enabled, start_after_s, steady_start, online, offline, freeze, departure, keep_checkpoint,
                exempt_nodes
    [[events]]  at_s, action, nodes | fraction | count, duration_s, keep_checkpoint, mode, link values
    [report]    min_experts

A *distribution* is a number (fixed) or an inline table with ``dist`` and its parameters:
``{dist = "exponential", mean = 30}``, ``{dist = "weibull", shape = 0.6, scale = 60}``,
``{dist = "uniform", low = 10, high = 50}``, ``{dist = "lognormal", median = 20, sigma = 0.5}``,
``{dist = "pareto", shape = 1.5, scale = 10}``, ``{dist = "fixed", value = 5}``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dmoe.config import COMPRESSIONS, MoEOptions, NodeConfig, default_of
from dmoe.config.train import DataOptions, ModelConfig, TrainOptions
from dmoe.errors import ConfigError
from dmoe.sim.links import PARTITION_MODES, LinkModel

DEPARTURE_KINDS = ("crash", "leave", "freeze")
EVENT_ACTIONS = ("crash", "leave", "freeze", "partition", "link", "join")  # join: a late node starts
BOOTSTRAP_KINDS = ("auto", "coordinator", "node")
LINK_KEYS = ("up_mbit", "down_mbit", "latency_ms", "jitter_ms", "drop_prob")

# distribution kind -> its parameters, each with (check, expectation text)
_POSITIVE = (lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
_NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
DISTRIBUTIONS: dict[str, dict[str, tuple[Callable[[float], bool], str]]] = {
    "fixed": {"value": _NON_NEGATIVE},
    "exponential": {"mean": _POSITIVE},
    "weibull": {"shape": _POSITIVE, "scale": _POSITIVE},
    "uniform": {"low": _NON_NEGATIVE, "high": _NON_NEGATIVE},
    "lognormal": {"median": _POSITIVE, "sigma": _NON_NEGATIVE},
    "pareto": {"shape": _POSITIVE, "scale": _POSITIVE},
}


@dataclass(frozen=True)
class Distribution:
    """A non-negative random quantity: ``dist`` names the family, ``params`` its parameters."""

    dist: str
    params: Mapping[str, float]

    @classmethod
    def fixed(cls, value: float) -> Distribution:
        return cls("fixed", {"value": float(value)})

    def mean(self) -> float:
        p = self.params
        match self.dist:
            case "fixed":
                return p["value"]
            case "exponential":
                return p["mean"]
            case "weibull":
                return p["scale"] * math.gamma(1 + 1 / p["shape"])
            case "uniform":
                return (p["low"] + p["high"]) / 2
            case "lognormal":
                return p["median"] * math.exp(p["sigma"] ** 2 / 2)
            case "pareto":
                return math.inf if p["shape"] <= 1 else p["shape"] * p["scale"] / (p["shape"] - 1)
        raise ConfigError(f"unknown distribution {self.dist!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"dist": self.dist, **self.params}


Value = float | Distribution  # a link parameter: the same for every node, or drawn per node


# Scenario defaults are the defaults of the processes they run (``dmoe.config``): a scenario file
# that wants something else says so, and why, next to the value.
_MODEL, _MOE, _TRAIN, _DATA, _LINK = ModelConfig(), MoEOptions(), TrainOptions(), DataOptions(), LinkModel()


@dataclass(frozen=True)
class SwarmSpec:
    nodes: int = 4
    trainers: int = 1
    layers: int = _MODEL.n_layer  # MoE layers of the trainer's model: uid prefixes layer0.ffn, layer1.ffn, ...
    grid: tuple[int, ...] = _MODEL.grid_size  # expert grid of every layer
    replicas: int = 2  # how many nodes serve each expert
    hidden_dim: int = _MODEL.n_embd  # of the trainer's model and so of every node's experts
    expert_cls: str = _MODEL.expert_cls
    bootstrap: str = "auto"  # coordinator if `dmoe coordinator` exists, else a bootstrap node
    # share of the nodes behind NAT: they announce no address of their own and serve only through a relay
    # (the coordinator's, or the bootstrap node's); which nodes is drawn from the seed (swarm_layout.behind_nat)
    nat_share: float = 0.0
    # fresh volunteers: nodes nodes..nodes+late_nodes-1 are not started with the swarm but by `join` events, and
    # run `dmoe node --experts auto` (they pick what the swarm lacks; dmoe.node.keeper)
    late_nodes: int = 0
    capacity: int | None = None  # every node's --capacity (spare room adopts experts); None: its placement

    @property
    def experts_per_layer(self) -> int:
        return math.prod(self.grid)

    @property
    def total_nodes(self) -> int:
        return self.nodes + self.late_nodes


@dataclass(frozen=True)
class NodeSpec:
    announce_ttl_s: float = default_of(NodeConfig, "announce_ttl")
    checkpoint_interval_s: float = default_of(NodeConfig, "checkpoint_interval")
    extra_args: tuple[str, ...] = ()
    # a hard CPU quota per node process, in cores (dmoe.sim.cpu_budget): a departed node then frees nothing for the
    # others, as on real volunteers' machines; None: unlimited (processes share the machine)
    cpu_cores: float | None = None


@dataclass(frozen=True)
class TrainerSpec:
    """What each trainer trains (its model's layers/grid/hidden size come from ``[swarm]``)."""

    batch_size: int = _TRAIN.batch_size
    micro_batches: int = _TRAIN.micro_batches  # pieces of a batch in flight at once (dmoe.train.pipeline)
    block_size: int = _MODEL.block_size  # context length, bytes
    n_head: int = _MODEL.n_head
    k_best: int = _MODEL.k_best
    k_min: int = _MOE.k_min
    lr: float = _TRAIN.lr
    eval_every: int = _TRAIN.eval_every  # steps; 0 disables
    eval_batches: int = _TRAIN.eval_batches
    steps: int | None = None  # None: train until the scenario ends; else the run ends when all trainers reach it
    forward_timeout_s: float = _MOE.forward_timeout
    backward_timeout_s: float = _MOE.backward_timeout
    timeout_after_k_min_s: float = _MOE.timeout_after_k_min
    compression: str = _MOE.compression
    max_data_mb: float | None = _DATA.max_data_mb  # read at most this much of the corpus
    # several trainers (one model, hivemind's collaborative optimizer): sequences per collaborative
    # step; None = batch_size x trainers, i.e. one step per round of local batches
    target_batch_size: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinkSpec:
    """Per-node link parameters; each a number or a distribution drawn once per node.

    Rates and drops default to ``LinkModel``'s; latency and jitter do not: a scenario that says
    nothing about its links still gets home lines that differ from node to node (10-50 ms one way,
    2 ms jitter), since identical lines would hide what uneven ones do.
    """

    up_mbit: Value = _LINK.up_mbit
    down_mbit: Value = _LINK.down_mbit
    latency_ms: Value = field(default_factory=lambda: Distribution("uniform", {"low": 10.0, "high": 50.0}))
    jitter_ms: Value = 2.0
    drop_prob: Value = _LINK.drop_prob


@dataclass(frozen=True)
class ChurnSpec:
    enabled: bool = False
    start_after_s: float = 20.0  # no random churn before this (the swarm warms up)
    # nodes' first sessions are already under way at start_after_s (a swarm that has run for a while),
    # instead of all starting then: with Weibull shape < 1 fresh sessions end far more often early on
    steady_start: bool = False
    online: Distribution = field(default_factory=lambda: Distribution("exponential", {"mean": 60.0}))
    offline: Distribution = field(default_factory=lambda: Distribution("exponential", {"mean": 15.0}))
    freeze: Distribution | None = None  # how long a freeze lasts; None: drawn from `offline`
    departure: Mapping[str, float] = field(default_factory=lambda: {"crash": 0.5, "leave": 0.3, "freeze": 0.2})
    keep_checkpoint: float = 0.7  # probability a returning node still has its checkpoint directory
    exempt_nodes: tuple[int, ...] = ()  # never churned at random (scheduled events still apply)


@dataclass(frozen=True)
class ScheduledEvent:
    """``at_s``: do ``action`` to the chosen nodes (explicit ``nodes``, or a random ``fraction``/``count``)."""

    at_s: float
    action: str
    nodes: tuple[int, ...] | None = None
    fraction: float | None = None
    count: int | None = None
    duration_s: float | None = None  # down/frozen/partitioned/changed for this long; None: until the end
    keep_checkpoint: float = 1.0  # crash/leave: probability the node returns with its checkpoint
    mode: str = "blackhole"  # partition
    link: Mapping[str, float] = field(default_factory=dict)  # action = "link": new link values


@dataclass(frozen=True)
class ReportSpec:
    min_experts: int | None = None  # "time with fewer than k experts": k; None = trainer's k_best


@dataclass(frozen=True)
class Scenario:
    name: str
    duration_s: float
    description: str = ""
    seed: int = 0
    swarm: SwarmSpec = field(default_factory=SwarmSpec)
    node: NodeSpec = field(default_factory=NodeSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    links: LinkSpec = field(default_factory=LinkSpec)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    events: tuple[ScheduledEvent, ...] = ()
    report: ReportSpec = field(default_factory=ReportSpec)
    source: str = "<built-in>"

    @property
    def min_experts(self) -> int:
        return self.report.min_experts if self.report.min_experts is not None else self.trainer.k_best

    def to_dict(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            if isinstance(value, Distribution):
                return value.to_dict()
            if isinstance(value, Mapping):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            return value

        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key == "events":
                out[key] = [clean(_shallow(e)) for e in value]
            elif hasattr(value, "__dataclass_fields__"):
                out[key] = clean(_shallow(value))
            else:
                out[key] = clean(value)
        return out

    def with_seed(self, seed: int) -> Scenario:
        return replace(self, seed=seed)


def _shallow(obj: Any) -> dict[str, Any]:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


# ----- loading and validation --------------------------------------------------------------------
_REQUIRED = object()


class _Table:
    """Reads typed keys out of one TOML table, remembering which keys were used."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, Mapping):
            raise self.error(path or "scenario", "a table", data)
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"scenario {self.source}: {key} must be {expected}, got {got!r}")

    def absent(self, name: str, default: Any) -> bool:
        """Mark ``name`` used; True if it is missing and has a default (raise if it is required)."""
        self.used.add(name)
        if name in self.data:
            return False
        if default is _REQUIRED:
            raise ConfigError(f"scenario {self.source}: missing required key {self.key(name)}")
        return True

    def raw(self, name: str, default: Any = _REQUIRED) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"scenario {self.source}: missing required key {self.key(name)}")
            return default
        return self.data[name]

    def number(self, name: str, default: Any = _REQUIRED, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, allow_inf: bool = False) -> Any:
        if self.absent(name, default):
            return default
        value = self.data[name]
        return _check_number(value, self.key(name), self.source, lo=lo, hi=hi, lo_open=lo_open, allow_inf=allow_inf)

    def integer(self, name: str, default: Any = _REQUIRED, *, lo: int | None = None, hi: int | None = None) -> Any:
        if self.absent(name, default):
            return default
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or (
                hi is not None and value > hi):
            raise self.error(self.key(name), "an integer" + _range_text(lo, hi), value)
        return value

    def string(self, name: str, default: Any = _REQUIRED, *, choices: tuple[str, ...] | None = None) -> Any:
        if self.absent(name, default):
            return default
        value = self.data[name]
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.error(self.key(name), f"one of {', '.join(map(repr, choices))}" if choices else "a string",
                             value)
        return value

    def boolean(self, name: str, default: Any = _REQUIRED) -> Any:
        if self.absent(name, default):
            return default
        value = self.data[name]
        if not isinstance(value, bool):
            raise self.error(self.key(name), "true or false", value)
        return value

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.raw(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(self.key(name), "a list of strings", value)
        return tuple(value)

    def integers(self, name: str, default: Any = _REQUIRED, *, lo: int = 0, hi: int | None = None,
                 non_empty: bool = False) -> Any:
        if self.absent(name, default):
            return default
        value = self.data[name]
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= lo and (
            hi is None or v <= hi) for v in value)
        if not ok or (non_empty and not value):
            what = ("a non-empty list" if non_empty else "a list") + " of integers" + _range_text(lo, hi)
            raise self.error(self.key(name), what, value)
        return tuple(value)

    def distribution(self, name: str, default: Any = _REQUIRED) -> Any:
        if self.absent(name, default):
            return default
        value = self.data[name]
        return parse_distribution(value, self.key(name), self.source)

    def value(self, name: str, default: Value, *, lo: float, hi: float | None = None, lo_open: bool = False,
              allow_inf: bool = False) -> Value:
        """A number or a distribution (drawn per node)."""
        if self.absent(name, default):
            return default
        raw = self.data[name]
        if isinstance(raw, Mapping):
            dist = parse_distribution(raw, self.key(name), self.source)
            if dist.dist == "uniform" and hi is not None and dist.params["high"] > hi:
                raise self.error(self.key(name) + ".high", f"<= {hi}", dist.params["high"])
            return dist
        return _check_number(raw, self.key(name), self.source, lo=lo, hi=hi, lo_open=lo_open, allow_inf=allow_inf)

    def sub(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.data.get(name, {}), self.key(name), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            where = f" in [{self.path}]" if self.path else ""
            raise ConfigError(f"scenario {self.source}: unknown key {self.key(unknown[0])}{where}; "
                              f"expected one of: {', '.join(sorted(self.used))}")


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _check_number(value: Any, key: str, source: str, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, allow_inf: bool = False) -> float:
    expected = "a number" + _range_text(lo, hi, lo_open)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"scenario {source}: {key} must be {expected}, got {value!r}")
    value = float(value)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"scenario {source}: {key} must be {expected}, got {value!r}")
    return value


def parse_distribution(value: Any, key: str, source: str = "<dict>") -> Distribution:
    """A number (fixed) or ``{dist = ..., params...}``; raises ConfigError naming ``key``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Distribution.fixed(_check_number(value, key, source, lo=0))
    table = _Table(value, key, source)
    kind = table.string("dist", choices=tuple(DISTRIBUTIONS))
    params = {p: table.number(p) for p in DISTRIBUTIONS[kind]}
    for p, (check, expected) in DISTRIBUTIONS[kind].items():
        if not check(params[p]):
            raise ConfigError(f"scenario {source}: {key}.{p} must be {expected}, got {params[p]!r}")
    if kind == "uniform" and params["high"] < params["low"]:
        raise ConfigError(f"scenario {source}: {key}.high must be >= {key}.low, got {params['high']!r}")
    table.done()
    return Distribution(kind, params)


MAX_REAL_NODES = 256  # real processes on one machine (dmoe simulate)
MAX_MODEL_NODES = 100_000  # dmoe model: a virtual clock, no processes


def _parse_swarm(t: _Table, max_nodes: int) -> SwarmSpec:
    d = SwarmSpec()
    nodes = t.integer("nodes", d.nodes, lo=1, hi=max_nodes)
    grid = t.integers("grid", d.grid, lo=1, non_empty=True)
    spec = SwarmSpec(
        nodes=nodes,
        trainers=t.integer("trainers", d.trainers, lo=1, hi=16),
        layers=t.integer("layers", d.layers, lo=1, hi=32),
        grid=grid,
        replicas=t.integer("replicas", d.replicas, lo=1),
        hidden_dim=t.integer("hidden_dim", d.hidden_dim, lo=1),
        expert_cls=t.string("expert_cls", d.expert_cls),
        bootstrap=t.string("bootstrap", d.bootstrap, choices=BOOTSTRAP_KINDS),
        nat_share=t.number("nat_share", d.nat_share, lo=0, hi=1),
        late_nodes=t.integer("late_nodes", d.late_nodes, lo=0),
        capacity=t.integer("capacity", d.capacity, lo=1),
    )
    if spec.replicas > spec.nodes:
        raise t.error(t.key("replicas"), f"an integer in [1, swarm.nodes = {spec.nodes}]", spec.replicas)
    t.done()
    return spec


def _parse_node(t: _Table) -> NodeSpec:
    d = NodeSpec()
    spec = NodeSpec(
        announce_ttl_s=t.number("announce_ttl_s", d.announce_ttl_s, lo=0, lo_open=True),
        checkpoint_interval_s=t.number("checkpoint_interval_s", d.checkpoint_interval_s, lo=0, lo_open=True),
        extra_args=t.strings("extra_args"),
        cpu_cores=t.number("cpu_cores", d.cpu_cores, lo=0, lo_open=True),
    )
    t.done()
    return spec


def _parse_trainer(t: _Table, swarm: SwarmSpec) -> TrainerSpec:
    d = TrainerSpec()
    spec = TrainerSpec(
        batch_size=t.integer("batch_size", d.batch_size, lo=1),
        micro_batches=t.integer("micro_batches", d.micro_batches, lo=1),
        block_size=t.integer("block_size", d.block_size, lo=2),
        n_head=t.integer("n_head", d.n_head, lo=1),
        k_best=t.integer("k_best", d.k_best, lo=1),
        k_min=t.integer("k_min", d.k_min, lo=1),
        lr=t.number("lr", d.lr, lo=0, lo_open=True),
        eval_every=t.integer("eval_every", d.eval_every, lo=0),
        eval_batches=t.integer("eval_batches", d.eval_batches, lo=1),
        steps=t.integer("steps", None, lo=1),
        forward_timeout_s=t.number("forward_timeout_s", d.forward_timeout_s, lo=0, lo_open=True),
        backward_timeout_s=t.number("backward_timeout_s", d.backward_timeout_s, lo=0, lo_open=True),
        timeout_after_k_min_s=t.number("timeout_after_k_min_s", d.timeout_after_k_min_s, lo=0, lo_open=True),
        compression=t.string("compression", d.compression, choices=COMPRESSIONS),
        max_data_mb=t.number("max_data_mb", d.max_data_mb, lo=0, lo_open=True),
        target_batch_size=t.integer("target_batch_size", None, lo=1),
        extra_args=t.strings("extra_args"),
    )
    if spec.k_min > spec.k_best:
        raise t.error(t.key("k_min"), f"an integer in [1, trainer.k_best = {spec.k_best}]", spec.k_min)
    if swarm.hidden_dim % spec.n_head:
        raise t.error(t.key("n_head"), f"a divisor of swarm.hidden_dim = {swarm.hidden_dim}", spec.n_head)
    if spec.k_best > swarm.experts_per_layer:
        raise t.error(t.key("k_best"), f"an integer in [1, experts per layer = {swarm.experts_per_layer}]",
                      spec.k_best)
    t.done()
    return spec


def _parse_links(t: _Table) -> LinkSpec:
    d = LinkSpec()
    spec = LinkSpec(
        up_mbit=t.value("up_mbit", d.up_mbit, lo=0, lo_open=True, allow_inf=True),
        down_mbit=t.value("down_mbit", d.down_mbit, lo=0, lo_open=True, allow_inf=True),
        latency_ms=t.value("latency_ms", d.latency_ms, lo=0),
        jitter_ms=t.value("jitter_ms", d.jitter_ms, lo=0),
        drop_prob=t.value("drop_prob", d.drop_prob, lo=0, hi=1),
    )
    for name in ("up_mbit", "down_mbit"):
        value = getattr(spec, name)
        if isinstance(value, Distribution) and value.dist in ("fixed", "uniform") and (
                value.params.get("value", 1) == 0 or value.params.get("low", 1) == 0):
            raise t.error(t.key(name), "a distribution of rates > 0 Mbit/s", value.to_dict())
    t.done()
    return spec


def _parse_departure(value: Any, key: str, source: str) -> dict[str, float]:
    t = _Table(value, key, source)
    weights = {k: t.number(k, 0.0, lo=0) for k in DEPARTURE_KINDS}
    t.done()
    if sum(weights.values()) <= 0:
        raise ConfigError(f"scenario {source}: {key} must give a weight > 0 to at least one of "
                          f"{', '.join(DEPARTURE_KINDS)}, got {value!r}")
    return weights


def _parse_churn(t: _Table, nodes: int) -> ChurnSpec:
    d = ChurnSpec()
    spec = ChurnSpec(
        enabled=t.boolean("enabled", d.enabled),
        start_after_s=t.number("start_after_s", d.start_after_s, lo=0),
        steady_start=t.boolean("steady_start", d.steady_start),
        online=t.distribution("online", d.online),
        offline=t.distribution("offline", d.offline),
        freeze=t.distribution("freeze", None),
        departure=_parse_departure(t.raw("departure", dict(d.departure)), t.key("departure"), t.source),
        keep_checkpoint=t.number("keep_checkpoint", d.keep_checkpoint, lo=0, hi=1),
        exempt_nodes=t.integers("exempt_nodes", (), lo=0, hi=nodes - 1),
    )
    if spec.online.mean() <= 0:
        raise t.error(t.key("online"), "a distribution with a mean > 0 s", spec.online.to_dict())
    t.done()
    return spec


def _parse_event(t: _Table, nodes: int, duration_s: float) -> ScheduledEvent:
    at_s = t.number("at_s", lo=0, hi=duration_s)
    action = t.string("action", choices=EVENT_ACTIONS)
    chosen = t.raw("nodes", None)
    fraction = t.number("fraction", None, lo=0, hi=1, lo_open=True)
    count = t.integer("count", None, lo=1, hi=nodes)
    if chosen == "all":
        chosen = tuple(range(nodes))
    elif chosen is not None:
        chosen = t.integers("nodes", lo=0, hi=nodes - 1, non_empty=True)
    if sum(x is not None for x in (chosen, fraction, count)) != 1:
        raise ConfigError(f"scenario {t.source}: {t.path} must choose its nodes with exactly one of "
                          f"nodes = [indices] | \"all\", fraction = 0..1, count = N")
    duration = t.number("duration_s", None, lo=0, lo_open=True)
    if action == "join" and duration is not None:
        raise ConfigError(f"scenario {t.source}: {t.key('duration_s')} is not valid with action = \"join\" "
                          "(a joining node stays; schedule a departure for it instead)")
    if action in ("freeze", "partition") and duration is None:
        raise ConfigError(f"scenario {t.source}: missing required key {t.key('duration_s')} "
                          f"(a number > 0: how long the {action} lasts, s)")
    keep = t.raw("keep_checkpoint", 1.0)
    if isinstance(keep, bool):
        keep = 1.0 if keep else 0.0
    else:
        keep = _check_number(keep, t.key("keep_checkpoint"), t.source, lo=0, hi=1)
    mode = t.string("mode", "blackhole", choices=PARTITION_MODES)
    link: dict[str, float] = {}
    for name in LINK_KEYS:
        if name in t.data:
            if action != "link":
                raise ConfigError(f"scenario {t.source}: {t.key(name)} is only valid with action = \"link\"")
            lo_open = name.endswith("mbit")
            link[name] = t.number(name, lo=0, lo_open=lo_open, hi=1 if name == "drop_prob" else None,
                                  allow_inf=lo_open)
        else:
            t.used.add(name)
    if action == "link" and not link:
        raise ConfigError(f"scenario {t.source}: {t.path} with action = \"link\" must set at least one of "
                          f"{', '.join(LINK_KEYS)}")
    t.done()
    return ScheduledEvent(at_s=at_s, action=action, nodes=chosen, fraction=fraction, count=count,
                          duration_s=duration, keep_checkpoint=keep, mode=mode, link=link)


def scenario_from_dict(data: Mapping[str, Any], *, source: str = "<dict>",
                       max_nodes: int = MAX_REAL_NODES) -> Scenario:
    """Validate a parsed TOML document (or any dict of the same shape) into a Scenario."""
    top = _Table(data, "", source)
    name = top.string("name")
    description = top.string("description", "")
    duration = top.number("duration_s", lo=0, lo_open=True)
    seed = top.integer("seed", 0, lo=0)
    swarm = _parse_swarm(top.sub("swarm"), max_nodes)
    node = _parse_node(top.sub("node"))
    trainer = _parse_trainer(top.sub("trainer"), swarm)
    links = _parse_links(top.sub("links"))
    churn = _parse_churn(top.sub("churn"), swarm.nodes)
    raw_events = top.raw("events", [])
    if not isinstance(raw_events, list):
        raise top.error("events", "an array of tables ([[events]])", raw_events)
    events = tuple(_parse_event(_Table(e, f"events[{i}]", source), swarm.total_nodes, duration)
                   for i, e in enumerate(raw_events))
    report_t = top.sub("report")
    report = ReportSpec(min_experts=report_t.integer("min_experts", None, lo=1))
    report_t.done()
    top.done()
    return Scenario(name=name, description=description, duration_s=duration, seed=seed, swarm=swarm, node=node,
                    trainer=trainer, links=links, churn=churn, events=events, report=report, source=source)


def load_scenario(path: str | Path, *, max_nodes: int = MAX_REAL_NODES) -> Scenario:
    """Read and validate a scenario file; every problem is one ConfigError naming the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read scenario {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"scenario {path} is not valid TOML: {e}") from None
    return scenario_from_dict(data, source=str(path), max_nodes=max_nodes)


def dump_json_safe(scenario: Scenario) -> dict[str, Any]:
    """``Scenario.to_dict`` with infinities spelled as strings (JSON has no inf)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return fix(scenario.to_dict())


__all__ = [
    "ChurnSpec", "Distribution", "LinkSpec", "NodeSpec", "ReportSpec", "Scenario", "ScheduledEvent", "SwarmSpec",
    "TrainerSpec", "load_scenario", "parse_distribution", "scenario_from_dict",
]
