"""Fixed CPU budgets for simulated processes, through the kernel's cgroup CPU controller.

On one small machine a simulated swarm is CPU-bound: when a node departs, the others get its share of
the cores and run faster, so churn can look *cheaper* than no churn. A scenario that sets
``[node] cpu_cores`` (and ``[trainer] cpu_cores``) gives every such process a hard quota of that many
cores (CFS bandwidth: ``quota = cores x period``), so one departure frees nothing for the rest and
comparisons between runs measure the swarm, not the machine.

One group per process, ``dmoe-<launcher pid>/<name>``, under the cgroup v2 root when its ``cpu``
controller is available, else under the v1 ``cpu`` hierarchy. A process is moved into its group right
after it starts, before it spawns anything: its children (a node's p2p daemon, a relay) inherit the
group and share the budget. Groups are removed when the run ends. Without a writable CPU controller
(not root, a container without cgroup access) nothing is limited; ``CpuBudgets.why_not`` says why and
the run records it, so a report never claims budgets that were not enforced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
PERIOD_US = 100_000  # the CFS period: quotas are counted per 100 ms
_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/cpu")


def _writable_root() -> tuple[Path | None, str, str]:
    """(root to create groups under, "v1" | "v2", why none)."""
    controllers = _V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _V2, "v2", ""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, "v1", ""
    return None, "", "no cgroup CPU controller on this machine"


class CpuBudgets:
    def __init__(self) -> None:
        root, self.version, self.why_not = _writable_root()
        self.groups: list[Path] = []
        self.base: Path | None = None
        self.enforced = False  # a process was actually limited (stays True after close, for the record)
        if root is None:
            return
        base = root / f"dmoe-{os.getpid()}"
        try:
            base.mkdir(exist_ok=True)
            if self.version == "v2":  # children need the cpu controller enabled in their parent
                (root / "cgroup.subtree_control").write_text("+cpu")
                (base / "cgroup.subtree_control").write_text("+cpu")
        except OSError as e:
            self.why_not = f"cannot create cgroups under {root} ({e.strerror or e})"
            with contextlib.suppress(OSError):
                base.rmdir()
            return
        self.base = base

    @property
    def available(self) -> bool:
        """Groups can be made here (until ``close``)."""
        return self.base is not None

    def limit(self, name: str, pid: int, cores: float) -> bool:
        """Put process ``pid`` (and what it spawns from now on) under a quota of ``cores`` CPUs."""
        if self.base is None:
            return False
        group = self.base / name
        quota = max(1000, int(cores * PERIOD_US))
        try:
            group.mkdir(exist_ok=True)
            if self.version == "v2":
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            log.warning("could not limit %s to %.2f CPU: %s", name, cores, e.strerror or e)
            return False
        if group not in self.groups:
            self.groups.append(group)
        self.enforced = True
        return True

    def throttled_s(self) -> dict[str, float]:
        """Seconds each process group spent throttled at its quota so far (how often the budget bit)."""
        out = {}
        for group in self.groups:
            with contextlib.suppress(OSError, ValueError):
                stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines() if " " in line)
                if "throttled_usec" in stat:
                    out[group.name] = int(stat["throttled_usec"]) / 1e6
                elif "throttled_time" in stat:  # v1: nanoseconds
                    out[group.name] = int(stat["throttled_time"]) / 1e9
        return out

    def close(self) -> None:
        """Remove the groups (their processes have exited; stragglers go back to the root group)."""
        if self.base is None:
            return
        root = self.base.parent
        for group in [*self.groups, self.base]:
            for _ in range(20):
                try:
                    group.rmdir()
                    break
                except OSError:
                    with contextlib.suppress(OSError):
                        for pid in (group / "cgroup.procs").read_text().split():
                            (root / "cgroup.procs").write_text(pid)
                    time.sleep(0.05)
        self.base = None


class StealMeter:
    """CPU time the hypervisor took from this machine (``steal`` in /proc/stat), percent since the last sample."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            return (fields[7] if len(fields) > 7 else 0), sum(fields)
        return None

    def sample(self) -> float | None:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return round(100.0 * (now[0] - last[0]) / (now[1] - last[1]), 2)
