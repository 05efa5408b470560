"""One peer floods a real node with concurrent calls and oversized streams; another peer barely notices.

The flooder (127.0.0.1) keeps far more calls in flight than ``--max-calls-per-peer`` allows and
sends streams bigger than ``--max-request-mb``; it must get ``RESOURCE_EXHAUSTED`` for both. The
victim calls from another address (127.0.0.2, through a local forwarder that binds that source
address, since gRPC cannot choose one) and must keep being answered within its normal latency:
measured idle, beside an honest peer that uses its whole share, and beside the flood, and printed.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch
from loop_thread import LoopThread

from dmoe.relay.splice import splice
from dmoe.wire.codec import serialize_tensors
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

H = 256
PER_PEER = 8


async def forwarder(target: tuple[str, int], source: str) -> asyncio.Server:
    """Listens on 127.0.0.1; every connection goes on to ``target`` from the address ``source``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await asyncio.open_connection(*target, local_addr=(source, 0))
        await splice((reader, writer), upstream)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def victim_latencies(endpoint: str, calls: int) -> list[float]:
    channel = grpc.aio.insecure_channel(endpoint)
    stub = pb_grpc.ExpertServiceStub(channel)
    request = pb.ExpertRequest(uid="fl.0", tensors=serialize_tensors([torch.randn(8, H)]))
    await stub.Forward(request, timeout=30)  # connected
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await stub.Forward(request, timeout=30)
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    await channel.close(None)
    return out


def beside(endpoint: str, side: LoopThread, victim: str, *mode: str) -> tuple[list[float], Counter]:
    """The victim's latencies while the flooder (a process of its own, as it would be) runs in ``mode``."""
    flooder = subprocess.Popen([sys.executable, str(Path(__file__).with_name("flooder.py")), endpoint, "8",
                                str(PER_PEER), *mode], stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout is not None and flooder.stdout.readline().strip() == "flooding"
        time.sleep(1.0)  # the load is on
        latencies = side.run(victim_latencies(victim, 30))
        return latencies, Counter(json.loads(flooder.communicate(timeout=60)[0].strip().splitlines()[-1]))
    finally:
        if flooder.poll() is None:
            flooder.kill()


@pytest.mark.timeout(300)
def test_a_flooding_peer_is_refused_and_another_peer_keeps_its_latency(launch):
    node = launch("node", ["--experts", "fl.[0:2]", "--hidden-dim", str(H), "--host", "127.0.0.1",
                           "--max-calls-per-peer", str(PER_PEER), "--max-request-mb", "4"], name="flooded",
                  env={"OMP_NUM_THREADS": "1"})
    host, port = node.ready["grpc"].rsplit(":", 1)
    side = LoopThread()
    try:
        relay = side.run(forwarder((host, int(port)), "127.0.0.2"))
        victim = f"127.0.0.1:{relay.sockets[0].getsockname()[1]}"
        before = side.run(victim_latencies(victim, 30))
        busy, _ = beside(node.ready["grpc"], side, victim, "busy")
        during, outcomes = beside(node.ready["grpc"], side, victim)
        p50 = {label: statistics.median(x) for label, x in (("idle", before), ("busy", busy), ("flood", during))}
        print("flood: victim p50 " + ", ".join(f"{1000 * v:.1f} ms {k}" for k, v in p50.items())
              + f" (max {1000 * max(during):.1f} ms during the flood); flooder outcomes {dict(outcomes)}")
        assert outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes  # over --max-calls-per-peer
        for label in ("stream", "huge stream"):  # 1.5x and 10x --max-request-mb: always RESOURCE_EXHAUSTED
            streams = sum(n for outcome, n in outcomes.items() if outcome.startswith(label + " "))
            assert streams > 0 and outcomes[label + " RESOURCE_EXHAUSTED"] == streams, outcomes
        assert outcomes["OK"] > 0  # the flooder is served within its share, not shut out
        # The victim's calls all succeeded (victim_latencies raises otherwise). Its normal latency on a shared
        # node is the one beside an honest peer that uses its whole share (--max-calls-per-peer calls in
        # flight): the victim waits for about one of that peer's admitted batches, since a batch is not
        # preempted. A flood may cost no more than that: the node's scheduler queues fairly per peer (the
        # victim's call goes ahead of the flood's backlog), the flooder's share is the same PER_PEER calls,
        # its refusals are held so its retries cannot take the event loop, and its oversized streams are
        # not read after the first. Measured here: ~5 ms idle, 31-39 ms busy, 27-48 ms flood (with 0.1 s
        # holds and every refused stream read: 90-210 ms flood). The bound leaves room for the suite's other
        # worker (a docker swarm) beside this test.
        assert p50["flood"] < 2 * p50["busy"] + 0.03, p50
        node_log = node.log_path.read_text()
        assert "Traceback" not in node_log
    finally:
        side.close()
