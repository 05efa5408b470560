"""``dmoe simulate [SCENARIO.toml]``: run a swarm under churn and home links on this machine, write a report.

The scenario is loaded and fully validated (and its churn timeline computed) before any process
starts, so a bad file costs nothing but a one-line error. Without a scenario the built-in default
runs (a few minutes on 2 cores). ``--print-timeline`` shows what would happen without running it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from dmoe.config import add_options, make_parser, options_from, positive_float, positive_int, setup_logging
from dmoe.config.sim import SimulationOptions
from dmoe.errors import ConfigError
from dmoe.sim.churn import ChurnModel
from dmoe.sim.launcher import ProcessFailed
from dmoe.sim.report import format_table
from dmoe.sim.scenario import Scenario, load_scenario
from dmoe.sim.simulate import builtin_scenario, run_simulation

log = logging.getLogger("dmoe.simulate")

EPILOG = """examples:
  dmoe simulate                                   # built-in default: 4 nodes, churn, home links (~4 min)
  dmoe simulate scenarios/churn.toml --out runs/churn --seed 3
  dmoe simulate scenarios/baseline.toml --duration 60 --print-timeline
output (in --out): events.jsonl, trainers/*.jsonl, swarm.jsonl, run.json, summary.json, report.png, logs/
"""


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("dmoe simulate", "Run a local swarm (bootstrap, nodes behind emulated home links, trainers) "
                    "under a churn scenario and report what training did.", EPILOG)
    p.add_argument("scenario", nargs="?", default=None,
                   help="scenario TOML file (see scenarios/); default: the built-in demo scenario")
    p.add_argument("--out", default=None, help="output directory; default runs/<scenario>-<YYYYmmdd-HHMMSS>")
    p.add_argument("--duration", type=positive_float, default=None, help="override the scenario's duration_s, s")
    p.add_argument("--nodes", type=positive_int, default=None, help="override swarm.nodes")
    p.add_argument("--trainers", type=positive_int, default=None, help="override swarm.trainers")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="override trainer.steps: end when every trainer reached this many steps")
    p.add_argument("--print-timeline", action="store_true", help="print the churn timeline as JSON lines and exit")
    add_options(p, SimulationOptions)
    return p


def _override(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """Apply command-line overrides by re-validating the scenario as a dict (same checks as the file)."""
    from dmoe.sim.scenario import scenario_from_dict

    if args.duration is None and args.nodes is None and args.trainers is None and args.steps is None:
        return scenario
    data = _as_toml_dict(scenario)
    if args.duration is not None:
        data["duration_s"] = args.duration
        data["events"] = [e for e in data.get("events", []) if e["at_s"] <= args.duration]
    if args.nodes is not None:
        data["swarm"]["nodes"] = args.nodes
        data["swarm"]["replicas"] = min(data["swarm"]["replicas"], args.nodes)
    if args.trainers is not None:
        data["swarm"]["trainers"] = args.trainers
    if args.steps is not None:
        data["trainer"]["steps"] = args.steps
    return replace(scenario_from_dict(data, source=f"{scenario.source} (with command-line overrides)"),
                   source=scenario.source)


def _as_toml_dict(scenario: Scenario) -> dict:
    """The scenario as the dict its TOML would parse to (None values dropped)."""
    data = scenario.to_dict()
    data.pop("source", None)

    def drop_none(v: object) -> object:
        if isinstance(v, dict):
            return {k: drop_none(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [drop_none(x) for x in v]
        return v

    data = drop_none(data)  # type: ignore[assignment]
    for ev in data.get("events", []):
        if not ev.get("link"):
            ev.pop("link", None)
        else:
            ev.update(ev.pop("link"))
    return data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        scenario = load_scenario(args.scenario) if args.scenario else builtin_scenario()
        scenario = _override(scenario, args)
    except ConfigError as e:
        print(f"dmoe simulate: {e}", file=sys.stderr)
        return 2
    if args.print_timeline:
        timeline = ChurnModel(scenario, args.seed).timeline()
        for i, link in enumerate(timeline.links):
            print(json.dumps({"t": 0, "node": i, "action": "link", "cause": "initial", "link": link.to_dict()}))
        for event in timeline.events:
            print(json.dumps(event.to_dict()))
        for skipped in timeline.skipped:
            print(json.dumps({"skipped": skipped}))
        return 0
    out = Path(args.out or f"runs/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    options = options_from(SimulationOptions, args, out_dir=out)
    log.info("scenario %s (%s): %d nodes, %d trainer(s), %.0f s; output in %s", scenario.name, scenario.source,
             scenario.swarm.nodes, scenario.swarm.trainers, scenario.duration_s, out)
    try:
        summary = run_simulation(scenario, options)
    except ProcessFailed as e:
        print(f"dmoe simulate: a process failed to start: {e}", file=sys.stderr)
        return 1
    if summary is None:
        print("dmoe simulate: interrupted before training started; no report", file=sys.stderr)
        return 130
    print(format_table(summary))
    print(f"report: {out / 'summary.json'}, {out / 'report.png'}, {out / 'events.jsonl'}")
    return 130 if summary.get("stopped_by") == "interrupted" else 0
