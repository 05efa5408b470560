"""ExpertBackend: one hosted expert, its optimizer and its update counter.

All methods run in a worker thread (never on the event loop) and take the expert's lock, so a
checkpoint snapshot never sees a half-applied optimizer step. Forward runs under inference mode;
backward recomputes the forward with autograd (the node keeps no activations between calls),
backpropagates the caller's ``grad_outputs``, clips, steps the optimizer and returns the
gradients w.r.t. the inputs. Snapshots, transfers and merges of its state (``dmoe.node.state``) take the
same lock.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

import torch
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

    def _to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return tensors
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock, torch.inference_mode():
            outputs = _as_list(self.module(*self._to_device(inputs)))
            return [o.cpu() for o in outputs]

    def backward(self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock:
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
            grads = [
                (x.grad if x.grad is not None else torch.zeros_like(x)).cpu() for x in inputs
            ]
            self._step()
            return grads

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

    # ---- replicas (dmoe.node.replicas) ----

    def snapshot(self) -> ExpertState:
        """A copy of the current state; its weight is the steps trained since the previous snapshot."""
        state = self.state_dict()
        weight = float(state["updates"] - self._updates_at_snapshot)
        self._updates_at_snapshot = state["updates"]
        return ExpertState(module=state["module"], optimizer=state["optimizer"], updates=state["updates"],
                           weight=weight)

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
            gained = self.updates - snapshot.updates
            self.updates = max(self.updates, merged.updates + gained)
            self._updates_at_snapshot = max(self._updates_at_snapshot, self.updates - gained)
