"""What churn costs, and how big a swarm this machine can simulate.

1. **Baseline vs churn.** Runs ``dmoe simulate`` with the same seed, model and duration on
   ``scenarios/baseline.toml`` (fast links, no faults) and ``scenarios/churn.toml`` (the same fast
   links plus heavy-tailed churn: crashes, leaves, freezes), and prints tokens/s and validation
   loss side by side. The bar: churn keeps at least 90 % of baseline tokens/s. The same pair on
   home links, ``home-broadband.toml`` (no faults) and ``home-churn.toml`` (the same churn), shows
   what churn costs a swarm of home lines, where latency and upload rate already slow each step.
2. **Ramp.** One swarm (coordinator + nodes behind emulated links, like ``dmoe simulate``) grows by
   ``--ramp-step`` nodes at a time; after each step every node must serve, the coordinator must see
   all of them in the DHT, and a trainer must complete a few steps through them. The largest size
   that passed is the number of nodes this machine holds in one simulation. The ramp stops at the
   first failure, when available memory falls under ``--min-free-gb``, or at ``--ramp-max``.

Prints tables and writes ``churn_bench.json`` in ``--out``. Run from the repository root:
``.venv/bin/python benchmarks/churn.py`` (about 15-25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("baseline", "churn", "home-broadband", "home-churn")


def load_average() -> float:
    return os.getloadavg()[0]


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# ----- 1. baseline vs churn ----------------------------------------------------------------------
def run_scenario(name: str, *, seed: int, duration: float | None, out: Path, path: Path | None = None
                 ) -> dict[str, Any]:
    """Run scenario ``name`` (``scenarios/NAME.toml``, or the file ``path``) and read back its summary."""
    scenario = path or ROOT / "scenarios" / f"{name}.toml"
    cmd = [sys.executable, "-m", "dmoe", "simulate", str(scenario), "--seed", str(seed),
           "--out", str(out), "--no-progress", "--no-plot"]
    if duration is not None:
        cmd += ["--duration", str(duration)]
    print(f"running {name} ...", flush=True)
    load_before = load_average()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    evals = {}
    for line in (out / "trainers" / "trainer0.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "eval" and rec.get("val_loss") is not None:
            evals[rec["step"]] = rec["val_loss"]
    tr = summary["trainers"]["trainer0"]
    departures = sum(summary["events"].get(k, 0) for k in ("crash", "leave", "freeze"))
    return {
        "scenario": name, "wall_s": time.monotonic() - t0, "load_avg_before": load_before,
        "steps": tr["steps"], "skipped": tr["skipped"], "tokens_per_s": tr["tokens_per_s"],
        "final_val_loss": tr["final_val_loss"], "final_val_step": tr["final_val_step"],
        "failed_calls": tr["failed_calls"], "step_time_median_s": tr["step_time_median_s"],
        "departures": departures, "events": summary["events"], "time_below_k_s": summary["time_below_k_s"],
        "recovery_median_s": summary["recovery_median_s"], "unrecovered_events": summary["unrecovered_events"],
        "evals": evals, "expert_states_lost": summary.get("expert_states_lost"),
        "expert_states_lost_uids": summary.get("expert_states_lost_uids"),
    }


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario over several rounds: means of the rates and losses, sums of the counts."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[-1])
    for key in ("tokens_per_s", "step_time_median_s", "final_val_loss"):
        values = [r[key] for r in runs if r[key] is not None]
        merged[key] = sum(values) / len(values) if values else None
    for key in ("steps", "skipped", "departures"):
        merged[key] = sum(r[key] for r in runs) / len(runs)
    merged["failed_calls"] = {k: sum(r["failed_calls"].get(k, 0) for r in runs) / len(runs)
                              for k in {k for r in runs for k in r["failed_calls"]}}
    common = set.intersection(*(set(r["evals"]) for r in runs))
    merged["evals"] = {step: sum(r["evals"][step] for r in runs) / len(runs) for step in common}
    merged["final_val_step"] = "mean"  # rounds end at different steps
    merged["rounds"] = len(runs)
    return merged


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["scenario"]: r for r in results}
    common = set.intersection(*(set(r["evals"]) for r in results)) if results else set()
    common_step = max(common) if common else None
    base = by["baseline"]["tokens_per_s"] or float("nan")
    home = by["home-broadband"]["tokens_per_s"] or float("nan")
    churn = by["churn"]["tokens_per_s"]
    home_churn = by["home-churn"]["tokens_per_s"]
    print()
    header = ["scenario", "steps", "skipped", "tokens/s", "vs baseline", "final val loss (step)",
              f"val loss @ step {common_step}", "failed calls", "departures", "step p50 (s)"]
    rows = []
    for r in results:
        rows.append([
            r["scenario"], f"{r['steps']:.0f}", f"{r['skipped']:.0f}", f"{r['tokens_per_s']:,.0f}",
            f"{100 * r['tokens_per_s'] / base:.0f} %",
            f"{r['final_val_loss']:.4f} ({r['final_val_step']})" if r["final_val_loss"] is not None else "-",
            f"{r['evals'][common_step]:.4f}" if common_step is not None else "-",
            f"{sum(r['failed_calls'].values()):.0f}", f"{r['departures']:.0f}",
            f"{r['step_time_median_s']:.3f}" if r["step_time_median_s"] is not None else "-",
        ])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                          strict=True))))
    verdict = {
        "churn_vs_baseline_tokens": churn / base,
        "home_churn_vs_home_broadband_tokens": home_churn / home,
        "home_broadband_vs_baseline_tokens": home / base,
        "bar": 0.90,
        "passes": churn / base >= 0.90,
        "passes_on_home_links": home_churn / home >= 0.90,
        "common_eval_step": common_step,
    }
    print(f"\nchurn keeps {100 * verdict['churn_vs_baseline_tokens']:.0f} % of baseline tokens/s "
          f"({'PASS' if verdict['passes'] else 'FAIL'} at 90 %); on home links, home-churn keeps "
          f"{100 * verdict['home_churn_vs_home_broadband_tokens']:.0f} % of home-broadband "
          f"({'PASS' if verdict['passes_on_home_links'] else 'FAIL'}); home links alone: "
          f"{100 * verdict['home_broadband_vs_baseline_tokens']:.0f} % of baseline")
    return verdict


# ----- 2. ramp ------------------------------------------------------------------------------------
async def ramp(*, out: Path, step: int, maximum: int, min_free_gb: float, timeout: float,
               train_steps: int) -> dict[str, Any]:
    import concurrent.futures

    from dmoe.sim.launcher import DmoeProcess, ProcessFailed
    from dmoe.sim.links import LinkEmulator, LinkModel

    # every process start/stop blocks a worker thread: enough of them that stops never queue behind starts
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(2 * maximum + 16))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[DmoeProcess] = []
    links: list[LinkEmulator] = []
    stages: list[dict[str, Any]] = []
    held = 0
    reason = f"reached --ramp-max {maximum}"
    coordinator = DmoeProcess("coordinator", ["--identity", out / "coordinator.key", "--host-maddrs",
                                              "/ip4/127.0.0.1/tcp/0", "--http-host", "127.0.0.1", "--http-port", "0",
                                              "--peers-file", "none", "--refresh-period", "3",
                                              "--relay-host", "127.0.0.1", "--relay-port", "0"],
                              name="coordinator", log_path=logs / "coordinator.log")
    procs.append(coordinator.start())
    try:
        ready = await asyncio.to_thread(coordinator.wait_ready, timeout)
        peers, http = ready["dht"], ready["http"]
        # every node serves 2 experts of each layer of a 2-layer 4x4 grid, round robin: the grid fills at
        # 8 nodes, and larger swarms add replicas
        n = 0
        while n < maximum:
            if mem_available_gb() < min_free_gb:
                reason = f"available memory under {min_free_gb} GB"
                break
            t0 = time.monotonic()
            batch = []
            for _ in range(min(step, maximum - n)):
                link = await LinkEmulator(LinkModel(up_mbit=20, down_mbit=100, latency_ms=20), name=f"link{n}").start()
                cells = [((2 * n + k) % 16) for k in range(2)]
                experts = ",".join(f"layer{layer}.ffn.{c // 4}.{c % 4}" for layer in range(2) for c in cells)
                proc = DmoeProcess("node", [
                    "--experts", experts, "--hidden-dim", "64", "--seed", "0", "--host", "127.0.0.1", "--port", "0",
                    "--announce-host", "127.0.0.1", "--announce-port", link.listen_port, "--reachability", "direct",
                    "--initial-peers", *peers,
                    "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--announce-ttl", "20",
                ], name=f"node{n}", log_path=logs / f"node{n}.log")
                links.append(link)
                procs.append(proc.start())
                batch.append((proc, link))
                n += 1
            try:
                readies = await asyncio.gather(*(asyncio.to_thread(p.wait_ready, timeout) for p, _ in batch))
            except ProcessFailed as e:
                reason = f"a node did not start at {n} nodes: {str(e).splitlines()[0]}"
                break
            for (_, link), r in zip(batch, readies, strict=True):
                host, _, port = r["grpc"].rpartition(":")
                link.set_target((host, int(port)))
            startup = time.monotonic() - t0
            seen = await _wait_seen(http, n, timeout=60)
            alive = sum(1 for p in procs if p.alive())
            stage = {"nodes": n, "startup_s": round(startup, 1), "coordinator_sees": seen, "processes_alive": alive,
                     "mem_available_gb": round(mem_available_gb(), 2), "load_avg": round(load_average(), 2)}
            if seen < n or alive < n + 1:
                stage["ok"] = False
                stages.append(stage)
                reason = f"at {n} nodes the coordinator saw {seen} and {alive - 1} node processes were alive"
                break
            train = await asyncio.to_thread(_train_through, peers, out / f"train{n}.jsonl", train_steps, timeout,
                                            logs / f"trainer{n}.log")
            stage.update(train)
            stage["ok"] = train["steps"] >= train_steps
            stages.append(stage)
            print(f"  ramp: {n} nodes up in {startup:.0f} s, coordinator sees {seen}, trainer "
                  f"{train['steps']}/{train_steps} steps at {train['tokens_per_s']:,.0f} tokens/s, "
                  f"{stage['mem_available_gb']:.1f} GB free, load {stage['load_avg']:.1f}", flush=True)
            if not stage["ok"]:
                reason = f"at {n} nodes a trainer completed only {train['steps']} of {train_steps} steps"
                break
            held = n
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop, 20) for p in reversed(procs)), return_exceptions=True)
        for link in links:
            await link.close()
    return {"max_nodes": held, "stopped_because": reason, "stages": stages}


async def _wait_seen(http: str, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            status = await asyncio.to_thread(_get_json, f"http://{http}/status")
            seen = len(status.get("nodes", []))
        except Exception:  # noqa: BLE001 - retry until the deadline
            pass
        if seen >= n:
            return seen
        await asyncio.sleep(2)
    return seen


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback coordinator
        return json.loads(resp.read())


def _train_through(peers: list[str], log_file: Path, steps: int, timeout: float, log_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dmoe", "train", "--initial-peers", *peers, "--hidden-dim", "64",
           "--block-size", "64", "--batch-size", "8", "--steps", str(steps), "--eval-every", "0",
           "--max-data-mb", "2", "--log-file", str(log_file), "--no-progress", "--startup-timeout", str(timeout),
           "--forward-timeout", "5", "--backward-timeout", "10"]
    log_file.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout + steps * 20)
        except subprocess.TimeoutExpired:
            pass
    records = []
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    stop = next((r for r in records if r.get("type") == "stop"), {})
    return {"steps": int(stop.get("steps", 0)), "tokens_per_s": float(stop.get("tokens_per_s") or 0.0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench-churn", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of every scenario run")
    p.add_argument("--duration", type=float, default=None, help="override the scenarios' duration, s")
    p.add_argument("--skip-compare", action="store_true", help="skip baseline vs churn")
    p.add_argument("--rounds", type=int, default=1, help="repeat the comparison, alternating the order; report means")
    p.add_argument("--skip-ramp", action="store_true", help="skip the node ramp")
    p.add_argument("--ramp-step", type=int, default=8, help="nodes added per ramp stage")
    p.add_argument("--ramp-max", type=int, default=64, help="largest swarm tried")
    p.add_argument("--min-free-gb", type=float, default=2.0, help="stop the ramp under this much available memory")
    p.add_argument("--ramp-train-steps", type=int, default=10, help="trainer steps required at each ramp stage")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds a stage may take to become ready")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "mem_available_gb": round(mem_available_gb(), 1),
                                          "load_avg_start": load_average()}, "seed": args.seed}
    if not args.skip_compare:
        rounds: list[list[dict[str, Any]]] = []
        for r in range(args.rounds):  # alternate the order (ABC, CBA, ...) so slow drift in load cancels out
            order = SCENARIOS if r % 2 == 0 else tuple(reversed(SCENARIOS))
            runs = {name: run_scenario(name, seed=args.seed, duration=args.duration,
                                       out=out / (name if args.rounds == 1 else f"{name}-round{r}"))
                    for name in order}
            rounds.append([runs[name] for name in SCENARIOS])
        result["rounds"] = rounds
        result["scenarios"] = [merge_rounds([rnd[i] for rnd in rounds]) for i in range(len(SCENARIOS))]
        result["verdict"] = compare(result["scenarios"])
    if not args.skip_ramp:
        import uvloop

        print("\nramp: growing one swarm until this machine cannot hold it", flush=True)
        result["ramp"] = uvloop.run(ramp(out=out / "ramp", step=args.ramp_step, maximum=args.ramp_max,
                                         min_free_gb=args.min_free_gb, timeout=args.timeout,
                                         train_steps=args.ramp_train_steps))
        print(f"largest swarm held: {result['ramp']['max_nodes']} nodes (stopped: {result['ramp']['stopped_because']})")
    result["machine"]["load_avg_end"] = load_average()
    (out / "churn_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / 'churn_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
