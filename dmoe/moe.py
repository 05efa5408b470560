"""``RemoteMixtureOfExperts``: a grid MoE layer whose experts live on volunteer nodes.

One forward, for ``N`` tokens (``(B, T, D)`` inputs are ``B*T`` tokens routed independently):

1. ``GridGate`` scores each grid dimension; ``BeamSearch`` finds every token's ``k_best``
   alive experts with batched DHT lookups (within ``search_timeout``, counted against
   ``forward_timeout``).
2. Tokens are grouped per expert: one request per expert carrying all its rows; all experts are
   called concurrently (``_fan_out``), each retried on its other replicas within the deadline.
3. As soon as every token has ``k_min`` answers (or can get no more), the layer waits at most
   ``timeout_after_k_min`` for the rest, never past ``forward_timeout``; late calls are
   cancelled and their endpoints banned. A failed or garbage answer is simply no answer.
4. ``combine_outputs``: softmax over the answered experts' logits, renormalized over them.
   A token with fewer than ``k_min`` answers raises ``NotEnoughExperts`` (naming the missing
   experts and the deadline), or becomes an exact zero row with ``allow_zero_outputs=True``.

Backward sends each expert that answered the forward the very same input bytes plus its
gradient rows, to the endpoint that answered (a replica has different weights, so another one
could not produce a consistent gradient); the node also applies its optimizer. An expert failing
in backward is treated as a constant (its contribution to the input gradient is dropped) as long
as every token keeps ``backward_k_min`` answers, with the same ``timeout_after_k_min`` rule,
never past ``backward_timeout``. Gradients reach the gate locally through the mixing weights.

Timeouts are all finite (defaults suit home links); ``None`` is refused, never "forever".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dmoe import client_metrics as metrics
from dmoe.beam_search import BeamSearch, FoundExpert, SearchResult
from dmoe.errors import DeadlineExceeded, ExpertCallError, NotEnoughExperts
from dmoe.gating import ExpertChoiceCounter, GridGate, combine_outputs, expert_logits, load_balancing_loss
from dmoe.proto import expert_pb2 as pb
from dmoe.remote_call import BACKWARD, FORWARD, TensorSpec, build_request
from dmoe.swarm import Swarm
from dmoe.wire import check_compression, serialize_tensor

logger = logging.getLogger(__name__)
_BRIDGE_GRACE = 2.0  # seconds the caller thread waits beyond a deadline the loop enforces itself
# an input that always requires grad, so backward (which trains the remote experts) runs even when
# neither x nor the gate needs a gradient
_DUMMY = torch.empty(0, requires_grad=True)


# ---------------------------------------------------------------- concurrent calls with k_min rule


@dataclass
class _Job:
    """One request to one expert: the rows (tokens) routed to it and where they sit in (N, k)."""

    uid: str
    endpoints: tuple[str, ...]
    rows: torch.Tensor  # (r,) long, token indices
    slots: torch.Tensor  # (r,) long, slot of this expert in each token's top-k
    request: pb.ExpertRequest
    expected: tuple[TensorSpec, ...]


@dataclass
class _Outcome:
    endpoint: str | None = None
    tensors: list[torch.Tensor] | None = None
    error: ExpertCallError | None = None


async def _fan_out(
    swarm: Swarm,
    jobs: Sequence[_Job],
    *,
    num_tokens: int,
    method: str,
    k_min: int,
    deadline: float,
    timeout_after_k_min: float,
    retry: bool,
) -> list[_Outcome]:
    """Call every job concurrently; stop ``timeout_after_k_min`` after each token has k_min answers."""
    outcomes = [_Outcome() for _ in jobs]
    answers = np.zeros(num_tokens, dtype=np.int64)
    open_calls = np.zeros(num_tokens, dtype=np.int64)
    rows = [job.rows.numpy() for job in jobs]
    loop = asyncio.get_running_loop()
    tasks: dict[asyncio.Task[Any], int] = {}
    for i, job in enumerate(jobs):
        open_calls[rows[i]] += 1
        coro = swarm.call(job.endpoints, job.request, method=method, deadline=deadline, expected=job.expected,
                          retry=retry)
        tasks[loop.create_task(coro)] = i
    pending = set(tasks)
    cutoff = deadline

    def settled() -> bool:
        return bool(np.all((answers >= k_min) | (open_calls == 0)))

    if settled():
        cutoff = min(deadline, time.monotonic() + timeout_after_k_min)
    while pending:
        left = cutoff - time.monotonic()
        if left <= 0:
            break
        done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            i = tasks[task]
            open_calls[rows[i]] -= 1
            try:
                outcomes[i].endpoint, outcomes[i].tensors = task.result()
                answers[rows[i]] += 1
            except ExpertCallError as e:
                outcomes[i].error = e
        if cutoff == deadline and settled():
            cutoff = min(deadline, time.monotonic() + timeout_after_k_min)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)  # they record themselves as abandoned
        for task in pending:
            job = jobs[tasks[task]]
            why = "deadline" if cutoff >= deadline else f"timeout_after_k_min={timeout_after_k_min}s"
            outcomes[tasks[task]].error = DeadlineExceeded(
                f"{method} of {job.uid} abandoned after {why}", uid=job.uid
            )
    return outcomes


def _describe_missing(outcomes: Sequence[_Outcome], jobs: Sequence[_Job], bad_rows: torch.Tensor) -> list[str]:
    bad = set(bad_rows.tolist())
    missing = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome.tensors is None and bad.intersection(job.rows.tolist()):
            kind = outcome.error.kind if outcome.error is not None else "no answer"
            missing.append(f"{job.uid} ({kind})")
    return missing


# ---------------------------------------------------------------- autograd function


@dataclass
class _ForwardPlan:
    layer: RemoteMixtureOfExperts
    experts: list[list[FoundExpert]]  # per token, best first
    k: int
    deadline: float  # time.monotonic() instant
    started: float
    answered_jobs: list[_Job] = field(default_factory=list)
    token_answers: torch.Tensor | None = None  # (N,) answers per token in forward


class _RemoteExpertCalls(torch.autograd.Function):
    """(dummy, x (N, D), plan) -> mask (N, k) bool, outputs (N, k, D). Backward calls the experts' Backward."""

    @staticmethod
    def forward(ctx: Any, dummy: torch.Tensor, x: torch.Tensor, plan: _ForwardPlan) -> tuple[torch.Tensor, ...]:
        layer = plan.layer
        n, d = x.shape
        x_wire = x.detach().to("cpu", torch.float32)  # experts take float32 rows
        groups: dict[str, tuple[FoundExpert, list[int], list[int]]] = {}
        for row, chosen in enumerate(plan.experts):
            for slot, expert in enumerate(chosen):
                groups.setdefault(expert.uid, (expert, [], []))
                groups[expert.uid][1].append(row)
                groups[expert.uid][2].append(slot)
        jobs = []
        for uid, (expert, rows, slots) in groups.items():
            rows_t = torch.tensor(rows, dtype=torch.long)
            tensor = serialize_tensor(x_wire[rows_t], layer.compression)  # (r, D)
            jobs.append(
                _Job(uid, expert.endpoints, rows_t, torch.tensor(slots, dtype=torch.long),
                     build_request(uid, [tensor], layer.compression), (TensorSpec((len(rows), d), "float32"),))
            )
        outcomes = layer.swarm.run(
            _fan_out(layer.swarm, jobs, num_tokens=n, method=FORWARD, k_min=layer.k_min, deadline=plan.deadline,
                     timeout_after_k_min=layer.timeout_after_k_min, retry=True),
            timeout=plan.deadline - time.monotonic() + _BRIDGE_GRACE,
        )
        outputs = torch.zeros(n, plan.k, d, dtype=torch.float32)  # (N, k, D)
        mask = torch.zeros(n, plan.k, dtype=torch.bool)  # (N, k)
        answered: list[_Job] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            layer._count_outcome(outcome)
            if outcome.tensors is not None and outcome.endpoint is not None:
                outputs[job.rows, job.slots] = outcome.tensors[0]
                mask[job.rows, job.slots] = True
                answered.append(
                    _Job(job.uid, (outcome.endpoint,), job.rows, job.slots, job.request, job.expected)
                )
        counts = mask.sum(dim=1)  # (N,)
        short = (counts < layer.k_min).nonzero(as_tuple=True)[0]
        if len(short):
            metrics.NOT_ENOUGH.labels(FORWARD).inc(len(short))
            layer._stats.not_enough += len(short)
            if not layer.allow_zero_outputs:
                raise layer._not_enough(FORWARD, short, n, _describe_missing(outcomes, jobs, short), plan)
            outputs[short] = 0.0
            mask[short] = False
            counts[short] = 0
            layer._stats.zero_tokens += len(short)
        layer._record_forward(groups, answered, plan)
        plan.answered_jobs = answered
        plan.token_answers = counts
        ctx.plan = plan
        ctx.x_meta = (x.dtype, x.device, n, d)
        ctx.mark_non_differentiable(mask)
        device = x.device
        return mask.to(device), outputs.to(device=device, dtype=x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _grad_mask: torch.Tensor, grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _ForwardPlan = ctx.plan
        layer = plan.layer
        dtype, device, n, d = ctx.x_meta
        started = time.monotonic()
        grad = grad_outputs.detach().to("cpu", torch.float32)  # (N, k, D)
        jobs, skipped = [], []
        for job in plan.answered_jobs:
            g = grad[job.rows, job.slots]  # (r, D)
            if not torch.any(g):
                skipped.append(job)  # nothing flows back through this expert: no call needed
                continue
            request = pb.ExpertRequest(uid=job.uid, compression=layer.compression)
            request.tensors.extend(job.request.tensors)  # the very same input bytes as in forward
            request.tensors.append(serialize_tensor(g, layer.compression))
            jobs.append(_Job(job.uid, job.endpoints, job.rows, job.slots, request, job.expected))
        deadline = started + layer.backward_timeout
        outcomes = []
        if jobs:
            outcomes = layer.swarm.run(
                _fan_out(layer.swarm, jobs, num_tokens=n, method=BACKWARD, k_min=layer.backward_k_min,
                         deadline=deadline, timeout_after_k_min=layer.timeout_after_k_min, retry=False),
                timeout=layer.backward_timeout + _BRIDGE_GRACE,
            )
        grad_x = torch.zeros(n, d, dtype=torch.float32)  # (N, D)
        counts = torch.zeros(n, dtype=torch.long)
        for job in skipped:
            counts[job.rows] += 1
        for job, outcome in zip(jobs, outcomes, strict=True):
            layer._count_outcome(outcome)
            if outcome.tensors is not None:
                grad_x.index_add_(0, job.rows, outcome.tensors[0])
                counts[job.rows] += 1
        assert plan.token_answers is not None
        need = plan.token_answers.clamp(max=layer.backward_k_min)  # tokens zeroed in forward need nothing
        short = (counts < need).nonzero(as_tuple=True)[0]
        if len(short):
            metrics.NOT_ENOUGH.labels(BACKWARD).inc(len(short))
            layer._stats.not_enough_backward += len(short)
            if not layer.allow_zero_outputs:
                raise layer._not_enough(BACKWARD, short, n, _describe_missing(outcomes, jobs, short), plan)
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

    ``forward_timeout`` covers search + calls (seconds); ``timeout_after_k_min``: extra wait once
    every token has ``k_min`` answers; ``backward_timeout`` bounds a backward; ``compression``
    ("", "float16", "bfloat16") applies to activations and gradients on the wire;
    ``search_timeout``: budget of the expert search (at most half of ``forward_timeout``).
    """

    def __init__(
        self,
        *,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str,
        swarm: Swarm,
        k_best: int,
        k_min: int = 1,
        forward_timeout: float = 10.0,
        backward_timeout: float = 20.0,
        timeout_after_k_min: float = 1.0,
        allow_zero_outputs: bool = False,
        backward_k_min: int = 1,
        compression: str = "",
        search_timeout: float = 2.0,
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
        self.gate = GridGate(in_features, self.grid_size)
        self.beam_search = BeamSearch(swarm, self.uid_prefix, self.grid_size, beam_size=beam_size)
        self.aux_loss: torch.Tensor | None = None
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
        search = self.beam_search.find_best_experts(
            [s.detach().to("cpu", torch.float64).numpy() for s in grid_scores],
            self.k_best,
            budget=min(self.search_timeout, 0.5 * self.forward_timeout),
            k_min=self.k_min,
        )
        self._record_search(search)
        k = max(1, max((len(e) for e in search.experts), default=0))
        coords_np = np.zeros((x2.shape[0], k, len(self.grid_size)), dtype=np.int64)
        valid_np = np.zeros((x2.shape[0], k), dtype=bool)
        for row, chosen in enumerate(search.experts):
            for slot, expert in enumerate(chosen):
                coords_np[row, slot] = expert.coords
                valid_np[row, slot] = True
        coords = torch.from_numpy(coords_np)  # (N, k, d); unused slots point at 0 and are masked
        valid = torch.from_numpy(valid_np)  # (N, k)
        plan = _ForwardPlan(self, search.experts, k, deadline, started)
        mask, outputs = _RemoteExpertCalls.apply(_DUMMY, x2, plan)  # (N, k), (N, k, D)
        coords = coords.to(x2.device)
        y = combine_outputs(expert_logits(grid_scores, coords), mask, outputs)  # (N, D)
        self.aux_loss = load_balancing_loss(grid_scores, coords, valid.to(x2.device))
        self._stats.last_forward_seconds = time.monotonic() - started
        return y.reshape(*lead, self.in_features)

    # ---- bookkeeping ----

    def _record_search(self, search: SearchResult) -> None:
        self._stats.search_rounds = search.rounds
        self._stats.search_prefixes = search.prefixes_fetched
        self._stats.last_search_seconds = search.elapsed
        self._stats.banned_tried += sum(1 for chosen in search.experts for e in chosen if e.banned)

    def _count_outcome(self, outcome: _Outcome) -> None:
        if outcome.tensors is not None:
            self._stats.calls["answered"] += 1
        else:
            self._stats.calls["failed"] += 1
            self._stats.failures[outcome.error.kind if outcome.error is not None else "unknown"] += 1

    def _record_forward(self, groups: dict[str, Any], answered: list[_Job], plan: _ForwardPlan) -> None:
        self._stats.forward_steps += 1
        self._stats.tokens += len(plan.experts)
        self._stats.experts_chosen = len(groups)
        self._stats.experts_reached = len(answered)
        self.choices.update(
            (uid for uid, (_, rows, _) in groups.items() for _ in rows),
            (job.uid for job in answered for _ in range(len(job.rows))),
        )

    def _not_enough(
        self, method: str, short: torch.Tensor, n: int, missing: list[str], plan: _ForwardPlan
    ) -> NotEnoughExperts:
        need = self.k_min if method == FORWARD else self.backward_k_min
        timeout = self.forward_timeout if method == FORWARD else self.backward_timeout
        found = min((len(plan.experts[i]) for i in short.tolist()), default=0)
        parts = [
            f"{method}: {len(short)} of {n} tokens got fewer than {need} expert answers within "
            f"{method}_timeout={timeout:g}s"
        ]
        if missing:
            parts.append(f"missing: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
        if found < need:
            parts.append(f"only {found} alive unbanned expert(s) found under '{self.uid_prefix}.' for some tokens")
        return NotEnoughExperts("; ".join(parts), missing=[m.split(" ")[0] for m in missing], deadline=timeout)

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
