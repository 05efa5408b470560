"""A node that is merely slow is a volunteer on a home link, not a failure.

Three real nodes sit behind real emulated home links (``python -m dmoe.sim.links``): two at
50 ms one way, one at 160 ms, so it answers about 3x slower than the others and slower than the
0.3 s tail wait of the shipped scenarios (the old rule, twice the fastest answer but at least that
tail wait, banned exactly such a node). Part of its experts are also served by a fast node
(replicas), part by it alone. A short training run with the aggressive
tail wait of the shipped scenarios (``timeout_after_k_min`` 0.3 s) must never ban it, never
count a call to it as failed or stuck, and still send it its share of calls; hedges stay within
their budget. The frozen-node tests (``test_moe_faults``, ``test_moe_backward_faults``) check
the other side: a node that does not answer at all is still cut off quickly.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from moe_swarm import HIDDEN, node_process, start_all, stop_all

from dmoe import RemoteMixtureOfExperts, Swarm
from dmoe.ready import parse_ready

pytestmark = pytest.mark.integration  # real processes

STEPS = 20
FAST_MS, SLOW_MS = 50.0, 160.0  # one way


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(latency_ms: float) -> tuple[subprocess.Popen, int, int]:
    """A home link in front of a port a node will listen on: (process, node's port, announced port)."""
    inner, outer = _free_port(), _free_port()
    link = subprocess.Popen(
        [sys.executable, "-m", "dmoe.sim.links", "--listen", str(outer), "--listen-host", "127.0.0.1",
         "--target", f"127.0.0.1:{inner}", "--latency-ms", str(latency_ms), "--jitter-ms", "3",
         "--up-mbit", "20", "--down-mbit", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in link.stdout:  # type: ignore[union-attr]
        if parse_ready(line):
            return link, inner, outer
    raise RuntimeError("the link emulator did not start")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("slow_nodes")
    links, procs, endpoints = [], [], {}
    try:
        layout = [("fast1", "sl.[0:2].[0:4]", FAST_MS), ("slow", "sl.[2:4].[0:4]", SLOW_MS),
                  ("fast2", "sl.[2:4].[0:2]", FAST_MS)]
        peers: list[str] = []
        for name, experts, latency in layout:
            link, inner, outer = _link(latency)
            links.append(link)
            proc = node_process(experts, name=name, log_dir=logs, initial_peers=peers)
            proc.args += ["--port", str(inner), "--announce-port", str(outer)]
            procs += start_all([proc])
            peers = peers or proc.ready["dht"]
            endpoints[name] = f"127.0.0.1:{outer}"
        yield {"endpoints": endpoints, "peers": peers}
    finally:
        stop_all(procs)
        for link in links:
            link.terminate()
            link.wait(10)


def test_a_slow_node_is_never_banned_failed_or_stuck_and_keeps_its_share(nodes):
    slow = nodes["endpoints"]["slow"]
    with Swarm(initial_peers=nodes["peers"]) as swarm:
        layer = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(4, 4), uid_prefix="sl", swarm=swarm, k_best=4,
                                       k_min=1, forward_timeout=10.0, backward_timeout=20.0, timeout_after_k_min=0.3)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
        torch.manual_seed(0)
        for _ in range(STEPS):
            x = torch.randn(32, HIDDEN, requires_grad=True)
            y = layer(x)
            (y.pow(2).mean() + 0.01 * layer.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            assert not swarm.health.is_banned(slow)
        stats, health = swarm.stats, swarm.health.snapshot()
        assert stats["failures"] == {} and stats["bans"] == 0, stats
        assert layer.stats["not_enough"] == 0, layer.stats
        # a call far beyond its node's own p95 (a loaded machine) may be *suspected* -- its tokens stop
        # waiting and the node is pinged -- but that is neither a failure nor a ban (checked above)
        assert layer.stats["suspected"] <= 0.05 * sum(stats["calls"].values()), layer.stats
        fast = [e for e in health if e != slow]
        assert health[slow]["rtt"] > 2 * max(health[e]["rtt"] for e in fast)  # really slower
        assert health[slow]["rtt"] > layer.timeout_after_k_min  # slower than the tail wait, too
        # experts only it serves (sl.[2:4].[2:4]) reach it every step, forward and backward
        assert health[slow]["answers"] >= STEPS
        calls = sum(stats["calls"].values())
        assert stats["hedges"] <= 0.1 * calls + swarm.hedge.burst
