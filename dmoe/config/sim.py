"""Simulation options: how ``dmoe simulate`` runs a scenario locally and ``dmoe chaos`` drives containers.

What a scenario *is* (swarm, links, churn) lives in its TOML file (``dmoe.sim.scenario``); these
are the options of the programs that run one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmoe.config.coordinator import HTTP_PORT
from dmoe.config.flags import non_negative_float, non_negative_int, option, positive_float


@dataclass(frozen=True)
class SimulationOptions:
    """simulation"""

    out_dir: Path = option(cli=False)
    """where events.jsonl, summary.json, report.png and the processes' logs go"""
    seed: int | None = option(None, parse=int)
    """seed of links, churn and models (default: the scenario's)"""
    startup_timeout_s: float = option(120.0, parse=positive_float, flag="--startup-timeout")
    """seconds a process may take to become ready"""
    progress: bool = option(True, flag="--no-progress")
    """no progress bar"""
    plot: bool = option(True, flag="--no-plot")
    """skip report.png"""
    stop_timeout_s: float = option(30.0, cli=False)
    """seconds a process gets to stop after SIGTERM before SIGKILL"""
    status_period_s: float = option(3.0, cli=False)
    """how often the coordinator's view is sampled, seconds"""
    env: dict[str, str] = option(factory=dict, cli=False)
    """extra environment for every child process"""


@dataclass(frozen=True)
class ChaosOptions:
    """chaos"""

    out_dir: Path = option(Path("/runs"), parse=Path, flag="--out")
    """run directory (shared with the trainers' logs)"""
    project: str | None = option(None)
    """compose project to act on; default: our own container's"""
    service: str = option("node")
    """compose service whose containers are the nodes"""
    nodes: int | None = option(None, parse=int)
    """placement slots the nodes were started with (SWARM_NODES); default: the scenario's"""
    wait_steps: int = option(5, parse=non_negative_int)
    """trainer steps to wait for (in OUT/trainers/*.jsonl) before the clock starts; 0: none"""
    wait_timeout_s: float = option(600.0, parse=positive_float)
    """give up if the swarm is not ready after this many seconds"""
    stop_grace_s: float = option(10.0, parse=non_negative_float)
    """seconds a leaving node gets after SIGTERM before SIGKILL"""
    coordinator_url: str | None = option(f"http://coordinator:{HTTP_PORT}")
    """coordinator to sample into swarm.jsonl; 'none' disables"""
    sample_period_s: float = option(2.0, parse=positive_float)
    """seconds between swarm samples"""
    restore_at_end: bool = option(True, flag="--no-restore")
    """leave nodes down/frozen at the end"""
    ready_timeout_s: float = option(180.0, parse=non_negative_float)
    """after the scenario: seconds to wait for restarted nodes to serve again (for the report)"""
