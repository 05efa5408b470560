"""Soak: a real swarm under churn for ``--minutes``; RSS and open fds of every process, per kind, over time.

Design notes. The swarm is ``dmoe simulate`` with a churn scenario (default scenarios/churn.toml),
run as a child with ``--duration`` set to the soak's length; nothing here launches nodes itself.
Once per ``--interval`` (60 s) every live process the run started (its processes.jsonl) is sampled
from /proc *with its descendants* (a node's p2pd counts as the node's): RSS in MiB and the number of
entries in /proc/PID/fd. Per kind (node, trainer, coordinator) a sample holds the median and max
per process and the sum; the trainer's validation loss is read from its JSONL log.

Growth is judged after a warm-up (``--warmup-minutes``, default 5: imports, first checkpoints,
DHT tables filling up): per kind, the median of the last two samples over the median of the first
two after warm-up. Churn replaces node processes, so a node's figures are per live process (a
fresh node is as heavy as a warmed-up one), while the trainer and coordinator live the whole run
and their growth is a leak if anything is. Goal (issue #17): RSS growth < 10 %, no fd growth,
loss still falling. Outputs: a table on stdout, soak.json and soak.png in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from swarm_probe import REPO, kind_of, read_processes, start_simulate, stop_simulate, tree_usage, val_losses

KINDS = ("node", "trainer", "coordinator")


def sample(out: Path, t: float) -> dict[str, Any]:
    per_kind: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for rec in read_processes(out):
        kind = kind_of(rec["name"])
        if kind not in per_kind:
            continue
        use = tree_usage(int(rec["pid"]))
        if use is not None:
            per_kind[kind].append(use)
    row: dict[str, Any] = {"t_min": round(t / 60, 2)}
    for kind, uses in per_kind.items():
        if not uses:
            row[kind] = None
            continue
        rss = [u["rss_mb"] for u in uses]
        fds = [u["fds"] for u in uses]
        row[kind] = {"n": len(uses), "rss_med_mb": round(statistics.median(rss), 1), "rss_max_mb": round(max(rss), 1),
                     "rss_sum_mb": round(sum(rss), 1), "fds_med": statistics.median(fds), "fds_max": max(fds),
                     "fds_sum": sum(fds)}
    losses = val_losses(out)
    row["val_loss"] = losses[-1][1] if losses else None
    return row


def growth(rows: list[dict[str, Any]], kind: str, key: str, warmup_min: float) -> float | None:
    """Relative growth of ``key`` from the first two samples after warm-up to the last two."""
    vals = [(r["t_min"], r[kind][key]) for r in rows if r.get(kind)]
    after = [v for t, v in vals if t >= warmup_min]
    if len(after) < 3:
        return None
    first, last = statistics.median(after[:2]), statistics.median(after[-2:])
    return (last - first) / first if first else None


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_fd, ax_loss) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for kind in KINDS:
        pts = [(r["t_min"], r[kind]) for r in rows if r.get(kind)]
        if not pts:
            continue
        ax_rss.plot([t for t, _ in pts], [k["rss_med_mb"] for _, k in pts], "o-", label=f"{kind} (median)")
        ax_fd.plot([t for t, _ in pts], [k["fds_med"] for _, k in pts], "o-", label=f"{kind} (median)")
    loss = [(r["t_min"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    ax_loss.plot([t for t, _ in loss], [v for _, v in loss], "o-", color="k")
    ax_rss.set_ylabel("RSS per process tree, MiB")
    ax_fd.set_ylabel("open fds per process tree")
    ax_loss.set_ylabel("trainer val loss")
    ax_loss.set_xlabel("minutes")
    for ax in (ax_rss, ax_fd):
        ax.legend()
    fig.suptitle("dmoe soak: RSS, fds (with children) and validation loss under churn")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the soak (default 30)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples (default 60)")
    p.add_argument("--warmup-minutes", type=float, default=5.0, help="growth is measured after this (default 5)")
    p.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "churn.toml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = p.parse_args()

    out = args.out.resolve()
    sim_out = out / "sim"
    out.mkdir(parents=True, exist_ok=True)
    # the swarm runs a little longer than the soak so the last sample still sees it at full size
    proc = start_simulate(args.scenario.resolve(), sim_out,
                          ["--seed", str(args.seed), "--duration", str(args.minutes * 60 + args.interval)],
                          out / "simulate.log")
    rows: list[dict[str, Any]] = []
    try:
        while proc.poll() is None and not any((sim_out / "trainers").glob("*.jsonl")):
            time.sleep(1)
        t0 = time.monotonic()  # the swarm is up once the trainer logs
        while proc.poll() is None:
            now = time.monotonic() - t0
            rows.append(sample(sim_out, now))
            print(json.dumps(rows[-1]), flush=True)
            if now >= args.minutes * 60:
                break
            time.sleep(max(0.0, args.interval * len(rows) - (time.monotonic() - t0)))
    finally:
        code = stop_simulate(proc)
    losses = val_losses(sim_out)
    result = {
        "scenario": str(args.scenario), "minutes": args.minutes, "interval_s": args.interval,
        "warmup_minutes": args.warmup_minutes, "simulate_exit": code, "samples": rows,
        "growth": {kind: {"rss": growth(rows, kind, "rss_med_mb", args.warmup_minutes),
                          "fds": growth(rows, kind, "fds_med", args.warmup_minutes)} for kind in KINDS},
        "val_loss_first": losses[0][1] if losses else None, "val_loss_last": losses[-1][1] if losses else None,
        "val_loss_min": min(v for _, v in losses) if losses else None,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        plot(rows, out / "soak.png")
    print(f"\n{'min':>5} " + " ".join(f"{k + ' rss/fds':>22}" for k in KINDS) + f" {'val_loss':>9}")
    for r in rows:
        cells = [f"{r[k]['rss_med_mb']:>8.1f}MiB {r[k]['fds_med']:>5.0f} n={r[k]['n']:<3}" if r.get(k) else f"{'-':>22}"
                 for k in KINDS]
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{r['t_min']:>5.1f} " + " ".join(cells) + f" {loss:>9}")
    for kind, g in result["growth"].items():
        fmt = [f"{v * 100:+.1f} %" if v is not None else "n/a" for v in (g["rss"], g["fds"])]
        print(f"{kind:<12} RSS growth after warm-up {fmt[0]:>9}   fd growth {fmt[1]:>9}")
    print(f"val loss: first {result['val_loss_first']}, last {result['val_loss_last']}, min {result['val_loss_min']}")
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
