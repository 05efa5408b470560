"""Volunteers who leave for good: what issue 15's mechanisms (replica sync, state transfer, adoption,
hand-off, ``--experts auto``) save, measured on ``scenarios/permanent-churn.toml``.

Three runs of ``dmoe simulate`` with the same seed, model, links and duration:

* **no churn**: the scenario without its events (six nodes, nobody leaves, nobody joins);
* **no churn, no sync**: the same with ``--sync-interval 0``: what replica sync alone does to training;
* **churn, #15 on**: the scenario as shipped: half of the nodes leave for good (two SIGKILLs and one
  SIGTERM, 25 s apart), three fresh ``--experts auto`` nodes join;
* **churn, #15 off**: the same churn with ``--sync-interval 0 --replicas 1 --no-state-transfer``: no
  sync, no adoption of under-replicated experts, no state transfer or hand-off. Fresh nodes still pick
  the unserved experts, and start them from their initial weights, as a volunteer choosing by hand would.

Prints validation loss at the largest evaluation step all runs reached (equal steps), the final one,
tokens/s and the number of expert states lost (``dmoe.sim.report``: an expert with no live holder in two
consecutive coordinator samples). Goal: 0 states lost with #15 on, validation loss within 2 % of no churn.
Writes ``permanent_churn.json`` in ``--out``. About 18 minutes on 2 cores:

    .venv/bin/python benchmarks/permanent_churn.py --out runs/permanent-churn-bench
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from churn import ROOT, run_scenario  # noqa: E402

SCENARIO = ROOT / "scenarios" / "permanent-churn.toml"
OFF_ARGS = '["--sync-interval", "0", "--replicas", "1", "--no-state-transfer", "--placement-interval", "4"]'


def variants(out: Path) -> dict[str, Path]:
    """The three scenario files: as shipped, without events, and with #15's mechanisms switched off."""
    text = SCENARIO.read_text()
    no_churn = text[:text.index("[[events]]")]
    off, n = re.subn(r"^extra_args = \[.*\]$", f"extra_args = {OFF_ARGS}", text, flags=re.MULTILINE)
    if n != 1:
        raise SystemExit(f"{SCENARIO}: expected one [node] extra_args line to switch the mechanisms off")
    no_sync, n = re.subn(r"^extra_args = \[.*\]$", 'extra_args = ["--sync-interval", "0", "--placement-interval", "4"]',
                         no_churn, flags=re.MULTILINE)
    files = {"no churn": no_churn, "no churn, no sync": no_sync, "churn, #15 on": text, "churn, #15 off": off}
    paths = {}
    out.mkdir(parents=True, exist_ok=True)
    for label, body in files.items():
        path = out / f"{label.replace(', ', '-').replace('#', '').replace(' ', '-')}.toml"
        path.write_text(body)
        paths[label] = path
    return paths


def table(results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    common = set.intersection(*(set(r["evals"]) for r in results.values()))
    step = max(common) if common else None
    base = results["no churn"]
    rows = [f"{'run':<18} {'steps':>6} {'skipped':>7} {'tok/s':>8} {'val@' + str(step):>10} {'vs no churn':>11} "
            f"{'final val':>9} {'states lost':>11}"]
    figures: dict[str, Any] = {"equal_step": step}
    for label, r in results.items():
        at = r["evals"].get(step) if step is not None else None
        rel = at / base["evals"][step] - 1 if at is not None and step is not None else None
        lost = r.get("expert_states_lost")
        rows.append(f"{label:<18} {r['steps']:>6} {r['skipped']:>7} {r['tokens_per_s']:>8.0f} "
                    f"{at if at is not None else float('nan'):>10.4f} "
                    f"{rel * 100 if rel is not None else float('nan'):>+10.2f}% "
                    f"{r['final_val_loss'] or float('nan'):>9.4f} {lost if lost is not None else '-':>11}")
        figures[label] = {"val_loss_at_equal_step": at, "vs_no_churn": rel, "states_lost": lost,
                          "lost_uids": r.get("expert_states_lost_uids")}
    return "\n".join(rows), figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "permanent-churn-bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=None, help="override the scenario's duration_s")
    args = parser.parse_args()
    results = {label: run_scenario(label, seed=args.seed, duration=args.duration, out=args.out / path.stem,
                                   path=path)
               for label, path in variants(args.out).items()}
    text, figures = table(results)
    print(text)
    on = figures["churn, #15 on"]
    print(f"\ngoal: 0 states lost with #15 on (got {on['states_lost']}), validation loss within 2 % of no churn "
          f"(got {on['vs_no_churn'] * 100 if on['vs_no_churn'] is not None else float('nan'):+.2f} %)")
    (args.out / "permanent_churn.json").write_text(json.dumps({"runs": results, "figures": figures}, indent=2,
                                                               default=str))
    print(f"wrote {args.out / 'permanent_churn.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
