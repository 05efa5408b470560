"""Does training through remote experts cost model quality? Same model, data and steps, three ways.

    .venv/bin/python benchmarks/quality.py --steps 300 --out runs/bench_quality.json

(a) ``local``: ``dmoe train --local-experts``: every expert in-process, no network at all.
(b) ``nodes``: ``dmoe train`` through two ``dmoe node`` processes on loopback, each serving half
    of every layer's grid (the first grid coordinate 0..g/2-1 on node A, the rest on node B).
(c) ``nodes_kill``: as (b), but node B is SIGKILLed when the trainer passes half of the steps;
    the trainer carries on with node A's experts alone.
(d) ``nodes:CODEC``: as (b), with activations and gradients travelling as ``--compression CODEC``
    (``float16``, ``bfloat16``, ``uniform8``, ``quantile8``). The table gives each run's wire bytes
    per activation row (a 64-row call encoded by ``dmoe.wire.codec``, what every call carries), so
    ``--modes local,nodes,nodes:float16,nodes:uniform8,nodes:quantile8`` compares the codecs.

Every run uses the same seed, so (a) and (b) start from identical weights (nodes build expert
``U`` from ``(--seed, U)`` exactly as the in-process baseline does) and read the same batches;
the in-process experts are optimized like a node's (Adam, per-expert clipping, one step per
backward). Each run is a real ``dmoe train`` process; its JSON-lines log gives the validation
losses (fixed validation windows) and tokens/s (training tokens / wall time of the loop, evals
excluded). Prints a table and writes JSON (--out). Timings depend on the machine and its load;
on one machine the nodes compete with the trainer for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dmoe.sim.launcher import DmoeProcess

MODES = ("local", "nodes", "nodes_kill")  # plus nodes:CODEC


def split_mode(mode: str) -> tuple[str, str]:
    base, _, codec = mode.partition(":")
    return base, codec or "none"


def bytes_per_row(codec: str, hidden: int, rows: int = 64) -> float:
    import torch

    from dmoe.wire.codec import serialize_tensor

    return len(serialize_tensor(torch.randn(rows, hidden), "" if codec == "none" else codec).data) / rows


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(path: Path) -> int:
    return max((r["step"] for r in read_log(path) if r["type"] == "step"), default=0)


def summarize(mode: str, log: Path, *, killed_at: int | None) -> dict[str, Any]:
    records = read_log(log)
    steps = [r for r in records if r["type"] == "step"]
    trained = [r for r in steps if not r["skipped"]]
    evals = [{"step": r["step"], "val_loss": r["val_loss"]} for r in records if r["type"] == "eval"]
    stop = next((r for r in reversed(records) if r["type"] == "stop"), {})
    train_time = sum(r["step_time"] for r in trained)
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in trained)
    failures: dict[str, int] = steps[-1]["failures_total"] if steps else {}
    return {
        "mode": mode,
        "steps": stop.get("steps"),
        "batches": len(steps),
        "skipped": sum(1 for r in steps if r["skipped"]),
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "evals": evals,
        "final_train_loss": trained[-1]["loss"] if trained else None,
        "tokens_per_s": tokens / train_time if train_time else None,
        "loop_seconds": stop.get("elapsed"),
        "failures": failures,
        "killed_at_step": killed_at,
    }


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    base_mode, codec = split_mode(mode)
    grid = [int(g) for g in args.grid_size.split("x")]
    half = grid[0] // 2
    rest = "".join(f".[0:{g}]" for g in grid[1:])
    prefixes = [f"layer{i}.ffn" for i in range(args.n_layer)]
    env = {"OMP_NUM_THREADS": str(args.torch_threads)}
    model = ["--n-layer", str(args.n_layer), "--hidden-dim", str(args.hidden_dim), "--n-head", str(args.n_head),
             "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--grid-size", args.grid_size,
             "--k-best", str(args.k_best), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
             "--eval-batches", str(args.eval_batches), "--seed", str(args.seed), "--no-progress",
             "--torch-threads", str(args.torch_threads), "--compression", codec]
    log = workdir / f"{mode.replace(':', '_')}.jsonl"
    procs: list[DmoeProcess] = []
    killed_at = None
    try:
        if base_mode == "local":
            trainer = DmoeProcess("train", [*model, "--local-experts", "--log-file", str(log)], name=mode,
                                  log_path=workdir / f"{mode}.log", env=env).start()
            procs.append(trainer)
        else:
            node_common = ["--hidden-dim", str(args.hidden_dim), "--seed", str(args.seed), "--host", "127.0.0.1",
                           "--expert-cls", "ffn"]
            experts_a = ",".join(f"{p}.[0:{half}]{rest}" for p in prefixes)
            experts_b = ",".join(f"{p}.[{half}:{grid[0]}]{rest}" for p in prefixes)
            name = mode.replace(":", "_")
            node_a = DmoeProcess("node", ["--experts", experts_a, *node_common], name=f"{name}_node_a",
                                 log_path=workdir / f"{name}_node_a.log", env=env).start()
            procs.append(node_a)
            peers = node_a.wait_ready(120)["dht"]
            node_b = DmoeProcess("node", ["--experts", experts_b, *node_common, "--initial-peers", *peers],
                                 name=f"{name}_node_b", log_path=workdir / f"{name}_node_b.log", env=env).start()
            procs.append(node_b)
            node_b.wait_ready(120)
            trainer = DmoeProcess("train", [*model, "--initial-peers", *peers, "--log-file", str(log)], name=name,
                                  log_path=workdir / f"{name}.log", env=env).start()
            procs.append(trainer)
        trainer.wait_ready(300)
        print(f"  {mode}: training ({trainer.log_path})", flush=True)
        while trainer.alive():
            if base_mode == "nodes_kill" and killed_at is None and last_step(log) >= args.steps // 2:
                procs[1].kill()  # node B: SIGKILL, mid-run
                killed_at = last_step(log)
                print(f"  {mode}: node B killed at step {killed_at}", flush=True)
            time.sleep(0.2)
        if trainer.proc.returncode != 0:
            raise RuntimeError(f"{mode} trainer exited with {trainer.proc.returncode}:\n{trainer.log_tail()}")
    finally:
        for proc in reversed(procs):
            proc.stop(20)
    return {**summarize(mode, log, killed_at=killed_at), "compression": codec,
            "bytes_per_row": None if base_mode == "local" else bytes_per_row(codec, args.hidden_dim)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid-size", default="4x4")
    p.add_argument("--k-best", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1, help="torch/OMP threads of every process")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--out", default="runs/bench_quality.json")
    p.add_argument("--workdir", default=None, help="logs of every process (default: a temp folder)")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    from dmoe.config.client import COMPRESSIONS

    if unknown := {m for m in modes if split_mode(m)[0] not in MODES or split_mode(m)[1] not in COMPRESSIONS}:
        p.error(f"unknown modes: {', '.join(sorted(unknown))} (modes: {', '.join(MODES)}, or nodes:CODEC with a "
                f"CODEC of {', '.join(COMPRESSIONS)})")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dmoe-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"quality benchmark: {args.steps} steps, batch {args.batch_size}x{args.block_size}, "
          f"hidden {args.hidden_dim}, grid {args.grid_size}, k_best {args.k_best}; logs in {workdir}", flush=True)
    results = []
    for mode in modes:
        results.append(run_mode(mode, args, workdir))

    base = next((r for r in results if r["mode"] == "local"), None)
    print()
    print(f"{'run':<16} {'val loss':>9} {'vs local':>9} {'tokens/s':>9} {'steps':>6} {'skipped':>8} "
          f"{'failed calls':>13} {'bytes/row':>10}")
    for r in results:
        rel = ""
        if base and base["val_loss"] and r["val_loss"] is not None:
            r["val_loss_vs_local_percent"] = 100.0 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
            rel = f"{r['val_loss_vs_local_percent']:+.2f}%"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        vl = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        row_bytes = f"{r['bytes_per_row']:,.0f}" if r["bytes_per_row"] else "-"
        print(f"{r['mode']:<16} {vl:>9} {rel:>9} {tps:>9} {r['steps']!s:>6} {r['skipped']:>8} "
              f"{sum(r['failures'].values()):>13} {row_bytes:>10}")
    print()
    for r in results:
        curve = "  ".join(f"{e['step']}:{e['val_loss']:.3f}" for e in r["evals"] if e["val_loss"] is not None)
        print(f"{r['mode']:<16} validation curve  {curve}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "quality", "time": time.time(), "machine": {"platform": platform.platform(),
                                                                   "cpus": os.cpu_count(), "python": sys.version},
        "config": vars(args), "results": results,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
