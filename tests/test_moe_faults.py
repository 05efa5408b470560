"""RemoteMixtureOfExperts keeps training through crashed, frozen, garbage-answering and vanished nodes.

A bootstrap node ``A`` serves the healthy half of every test grid; each test has its own victim
node(s) for the other half (all started together) and hurts them with real signals. The gate is
biased so that *every* token's best experts live on the victim: a step can only complete by
falling back to A's experts. Once the victim is out, the layer must compute exactly what an in-process MoE over
A's experts computes (same gate, same expert weights).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from moe_swarm import HIDDEN, local_experts, node_process, start_all, stop_all

from dmoe import LocalMixtureOfExperts, NotEnoughExperts, RemoteMixtureOfExperts, Swarm

pytestmark = pytest.mark.integration  # real processes

PREFIXES = ("kb", "km", "fz", "gb")  # kill between steps, kill mid-forward, freeze, garbage
BATCH = 32


VICTIMS = {  # name -> (experts, expert class, environment); all started together, each hurt by one test
    "kb": ("kb.[2:4].[0:4]", "ffn", {}),
    "km": ("km.[2:4].[0:4]", "bad_experts:SlowExpert", {"DMOE_SLOW_EXPERT_S": "60"}),
    "fz": ("fz.[2:4].[0:4]", "ffn", {}),
    "gb": ("gb.[2:4].[0:4]", "bad_experts:NaNExpert", {}),
    "rp0": ("rp.[0:2].[0:2]", "ffn", {}),
    "rp1": ("rp.[0:2].[0:2]", "ffn", {}),
}


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    logs = tmp_path_factory.mktemp("moe_faults")
    procs = start_all([node_process(",".join(f"{p}.[0:2].[0:4]" for p in PREFIXES), name="a", log_dir=logs)])
    yield procs[0], logs
    stop_all(procs)


@pytest.fixture(scope="module")
def victims(bootstrap):
    """Every victim node, started in parallel once the bootstrap node is up."""
    a, logs = bootstrap
    procs = {name: node_process(experts, name=name, log_dir=logs, expert_cls=cls, initial_peers=a.ready["dht"],
                                env=env) for name, (experts, cls, env) in VICTIMS.items()}
    start_all(list(procs.values()))
    yield procs
    stop_all(list(procs.values()))


@pytest.fixture
def swarm(bootstrap):
    a, _ = bootstrap
    with Swarm(initial_peers=a.ready["dht"]) as s:
        yield s


def biased_layer(swarm: Swarm, prefix: str, **options) -> RemoteMixtureOfExperts:
    """A 4x4 layer whose gate sends every token to rows 2-3 of the grid (the victim's experts)."""
    layer = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(4, 4), uid_prefix=prefix, swarm=swarm, k_best=4,
                                   **options)
    with torch.no_grad():
        layer.gate.proj.weight.mul_(0.05)
        layer.gate.proj.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 4.0, 0.3, 0.1, -0.1, -0.3]))
    return layer


def local_twin(layer: RemoteMixtureOfExperts, prefix: str) -> LocalMixtureOfExperts:
    """The same MoE computed in-process over the healthy node's experts only."""
    local = LocalMixtureOfExperts(in_features=HIDDEN, grid_size=(4, 4), uid_prefix=prefix,
                                  experts=local_experts(f"{prefix}.[0:2].[0:4]"), k_best=4)
    local.gate.load_state_dict(layer.gate.state_dict())
    return local


