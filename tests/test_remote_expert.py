"""RemoteExpert against real node processes: exact results, streaming, compression, every failure kind."""

from __future__ import annotations

import random
import socket
import time

import pytest
import torch
from moe_swarm import HIDDEN, local_experts, node_process, start_all, stop_all

from dmoe import BadAnswer, DeadlineExceeded, NodeUnreachable, RemoteExpert, RequestRejected, Swarm
from dmoe.client.peer_health import PeerHealth
from dmoe.client.remote_call import TensorSpec, check_answer
from dmoe.config.client import HealthOptions
from dmoe.wire.codec import MAX_UNARY_BYTES, serialize_tensor
from dmoe.wire.proto import expert_pb2 as pb


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("remote_expert")
    procs = start_all([
        node_process("re.[0:2]", name="good", log_dir=logs),
        node_process("nan.[0:1]", name="nan", log_dir=logs, expert_cls="bad_experts:NaNExpert"),
        node_process("shape.[0:1]", name="shape", log_dir=logs, expert_cls="bad_experts:WrongShapeExpert"),
        node_process("two.[0:1]", name="two", log_dir=logs, expert_cls="bad_experts:TwoInputExpert"),
    ])
    yield {p.name: p for p in procs}
    stop_all(procs)


@pytest.fixture(scope="module")
def swarm():
    with Swarm(use_dht=False) as s:
        yield s


@pytest.mark.integration
def test_forward_and_backward_match_local_module(nodes, swarm):
    endpoint = nodes["good"].ready["grpc"]
    local = local_experts("re.0")["re.0"]
    expert = RemoteExpert("re.0", endpoint, swarm=swarm, forward_timeout=10, backward_timeout=10)
    updates_before = expert.fetch_info().updates
    x_remote = torch.randn(5, HIDDEN, requires_grad=True)
    x_local = x_remote.detach().clone().requires_grad_(True)
    grad = torch.randn(5, HIDDEN)
    y_remote = expert(x_remote)
    y_local = local(x_local)
    torch.testing.assert_close(y_remote, y_local, rtol=1e-5, atol=1e-5)
    y_remote.backward(grad)
    y_local.backward(grad)
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=1e-5, atol=1e-5)
    assert expert.fetch_info().updates == updates_before + 1  # the node applied its optimizer
    # used as a plain layer inside a bigger graph, gradient flows through it
    w = torch.nn.Linear(HIDDEN, HIDDEN)
    loss = expert(w(torch.randn(3, HIDDEN))).pow(2).sum()
    loss.backward()
    assert w.weight.grad is not None and torch.isfinite(w.weight.grad).all() and w.weight.grad.abs().sum() > 0


