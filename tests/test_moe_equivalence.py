"""RemoteMixtureOfExperts over two real nodes equals the same MoE computed in-process.

Two node processes split a 4x4 grid (``eq``) and a 4x3x2 grid (``g3``); ``LocalMixtureOfExperts``
gets the same gate weights and experts built from the nodes' seed. Outputs, the auxiliary loss
and gradients w.r.t. inputs *and* gate must match.
"""

from __future__ import annotations

import pytest
import torch
from moe_swarm import HIDDEN, local_experts, node_process, start_all, stop_all
from prometheus_client import REGISTRY

from dmoe import LocalMixtureOfExperts, NotEnoughExperts, RemoteMixtureOfExperts, Swarm

pytestmark = pytest.mark.integration  # real processes

GRIDS = {"eq": (4, 4), "g3": (4, 3, 2)}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    logs = tmp_path_factory.mktemp("moe_eq")
    first = start_all([node_process("eq.[0:2].[0:4],g3.[0:2].[0:3].[0:2]", name="a", log_dir=logs)])
    second = start_all([node_process("eq.[2:4].[0:4],g3.[2:4].[0:3].[0:2]", name="b", log_dir=logs,
                                     initial_peers=first[0].ready["dht"])])
    client = Swarm(initial_peers=first[0].ready["dht"])
    yield client
    client.shutdown()
    stop_all(first + second)


def make_pair(swarm: Swarm, prefix: str, k_best: int, **options):
    grid = GRIDS[prefix]
    # generous waits: on a loaded CI box a slow-but-alive call must not be rerouted (that would
    # legitimately change the result); the fault tests cover short ones
    options = {"forward_timeout": 30.0, "timeout_after_k_min": 10.0, **options}
    remote = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=grid, uid_prefix=prefix, swarm=swarm,
                                    k_best=k_best, **options)
    pattern = prefix + "".join(f".[0:{g}]" for g in grid)
    local = LocalMixtureOfExperts(in_features=HIDDEN, grid_size=grid, uid_prefix=prefix,
                                  experts=local_experts(pattern), k_best=k_best)
    local.gate.load_state_dict(remote.gate.state_dict())
    return remote, local


