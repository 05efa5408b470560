"""Prometheus metrics of one node (prometheus-client, served on ``--metrics-port``).

Each node owns its ``CollectorRegistry`` (several nodes may live in one test process). The
exporter is prometheus-client's own small HTTP server thread; it only reads counters.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from dmoe.metrics_exporter import MetricsExporter

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class NodeMetrics(MetricsExporter):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter(
            "dmoe_node_requests", "RPCs handled, by method and final status", ["method", "status"], registry=r
        )
        self.rejections = Counter(
            "dmoe_node_rejections", "requests refused before compute, by reason", ["reason"], registry=r
        )
        self.latency = Histogram(
            "dmoe_node_request_seconds", "RPC latency (receive to reply), seconds", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "dmoe_node_queue_wait_seconds", "time a request waited in the queue before compute, seconds",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "dmoe_node_batch_compute_seconds", "compute time of one batch in a worker, seconds", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_rows = Histogram(
            "dmoe_node_batch_rows", "rows per computed batch", ["kind"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "dmoe_node_batch_requests", "requests merged per computed batch", ["kind"], buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queued_rows = Gauge("dmoe_node_queued_rows", "rows waiting in the queues", registry=r)
        self.queued_requests = Gauge("dmoe_node_queued_requests", "requests waiting in the queues", registry=r)
        self.bytes_in = Counter("dmoe_node_bytes_in", "request tensor payload received, bytes", ["method"], registry=r)
        self.bytes_out = Counter("dmoe_node_bytes_out", "reply tensor payload sent, bytes", ["method"], registry=r)
        self.updates = Counter("dmoe_node_optimizer_updates", "optimizer steps applied", ["uid"], registry=r)
        self.experts = Gauge("dmoe_node_experts_hosted", "experts served by this node", registry=r)
        self.checkpoints = Counter("dmoe_node_checkpoints_saved", "checkpoints written", registry=r)
        self.announces = Counter(
            "dmoe_node_dht_announces", "DHT announce rounds, by result", ["result"], registry=r
        )
        self.reachable = Gauge("dmoe_node_reachable", "1 if peers can dial this node directly", registry=r)
        self.relayed = Gauge("dmoe_node_relayed", "1 if this node is served through a relay", registry=r)
        self.route_changes = Counter(
            "dmoe_node_route_changes", "changes of the announced route, by new reachability", ["reachability"],
            registry=r,
        )
        self.syncs = Counter(
            "dmoe_node_replica_syncs", "expert sync rounds, by result (merged, alone: no replica answered)",
            ["result"], registry=r,
        )
        self.state_transfers = Counter(
            "dmoe_node_state_transfers", "expert states sent or received, by direction and result",
            ["direction", "result"], registry=r,
        )
        self.adoptions = Counter(
            "dmoe_node_adoptions", "experts taken over or handed off, by how", ["how"], registry=r
        )
        self.snapshot_bytes = Gauge(
            "dmoe_node_sync_snapshot_bytes", "memory held by sync-round snapshots, bytes", registry=r
        )
        self.kept_bytes = Gauge(
            "dmoe_node_activation_cache_bytes", "forward activations kept for their backward, bytes", registry=r
        )
        self.kept_calls = Counter(
            "dmoe_node_activation_cache_calls", "backward calls by whether a kept forward served them (hit) or the "
            "forward was recomputed (miss)", ["result"], registry=r,
        )
        self._server = None

    def set_route(self, reachability: str, *, relayed: bool) -> None:
        self.reachable.set(1 if reachability == "direct" else 0)
        self.relayed.set(1 if relayed else 0)
        self.route_changes.labels(reachability).inc()
