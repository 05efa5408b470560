"""Relays in one process: a real node servicer, a real relay and a real tunnel, on loopback sockets.

What is checked: calls through a relay answer exactly like direct ones (results, streamed
payloads, status codes and messages, deadlines, cancellation reaching the node); the relay only
reaches nodes that attached and proved their name; its limits refuse with a status the client
reroutes on; a node fails over to a spare relay when its relay dies; the dial-back check tells a
reachable node from an unreachable port; the bandwidth share is fair. The processes-and-NAT
version lives in ``test_nat.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from bad_experts import SlowExpert
from dmoe.node.backend import ExpertBackend
from dmoe.node.batching import BatchScheduler
from dmoe.node.metrics import NodeMetrics
from dmoe.node.server import ExpertServicer, add_to_server
from hivemind.utils.crypto import RSAPrivateKey
from prometheus_client import CollectorRegistry

from dmoe.client.peer_health import PeerHealth
from dmoe.config.node import BatchingOptions, OptimizerOptions
from dmoe.config.relay import ReachabilityOptions, RelayOptions
from dmoe.experts import create_expert, expert_schema
from dmoe.relay import protocol
from dmoe.relay.metrics import RelayMetrics
from dmoe.relay.reachability import DIRECT, UNREACHABLE, check_reachability
from dmoe.relay.server import RelayServer
from dmoe.relay.splice import FairShare
from dmoe.relay.tunnel import RelayAttachment, RelayLink, loopback_source
from dmoe.wire.codec import GRPC_OPTIONS, MAX_UNARY_BYTES, deserialize_tensors, iter_chunks, serialize_tensors
from dmoe.wire.endpoints import is_relayed, open_channel, parse_endpoint, relayed_endpoint
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

H = 16


@dataclass
class Node:
    address: str
    metrics: NodeMetrics
    forwards: list[int]  # rows of every forward the experts computed
    servicer: ExpertServicer


@contextlib.asynccontextmanager
async def serving_node() -> AsyncIterator[Node]:
    """The node's own servicer and scheduler with two real experts: ``ffn.0`` and ``slow.0`` (sleeps per call)."""
    forwards: list[int] = []
    backends = {}
    for uid, module in (("ffn.0", create_expert("ffn", hidden_dim=H, seed=1, uid="ffn.0")), ("slow.0", SlowExpert(H))):
        module.register_forward_hook(lambda _m, args, _out: forwards.append(int(args[0].shape[0])))
        backends[uid] = ExpertBackend(uid, module, schema=expert_schema(module, H), expert_cls="ffn", hidden_dim=H,
                                      optimizer=OptimizerOptions())
    metrics = NodeMetrics()
    scheduler = BatchScheduler(backends, options=BatchingOptions(), metrics=metrics)
    server = grpc.aio.server()
    servicer = ExpertServicer(backends, scheduler, metrics=metrics, node_id=lambda: "node-under-test",
                              max_request_bytes=64 << 20)
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Node(f"127.0.0.1:{port}", metrics, forwards, servicer)
    finally:
        await server.stop(None)
        scheduler.close()


@contextlib.asynccontextmanager
async def relay(options: RelayOptions | None = None) -> AsyncIterator[RelayServer]:
    server = RelayServer(options, metrics=RelayMetrics(CollectorRegistry()))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


def address(server: RelayServer) -> str:
    return f"127.0.0.1:{server.port}"


async def attached(node: Node, relay_server: RelayServer, key: RSAPrivateKey | None = None) -> RelayAttachment:
    host, port = node.address.rsplit(":", 1)
    attachment = RelayAttachment(address(relay_server), key=key or RSAPrivateKey(), local=(host, int(port)))
    await attachment.attach()
    return attachment


# gRPC shares connections between channels of one process with the same target; each channel here
# should be its own client connection
OWN_CONNECTION = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


