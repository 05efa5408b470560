"""Prometheus metrics of a relay (``dmoe_relay_*``), registered in its host process's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.tunnels = Gauge("dmoe_relay_tunnels", "nodes attached to this relay", registry=r)
        self.max_tunnels = Gauge("dmoe_relay_max_tunnels", "nodes this relay accepts at once", registry=r)
        self.connections = Gauge("dmoe_relay_connections", "client connections being relayed", registry=r)
        self.opened = Counter("dmoe_relay_connections_opened", "client connections relayed to a node", registry=r)
        self.bytes = Counter("dmoe_relay_bytes", "bytes relayed, by direction", ["direction"], registry=r)
        self.refused = Counter(
            "dmoe_relay_refused", "connections and attaches refused, by reason", ["reason"], registry=r
        )
        self.throttled = Counter(
            "dmoe_relay_throttled_seconds", "seconds relayed traffic waited for its bandwidth share", registry=r
        )
        self.dialbacks = Counter("dmoe_relay_dialbacks", "reachability checks answered, by result", ["result"],
                                 registry=r)
