"""Launch ``dmoe`` subcommands as real OS processes and control them with real signals.

Used by the simulator, tests and benchmarks. Each child runs in its own session (process group),
so a signal to the group reaches the dmoe process and whatever it spawned there. Children get
SIGTERM if the launcher dies (``PR_SET_PDEATHSIG``), and ``stop_all`` is registered at exit, so
nothing is left behind.

Freeze and resume act on the whole process *tree*, not only the group: hivemind's p2pd daemon
(the node's DHT and libp2p endpoint) runs in a session of its own (see ``dmoe.dht.access``), so a
group-only SIGSTOP left the "frozen" node's DHT answering, which a frozen machine never does.
``freeze`` stops the group first (a stopped process spawns nothing new), then every descendant
found through /proc that lives outside it; ``resume`` continues those helpers first (the node's
first act may be to call them), then the group.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from dmoe.ready import parse_ready

_PR_SET_PDEATHSIG = 1
_LIVE: weakref.WeakSet[DmoeProcess] = weakref.WeakSet()


def _die_with_parent() -> None:
    """preexec_fn: new session + SIGTERM when the launcher dies (Linux only; best effort elsewhere)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children; a full /proc scan where that is missing)."""
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return []
    out: list[int] = []
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN
            return _children_by_scan(pid)
        except (OSError, ValueError):
            continue  # the thread exited meanwhile
    return out


def _children_by_scan(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, parents before their children (empty where there is none)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children(stack.pop()):
            out.append(child)
            stack.append(child)
    return out


class ProcessFailed(RuntimeError):
    """A launched process exited or did not become ready in time; message includes its log tail."""


class DmoeProcess:
    """One ``python -m dmoe <subcommand> ...`` child with its output teed to a log file."""

    def __init__(
        self,
        subcommand: str,
        args: Sequence[str],
        *,
        name: str,
        log_path: str | Path,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        netns: str | None = None,
    ) -> None:
        self.subcommand = subcommand
        self.netns = netns  # run inside this network namespace (``ip netns exec``, which execs: same pid)
        self.args = [str(a) for a in args]
        self.name = name
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] | None = None
        self._ready_event = threading.Event()
        self._reader: threading.Thread | None = None
        self.frozen = False
        self.frozen_helpers: list[int] = []  # stopped descendants outside the group (resumed first)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "process not started"
        return self.proc.pid

    def start(self) -> DmoeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR", **(self.env or {})}
        cmd = [sys.executable, "-m", "dmoe", self.subcommand, *self.args]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.ready = None
        self._ready_event.clear()
        self.frozen = False
        self.frozen_helpers = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
            preexec_fn=_die_with_parent,
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout, log), daemon=True)
        self._reader.start()
        _LIVE.add(self)
        return self

    def _pump(self, stream: IO[bytes], log: IO[bytes]) -> None:
        with log:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                if self.ready is None:
                    ready = parse_ready(raw.decode(errors="replace"))
                    if ready is not None:
                        self.ready = ready
                        self._ready_event.set()
        self._ready_event.set()  # EOF: wake waiters so they see the exit

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the child prints ``dmoe-ready``; raise ProcessFailed with its log tail otherwise."""
        deadline = time.monotonic() + timeout
        # poll the exit too: a helper daemon that inherited stdout can keep EOF from arriving
        while not self._ready_event.wait(0.2) and time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                self._ready_event.wait(1.0)  # let the reader drain the last lines
                break
        if self.ready is None:
            code = self.proc.poll() if self.proc else None
            why = f"exited with code {code}" if code is not None else f"not ready after {timeout:.0f}s"
            raise ProcessFailed(f"{self.name} {why}; last log lines:\n{self.log_tail()}")
        return self.ready

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Signal the whole process group (the dmoe process and its p2pd daemon)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Crash: SIGKILL, no chance to clean up (helpers in other sessions die by their PDEATHSIG)."""
        self.send_signal(signal.SIGKILL)
        self._reap(10.0)
        self.frozen = False
        self.frozen_helpers = []

    def freeze(self) -> list[int]:
        """SIGSTOP the whole process tree; returns the stopped helpers that live outside the group."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        self.send_signal(signal.SIGSTOP)
        self.frozen = True
        for pid in descendants(self.proc.pid):
            if pid in self.frozen_helpers:
                continue
            try:
                if os.getpgid(pid) == self.proc.pid:
                    continue  # already stopped with the group
                os.kill(pid, signal.SIGSTOP)
            except (ProcessLookupError, PermissionError):
                continue  # exited meanwhile
            self.frozen_helpers.append(pid)
        return list(self.frozen_helpers)

    def resume(self) -> None:
        """SIGCONT the helpers stopped by ``freeze``, then the group."""
        for pid in self.frozen_helpers:
            try:
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        self.frozen_helpers = []
        self.send_signal(signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout: float = 20.0) -> int | None:
        """Graceful leave: SIGTERM (after SIGCONT if frozen), SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if self.frozen:
                self.resume()
            self.send_signal(signal.SIGTERM)
            if self._reap(timeout) is None:
                self.send_signal(signal.SIGKILL)
                self._reap(10.0)
        else:
            self.send_signal(signal.SIGKILL)  # leftovers in the group, if any
        return self.proc.returncode

    def _reap(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group may outlive its leader (p2pd)
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code


def stop_all(timeout: float = 20.0) -> None:
    """Stop every process this launcher started that is still running."""
    for proc in list(_LIVE):
        proc.stop(timeout)


atexit.register(stop_all)
