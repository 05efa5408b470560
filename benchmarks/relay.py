"""Expert calls direct vs through a relay, and plaintext vs TLS, on loopback: what a relay and TLS cost.

    .venv/bin/python benchmarks/relay.py --out runs/bench_relay.json

One ``dmoe node`` process (one ffn expert, hidden 1024) is attached, with ``--reachability relay``,
to two relays (``dmoe coordinator`` processes): one with its bandwidth limits raised out of the
way (what the relay mechanism itself costs) and one with the default limits (what a volunteer
gets from a stock coordinator: ``--relay-tunnel-mbit`` per node). The client calls the *same*
node and expert three ways in the same run: at its own gRPC address (direct), and through each
relay (``name@relay``, gRPC's HTTP CONNECT support; ``dmoe.relay``).

* latency: sequential Forward calls of a [batch, hidden] fp32 tensor, p50 / p95, and Ping round
  trips (no payload, no compute: the transport alone), the three ways interleaved call by call so
  background load falls on all alike;
* throughput: ``--concurrency`` calls in flight for ``--window`` seconds per way, in alternating
  rounds; calls/s and payload MB/s (request + reply).

A second node serves the same expert behind TLS pinned to its key (``--tls on``; its certificate is
looked up in the DHT, as a trainer does): plaintext vs TLS in the same run.

Goals: the relay adds < 1 ms p50 and keeps >= 80 % of direct throughput (issue #14); TLS costs
under 10 % (issue #16), both at batch 64, hidden 1024. Prints a table, writes JSON (--out). Numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dmoe.sim.launcher import DmoeProcess  # noqa: E402


def start_swarm(work: Path, hidden: int) -> tuple[list[DmoeProcess], dict[str, str]]:
    """Two relays (raised limits, default limits) and one node attached to both; returns the three endpoints."""
    procs: list[DmoeProcess] = []

    def coordinator(name: str, *extra: str) -> dict[str, Any]:
        proc = DmoeProcess("coordinator", [
            "--identity", work / f"{name}.key", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http-host", "127.0.0.1",
            "--http-port", "0", "--relay-host", "127.0.0.1", "--relay-port", "0", "--peers-file", "none", *extra,
        ], name=name, log_path=work / f"{name}.log")
        procs.append(proc.start())
        return proc.wait_ready(120)

    fast = coordinator("relay_unlimited", "--relay-tunnel-mbit", "1000000", "--relay-total-mbit", "1000000")
    stock = coordinator("relay_default", "--initial-peers", *fast["dht"])
    node = DmoeProcess("node", [
        "--experts", "bench.0", "--hidden-dim", str(hidden), "--host", "127.0.0.1", "--initial-peers", *fast["dht"],
        "--reachability", "relay", "--relays", fast["relay"], stock["relay"], "--tls", "off",
    ], name="node", log_path=work / "node.log", env={"OMP_NUM_THREADS": "1"})
    # the same expert (same seed and uid) on a second node, behind TLS pinned to its key: plaintext vs TLS
    tls_node = DmoeProcess("node", [
        "--experts", "bench.0", "--hidden-dim", str(hidden), "--host", "127.0.0.1", "--initial-peers", *fast["dht"],
        "--reachability", "direct", "--tls", "on",
    ], name="tls_node", log_path=work / "tls_node.log", env={"OMP_NUM_THREADS": "1"})
    procs += [node.start(), tls_node.start()]
    ready, tls_ready = node.wait_ready(180), tls_node.wait_ready(180)
    name = ready["announced"].split("@")[0]
    endpoints = {"direct": ready["grpc"], "direct, TLS": tls_ready["announced"],
                 "relay (limits raised)": f"{name}@{fast['relay']}",
                 "relay (default limits)": f"{name}@{stock['relay']}"}
    return procs, endpoints, fast["dht"]


async def measure(endpoints: dict[str, str], peers: list[str], *, batch: int, hidden: int, calls: int,
                  concurrency: int, window: float, rounds: int) -> dict[str, dict[str, float]]:
    import torch

    from dmoe.client.remote_call import FORWARD, build_request, call_expert
    from dmoe.wire.codec import serialize_tensors
    from dmoe.wire.endpoints import open_channel
    from dmoe.wire.proto import expert_pb2 as pb
    from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

    x = torch.randn(batch, hidden)
    request = build_request("bench.0", serialize_tensors([x]))
    payload = 2 * x.numel() * 4  # request + reply, bytes
    from dmoe.dht.access import InLoopDHT
    from dmoe.dht.registry import ExpertRegistry
    from dmoe.wire.endpoints import parse_endpoint

    dht = await InLoopDHT.create(initial_peers=peers, client_mode=True)
    registry = ExpertRegistry(dht)
    certificates = {}
    for way, ep in endpoints.items():  # what a trainer does: the TLS node's certificate from the DHT, pinned
        fingerprint = parse_endpoint(ep).tls
        if fingerprint:
            certificates[way] = await registry.find_certificate(fingerprint)
    await dht.shutdown()
    channels = {way: open_channel(ep, certificate=certificates.get(way)) for way, ep in endpoints.items()}
    stubs = {way: pb_grpc.ExpertServiceStub(ch) for way, ch in channels.items()}

    async def ping(way: str) -> float:
        started = time.perf_counter()
        await stubs[way].Ping(pb.PingRequest(), timeout=10)
        return time.perf_counter() - started

    async def one(way: str) -> float:
        started = time.perf_counter()
        await call_expert(stubs[way], request, method=FORWARD, endpoint=endpoints[way], timeout=30)
        return time.perf_counter() - started

    for way in endpoints:  # connect, warm up the expert and both relays
        for _ in range(10):
            await one(way)
    latencies: dict[str, list[float]] = {way: [] for way in endpoints}
    pings: dict[str, list[float]] = {way: [] for way in endpoints}
    for _ in range(calls):
        for way in endpoints:
            latencies[way].append(await one(way))
            pings[way].append(await ping(way))

    done: dict[str, list[float]] = {way: [] for way in endpoints}  # calls/s per window
    for _ in range(rounds):
        for way in endpoints:
            count = 0
            deadline = time.perf_counter() + window

            async def worker(way: str = way, deadline: float = deadline) -> None:
                nonlocal count
                while time.perf_counter() < deadline:
                    await one(way)
                    count += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            done[way].append(count / (time.perf_counter() - started))
    for channel in channels.values():
        await channel.close(None)

    results = {}
    for way in endpoints:
        ordered = sorted(latencies[way])
        rate = statistics.median(done[way])
        results[way] = {"p50_ms": 1000 * ordered[len(ordered) // 2], "p95_ms": 1000 * ordered[int(len(ordered) * 0.95)],
                        "ping_p50_ms": 1000 * statistics.median(pings[way]),
                        "calls_per_s": rate, "mb_per_s": rate * payload / 1e6}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per way for latency")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight for throughput")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per throughput window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput windows per way")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dmoe-bench-relay-") as tmp:
        procs, endpoints, peers = start_swarm(Path(tmp), args.hidden)
        try:
            results = asyncio.run(measure(endpoints, peers, batch=args.batch, hidden=args.hidden, calls=args.calls,
                                          concurrency=args.concurrency, window=args.window, rounds=args.rounds))
        finally:
            for proc in reversed(procs):
                proc.stop()

    direct = results["direct"]
    print(f"\nexpert Forward, batch {args.batch} x hidden {args.hidden} fp32, loopback, "
          f"{args.concurrency} in flight for throughput")
    print(f"{'way':<24}{'p50 ms':>9}{'p95 ms':>9}{'+p50 ms':>9}{'Ping ms':>9}{'+Ping':>8}{'calls/s':>10}{'MB/s':>9}"
          f"{'of direct':>11}")
    for way, r in results.items():
        print(f"{way:<24}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['p50_ms'] - direct['p50_ms']:>9.2f}"
              f"{r['ping_p50_ms']:>9.2f}{r['ping_p50_ms'] - direct['ping_p50_ms']:>8.2f}"
              f"{r['calls_per_s']:>10.1f}{r['mb_per_s']:>9.1f}{r['calls_per_s'] / direct['calls_per_s']:>10.0%}")
    print("(Ping: the same round trip with no payload and no compute: the relay's transport cost alone)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "results": results,
                                        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}},
                                       indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
