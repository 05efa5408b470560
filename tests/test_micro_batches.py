"""Micro-batches in flight (dmoe.train.pipeline): the same gradient as one batch, per-thread aux losses, skips."""

from __future__ import annotations

import threading

import pytest
import torch

from dmoe.errors import NotEnoughExperts
from dmoe.train.model import GPT, ModelConfig, local_moe_factory
from dmoe.train.pipeline import MicroBatches

CFG = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, grid_size=(2, 2), k_best=2)


def _grads(micro_batches: int) -> tuple[dict[str, torch.Tensor], float, float]:
    torch.manual_seed(0)
    model = GPT(CFG, local_moe_factory(CFG, seed=0))
    x = torch.randint(0, 256, (6, CFG.block_size), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    threads: set[str] = set()

    def losses(xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        threads.add(threading.current_thread().name)
        _, loss = model(xi, yi)
        return loss, model.aux_loss()

    micro = MicroBatches(micro_batches)
    loss, aux = micro.forward_backward(losses, x, y, aux_weight=0.0)  # exact: the aux loss is per piece
    micro.close()
    assert len(threads) == micro_batches  # the pieces ran on threads of their own
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss, aux


def test_pieces_on_threads_give_the_whole_batchs_gradient_and_loss():
    whole, loss, aux = _grads(1)
    for m in (2, 3):
        pieces, loss_m, aux_m = _grads(m)
        assert pieces.keys() == whole.keys()
        for name, g in whole.items():
            assert torch.allclose(pieces[name], g, atol=1e-5, rtol=1e-4), (m, name)
        assert loss_m == pytest.approx(loss, rel=1e-5)
        # the balancing loss is per piece (routing fractions within each), so only close to the whole batch's
        assert aux_m == pytest.approx(aux, rel=0.2)


def test_a_piece_that_fails_skips_the_batch_after_every_piece_finished():
    finished: list[int] = []

    def losses(xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(xi[0, 0]) == 0:
            raise NotEnoughExperts("forward: 1 of 4 tokens got fewer than 1 expert answers", missing=[], deadline=1.0)
        w = torch.ones((), requires_grad=True)
        finished.append(int(xi[0, 0]))
        return w * xi.float().mean(), torch.zeros(())

    micro = MicroBatches(3)
    x = torch.arange(3).repeat_interleave(2).reshape(6, 1)
    with pytest.raises(NotEnoughExperts):
        micro.forward_backward(losses, x, x, aux_weight=0.0)
    assert sorted(finished) == [1, 2]
    micro.close()
    with pytest.raises(ValueError, match="micro_batches"):
        MicroBatches(0)
