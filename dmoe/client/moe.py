"""``RemoteMixtureOfExperts``: a grid MoE layer whose experts live on volunteer nodes.

One forward, for ``N`` tokens (``(B, T, D)`` inputs are ``B*T`` tokens routed independently):

1. ``GridGate`` scores each grid dimension; ``BeamSearch`` finds every token's ``k_best``
   alive experts with batched DHT lookups (within ``search_timeout``, counted against
   ``forward_timeout``).
2. Tokens are grouped per expert: one request per expert carrying all its rows; all experts are
   called concurrently (``dmoe.client.dispatch``). The replica is drawn by its expected wait
   (its own latency, stretched by its load), retried on the others on failure and hedged on
   another when it runs past the best replica's 95th percentile (``dmoe.client.swarm``). A
   failed, garbage or stuck call is no answer for its rows; a token left short is rerouted to its
   next-best alive experts while time remains. A call is stuck only when its node makes no
   progress for several times *its own* usual latency: a slow volunteer is never a failure.
3. Once every token has ``k_min`` answers (or can get no more), the layer waits at most
   ``timeout_after_k_min`` for the rest, never past ``forward_timeout``; calls still running
   are cancelled: stuck ones ban their endpoint (the ban doubles on repeated failures; a Ping
   probe lifts it once the node answers again), the others are merely *late*.
4. ``combine_outputs``: softmax over the answered experts' logits, renormalized over them.
   A token with fewer than ``k_min`` answers raises ``NotEnoughExperts`` (naming the missing
   experts and the deadline), or becomes an exact zero row with ``allow_zero_outputs=True``.

Backward sends each expert that answered the forward the very same input bytes plus its
gradient rows, to the endpoint that answered (a replica has different weights, so another one
could not produce a consistent gradient); the node also applies its optimizer. An expert failing
in backward is treated as a constant (its contribution to the input gradient is dropped) as long
as every token keeps ``backward_k_min`` answers, with the same ``timeout_after_k_min`` rule,
never past ``backward_timeout``. Each token waits for at least one answer while one can still
come, even with ``backward_k_min=0`` (which only means: never raise). A node frozen between
its forward answer and the backward is noticed as stuck, as in forward, so it holds the step
for about ``timeout_after_k_min``, not ``backward_timeout``. Gradients reach the gate locally
through the mixing weights.

Timeouts are all finite (defaults suit home links); ``None`` is refused, never "forever".
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dmoe.client import metrics
from dmoe.client.beam_search import BeamSearch
from dmoe.client.candidates import FoundExpert, SearchResult
from dmoe.client.dispatch import CallSummary, Dispatch
from dmoe.client.gating import (
    ExpertChoiceCounter,
    GridGate,
    PerThread,
    combine_outputs,
    expert_logits,
    load_balancing_loss,
)
from dmoe.client.remote_call import BACKWARD, FORWARD, TensorSpec, build_request, new_call_id
from dmoe.client.swarm import BRIDGE_GRACE, Swarm
from dmoe.config.client import MoEOptions
from dmoe.errors import NotEnoughExperts
from dmoe.wire.codec import check_compression, serialize_tensor, warm_up
from dmoe.wire.proto import expert_pb2 as pb

logger = logging.getLogger(__name__)
_DEFAULTS = MoEOptions()
# an input that always requires grad, so backward (which trains the remote experts) runs even when
# neither x nor the gate needs a gradient
_DUMMY = torch.empty(0, requires_grad=True)


# ---------------------------------------------------------------- autograd function


class _LayerRouter:
    """Builds requests for one forward and finds replacement experts for rerouted tokens (see dispatch)."""

    def __init__(self, layer: RemoteMixtureOfExperts, scores: list[np.ndarray], x_wire: torch.Tensor, *,
                 training: bool) -> None:
        self.layer = layer
        self.scores = scores  # [(N, g_j)] float64
        self.x_wire = x_wire  # (N, D) float32 on cpu
        self.training = training  # a backward follows: calls carry ids (node-side activation keeping)

    def build(self, uid: str, rows: np.ndarray) -> tuple[pb.ExpertRequest, tuple[TensorSpec, ...]]:
        tensor = serialize_tensor(self.x_wire[torch.from_numpy(rows)], self.layer.compression)  # (r, D)
        return (
            build_request(uid, [tensor], self.layer.compression, new_call_id() if self.training else ""),
            (TensorSpec((len(rows), self.x_wire.shape[1]), "float32"),),
        )

    async def alternatives(
        self,
        tokens: np.ndarray,
        need: Sequence[int],
        exclude: Sequence[set[tuple[int, ...]]],
        is_banned: Callable[[str], bool],
        deadline: float,
    ) -> tuple[list[list[FoundExpert]], bool]:
        search_deadline = min(deadline, time.monotonic() + self.layer.search_timeout)
        result = await self.layer.beam_search.find_best_experts_async(
            [s[tokens] for s in self.scores], need, deadline=search_deadline, exclude=exclude, is_banned=is_banned
        )
        return result.experts, not result.budget_exhausted


@dataclass
class _Plan:
    """Shared between the layer's forward, the autograd function and its backward."""

    layer: RemoteMixtureOfExperts
    experts: list[list[FoundExpert]]  # per token, best first (from the search)
    scores: list[np.ndarray]
    deadline: float  # time.monotonic() instant
    coords: torch.Tensor | None = None  # (N, k, d) final slot assignment
    valid: torch.Tensor | None = None  # (N, k) slot holds an expert
    answered: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray, pb.ExpertRequest]] = field(
        default_factory=list
    )  # (uid, endpoint, rows, slots, used, request) of forward jobs that answered
    token_answers: np.ndarray | None = None  # (N,) answers per token in forward (0 for zeroed tokens)


