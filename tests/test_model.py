"""The trainer's model: shapes, causality, initial loss, in-process experts that match a node's."""

from __future__ import annotations

import math

import pytest
import torch

from dmoe.client.gating import LocalMixtureOfExperts
from dmoe.experts import create_expert
from dmoe.train.model import GPT, ExpertOptimizer, ModelConfig, local_moe_factory

CFG = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, grid_size=(2, 3), k_best=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG, local_moe_factory(CFG, seed=7))


def test_shapes_initial_loss_and_prefixes():
    model = make()
    x = torch.randint(0, 256, (3, 32))
    logits, loss = model(x, x)
    assert logits.shape == (3, 32, 256)
    assert abs(loss.item() - math.log(256)) < 0.3  # near-uniform predictions at init
    assert CFG.prefixes == ["layer0.ffn", "layer1.ffn"]
    aux = model.aux_loss()
    assert aux.shape == () and 0.9 < aux.item() < 3.0
    _, no_loss = model(x)
    assert no_loss is None


def test_attention_is_causal():
    model = make().eval()
    x = torch.randint(0, 256, (1, 32))
    y = x.clone()
    y[0, 20:] = (y[0, 20:] + 1) % 256
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.allclose(a[0, :20], b[0, :20], atol=1e-5)
    assert not torch.allclose(a[0, 20:], b[0, 20:])


def test_local_experts_start_like_a_nodes_and_are_not_local_parameters():
    model = make()
    moe = model.blocks[1].moe
    assert isinstance(moe, LocalMixtureOfExperts)
    assert moe.uids[0] == "layer1.ffn.0.0" and len(moe.uids) == 6
    node_expert = create_expert("ffn", hidden_dim=32, seed=7, uid="layer1.ffn.1.2")
    local_expert = moe.experts[moe.uids.index("layer1.ffn.1.2")]
    for a, b in zip(node_expert.parameters(), local_expert.parameters(), strict=True):
        assert torch.equal(a, b)
    local_ids = {id(p) for p in model.local_parameters()}
    expert_ids = {id(p) for p in model.expert_parameters()}
    assert local_ids.isdisjoint(expert_ids)
    assert len(local_ids) + len(expert_ids) == len(list(model.parameters()))
    # gates are local parameters
    assert id(moe.gate.proj.weight) in local_ids
    # same seed -> same local weights; another seed -> different
    other = make(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.local_parameters(), other.local_parameters(), strict=True))
    assert not torch.equal(make(seed=1).wte.weight, model.wte.weight)


def test_expert_optimizer_steps_only_experts_that_got_gradients():
    model = make()
    opt = ExpertOptimizer(model, lr=1e-2, clip_grad_norm=1.0)
    before = [[p.detach().clone() for p in e.parameters()] for m in model.moe_layers() for e in m.experts]
    x = torch.randint(0, 256, (1, 4))  # 4 tokens x k_best 2: at most 8 of 12 experts are chosen
    _, loss = model(x, x)
    loss.backward()
    used = [any(p.grad is not None for p in e.parameters()) for m in model.moe_layers() for e in m.experts]
    opt.step()
    after = [[p.detach() for p in e.parameters()] for m in model.moe_layers() for e in m.experts]
    changed = [any(not torch.equal(a, b) for a, b in zip(pa, pb, strict=True)) for pa, pb in zip(before, after,
                                                                                             strict=True)]
    assert changed == used
    assert any(used) and not all(used)


def test_a_few_steps_lower_the_loss():
    model = make()
    opt = torch.optim.AdamW(model.local_parameters(), lr=3e-3)
    experts = ExpertOptimizer(model, lr=3e-3)
    x = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(15):
        _, loss = model(x, x.roll(-1, dims=1))
        (loss + 0.01 * model.aux_loss()).backward()
        opt.step()
        experts.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
