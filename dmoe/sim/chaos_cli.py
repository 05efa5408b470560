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
from pathlib import Path

from dmoe.config import make_parser, non_negative_float, positive_float, setup_logging
from dmoe.errors import ConfigError
from dmoe.sim.chaos import ChaosOptions, ChaosRunner
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
    p.add_argument("--out", default="/runs", help="run directory (shared with the trainers' logs)")
    p.add_argument("--docker-socket", default=None,
                   help="Docker API unix socket; default from DOCKER_HOST, else /var/run/docker.sock")
    p.add_argument("--project", default=None, help="compose project to act on; default: our own container's")
    p.add_argument("--service", default="node", help="compose service whose containers are the nodes")
    p.add_argument("--nodes", type=int, default=None,
                   help="placement slots the nodes were started with (SWARM_NODES); default: the scenario's")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument("--duration-s", type=positive_float, default=None, help="override the scenario's duration, s")
    p.add_argument("--wait-steps", type=int, default=5,
                   help="trainer steps to wait for (in OUT/trainers/*.jsonl) before the clock starts; 0: none")
    p.add_argument("--wait-timeout-s", type=positive_float, default=600.0,
                   help="give up if the swarm is not ready after this many seconds")
    p.add_argument("--stop-grace-s", type=non_negative_float, default=10.0,
                   help="seconds a leaving node gets after SIGTERM before SIGKILL")
    p.add_argument("--coordinator-url", default="http://coordinator:8470",
                   help="coordinator to sample into swarm.jsonl; 'none' disables")
    p.add_argument("--sample-period-s", type=positive_float, default=2.0, help="seconds between swarm samples")
    p.add_argument("--ready-timeout-s", type=non_negative_float, default=180.0,
                   help="after the scenario: seconds to wait for restarted nodes to serve again (for the report)")
    p.add_argument("--no-restore", action="store_true", help="leave nodes down/frozen at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.wait_steps < 0:
        raise ConfigError(f"--wait-steps must be >= 0, got {args.wait_steps}")
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
    options = ChaosOptions(
        out_dir=Path(args.out), project=args.project, service=args.service, nodes=args.nodes,
        wait_steps=args.wait_steps, wait_timeout_s=args.wait_timeout_s, stop_grace_s=args.stop_grace_s,
        coordinator_url=None if args.coordinator_url.lower() == "none" else args.coordinator_url,
        sample_period_s=args.sample_period_s, restore_at_end=not args.no_restore,
        ready_timeout_s=args.ready_timeout_s,
    )
    try:
        return ChaosRunner(api, scenario, options).run()
    except TimeoutError as e:
        print(f"dmoe chaos: {e}", file=sys.stderr)
        return 1