class _RemoteExpertCalls(torch.autograd.Function):
    """(dummy, x (N, D), plan) -> mask (N, k) bool, outputs (N, k, D). Backward calls the experts' Backward."""

    @staticmethod
    def forward(ctx: Any, dummy: torch.Tensor, x: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, ...]:
        layer = plan.layer
        n, d = x.shape
        k = layer.k_best
        x_wire = x.detach().to("cpu", torch.float32)  # experts take float32 rows
        # a backward will follow (training): tag the calls, so that nodes may keep their activations for it
        router = _LayerRouter(layer, plan.scores, x_wire, training=bool(ctx.needs_input_grad[1]))
        dispatch = Dispatch(
            layer.swarm, method=FORWARD, num_tokens=n, num_slots=k, need=np.full(n, layer.k_min),
            deadline=plan.deadline, timeout_after_k_min=layer.timeout_after_k_min, retry=True, router=router,
        )
        dispatch.add_chosen(plan.experts, router)
        layer.swarm.run(dispatch.run(), timeout=plan.deadline - time.monotonic() + BRIDGE_GRACE)

        outputs = torch.zeros(n, k, d, dtype=torch.float32)  # (N, k, D)
        for job in dispatch.jobs:
            if job.tensors is not None and job.endpoint is not None:
                used = dispatch.used(job.index)  # rows whose slot still points at this job
                if used.any():
                    outputs[job.rows[used], job.slots[used]] = job.tensors[0][torch.from_numpy(used)]
                    plan.answered.append((job.uid, job.endpoint, job.rows, job.slots, used, job.request))
        mask_np = dispatch.slot_ok.copy()  # (N, k)
        counts = mask_np.sum(axis=1)
        short = np.nonzero(counts < layer.k_min)[0]
        layer._record_dispatch(FORWARD, dispatch)
        if len(short):
            metrics.NOT_ENOUGH.labels(FORWARD).inc(len(short))
            layer._stats.not_enough += len(short)
            if not layer.allow_zero_outputs:
                raise layer._not_enough(FORWARD, short, n, dispatch)
            outputs[short] = 0.0
            mask_np[short] = False
            counts[short] = 0
            layer._stats.zero_tokens += len(short)
        coords = np.zeros((n, k, len(layer.grid_size)), dtype=np.int64)
        valid = np.zeros((n, k), dtype=bool)
        for row, slots in enumerate(dispatch.slot_expert):
            for slot, expert in enumerate(slots):
                if expert is not None:
                    coords[row, slot] = expert.coords
                    valid[row, slot] = True
        plan.coords, plan.valid = torch.from_numpy(coords), torch.from_numpy(valid)
        plan.token_answers = counts
        layer._record_forward(dispatch, mask_np, n)
        ctx.plan = plan
        ctx.x_meta = (x.dtype, x.device, n, d)
        mask = torch.from_numpy(mask_np).to(x.device)
        ctx.mark_non_differentiable(mask)
        return mask, outputs.to(device=x.device, dtype=x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _grad_mask: torch.Tensor, grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        layer = plan.layer
        dtype, device, n, d = ctx.x_meta
        started = time.monotonic()
        assert plan.token_answers is not None
        need = np.minimum(plan.token_answers, layer.backward_k_min)  # tokens zeroed in forward need nothing
        wait_for = np.minimum(plan.token_answers, max(layer.backward_k_min, 1))
        dispatch = Dispatch(
            layer.swarm, method=BACKWARD, num_tokens=n, num_slots=layer.k_best, need=wait_for,
            deadline=started + layer.backward_timeout, timeout_after_k_min=layer.timeout_after_k_min,
            retry=False, router=None,
        )
        grad = grad_outputs.detach().to("cpu", torch.float32)  # (N, k, D)
        for uid, endpoint, rows, slots, used, forward_request in plan.answered:
            g = grad[torch.from_numpy(rows), torch.from_numpy(slots)]  # (r, D)
            g[torch.from_numpy(~used)] = 0.0  # rows rerouted elsewhere contribute nothing here
            if not torch.any(g):  # nothing flows back through this expert: count it, skip the call
                dispatch.slot_ok[rows[used], slots[used]] = True
                continue
            request = pb.ExpertRequest(uid=uid, compression=layer.compression, call_id=forward_request.call_id)
            request.tensors.extend(forward_request.tensors)  # the very same input bytes as in forward
            request.tensors.append(serialize_tensor(g, layer.compression))
            dispatch.add_job(uid, (endpoint,), rows, slots, request, (TensorSpec((len(rows), d), "float32"),),
                             assign=used)
        if dispatch.jobs:
            layer.swarm.run(dispatch.run(), timeout=layer.backward_timeout + BRIDGE_GRACE)
        grad_x = torch.zeros(n, d, dtype=torch.float32)  # (N, D)
        for job in dispatch.jobs:
            if job.tensors is not None:
                grad_x.index_add_(0, torch.from_numpy(job.rows), job.tensors[0])
        short = np.nonzero(dispatch.slot_ok.sum(axis=1) < need)[0]
        layer._record_dispatch(BACKWARD, dispatch)
        if len(short):
            metrics.NOT_ENOUGH.labels(BACKWARD).inc(len(short))
            layer._stats.not_enough_backward += len(short)
            if not layer.allow_zero_outputs:
                raise layer._not_enough(BACKWARD, short, n, dispatch)
        layer._stats.backward_steps += 1
        layer._stats.last_backward_seconds = time.monotonic() - started
        grad_input = grad_x.to(device=device, dtype=dtype) if ctx.needs_input_grad[1] else None
        return None, grad_input, None


# ---------------------------------------------------------------- the layer


@dataclass
class MoEStats:
    forward_steps: int = 0
    backward_steps: int = 0
    tokens: int = 0
    calls: Counter[str] = field(default_factory=Counter)  # answered / failed per method
    failures: Counter[str] = field(default_factory=Counter)  # by kind
    not_enough: int = 0  # tokens below k_min in forward
    not_enough_backward: int = 0
    zero_tokens: int = 0  # tokens given zeros (allow_zero_outputs)
    banned_tried: int = 0  # banned experts tried anyway (too few unbanned ones)
    reroutes: int = 0  # tokens sent to their next-best experts after failures
    suspected: int = 0  # endpoints suspected stuck (their tokens stopped waiting; a Ping then decided)
    experts_reached: int = 0  # distinct experts that answered in the last forward
    experts_chosen: int = 0  # distinct experts chosen in the last forward
    search_rounds: int = 0  # in the last forward
    search_prefixes: int = 0
    last_search_seconds: float = 0.0
    last_forward_seconds: float = 0.0
    last_backward_seconds: float = 0.0


def _finite_positive(name: str, value: float | None) -> float:
    if value is None or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0 (got {value!r}); None never means forever")
    return float(value)


class RemoteMixtureOfExperts(nn.Module):
    """Grid MoE over remote experts ``{uid_prefix}.{i}.{j}...``: ``(N, D)`` or ``(B, T, D)`` -> same shape.

    The keyword defaults are ``dmoe.config.MoEOptions`` (documented there, shared with
    ``dmoe train``): ``forward_timeout`` covers search + calls (seconds); ``timeout_after_k_min``:
    extra wait once every token has ``k_min`` answers; ``backward_timeout`` bounds a backward;
    ``backward_k_min``: answers a token needs in backward (0: never raise, a failed expert is a
    constant); ``compression`` ("none", "float16", "bfloat16") applies to activations and
    gradients on the wire; ``search_timeout``: budget of the expert search (at most half of
    ``forward_timeout``).
    """

    aux_loss = PerThread()  # load-balancing loss of this thread's last forward (dmoe.train.pipeline)

    def __init__(
        self,
        *,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        swarm: Swarm,
        k_best: int,
        k_min: int = _DEFAULTS.k_min,
        forward_timeout: float = _DEFAULTS.forward_timeout,
        backward_timeout: float = _DEFAULTS.backward_timeout,
        timeout_after_k_min: float = _DEFAULTS.timeout_after_k_min,
        allow_zero_outputs: bool = _DEFAULTS.allow_zero_outputs,
        backward_k_min: int = _DEFAULTS.backward_k_min,
        compression: str = _DEFAULTS.compression,
        search_timeout: float = _DEFAULTS.search_timeout,
        beam_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k_min <= k_best:
            raise ValueError(f"need 1 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        if not 0 <= backward_k_min <= k_best:
            raise ValueError(f"need 0 <= backward_k_min <= k_best, got {backward_k_min}")
        self.in_features = in_features
        self.grid_size = tuple(int(g) for g in grid_size)
        self.uid_prefix = uid_prefix.rstrip(".")
        self.swarm = swarm
        self.k_best, self.k_min, self.backward_k_min = k_best, k_min, backward_k_min
        self.forward_timeout = _finite_positive("forward_timeout", forward_timeout)
        self.backward_timeout = _finite_positive("backward_timeout", backward_timeout)
        self.timeout_after_k_min = _finite_positive("timeout_after_k_min", timeout_after_k_min)
        self.search_timeout = _finite_positive("search_timeout", search_timeout)
        self.allow_zero_outputs = allow_zero_outputs
        self.compression = check_compression(compression)
        warm_up(self.compression)
        self.gate = GridGate(in_features, self.grid_size)
        self.beam_search = BeamSearch(swarm, self.uid_prefix, self.grid_size, beam_size=beam_size)
        self.aux_loss = None
        self.choices = ExpertChoiceCounter()
        self._stats = MoEStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {list(x.shape)}")
        started = time.monotonic()
        deadline = started + self.forward_timeout
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (N, D): every token is routed on its own
        if not torch.isfinite(x2).all():
            raise ValueError("RemoteMixtureOfExperts input contains NaN or Inf")
        grid_scores = self.gate(x2)  # [(N, g_j)]
        scores = [s.detach().to("cpu", torch.float64).numpy() for s in grid_scores]
        search = self.beam_search.find_best_experts(
            scores, self.k_best, budget=min(self.search_timeout, 0.5 * self.forward_timeout), k_min=self.k_min
        )
        self._record_search(search)
        plan = _Plan(self, search.experts, scores, deadline)
        mask, outputs = _RemoteExpertCalls.apply(_DUMMY, x2, plan)  # (N, k), (N, k, D)
        assert plan.coords is not None and plan.valid is not None
        coords, valid = plan.coords.to(x2.device), plan.valid.to(x2.device)  # (N, k, d), (N, k)
        y = combine_outputs(expert_logits(grid_scores, coords), mask, outputs)  # (N, D)
        self.aux_loss = load_balancing_loss(grid_scores, coords, valid)
        self._stats.last_forward_seconds = time.monotonic() - started
        return y.reshape(*lead, self.in_features)

    # ---- bookkeeping ----

    def _record_search(self, search: SearchResult) -> None:
        self._stats.search_rounds = search.rounds
        self._stats.search_prefixes = search.prefixes_fetched
        self._stats.last_search_seconds = search.elapsed
        self._stats.banned_tried += sum(1 for chosen in search.experts for e in chosen if e.banned)

    def _record_dispatch(self, method: str, dispatch: Dispatch) -> None:
        summary = CallSummary.of(dispatch)
        self._stats.calls[f"{method}_answered"] += summary.answered
        self._stats.calls[f"{method}_late"] += summary.late
        for kind, count in summary.failures.items():
            self._stats.calls[f"{method}_failed"] += count
            self._stats.failures[kind] += count
        self._stats.reroutes += dispatch.stats.reroutes
        self._stats.suspected += dispatch.stats.stuck

    def _record_forward(self, dispatch: Dispatch, mask: np.ndarray, n: int) -> None:
        self._stats.forward_steps += 1
        self._stats.tokens += n
        chosen = [e.uid for slots in dispatch.slot_expert for e in slots if e is not None]
        answered = [e.uid for slots, ok in zip(dispatch.slot_expert, mask, strict=True)
                    for e, hit in zip(slots, ok, strict=True) if e is not None and hit]
        self._stats.experts_chosen = len(set(chosen))
        self._stats.experts_reached = len(set(answered))
        self.choices.update(chosen, answered)

    def _not_enough(self, method: str, short: np.ndarray, n: int, dispatch: Dispatch) -> NotEnoughExperts:
        need = self.k_min if method == FORWARD else self.backward_k_min
        timeout = self.forward_timeout if method == FORWARD else self.backward_timeout
        bad = set(short.tolist())
        missing: dict[str, str] = {}
        for job in dispatch.jobs:
            if job.tensors is None and bad.intersection(job.rows.tolist()):
                missing[job.uid] = job.error.kind if job.error is not None else "no answer"
        parts = [
            f"{method}: {len(short)} of {n} tokens got fewer than {need} expert answers within "
            f"{method}_timeout={timeout:g}s"
        ]
        if missing:
            listed = ", ".join(f"{uid} ({kind})" for uid, kind in list(missing.items())[:12])
            parts.append(f"missing: {listed}{' ...' if len(missing) > 12 else ''}")
        if method == FORWARD and any(dispatch.exhausted[t] or not dispatch.tried[t] for t in bad):
            parts.append(f"no other alive, unbanned expert was found under '{self.uid_prefix}.' for some tokens")
        return NotEnoughExperts("; ".join(parts), missing=list(missing), deadline=timeout)

    @property
    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "forward_steps": s.forward_steps,
            "backward_steps": s.backward_steps,
            "tokens": s.tokens,
            "calls": dict(s.calls),
            "failures": dict(s.failures),
            "not_enough": s.not_enough,
            "not_enough_backward": s.not_enough_backward,
            "zero_tokens": s.zero_tokens,
            "banned_tried": s.banned_tried,
            "reroutes": s.reroutes,
            "suspected": s.suspected,
            "experts_chosen": s.experts_chosen,
            "experts_reached": s.experts_reached,
            "search_rounds": s.search_rounds,
            "search_prefixes": s.search_prefixes,
            "last_search_seconds": s.last_search_seconds,
            "last_forward_seconds": s.last_forward_seconds,
            "last_backward_seconds": s.last_backward_seconds,
        }

    def extra_repr(self) -> str:
        return (
            f"uid_prefix={self.uid_prefix!r}, grid_size={self.grid_size}, k_best={self.k_best}, k_min={self.k_min}, "
            f"forward_timeout={self.forward_timeout}, timeout_after_k_min={self.timeout_after_k_min}"
        )