def step(layer: RemoteMixtureOfExperts, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    started = time.monotonic()
    y = layer(x)
    (y.pow(2).mean() + 0.01 * layer.aux_loss).backward()
    return y, time.monotonic() - started


def answered_uids(layer: RemoteMixtureOfExperts, before: dict[str, int] | None = None) -> set[str]:
    """Experts that answered since the ``before`` snapshot of ``layer.choices.answered``."""
    before = before or {}
    return {uid for uid, n in layer.choices.answered.items() if n > before.get(uid, 0)}


def assert_matches_healthy_half(layer: RemoteMixtureOfExperts, prefix: str, x: torch.Tensor) -> None:
    local = local_twin(layer, prefix)
    x_remote = x.clone().requires_grad_(True)
    x_local = x.clone().requires_grad_(True)
    y_remote, y_local = layer(x_remote), local(x_local)
    torch.testing.assert_close(y_remote, y_local, rtol=1e-4, atol=1e-4)
    y_remote.sum().backward()
    y_local.sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=1e-3, atol=1e-4)


def process_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` ('T' = stopped), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def all_stopped(pids: list[int], timeout: float = 10.0) -> bool:
    """SIGSTOP takes effect once each target is scheduled: poll until all are stopped."""
    deadline = time.monotonic() + timeout
    while not all(process_state(pid) == "T" for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_node_killed_between_steps(swarm, victims):
    victim = victims["kb"]
    endpoint = victim.ready["grpc"]
    layer = biased_layer(swarm, "kb", forward_timeout=10.0, timeout_after_k_min=1.0)
    x = torch.randn(BATCH, HIDDEN)
    step(layer, x)
    assert answered_uids(layer) <= {f"kb.{i}.{j}" for i in (2, 3) for j in range(4)}  # all on the victim

    victim.kill()
    y, elapsed = step(layer, x)
    assert torch.isfinite(y).all()
    assert layer.stats["not_enough"] == 0
    assert layer.stats["reroutes"] >= BATCH  # every token fell back to the healthy node
    assert swarm.stats["failures"].get("unreachable", 0) >= 1
    assert elapsed < layer.forward_timeout  # refused connections fail fast: no deadline waited out
    assert swarm.health.is_banned(endpoint)

    failures = dict(swarm.stats["failures"])
    assert_matches_healthy_half(layer, "kb", torch.randn(BATCH, HIDDEN))
    assert dict(swarm.stats["failures"]) == failures  # banned: the dead node is not even tried


def test_node_killed_in_the_middle_of_a_forward(swarm, victims):
    victim = victims["km"]
    layer = biased_layer(swarm, "km", forward_timeout=30.0, timeout_after_k_min=1.0)
    x = torch.randn(BATCH, HIDDEN)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        victim.kill()

    killer = threading.Timer(2.0, kill)  # the slow expert holds every call for 60 s
    started = time.monotonic()
    killer.start()
    try:
        y = layer(x)
        finished = time.monotonic()
    finally:
        killer.join()
    assert killed_at and killed_at[0] < finished < started + 30.0  # after the kill, long before the slow expert
    assert torch.isfinite(y).all() and layer.stats["not_enough"] == 0
    assert layer.stats["reroutes"] >= BATCH
    assert answered_uids(layer) <= {f"km.{i}.{j}" for i in (0, 1) for j in range(4)}
    torch.testing.assert_close(y, local_twin(layer, "km")(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()  # backward goes to the experts that answered: all alive


def test_frozen_node_is_bounded_by_the_deadline_and_banned(swarm, victims):
    victim = victims["fz"]
    endpoint = victim.ready["grpc"]
    forward_timeout = 10.0
    layer = biased_layer(swarm, "fz", forward_timeout=forward_timeout, timeout_after_k_min=0.5, backward_timeout=10.0)
    x = torch.randn(BATCH, HIDDEN)
    step(layer, x)
    assert swarm.health.rtt(endpoint) is not None

    helpers = victim.freeze()
    assert helpers and all_stopped(helpers)  # its DHT daemon (p2pd) answers nothing either
    answered = dict(layer.choices.answered)
    started = time.monotonic()
    y = layer(x)
    forward_elapsed = time.monotonic() - started
    y.sum().backward()
    assert forward_elapsed < forward_timeout + 1.0
    assert torch.isfinite(y).all() and layer.stats["not_enough"] == 0
    assert layer.stats["suspected"] >= 1
    assert answered_uids(layer, answered) <= {f"fz.{i}.{j}" for i in (0, 1) for j in range(4)}
    assert swarm.health.is_banned(endpoint)  # the next step will not wait for it again

    suspected, failures = layer.stats["suspected"], dict(swarm.stats["failures"])
    _, elapsed = step(layer, x)
    assert elapsed < forward_timeout
    assert layer.stats["suspected"] == suspected and dict(swarm.stats["failures"]) == failures  # frozen node skipped
    assert_matches_healthy_half(layer, "fz", torch.randn(8, HIDDEN))


def test_garbage_answers_are_excluded(swarm, victims):
    victim = victims["gb"]
    layer = biased_layer(swarm, "gb", forward_timeout=10.0, timeout_after_k_min=1.0)
    x = torch.randn(BATCH, HIDDEN)
    y, _ = step(layer, x)
    assert torch.isfinite(y).all()
    assert swarm.stats["failures"].get("rejected", 0) >= 1  # the node refuses to answer its NaN (INTERNAL)
    assert answered_uids(layer) <= {f"gb.{i}.{j}" for i in (0, 1) for j in range(4)}
    assert swarm.health.is_banned(victim.ready["grpc"])
    assert_matches_healthy_half(layer, "gb", x)


def test_replica_pair_loses_nothing_then_all_gone(swarm, victims):
    pair = [victims["rp0"], victims["rp1"]]
    endpoints = [p.ready["grpc"] for p in pair]
    layer = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(2, 2), uid_prefix="rp", swarm=swarm, k_best=4,
                                   k_min=4, forward_timeout=10.0, timeout_after_k_min=1.0)
    local = LocalMixtureOfExperts(in_features=HIDDEN, grid_size=(2, 2), uid_prefix="rp",
                                  experts=local_experts("rp.[0:2].[0:2]"), k_best=4)
    local.gate.load_state_dict(layer.gate.state_dict())
    x = torch.randn(BATCH, HIDDEN)
    step(layer, x)
    step(layer, x)  # both replicas measured

    preferred = swarm.health.order(endpoints)[0]
    for _ in range(20):  # make it the clear favourite: the first attempt is drawn by 1 / wait**2
        swarm.health.record_success(preferred, 1e-4)
    pair[endpoints.index(preferred)].kill()
    retries, hedges = swarm.stats["retries"], swarm.stats["hedges"]
    y, elapsed = step(layer, x)
    # every expert reached its other replica: retried after the refusal, or hedged there first when the refusal
    # took longer than the hedge delay (the favourite's p95 is tiny here; a loaded machine refuses slowly)
    assert swarm.stats["retries"] - retries + swarm.stats["hedges"] - hedges >= 4
    assert layer.stats["not_enough"] == 0  # k_min=4: no token lost any of its 4 experts
    assert elapsed < layer.forward_timeout
    torch.testing.assert_close(y, local(x), rtol=1e-4, atol=1e-4)  # replicas share the seed

    pair[1 - endpoints.index(preferred)].kill()
    started = time.monotonic()
    with pytest.raises(NotEnoughExperts) as info:
        layer(x)
    assert time.monotonic() - started < layer.forward_timeout  # refused at once, no deadline waited out
    message = str(info.value)
    assert "forward_timeout=10s" in message and "rp.0.0" in message
    assert info.value.deadline == 10.0 and set(info.value.missing) <= {"rp.0.0", "rp.0.1", "rp.1.0", "rp.1.1"}

    zeros = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(2, 2), uid_prefix="rp", swarm=swarm, k_best=4,
                                   forward_timeout=10.0, allow_zero_outputs=True)
    x = torch.randn(BATCH, HIDDEN, requires_grad=True)
    y, _ = step(zeros, x)
    assert torch.equal(y, torch.zeros_like(y))  # zeros, never NaN
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert zeros.stats["zero_tokens"] == BATCH
    assert np.isfinite(zeros.aux_loss.item())
