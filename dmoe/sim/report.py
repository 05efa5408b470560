"""The report of one simulated (or docker-compose) run, built only from the files the run left behind.

Inputs in the run directory (``dmoe simulate --out DIR`` writes them; the compose demo writes the
same ones):

* ``run.json``: scenario, seed, wall-clock start ``t0``, duration, and per node its experts and
  link; the only place the layout of the swarm is recorded;
* ``events.jsonl``: one record per churn or link event actually applied, ``t`` in seconds from
  ``t0`` (plus ``ready`` records when a returning node serves again, and ``error`` records);
* ``trainers/*.jsonl``: the trainers' own metrics logs (``step``, ``eval``, ``start``, ``stop``
  records with unix ``time``);
* ``swarm.jsonl`` (optional): the coordinator's view of the DHT sampled during the run (``t`` in
  seconds from ``t0``); a sample may carry ``replication`` (uid -> live holders, see
  ``swarm_replication``) or the ``/status`` ``prefixes`` with their ``replication``.

Outputs: ``summary.json``, ``report.png`` and a printed table. Definitions used in the summary:

* **experts alive (truth)**: per MoE layer, the experts with at least one replica whose process is
  up and whose link is not partitioned (from the events); the minimum over layers is compared with
  ``k`` (the trainer's ``k_best`` unless the scenario says otherwise) for *time with fewer than k
  experts*;
* **recovery time** of a disruptive event (crash, leave, freeze, partition, link change): seconds
  from the event to the completion of the first *clean* step after it: not skipped and without a
  failed expert call (calls merely *abandoned* because enough other experts had answered do not
  count). A step stalled by the event completes late, so a stall shows up as a long recovery even
  when the step succeeds; an event training did not notice recovers in about one step time. The
  failed calls and skipped steps in between are reported as the event's impact. With several
  trainers the slowest one counts.
* **expert states lost** (``expert_states_lost``): an expert's trained state counts as lost when
  its *lineage* (the most optimizer steps any live holder reports behind its weights, ``lineage``
  in the samples) falls below half of the most it ever had, after at least ``LOST_MIN_STEPS``
  steps: its holders now serve it from initial weights or a stale checkpoint (a fresh node took it
  over without its state, or it came back after having no holder). An expert with no live holder
  in two consecutive samples counts as lost from then on unless it comes back with its lineage (a
  volunteer returning with its checkpoint), and counts if it is still without a holder at the end
  of the run or comes back from a node that reports no lineage (runs before lineage was recorded).
  Cumulative, each uid once. Only samples with per-expert replication take part; a run without
  any has ``None`` (and no plot panel).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.dht.uids import split_uid
from dmoe.sim.churn import serving_intervals

DISRUPTIVE = ("crash", "leave", "freeze", "partition", "link")
RETURNS = ("rejoin", "resume", "heal")
SOFT_FAILURES = ("abandoned",)  # the layer stopped waiting for a slow expert: not a fault of that node
_EVENT_STYLE = {  # colour, line style of an event marker
    "crash": ("tab:red", "-"), "leave": ("tab:orange", "-"), "freeze": ("tab:blue", "-"),
    "partition": ("tab:purple", "-"), "link": ("tab:gray", "--"),
    "rejoin": ("tab:green", ":"), "resume": ("tab:green", ":"), "heal": ("tab:green", ":"),
}


@dataclass
class RunData:
    out_dir: Path
    run: dict[str, Any]
    events: list[dict[str, Any]]
    trainers: dict[str, list[dict[str, Any]]]  # name -> records
    swarm: list[dict[str, Any]] = field(default_factory=list)

    @property
    def t0(self) -> float:
        return float(self.run["t0"])

    @property
    def duration(self) -> float:
        return float(self.run.get("elapsed_s") or self.run["duration_s"])

    def steps(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.trainers[name] if r.get("type") == "step"]

    def evals(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.trainers[name] if r.get("type") == "eval"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (process killed mid-write) is ignored."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def load_run(out_dir: str | Path) -> RunData:
    out = Path(out_dir)
    run = json.loads((out / "run.json").read_text())
    trainers = {p.stem: read_jsonl(p) for p in sorted((out / "trainers").glob("*.jsonl"))}
    return RunData(out, run, read_jsonl(out / "events.jsonl"), trainers, read_jsonl(out / "swarm.jsonl"))


# ----- experts alive (ground truth from the events) ---------------------------------------------
def alive_series(run: RunData) -> tuple[list[float], dict[str, list[int]]]:
    """Change points and, per layer prefix, the number of experts served at each change point.

    A node that rejoins serves from its ``ready`` record on (start-up takes a few seconds), not
    from the moment its process was started.
    """
    nodes = run.run["nodes"]
    duration = run.duration
    proc_events: list[dict[str, Any]] = []
    for i, e in enumerate(run.events):
        action = e.get("action")
        if action == "rejoin":
            ready = next((r for r in run.events[i + 1:] if r.get("node") == e.get("node")
                          and r.get("action") in ("ready", *DISRUPTIVE)), None)
            if ready is not None and ready["action"] == "ready":
                proc_events.append({**e, "t": ready["t"]})
            elif ready is None:
                proc_events.append({**e, "t": duration})  # never served again
        elif action in (*DISRUPTIVE, *RETURNS):
            proc_events.append(e)
    proc_events.sort(key=lambda e: float(e["t"]))
    intervals = {n["index"]: serving_intervals(proc_events, n["index"], duration) for n in nodes}
    cuts = sorted({0.0, duration, *(t for ivs in intervals.values() for iv in ivs for t in iv)})
    layers: dict[str, set[str]] = {}
    for n in nodes:
        for uid in n["experts"]:
            layers.setdefault(split_uid(uid)[0], set()).add(uid)
    series: dict[str, list[int]] = {prefix: [] for prefix in sorted(layers)}
    for t in cuts:
        probe = min(t, duration - 1e-9)  # the last change point carries the state just before the end
        serving = {n["index"] for n in nodes if any(a <= probe < b for a, b in intervals[n["index"]])}
        served = {uid for n in nodes if n["index"] in serving for uid in n["experts"]}
        for prefix, uids in layers.items():
            series[prefix].append(len(uids & served))
    return cuts, series


def _per_expert(status: dict[str, Any], key: str) -> dict[str, int] | None:
    """Uid -> ``key`` (a per-expert table): the sample's own table, else the union of its prefixes' tables;
    None when neither exists."""
    flat = status.get(key)
    if isinstance(flat, dict):
        return {str(uid): int(n) for uid, n in flat.items()}
    prefixes = status.get("prefixes")
    tables = [p.get(key) for p in prefixes.values() if isinstance(p, dict)] if isinstance(prefixes, dict) else []
    tables = [table for table in tables if isinstance(table, dict)]
    return {str(uid): int(n) for table in tables for uid, n in table.items()} if tables else None


def swarm_replication(status: dict[str, Any]) -> dict[str, int] | None:
    """Uid -> live holders from a coordinator ``/status`` (or a swarm.jsonl sample); None if it has none
    (coordinators before issue 15). An expert without holders is absent or 0."""
    return _per_expert(status, "replication")


LOST_MIN_STEPS = 20  # an expert trained less than this had no state worth counting as lost


def swarm_lineage(status: dict[str, Any]) -> dict[str, int]:
    """Uid -> lineage (optimizer steps behind its weights) from a sample's ``lineage`` or its prefixes'."""
    return _per_expert(status, "lineage") or {}


@dataclass
class StateLoss:
    """Expert states lost over the run (definition in the module docstring)."""

    times: list[float]  # sample times (s from t0) of the samples with replication
    lost: list[int]  # cumulative states lost at each of those samples
    at_risk: list[int]  # experts with exactly one live holder at each sample
    uids: dict[str, float]  # lost uid -> time it was counted


def expert_states_lost(swarm: Sequence[dict[str, Any]]) -> StateLoss | None:
    """Walk the swarm samples in time order; None when no sample carries per-expert replication."""
    samples = [(float(rec["t"]), rep) for rec in swarm if "t" in rec and (rep := swarm_replication(rec)) is not None]
    if not samples:
        return None
    samples.sort(key=lambda s: s[0])
    held: set[str] = set()  # uids with a live holder in some earlier sample
    empty: dict[str, int] = {}  # uid -> consecutive samples without a holder
    gap: dict[str, float] = {}  # uid -> when its holders were gone for 2 samples (lost, unless it comes back whole)
    peak: dict[str, int] = {}  # uid -> the largest lineage seen
    lineages = {float(rec["t"]): swarm_lineage(rec) for rec in swarm if "t" in rec}
    reported = any(lineages.values())
    out = StateLoss([], [], [], {})
    for t, replication in samples:
        lineage = lineages.get(t, {})
        for uid, steps in lineage.items():
            came_back = gap.pop(uid, None)
            whole = peak.get(uid, 0) < LOST_MIN_STEPS or steps >= peak[uid] / 2
            if uid not in out.uids and not whole:  # served again from far fewer steps: the trained state is gone
                out.uids[uid] = came_back if came_back is not None else t
            peak[uid] = max(peak.get(uid, 0), steps)
        for uid in held:
            if replication.get(uid, 0) > 0:
                empty[uid] = 0
                if uid in gap and uid not in lineage:  # back, and nobody says from how many steps: count it
                    out.uids.setdefault(uid, gap.pop(uid))
                continue
            empty[uid] = empty.get(uid, 0) + 1
            if empty[uid] >= 2 and uid not in out.uids:
                if reported:
                    gap.setdefault(uid, t)  # lost unless it comes back with its steps
                else:
                    out.uids[uid] = t  # nobody reports lineages (older runs): a gap is all we can know
        held.update(uid for uid, n in replication.items() if n > 0)
        out.times.append(t)
        out.lost.append(len(out.uids))
        out.at_risk.append(sum(1 for n in replication.values() if n == 1))
    for uid, t in gap.items():  # still without a holder at the end of the run
        out.uids.setdefault(uid, t)
    if out.lost:
        out.lost[-1] = len(out.uids)
    return out


def time_below(cuts: Sequence[float], counts: Sequence[int], k: int) -> float:
    return sum(b - a for a, b, c in zip(cuts, cuts[1:], counts, strict=False) if c < k)


# ----- summary -----------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def first_fault_time(run: RunData) -> float | None:
    """Wall time of the first injected disruptive event (None: the run had none)."""
    times = [float(e["t"]) for e in run.events if e.get("action") in DISRUPTIVE and e.get("cause") != "initial"]
    return run.t0 + min(times) if times else None


def trainer_summary(run: RunData, name: str) -> dict[str, Any]:
    steps = run.steps(name)
    first_fault = first_fault_time(run)
    before_fault = sum(sum(int(v) for v in (s.get("failures") or {}).values()) for s in steps
                       if first_fault is None or s.get("time", math.inf) <= first_fault)
    records = run.trainers[name]
    stop = next((r for r in reversed(records) if r.get("type") == "stop"), None)
    start = next((r for r in records if r.get("type") == "start"), None)
    clean = [s for s in steps if not s.get("skipped")]
    failures: Counter[str] = Counter()
    for s in steps:
        failures.update({k: int(v) for k, v in (s.get("failures") or {}).items()})
    evals = [e for e in run.evals(name) if e.get("val_loss") is not None]
    tokens = sum(s.get("tokens_per_s", 0) * s.get("step_time", 0) for s in clean)
    if stop is not None and stop.get("tokens_per_s") is not None and stop.get("elapsed"):
        tokens_per_s = float(stop["tokens_per_s"])
        elapsed = float(stop["elapsed"])
    elif steps:
        first = start["time"] if start else steps[0]["time"] - steps[0].get("step_time", 0)
        elapsed = max(1e-9, steps[-1]["time"] - first)
        tokens_per_s = tokens / elapsed
    else:
        tokens_per_s, elapsed = 0.0, 0.0
    step_times = [s["step_time"] for s in clean if s.get("step_time") is not None]
    losses = [s["loss"] for s in clean if s.get("loss") is not None]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "batches": len(steps),
        "skipped": sum(1 for s in steps if s.get("skipped")),
        "tokens": int(round(tokens)),
        "tokens_per_s": tokens_per_s,
        "elapsed_s": elapsed,
        "first_val_loss": evals[0]["val_loss"] if evals else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_val_step": evals[-1]["step"] if evals else None,
        "final_train_loss": statistics.fmean(losses[-10:]) if losses else None,
        "failed_calls": dict(sorted(failures.items())),
        "failed_calls_total": sum(failures.values()),
        "failed_calls_before_first_fault": before_fault,
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "step_time_p95_s": _percentile(step_times, 0.95),
        "stopped_by": stop.get("stopped_by") if stop else None,
    }


def _hard_failures(step: dict[str, Any]) -> int:
    """Failed calls of a step, leaving out slow calls abandoned once enough experts had answered."""
    return sum(int(n) for kind, n in (step.get("failures") or {}).items() if kind not in SOFT_FAILURES)


def recovery_times(run: RunData) -> list[dict[str, Any]]:
    per_trainer = [[s for s in run.steps(name) if "time" in s] for name in run.trainers]
    out = []
    for e in run.events:
        if e.get("action") not in DISRUPTIVE or e.get("cause") == "initial":
            continue
        wall = run.t0 + float(e["t"])
        results: list[float] = []  # per trainer with steps after the event; inf = never normal again
        failed = skipped = 0
        for steps in per_trainer:
            after = [s for s in steps if s["time"] > wall]
            if not after:
                continue
            rec = math.inf
            for s in after:
                if s.get("skipped") or _hard_failures(s):
                    failed += _hard_failures(s)
                    skipped += bool(s.get("skipped"))
                    continue
                rec = s["time"] - wall
                break
            results.append(rec)
        worst = max(results) if results else None
        item: dict[str, Any] = {"t": e["t"], "node": e.get("node"), "action": e["action"], "cause": e.get("cause"),
                                "recovery_s": None if worst is None or math.isinf(worst) else round(worst, 3),
                                "failed_calls": failed, "skipped_steps": skipped}
        if worst is not None and math.isinf(worst):
            item["recovered"] = False
        out.append(item)
    return out


def summarize(run: RunData) -> dict[str, Any]:
    scenario = run.run.get("scenario", {})
    k = int(run.run.get("min_experts") or 1)
    cuts, series = alive_series(run)
    min_alive = [min(vals) for vals in zip(*series.values(), strict=False)] if series else []
    per_layer_total = int(run.run.get("experts_per_layer") or 0)
    trainers = {name: trainer_summary(run, name) for name in run.trainers}
    recoveries = recovery_times(run)
    rec_values = [r["recovery_s"] for r in recoveries if r["recovery_s"] is not None]
    total = {
        "steps": sum(t["steps"] for t in trainers.values()),
        "skipped": sum(t["skipped"] for t in trainers.values()),
        "tokens_per_s": sum(t["tokens_per_s"] for t in trainers.values()),
        "failed_calls": dict(sum((Counter(t["failed_calls"]) for t in trainers.values()), Counter())),
        "final_val_loss": _mean_or_none(t["final_val_loss"] for t in trainers.values()),
    }
    total["failed_calls_total"] = sum(total["failed_calls"].values())
    total["failed_calls_before_first_fault"] = sum(t["failed_calls_before_first_fault"] for t in trainers.values())
    first_fault = first_fault_time(run)
    states = expert_states_lost(run.swarm)
    return {
        "scenario": scenario.get("name"),
        "seed": run.run.get("seed"),
        "duration_s": round(run.duration, 3),
        "stopped_by": run.run.get("stopped_by"),
        "nodes": len(run.run.get("nodes", [])),
        "trainers": trainers,
        "total": total,
        "events": dict(Counter(e["action"] for e in run.events if e.get("cause") != "initial"
                               and e.get("action") in (*DISRUPTIVE, *RETURNS))),
        "event_errors": [e for e in run.events if e.get("action") == "error"],
        "first_fault_s": None if first_fault is None else round(first_fault - run.t0, 3),
        "k": k,
        "time_below_k_s": round(time_below(cuts, min_alive, k), 3) if min_alive else None,
        "time_some_expert_missing_s": round(time_below(cuts, min_alive, per_layer_total), 3)
        if min_alive and per_layer_total else None,
        "min_experts_alive": min(min_alive) if min_alive else None,
        "recovery": recoveries,
        "recovery_median_s": statistics.median(rec_values) if rec_values else None,
        "recovery_max_s": max(rec_values) if rec_values else None,
        "unrecovered_events": sum(1 for r in recoveries if r.get("recovered") is False),
        "nodes_behind_nat": sum(1 for n in run.run.get("nodes", []) if n.get("behind_nat")),
        "routes": routes_summary(run),
        "expert_states_lost": None if states is None else len(states.uids),
        "expert_states_lost_uids": None if states is None else sorted(states.uids, key=states.uids.__getitem__),
        "experts_at_risk_max": None if states is None else max(states.at_risk, default=0),
        "machine": machine_summary(run),
    }


def machine_summary(run: RunData) -> dict[str, Any]:
    """Was the machine itself the bottleneck? Load average and CPU steal over the run (coordinator samples),
    and the nodes' CPU budget: enforced or not, and how long they sat throttled at it."""
    loads = [float(r["load"]) for r in run.swarm if isinstance(r.get("load"), int | float)]
    steals = [float(r["steal_pct"]) for r in run.swarm if isinstance(r.get("steal_pct"), int | float)]
    cpus = run.run.get("cpus") or os.cpu_count() or 1
    load_mean = statistics.fmean(loads) if loads else None
    throttled = run.run.get("cpu_throttled_s") or {}
    return {
        "cpus": cpus,
        "load_mean": load_mean,
        "load_max": max(loads, default=None),
        "steal_pct_max": max(steals, default=None),
        "cpu_bound": load_mean is not None and load_mean > cpus,
        "cpu_budget": run.run.get("cpu_budget"),
        "throttled_s_total": round(sum(throttled.values()), 3) if throttled else None,
    }


