"""The swarm as the DHT shows it right now: nodes, experts per grid prefix, replicas, recent losses.

The coordinator has no private channel to nodes: it reads the same DHT records a client reads,
through ``ExpertRegistry``, so what it shows is what a trainer would find.

One refresh is

1. ``list_nodes()``: one batched lookup of the ``_dmoe.nodes`` shards, where every node publishes
   its endpoint, the experts it hosts and a load figure. The experts' uids also tell us which grid prefixes exist
   and how many dimensions each grid has (``ffn.3.5`` is prefix ``ffn``, 2-D).
2. ``ExpertRegistry.walk_grid`` of every prefix: level 0 asks ``ffn.`` for alive first
   coordinates, level 1 asks ``ffn.<i>.`` for every alive ``i`` (all in one batched lookup), and
   so on; the last level gives, per expert, every node serving it (replicas). A prefix whose
   dimension count nobody told us (``--prefixes ffn`` with no node record mentioning it) is probed
   one level deeper until a level comes back empty.

Between refreshes the view remembers what it saw, so it can report *changes*: nodes and experts
that vanished (kept for ``forget_after`` seconds), and when each node last re-announced (its record's
expiration moved forward). The grid shape is the one declared with ``--prefixes ffn.[0:4].[0:8]``,
or else the bounding box (from 0) of every coordinate ever seen, so coverage means "alive cells out of
the grid people are using".

Replication (issue 15): an expert's *holders* are the nodes the DHT lists as serving it (its replicas).
Per prefix, ``/status`` shows ``replication`` (alive uid -> holders), ``lineage`` (alive uid -> the most
optimizer steps a holder reports behind its weights), ``at_risk`` (alive experts with
exactly one holder: one departure loses their trained state) and ``unserved`` (experts with no holder:
every cell of a declared grid, or, for an undeclared grid, every uid this coordinator has seen
announced, that nobody serves now); swarm-wide, ``experts_at_risk``, ``experts_unserved`` and
``replication_histogram`` (holders -> experts, ``"0"`` for the unserved ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import get_dht_time

from dmoe.config import default_of
from dmoe.config.coordinator import CoordinatorOptions
from dmoe.dht.registry import ExpertEndpoint, ExpertRegistry, NodeRecord
from dmoe.dht.uids import UID_DELIMITER, make_uid, split_uid
from dmoe.errors import ConfigError

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"^\[(\d+):(\d+)\]$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class PrefixSpec:
    """A grid prefix to watch; ``grid`` is the declared [lo, hi) range per dimension, if any."""

    name: str
    grid: tuple[tuple[int, int], ...] | None = None


def parse_prefixes(text: str) -> list[PrefixSpec]:
    """``'ffn.[0:4].[0:8],attn'`` -> specs; raises ConfigError naming the bad item."""
    specs: dict[str, PrefixSpec] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        parts = item.rstrip(UID_DELIMITER).split(UID_DELIMITER)
        ranges: list[tuple[int, int]] = []
        while parts and (m := _RANGE.match(parts[-1])):
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi <= lo:
                raise ConfigError(f"prefix {item!r}: empty range [{lo}:{hi}], need [a:b] with a < b")
            ranges.insert(0, (lo, hi))
            parts.pop()
        if not parts or not all(_NAME.match(p) for p in parts):
            raise ConfigError(
                f"prefix {item!r} must be a grid name like 'ffn' or 'layer0.ffn', optionally followed by "
                "one [a:b] range per grid dimension (e.g. 'ffn.[0:4].[0:8]')"
            )
        name = UID_DELIMITER.join(parts)
        specs[name] = PrefixSpec(name, tuple(ranges) if ranges else None)
    return list(specs.values())


@dataclass
class NodeState:
    node_id: str
    endpoint: str
    experts: list[str]
    load: float
    expiration: float  # DHT time at which its record expires unless refreshed
    first_seen: float  # wall time
    last_announce: float  # wall time we first saw its current record (i.e. after it re-announced)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "endpoint": self.endpoint,
            "experts": self.experts,
            "num_experts": len(self.experts),
            "load": self.load,
            "last_seen_s": round(max(0.0, now - self.last_announce), 3),
            "up_s": round(max(0.0, now - self.first_seen), 3),
            "expires_in_s": round(self.expiration - get_dht_time(), 3),
            "info": self.info,
        }


@dataclass
class PrefixState:
    prefix: str
    grid: tuple[tuple[int, int], ...]  # [lo, hi) per dimension; () when nothing is known yet
    declared: bool
    experts: dict[str, list[ExpertEndpoint]]  # alive uid -> replicas
    known: frozenset[str] = frozenset()  # every uid of this prefix the view has seen announced
    lineage: dict[str, int] = field(default_factory=dict)  # alive uid -> most optimizer steps any holder reports

    @property
    def cells(self) -> int:
        return math.prod(hi - lo for lo, hi in self.grid) if self.grid else 0

    def alive_in_grid(self) -> int:
        return sum(1 for uid in self.experts if _in_grid(split_uid(uid)[1], self.grid))

    @property
    def coverage(self) -> float:
        return self.alive_in_grid() / self.cells if self.cells else 0.0

    def replication(self) -> dict[str, int]:
        """Alive uid -> holders (nodes serving it), in grid order."""
        return {uid: len(eps) for uid, eps in sorted(self.experts.items(), key=lambda kv: _order(kv[0]))}

    def at_risk(self) -> list[str]:
        """Alive experts with exactly one holder, in grid order."""
        return [uid for uid, n in self.replication().items() if n == 1]

    def unserved(self) -> list[str]:
        """Experts nobody serves: cells of a declared grid, else uids seen announced before; grid order."""
        if self.declared:
            cells: Iterable[str] = (make_uid(self.prefix, c) for c in itertools.product(*(range(lo, hi)
                                                                                          for lo, hi in self.grid)))
        else:
            cells = (uid for uid in self.known if _in_grid(_coords(uid), self.grid))
        return sorted((uid for uid in cells if not self.experts.get(uid)), key=_order)

    def to_json(self) -> dict[str, Any]:
        replicas = [len(eps) for eps in self.experts.values()]
        replication = self.replication()
        return {
            "prefix": self.prefix,
            "grid": [list(r) for r in self.grid],
            "grid_declared": self.declared,
            "cells": self.cells,
            "alive": len(self.experts),
            "coverage": round(self.coverage, 6),
            "replicas_min": min(replicas, default=0),
            "replicas_max": max(replicas, default=0),
            "replication": replication,
            "lineage": {uid: self.lineage[uid] for uid in replication if uid in self.lineage},
            "at_risk": [uid for uid, n in replication.items() if n == 1],
            "unserved": self.unserved(),
            "experts": {
                uid: [{"endpoint": e.endpoint, "node_id": e.node_id, "load": e.load} for e in eps]
                for uid, eps in sorted(self.experts.items(), key=lambda kv: split_uid(kv[0])[1])
            },
        }


@dataclass
class Gone:
    """Something that was alive at the previous refresh and is not any more."""

    key: str  # expert uid or node id
    gone_at: float  # wall time
    detail: dict[str, Any]

    def to_json(self, now: float) -> dict[str, Any]:
        return {"id": self.key, "gone_s_ago": round(now - self.gone_at, 3), **self.detail}


@dataclass
class SwarmSnapshot:
    taken_at: float = 0.0  # wall time; 0 before the first successful refresh
    refresh_seconds: float = 0.0
    nodes: dict[str, NodeState] = field(default_factory=dict)
    prefixes: dict[str, PrefixState] = field(default_factory=dict)
    gone_experts: dict[str, Gone] = field(default_factory=dict)
    gone_nodes: dict[str, Gone] = field(default_factory=dict)


@dataclass
class SwarmCounters:
    refreshes: int = 0
    refresh_errors: int = 0
    last_error: str = ""
    node_joins: int = 0
    node_departures: int = 0
    expert_disappearances: dict[str, int] = field(default_factory=dict)  # per prefix


class SwarmView:
    """Keeps the latest ``SwarmSnapshot``; ``run()`` refreshes it every ``period`` seconds."""

    def __init__(
        self,
        registry: ExpertRegistry,
        *,
        prefixes: Sequence[PrefixSpec] = (),
        period: float = default_of(CoordinatorOptions, "refresh_period"),
        forget_after: float = default_of(CoordinatorOptions, "forget_after"),
        lookup_timeout: float | None = None,
    ) -> None:
        self.registry = registry
        self.declared = {spec.name: spec for spec in prefixes}
        self.period = period
        self.forget_after = forget_after
        self.lookup_timeout = lookup_timeout if lookup_timeout is not None else max(10.0, 3 * period)
        self.snapshot = SwarmSnapshot()
        self.counters = SwarmCounters()
        self._dims: dict[str, int] = {n: len(s.grid) for n, s in self.declared.items() if s.grid}
        self._seen_max: dict[str, list[int]] = {}  # prefix -> max coordinate seen per dimension
        self._known: dict[str, set[str]] = {}  # prefix -> every uid seen announced (node records or walks)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until ``stop`` is set; a failed refresh is logged and counted, never fatal.

        If a refresh already happened (the CLI does one before announcing readiness), wait a period first.
        """
        if self.counters.refreshes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.period)
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.refresh(), self.lookup_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.counters.refresh_errors += 1
                self.counters.last_error = f"{type(e).__name__}: {e}"[:300]
                logger.warning("swarm refresh failed (keeping the previous view): %s", self.counters.last_error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.period)

    async def refresh(self) -> SwarmSnapshot:
        started = time.perf_counter()
        records = await self.registry.list_nodes()
        now = time.time()
        nodes = self._merge_nodes(records, now)
        for node in nodes.values():
            self._learn_uids(node.experts)
        names = sorted({*self.declared, *self._dims, *self.snapshot.prefixes})
        walked = await asyncio.gather(*(self.registry.walk_grid(name, self._dims.get(name)) for name in names))
        prefixes = {}
        for name, experts in zip(names, walked, strict=True):
            self._learn_uids(experts)
            spec = self.declared.get(name)
            declared = spec is not None and spec.grid is not None
            grid = spec.grid if declared else tuple((0, m + 1) for m in self._seen_max.get(name, []))
            prefixes[name] = PrefixState(name, grid, declared, experts, frozenset(self._known.get(name, ())),
                                         lineage_of(nodes.values(), experts))
        previous = self.snapshot
        snapshot = SwarmSnapshot(now, time.perf_counter() - started, nodes, prefixes)
        self._track_losses(previous, snapshot, now)
        self.snapshot = snapshot
        self.counters.refreshes += 1
        return snapshot

    def _merge_nodes(self, records: list[NodeRecord], now: float) -> dict[str, NodeState]:
        nodes: dict[str, NodeState] = {}
        for record in records:
            key = record.node_id
            old = self.snapshot.nodes.get(key)
            extra = {k: v for k, v in record.info.items() if k not in ("endpoint", "experts", "load")}
            if old is not None:
                reannounced = record.expiration > old.expiration + 1e-6
                last = now if reannounced else old.last_announce
                nodes[key] = NodeState(key, record.endpoint, record.experts, record.load, record.expiration,
                                       old.first_seen, last, extra)
            else:
                nodes[key] = NodeState(key, record.endpoint, record.experts, record.load, record.expiration,
                                       now, now, extra)
        return nodes

    def _learn_uids(self, uids: Sequence[str] | dict[str, Any]) -> None:
        for uid in uids:
            try:
                prefix, coords = split_uid(uid)
            except ConfigError:
                continue  # a node announcing a non-grid uid; nothing to map
            self._dims[prefix] = max(self._dims.get(prefix, 0), len(coords))
            self._known.setdefault(prefix, set()).add(uid)
            seen = self._seen_max.setdefault(prefix, [])
            seen.extend([0] * (len(coords) - len(seen)))
            for i, c in enumerate(coords):
                seen[i] = max(seen[i], c)

    def _track_losses(self, previous: SwarmSnapshot, current: SwarmSnapshot, now: float) -> None:
        gone_nodes = {k: g for k, g in previous.gone_nodes.items()
                      if now - g.gone_at < self.forget_after and k not in current.nodes}
        gone_experts = {k: g for k, g in previous.gone_experts.items() if now - g.gone_at < self.forget_after}
        for key, node in previous.nodes.items():
            if key not in current.nodes:
                self.counters.node_departures += 1
                gone_nodes[key] = Gone(key, now, {"endpoint": node.endpoint, "num_experts": len(node.experts)})
                logger.info("node %s at %s is gone (%d experts)", key, node.endpoint, len(node.experts))
        for key, node in current.nodes.items():
            if key not in previous.nodes:
                self.counters.node_joins += 1
                logger.info("node %s at %s joined with %d experts (load %.3g)",
                            key, node.endpoint, len(node.experts), node.load)
        alive = {uid for p in current.prefixes.values() for uid in p.experts}
        for name, state in previous.prefixes.items():
            lost = [uid for uid in state.experts if uid not in alive]
            for uid in lost:
                gone_experts[uid] = Gone(uid, now, {"prefix": name,
                                                    "endpoints": [e.endpoint for e in state.experts[uid]]})
            if lost:
                self.counters.expert_disappearances[name] = self.counters.expert_disappearances.get(name, 0) + len(lost)
                shown = ", ".join(sorted(lost, key=lambda u: split_uid(u)[1])[:8])
                logger.info("%d expert(s) of %s disappeared: %s%s", len(lost), name, shown,
                            ", ..." if len(lost) > 8 else "")
        current.gone_nodes = gone_nodes
        current.gone_experts = {k: g for k, g in gone_experts.items() if k not in alive}

    def to_json(self) -> dict[str, Any]:
        snap, now = self.snapshot, time.time()
        return {
            "taken_at": snap.taken_at,
            "age_s": round(now - snap.taken_at, 3) if snap.taken_at else None,
            "refresh_seconds": round(snap.refresh_seconds, 6),
            "refresh_period_s": self.period,
            "nodes": [n.to_json(now) for n in sorted(snap.nodes.values(), key=lambda n: n.endpoint)],
            "prefixes": {name: p.to_json() for name, p in snap.prefixes.items()},
            **replication_totals(snap.prefixes.values()),
            "gone": {
                "nodes": [g.to_json(now) for g in sorted(snap.gone_nodes.values(), key=lambda g: -g.gone_at)],
                "experts": [g.to_json(now) for g in sorted(snap.gone_experts.values(), key=lambda g: -g.gone_at)],
                "forget_after_s": self.forget_after,
            },
            "counters": {
                "refreshes": self.counters.refreshes,
                "refresh_errors": self.counters.refresh_errors,
                "last_error": self.counters.last_error,
                "node_joins": self.counters.node_joins,
                "node_departures": self.counters.node_departures,
                "expert_disappearances": dict(self.counters.expert_disappearances),
            },
        }


