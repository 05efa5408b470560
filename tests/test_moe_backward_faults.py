"""Backward through RemoteMixtureOfExperts when a node fails *after* answering the forward.

Backward must go to the very endpoints that answered the forward, so it cannot fall back to
other experts: a failed expert becomes a constant (its share of the input gradient is dropped).
With ``backward_k_min=0`` (the default) the step always completes; with
``backward_k_min=1`` a token left without any answer raises ``NotEnoughExperts`` naming the
experts. A node frozen between forward and backward holds the backward for about
``timeout_after_k_min``, not for ``backward_timeout``, and is banned.

Node ``A`` serves rows 0-1 of each test grid, a victim per test serves rows 2-3; all real processes.
"""

from __future__ import annotations

import time

import pytest
import torch
from moe_swarm import HIDDEN, local_experts, node_process, start_all, stop_all
from torch import nn

from dmoe import LocalMixtureOfExperts, NotEnoughExperts, RemoteMixtureOfExperts, Swarm

pytestmark = pytest.mark.integration  # real processes

BATCH = 32
VICTIMS = ("bk", "bz", "bn")  # killed (constants), frozen, killed (exception)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("moe_backward_faults")
    a = start_all([node_process(",".join(f"{p}.[0:2].[0:4]" for p in VICTIMS), name="a", log_dir=logs)])[0]
    victims = {p: node_process(f"{p}.[2:4].[0:4]", name=p, log_dir=logs, initial_peers=a.ready["dht"])
               for p in VICTIMS}
    start_all(list(victims.values()))
    yield a, victims
    stop_all([a, *victims.values()])


@pytest.fixture
def swarm(nodes):
    a, _ = nodes
    with Swarm(initial_peers=a.ready["dht"]) as s:
        yield s


class _Constant(nn.Module):
    """An expert whose output carries no gradient: what a failed backward turns it into."""

    def __init__(self, expert: nn.Module) -> None:
        super().__init__()
        self.expert = expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(x).detach()


def layer_for(swarm: Swarm, prefix: str, *, biased: bool, **options) -> RemoteMixtureOfExperts:
    layer = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(4, 4), uid_prefix=prefix, swarm=swarm, k_best=4,
                                   forward_timeout=10.0, **options)
    if biased:  # every token's 4 best experts on rows 2-3: the victim's
        with torch.no_grad():
            layer.gate.proj.weight.mul_(0.05)
            layer.gate.proj.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 4.0, 0.3, 0.1, -0.1, -0.3]))
    return layer


def test_expert_killed_before_backward_becomes_a_constant(swarm, nodes):
    _, victims = nodes
    layer = layer_for(swarm, "bk", biased=False, backward_k_min=0, timeout_after_k_min=1.0)
    local = LocalMixtureOfExperts(
        in_features=HIDDEN, grid_size=(4, 4), uid_prefix="bk", k_best=4,
        experts={uid: (_Constant(e) if int(uid.split(".")[1]) >= 2 else e)
                 for uid, e in local_experts("bk.[0:4].[0:4]").items()},
    )
    local.gate.load_state_dict(layer.gate.state_dict())
    x_remote = torch.randn(BATCH, HIDDEN, requires_grad=True)
    x_local = x_remote.detach().clone().requires_grad_(True)
    y_remote = layer(x_remote)
    answered = set(layer.choices.answered)
    assert any(uid.startswith(("bk.2.", "bk.3.")) for uid in answered)  # the victim took part in forward

    victims["bk"].kill()
    started = time.monotonic()
    y_remote.pow(2).sum().backward()
    elapsed = time.monotonic() - started
    assert elapsed < layer.backward_timeout / 2  # refused connections fail fast
    assert layer.stats["not_enough_backward"] == 0 and swarm.stats["failures"].get("unreachable", 0) >= 1

    y_local = local(x_local)
    torch.testing.assert_close(y_remote, y_local, rtol=1e-4, atol=1e-4)
    y_local.pow(2).sum().backward()
    # the victim's outputs count as constants: gradient through A's experts and the gate only
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(layer.gate.proj.weight.grad, local.gate.proj.weight.grad, rtol=1e-3, atol=1e-4)


def test_node_frozen_before_backward_holds_it_briefly_and_is_banned(swarm, nodes):
    _, victims = nodes
    victim = victims["bz"]
    layer = layer_for(swarm, "bz", biased=False, backward_k_min=0, timeout_after_k_min=0.5, backward_timeout=20.0)
    x = torch.randn(BATCH, HIDDEN, requires_grad=True)
    layer(x).sum().backward()  # one clean step: the victim answers forward and backward
    assert swarm.health.rtt(victim.ready["grpc"]) is not None

    y = layer(x)
    victim.freeze()
    try:
        started = time.monotonic()
        y.pow(2).sum().backward()
        elapsed = time.monotonic() - started
        assert elapsed < 5.0  # stuck after ~timeout_after_k_min; backward_timeout is 20 s
        assert layer.stats["suspected"] >= 1 and layer.stats["not_enough_backward"] == 0
        assert swarm.health.is_banned(victim.ready["grpc"])
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        victim.resume()


def test_token_without_any_backward_answer_raises_by_default(swarm, nodes):
    _, victims = nodes
    layer = layer_for(swarm, "bn", biased=True, backward_k_min=1, timeout_after_k_min=1.0)
    x = torch.randn(BATCH, HIDDEN, requires_grad=True)
    y = layer(x)
    assert set(layer.choices.answered) <= {f"bn.{i}.{j}" for i in (2, 3) for j in range(4)}  # all on the victim

    victims["bn"].kill()
    started = time.monotonic()
    with pytest.raises(NotEnoughExperts) as info:
        y.sum().backward()
    assert time.monotonic() - started < layer.backward_timeout / 2
    message = str(info.value)
    assert message.startswith(f"backward: {BATCH} of {BATCH} tokens") and "backward_timeout=20s" in message
    assert set(info.value.missing) and set(info.value.missing) <= {f"bn.{i}.{j}" for i in (2, 3) for j in range(4)}