async def forward(endpoint: str, uid: str, x: torch.Tensor, *, timeout: float = 10.0) -> torch.Tensor:
    channel = open_channel(endpoint, OWN_CONNECTION)
    try:
        stub = pb_grpc.ExpertServiceStub(channel)
        request = pb.ExpertRequest(uid=uid, tensors=serialize_tensors([x]))
        if request.ByteSize() <= MAX_UNARY_BYTES:
            reply = await stub.Forward(request, timeout=timeout)
        else:
            parts = [c.payload async for c in stub.ForwardStream(iter_chunks(request.SerializeToString()),
                                                                 timeout=timeout)]
            reply = pb.ExpertReply.FromString(b"".join(parts))
        return deserialize_tensors(reply.tensors)[0]
    finally:
        await channel.close(None)


async def status_of(endpoint: str, uid: str, x: torch.Tensor, *, timeout: float = 10.0) -> tuple[str, str]:
    try:
        await forward(endpoint, uid, x, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


def test_endpoint_grammar():
    assert parse_endpoint("10.0.0.7:5000").relay_name is None
    assert parse_endpoint("[::1]:5000").address == "[::1]:5000"
    relayed = parse_endpoint(relayed_endpoint("r-0123abcd", "198.51.100.4:31338"))
    assert relayed.relayed and relayed.relay_name == "r-0123abcd" and relayed.address == "198.51.100.4:31338"
    for bad in ("nohost", "h:99999", "Bad Name@1.2.3.4:5", "x@", "@1.2.3.4:5"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    assert is_relayed("r-1@h:1") and not is_relayed("h:1")
    assert loopback_source("203.0.113.9") == loopback_source("203.0.113.9") != loopback_source("203.0.113.10")
    assert loopback_source("203.0.113.9").startswith("127.")


def test_relayed_calls_answer_like_direct_ones():
    async def main() -> None:
        async with serving_node() as node, relay() as r:
            tunnel = await attached(node, r)
            try:
                x = torch.randn(5, H)
                direct = await forward(node.address, "ffn.0", x)
                through = await forward(tunnel.endpoint, "ffn.0", x)
                assert torch.equal(direct, through)
                big = torch.randn(MAX_UNARY_BYTES // (4 * H) + 100, H)  # past the unary limit: streamed both ways
                streamed = await forward(tunnel.endpoint, "ffn.0", big)
                assert torch.equal(await forward(node.address, "ffn.0", big), streamed)
                # the node's status codes and messages come back unchanged
                assert await status_of(tunnel.endpoint, "nope.0", x) == await status_of(node.address, "nope.0", x)
                code, details = await status_of(tunnel.endpoint, "nope.0", x)
                assert code == "NOT_FOUND" and "nope.0" in details
                assert r.stats()["tunnels"] == 1
            finally:
                await tunnel.close()

    asyncio.run(main())


def test_deadlines_and_cancellation_cross_the_relay():
    async def main() -> None:
        os.environ["DMOE_SLOW_EXPERT_S"] = "0.6"
        async with serving_node() as node, relay() as r:
            tunnel = await attached(node, r)
            channel = open_channel(tunnel.endpoint)
            stub = pb_grpc.ExpertServiceStub(channel)
            try:
                x = torch.randn(3, H)
                await forward(tunnel.endpoint, "ffn.0", x)  # connection up
                started = time.monotonic()
                code, _ = await status_of(tunnel.endpoint, "slow.0", x, timeout=0.2)
                assert code == "DEADLINE_EXCEEDED" and time.monotonic() - started < 0.5
                await asyncio.sleep(0.8)  # the slow call computes once (it was already running)
                node.forwards.clear()
                # a call that occupies the worker, then one queued behind it that the client cancels:
                # the cancellation reaches the node, which drops it without computing it
                busy = asyncio.ensure_future(stub.Forward(pb.ExpertRequest(uid="slow.0", tensors=serialize_tensors(
                    [torch.randn(2, H)])), timeout=10))
                await asyncio.sleep(0.15)
                queued = stub.Forward(pb.ExpertRequest(uid="slow.0", tensors=serialize_tensors([torch.randn(7, H)])),
                                      timeout=10)
                await asyncio.sleep(0.15)
                queued.cancel()
                await busy
                await asyncio.sleep(0.8)
                assert node.forwards == [2], f"the cancelled call was computed anyway: {node.forwards}"
            finally:
                os.environ.pop("DMOE_SLOW_EXPERT_S", None)
                await channel.close(None)
                await tunnel.close()

    asyncio.run(main())


def test_relayed_callers_keep_their_own_per_peer_budget_at_the_node():
    """Through a relay every call would come from 127.0.0.1; the tunnel opens the node's leg from an address
    standing for the client's, so --max-calls-per-peer still counts per client, not for all relayed ones."""

    async def main() -> None:
        os.environ["DMOE_SLOW_EXPERT_S"] = "0.5"
        async with serving_node() as node, relay() as r:
            tunnel = await attached(node, r)
            try:
                call = asyncio.ensure_future(forward(tunnel.endpoint, "slow.0", torch.randn(2, H)))
                await asyncio.sleep(0.3)
                seen = set(node.servicer.calls_by_peer)
                await call
                assert seen == {f"ipv4:{loopback_source('127.0.0.1')}"}, seen
            finally:
                os.environ.pop("DMOE_SLOW_EXPERT_S", None)
                await tunnel.close()

    asyncio.run(main())


def test_relay_reaches_only_attached_nodes_with_proven_names():
    async def main() -> None:
        async with serving_node() as node, relay() as r:
            x = torch.randn(2, H)
            code, details = await status_of(relayed_endpoint("r-0000", address(r)), "ffn.0", x)
            assert code == "UNAVAILABLE" and "404" in details
            # a CONNECT to an address (not a name) is refused too: the relay is no open proxy
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(f"CONNECT {node.address} HTTP/1.1\r\n\r\n".encode())
            assert (await reader.readline()).startswith(b"HTTP/1.1 404")
            writer.close()
            # an attach whose signature does not match the key is refused, and names nothing
            key, other = RSAPrivateKey(), RSAPrivateKey()
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            public = key.get_public_key().to_bytes()
            writer.write(f"DMOE-ATTACH 1 {protocol.encode_key(public)}\n".encode())
            nonce = (await reader.readline()).decode().split()[1]
            writer.write(f"SIGNED {protocol.sign_challenge(other, nonce)}\n".encode())
            assert (await reader.readline()).startswith(b"ERROR bad signature")
            writer.close()
            assert r.stats()["tunnels"] == 0
            # garbage first lines are dropped without an answer
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(b"\x16\x03\x01" + b"x" * 10 + b"\n")
            assert await reader.read() == b""
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(b"\xff" * 8 + b"\n")  # not even ASCII
            assert await reader.read() == b""
            assert r.metrics is not None
            refused = {s.labels["reason"] for m in r.metrics.refused.collect() for s in m.samples if s.value}
            assert {"unknown_node", "signature", "unknown", "protocol"} <= refused, refused

    asyncio.run(main())


def test_relay_limits_refuse_with_a_status_clients_reroute_on():
    async def main() -> None:
        options = RelayOptions(relay_max_tunnels=1, relay_max_connections_per_client=1)
        async with serving_node() as node, relay(options) as r:
            tunnel = await attached(node, r)
            try:
                with pytest.raises(ConnectionError, match="relay full"):
                    await attached(node, r)  # a second node: over relay_max_tunnels
                x = torch.randn(2, H)
                first = open_channel(tunnel.endpoint, OWN_CONNECTION)
                await pb_grpc.ExpertServiceStub(first).Ping(pb.PingRequest(), timeout=5)
                code, details = await status_of(tunnel.endpoint, "ffn.0", x)  # a second connection from this client
                assert code == "UNAVAILABLE" and "429" in details
                await first.close(None)
                await asyncio.sleep(0.1)
                assert (await status_of(tunnel.endpoint, "ffn.0", x))[0] == "OK"
            finally:
                await tunnel.close()

    asyncio.run(main())


def test_node_fails_over_to_a_spare_relay_and_re_announces():
    async def main() -> None:
        async with serving_node() as node, relay() as first, relay() as second:
            host, port = node.address.rsplit(":", 1)
            routes: list[str | None] = []

            async def candidates() -> list[str]:
                return [address(first), address(second)]

            link = RelayLink(key=RSAPrivateKey(), local=(host, int(port)), candidates=candidates,
                             options=ReachabilityOptions(relay_attachments=2, relay_retry=0.2), on_change=routes.append)
            try:
                endpoint = await link.start(timeout=10)
                assert endpoint is not None and endpoint.endswith(address(first))
                for _ in range(50):
                    if len(link.attached) == 2:
                        break
                    await asyncio.sleep(0.1)
                assert {a.relay for a in link.attached} == {address(first), address(second)}
                x = torch.randn(4, H)
                expected = await forward(node.address, "ffn.0", x)
                assert torch.equal(await forward(endpoint, "ffn.0", x), expected)
                await first.stop()
                for _ in range(50):
                    if link.endpoint is not None and link.endpoint.endswith(address(second)):
                        break
                    await asyncio.sleep(0.1)
                assert link.endpoint is not None and link.endpoint.endswith(address(second)), routes
                assert routes[-1] == link.endpoint and link.failovers == 1
                assert torch.equal(await forward(link.endpoint, "ffn.0", x), expected)
            finally:
                await link.stop()

    asyncio.run(main())


def test_dial_back_tells_a_reachable_node_from_a_closed_port():
    async def main() -> None:
        async with serving_node() as node, relay() as r:
            port = int(node.address.rsplit(":", 1)[1])
            result = await check_reachability([address(r)], port=port, node_id="node-under-test")
            assert result.status == DIRECT and result.observed_host == "127.0.0.1", result
            # the same port, but the node there is someone else: not proof that *we* are reachable
            result = await check_reachability([address(r)], port=port, node_id="another-node")
            assert result.status == UNREACHABLE, result
            with contextlib.closing(__import__("socket").socket()) as s:
                s.bind(("127.0.0.1", 0))
                closed = s.getsockname()[1]  # bound, never listening: connections are refused
                result = await check_reachability([address(r)], port=closed, node_id="node-under-test")
            assert result.status == UNREACHABLE and "UNREACHABLE" in result.describe()

    asyncio.run(main())


def test_fair_share_splits_the_total_between_busy_tunnels():
    share = FairShare(tunnel_bytes_per_s=100.0, total_bytes_per_s=120.0)
    a, b, c = share.bucket(), share.bucket(), share.bucket()
    assert share.rate_for(a) == 100.0  # alone: its own cap
    now = time.monotonic()
    b.last_used = now
    assert share.rate_for(a) == 60.0  # two busy tunnels share the total
    c.last_used = now
    assert share.rate_for(a) == 40.0
    share.release(c)
    assert share.rate_for(a) == 60.0


def test_clients_prefer_a_direct_replica():
    health = PeerHealth()
    direct, relayed = "10.0.0.1:5000", relayed_endpoint("r-abc", "10.0.0.2:31338")
    assert health.order([relayed, direct]) == [direct, relayed]  # unmeasured: direct explored first
    for _ in range(5):
        health.record_success(direct, 0.012)
        health.record_success(relayed, 0.010)  # a bit faster, but through a shared relay
    assert health.order([relayed, direct])[0] == direct
    for _ in range(10):
        health.record_success(relayed, 0.004)  # much faster: worth the relay
    assert health.order([relayed, direct])[0] == relayed
