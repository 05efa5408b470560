#!/usr/bin/env python3
"""``make compose-demo``: a dmoe swarm as containers under churn, then a report, then teardown.

1. Prepares Docker (``scripts/docker_env.py``: a private ``dockerd``, an offline-built image).
2. ``compose up`` with the scenario (default ``docker/scenarios/compose.toml``: 3 nodes, 1 trainer,
   3 minutes of random churn plus a scheduled crash, freeze and partition).
3. Waits while the chaos service plays the churn against the node containers (progress bar).
4. Writes the same report ``dmoe simulate`` writes, from the same files: ``run.json``,
   ``events.jsonl``, ``trainers/*.jsonl``, ``swarm.jsonl`` -> ``summary.json`` + ``report.png``,
   plus every container's log in ``logs/``; prints the summary table.
5. ``compose down -v``: no container, network or volume is left behind (also on Ctrl-C or error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docker_env import REPO, DockerEnv, DockerEnvError, log  # noqa: E402

from dmoe.sim.docker_api import DockerAPI, DockerAPIError  # noqa: E402
from dmoe.sim.report import format_table, write_report  # noqa: E402
from dmoe.sim.scenario import load_scenario  # noqa: E402

PROJECT_LABEL = "com.docker.compose.project"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compose_demo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", default=str(REPO / "docker" / "scenarios" / "compose.toml"),
                   help="scenario TOML (dmoe.sim.scenario) the swarm and the chaos service follow")
    p.add_argument("--out", default=str(REPO / "runs" / "compose-demo"), help="run directory (emptied first)")
    p.add_argument("--nodes", type=int, default=None, help="node containers; default: the scenario's swarm.nodes")
    p.add_argument("--project", default="dmoedemo", help="compose project name")
    p.add_argument("--monitoring", action="store_true",
                   help="also start Prometheus and Grafana (their images must be pullable or present)")
    return p.parse_args(argv)


def compose(denv: DockerEnv, env: dict[str, str], *args: str, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*denv.compose, "-f", str(REPO / "docker-compose.yml"), *args], cwd=REPO,
                          env={**denv.run_env(), **env}, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise DockerEnvError(f"compose {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def save_logs(api: DockerAPI, project: str, out: Path) -> None:
    (out / "logs").mkdir(exist_ok=True)
    for c in api.containers(labels={PROJECT_LABEL: project}):
        try:
            (out / "logs" / f"{c.name}.log").write_text(api.logs(c.id))
        except DockerAPIError as e:
            log(f"no logs for {c.name}: {e}")


def wait_for_chaos(api: DockerAPI, project: str, out: Path, duration_s: float) -> None:
    """Until the chaos container exits: a bar for the swarm start, then one for the scenario's clock."""
    chaos = next(c for c in api.containers(labels={PROJECT_LABEL: project, "com.docker.compose.service": "chaos"}))
    t0: float | None = None
    bar: Any = tqdm(desc="starting swarm (nodes up, trainer stepping)", unit="s", bar_format="{desc}: {elapsed}")
    while True:
        state = api.inspect(chaos.id)["State"]
        if state["Status"] in ("exited", "dead"):
            bar.close()
            if state["ExitCode"] != 0:
                raise DockerEnvError(f"chaos exited with code {state['ExitCode']}:\n{api.logs(chaos.id, tail=20)}")
            return
        if t0 is None and (out / "run.json").exists():
            t0 = float(json.loads((out / "run.json").read_text())["t0"])
            bar.close()
            bar = tqdm(total=int(duration_s), desc="churn", unit="s")
        if t0 is not None:
            bar.n = min(int(duration_s), int(time.time() - t0))
            bar.set_postfix_str(f"{sum(1 for _ in (out / 'events.jsonl').open())} events", refresh=False)
        bar.refresh()
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenario_path = Path(args.scenario).resolve()
    scenario = load_scenario(scenario_path)  # a bad scenario fails here, before anything starts
    nodes = args.nodes or scenario.swarm.nodes
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(scenario_path, out / "scenario.toml")
    env = {"COMPOSE_PROJECT_NAME": args.project, "DMOE_RUN_DIR": str(out), "SWARM_SCENARIO": "/runs/scenario.toml",
           "SWARM_NODES": str(nodes), "DMOE_COORDINATOR_PUBLISH": os.environ.get("DMOE_COORDINATOR_PUBLISH",
                                                                                  "127.0.0.1:")}
    profile = ["--profile", "monitoring"] if args.monitoring else []
    try:
        with DockerEnv() as denv:
            api = DockerAPI(denv.env["DOCKER_HOST"][len("unix://"):])
            try:
                log(f"compose up: coordinator, {nodes} nodes, {scenario.swarm.trainers} trainer(s), chaos "
                    f"({scenario.name}, {scenario.duration_s:.0f}s)")
                compose(denv, env, *profile, "up", "-d", "--no-build", "--scale", f"node={nodes}",
                        "--scale", f"trainer={scenario.swarm.trainers}")
                port = compose(denv, env, "port", "coordinator", "8470", check=False).stdout.strip()
                if port:
                    log(f"coordinator page: http://{port}/ (while the demo runs)")
                wait_for_chaos(api, args.project, out, scenario.duration_s)
            finally:
                save_logs(api, args.project, out)
                compose(denv, env, *profile, "down", "-v", "--remove-orphans", "-t", "5", check=False)
                log("swarm torn down")
    except DockerEnvError as e:
        print(f"compose_demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = write_report(out)
    print(format_table(summary))
    print(f"\nreport: {out / 'report.png'}\nsummary: {out / 'summary.json'}\nevents: {out / 'events.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
