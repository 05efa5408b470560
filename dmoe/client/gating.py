"""The gate of a grid mixture-of-experts, shared by the remote layer and the in-process baseline.

Shapes: ``N`` tokens (rows), ``D`` features, ``k`` expert slots per token, ``d`` grid dimensions,
``g_j`` the size of dimension ``j``.

* ``GridGate`` scores every grid dimension with one linear map: ``x (N, D) -> [(N, g_j)]``.
* An expert's logit is the sum of its coordinates' scores (``expert_logits``), so the best experts
  can be found by searching prefixes of the grid (``dmoe.client.beam_search``) instead of scoring every
  expert.
* ``combine_outputs`` softmaxes the logits over the experts that *answered* (renormalized over
  them) and mixes their outputs; a token with no answer gets an exact zero row, never NaN.
* ``load_balancing_loss``: the Switch Transformer auxiliary loss, taken per grid dimension --
  ``g_j * sum_c f_j[c] * P_j[c]`` with ``f_j[c]`` the fraction of routed slots whose coordinate
  ``j`` is ``c`` and ``P_j[c]`` the mean gate probability of ``c`` -- averaged over dimensions.
  It is 1.0 under perfectly uniform routing and grows as routing collapses.
* ``LocalMixtureOfExperts`` runs the same gate over in-process modules keyed by uid with an
  exhaustive top-k: the baseline a trainer compares against, and the reference the tests check
  the remote layer against (same gate weights + same expert weights = same outputs and grads).
* ``PerThread``: a layer's ``aux_loss`` is that of the last forward *in the reading thread*, so
  micro-batches in flight on threads of their own (``dmoe.train.pipeline``) each read their own.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dmoe.dht.uids import split_uid


class GridGate(nn.Module):
    """One linear map scoring every grid dimension: ``(N, D) -> [(N, g_0), (N, g_1), ...]``."""

    def __init__(self, in_features: int, grid_size: Sequence[int]) -> None:
        super().__init__()
        self.grid_size = tuple(int(g) for g in grid_size)
        self.proj = nn.Linear(in_features, sum(self.grid_size))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.proj(x).split(self.grid_size, dim=-1))


def expert_logits(grid_scores: Sequence[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """``coords (N, k, d)`` long -> logits ``(N, k)``: sum over dimensions of the coordinate's score."""
    logits = grid_scores[0].gather(1, coords[..., 0])
    for j in range(1, len(grid_scores)):
        logits = logits + grid_scores[j].gather(1, coords[..., j])  # (N, k)
    return logits


