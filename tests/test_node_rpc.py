"""A real ``dmoe node`` process over real gRPC on loopback: results, training, statuses, limits.

Two nodes start once for the whole module (a correct ffn node and a slow one for queue tests);
each test talks to them with plain gRPC stubs, as any client would.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from node_rpc import call, call_request, close_channels, expert_weights, find_experts, status_of, stub, updates

from dmoe.experts import create_expert
from dmoe.sim.launcher import DmoeProcess
from dmoe.wire.codec import deserialize_tensors, serialize_tensor, serialize_tensors
from dmoe.wire.proto import expert_pb2 as pb

pytestmark = pytest.mark.integration  # real processes

TESTS_DIR = Path(__file__).resolve().parent
H = 32
SEED = 7
LR = 1e-2


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Start both nodes in parallel; stop them (SIGTERM) after the module."""
    tmp = tmp_path_factory.mktemp("rpc")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
           "DMOE_SLOW_EXPERT_S": "2.0"}
    common = ["--host", "127.0.0.1", "--hidden-dim", str(H), "--seed", str(SEED), "--metrics-port", "0"]
    ffn = DmoeProcess("node", ["--experts", "ffn.[0:3],kept.0", "--lr", str(LR), "--max-request-mb", "4", *common],
                      name="ffn", log_path=tmp / "ffn.log", env=env).start()
    slow = DmoeProcess("node", ["--experts", "slow.[0:2]", "--expert-cls", "bad_experts:SlowExpert",
                                "--max-queued-rows", "12", "--announce-host", "127.0.0.9", "--announce-port", "5555",
                                *common],
                       name="slow", log_path=tmp / "slow.log", env=env).start()
    try:
        yield {"ffn": ffn.wait_ready(90), "slow": slow.wait_ready(90), "ffn_proc": ffn}
    finally:
        close_channels()
        for proc in (ffn, slow):
            proc.stop(timeout=15)


def local(uid: str) -> torch.nn.Module:
    return create_expert("ffn", hidden_dim=H, seed=SEED, uid=uid)


