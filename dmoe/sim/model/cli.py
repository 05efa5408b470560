"""``dmoe model``: run the discrete-event model of a swarm (``dmoe.sim.model``) and write a report.

``dmoe model --nodes 10000 --out DIR`` runs the built-in internet swarm (``internet.toml``: home
links, Weibull sessions, 30 % behind NAT) at that size; any ``dmoe simulate`` scenario file runs
too, so one scenario can be run both ways and compared (``--compare`` a ``dmoe simulate`` output).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

from dmoe.config import make_parser, non_negative_float, positive_float, positive_int, setup_logging
from dmoe.errors import ConfigError
from dmoe.sim.model.run import ModelOptions, ModelRun, measure_service_cost
from dmoe.sim.model.summary import format_table, plot, write
from dmoe.sim.scenario import MAX_MODEL_NODES, Scenario, load_scenario, scenario_from_dict

_DEFAULTS = ModelOptions()
EPILOG = """examples:
  dmoe model --nodes 10000 --out runs/model-10k          # the internet swarm at 10,000 nodes
  dmoe model scenarios/home-churn.toml --nodes 32 --out runs/m32 --compare runs/sim32
output (in --out): steps.jsonl (one line per trainer step), samples.jsonl (record sizes, nodes up),
summary.json, report.png
"""


def builtin() -> Scenario:
    text = resources.files("dmoe.sim.model").joinpath("internet.toml")
    with resources.as_file(text) as path:
        return load_scenario(path, max_nodes=MAX_MODEL_NODES)


def auto_grid(nodes: int, layers: int, replicas: int, dims: int, experts_per_node: float = 2.0) -> list[int]:
    """A grid per layer with about ``experts_per_node`` experts per node (at least 2 cells per dimension)."""
    per_layer = max(4.0, nodes * experts_per_node / (layers * replicas))
    return [max(2, round(per_layer ** (1 / dims)))] * dims


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("dmoe model", "Model a whole swarm (thousands of nodes) on a virtual clock, with dmoe's own "
                    "search, replica choice, ban, reroute and announce code; write a report.", EPILOG)
    p.add_argument("scenario", nargs="?", default=None, help="scenario TOML (as for dmoe simulate); "
                   "default: the built-in internet swarm")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--nodes", type=positive_int, default=None, help="override swarm.nodes")
    p.add_argument("--grid", default=None, help="'auto' (about two experts per node; the default with --nodes) "
                   "or cells per dimension, e.g. 64,64")
    p.add_argument("--trainers", type=positive_int, default=None, help="override swarm.trainers")
    p.add_argument("--nat-share", type=non_negative_float, default=None, help="override swarm.nat_share (0..1)")
    p.add_argument("--duration", type=positive_float, default=None, help="virtual seconds (default: the scenario's)")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument("--tokens-per-step", type=positive_int, default=None,
                   help="tokens per step and layer (default: the scenario's batch_size x block_size)")
    p.add_argument("--trainer-compute-ms", type=non_negative_float, default=_DEFAULTS.trainer_compute_ms,
                   help="a trainer's own forward+backward per step, ms")
    p.add_argument("--per-call-ms", type=non_negative_float, default=_DEFAULTS.per_call_ms,
                   help="a node's fixed CPU cost per call (RPC, decoding, batching), ms of one core; calibrate it "
                        "against a dmoe simulate run with --compare")
    p.add_argument("--dht-rtt-ms", type=positive_float, default=None,
                   help="fixed time per DHT hop, ms (dmoe simulate's DHT runs on loopback); default: from links")
    p.add_argument("--compare", default=None, help="a dmoe simulate output directory: print real vs model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no report.png")
    return p


def _scenario(args: argparse.Namespace) -> Scenario:
    scenario = load_scenario(args.scenario, max_nodes=MAX_MODEL_NODES) if args.scenario else builtin()
    if args.nodes is None and args.grid is None and args.trainers is None and args.nat_share is None:
        return scenario
    from dmoe.sim.cli import _as_toml_dict

    data = _as_toml_dict(scenario)
    swarm = data["swarm"]
    if args.nodes is not None:
        swarm["nodes"] = args.nodes
        swarm["replicas"] = min(swarm["replicas"], args.nodes)
    grid = args.grid or ("auto" if args.nodes is not None and args.scenario is None else None)
    if grid == "auto":
        swarm["grid"] = auto_grid(swarm["nodes"], swarm["layers"], swarm["replicas"], len(swarm["grid"]))
    elif grid is not None:
        try:
            swarm["grid"] = [int(g) for g in grid.split(",")]
        except ValueError:
            raise ConfigError(f"--grid must be 'auto' or integers like 64,64, got {grid!r}") from None
    if args.trainers is not None:
        swarm["trainers"] = args.trainers
    if args.nat_share is not None:
        swarm["nat_share"] = args.nat_share
    return replace(scenario_from_dict(data, source=f"{scenario.source} (with command-line overrides)",
                                      max_nodes=MAX_MODEL_NODES),
                   source=scenario.source)


def compare(model: dict, run_dir: Path) -> str:
    """Real (a ``dmoe simulate`` summary, its trainers pooled) vs model, for the figures both compute."""
    real = json.loads((run_dir / "summary.json").read_text())
    trainers = list(real["trainers"].values())
    first = trainers[0] if trainers else {}
    rows = [("step time p50, s", first.get("step_time_median_s"), model["step_s_p50"]),
            ("step time p95, s", first.get("step_time_p95_s"), model["step_s_p95"]),
            ("steps", sum(t["batches"] for t in trainers), model["steps"]),
            ("skipped steps", sum(t["skipped"] for t in trainers), model["skipped"]),
            ("failed calls", sum(t["failed_calls_total"] for t in trainers), model["failed_calls"])]
    out = [f"{'':<18} {'real':>10} {'model':>10} {'model/real':>10}",
           "(step times of the first trainer; counts summed over trainers)"]
    for name, r, m in rows:
        ratio = f"{m / r:.2f}" if isinstance(r, int | float) and r and m is not None else "-"
        rs = "-" if r is None else (f"{r:.3f}" if isinstance(r, float) else str(r))
        ms = "-" if m is None else (f"{m:.3f}" if isinstance(m, float) else str(m))
        out.append(f"{name:<18} {rs:>10} {ms:>10} {ratio:>10}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        scenario = _scenario(args)
    except ConfigError as e:
        print(f"dmoe model: {e}", file=sys.stderr)
        return 2
    options = ModelOptions(duration_s=args.duration or scenario.duration_s, trainers=args.trainers,
                           tokens_per_step=args.tokens_per_step, trainer_compute_ms=args.trainer_compute_ms,
                           dht_rtt_ms=args.dht_rtt_ms, seed=args.seed, per_call_ms=args.per_call_ms)
    cost = measure_service_cost(scenario.swarm.expert_cls, scenario.swarm.hidden_dim, options.per_call_ms)
    print(f"dmoe model: {scenario.name}, {scenario.swarm.total_nodes} nodes, grid {list(scenario.swarm.grid)} x "
          f"{scenario.swarm.layers} layers, {options.duration_s:.0f} virtual s; expert cost on this CPU "
          f"{cost.per_row['forward'] * 1e6:.1f}/{cost.per_row['backward'] * 1e6:.1f} us per row (fwd/bwd)",
          file=sys.stderr)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=int(math.ceil(options.duration_s + options.warmup_s)), unit="s", desc="model", leave=False)

    def progress(t: float) -> None:
        if bar is not None:
            bar.update(max(0, int(t) - bar.n))

    result = ModelRun(scenario, options, cost, progress).run()
    if bar is not None:
        bar.close()
    out = Path(args.out)
    summary = write(result, out, scenario, options)
    if not args.no_plot:
        plot(result, summary, out / "report.png")
    print(format_table(summary))
    if args.compare:
        print(compare(summary, Path(args.compare)))
    print(f"report: {out / 'summary.json'}" + ("" if args.no_plot else f", {out / 'report.png'}"))
    return 0 if summary["invariants"]["ok"] else 1
