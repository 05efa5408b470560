"""Ramp: how many real expert nodes one ``dmoe simulate`` run holds on this machine, and at what cost.

Design notes. For each swarm size N (``--nodes``, default 8 16 32 64) the benchmark runs
``dmoe simulate`` on a no-fault scenario (scenarios/baseline.toml by default) with ``--nodes N`` and
``--steps`` (a few trainer steps), as a child process; nodes are started by simulate's own launcher.
The per-node CPU budget (``cpu_cores``) is left out of the scenario: it exists to make churn
comparisons fair, while here N x 0.2 cores would exceed the machine at N >= 10 and only measure
throttling. Start-up time runs from the first node's launch to the trainer's launch, which simulate
does only once every node printed its ready line (bound, announced). While the trainer runs, every
node's process tree (the node and its p2pd) is sampled from /proc: RSS, and PSS, which splits shared
pages (libtorch's text, mostly) fairly between the processes mapping them, so PSS x N is what the
swarm really costs in memory. The trainer counts as ok when it logged ``--steps`` non-skipped steps
and simulate exited 0. Outputs: a table on stdout and ramp.json in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from swarm_probe import REPO, kind_of, read_processes, scenario_variant, start_simulate, stop_simulate, tree_usage

from dmoe.sim.launcher import descendants


def _pss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def trainer_steps(out: Path) -> int:
    n = 0
    for path in (out / "trainers").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            n += rec.get("type") == "step" and not rec.get("skipped")
    return n


def run_size(n: int, scenario: Path, out: Path, steps: int, timeout_s: float) -> dict[str, Any]:
    sim_out = out / f"n{n}"
    proc = start_simulate(scenario, sim_out, ["--nodes", str(n), "--steps", str(steps), "--startup-timeout",
                                              str(timeout_s), "--duration", str(timeout_s)],
                          out / f"simulate-n{n}.log")
    t_start = time.monotonic()
    t_first_node = t_trainer = None
    best: dict[int, dict[str, float]] = {}  # node pid -> its largest sample
    node_names: set[str] = set()
    deadline = t_start + 2 * timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            procs = read_processes(sim_out)
            names = {r["name"] for r in procs}
            if t_first_node is None and any(kind_of(x) == "node" for x in names):
                t_first_node = time.monotonic()
            if t_trainer is None and any(kind_of(x) == "trainer" for x in names):
                t_trainer = time.monotonic()
            if t_trainer is not None:  # the whole swarm is up: sample it while the trainer works
                for r in procs:
                    if kind_of(r["name"]) != "node":
                        continue
                    use = tree_usage(int(r["pid"]))
                    if use is None:
                        continue
                    use["pss_mb"] = _pss_mb(int(r["pid"]))
                    node_names.add(r["name"])
                    if use["rss_mb"] >= best.get(int(r["pid"]), {}).get("rss_mb", 0.0):
                        best[int(r["pid"])] = use
            time.sleep(1.0)
    finally:
        code = stop_simulate(proc)
    rss = [u["rss_mb"] for u in best.values()]
    pss = [u["pss_mb"] for u in best.values()]
    done = trainer_steps(sim_out)
    return {
        "nodes": n, "nodes_sampled": len(node_names),
        "rss_per_node_median_mb": round(statistics.median(rss), 1) if rss else None,
        "rss_per_node_max_mb": round(max(rss), 1) if rss else None,
        "pss_per_node_median_mb": round(statistics.median(pss), 1) if pss else None,
        "pss_total_mb": round(sum(pss), 1) if pss else None,
        "procs_per_node": statistics.median(u["procs"] for u in best.values()) if best else None,
        "startup_s": round(t_trainer - t_first_node, 1) if t_trainer and t_first_node else None,
        "trainer_steps": done, "trainer_ok": code == 0 and done >= steps, "simulate_exit": code,
        "wall_s": round(time.monotonic() - t_start, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32, 64], help="swarm sizes (default 8 16 32 64)")
    p.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "baseline.toml")
    p.add_argument("--steps", type=int, default=5, help="trainer steps that must succeed at each size (default 5)")
    p.add_argument("--timeout", type=float, default=600.0, help="start-up timeout per size, s (default 600)")
    p.add_argument("--out", type=Path, default=Path("runs/ramp"))
    args = p.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # simulate's layout gives each node a share of layers x grid x replicas expert slots; with baseline's
    # 2 x 4x4 x 2 = 64 slots, nodes beyond 32 got no expert at all (an empty --experts, exit 2), so the
    # grid grows to 8x8 (256 slots) whenever the base scenario's would leave nodes empty
    scenario = scenario_variant(args.scenario.resolve(), out / "ramp-scenario.toml", drop_keys=("cpu_cores",),
                                set_keys={"grid": "[8, 8]"} if max(args.nodes) > 32 else None)
    rows: list[dict[str, Any]] = []
    for n in args.nodes:
        rows.append(run_size(n, scenario, out, args.steps, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
        (out / "ramp.json").write_text(json.dumps({"scenario": str(args.scenario), "rows": rows}, indent=2) + "\n")
    print(f"\n{'nodes':>5} {'RSS/node med':>12} {'max':>7} {'PSS/node med':>12} {'PSS total':>10} "
          f"{'start-up':>9} {'steps':>5} {'trainer':>7}")
    for r in rows:
        def f(v: float | None, spec: str = ".0f") -> str:
            return format(v, spec) if v is not None else "-"
        print(f"{r['nodes']:>5} {f(r['rss_per_node_median_mb']):>10}MB {f(r['rss_per_node_max_mb']):>5}MB "
              f"{f(r['pss_per_node_median_mb']):>10}MB {f(r['pss_total_mb']):>8}MB {f(r['startup_s'], '.1f'):>8}s "
              f"{r['trainer_steps']:>5} {'ok' if r['trainer_ok'] else 'FAIL':>7}")
    print(f"wrote {out / 'ramp.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
