"""Prometheus metrics (``dmoe_swarm_*``) computed from the coordinator's latest swarm snapshot.

A custom collector rather than long-lived Gauge objects: label sets (nodes, experts) come and go
with churn, and building the families from the current snapshot at scrape time means a departed
node's series simply stop, instead of lingering with a stale value until someone removes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from dmoe.coordinator.view import SwarmView
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SwarmCollector(Collector):
    def __init__(self, view: SwarmView, *, dht_peers: Callable[[], int]) -> None:
        self.view = view
        self.dht_peers = dht_peers

    def collect(self) -> Iterator[Metric]:
        snap, counters, now = self.view.snapshot, self.view.counters, time.time()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dmoe_swarm_{name}", doc, labels=list(labels))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"dmoe_swarm_{name}", doc, labels=list(labels))

        nodes = gauge("nodes", "expert nodes with an unexpired record in the DHT")
        nodes.add_metric([], len(snap.nodes))
        yield nodes
        peers = gauge("dht_peers", "peers in the coordinator's DHT routing table")
        peers.add_metric([], self.dht_peers())
        yield peers

        alive = gauge("experts_alive", "distinct experts with at least one alive replica", ("prefix",))
        cells = gauge("grid_cells", "cells of the grid (declared, or bounding box of coordinates seen)", ("prefix",))
        coverage = gauge("grid_coverage_ratio", "alive experts inside the grid / grid cells", ("prefix",))
        rmin = gauge("replicas_min", "fewest replicas of any alive expert", ("prefix",))
        replicas = gauge("expert_replicas", "nodes serving this expert", ("prefix", "uid"))
        for name, state in snap.prefixes.items():
            alive.add_metric([name], len(state.experts))
            cells.add_metric([name], state.cells)
            coverage.add_metric([name], state.coverage)
            rmin.add_metric([name], min((len(e) for e in state.experts.values()), default=0))
            for uid, eps in state.experts.items():
                replicas.add_metric([name, uid], len(eps))
        yield from (alive, cells, coverage, rmin, replicas)

        experts = gauge("node_experts", "experts hosted by the node", ("node_id", "endpoint"))
        load = gauge("node_load", "load figure the node announces", ("node_id", "endpoint"))
        seen = gauge("node_last_seen_seconds", "seconds since the node last re-announced", ("node_id", "endpoint"))
        for node in snap.nodes.values():
            labels = [node.node_id, node.endpoint]
            experts.add_metric(labels, len(node.experts))
            load.add_metric(labels, node.load)
            seen.add_metric(labels, max(0.0, now - node.last_announce))
        yield from (experts, load, seen)

        gone_nodes = gauge("nodes_gone_recently", "nodes that vanished within the forget window")
        gone_nodes.add_metric([], len(snap.gone_nodes))
        gone_experts = gauge("experts_gone_recently", "experts that vanished within the forget window", ("prefix",))
        per_prefix: dict[str, int] = {name: 0 for name in snap.prefixes}
        for gone in snap.gone_experts.values():
            prefix = str(gone.detail.get("prefix", ""))
            per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
        for prefix, count in per_prefix.items():
            gone_experts.add_metric([prefix], count)
        yield from (gone_nodes, gone_experts)

        joins = counter("node_joins", "nodes that appeared since the coordinator started")
        joins.add_metric([], counters.node_joins)
        departures = counter("node_departures", "nodes that vanished since the coordinator started")
        departures.add_metric([], counters.node_departures)
        lost = counter("expert_disappearances", "expert disappearances since the coordinator started", ("prefix",))
        for prefix, count in counters.expert_disappearances.items():
            lost.add_metric([prefix], count)
        refreshes = counter("refreshes", "completed swarm refreshes")
        refreshes.add_metric([], counters.refreshes)
        errors = counter("refresh_errors", "failed swarm refreshes")
        errors.add_metric([], counters.refresh_errors)
        yield from (joins, departures, lost, refreshes, errors)

        duration = gauge("refresh_duration_seconds", "wall time of the last swarm refresh (DHT lookups)")
        duration.add_metric([], snap.refresh_seconds)
        last = gauge("last_refresh_timestamp_seconds", "unix time of the last successful refresh (0: none yet)")
        last.add_metric([], snap.taken_at)
        yield from (duration, last)


def make_registry(view: SwarmView, *, dht_peers: Callable[[], int]) -> CollectorRegistry:
    """A registry with the swarm metrics plus this process's own (CPU, memory, fds)."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(view, dht_peers=dht_peers))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
