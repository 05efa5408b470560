"""The /metrics HTTP endpoint every long-running dmoe process (node, trainer) serves."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsExporter:
    """Base for a process's metric set: holds its own registry and serves it over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: Any = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics exporter; returns the port actually bound (``port=0`` picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