def metric(ready: dict, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_ready_line(nodes):
    ready = nodes["ffn"]
    assert ready["role"] == "node"
    assert ready["experts"] == ["ffn.0", "ffn.1", "ffn.2", "kept.0"]
    assert ready["grpc"].startswith("127.0.0.1:") and ready["announced"] == ready["grpc"]
    assert ready["dht"] and all("/p2p/" in m for m in ready["dht"])
    assert ready["node_id"] and isinstance(ready["metrics_port"], int)


def test_announce_host_and_port_go_to_the_dht_while_serving_on_the_bound_port(nodes):
    ready = nodes["slow"]
    assert ready["announced"] == "127.0.0.9:5555" and ready["grpc"].startswith("127.0.0.1:")
    found = find_experts(ready["dht"], ["slow.0", "slow.1"])
    assert {uid: [e.endpoint for e in eps] for uid, eps in found.items()} == {
        "slow.0": ["127.0.0.9:5555"], "slow.1": ["127.0.0.9:5555"]}
    assert all(e.node_id == ready["node_id"] for eps in found.values() for e in eps)


def test_forward_equals_local_module(nodes):
    ep = nodes["ffn"]["grpc"]
    x = torch.randn(10, H)
    (y,) = call(ep, "Forward", "ffn.2", [x])
    assert y.dtype == torch.float32 and y.shape == (10, H)
    with torch.no_grad():
        assert torch.allclose(y, local("ffn.2")(x), atol=1e-5)


def test_backward_gradients_and_update_equal_local_training(nodes):
    ep = nodes["ffn"]["grpc"]
    uid = "ffn.1"
    model = local(uid)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    before = updates(ep, uid)
    assert before == 0
    for step in range(3):
        x, g = torch.randn(6, H), torch.randn(6, H)
        (grad,) = call(ep, "Backward", uid, [x, g])
        xl = x.clone().requires_grad_()
        model(xl).backward(g)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        assert torch.allclose(grad, xl.grad, atol=1e-5), f"input gradient differs at step {step}"
    assert updates(ep, uid) == 3
    x = torch.randn(4, H)
    (y,) = call(ep, "Forward", uid, [x])
    with torch.no_grad():
        assert torch.allclose(y, model(x), atol=1e-4), "weights after 3 remote steps equal 3 local steps"
        assert not torch.allclose(y, local(uid)(x), atol=1e-4), "backward changed the weights"


def test_a_tagged_forward_is_kept_for_its_backward_with_the_same_training_result(nodes):
    """A trainer's calls carry a call_id in Forward and Backward: the node keeps the forward's activations and the
    backward uses them (counted as a hit), with exactly the gradients and update of plain local training."""
    ep, ready = nodes["ffn"]["grpc"], nodes["ffn"]
    uid = "kept.0"  # an expert of its own: other tests compare theirs with their initial weights
    model = local(uid)
    assert torch.equal(next(iter(expert_weights(ep, uid).values())), next(iter(model.state_dict().values())))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    hits = metric(ready, "dmoe_node_activation_cache_calls_total", 'result="hit"')
    for step in range(3):
        x, g = torch.randn(5, H), torch.randn(5, H)
        call_id = f"step{step}-{uid}"
        fwd = pb.ExpertRequest(uid=uid, tensors=serialize_tensors([x]), call_id=call_id)
        (y,) = deserialize_tensors(stub(ep).Forward(fwd, timeout=30).tensors)
        bwd = pb.ExpertRequest(uid=uid, tensors=serialize_tensors([x, g]), call_id=call_id)
        (grad,) = deserialize_tensors(stub(ep).Backward(bwd, timeout=30).tensors)
        xl = x.clone().requires_grad_()
        out = model(xl)
        out.backward(g)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        assert torch.allclose(y, out.detach(), atol=1e-5), f"forward differs at step {step}"
        assert torch.allclose(grad, xl.grad, atol=1e-5), f"input gradient differs at step {step}"
    assert metric(ready, "dmoe_node_activation_cache_calls_total", 'result="hit"') - hits == 3
    assert metric(ready, "dmoe_node_activation_cache_bytes") == 0  # each kept forward was used once, then freed
    # a call id longer than the limit is refused with a clear status, the node keeps serving
    code, details = status_of(call_request, ep, "Forward", pb.ExpertRequest(
        uid=uid, tensors=serialize_tensors([torch.randn(2, H)]), call_id="x" * 100))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "call_id" in details


def test_a_batch_of_calls_gets_each_part_its_own_answer_or_status(nodes):
    """ForwardBatch / BackwardBatch: several experts' calls in one RPC, each answered as it would be alone."""
    ep = nodes["ffn"]["grpc"]
    x0, x1 = torch.randn(3, H), torch.randn(2, H)
    batch = pb.ExpertBatch(requests=[
        pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x0])),
        pb.ExpertRequest(uid="nope.7", tensors=serialize_tensors([x1])),
        pb.ExpertRequest(uid="ffn.1", tensors=serialize_tensors([x1])),
    ])
    reply = stub(ep).ForwardBatch(batch, timeout=30)
    assert [s.code for s in reply.statuses] == [0, grpc.StatusCode.NOT_FOUND.value[0], 0]
    assert "nope.7" in reply.statuses[1].details
    (y0,) = deserialize_tensors(reply.replies[0].tensors)
    (y1,) = deserialize_tensors(reply.replies[2].tensors)
    (alone,) = call(ep, "Forward", "ffn.1", [x1])
    assert torch.allclose(y1, alone, atol=1e-6) and y0.shape == x0.shape
    # a batch is bounded like the calls it carries
    too_many = pb.ExpertBatch(requests=[pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x1]))] * 65)
    code, details = status_of(stub(ep).ForwardBatch, too_many, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64" in details


def test_info_and_ping(nodes):
    ready = nodes["ffn"]
    s = stub(ready["grpc"])
    info = s.Info(pb.InfoRequest(uid="ffn.0"), timeout=10)
    (e,) = info.experts
    assert info.node_id == ready["node_id"]
    assert (e.uid, e.expert_cls, e.hidden_dim) == ("ffn.0", "ffn", H)
    assert e.num_parameters == sum(p.numel() for p in local("ffn.0").parameters())
    assert [(t.dtype, list(t.shape)) for t in e.inputs] == [("float32", [-1, H])]
    assert [(t.dtype, list(t.shape)) for t in e.outputs] == [("float32", [-1, H])]
    listing = s.Info(pb.InfoRequest(uid=""), timeout=10)
    assert [x.uid for x in listing.experts] == ready["experts"]
    ping = s.Ping(pb.PingRequest(), timeout=10)
    assert ping.node_id == ready["node_id"] and ping.num_experts == 4 and ping.load >= 0 and ping.time > 0
    assert status_of(s.Info, pb.InfoRequest(uid="ffn.9"), timeout=10)[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("compression,atol", [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_reply_compression(nodes, compression, atol):
    ep = nodes["ffn"]["grpc"]
    x = torch.randn(8, H)
    request = pb.ExpertRequest(uid="ffn.2", tensors=serialize_tensors([x]), compression=compression)
    raw = stub(ep).Forward(request, timeout=10)
    assert raw.tensors[0].wire_dtype == compression and raw.tensors[0].dtype == "float32"
    assert len(raw.tensors[0].data) == x.numel() * 2
    (y,) = call(ep, "Forward", "ffn.2", [x], compression=compression)
    with torch.no_grad():
        assert y.dtype == torch.float32 and torch.allclose(y, local("ffn.2")(x), atol=atol)
    # compressed inputs are decoded back to float32 by the node
    request = pb.ExpertRequest(uid="ffn.2", tensors=[serialize_tensor(x, compression)])
    (y16,) = call_request(ep, "Forward", request)
    with torch.no_grad():
        assert torch.allclose(y16, local("ffn.2")(x.to(getattr(torch, compression)).float()), atol=1e-5)


def test_big_payload_streams_in_chunks(nodes):
    ep = nodes["ffn"]["grpc"]
    x = torch.randn(24_000, H)  # ~3 MB: above the unary limit, below --max-request-mb 4
    (y,) = call(ep, "Forward", "ffn.0", [x])
    with torch.no_grad():
        assert torch.allclose(y, local("ffn.0")(x), atol=1e-5)
    assert metric(nodes["ffn"], "dmoe_node_requests_total", 'method="ForwardStream",status="OK"') >= 1


def _bad_requests() -> dict[str, tuple[str, pb.ExpertRequest, grpc.StatusCode, str]]:
    x = torch.randn(4, H)
    good = serialize_tensor(x)
    truncated = pb.Tensor(dtype="float32", shape=[4, H], data=good.data[:-3])
    unknown_dtype = pb.Tensor(dtype="complex64", shape=[4, H], data=good.data)
    bad_wire = pb.Tensor(dtype="int64", shape=[4, H // 2], data=good.data, wire_dtype="float16")
    inv = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "unknown uid": ("Forward", pb.ExpertRequest(uid="ffn.77", tensors=[good]), grpc.StatusCode.NOT_FOUND, "ffn.77"),
        "not a uid": ("Forward", pb.ExpertRequest(uid="", tensors=[good]), grpc.StatusCode.NOT_FOUND, "not served"),
        "wrong shape": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([torch.randn(4, H + 1)])),
                        inv, "shape"),
        "wrong rank": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([torch.randn(2, 2, H)])),
                       inv, "rank"),
        "wrong dtype": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x.double()])),
                        inv, "dtype"),
        "int dtype": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([torch.ones(4, H).long()])),
                      inv, "dtype"),
        "nan": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x * float("nan")])), inv, "NaN"),
        "inf": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x / 0])), inv, "Inf"),
        "truncated bytes": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=[truncated]), inv, "bytes"),
        "unknown dtype": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=[unknown_dtype]), inv, "dtype"),
        "bad wire dtype": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=[bad_wire]), inv, "wire dtype"),
        "no tensors": ("Forward", pb.ExpertRequest(uid="ffn.0"), inv, "expected 1 inputs"),
        "bad compression": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=[good], compression="zip"),
                            inv, "compression"),
        "backward without grads": ("Backward", pb.ExpertRequest(uid="ffn.0", tensors=[good]), inv, "grad_outputs"),
        "grad of wrong shape": ("Backward",
                                pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x, torch.randn(3, H)])),
                                inv, "grad_output 0"),
        "nan grad": ("Backward",
                     pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([x, x * float("nan")])), inv, "NaN"),
        "too large": ("Forward", pb.ExpertRequest(uid="ffn.0", tensors=serialize_tensors([torch.randn(40_000, H)])),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-request-mb"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_request_gets_its_status_and_node_keeps_serving(nodes, case):
    ep = nodes["ffn"]["grpc"]
    method, request, code, needle = _bad_requests()[case]
    before = updates(ep, "ffn.0")
    got, details = status_of(call_request, ep, method, request, timeout=20)
    assert got == code, (got, details)
    assert needle in details, details
    assert updates(ep, "ffn.0") == before, "a rejected request must not train the expert"
    x = torch.randn(3, H)
    (y,) = call(ep, "Forward", "ffn.2", [x])
    with torch.no_grad():
        assert torch.allclose(y, local("ffn.2")(x), atol=1e-5)


def test_malformed_stream_and_oversized_stream(nodes):
    ep = nodes["ffn"]["grpc"]
    s = stub(ep)
    code, details = status_of(lambda: list(s.ForwardStream(iter([pb.Chunk(payload=b"\xff\xfe garbage")]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details
    big = [pb.Chunk(payload=b"\0" * 1_000_000) for _ in range(6)]  # 6 MB > --max-request-mb 4
    code, details = status_of(lambda: list(s.ForwardStream(iter(big), timeout=10)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    (y,) = call(ep, "Forward", "ffn.2", [torch.zeros(1, H)])
    assert y.shape == (1, H)


def test_concurrent_clients_each_get_their_own_rows(nodes):
    ep = nodes["ffn"]["grpc"]
    model = local("ffn.2")
    errors: list[str] = []

    def client(i: int) -> None:
        for _ in range(5):
            x = torch.randn(1 + i, H)
            (y,) = call(ep, "Forward", "ffn.2", [x])
            with torch.no_grad():
                if not torch.allclose(y, model(x), atol=1e-5):
                    errors.append(f"client {i} got someone else's rows")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_full_queue_is_refused_at_once_and_expired_requests_are_dropped(nodes):
    ready = nodes["slow"]
    ep = ready["grpc"]
    x = torch.randn(4, H)
    results: dict[str, object] = {}

    def run(name: str, uid: str, timeout: float) -> None:
        try:
            results[name] = call(ep, "Forward", uid, [x], timeout=timeout)
        except grpc.RpcError as e:
            results[name] = e.code()

    busy = threading.Thread(target=run, args=("busy", "slow.0", 30))
    busy.start()
    for _ in range(500):  # the busy request is in
        if stub(ep).Ping(pb.PingRequest(), timeout=5).load >= 4 / 1024:
            break
    deadline_drops = metric(ready, "dmoe_node_rejections_total", 'reason="deadline"')
    # slow.0 stays busy for 2 s: these queue behind it (slow.1 waits for the only worker)
    expiring = threading.Thread(target=run, args=("expiring", "slow.0", 0.5))
    waiting = [threading.Thread(target=run, args=(f"q{i}", "slow.1", 30)) for i in range(2)]
    expiring.start()
    for t in waiting:
        t.start()
    for _ in range(500):  # 4 (busy, in flight) + 4 + 4 + 4 queued rows
        if stub(ep).Ping(pb.PingRequest(), timeout=5).load >= 16 / 1024:
            break
    code, details = status_of(call, ep, "Forward", "slow.0", [torch.randn(1, H)], timeout=5)  # 12 + 1 > 12
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in details
    for t in [busy, expiring, *waiting]:
        t.join(60)
    assert results["expiring"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(isinstance(results[k], list) for k in ("busy", "q0", "q1")), results
    assert metric(ready, "dmoe_node_rejections_total", 'reason="deadline"') == deadline_drops + 1
    # computed batches: busy, then slow.1's merged batch; the expired request was never computed
    assert metric(ready, "dmoe_node_batch_rows_sum") == 4 + 8
    (y,) = call(ep, "Forward", "slow.1", [x], timeout=30)
    assert y.shape == (4, H)


def test_metrics_cover_requests_latency_batches_queue_bytes_updates_experts(nodes):
    # last in the module: it trains ffn.1 after the exact-training test is done with it
    ready = nodes["ffn"]
    ep = ready["grpc"]
    call(ep, "Backward", "ffn.1", [torch.randn(2, H), torch.randn(2, H)])
    status_of(call, ep, "Forward", "ffn.0", [torch.randn(2, H + 1)])
    text = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=10).read().decode()
    for needle in (
        'dmoe_node_requests_total{method="Backward",status="OK"}',
        'dmoe_node_requests_total{method="Forward",status="INVALID_ARGUMENT"}',
        'dmoe_node_rejections_total{reason="shape"}',
        'dmoe_node_request_seconds_bucket{le="0.01",method="Backward"}',
        'dmoe_node_batch_rows_bucket{kind="backward",le="2.0"}',
        "dmoe_node_queued_rows 0.0",
        'dmoe_node_bytes_in_total{method="backward"}',
        'dmoe_node_bytes_out_total{method="backward"}',
        'dmoe_node_optimizer_updates_total{uid="ffn.1"}',
        "dmoe_node_experts_hosted 4.0",
        'dmoe_node_dht_announces_total{result="ok"}',
    ):
        assert needle in text, needle


def test_hostile_requests_get_a_short_clear_status_and_cost_the_log_little(nodes):
    """A raw-gRPC peer sending garbage: each gets INVALID_ARGUMENT/NOT_FOUND quoting at most a short
    prefix of what it sent, no traceback reaches the node's log, finite inputs that overflow the
    expert are refused instead of answered with Inf, and the node keeps serving everyone else."""
    endpoint = nodes["ffn"]["grpc"]
    channel = grpc.insecure_channel(endpoint)
    try:
        raw = channel.unary_unary("/dmoe.ExpertService/Forward")  # bytes in, bytes out
        for _ in range(20):
            code, details = status_of(raw, b"\xff\xfe not a protobuf" * 8, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "undecodable" in details
        code, details = status_of(call_request, endpoint, "Forward", pb.ExpertRequest(uid="u" * 100_000))
        assert code == grpc.StatusCode.NOT_FOUND and len(details) < 300 and "100000 characters" in details
        bad_dtype = pb.Tensor(dtype="d" * 10_000, shape=[1, H], data=b"\0" * 4 * H)
        code, details = status_of(call_request, endpoint, "Forward", pb.ExpertRequest(uid="ffn.0", tensors=[bad_dtype]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300
        code, details = status_of(call, endpoint, "Forward", "ffn.0", [torch.full((2, H), 3e38)])
        assert code == grpc.StatusCode.INTERNAL and "not finite" in details
    finally:
        channel.close()
    (y,) = call(endpoint, "Forward", "ffn.0", [torch.randn(3, H)])  # everyone else is still served
    assert torch.isfinite(y).all()
    log = nodes["ffn_proc"].log_path.read_text()
    assert "Traceback" not in log and "d" * 100 not in log and "u" * 100 not in log


def test_one_peer_cannot_take_the_node(launch):
    """Past --max-calls-per-peer concurrent calls from one address, more get RESOURCE_EXHAUSTED (after a hold);
    the slots come back when the calls end."""
    env = {"DMOE_SLOW_EXPERT_S": "1.5"}
    node = launch("node", ["--experts", "cap.[0:2]", "--expert-cls", "bad_experts:SlowExpert", "--hidden-dim", str(H),
                           "--host", "127.0.0.1", "--max-calls-per-peer", "2", "--num-workers", "2"],
                  name="capped", env=env)
    ep = node.ready["grpc"]
    results: list[object] = []

    def slow_call(uid: str) -> None:
        try:
            results.append(call(ep, "Forward", uid, [torch.randn(1, H)], timeout=30)[0].shape)
        except grpc.RpcError as e:
            results.append(e.code())

    threads = [threading.Thread(target=slow_call, args=(f"cap.{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in range(500):  # both calls are in
        if stub(ep).Ping(pb.PingRequest(), timeout=5).load > 0:
            break
    code, details = status_of(call, ep, "Forward", "cap.0", [torch.randn(1, H)], timeout=5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-calls-per-peer" in details
    for t in threads:
        t.join(30)
    assert results == [torch.Size([1, H])] * 2
    (y,) = call(ep, "Forward", "cap.1", [torch.randn(1, H)], timeout=30)  # slots are back
    assert y.shape == (1, H)


@pytest.mark.parametrize("compression", ["uniform8", "quantile8"])
def test_eight_bit_requests_and_replies(nodes, compression):
    """A node decodes 8-bit inputs and answers in the codec the request asked for (float16 for tiny replies)."""
    ep = nodes["ffn"]["grpc"]
    x = torch.randn(128, H)  # 4096 elements: past the size where a codebook pays off
    request = pb.ExpertRequest(uid="ffn.2", tensors=[serialize_tensor(x, compression)], compression=compression)
    raw = stub(ep).Forward(request, timeout=10)
    assert raw.tensors[0].wire_dtype == compression and len(raw.tensors[0].data) < 0.35 * x.numel() * 4  # + codebook
    (y,) = deserialize_tensors(raw.tensors)
    with torch.no_grad():
        expected = local("ffn.2")(x)
    assert float((y - expected).norm() / expected.norm()) < 0.1
    tiny = pb.ExpertRequest(uid="ffn.2", tensors=serialize_tensors([x[:2]]), compression=compression)
    assert stub(ep).Forward(tiny, timeout=10).tensors[0].wire_dtype == "float16"