@pytest.mark.integration
def test_large_payload_travels_in_chunks(nodes, swarm):
    endpoint = nodes["good"].ready["grpc"]
    local = local_experts("re.1")["re.1"]
    rows = MAX_UNARY_BYTES // (HIDDEN * 4) + 1000  # just over one unary message
    x = torch.randn(rows, HIDDEN, requires_grad=True)
    expert = RemoteExpert("re.1", endpoint, swarm=swarm, forward_timeout=60, backward_timeout=60)
    y = expert(x)
    torch.testing.assert_close(y, local(x.detach()), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.integration
def test_compression_float16(nodes, swarm):
    endpoint = nodes["good"].ready["grpc"]
    local = local_experts("re.0")["re.0"]
    expert = RemoteExpert("re.0", endpoint, swarm=swarm, compression="float16")
    x = torch.randn(4, HIDDEN)
    y = expert(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, local(x), rtol=1e-2, atol=2e-2)


@pytest.mark.integration
def test_two_input_expert_uses_its_schema(nodes, swarm):
    endpoint = nodes["two"].ready["grpc"]
    expert = RemoteExpert("two.0", endpoint, swarm=swarm)
    local = local_experts("two.0", expert_cls="bad_experts:TwoInputExpert")["two.0"]
    x = torch.randn(3, HIDDEN, requires_grad=True)
    scale = torch.randn(3, 1, requires_grad=True)
    y = expert(x, scale)
    torch.testing.assert_close(y, local(x.detach(), scale.detach()), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape and scale.grad.shape == scale.shape


@pytest.mark.integration
def test_garbage_is_never_an_answer(nodes, swarm):
    nan = RemoteExpert("nan.0", nodes["nan"].ready["grpc"], swarm=swarm)
    with pytest.raises(RequestRejected, match="not finite") as info:  # the node refuses its own NaN
        nan(torch.randn(2, HIDDEN))
    assert info.value.status == "INTERNAL" and swarm.health.is_banned(nodes["nan"].ready["grpc"])
    wrong = RemoteExpert("shape.0", nodes["shape"].ready["grpc"], swarm=swarm)
    with pytest.raises(BadAnswer, match="shape"):  # finite garbage: the client's own check
        wrong(torch.randn(2, HIDDEN))


@pytest.mark.integration
def test_unknown_expert_is_rejected(nodes, swarm):
    expert = RemoteExpert("re.7", nodes["good"].ready["grpc"], swarm=swarm)
    with pytest.raises(RequestRejected) as info:
        expert.fetch_info()
    assert info.value.status == "NOT_FOUND"


@pytest.mark.integration
def test_wrong_input_shape_is_rejected_not_hung(nodes, swarm):
    expert = RemoteExpert("re.0", nodes["good"].ready["grpc"], swarm=swarm)
    with pytest.raises(RequestRejected) as info:
        expert(torch.randn(2, HIDDEN + 1))
    assert info.value.status == "INVALID_ARGUMENT"
    assert not swarm.health.is_banned(nodes["good"].ready["grpc"])  # our fault, not the node's


def test_dead_endpoint_is_unreachable_at_once(swarm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    expert = RemoteExpert("re.0", f"127.0.0.1:{port}", swarm=swarm, forward_timeout=5)
    started = time.monotonic()
    with pytest.raises(NodeUnreachable):
        expert.fetch_info()
    expert._info = pb.ExpertInfo(uid="re.0", outputs=[pb.TensorSpec(dtype="float32", shape=[-1, HIDDEN])])
    with pytest.raises(NodeUnreachable):
        expert(torch.randn(2, HIDDEN))
    assert time.monotonic() - started < 3.0


@pytest.mark.integration
def test_frozen_node_hits_the_deadline_and_a_probe_brings_it_back(nodes):
    proc = nodes["good"]
    endpoint = proc.ready["grpc"]
    # a long first ban, so only a probe (not the ban running out) can lift it within this test
    with Swarm(use_dht=False, health=HealthOptions(ban_base=60.0)) as swarm:
        options = swarm.health.options
        expert = RemoteExpert("re.0", endpoint, swarm=swarm, forward_timeout=1.0)
        expert.info()
        proc.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                expert(torch.randn(2, HIDDEN))
            elapsed = time.monotonic() - started
            assert 0.9 < elapsed < 2.0
            assert swarm.health.is_banned(endpoint)
            time.sleep(options.probe_interval + options.probe_timeout + 0.5)
            assert swarm.health.is_banned(endpoint) and swarm.stats["probes"] >= 1  # probed, but still frozen
        finally:
            proc.resume()
        # no call needed: a Ping probe finds the node back and lifts the ban
        deadline = time.monotonic() + 2 * (options.probe_interval + options.probe_timeout) + 1.0
        while swarm.health.is_banned(endpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not swarm.health.is_banned(endpoint) and swarm.stats["recovered"] == 1
        expert.forward_timeout = 10.0
        assert torch.isfinite(expert(torch.randn(2, HIDDEN))).all()  # served again after SIGCONT


def test_timeouts_must_be_finite():
    for bad in (None, float("inf"), 0, -1):
        with pytest.raises(ValueError, match="finite"):
            RemoteExpert("re.0", "127.0.0.1:1", swarm=None, forward_timeout=bad)


def test_answer_validation():
    def reply(*tensors: torch.Tensor) -> pb.ExpertReply:
        return pb.ExpertReply(tensors=[serialize_tensor(t) for t in tensors])

    spec = (TensorSpec((3, 4), "float32"),)
    ok = check_answer(reply(torch.ones(3, 4)), method="forward", uid="u", endpoint="e", expected=spec)
    assert ok[0].shape == (3, 4)
    bad_cases = {
        "shape": reply(torch.ones(3, 5)),
        "dtype": reply(torch.ones(3, 4, dtype=torch.float64)),
        "NaN": reply(torch.full((3, 4), float("inf"))),
        "tensors": reply(torch.ones(3, 4), torch.ones(3, 4)),
    }
    for what, message in bad_cases.items():
        with pytest.raises(BadAnswer, match=what):
            check_answer(message, method="forward", uid="u", endpoint="e", expected=spec)
    broken = pb.ExpertReply(tensors=[pb.Tensor(dtype="float32", shape=[3, 4], data=b"123")])
    with pytest.raises(BadAnswer, match="bytes"):
        check_answer(broken, method="forward", uid="u", endpoint="e", expected=spec)


def test_bans_double_on_repeated_failure_and_reset_on_success():
    now = [100.0]
    health = PeerHealth(HealthOptions(ban_base=2.0, ban_max=10.0, rtt_alpha=0.5), clock=lambda: now[0])
    assert [health.record_failure("a:1", "deadline") for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert health.is_banned("a:1")
    now[0] += 10.5
    assert not health.is_banned("a:1")  # a ban ends by itself
    assert health.record_failure("a:1", "deadline") == 10.0  # ... but the doubling remembers
    health.record_success("a:1", 0.2)
    assert not health.is_banned("a:1")
    assert health.record_failure("a:1", "deadline") == 2.0  # success reset the doubling
    health.record_success("b:1", 0.4)
    health.record_success("b:1", 0.2)
    assert health.rtt("b:1") == pytest.approx(0.3)  # EWMA
    health.record_success("c:1", 0.1)
    # unbanned first, lowest RTT first, never measured before measured ones
    assert health.order(["a:1", "b:1", "c:1", "d:1"]) == ["d:1", "c:1", "b:1", "a:1"]


def test_concurrent_failures_are_one_incident():
    now = [0.0]
    health = PeerHealth(HealthOptions(ban_base=2.0, ban_max=60.0), clock=lambda: now[0])
    in_flight = [0.5, 0.6, 0.9]  # eight calls to a node that crashes: all began before it was banned
    now[0] = 1.0
    assert health.record_failure("n:1", "unreachable", started=in_flight[0]) == 2.0
    assert [health.record_failure("n:1", "unreachable", started=t) for t in in_flight[1:]] == [0.0, 0.0]
    now[0] = 1.5
    assert health.record_failure("n:1", "unreachable", started=1.2) == 4.0  # tried again anyway: a repeat


def test_replicas_are_chosen_by_expected_wait_and_slow_ones_keep_a_share():
    health = PeerHealth(HealthOptions(rtt_alpha=1.0, rtt_beta=1.0), rng=random.Random(0))
    assert health.choose(["new:1"]) == ["new:1"]
    health.record_success("fast:1", 0.01)
    health.record_success("slow:1", 0.03)  # three times slower
    assert health.choose(["fast:1", "slow:1", "new:1"])[0] == "new:1"  # never measured: explored first
    firsts = [health.choose(["fast:1", "slow:1"])[0] for _ in range(4000)]
    share = firsts.count("slow:1") / len(firsts)
    assert 0.06 < share < 0.14  # weight 1 / wait**2: (1/9) / (1 + 1/9) = 10 %, never none
    health.note_load("fast:1", 3.0)  # four batches queued there: now the slower one waits less
    assert health.choose(["fast:1", "slow:1"]).count("slow:1") == 1
    assert sum(health.choose(["fast:1", "slow:1"])[0] == "slow:1" for _ in range(1000)) > 500
    health.record_failure("slow:1", "stuck")
    assert health.choose(["fast:1", "slow:1"]) == ["fast:1", "slow:1"]  # banned: last, never drawn first


def test_expected_latency_is_the_endpoints_own_and_scales_with_rows():
    health = PeerHealth(HealthOptions(rtt_alpha=0.5, rtt_beta=0.5))
    assert health.expected("a:1") is None  # unmeasured: no verdict at all
    for latency in (0.10, 0.12, 0.08, 0.10):
        health.record_success("a:1", latency, method="forward", rows=8)
    mean, spread = health.rtt("a:1"), health.expected("a:1", rows=8, spread=1.0) - health.rtt("a:1")
    assert 0.09 < mean < 0.11 and spread > 0
    assert health.expected("a:1", rows=32, spread=0.0) == pytest.approx(4 * mean, rel=0.05)  # 4x the rows
    assert health.expected("a:1", method="backward") is None  # judged per method
    health.record_slow("a:1", 1.0)  # lost a hedge race after 1 s: at least that slow, not banned
    assert health.rtt("a:1") > mean and not health.is_banned("a:1")


def test_a_probe_lifts_only_bans_for_not_answering():
    health = PeerHealth(HealthOptions(ban_base=60.0))
    health.record_failure("frozen:1", "stuck")
    health.record_failure("liar:1", "bad_answer")
    assert health.needs_probe("frozen:1") and not health.needs_probe("liar:1")
    assert health.probe_answered("frozen:1", load=0.5) and not health.is_banned("frozen:1")
    assert not health.probe_answered("liar:1") and health.is_banned("liar:1")


def test_an_unanswered_probe_keeps_a_liveness_ban_from_running_out():
    now = [0.0]
    health = PeerHealth(HealthOptions(ban_base=5.0), clock=lambda: now[0])
    health.record_failure("frozen:1", "stuck")
    now[0] = 4.9
    health.probe_unanswered("frozen:1", until=3.5)
    now[0] = 8.0
    assert health.is_banned("frozen:1")  # still not answering: still banned, past its 5 s
    health.record_failure("liar:1", "bad_answer")
    health.probe_unanswered("liar:1", until=100.0)
    now[0] = 14.0
    assert not health.is_banned("liar:1") and not health.is_banned("frozen:1")
