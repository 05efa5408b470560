"""In-process tests of the node's building blocks: experts, ExpertBackend, request checks, BatchScheduler.

The scheduler tests use real backends and a real thread pool; a gate module blocks the worker so
queue states (merging, fairness, deadlines, admission) are deterministic on a slow machine.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from dmoe.node.backend import ExpertBackend
from dmoe.node.batching import BatchScheduler
from dmoe.node.metrics import NodeMetrics
from dmoe.node.validation import RpcFailure, batch_signature, check_request
from torch import nn

from dmoe.config.node import BatchingOptions, OptimizerOptions
from dmoe.errors import ConfigError
from dmoe.experts import ExpertSchema, TensorSchema, create_expert, default_schema, expert_schema, load_expert_class
from dmoe.wire.codec import BACKWARD, FORWARD, deserialize_tensors

H = 16


def make_backend(uid: str, module: nn.Module | None = None, *, expert_cls: str = "ffn", lr: float = 1e-2,
                 optimizer: str = "adam", clip: float = 1.0) -> ExpertBackend:
    module = module if module is not None else create_expert(expert_cls, hidden_dim=H, seed=1, uid=uid)
    return ExpertBackend(uid, module, schema=expert_schema(module, H), expert_cls=expert_cls, hidden_dim=H,
                         optimizer=OptimizerOptions(optimizer=optimizer, lr=lr, clip_grad_norm=clip))


def test_experts_are_reproducible_per_seed_and_uid():
    a = create_expert("ffn", hidden_dim=H, seed=3, uid="ffn.0")
    b = create_expert("ffn", hidden_dim=H, seed=3, uid="ffn.0")
    c = create_expert("ffn", hidden_dim=H, seed=3, uid="ffn.1")
    d = create_expert("ffn", hidden_dim=H, seed=4, uid="ffn.0")
    x = torch.randn(5, H)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert not torch.allclose(a(x), d(x))
    state = torch.random.get_rng_state()
    create_expert("transformer", hidden_dim=H, seed=3, uid="t.0")
    assert torch.equal(state, torch.random.get_rng_state()), "building an expert must not disturb the global RNG"


def test_expert_classes_and_schemas():
    assert expert_schema(create_expert("ffn", hidden_dim=H, uid="f.0"), H) == default_schema(H)
    t = create_expert("transformer", hidden_dim=H, uid="t.0")
    assert expert_schema(t, H).inputs[0].shape == (-1, -1, H)
    assert t(torch.randn(2, 5, H)).shape == (2, 5, H)
    custom = create_expert("bad_experts:TwoInputExpert", hidden_dim=H, uid="c.0")
    assert len(expert_schema(custom, H).inputs) == 2
    for bad in ("nope", "no_such_module_xyz:Foo", "torch:tensor", "bad_experts:"):
        with pytest.raises(ConfigError):
            load_expert_class(bad)


@pytest.mark.parametrize("expert_cls,shape", [("ffn", (6, H)), ("transformer", (2, 3, H))])
def test_backend_matches_local_module_and_trains(expert_cls, shape):
    uid = f"{expert_cls}.0"
    backend = make_backend(uid, expert_cls=expert_cls, lr=1e-2)
    local = create_expert(expert_cls, hidden_dim=H, seed=1, uid=uid)
    opt = torch.optim.Adam(local.parameters(), lr=1e-2)
    x, g = torch.randn(*shape), torch.randn(*shape)

    assert torch.allclose(backend.forward([x])[0], local(x), atol=1e-6)

    xl = x.clone().requires_grad_()
    local(xl).backward(g)
    torch.nn.utils.clip_grad_norm_(local.parameters(), 1.0)
    opt.step()
    (grad,) = backend.backward([x], [g])
    assert torch.allclose(grad, xl.grad, atol=1e-6)
    assert backend.updates == 1
    with torch.no_grad():
        assert torch.allclose(backend.forward([x])[0], local(x), atol=1e-5), "weights after one step must match"
    assert not torch.allclose(backend.forward([x])[0], create_expert(expert_cls, hidden_dim=H, seed=1, uid=uid)(x))


def test_backend_state_dict_round_trip():
    a, b = make_backend("ffn.0"), make_backend("ffn.1")
    x, g = torch.randn(4, H), torch.randn(4, H)
    a.backward([x], [g])
    b.load_state_dict(a.state_dict())
    assert b.updates == 1
    assert torch.equal(a.forward([x])[0], b.forward([x])[0])
    a.backward([x], [g])
    b.backward([x], [g])
    assert torch.allclose(a.forward([x])[0], b.forward([x])[0], atol=1e-6), "optimizer state restored too"


def test_check_request_names_each_problem():
    schema = default_schema(H)
    ok = torch.randn(3, H)
    assert check_request(schema, [ok], backward=False) == 3
    assert check_request(schema, [ok, torch.randn(3, H)], backward=True) == 3
    cases = {
        "tensors": ([ok, ok], False),
        "dtype": ([ok.double()], False),
        "rank": ([ok[None]], False),
        "dim 1": ([torch.randn(3, H + 1)], False),
        "NaN": ([torch.full((3, H), float("nan"))], False),
        "empty batch": ([torch.randn(0, H)], False),
        "grad_output 0: shape": ([ok, torch.randn(2, H)], True),
    }
    for needle, (tensors, backward) in cases.items():
        with pytest.raises(RpcFailure) as info:
            check_request(schema, tensors, backward=backward)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details, (needle, info.value.details)
    with pytest.raises(RpcFailure, match="inf|Inf"):
        check_request(schema, [torch.full((3, H), float("inf"))], backward=False)
    # transformer: free seq dim of the output follows the input's
    seq = TensorSchema("float32", (-1, -1, H))
    tschema = ExpertSchema(inputs=(seq,), outputs=(seq,))
    assert check_request(tschema, [torch.randn(2, 5, H), torch.randn(2, 5, H)], backward=True) == 2
    with pytest.raises(RpcFailure, match="grad_output 0"):
        check_request(tschema, [torch.randn(2, 5, H), torch.randn(2, 4, H)], backward=True)


class GatedExpert(nn.Module):
    """Records the batches it sees; blocks while ``gate`` is clear (deterministic queue states)."""

    def __init__(self, name: str, log: list, gate: threading.Event) -> None:
        super().__init__()
        self.name, self.log, self.gate = name, log, gate
        self.lin = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, x.shape[0]))
        assert self.gate.wait(30)
        return self.lin(x)


def make_scheduler(names: list[str], **options) -> tuple[BatchScheduler, list, threading.Event, dict]:
    log: list = []
    gate = threading.Event()
    backends = {n: make_backend(n, GatedExpert(n, log, gate)) for n in names}
    sched = BatchScheduler(backends, options=BatchingOptions(**options), metrics=NodeMetrics())
    return sched, log, gate, backends


async def _submit(sched: BatchScheduler, uid: str, rows: int, kind: str = FORWARD, timeout: float | None = None,
                  value: float | None = None, peer: str = ""):
    x = torch.randn(rows, H) if value is None else torch.full((rows, H), value)
    tensors = [x] if kind == FORWARD else [x, torch.randn(rows, H)]
    out = await sched.submit(uid, kind, tensors, rows=rows, signature=batch_signature(tensors),
                             compression="", timeout=timeout, peer=peer)
    return x, deserialize_tensors(out)


async def _until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_requests_arriving_while_busy_merge_into_one_batch_and_split_back():
    async def main():
        sched, log, gate, backends = make_scheduler(["a.0"], max_batch_size=64)
        first = asyncio.create_task(_submit(sched, "a.0", 2))
        await _until(lambda: len(log) == 1)  # worker busy with the first request
        rest = [asyncio.create_task(_submit(sched, "a.0", rows, value=float(i)))
                for i, rows in enumerate([1, 3, 5, 7])]
        await _until(lambda: sched.queued_requests == 4)
        gate.set()
        await first
        results = await asyncio.gather(*rest)
        assert log == [("a.0", 2), ("a.0", 16)], log
        lin = backends["a.0"].module.lin
        for x, (y,) in results:  # each caller gets exactly its own rows back
            assert torch.allclose(y, lin(x).detach(), atol=1e-6)
        sched.close()

    asyncio.run(main())


def test_lone_request_starts_at_once_and_max_batch_size_caps_merging():
    async def main():
        sched, log, gate, _ = make_scheduler(["a.0"], max_batch_size=4)
        gate.set()
        await _submit(sched, "a.0", 3)  # idle worker: no waiting for companions
        gate.clear()
        first = asyncio.create_task(_submit(sched, "a.0", 1))
        await _until(lambda: len(log) == 2)
        rest = [asyncio.create_task(_submit(sched, "a.0", 2)) for _ in range(3)]
        big = asyncio.create_task(_submit(sched, "a.0", 9))  # larger than a batch: runs alone
        await _until(lambda: sched.queued_requests == 4)
        gate.set()
        await asyncio.gather(first, *rest, big)
        assert log == [("a.0", 3), ("a.0", 1), ("a.0", 4), ("a.0", 2), ("a.0", 9)], log
        sched.close()

    asyncio.run(main())


def test_max_batch_delay_lets_an_idle_worker_wait_for_companions():
    async def main():
        sched, log, gate, _ = make_scheduler(["a.0"], max_batch_size=64, max_batch_delay_ms=300)
        gate.set()
        tasks = [asyncio.create_task(_submit(sched, "a.0", 2))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(_submit(sched, "a.0", 3)))
        await asyncio.gather(*tasks)
        assert log == [("a.0", 5)], log
        sched.close()

    asyncio.run(main())


def test_experts_are_served_oldest_first():  # one peer: first come, first served
    async def main():
        sched, log, gate, _ = make_scheduler(["a.0", "b.0", "c.0"], max_batch_size=1)
        first = asyncio.create_task(_submit(sched, "c.0", 1))
        await _until(lambda: len(log) == 1)
        order = ["a.0", "b.0", "a.0", "a.0", "b.0"]
        tasks = []
        for uid in order:
            tasks.append(asyncio.create_task(_submit(sched, uid, 1)))
            n = len(tasks)
            await _until(lambda n=n: sched.queued_requests == n)
        gate.set()
        await asyncio.gather(first, *tasks)
        assert [name for name, _ in log[1:]] == order
        sched.close()

    asyncio.run(main())


def test_a_peer_with_a_backlog_gets_its_share_and_another_peer_goes_next():
    async def main():
        sched, log, gate, _ = make_scheduler(["a.0", "b.0"], max_batch_size=4)
        first = asyncio.create_task(_submit(sched, "a.0", 4, peer="flood"))
        await _until(lambda: len(log) == 1)
        tasks = []
        for i in range(6):  # the flooder's backlog, on both experts, queued before the other peer's call
            tasks.append(asyncio.create_task(_submit(sched, ("a.0", "b.0")[i % 2], 4, peer="flood")))
            await _until(lambda n=i + 1: sched.queued_requests == n)
        quiet = asyncio.create_task(_submit(sched, "b.0", 1, peer="quiet"))
        await _until(lambda: sched.queued_requests == 7)
        gate.set()
        await asyncio.gather(first, *tasks, quiet)
        assert log[1] == ("b.0", 1), log  # right after the batch in compute, ahead of the older backlog
        assert sorted(log[2:]) == [("a.0", 4)] * 3 + [("b.0", 4)] * 3, log
        sched.close()

    asyncio.run(main())


def test_deadline_passed_in_queue_is_dropped_without_compute():
    async def main():
        sched, log, gate, _ = make_scheduler(["a.0"])
        first = asyncio.create_task(_submit(sched, "a.0", 1))
        await _until(lambda: len(log) == 1)
        late = asyncio.create_task(_submit(sched, "a.0", 7, timeout=0.05))
        await asyncio.sleep(0.2)
        gate.set()
        await first
        with pytest.raises(RpcFailure) as info:
            await late
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert log == [("a.0", 1)], "the expired request must not be computed"
        assert sched.queued_rows == 0
        sched.close()

    asyncio.run(main())


def test_queue_limit_rejects_at_once_and_recovers():
    async def main():
        sched, log, gate, _ = make_scheduler(["a.0", "b.0"], max_queued_rows=8)
        first = asyncio.create_task(_submit(sched, "a.0", 4))
        await _until(lambda: len(log) == 1)
        queued = [asyncio.create_task(_submit(sched, "b.0" if i else "a.0", 4)) for i in range(2)]
        await _until(lambda: sched.queued_rows == 8)
        with pytest.raises(RpcFailure) as info:
            await _submit(sched, "a.0", 1)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in info.value.details
        assert sched.load == pytest.approx(12 / 1024)
        gate.set()
        await asyncio.gather(first, *queued)
        await _submit(sched, "a.0", 8)
        sched.close()

    asyncio.run(main())


def test_failing_request_in_a_batch_fails_alone():
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(H, H)
            self.gate = threading.Event()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            assert self.gate.wait(30)
            if (x > 100).any():
                raise ValueError("poison row")
            return self.lin(x)

    async def main():
        module = Picky()
        sched = BatchScheduler({"p.0": make_backend("p.0", module)}, options=BatchingOptions(), metrics=NodeMetrics())
        first = asyncio.create_task(_submit(sched, "p.0", 1, value=0.0))
        await _until(lambda: module.calls == 1)
        good = asyncio.create_task(_submit(sched, "p.0", 2, value=1.0))
        bad = asyncio.create_task(_submit(sched, "p.0", 2, value=1000.0))
        await _until(lambda: sched.queued_requests == 2)
        module.gate.set()
        await first
        x, (y,) = await good
        assert torch.allclose(y, module.lin(x).detach())
        with pytest.raises(RpcFailure) as info:
            await bad
        assert info.value.code == grpc.StatusCode.INTERNAL and "poison row" in info.value.details
        sched.close()

    asyncio.run(main())


def test_backward_through_scheduler_counts_updates():
    async def main():
        sched, log, gate, backends = make_scheduler(["a.0"])
        gate.set()
        _, grads = await _submit(sched, "a.0", 3, kind=BACKWARD)
        assert grads[0].shape == (3, H)
        assert backends["a.0"].updates == 1
        sched.close()

    asyncio.run(main())
