"""ActivationCache: what a backward needs from its forward, kept for a short, bounded time.

Without it a node recomputes every forward inside the backward (the trainer sends the inputs again), which
costs a whole forward pass per training step and expert. A trainer now tags each forward call with a
``call_id`` and sends the same id with its backward. A forward batch that carries ids runs with autograd
and its graph (the tensors autograd saved, counted exactly through ``saved_tensors_hooks``) is kept here,
keyed by the ids of the calls merged into it.

A backward batch uses a kept graph when it carries *every* call of that forward batch (one trainer's step:
the usual case) -- one backward pass over the graph, nothing recomputed. Everything else falls back to
recomputing, exactly as before: calls without ids, a graph evicted (memory cap ``--activation-cache-mb``,
least recently kept first) or expired (``--activation-cache-s``), a backward that arrives at another
replica than the forward did, a forward batch whose calls come back in different backward batches, and a
graph whose expert's weights changed in between (another trainer's step, a replica sync: the backend's
weights version tells; the node then recomputes with the current weights, which is what recomputing
always did).

The cache is used from the worker threads; its own lock is held only for dictionary work, never for
compute.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class KeptForward:
    """One forward batch's autograd graph: inputs (leaves), outputs, and the rows of each call in it."""

    uid: str
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    rows: dict[str, tuple[int, int]]  # call id -> [start, stop) rows of the merged batch
    nbytes: int
    expires: float
    version: int = 0  # the expert's weights version at that forward (ExpertBackend.version)
    taken: bool = field(default=False)


class ActivationCache:
    def __init__(self, *, max_bytes: int, ttl: float) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0
        self._by_call: dict[str, KeptForward] = {}
        self._order: OrderedDict[int, KeptForward] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.ttl > 0

    def keep(self, kept: KeptForward) -> bool:
        """Keep a forward's graph unless it alone exceeds the cap; evicts the oldest ones to make room."""
        if kept.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._expire(time.monotonic())
            while self._order and self.bytes + kept.nbytes > self.max_bytes:
                self._drop(next(iter(self._order.values())))
                self.evicted += 1
            self._order[id(kept)] = kept
            for call in kept.rows:
                old = self._by_call.get(call)
                if old is not None and old is not kept:  # a retried call id: the newest forward counts
                    self._drop(old)
                self._by_call[call] = kept
            self.bytes += kept.nbytes
        return True

    def claim(self, uid: str, calls: Sequence[str]) -> list[KeptForward]:
        """The kept forwards of ``uid`` whose every call is in ``calls``, removed from the cache (used once)."""
        wanted = set(calls)
        found: list[KeptForward] = []
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            for call in calls:
                kept = self._by_call.get(call)
                if kept is None or kept.taken or kept.uid != uid or kept.expires <= now or not set(kept.rows) <= wanted:
                    continue
                kept.taken = True
                found.append(kept)
                self._drop(kept)
            covered = sum(len(k.rows) for k in found)
            self.hits += covered
            self.misses += len([c for c in calls if c]) - covered
        return found

    def _expire(self, now: float) -> None:
        while self._order:
            oldest = next(iter(self._order.values()))
            if oldest.expires > now:
                return
            self._drop(oldest)

    def _drop(self, kept: KeptForward) -> None:
        if self._order.pop(id(kept), None) is None:
            return
        self.bytes -= kept.nbytes
        for call in kept.rows:
            if self._by_call.get(call) is kept:
                del self._by_call[call]


def saved_bytes_counter(
    params: Sequence[torch.Tensor] = (),
) -> tuple[list[int], torch.autograd.graph.saved_tensors_hooks]:
    """A context that counts the bytes autograd saves for backward (``[total]``, the hooks); tensors that share
    storage with ``params`` (the expert's own weights, saved by reference) cost nothing extra and are not counted."""
    total = [0]
    seen: set[int] = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # views of one storage count once
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    return total, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
