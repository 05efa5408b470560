"""One peer floods a real node with concurrent calls and oversized streams; another peer barely notices.

The flooder (127.0.0.1) keeps far more calls in flight than ``--max-calls-per-peer`` allows and
sends streams bigger than ``--max-request-mb``; it must get ``RESOURCE_EXHAUSTED`` for both. The
victim calls from another address (127.0.0.2, through a local forwarder that binds that source
address, since gRPC cannot choose one) and must keep being answered, its latency measured before
and during the flood and printed.
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


@pytest.mark.timeout(300)
def test_a_flooding_peer_is_refused_and_another_peer_keeps_its_latency(launch):
    node = launch("node", ["--experts", "fl.[0:2]", "--hidden-dim", str(H), "--host", "127.0.0.1",
                           "--max-calls-per-peer", str(PER_PEER), "--max-request-mb", "4"], name="flooded",
                  env={"OMP_NUM_THREADS": "1"})
    host, port = node.ready["grpc"].rsplit(":", 1)
    side = LoopThread()
    flooder = None
    try:
        relay = side.run(forwarder((host, int(port)), "127.0.0.2"))
        victim = f"127.0.0.1:{relay.sockets[0].getsockname()[1]}"
        before = side.run(victim_latencies(victim, 30))
        # the flooder is a process of its own, as it would be: it does not share this one's interpreter lock
        flooder = subprocess.Popen([sys.executable, str(Path(__file__).with_name("flooder.py")), node.ready["grpc"],
                                    "8", str(PER_PEER)], stdout=subprocess.PIPE, text=True)
        assert flooder.stdout is not None and flooder.stdout.readline().strip() == "flooding"
        time.sleep(1.0)  # the flood is on
        during = side.run(victim_latencies(victim, 30))
        outcomes = Counter(json.loads(flooder.communicate(timeout=60)[0].strip().splitlines()[-1]))
        p50_before, p50_during = statistics.median(before), statistics.median(during)
        print(f"flood: victim p50 {1000 * p50_before:.1f} ms before, {1000 * p50_during:.1f} ms during "
              f"(max {1000 * max(during):.1f} ms); flooder outcomes {dict(outcomes)}")
        assert outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes  # over --max-calls-per-peer
        for label in ("stream", "huge stream"):  # 1.5x and 10x --max-request-mb: always RESOURCE_EXHAUSTED
            streams = sum(n for outcome, n in outcomes.items() if outcome.startswith(label + " "))
            assert streams > 0 and outcomes[label + " RESOURCE_EXHAUSTED"] == streams, outcomes
        assert outcomes["OK"] > 0  # the flooder is served within its share, not shut out
        # the victim's calls all succeeded (victim_latencies raises otherwise), and waited about one of the
        # flooder's admitted batches: the node's scheduler queues fairly per peer (the victim's call goes ahead
        # of the flood's backlog), the flooder's share is --max-calls-per-peer calls, and its refusals are held
        # a moment so its retries cannot take the loop. (On 2 cores the flooder's compute and bytes also take
        # CPU from the victim's; that is the price of serving the flooder at all.) Measured: about 2 ms before,
        # 15-25 ms during; before fair queueing and held refusals, 60-115 ms. The bound guards against the
        # flood taking the node (seconds), not the figure: with the suite's other worker running a docker swarm
        # beside it, the same code measured 130 ms (the figure lives in the flood's printout, -s).
        assert p50_during < p50_before + 0.3, (p50_before, p50_during)
        node_log = node.log_path.read_text()
        assert "Traceback" not in node_log
    finally:
        side.close()
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
