"""Shared helpers for ramp.py and soak.py: run ``dmoe simulate`` as a child and look at its processes.

Design notes. The benchmarks do not re-implement a launcher: they run ``python -m dmoe simulate`` as
one child process (its own session, killed with the group on exit) and learn which processes the run
started from its ``processes.jsonl`` (name, pid). Every measurement is read from /proc, per process
*tree*: a node's RSS and fds include its children, above all hivemind's p2pd daemon, which runs in a
session of its own but is still the node's descendant. Processes are grouped by kind from their name
(node7 -> node, trainer0 -> trainer, coordinator/bootstrap -> coordinator). Validation loss comes from
the trainer's own JSONL log (records of type ``eval``), the same file the simulate report reads.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dmoe.sim.launcher import descendants

REPO = Path(__file__).resolve().parent.parent


def kind_of(name: str) -> str:
    """node7 -> node, trainer0 -> trainer, coordinator/bootstrap -> coordinator, else the name."""
    base = re.sub(r"\d+$", "", name)
    return "coordinator" if base in ("coordinator", "bootstrap") else base


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def tree_usage(pid: int) -> dict[str, float] | None:
    """RSS (MiB) and open fds of ``pid`` plus all its descendants; None when it is gone."""
    if not alive(pid):
        return None
    pids = [pid, *descendants(pid)]
    return {"rss_mb": sum(_rss_kb(p) for p in pids) / 1024, "fds": float(sum(_fds(p) for p in pids)),
            "procs": float(len(pids))}


def read_processes(out: Path) -> list[dict[str, Any]]:
    """The run's processes.jsonl (latest pid per name wins: a restarted node gets a new pid)."""
    path = out / "processes.jsonl"
    if not path.exists():
        return []
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line
        latest[rec["name"]] = rec
    return list(latest.values())


def val_losses(out: Path) -> list[tuple[float, float]]:
    """(wall time, val_loss) of every eval record the trainers logged so far."""
    res: list[tuple[float, float]] = []
    for path in sorted((out / "trainers").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "eval" and rec.get("val_loss") is not None:
                res.append((float(rec.get("time", 0.0)), float(rec["val_loss"])))
    return res


def start_simulate(scenario: Path, out: Path, extra: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m dmoe simulate SCENARIO --out OUT ...`` in its own session, output to ``log``."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dmoe", "simulate", str(scenario), "--out", str(out), "--no-progress",
           "--no-plot", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)


def stop_simulate(proc: subprocess.Popen[bytes], grace_s: float = 120.0) -> int:
    """SIGINT (simulate then stops the swarm and writes its report), SIGKILL to the group after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def scenario_variant(base: Path, dest: Path, drop_keys: tuple[str, ...] = (),
                     set_keys: dict[str, str] | None = None) -> Path:
    """Copy a scenario TOML, leaving out the keys named in ``drop_keys`` and giving ``set_keys`` new values."""
    lines = []
    for ln in base.read_text().splitlines():
        key = re.match(r"\s*([A-Za-z_]+)\s*=", ln)
        if key and key.group(1) in drop_keys:
            continue
        if key and set_keys and key.group(1) in set_keys:
            ln = f"{key.group(1)} = {set_keys[key.group(1)]}"
        lines.append(ln)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def wait_for(pred: Any, timeout_s: float, period_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period_s)
    return False
