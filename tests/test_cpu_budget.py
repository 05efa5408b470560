"""A scenario's per-node CPU budget (``dmoe.sim.cpu_budget``) holds a real busy process to its quota."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dmoe.sim.cpu_budget import CpuBudgets, StealMeter

pytestmark = pytest.mark.integration  # a real process


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks


def test_a_busy_process_gets_no_more_than_its_cpu_budget():
    budgets = CpuBudgets()
    if not budgets.available:
        pytest.skip(f"no cgroup CPU controller to test against: {budgets.why_not}")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert budgets.limit("node0", spin.pid, 0.2)
        time.sleep(0.3)  # let the quota period settle
        before, t0 = cpu_seconds(spin.pid), time.monotonic()
        time.sleep(2.0)
        used = (cpu_seconds(spin.pid) - before) / (time.monotonic() - t0)
        print(f"a spinning process limited to 0.2 CPU used {used:.2f} CPU (cgroup {budgets.version})")
        assert used < 0.3
        assert budgets.throttled_s().get("node0", 0) > 0.5  # it sat at its quota most of the time
    finally:
        spin.kill()
        spin.wait()
        budgets.close()
    assert budgets.base is None


def test_steal_meter_reads_a_percentage_or_nothing():
    meter = StealMeter()
    time.sleep(0.1)
    value = meter.sample()
    assert value is None or 0.0 <= value <= 100.0