def routes_summary(run: RunData) -> dict[str, Any] | None:
    """Direct vs relayed expert endpoints as the trainers measured them (their ``endpoints`` records at stop):
    endpoints, answers, failures and the answer-weighted mean forward latency per route; None without records."""
    routes: dict[str, dict[str, float]] = {}
    for name in run.trainers:
        records = [r for r in run.trainers[name] if r.get("type") == "endpoints"]
        if not records:
            continue
        for endpoint, stats in (records[-1].get("endpoints") or {}).items():
            route = routes.setdefault("relayed" if "@" in endpoint else "direct",
                                      {"endpoints": 0, "answers": 0, "failures": 0, "_weighted_rtt": 0.0})
            answers = int(stats.get("answers") or 0)
            route["endpoints"] += 1
            route["answers"] += answers
            route["failures"] += int(stats.get("failures") or 0)
            if stats.get("rtt") is not None:
                route["_weighted_rtt"] += float(stats["rtt"]) * answers
    if not routes:
        return None
    for route in routes.values():
        weighted = route.pop("_weighted_rtt")
        route["forward_rtt_ms"] = round(1000 * weighted / route["answers"], 2) if route["answers"] else None
    return routes


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.fmean(xs) if xs else None


# ----- table and plot ----------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = []
    names = list(summary["trainers"])
    header = ("", *names)
    fields = [("steps", "steps", ""), ("skipped steps", "skipped", ""), ("tokens/s", "tokens_per_s", ",.0f"),
              ("final val loss", "final_val_loss", ".4f"), ("first val loss", "first_val_loss", ".4f"),
              ("failed calls", "failed_calls_total", ""),
              ("failed before 1st fault", "failed_calls_before_first_fault", ""),
              ("step time p50 (s)", "step_time_median_s", ".3f"),
              ("step time p95 (s)", "step_time_p95_s", ".3f")]
    for label, key, spec in fields:
        rows.append((label, *(_fmt(summary["trainers"][n][key], spec) for n in names)))
    kinds = summary["total"]["failed_calls"]
    lines = [f"scenario {summary['scenario']} (seed {summary['seed']}): {summary['nodes']} nodes, "
             f"{len(names)} trainer(s), {summary['duration_s']:.0f} s"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                  strict=True))))
    events = ", ".join(f"{n} {a}" for a, n in sorted(summary["events"].items())) or "none"
    lines.append(f"events: {events}")
    first = summary.get("first_fault_s")
    when = "none injected" if first is None else f"t={first:.1f} s"
    lines.append(f"failed calls before the first injected fault ({when}): "
                 f"{summary['total'].get('failed_calls_before_first_fault', 0)}")
    if kinds:
        lines.append("failed calls by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    lines.append(f"time with fewer than k={summary['k']} experts alive in a layer: "
                 f"{_fmt(summary['time_below_k_s'], '.1f')} s; with some expert missing: "
                 f"{_fmt(summary['time_some_expert_missing_s'], '.1f')} s")
    if summary["recovery"]:
        lines.append(f"recovery after disruptive events: median {_fmt(summary['recovery_median_s'], '.2f')} s, "
                     f"max {_fmt(summary['recovery_max_s'], '.2f')} s, not recovered {summary['unrecovered_events']}"
                     f" of {len(summary['recovery'])}")
    routes = summary.get("routes")
    if summary.get("nodes_behind_nat") or (routes and "relayed" in routes):
        parts = [f"{route} {r['endpoints']} endpoint(s), {r['answers']} answers, {r['failures']} failures, forward "
                 f"{_fmt(r['forward_rtt_ms'])} ms" for route, r in sorted((routes or {}).items())]
        lines.append(f"nodes behind NAT (served through a relay): {summary.get('nodes_behind_nat', 0)}; "
                     + ("; ".join(parts) or "no endpoint statistics"))
    if summary.get("expert_states_lost") is not None:
        lost_uids = summary.get("expert_states_lost_uids") or []
        shown = ", ".join(lost_uids[:8]) + (", ..." if len(lost_uids) > 8 else "")
        lines.append(f"expert states lost (served again from under half its steps, or without a holder until the "
                     f"end): "
                     f"{summary['expert_states_lost']}" + (f" ({shown})" if shown else "")
                     + f"; most experts at risk (one holder) at once: {summary.get('experts_at_risk_max')}")
    machine = summary.get("machine") or {}
    if machine.get("load_mean") is not None:
        budget = machine.get("cpu_budget") or {}
        text = (f"machine: load {machine['load_mean']:.1f} mean / {machine['load_max']:.1f} max on {machine['cpus']} "
                f"CPUs" + (" -- CPU-bound: the machine, not the swarm, set the pace" if machine["cpu_bound"] else ""))
        if machine.get("steal_pct_max"):
            text += f"; CPU steal up to {machine['steal_pct_max']:.1f} %"
        if budget.get("node_cores") is not None:
            throttled = machine["throttled_s_total"] or 0
            text += (f"; node CPU budget {budget['node_cores']:g} cores "
                     + (f"(enforced, cgroup {budget['cgroup']}; throttled {throttled:.0f} s in all)"
                        if budget.get("enforced") else f"NOT enforced: {budget.get('why_not')}"))
        lines.append(text)
    if summary["event_errors"]:
        lines.append(f"WARNING: {len(summary['event_errors'])} event(s) could not be applied (see events.jsonl)")
    return "\n".join(lines)


