"""ExpertBackend: one hosted expert, its optimizer and its update counter.

All methods run in a worker thread (never on the event loop) and take the expert's lock, so a
checkpoint snapshot never sees a half-applied optimizer step. Forward runs under inference mode, or
with autograd when the trainer tagged its calls and the node keeps their graphs
(``dmoe.node.activations``); backward uses a kept graph where one covers its calls and otherwise
recomputes the forward with autograd, backpropagates the caller's ``grad_outputs``, clips, steps the
optimizer and returns the gradients w.r.t. the inputs. Snapshots, transfers and merges of its state
(``dmoe.node.state``) take the same lock.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

import torch
from dmoe.node.activations import ActivationCache, KeptForward, saved_bytes_counter
from dmoe.node.state import ExpertState, apply_merge
from torch import nn

from dmoe.config.node import OptimizerOptions
from dmoe.experts import ExpertSchema

log = logging.getLogger(__name__)


def make_optimizer(params: list[nn.Parameter], options: OptimizerOptions) -> torch.optim.Optimizer:
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr)
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr)
    raise ValueError(f"unknown optimizer {options.optimizer!r} (expected adam or sgd)")


class NonFiniteGradient(RuntimeError):
    """The backward pass produced NaN/Inf parameter gradients; the update was skipped."""


def _as_list(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, list | tuple) and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise TypeError(f"expert returned {type(outputs).__name__}, expected a tensor or a tuple of tensors")


class ExpertBackend:
    def __init__(
        self,
        uid: str,
        module: nn.Module,
        *,
        schema: ExpertSchema,
        expert_cls: str,
        hidden_dim: int,
        optimizer: OptimizerOptions,
        device: torch.device | str = "cpu",
    ) -> None:
        self.uid = uid
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.module.train()
        self.schema = schema
        self.expert_cls = expert_cls
        self.hidden_dim = hidden_dim
        self.options = optimizer
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, optimizer)
        self.updates = 0
        self.num_parameters = sum(p.numel() for p in self.module.parameters())
        self.lock = threading.Lock()
        self._updates_at_snapshot = 0  # updates when the last sync snapshot was taken (its weight's origin)
        self.version = 0  # bumped whenever the weights change (step, merge, load): kept forwards older are stale
        # the weights of the last merge (or load): a sync snapshot's delta is measured from here
        self._sync_base: dict[str, torch.Tensor] | None = {
            k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def _to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return tensors
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock, torch.inference_mode():
            outputs = _as_list(self.module(*self._to_device(inputs)))
            return [o.cpu() for o in outputs]

    def forward_kept(self, inputs: list[torch.Tensor], calls: dict[str, tuple[int, int]],
                     cache: ActivationCache) -> list[torch.Tensor]:
        """Forward with autograd, keeping the graph in ``cache`` for the backward of ``calls`` (id -> rows)."""
        with self.lock:
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in self._to_device(inputs)]
            saved, hooks = saved_bytes_counter(list(self.module.parameters()))
            with torch.enable_grad(), hooks:
                outputs = _as_list(self.module(*leaves))
            nbytes = saved[0] + sum(o.numel() * o.element_size() for o in outputs)
            cache.keep(KeptForward(self.uid, leaves, outputs, calls, nbytes, time.monotonic() + cache.ttl,
                                   version=self.version))
            return [o.detach().cpu() for o in outputs]

    def backward(self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Recompute the forward with autograd, backpropagate, step; the gradients w.r.t. the inputs."""
        with self.lock:
            grads = self._recompute_grads(inputs, grad_outputs)
            self._step()
            return grads

    def backward_calls(self, tasks: list[list[torch.Tensor]], calls: list[str],
                       cache: ActivationCache | None) -> list[torch.Tensor]:
        """One optimizer step for a backward batch: each task's ``inputs + grad_outputs``; kept forwards
        (``dmoe.node.activations``) serve the calls they cover, the rest is recomputed. Input gradients of all
        tasks concatenated in task order, one tensor per input."""
        n_in = len(self.schema.inputs)
        with self.lock:
            answers: list[list[torch.Tensor] | None] = [None] * len(tasks)
            for kept in cache.claim(self.uid, calls) if cache is not None and any(calls) else []:
                index = {call: i for i, call in enumerate(calls) if call in kept.rows}
                grads = self._kept_grads(kept, {i: tasks[i][n_in:] for i in index.values()},
                                         {i: kept.rows[c] for c, i in index.items()})
                if grads is not None:
                    for i, g in grads.items():
                        answers[i] = g
            todo = [i for i, a in enumerate(answers) if a is None]
            if todo:
                merged = [torch.cat([tasks[i][j] for i in todo]) if len(todo) > 1 else tasks[todo[0]][j]
                          for j in range(len(tasks[0]))]
                grads_in = self._recompute_grads(merged[:n_in], merged[n_in:])
                sizes = [tasks[i][0].shape[0] for i in todo]
                for k, i in enumerate(todo):
                    answers[i] = [g.split(sizes)[k] if len(todo) > 1 else g for g in grads_in]
            self._step()
        return [torch.cat([a[j] for a in answers]) if len(answers) > 1 else answers[0][j] for j in range(n_in)]

    def _kept_grads(self, kept: KeptForward, grad_outputs: dict[int, list[torch.Tensor]],
                    rows: dict[int, tuple[int, int]]) -> dict[int, list[torch.Tensor]] | None:
        """Backpropagate through a kept graph (no recompute); None when it is stale (the weights changed since
        that forward: another trainer's step, a sync) or does not fit, in which case nothing was accumulated."""
        if kept.version != self.version:
            return None
        full = [torch.zeros_like(o) for o in kept.outputs]
        for i, grads in grad_outputs.items():
            a, b = rows[i]
            if len(grads) != len(full):
                return None
            for out, g in zip(full, grads, strict=True):
                if g.shape != out[a:b].shape:
                    return None
                out[a:b] = g.to(out.device, out.dtype)
        pairs = [(o, g) for o, g in zip(kept.outputs, full, strict=True) if o.requires_grad]
        leaves = [x for x in kept.inputs if x.requires_grad]
        try:
            found = torch.autograd.grad([o for o, _ in pairs], [*leaves, *self.params], [g for _, g in pairs],
                                        allow_unused=True)
        except RuntimeError:  # e.g. "modified by an inplace operation": recompute instead
            return None
        for param, g in zip(self.params, found[len(leaves):], strict=True):
            if g is not None:
                param.grad = g if param.grad is None else param.grad + g
        by_leaf = iter(found[:len(leaves)])
        grads_in = [next(by_leaf) if x.requires_grad else None for x in kept.inputs]
        grads_in = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads_in, kept.inputs, strict=True)]
        return {i: [g[a:b].cpu() for g in grads_in] for i, (a, b) in rows.items()}

    def _recompute_grads(self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs = [
            t.detach().requires_grad_(t.is_floating_point()) for t in self._to_device(inputs)
        ]
        grad_outputs = self._to_device(grad_outputs)
        with torch.enable_grad():
            outputs = _as_list(self.module(*inputs))
            if len(outputs) != len(grad_outputs):
                raise ValueError(f"expert produced {len(outputs)} outputs but got {len(grad_outputs)} gradients")
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
            for o, g in pairs:
                if o.shape != g.shape:
                    raise ValueError(f"grad_output shape {list(g.shape)} does not match output {list(o.shape)}")
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
        return [(x.grad if x.grad is not None else torch.zeros_like(x)).cpu() for x in inputs]

    def _step(self) -> None:
        if self.options.clip_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.options.clip_grad_norm)
        else:
            norm = torch.stack([p.grad.norm() for p in self.params if p.grad is not None]).norm()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradient(f"expert {self.uid}: non-finite parameter gradient, update skipped")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.version += 1

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        """A consistent snapshot (copied under the lock, so later steps do not change it)."""
        with self.lock:
            return {
                "module": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "updates": self.updates,
                "expert_cls": self.expert_cls,
                "hidden_dim": self.hidden_dim,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.lock:
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.updates = int(state["updates"])
            self._updates_at_snapshot = self.updates
            self.version += 1
            self._sync_base = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # ---- replicas (dmoe.node.replicas) ----

    def snapshot(self) -> ExpertState:
        """A copy of the current state; its weight is the steps trained since the previous snapshot, its delta
        the change of the weights since the last merge (``dmoe.node.state``)."""
        state = self.state_dict()
        weight = float(state["updates"] - self._updates_at_snapshot)
        self._updates_at_snapshot = state["updates"]
        base = self._sync_base
        delta = {k: v - base[k] if v.is_floating_point() else torch.zeros_like(v) for k, v in state["module"].items()} \
            if base is not None else None
        return ExpertState(module=state["module"], optimizer=state["optimizer"], updates=state["updates"],
                           weight=weight, delta=delta)

    def current_state(self) -> ExpertState:
        state = self.state_dict()
        return ExpertState(module=state["module"], optimizer=state["optimizer"], updates=state["updates"])

    def load_state(self, state: ExpertState) -> None:
        """Take over a checked state (a transfer from a live replica)."""
        self.load_state_dict({"module": state.module, "optimizer": state.optimizer, "updates": state.updates})

    def merge(self, snapshot: ExpertState, merged: ExpertState) -> None:
        """Move from ``snapshot`` to ``merged``, keeping the steps taken since the snapshot."""
        with self.lock:
            apply_merge(self.module, self.optimizer, snapshot, merged)
            self.version += 1
            self._sync_base = {k: v.clone() for k, v in merged.module.items()}  # the next delta starts here
            gained = self.updates - snapshot.updates
            self.updates = max(self.updates, merged.updates + gained)
            self._updates_at_snapshot = max(self._updates_at_snapshot, self.updates - gained)
