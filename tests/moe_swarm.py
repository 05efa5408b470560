"""Test helpers for the client tests: real ``dmoe node`` processes and their local twins.

``start_nodes`` launches node processes (the first one bootstraps the DHT, the rest join it,
started in parallel); ``local_experts`` builds in-process experts with the very weights a node
built from the same ``--seed`` (``dmoe.experts.create_expert`` derives them from seed and uid).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from dmoe.dht.uids import parse_expert_pattern
from dmoe.experts import create_expert
from dmoe.sim.launcher import DmoeProcess

TESTS_DIR = Path(__file__).resolve().parent
HIDDEN = 16
# lr tiny: one step barely moves weights, so later steps still match the local twins closely
NODE_ARGS = ["--host", "127.0.0.1", "--port", "0", "--hidden-dim", str(HIDDEN), "--seed", "0", "--lr", "1e-9",
             "--announce-ttl", "10", "--log-level", "WARNING"]


def node_process(experts: str, *, name: str, log_dir: Path, initial_peers: Sequence[str] = (),
                 expert_cls: str = "ffn", env: dict[str, str] | None = None) -> DmoeProcess:
    args = ["--experts", experts, "--expert-cls", expert_cls, *NODE_ARGS]
    if initial_peers:
        args += ["--initial-peers", *initial_peers]
    pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    return DmoeProcess("node", args, name=name, log_path=log_dir / f"{name}.log",
                       env={"PYTHONPATH": pythonpath, **(env or {})})


def start_all(procs: Sequence[DmoeProcess], timeout: float = 120.0) -> list[DmoeProcess]:
    """Start processes together and wait for every one to be ready (stopping them all on failure)."""
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready(timeout)
    except BaseException:
        stop_all(procs, timeout=10)
        raise
    return list(procs)


def local_experts(
    pattern: str, *, hidden: int = HIDDEN, seed: int = 0, expert_cls: str = "ffn"
) -> dict[str, nn.Module]:
    uids = parse_expert_pattern(pattern)
    return {uid: create_expert(expert_cls, hidden_dim=hidden, seed=seed, uid=uid) for uid in uids}


def stop_all(procs: Sequence[DmoeProcess], timeout: float = 15.0) -> None:
    """Stop processes in parallel (each graceful leave takes a moment)."""
    threads = [threading.Thread(target=p.stop, kwargs={"timeout": timeout}) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
