"""Shared fixtures: launch real ``dmoe`` processes and always stop them afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmoe.sim.launcher import DmoeProcess

TESTS_DIR = Path(__file__).resolve().parent
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., DmoeProcess]]:
    """``launch("node", [...args], name="n0")`` starts a dmoe subcommand and waits for dmoe-ready.

    Pass ``wait=False`` to skip waiting. Every process is stopped (SIGTERM, then SIGKILL) at teardown.
    Logs go to ``tmp_path/<name>.log``; PYTHONPATH includes tests/ so test-only experts can be loaded.
    """
    started: list[DmoeProcess] = []

    def _launch(subcommand: str, args: list[str], *, name: str, wait: bool = True, timeout: float = 90.0,
                env: dict[str, str] | None = None) -> DmoeProcess:
        pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
        proc = DmoeProcess(subcommand, args, name=name, log_path=tmp_path / f"{name}.log",
                           env={"PYTHONPATH": pythonpath, **(env or {})})
        started.append(proc.start())
        if wait:
            proc.wait_ready(timeout)
        return proc

    yield _launch
    for proc in reversed(started):
        proc.stop(timeout=15)
