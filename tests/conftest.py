"""Shared fixtures: launch real ``dmoe`` processes and always stop them afterwards; keep fast tests fast.

Tests come in three kinds, told apart by markers (``make test-fast`` runs the first only):

* unmarked: fast, in this process only (in-process gRPC servers on loopback are fine);
* ``integration``: real processes (dmoe subcommands, hivemind's p2pd, headless Chromium);
* ``docker``: the docker-compose swarm (needs a Docker engine).

An unmarked test that starts a process fails with a message saying to mark it, so the fast
subset cannot silently grow slow.
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmoe.sim.launcher import DmoeProcess

TESTS_DIR = Path(__file__).resolve().parent
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
PROCESS_MARKERS = ("integration", "docker")


class FastTestStartedAProcess(RuntimeError):
    """An unmarked (fast) test started a process; mark it ``integration``."""


# every way a test process starts another one: subprocess (and asyncio's default loop, which uses
# it), asyncio's entry points (uvloop spawns through libuv, past Popen), multiprocessing
_SPAWNERS = [
    (subprocess.Popen, "_execute_child"),
    (asyncio.subprocess, "create_subprocess_exec"),
    (asyncio.subprocess, "create_subprocess_shell"),
    (asyncio, "create_subprocess_exec"),
    (asyncio, "create_subprocess_shell"),
    (multiprocessing.process.BaseProcess, "start"),
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Refuse process creation in unmarked tests, their fixtures included."""
    if any(item.get_closest_marker(m) for m in PROCESS_MARKERS):
        yield
        return

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise FastTestStartedAProcess(f"{item.nodeid} starts a process: mark it @pytest.mark.integration")

    saved = [(owner, name, getattr(owner, name)) for owner, name in _SPAWNERS]
    for owner, name, _ in saved:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., DmoeProcess]]:
    """``launch("node", [...args], name="n0")`` starts a dmoe subcommand and waits for dmoe-ready.

    Pass ``wait=False`` to skip waiting, ``netns="NAME"`` to run it inside a network namespace. Every
    process is stopped (SIGTERM, then SIGKILL) at teardown.
    Logs go to ``tmp_path/<name>.log``; PYTHONPATH includes tests/ so test-only experts can be loaded.
    """
    started: list[DmoeProcess] = []

    def _launch(subcommand: str, args: list[str], *, name: str, wait: bool = True, timeout: float = 90.0,
                env: dict[str, str] | None = None, netns: str | None = None) -> DmoeProcess:
        pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
        proc = DmoeProcess(subcommand, args, name=name, log_path=tmp_path / f"{name}.log",
                           env={"PYTHONPATH": pythonpath, **(env or {})}, netns=netns)
        started.append(proc.start())
        if wait:
            proc.wait_ready(timeout)
        return proc

    yield _launch
    for proc in reversed(started):
        proc.stop(timeout=15)
