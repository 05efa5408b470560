"""Who may train a node's experts: members only in a closed swarm; in an open one, anyone within a rate and a band.

Tokens and signatures are checked on their own first (``dmoe.membership``), then against the
node's real servicer on a loopback socket, called by the library's own ``Swarm`` and
``RemoteExpert`` as a member, and by raw gRPC stubs as intruders (no token, an expired token, a
token for another key, a token from another authority, a replayed call).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from dmoe.node.backend import ExpertBackend
from dmoe.node.batching import BatchScheduler
from dmoe.node.metrics import NodeMetrics
from dmoe.node.server import ExpertServicer, add_to_server
from hivemind.p2p import P2P, PeerID

from dmoe import RemoteExpert, RequestRejected, Swarm
from dmoe.config.node import BatchingOptions, OptimizerOptions
from dmoe.experts import create_expert, expert_schema
from dmoe.membership import (
    Member,
    MembershipCheck,
    MembershipError,
    authority_key_from_identity,
    check_token_request,
    issue_token,
    load_or_create_member_key,
    member_id,
    payload_digest,
    peer_id_of,
    read_members,
    token_request,
)
from dmoe.wire.codec import BACKWARD, serialize_tensors
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

H = 16


@pytest.fixture
def authority(tmp_path: Path):
    path = tmp_path / "coordinator.key"
    P2P.generate_identity(str(path))  # what `dmoe coordinator --identity` creates
    key = authority_key_from_identity(path.read_bytes())
    return key, PeerID.from_identity(path.read_bytes()).to_base58()


def test_the_authority_is_recognised_by_the_coordinators_peer_id(authority):
    key, peer_id = authority
    assert peer_id_of(key.public_key()) == peer_id


def test_tokens_and_signed_calls(authority, tmp_path):
    key, peer_id = authority
    alice = load_or_create_member_key(tmp_path / "alice.key")
    assert member_id(load_or_create_member_key(tmp_path / "alice.key").public_key()) == member_id(alice.public_key())
    assert (tmp_path / "alice.key").stat().st_mode & 0o777 == 0o600
    mallory = load_or_create_member_key(tmp_path / "mallory.key")
    digest = payload_digest([b"tensor bytes"])
    check = MembershipCheck(peer_id)
    good = Member(alice, issue_token(key, member_id(alice.public_key()), ttl=60))
    assert check.check(good.metadata("backward", "ffn.0", digest), method="backward", uid="ffn.0",
                       digest=digest).member == good.id

    def refused(member: Member, *, method: str = "backward", uid: str = "ffn.0", body: bytes = digest,
                metadata: object = None) -> MembershipError:
        with pytest.raises(MembershipError) as info:
            check.check(metadata if metadata is not None else member.metadata(method, uid, digest), method=method,
                        uid=uid, digest=body)
        return info.value

    assert refused(good, metadata=()).unauthenticated
    assert "expired" in str(refused(Member(alice, issue_token(key, good.id, ttl=60, now=time.time() - 120))))
    assert "not signed by the key" in str(refused(Member(mallory, good.token)))  # alice's token, mallory's key
    other_authority = authority_key_from_identity(_identity(tmp_path / "other.key"))
    assert "not by this swarm's authority" in str(refused(Member(alice, issue_token(other_authority, good.id, ttl=60))))
    assert "not signed by the key" in str(refused(good, body=payload_digest([b"other bytes"])))  # payload changed
    metadata = good.metadata("backward", "ffn.0", digest)
    check.check(metadata, method="backward", uid="ffn.0", digest=digest)
    assert "replayed" in str(refused(good, metadata=metadata))
    forged = good.token.replace(good.token.split(".")[0][:10], "A" * 10, 1)
    assert "malformed" in str(refused(Member(alice, forged))) or "signature" in str(refused(Member(alice, forged)))

    members = tmp_path / "members.txt"
    members.write_text(f"# the swarm's members\n{good.id}  # alice\n\n")
    assert read_members(members) == {good.id}
    assert check_token_request(token_request(alice), {good.id}) == good.id
    with pytest.raises(MembershipError, match="not on this swarm's members list"):
        check_token_request(token_request(mallory), {good.id})
    stolen = token_request(alice) | {"member": member_id(mallory.public_key())}
    with pytest.raises(MembershipError, match="unsigned"):
        check_token_request(stolen, {good.id, member_id(mallory.public_key())})
    members.write_text("not-a-key\n")
    with pytest.raises(MembershipError, match="members.txt:1"):
        read_members(members)


def _identity(path: Path) -> bytes:
    P2P.generate_identity(str(path))
    return path.read_bytes()


@contextlib.contextmanager
def serving(swarm: Swarm, authority: str | None = None, **limits: float) -> Iterator[tuple[str, ExpertBackend]]:
    """The node's real servicer for one ffn expert (closed to non-members with ``authority``), in the swarm's loop."""
    module = create_expert("ffn", hidden_dim=H, seed=1, uid="ffn.0")
    backend = ExpertBackend("ffn.0", module, schema=expert_schema(module, H), expert_cls="ffn", hidden_dim=H,
                            optimizer=OptimizerOptions(lr=0.1))
    metrics = NodeMetrics()
    scheduler = BatchScheduler({"ffn.0": backend}, options=BatchingOptions(), metrics=metrics)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_to_server(ExpertServicer({"ffn.0": backend}, scheduler, metrics=metrics, node_id=lambda: "closed",
                                     max_request_bytes=1 << 20,
                                     membership=MembershipCheck(authority) if authority else None,
                                     members_only=(BACKWARD,), **limits), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = swarm.run(start(), timeout=10)
    try:
        yield f"127.0.0.1:{port}", backend
    finally:
        swarm.run(server.stop(None), timeout=10)
        scheduler.close()


def test_only_members_train_a_closed_swarms_experts(authority, tmp_path):
    key, peer_id = authority
    alice = load_or_create_member_key(tmp_path / "alice.key")
    mallory = load_or_create_member_key(tmp_path / "mallory.key")
    alice_id = member_id(alice.public_key())
    with Swarm(use_dht=False) as swarm, serving(swarm, peer_id) as (endpoint, backend):
        before = {name: p.detach().clone() for name, p in backend.module.named_parameters()}
        x, grad = torch.randn(4, H), torch.randn(4, H)
        request = pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x, grad]))
        digest = payload_digest([t.data for t in request.tensors])

        async def backward(metadata: tuple[tuple[str, str], ...]) -> tuple[str, str]:
            channel = grpc.aio.insecure_channel(endpoint)
            try:
                await pb_grpc.ExpertServiceStub(channel).Backward(request, timeout=10, metadata=metadata)
                return "OK", ""
            except grpc.aio.AioRpcError as e:
                return e.code().name, e.details() or ""
            finally:
                await channel.close(None)

        expired = Member(alice, issue_token(key, alice_id, ttl=60, now=time.time() - 3600))
        others = Member(mallory, issue_token(key, alice_id, ttl=60))  # alice's token, signed by mallory
        outcomes = {
            "no token": swarm.run(backward(()), timeout=20),
            "expired token": swarm.run(backward(expired.metadata(BACKWARD, "ffn.0", digest)), timeout=20),
            "another key's token": swarm.run(backward(others.metadata(BACKWARD, "ffn.0", digest)), timeout=20),
        }
        assert outcomes["no token"][0] == "UNAUTHENTICATED" and "membership" in outcomes["no token"][1]
        assert outcomes["expired token"][0] == "PERMISSION_DENIED" and "expired" in outcomes["expired token"][1]
        assert outcomes["another key's token"][0] == "PERMISSION_DENIED"
        assert "not signed by the key" in outcomes["another key's token"][1]
        for name, p in backend.module.named_parameters():  # nobody's gradient reached the expert
            assert torch.equal(p, before[name]), name
        assert backend.updates == 0

        # a non-member's Forward still works (only Backward is closed by default) ...
        expert = RemoteExpert("ffn.0", endpoint, swarm=swarm, forward_timeout=10, backward_timeout=10)
        x_in = torch.randn(4, H, requires_grad=True)
        with pytest.raises(RequestRejected, match="UNAUTHENTICATED"):  # ... but its backward is refused
            expert(x_in).sum().backward()
        assert backend.updates == 0
        # a member trains it
        swarm.member = Member(alice, issue_token(key, alice_id, ttl=60))
        x_in = torch.randn(4, H, requires_grad=True)
        expert(x_in).sum().backward()
        assert x_in.grad is not None and torch.isfinite(x_in.grad).all()
        assert backend.updates == 1
        assert any(not torch.equal(p, before[name]) for name, p in backend.module.named_parameters())


async def _raw_backward(endpoint: str, x: torch.Tensor, grad: torch.Tensor) -> tuple[str, str]:
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        request = pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x, grad]))
        await pb_grpc.ExpertServiceStub(channel).Backward(request, timeout=10)
        return "OK", ""
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or ""
    finally:
        await channel.close(None)


def test_an_open_swarm_bounds_each_peers_backward_rate():
    with Swarm(use_dht=False) as swarm, serving(swarm, backward_rate=5.0) as (endpoint, backend):
        x, grad = torch.randn(2, H), torch.randn(2, H)
        codes = [swarm.run(_raw_backward(endpoint, x, grad), timeout=20) for _ in range(14)]
        assert [c for c, _ in codes[:10]] == ["OK"] * 10  # a burst of 2 s worth passes
        assert any(c == "RESOURCE_EXHAUSTED" and "--backward-rate" in d for c, d in codes[10:]), codes
        assert backend.updates == sum(c == "OK" for c, _ in codes)


def test_an_open_swarm_refuses_gradients_far_outside_an_experts_running_level():
    with Swarm(use_dht=False) as swarm, serving(swarm, backward_rate=0.0) as (endpoint, backend):
        x = torch.randn(4, H)
        for _ in range(25):  # honest gradients of about unit scale
            assert swarm.run(_raw_backward(endpoint, x, torch.randn(4, H)), timeout=20)[0] == "OK"
        before = {name: p.detach().clone() for name, p in backend.module.named_parameters()}
        code, details = swarm.run(_raw_backward(endpoint, x, 1e6 * torch.randn(4, H)), timeout=20)
        assert code == "INVALID_ARGUMENT" and "--grad-norm-band" in details
        for name, p in backend.module.named_parameters():
            assert torch.equal(p, before[name]), name
        assert swarm.run(_raw_backward(endpoint, x, 3 * torch.randn(4, H)), timeout=20)[0] == "OK"  # within the band


def test_guards_alone():
    from dmoe.node.guards import WARMUP, BackwardRateLimit, GradientGuard

    limit = BackwardRateLimit(2.0)
    assert [limit.allow("a", now=0.0) for _ in range(5)] == [True] * 4 + [False]
    assert limit.allow("b", now=0.0) and limit.allow("a", now=0.6)  # per address; refilled after 0.5 s
    assert BackwardRateLimit(0).allow("a")
    guard = GradientGuard(100.0)
    for i in range(WARMUP):
        assert guard.check("e", torch.full((3, 4), 1.0 + 0.01 * i)) is None
    assert guard.check("e", torch.full((3, 4), 500.0)) is not None
    for _ in range(200):  # far smaller gradients are harmless (lightly gated tokens) and pass ...
        assert guard.check("e", torch.full((3, 4), 1e-4)) is None
    assert guard.check("e", torch.full((3, 4), 5.0)) is None  # ... without pulling the ceiling down
    assert guard.check("e", torch.full((3, 4), 500.0)) is not None
    assert guard.check("other", torch.full((3, 4), 500.0)) is None  # per expert: still warming up
