"""What a model run says: per-step figures summarized, the invariants, and a report PNG.

Step time, failed calls and skipped steps are computed as ``dmoe simulate``'s report computes
them from trainers' step records, so a real run and a model run of one scenario compare line by
line (``dmoe model --compare RUN_DIR``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dmoe.sim.model.run import ModelOptions, RunResult
from dmoe.sim.scenario import Scenario


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(result: RunResult, scenario: Scenario, options: ModelOptions) -> dict[str, Any]:
    steps = result.steps
    done = [r for r in steps if not r.skipped]
    failed: Counter[str] = Counter()
    for r in steps:
        failed.update(r.failed)
    last = result.samples[-1] if result.samples else {}
    sizes = {k: max((s.get(k, 0) for s in result.samples), default=0)
             for k in ("root_entries", "root_bytes", "cell_entries_max", "cell_bytes_max", "nodes_entries",
                       "nodes_bytes")}
    inv = result.invariants
    inv.chosen_not_alive = sum(r.chosen_not_alive for r in steps)
    return {
        "scenario": scenario.name,
        "nodes": result.nodes,
        "experts": result.experts,
        "trainers": options.trainers if options.trainers is not None else scenario.swarm.trainers,
        "duration_s": options.duration_s,
        "wall_s": round(result.wall_s, 1),
        "steps": len(steps),
        "skipped": len(steps) - len(done),
        "skipped_share": (len(steps) - len(done)) / len(steps) if steps else None,
        "step_s_p50": _pct([r.step_s for r in done], 50),
        "step_s_p95": _pct([r.step_s for r in done], 95),
        "search_s_p50": _pct([r.search_s for r in steps], 50),
        "failed_calls": sum(failed.values()),
        "failed_by_kind": dict(failed),
        "failed_per_step": sum(failed.values()) / len(steps) if steps else None,
        "short_step_share": sum(1 for r in steps if r.short_tokens) / len(steps) if steps else None,
        "lookups_per_step": float(np.mean([r.lookups for r in steps])) if steps else None,
        "dht_bytes_per_step": float(np.mean([r.dht_bytes for r in steps])) if steps else None,
        "reroutes": sum(r.reroutes for r in steps),
        "records_max": sizes,
        "dht_lookups_total": last.get("dht_lookups"),
        "dht_bytes_total": last.get("dht_bytes"),
        # everything but the trainers' steps: the nodes' announce rounds and withdrawals, mostly
        "node_dht_bytes_per_node_min": ((last.get("dht_bytes", 0) - sum(r.dht_bytes for r in steps))
                                        / result.nodes / (options.duration_s / 60)) if result.nodes else None,
        "announces": dict(result.announces),
        "churn_events": dict(result.events),
        "invariants": {**{k: v for k, v in inv.__dict__.items()}, "ok": inv.ok},
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(summary: dict[str, Any]) -> str:
    s, r = summary, summary["records_max"]
    rows = [
        ("nodes / experts / trainers", f"{s['nodes']} / {s['experts']} / {s['trainers']}"),
        ("virtual time / wall time", f"{s['duration_s']:.0f} s / {s['wall_s']:.1f} s"),
        ("steps (skipped)", f"{s['steps']} ({s['skipped']}, {_fmt(s['skipped_share'], '.1%')})"),
        ("step time p50 / p95", f"{_fmt(s['step_s_p50'], '.3f')} s / {_fmt(s['step_s_p95'], '.3f')} s"),
        ("search time p50", f"{_fmt(s['search_s_p50'], '.3f')} s"),
        ("failed calls (per step)", f"{s['failed_calls']} ({_fmt(s['failed_per_step'], '.2f')}) "
                                    f"{s['failed_by_kind'] or ''}"),
        ("steps with < k experts for a token", _fmt(s["short_step_share"], ".1%")),
        ("DHT lookups / bytes per step", f"{_fmt(s['lookups_per_step'], '.1f')} / "
                                         f"{_fmt(s['dht_bytes_per_step'], ',.0f')} B"),
        ("nodes' own DHT traffic", f"{_fmt(s['node_dht_bytes_per_node_min'], ',.0f')} B per node-minute"),
        ("largest root record", f"{r['root_entries']} entries, {r['root_bytes']:,} B"),
        ("largest level-1 record", f"{r['cell_entries_max']} entries, {r['cell_bytes_max']:,} B"),
        ("_dmoe.nodes largest shard", f"{r['nodes_entries']} entries, {r['nodes_bytes']:,} B"),
        ("invariants", "ok" if s["invariants"]["ok"] else f"VIOLATED {s['invariants']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(result: RunResult, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    steps = result.steps
    t = [r.t for r in steps]
    axes[0][0].scatter(t, [r.step_s for r in steps], s=3, c=["red" if r.skipped else "C0" for r in steps])
    axes[0][0].set(title="step time (red: skipped)", xlabel="virtual s", ylabel="s")
    axes[0][1].scatter(t, [r.lookups for r in steps], s=3)
    axes[0][1].set(title="DHT lookups per step", xlabel="virtual s")
    st = [s["t"] for s in result.samples]
    axes[1][0].plot(st, [s.get("root_bytes", 0) / 1e3 for s in result.samples], label="root record")
    axes[1][0].plot(st, [s.get("cell_bytes_max", 0) / 1e3 for s in result.samples], label="largest level-1 record")
    axes[1][0].plot(st, [s.get("nodes_bytes", 0) / 1e3 for s in result.samples], label="_dmoe.nodes (largest shard)")
    axes[1][0].set(title="shared DHT record sizes", xlabel="virtual s", ylabel="kB")
    axes[1][0].legend(loc="center right")
    axes[1][1].plot(st, [s["nodes_up"] for s in result.samples])
    axes[1][1].set(title="nodes up", xlabel="virtual s")
    fig.suptitle(f"dmoe model: {summary['scenario']}, {summary['nodes']} nodes, {summary['trainers']} trainers")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: RunResult, out: Path, scenario: Scenario, options: ModelOptions) -> dict[str, Any]:
    """steps.jsonl, samples.jsonl and summary.json under ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "steps.jsonl", "w") as f:
        for r in result.steps:
            f.write(json.dumps(r.to_dict()) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for s in result.samples:
            f.write(json.dumps(s) + "\n")
    summary = summarize(result, scenario, options)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
