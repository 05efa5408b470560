"""``dmoe chaos``: play a scenario's churn against the node containers of a docker-compose swarm.

Runs as the compose ``chaos`` service (Docker socket mounted); see ``dmoe.sim.chaos`` for
what each churn action becomes. Exits 0 once the scenario's duration has elapsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from dmoe.config import add_options, make_parser, options_from, positive_float, setup_logging
from dmoe.config.sim import ChaosOptions
from dmoe.sim.chaos import ChaosRunner
from dmoe.sim.docker_api import DockerAPI, socket_from_env
from dmoe.sim.scenario import load_scenario

log = logging.getLogger("dmoe.chaos")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "dmoe chaos",
        "Drive a scenario's churn timeline (crash=kill, leave=SIGTERM, freeze=pause, resume=unpause, rejoin=start, "
        "partition/heal=signals to the node's link emulator) against the node containers of a docker-compose "
        "project through the Docker API, and write run.json + events.jsonl + swarm.jsonl for the report.",
    )
    p.add_argument("scenario", help="scenario TOML file (dmoe.sim.scenario)")
    p.add_argument("--docker-socket", default=None,
                   help="Docker API unix socket; default from DOCKER_HOST, else /var/run/docker.sock")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument("--duration-s", type=positive_float, default=None, help="override the scenario's duration, s")
    add_options(p, ChaosOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.nodes is None and os.environ.get("SWARM_NODES"):
        args.nodes = int(os.environ["SWARM_NODES"])
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    if args.duration_s is not None:
        scenario = replace(scenario, duration_s=args.duration_s)
    api = DockerAPI(args.docker_socket or socket_from_env())
    if not api.ping():
        print(f"dmoe chaos: no Docker daemon answers at {api.socket_path} (mount /var/run/docker.sock)",
              file=sys.stderr)
        return 2
    url = args.coordinator_url
    options = options_from(ChaosOptions, args, coordinator_url=None if url is None or url.lower() == "none" else url)
    try:
        return ChaosRunner(api, scenario, options).run()
    except TimeoutError as e:
        print(f"dmoe chaos: {e}", file=sys.stderr)
        return 1
