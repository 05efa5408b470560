"""Kept forwards (``dmoe.node.activations``): a backward through a kept graph gives exactly what recomputing
gives, falls back when the weights moved in between, and the cache respects its memory cap and expiry.
Real experts, optimizers and autograd; no processes."""

from __future__ import annotations

import time

import torch
from dmoe.node.activations import ActivationCache
from dmoe.node.backend import ExpertBackend

from dmoe.config.node import OptimizerOptions
from dmoe.experts import create_expert, expert_schema

H = 16


def backend() -> ExpertBackend:
    module = create_expert("ffn", hidden_dim=H, seed=0, uid="ffn.0.0")
    return ExpertBackend("ffn.0.0", module, schema=expert_schema(module, H), expert_cls="ffn", hidden_dim=H,
                         optimizer=OptimizerOptions())


def test_a_kept_forward_serves_its_backward_exactly_like_recomputing():
    gen = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(3, H, generator=gen), torch.randn(5, H, generator=gen)
    ga, gb = torch.randn(3, H, generator=gen), torch.randn(5, H, generator=gen)
    kept, plain = backend(), backend()
    cache = ActivationCache(max_bytes=2**20, ttl=30)

    out = kept.forward_kept([torch.cat([xa, xb])], {"a": (0, 3), "b": (3, 8)}, cache)
    assert torch.allclose(out[0], plain.forward([torch.cat([xa, xb])])[0], atol=1e-6)
    assert cache.bytes > 0
    # the backward of both calls, in another order than the forward merged them
    grads = kept.backward_calls([[xb, gb], [xa, ga]], ["b", "a"], cache)
    assert cache.hits == 2 and cache.misses == 0 and cache.bytes == 0  # used once, then gone
    expected = plain.backward_calls([[xb, gb], [xa, ga]], ["", ""], None)
    assert torch.allclose(grads[0], expected[0], atol=1e-6)
    for p, q in zip(kept.module.parameters(), plain.module.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7)  # the same optimizer step
    assert kept.updates == plain.updates == 1


def test_a_backward_recomputes_when_its_forward_batch_is_split_or_the_weights_moved():
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, H, generator=gen), torch.randn(4, H, generator=gen)
    b = backend()
    cache = ActivationCache(max_bytes=2**20, ttl=30)
    b.forward_kept([torch.cat([x, x])], {"a": (0, 4), "b": (4, 8)}, cache)
    b.backward_calls([[x, g]], ["a"], cache)  # only one of the two calls: recomputed
    assert cache.hits == 0 and cache.misses == 1

    c = backend()
    cache = ActivationCache(max_bytes=2**20, ttl=30)
    c.forward_kept([x], {"a": (0, 4)}, cache)
    c.backward_calls([[x, g]], [""], None)  # another trainer's step moves the weights in place
    reference = backend()
    reference.backward_calls([[x, g]], [""], None)
    grads = c.backward_calls([[x, g]], ["a"], cache)  # autograd refuses the stale graph: recomputed instead
    expected = reference.backward_calls([[x, g]], [""], None)
    assert torch.allclose(grads[0], expected[0], atol=1e-6)


def test_the_cache_keeps_within_its_cap_and_drops_what_expired():
    b = backend()
    x = torch.randn(64, H)
    cache = ActivationCache(max_bytes=2**20, ttl=30)
    b.forward_kept([x], {"one": (0, 64)}, cache)
    one = cache.bytes
    cache.max_bytes = int(one * 2.5)
    for i in range(5):
        b.forward_kept([x], {f"c{i}": (0, 64)}, cache)
    assert cache.bytes <= cache.max_bytes and cache.evicted >= 3
    assert cache.claim(b.uid, ["one"]) == []  # the oldest went first
    short = ActivationCache(max_bytes=2**20, ttl=0.01)
    b.forward_kept([x], {"late": (0, 64)}, short)
    time.sleep(0.05)
    assert short.claim(b.uid, ["late"]) == [] and short.bytes == 0
