"""Joining a swarm whose first contact is slow or absent: a node keeps trying, then fails clearly.

* A node started *before* its bootstrap peer (a coordinator whose identity, hence address, is known in
  advance) retries the ping with backoff and joins once the coordinator is up, instead of exiting after
  hivemind's single 3-second round.
* A node pointed at a peer that never answers exits 1 within ``--join-timeout`` with a one-line error
  naming the peer.
* SIGTERM while it is still retrying stops it at once (exit 0), not after the timeout.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from dmoe.coordinator.bootstrap import load_or_create_identity
from test_coordinator import coordinator_args, free_port, node_args

pytestmark = pytest.mark.integration


def future_coordinator(tmp_path: Path) -> tuple[Path, int, str]:
    """An identity and a port for a coordinator that is not started yet, and the multiaddr it will have."""
    identity, port = tmp_path / "coordinator.key", free_port()
    return identity, port, f"/ip4/127.0.0.1/tcp/{port}/p2p/{load_or_create_identity(identity)}"


@pytest.mark.timeout(240)
def test_a_node_started_before_its_bootstrap_peer_joins_when_it_comes_up(launch, tmp_path):
    identity, port, maddr = future_coordinator(tmp_path)
    node = launch("node", [*node_args("ffn.[0:2]", [maddr]), "--join-timeout", "120"], name="early", wait=False)
    time.sleep(8)  # hivemind's own round (3 s) is over: before, the node had exited by now
    assert node.alive(), node.log_tail()
    launch("coordinator", coordinator_args(identity, "--peers-file", "none", dht_port=port), name="late",
           timeout=120)
    node.wait_ready(120)
    log = node.log_path.read_text()
    assert "retrying in" in log and "joined the swarm after" in log, node.log_tail()


@pytest.mark.timeout(180)
def test_a_node_whose_peers_never_answer_fails_clearly_and_cleans_up(launch, tmp_path):
    _, _, maddr = future_coordinator(tmp_path)  # never started
    started = time.monotonic()
    node = launch("node", [*node_args("ffn.[0:2]", [maddr]), "--join-timeout", "6"], name="alone", wait=False)
    assert node.proc is not None
    code = node.proc.wait(120)
    assert code == 1, node.log_tail()
    assert time.monotonic() - started < 100  # the timeout, p2pd's start and the node's imports; not forever
    log = node.log_path.read_text()
    assert "could not join the swarm" in log and maddr in log and "Traceback" not in log, node.log_tail()


@pytest.mark.timeout(180)
def test_sigterm_while_joining_stops_the_node_at_once(launch, tmp_path):
    _, _, maddr = future_coordinator(tmp_path)
    node = launch("node", [*node_args("ffn.[0:2]", [maddr]), "--join-timeout", "600"], name="stopped", wait=False)
    assert node.proc is not None
    deadline = time.monotonic() + 90
    while "retrying in" not in node.log_path.read_text():
        assert time.monotonic() < deadline and node.alive(), node.log_tail()
        time.sleep(0.5)
    stopped = time.monotonic()
    node.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0, node.log_tail()
    assert time.monotonic() - stopped < 20
    assert "stopped while starting" in node.log_path.read_text(), node.log_tail()
