"""``dmoe simulate`` for real: coordinator, nodes behind emulated links, a trainer, real signals.

Each test runs the real command in a subprocess and then checks, through /proc, that no process
it started (or any member of their process groups, such as hivemind's p2pd daemons) is still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dmoe.sim.report import read_jsonl

pytestmark = pytest.mark.integration  # real processes

SMALL_SWARM = """
name = "{name}"
description = "test: 3 nodes, 1 trainer"
duration_s = {duration}
seed = 1

[swarm]
nodes = 3
replicas = 2
layers = 2
grid = [2, 2]
hidden_dim = 32

[node]
announce_ttl_s = 5
checkpoint_interval_s = 5

[trainer]
batch_size = 4
block_size = 32
eval_every = 10
eval_batches = 2
forward_timeout_s = 3
backward_timeout_s = 5
timeout_after_k_min_s = 0.3
max_data_mb = 1

[links]
up_mbit = 20
down_mbit = 100
latency_ms = 5
"""


def _state(pid: int) -> str | None:
    """The /proc state letter of a process, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def running_in_group(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid`` (the launched process and its helpers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


class TreeWatcher:
    """Samples every descendant of a process while it runs (pid + start time, so a reused pid is not
    mistaken for a leftover); catches helpers in other process groups too, such as hivemind's p2pd."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.3)

    def sample(self) -> None:
        children: dict[int, list[int]] = {}
        stats: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (fields := _stat(int(entry))) is not None:
                stats[int(entry)] = fields
                children.setdefault(int(fields[1]), []).append(int(entry))
        stack = [self.root]
        while stack:
            for child in children.get(stack.pop(), []):
                stack.append(child)
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                self.seen.setdefault((child, stats[child][19]), comm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def still_running(self) -> list[str]:
        left = []
        for (pid, start), comm in self.seen.items():
            fields = _stat(pid)
            if fields is not None and fields[19] == start and fields[0] not in ("Z", "X"):
                left.append(f"{comm} pid {pid}")
        return left


def leftovers(out: Path) -> list[str]:
    procs = read_jsonl(out / "processes.jsonl")
    assert procs, "the run recorded the processes it started"
    left = []
    for p in procs:
        if p["name"] == "reaper":
            if _state(p["pid"]) not in (None, "Z", "X"):
                left.append(f"reaper {p['pid']}")
        else:
            left += [f"{p['name']} pid {pid} (group {p['pid']})" for pid in running_in_group(p["pid"])]
    return left


def wait_for_no_leftovers(out: Path, watcher: TreeWatcher, timeout: float = 20.0) -> list[str]:
    """Processes of the run still alive after ``timeout``: by process group and by process tree."""
    watcher.stop()
    deadline = time.monotonic() + timeout
    while (left := leftovers(out) + watcher.still_running()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1 and (fields := _stat(pid)) is not None:
        pid = int(fields[1])
        if pid == ancestor:
            return True
    return False


def simulate(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dmoe", "simulate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


def wait_for_event(out: Path, proc: subprocess.Popen, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in read_jsonl(out / "events.jsonl"):
            if predicate(rec):
                return rec
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"event not seen in {timeout}s; simulate output:\n{proc.communicate()[0][-3000:]}")


def test_short_simulation_with_a_crash_and_a_freeze(tmp_path):
    scenario = tmp_path / "short.toml"
    scenario.write_text(SMALL_SWARM.format(name="short", duration=40) + """
[[events]]
at_s = 4
action = "crash"
nodes = [2]
duration_s = 4
keep_checkpoint = false

[[events]]
at_s = 12
action = "freeze"
nodes = [1]
duration_s = 4
""")
    out = tmp_path / "run"
    proc = simulate([str(scenario), "--out", str(out), "--no-progress"])
    watcher = TreeWatcher(proc.pid)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert not wait_for_no_leftovers(out, watcher)
    assert any(comm == "p2pd" for comm in watcher.seen.values())  # the watcher did see the helpers

    # the report shows the events...
    events = read_jsonl(out / "events.jsonl")
    applied = [(e["action"], e.get("node")) for e in events if e.get("cause") != "initial"]
    for expected in [("freeze", 1), ("resume", 1), ("crash", 2), ("rejoin", 2), ("ready", 2)]:
        assert expected in applied, applied
    crash = next(e for e in events if e["action"] == "crash")
    assert 4 <= crash["t"] < 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events"]["crash"] == 1 and summary["events"]["freeze"] == 1
    assert (out / "report.png").stat().st_size > 10_000
    assert "scenario short" in output and "failed calls" in output  # the printed table

    # ...and training that went on through them
    run = json.loads((out / "run.json").read_text())
    steps = [r for r in read_jsonl(out / "trainers" / "trainer0.jsonl") if r.get("type") == "step"]
    t0 = run["t0"]
    last_event = max(e["t"] for e in events if e["action"] in ("ready", "resume"))
    after = [s for s in steps if s["time"] - t0 > last_event and not s.get("skipped")]
    assert after, "no completed step after the node came back"
    assert after[-1]["step"] > max((s["step"] for s in steps if s["time"] - t0 < crash["t"]), default=0)
    assert summary["trainers"]["trainer0"]["steps"] == steps[-1]["step"] > 0
    assert len(summary["recovery"]) == 2  # freeze and crash, each with its recovery time (or not recovered)
    # the node lost its checkpoint on purpose: it restarted from scratch
    node2_log = (out / "logs" / "node2.log").read_text()
    assert node2_log.count("start: ") == 2


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_simulator_leaves_no_process_behind(tmp_path, how):
    """Ctrl-C: clean shutdown and a report. SIGKILL of the simulator itself: the reaper still
    resumes and kills everything, including a node frozen at that moment."""
    scenario = tmp_path / "long.toml"
    scenario.write_text(SMALL_SWARM.format(name="long", duration=600) + """
[[events]]
at_s = 1
action = "freeze"
nodes = [0]
duration_s = 500
""")
    out = tmp_path / "run"
    proc = simulate([str(scenario), "--out", str(out), "--no-progress"], start_new_session=True)
    watcher = TreeWatcher(proc.pid)
    try:
        wait_for_event(out, proc, lambda r: r.get("action") == "freeze", timeout=180)
        frozen_pid = next(p["pid"] for p in read_jsonl(out / "processes.jsonl") if p["name"] == "node0")
        time.sleep(0.5)
        watcher.sample()
        frozen_tree = [pid for pid, _ in watcher.seen if _state(pid) is not None
                       and (pid == frozen_pid or _is_descendant(pid, frozen_pid))]
        assert len(frozen_tree) >= 2  # the node and its p2pd daemon...
        assert all(_state(pid) == "T" for pid in frozen_tree)  # ...really stopped, both
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 130, output[-3000:]
            assert (out / "summary.json").exists() and "scenario long" in output
            assert json.loads((out / "run.json").read_text())["stopped_by"] == "interrupted"
        else:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not wait_for_no_leftovers(out, watcher, timeout=30)


def test_a_late_volunteer_joins_with_experts_auto_under_a_cpu_budget(tmp_path):
    """``[swarm] late_nodes`` + a ``join`` event start a fresh ``--experts auto`` node mid-run; ``[node] cpu_cores``
    puts every node under a hard CPU quota, and the run records whether it was enforced."""
    text = SMALL_SWARM.format(name="late", duration=30).replace("nodes = 3\n", "nodes = 3\nlate_nodes = 1\n")
    text = text.replace("[node]\n", "[node]\ncpu_cores = 0.5\n")
    scenario = tmp_path / "late.toml"
    scenario.write_text(text + """
[[events]]
at_s = 5
action = "join"
nodes = [3]
""")
    out = tmp_path / "run"
    proc = simulate([str(scenario), "--out", str(out), "--no-progress", "--no-plot"])
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]
    events = read_jsonl(out / "events.jsonl")
    assert ("join", 3) in [(e["action"], e.get("node")) for e in events]
    assert ("ready", 3) in [(e["action"], e.get("node")) for e in events]
    late_log = (out / "logs" / "node3.log").read_text()
    assert "--experts auto" in late_log and "--experts auto: chose" in late_log, late_log[-2000:]
    run = json.loads((out / "run.json").read_text())
    budget = run["cpu_budget"]
    assert budget["node_cores"] == 0.5 and (budget["enforced"] or budget["why_not"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["cpu_budget"] == budget
    assert "node CPU budget 0.5 cores" in output
