"""A hostile peer for ``test_flood.py``: floods a node with calls and oversized streams, prints its outcomes.

    python tests/flooder.py ENDPOINT SECONDS PER_PEER [busy]    # last stdout line: {"OK": n, ...}

With ``busy`` it is an honest but busy peer instead: ``PER_PEER`` calls in flight, its full share and no
more, no oversized streams. The test compares the other peer's latency beside each.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import grpc
import torch

from dmoe.wire.codec import iter_chunks, serialize_tensors
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

H = 256


async def flood(endpoint: str, seconds: float, per_peer: int, outcomes: Counter, busy: bool = False) -> None:
    channel = grpc.aio.insecure_channel(endpoint)
    stub = pb_grpc.ExpertServiceStub(channel)
    big = pb.ExpertRequest(uid="fl.1", tensors=serialize_tensors([torch.randn(256, H)]))
    oversized = pb.ExpertRequest(uid="fl.1", tensors=serialize_tensors([torch.randn(6 * 2**20 // (4 * H), H)]))
    # ten times the node's limit: more than it reads of a refused stream before answering (its _drain)
    huge = pb.ExpertRequest(uid="fl.1", tensors=serialize_tensors([torch.randn(40 * 2**20 // (4 * H), H)]))
    await channel.channel_ready()
    deadline = time.monotonic() + seconds
    print("flooding", flush=True)  # the test starts measuring now

    async def caller() -> None:
        while time.monotonic() < deadline:
            try:
                await stub.Forward(big, timeout=10)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1

    async def streamer(request: pb.ExpertRequest, label: str) -> None:
        payload = request.SerializeToString()
        while time.monotonic() < deadline:
            try:
                async for _ in stub.ForwardStream(iter_chunks(payload), timeout=10):
                    pass
                outcomes[label + " OK"] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[label + " " + e.code().name] += 1

    if busy:
        await asyncio.gather(*(caller() for _ in range(per_peer)))
    else:
        await asyncio.gather(*(caller() for _ in range(4 * per_peer)), streamer(oversized, "stream"),
                             streamer(oversized, "stream"), streamer(huge, "huge stream"))
    await channel.close(None)


if __name__ == "__main__":
    counts: Counter = Counter()
    asyncio.run(flood(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), counts, busy="busy" in sys.argv[4:]))
    print(json.dumps(counts))