def plot(run: RunData, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    states = expert_states_lost(run.swarm)
    fig, axes = plt.subplots(4 + (states is not None), 1, figsize=(11, 12 + 2.5 * (states is not None)), sharex=True,
                             constrained_layout=True)
    ax_loss, ax_alive, ax_step, ax_fail = axes[:4]
    if states is not None:
        ax_lost = axes[4]
        ax_lost.step(states.times, states.lost, where="post", color="tab:red", lw=1.5,
                     label="expert states lost (cumulative)")
        ax_lost.plot(states.times, states.at_risk, lw=0.8, color="tab:orange", alpha=0.8,
                     label="experts at risk (one live holder)")
        ax_lost.set_ylabel("experts")
        ax_lost.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_lost.set_title(f"expert states lost: {len(states.uids)} (served again from under half its steps, or "
                          "without a holder until the end)", fontsize=9)
    t0 = run.t0
    for name in run.trainers:
        steps = run.steps(name)
        clean = [s for s in steps if not s.get("skipped") and s.get("loss") is not None]
        ax_loss.plot([s["time"] - t0 for s in clean], [s["loss"] for s in clean], lw=0.8, alpha=0.7,
                     label=f"{name} train loss")
        evals = [e for e in run.evals(name) if e.get("val_loss") is not None]
        if evals:
            ax_loss.plot([e["time"] - t0 for e in evals], [e["val_loss"] for e in evals], "o-", ms=4,
                         label=f"{name} val loss")
        ax_step.plot([s["time"] - t0 for s in steps if not s.get("skipped")],
                     [s.get("step_time") for s in steps if not s.get("skipped")], ".", ms=3, label=f"{name} step")
        skipped = [s["time"] - t0 for s in steps if s.get("skipped")]
        if skipped:
            ax_step.plot(skipped, [0] * len(skipped), "x", color="tab:red", label=f"{name} skipped")
        cum: Counter[str] = Counter()
        by_kind: dict[str, tuple[list[float], list[int]]] = {}
        for s in steps:
            cum.update(s.get("failures") or {})
            for kind in cum:
                xs, ys = by_kind.setdefault(kind, ([0.0], [0]))
                xs.append(s["time"] - t0)
                ys.append(cum[kind])
        for kind, (xs, ys) in sorted(by_kind.items()):
            ax_fail.step(xs, ys, where="post", label=f"{name} {kind}")
        seen = [(s["time"] - t0, s["experts_alive"]) for s in steps if s.get("experts_alive") is not None]
        if seen:
            ax_alive.plot(*zip(*seen, strict=True), lw=0.8, alpha=0.7, label=f"found by {name}")
    cuts, series = alive_series(run)
    if series:
        total = [sum(vals) for vals in zip(*series.values(), strict=True)]
        ax_alive.step(cuts, total, where="post", color="k", lw=1.5, label="served: a replica up and reachable (truth)")
    if run.swarm:
        ax_alive.plot([s["t"] for s in run.swarm], [s.get("experts_alive", 0) for s in run.swarm], "--", lw=0.8,
                      label="announced in the DHT (coordinator)")
    below = summary.get("time_below_k_s")
    ax_alive.set_title(f"experts of all layers; time with fewer than k={summary['k']} served in a layer: "
                       f"{_fmt(below, '.1f')} s", fontsize=9)
    labelled: set[str] = set()
    for e in run.events:
        action = e.get("action")
        if action not in _EVENT_STYLE or e.get("cause") == "initial":
            continue
        colour, style = _EVENT_STYLE[action]
        for ax in axes:
            ax.axvline(float(e["t"]), color=colour, ls=style, lw=0.8, alpha=0.6,
                       label=(f"{action}" if action not in labelled and ax is ax_loss else None))
        labelled.add(action)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"dmoe simulate: {summary['scenario']} (seed {summary['seed']}, {summary['nodes']} nodes)")
    ax_alive.set_ylabel("experts alive")
    ax_step.set_ylabel("step time (s)")
    ax_fail.set_ylabel("failed calls (cumulative)")
    axes[-1].set_xlabel("time since start (s)")
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper right", ncol=2)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str | Path, *, plot_png: bool = True) -> dict[str, Any]:
    """Build summary.json and report.png in ``out_dir``; return the summary."""
    run = load_run(out_dir)
    summary = summarize(run)
    out = Path(out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    if plot_png:
        plot(run, summary, out / "report.png")
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)