def lineage_of(nodes: Iterable[NodeState], experts: dict[str, Any]) -> dict[str, int]:
    """Alive uid -> the most optimizer steps behind it that any node announcing it reports (``info.lineage``)."""
    best: dict[str, int] = {}
    for node in nodes:
        reported = node.info.get("lineage")
        if not isinstance(reported, dict):
            continue
        for uid, steps in reported.items():
            if uid in experts and isinstance(steps, int) and steps > best.get(uid, -1):
                best[uid] = steps
    return best


def replication_totals(prefixes: Iterable[PrefixState]) -> dict[str, Any]:
    """Swarm-wide ``experts_at_risk``, ``experts_unserved`` and ``replication_histogram`` (holders -> experts)."""
    histogram: dict[int, int] = {}
    at_risk = unserved = 0
    for state in prefixes:
        for n in state.replication().values():
            histogram[n] = histogram.get(n, 0) + 1
        at_risk += len(state.at_risk())
        missing = len(state.unserved())
        unserved += missing
        if missing:
            histogram[0] = histogram.get(0, 0) + missing
    return {"experts_at_risk": at_risk, "experts_unserved": unserved,
            "replication_histogram": {str(n): histogram[n] for n in sorted(histogram)}}


def _coords(uid: str) -> tuple[int, ...]:
    try:
        return split_uid(uid)[1]
    except ConfigError:
        return ()


def _order(uid: str) -> tuple[tuple[int, ...], str]:
    return _coords(uid), uid


def _in_grid(coords: tuple[int, ...], grid: tuple[tuple[int, int], ...]) -> bool:
    return len(coords) == len(grid) and all(lo <= c < hi for c, (lo, hi) in zip(coords, grid, strict=True))

