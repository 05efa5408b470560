"""ChurnModel: a scenario and a seed in, an ordered timeline of what happens to every node out.

This is a pure function: no processes, no clocks, one ``random.Random(seed)`` for everything
(per-node link parameters first, then churn and random node choices in time order), so the same
scenario and seed always give the same ``Timeline``. Launchers (``dmoe simulate``, the docker
chaos service) only *execute* a timeline; tests check its statistics without launching anything.

Per node, random churn alternates online and offline periods:

* a node starts online; once ``churn.start_after_s`` has passed it stays online for a period drawn
  from ``churn.online`` (e.g. Weibull with shape < 1: many short sessions, a few very long ones,
  as measured in P2P networks), then departs. With ``churn.steady_start`` that first period is what
  is *left* of a session already under way (``residual``), as in a swarm that has been running:
  a session seen in progress is length-biased (long ones are more likely to be caught), and the
  observer is uniformly placed inside it. Without it every session starts fresh at once, and for
  shape < 1 the early hazard is far above the steady rate (at 10,000 modelled nodes, 5.5 % left in
  the first 5 minutes against 10 %/h). How it departs is drawn from ``churn.departure``:
  ``crash`` (SIGKILL), ``leave`` (SIGTERM, graceful) or ``freeze`` (SIGSTOP);
* it stays away for a period drawn from ``churn.offline`` (freezes from ``churn.freeze`` when
  given), then comes back: a crashed or departed node ``rejoin``s (with its checkpoint directory
  kept with probability ``churn.keep_checkpoint``), a frozen one is ``resume``d (SIGCONT);
* then a new online period is drawn, and so on until the scenario ends.

Scheduled events (``[[events]]``) preempt random churn: a node a scheduled crash takes down returns
after the event's ``duration_s`` (or never), and only then draws a new online period. Crash, leave
and freeze act only on nodes that are up at that moment (others are listed in
``Timeline.skipped``); random choices (``fraction``/``count``) pick among the nodes that are up.
Partitions and link changes act on the node's link whatever its state, and are undone after their
``duration_s`` by a ``heal`` or a ``link`` event restoring the node's own link.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dmoe.sim.links import LinkModel
from dmoe.sim.scenario import LINK_KEYS, Distribution, Scenario

# What a launcher does for each action (the docker chaos service maps them to kill/pause/stop/start).
DEPARTURES = ("crash", "leave", "freeze")
RETURNS = ("rejoin", "resume", "join")
LINK_ACTIONS = ("partition", "heal", "link")
_MIN_RATE_MBIT = 0.1


def sample(dist: Distribution, rng: random.Random) -> float:
    """One draw of ``dist`` (always >= 0)."""
    p = dist.params
    match dist.dist:
        case "fixed":
            return p["value"]
        case "exponential":
            return rng.expovariate(1.0 / p["mean"])
        case "weibull":
            return rng.weibullvariate(p["scale"], p["shape"])
        case "uniform":
            return rng.uniform(p["low"], p["high"])
        case "lognormal":
            return rng.lognormvariate(math.log(p["median"]), p["sigma"])
        case "pareto":
            return p["scale"] * rng.paretovariate(p["shape"])
    raise ValueError(f"unknown distribution {dist.dist!r}")


def residual(dist: Distribution, rng: random.Random) -> float:
    """What is left of a period of ``dist`` in progress at a random moment: U x L, L length-biased."""
    p = dist.params
    match dist.dist:
        case "fixed":
            length = p["value"]
        case "exponential":
            return rng.expovariate(1.0 / p["mean"])  # memoryless
        case "weibull":  # (L/scale)^shape of the length-biased Weibull is Gamma(1 + 1/shape)
            length = p["scale"] * rng.gammavariate(1.0 + 1.0 / p["shape"], 1.0) ** (1.0 / p["shape"])
        case "uniform":  # density proportional to x on [low, high]
            length = math.sqrt(p["low"] ** 2 + rng.random() * (p["high"] ** 2 - p["low"] ** 2))
        case "lognormal":  # length-biased lognormal: mu + sigma^2
            length = rng.lognormvariate(math.log(p["median"]) + p["sigma"] ** 2, p["sigma"])
        case "pareto":  # length-biased Pareto: shape - 1 (infinite mean below 1: no steady state)
            if p["shape"] <= 1:
                raise ValueError("churn.steady_start needs a Pareto shape > 1 (a finite mean session)")
            length = p["scale"] * rng.paretovariate(p["shape"] - 1.0)
        case _:
            raise ValueError(f"unknown distribution {dist.dist!r}")
    return rng.random() * length


@dataclass(frozen=True)
class ChurnEvent:
    """One thing that happens to one node at time ``t`` (seconds from the start of the run)."""

    t: float
    node: int
    action: str  # crash | leave | freeze | resume | rejoin | partition | heal | link
    cause: str = "churn"  # churn | scheduled
    duration_s: float | None = None  # departures/partitions: planned time until the matching return
    keep_checkpoint: bool | None = None  # rejoin: start from the checkpoint directory or from scratch
    mode: str | None = None  # partition: blackhole | refuse
    link: Mapping[str, float] | None = None  # link: the complete LinkModel to apply

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 3), "node": self.node, "action": self.action, "cause": self.cause}
        for key in ("duration_s", "keep_checkpoint", "mode", "link"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 3) if isinstance(value, float) else (
                    dict(value) if isinstance(value, Mapping) else value)
        return out


@dataclass(frozen=True)
class Timeline:
    seed: int
    duration_s: float
    links: tuple[LinkModel, ...]  # each node's own link (drawn once per node)
    events: tuple[ChurnEvent, ...]  # ordered by time
    skipped: tuple[dict[str, Any], ...] = ()  # scheduled actions that did not apply, and why

    @property
    def nodes(self) -> int:
        return len(self.links)

    def online_periods(self, node: int | None = None) -> list[float]:
        """Completed online periods (from coming up to departing), for one node or all of them."""
        return self.periods("up", node)

    def periods(self, state: str, node: int | None = None) -> list[float]:
        """Completed periods in ``state`` ("up", "down", "frozen"); the one cut by the end of the run is left out."""
        per_node: dict[int, list[ChurnEvent]] = {}
        for e in self.events:
            per_node.setdefault(e.node, []).append(e)
        return [end - start for n in (range(self.nodes) if node is None else [node])
                for start, end, s in node_states(per_node.get(n, []), n, self.duration_s)
                if s == state and end < self.duration_s]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.action] = out.get(e.action, 0) + 1
        return out


def node_states(events: Iterable[ChurnEvent | Mapping[str, Any]], node: int, duration_s: float,
                ) -> list[tuple[float, float, str]]:
    """A node's process state over time: ``[(start, end, "up" | "down" | "frozen"), ...]``.

    Works on ``ChurnEvent``s or their dicts (e.g. read back from ``events.jsonl``).
    """
    intervals: list[tuple[float, float, str]] = []
    state, since = "up", 0.0
    for e in events:
        d = e.to_dict() if isinstance(e, ChurnEvent) else e
        if d.get("node") != node or d.get("action") not in (*DEPARTURES, *RETURNS):
            continue
        new = {"crash": "down", "leave": "down", "freeze": "frozen"}.get(d["action"], "up")
        if new != state:
            intervals.append((since, float(d["t"]), state))
            state, since = new, float(d["t"])
    intervals.append((since, max(since, duration_s), state))
    return [iv for iv in intervals if iv[1] > iv[0] or len(intervals) == 1]


def serving_intervals(events: Iterable[ChurnEvent | Mapping[str, Any]], node: int, duration_s: float,
                      ) -> list[tuple[float, float]]:
    """When a node could answer calls: process up and its link not partitioned."""
    events = list(events)
    up = [(a, b) for a, b, s in node_states(events, node, duration_s) if s == "up"]
    cut: list[tuple[float, float]] = []
    start: float | None = None
    for e in events:
        d = e.to_dict() if isinstance(e, ChurnEvent) else e
        if d.get("node") != node:
            continue
        if d["action"] == "partition" and start is None:
            start = float(d["t"])
        elif d["action"] == "heal" and start is not None:
            cut.append((start, float(d["t"])))
            start = None
    if start is not None:
        cut.append((start, duration_s))
    out: list[tuple[float, float]] = []
    for a, b in up:
        pieces = [(a, b)]
        for c0, c1 in cut:
            pieces = [p for x, y in pieces for p in ((x, min(y, c0)), (max(x, c1), y)) if p[1] > p[0]]
        out.extend(pieces)
    return out


@dataclass(order=True)
class _Item:
    t: float
    seq: int
    kind: str = field(compare=False)
    node: int = field(compare=False, default=-1)
    data: dict[str, Any] = field(compare=False, default_factory=dict)


class ChurnModel:
    """Turns ``scenario`` + ``seed`` into a ``Timeline`` (see the module docstring for the rules)."""

    def __init__(self, scenario: Scenario, seed: int | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed

    def draw_links(self, rng: random.Random) -> tuple[LinkModel, ...]:
        links = []
        spec = self.scenario.links
        for _ in range(self.scenario.swarm.total_nodes):
            values: dict[str, float] = {}
            for key in LINK_KEYS:
                value = getattr(spec, key)
                values[key] = sample(value, rng) if isinstance(value, Distribution) else float(value)
            for key in ("up_mbit", "down_mbit"):
                values[key] = max(_MIN_RATE_MBIT, values[key])
            values["drop_prob"] = min(1.0, values["drop_prob"])
            links.append(LinkModel(**values))
        return tuple(links)

    def timeline(self) -> Timeline:
        sc, churn = self.scenario, self.scenario.churn
        rng = random.Random(self.seed)
        links = self.draw_links(rng)
        n = sc.swarm.total_nodes
        # late nodes are absent until their `join` event, and only scheduled events act on them
        churned = [churn.enabled and i not in churn.exempt_nodes and i < sc.swarm.nodes for i in range(n)]
        status = ["up" if i < sc.swarm.nodes else "absent" for i in range(n)]
        generation = [0] * n  # bumped when a scheduled departure cancels a pending random one
        heap: list[_Item] = []
        seq = 0

        def push(t: float, kind: str, node: int = -1, **data: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, _Item(t, seq, kind, node, data))
            seq += 1

        def schedule_departure(node: int, after: float, first: bool = False) -> None:
            if churned[node]:
                session = residual(churn.online, rng) if first and churn.steady_start else sample(churn.online, rng)
                push(after + session, "churn_depart", node, gen=generation[node])

        for event_index, ev in enumerate(sc.events):
            push(ev.at_s, "scheduled", data_index=event_index)
        for node in range(n):
            schedule_departure(node, churn.start_after_s, first=True)

        events: list[ChurnEvent] = []
        skipped: list[dict[str, Any]] = []
        while heap:
            item = heapq.heappop(heap)
            t = item.t
            if t > sc.duration_s:
                break
            node = item.node
            if item.kind == "churn_depart":
                if item.data["gen"] != generation[node] or status[node] != "up":
                    continue
                kinds = list(DEPARTURES)
                action = rng.choices(kinds, weights=[churn.departure.get(k, 0.0) for k in kinds])[0]
                away_dist = churn.freeze if action == "freeze" and churn.freeze is not None else churn.offline
                away = sample(away_dist, rng)
                keep = None if action == "freeze" else rng.random() < churn.keep_checkpoint
                events.append(ChurnEvent(t, node, action, "churn", duration_s=away))
                status[node] = "frozen" if action == "freeze" else "down"
                push(t + away, "return", node, cause="churn", keep=keep)
            elif item.kind == "return":
                action = "resume" if status[node] == "frozen" else "rejoin"
                events.append(ChurnEvent(t, node, action, item.data["cause"], keep_checkpoint=item.data["keep"]))
                status[node] = "up"
                schedule_departure(node, t)
            elif item.kind == "heal":
                events.append(ChurnEvent(t, node, "heal", "scheduled"))
            elif item.kind == "restore_link":
                events.append(ChurnEvent(t, node, "link", "scheduled", link=links[node].to_dict()))
            elif item.kind == "scheduled":
                ev = sc.events[item.data["data_index"]]
                if ev.action in DEPARTURES:
                    candidates = [i for i in range(n) if status[i] == "up"]
                elif ev.action == "join":
                    candidates = [i for i in range(n) if status[i] == "absent"]
                else:
                    candidates = list(range(n))
                if ev.nodes is not None:
                    chosen = list(ev.nodes)
                else:
                    want = ev.count if ev.count is not None else max(1, round((ev.fraction or 0) * n))
                    chosen = sorted(rng.sample(candidates, min(want, len(candidates))))
                    if want > len(candidates):
                        skipped.append({"t": t, "action": ev.action, "reason": f"only {len(candidates)} of "
                                        f"{want} requested nodes were up"})
                for i in chosen:
                    if ev.action in DEPARTURES:
                        if status[i] != "up":
                            skipped.append({"t": t, "node": i, "action": ev.action, "reason": f"node is {status[i]}"})
                            continue
                        generation[i] += 1
                        keep = None if ev.action == "freeze" else rng.random() < ev.keep_checkpoint
                        events.append(ChurnEvent(t, i, ev.action, "scheduled", duration_s=ev.duration_s))
                        status[i] = "frozen" if ev.action == "freeze" else "down"
                        if ev.duration_s is not None:
                            push(t + ev.duration_s, "return", i, cause="scheduled", keep=keep)
                    elif ev.action == "join":
                        if status[i] != "absent":
                            skipped.append({"t": t, "node": i, "action": "join", "reason": f"node is {status[i]}"})
                            continue
                        events.append(ChurnEvent(t, i, "join", "scheduled", keep_checkpoint=False))
                        status[i] = "up"
                    elif ev.action == "partition":
                        events.append(ChurnEvent(t, i, "partition", "scheduled", duration_s=ev.duration_s,
                                                 mode=ev.mode))
                        push(t + (ev.duration_s or math.inf), "heal", i)
                    elif ev.action == "link":
                        new = LinkModel(**{**links[i].to_dict(), **ev.link}).to_dict()
                        events.append(ChurnEvent(t, i, "link", "scheduled", duration_s=ev.duration_s, link=new))
                        if ev.duration_s is not None:
                            push(t + ev.duration_s, "restore_link", i)
        return Timeline(seed=self.seed, duration_s=sc.duration_s, links=links, events=tuple(events),
                        skipped=tuple(skipped))


__all__ = ["ChurnEvent", "ChurnModel", "Timeline", "node_states", "residual", "sample", "serving_intervals"]
