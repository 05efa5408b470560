"""Micro-batches in flight: how a trainer hides its links' latency behind its own and its nodes' compute.

One step over a home link is a chain: the forward of MoE layer 1 waits a round trip (plus upload
time) for its experts, then layer 2 waits, then the backward waits on layer 2 and then layer 1.
Meanwhile the trainer's CPU and the nodes that are not computing this step sit idle.

``MicroBatches`` cuts a step's batch (dim 0) into ``micro_batches`` pieces and runs each piece's whole
forward and backward on a thread of its own, all at once, from the same parameters. While one piece
waits on the wire, another computes its local layers, and the nodes compute the experts of several
pieces at the same time: the pieces' waits overlap each other and the compute, so a step tends to the
larger of its compute and one piece's chain of round trips rather than their sum. Torch releases the
interpreter lock in its kernels and in the waits on the swarm's loop, so the threads do overlap.

Effect on the optimization:

* **No staleness.** Every piece runs on the same parameters, and the local update waits for all of
  them: each piece's loss is weighted by its share of the batch's tokens and autograd sums the pieces
  into the same ``.grad`` (torch locks leaf accumulation), so the trainer's update is the full
  batch's gradient, as without micro-batches.
* **Experts take smaller, more frequent steps.** A node applies its optimizer per Backward call (or
  per merged batch), so an expert chosen by several pieces may take up to ``micro_batches`` steps of
  a piece's gradient per trainer step, as if as many trainers shared it.
* The gate's load-balancing loss is the token-weighted mean of the pieces' (each layer keeps its
  ``aux_loss`` per thread: ``dmoe.client.gating.PerThread``).
* A piece that gets too few experts (or any other error) skips the whole batch, as one batch would;
  the others are still waited for, so no thread writes gradients after the skip.

``micro_batches=1`` is exactly the plain step, on the caller's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

# (inputs, targets) -> (LM loss, aux loss) of one piece, both scalars with a graph
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MicroBatches:
    def __init__(self, micro_batches: int) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.micro_batches = micro_batches
        self._pool = (ThreadPoolExecutor(micro_batches, thread_name_prefix="dmoe-micro-batch")
                      if micro_batches > 1 else None)

    def forward_backward(self, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                         aux_weight: float) -> tuple[float, float]:
        """Forward and backward of ``loss + aux_weight * aux`` over the batch; returns (loss, aux) as floats.

        Raises the first piece's error (after every piece has finished)."""
        pieces = min(self.micro_batches, x.shape[0])
        if self._pool is None or pieces == 1:
            return _one(loss_fn, x, y, 1.0, aux_weight)
        total = x.shape[0]
        jobs: list[Future[tuple[float, float]]] = [
            self._pool.submit(_one, loss_fn, xi, yi, xi.shape[0] / total, aux_weight)
            for xi, yi in zip(x.tensor_split(pieces), y.tensor_split(pieces), strict=True)
        ]
        errors = [job.exception() for job in jobs]  # waits for every piece
        for error in errors:
            if error is not None:
                raise error
        loss = sum(job.result()[0] for job in jobs)
        aux = sum(job.result()[1] for job in jobs)
        return float(loss), float(aux)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _one(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, share: float, aux_weight: float) -> tuple[float, float]:
    """One piece: its loss and aux loss (weighted by ``share``) and its backward."""
    loss, aux = loss_fn(x, y)
    total = loss + aux_weight * aux if aux_weight else loss
    (share * total).backward()
    return share * loss.item(), share * aux.item()