@pytest.mark.parametrize(
    ("prefix", "k_best", "shape"),
    [("eq", 4, (24, HIDDEN)), ("eq", 2, (3, 5, HIDDEN)), ("g3", 3, (16, HIDDEN))],
    ids=["2d-grid", "3d-input", "3d-grid"],
)
def test_outputs_and_gradients_match_local(swarm, prefix, k_best, shape):
    torch.manual_seed(0)
    remote, local = make_pair(swarm, prefix, k_best)
    x_remote = torch.randn(*shape, requires_grad=True)
    x_local = x_remote.detach().clone().requires_grad_(True)
    upstream = torch.randn(*shape)

    y_remote = remote(x_remote)
    y_local = local(x_local)
    assert remote.stats["experts_reached"] == remote.stats["experts_chosen"], remote.stats  # everyone answered
    assert y_remote.shape == shape
    torch.testing.assert_close(y_remote, y_local, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(remote.aux_loss, local.aux_loss)

    ((y_remote * upstream).sum() + remote.aux_loss).backward()
    ((y_local * upstream).sum() + local.aux_loss).backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(remote.gate.proj.weight.grad, local.gate.proj.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(remote.gate.proj.bias.grad, local.gate.proj.bias.grad, rtol=1e-4, atol=1e-5)
    assert remote.stats["backward_steps"] == 1
    assert dict(remote.choices.chosen) == dict(local.choices.chosen)


def test_one_request_per_expert_and_counters(swarm):
    remote, _ = make_pair(swarm, "eq", 4)
    calls = {**swarm.stats["calls"], "batched_calls": swarm.stats["batched_calls"],
             "batched_rpcs": swarm.stats["batched_rpcs"]}
    y = remote(torch.randn(64, HIDDEN))
    forward_calls = swarm.stats["calls"]["forward"] - calls.get("forward", 0)
    assert forward_calls == remote.stats["experts_chosen"] <= 16  # 64 tokens x 4 experts in <= 16 requests
    assert sum(remote.choices.chosen.values()) == 64 * 4
    assert remote.stats["forward_steps"] == 1 and remote.stats["tokens"] == 64
    assert remote.stats["calls"]["forward_answered"] == forward_calls
    y.sum().backward()
    backward_calls = swarm.stats["calls"]["backward"] - calls.get("backward", 0)
    assert backward_calls == forward_calls
    # the calls to each node travelled together: one batch RPC per node and direction, not one per expert
    batched = swarm.stats["batched_calls"] - calls.get("batched_calls", 0)
    assert swarm.stats["batched_rpcs"] - calls.get("batched_rpcs", 0) <= 4 and batched >= forward_calls - 2
    assert 0 < remote.stats["last_search_seconds"] < remote.stats["last_forward_seconds"]
    # the same numbers reach Prometheus (process-wide default registry)
    assert REGISTRY.get_sample_value("dmoe_client_calls_total", {"method": "forward"}) >= forward_calls
    assert REGISTRY.get_sample_value("dmoe_client_call_seconds_count", {"method": "backward"}) >= backward_calls
    assert REGISTRY.get_sample_value("dmoe_client_beam_search_seconds_count") >= 1


def test_aux_loss_is_uniform_one_and_differentiable(swarm):
    remote, _ = make_pair(swarm, "eq", 4)
    torch.nn.init.zeros_(remote.gate.proj.weight)
    torch.nn.init.zeros_(remote.gate.proj.bias)
    remote(torch.randn(8, HIDDEN))
    assert remote.aux_loss is not None and remote.aux_loss.requires_grad
    # zero gate: uniform probabilities, so the loss is g * sum_c f_c / g = 1 whatever the routing
    assert remote.aux_loss.item() == pytest.approx(1.0)


def test_compression_stays_close(swarm):
    torch.manual_seed(1)
    remote, local = make_pair(swarm, "eq", 4, compression="bfloat16")
    x = torch.randn(16, HIDDEN)
    torch.testing.assert_close(remote(x), local(x), rtol=0.05, atol=0.05)


def test_inference_without_grad(swarm):
    remote, local = make_pair(swarm, "eq", 4)
    before = swarm.stats["calls"].get("backward", 0)
    with torch.no_grad():
        y = remote(torch.ones(4, HIDDEN))
        torch.testing.assert_close(y, local(torch.ones(4, HIDDEN)), rtol=1e-5, atol=1e-5)
    assert swarm.stats["calls"].get("backward", 0) == before


def test_backward_trains_experts_even_for_leaf_inputs(swarm):
    remote, _ = make_pair(swarm, "eq", 4)
    before = swarm.stats["calls"].get("backward", 0)
    remote(torch.randn(4, HIDDEN)).sum().backward()  # x needs no grad, the experts still learn
    assert swarm.stats["calls"]["backward"] > before


def test_empty_batch(swarm):
    remote, _ = make_pair(swarm, "eq", 4)
    x = torch.randn(0, 3, HIDDEN, requires_grad=True)
    y = remote(x)
    assert y.shape == (0, 3, HIDDEN)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_grid_with_no_experts(swarm):
    empty = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(2, 2), uid_prefix="nobody", swarm=swarm, k_best=2)
    with pytest.raises(NotEnoughExperts, match="nobody"):
        empty(torch.randn(3, HIDDEN))
    zeros = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(2, 2), uid_prefix="nobody", swarm=swarm, k_best=2,
                                   allow_zero_outputs=True)
    x = torch.randn(3, HIDDEN, requires_grad=True)
    y = zeros(x)
    assert torch.equal(y, torch.zeros(3, HIDDEN))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_options_are_refused(swarm):
    for bad in ({"forward_timeout": None}, {"timeout_after_k_min": float("inf")}, {"backward_timeout": 0},
                {"k_min": 5}, {"compression": "zip"}):
        with pytest.raises(ValueError):
            RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(4, 4), uid_prefix="eq", swarm=swarm, k_best=4,
                                   **bad)
    remote = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(4, 4), uid_prefix="eq", swarm=swarm, k_best=4)
    with pytest.raises(ValueError, match="NaN"):
        remote(torch.full((2, HIDDEN), float("nan")))
    with pytest.raises(ValueError, match=str(HIDDEN)):
        remote(torch.randn(2, HIDDEN + 1))