def combine_outputs(logits: torch.Tensor, mask: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Softmax over answered slots (``mask (N, k)``) of ``logits (N, k)``, mixing ``outputs (N, k, ...)``."""
    has_any = mask.any(dim=1, keepdim=True)  # (N, 1)
    masked = logits.masked_fill(~mask, float("-inf"))
    masked = torch.where(has_any, masked, torch.zeros_like(masked))  # rows without answers: finite
    weights = torch.softmax(masked, dim=1) * mask.to(logits.dtype)  # (N, k); all-zero rows stay zero
    weights = weights.to(outputs.dtype).reshape(*weights.shape, *([1] * (outputs.dim() - 2)))
    return (weights * outputs).sum(dim=1)  # (N, ...)


def load_balancing_loss(grid_scores: Sequence[torch.Tensor], coords: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Switch-style auxiliary loss averaged over grid dimensions (differentiable w.r.t. the scores)."""
    losses = []
    routed = valid.sum().clamp_min(1).to(grid_scores[0].dtype)
    for j, scores in enumerate(grid_scores):
        g = scores.shape[1]
        probs = torch.softmax(scores, dim=1).mean(dim=0)  # (g,)
        picked = coords[..., j][valid]  # (slots,)
        fraction = torch.bincount(picked, minlength=g).to(scores.dtype) / routed  # (g,)
        losses.append(g * (fraction.detach() * probs).sum())
    return torch.stack(losses).mean()


class ExpertChoiceCounter:
    """How many times each expert uid was chosen (routed a token) and answered."""

    def __init__(self) -> None:
        self.chosen: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()

    def update(self, chosen: Iterable[str], answered: Iterable[str] = ()) -> None:
        self.chosen.update(chosen)
        self.answered.update(answered)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {uid: {"chosen": n, "answered": self.answered.get(uid, 0)} for uid, n in sorted(self.chosen.items())}


class PerThread:
    """A module attribute whose value is per thread (a data descriptor; ``nn.Module`` honours it)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_per_thread_{name}"

    def _local(self, obj: Any) -> threading.local:
        local = obj.__dict__.get(self.slot)
        if local is None:  # setdefault: two threads' first uses must share one
            local = obj.__dict__.setdefault(self.slot, threading.local())
        return local

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(self._local(obj), "value", None)

    def __set__(self, obj: Any, value: Any) -> None:
        self._local(obj).value = value


class LocalMixtureOfExperts(nn.Module):
    """In-process grid MoE over ``experts`` (uid -> module), exhaustive top-``k_best`` routing.

    Same gate, logits, renormalized softmax and auxiliary loss as ``RemoteMixtureOfExperts``; only
    the experts present in ``experts`` are routable (the "alive" set). ``(N, D)`` or ``(B, T, D)``.
    """

    aux_loss = PerThread()  # of this thread's last forward: a tensor, or None before any

    def __init__(
        self,
        *,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        experts: Mapping[str, nn.Module],
        k_best: int,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.grid_size = tuple(int(g) for g in grid_size)
        self.uid_prefix = uid_prefix.rstrip(".")
        self.k_best = k_best
        self.gate = GridGate(in_features, self.grid_size)
        coords = []
        for uid in experts:
            prefix, c = split_uid(uid)
            if prefix != self.uid_prefix or len(c) != len(self.grid_size):
                raise ValueError(f"expert {uid!r} is not on grid {self.uid_prefix}.{list(self.grid_size)}")
            if any(not 0 <= ci < g for ci, g in zip(c, self.grid_size, strict=True)):
                raise ValueError(f"expert {uid!r} lies outside grid_size {self.grid_size}")
            coords.append(c)
        order = sorted(range(len(coords)), key=lambda i: coords[i])
        self.uids = [list(experts)[i] for i in order]
        self.experts = nn.ModuleList([experts[u] for u in self.uids])
        alive = torch.tensor([coords[i] for i in order], dtype=torch.long)  # (E, d)
        self.register_buffer("alive_coords", alive, persistent=False)
        self.aux_loss = None
        self.choices = ExpertChoiceCounter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (N, D): tokens are routed independently
        grid_scores = self.gate(x2)  # [(N, g_j)]
        alive = self.alive_coords  # (E, d)
        with torch.no_grad():  # selection in float64, like the beam search
            totals = torch.zeros(x2.shape[0], alive.shape[0], dtype=torch.float64, device=x2.device)
            for j, s in enumerate(grid_scores):
                totals = totals + s.double()[:, alive[:, j]]  # (N, E)
            k = min(self.k_best, alive.shape[0])
            top = torch.topk(totals, k, dim=1).indices  # (N, k)
        coords = alive[top]  # (N, k, d)
        outputs = x2.new_zeros(x2.shape[0], k, *x2.shape[1:])  # (N, k, D)
        for e in top.unique().tolist():
            rows, slots = (top == e).nonzero(as_tuple=True)
            outputs = outputs.index_put((rows, slots), self.experts[e](x2[rows]))
        mask = torch.ones_like(top, dtype=torch.bool)
        y = combine_outputs(expert_logits(grid_scores, coords), mask, outputs)  # (N, D)
        self.aux_loss = load_balancing_loss(grid_scores, coords, mask)
        self.choices.update(self.uids[e] for e in top.flatten().tolist())
        return y.reshape(*lead, y.shape[-1])
