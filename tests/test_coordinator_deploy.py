"""The monitoring files in deploy/ stay true to the code: every metric the Grafana dashboard plots is one a
dmoe process really exports, and the scrape/provisioning files agree with docker-compose.yml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from dmoe.coordinator.swarm_metrics import SwarmCollector
from dmoe.coordinator.view import SwarmView
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dmoe-swarm.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
             "gauge": ("",), "info": ("_info",), "unknown": ("",)}


def exported_series() -> set[str]:
    """Sample names that node, trainer, client and coordinator metrics can expose."""
    from dmoe.node.metrics import NodeMetrics

    from dmoe.client import metrics as client_metrics
    from dmoe.train.trainer import TrainerMetrics

    swarm = CollectorRegistry()
    swarm.register(SwarmCollector(SwarmView(registry=None), dht_peers=lambda: 0))  # type: ignore[arg-type]
    client = [m for m in vars(client_metrics).values() if isinstance(m, MetricWrapperBase)]
    names: set[str] = set()
    families = [f for reg in (NodeMetrics().registry, TrainerMetrics().registry, swarm) for f in reg.collect()]
    families += [f for metric in client for f in metric.describe()]
    for family in families:
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


@pytest.mark.integration
def test_every_dashboard_metric_is_exported():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bdmoe_[a-z_]+\b", expr)}
    assert {n.split("_")[1] for n in used} >= {"swarm", "node", "trainer"}  # plots all three kinds of process
    missing = used - exported_series()
    assert not missing, f"dashboard plots metrics nobody exports: {sorted(missing)}"


def test_dashboard_layout_and_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "dmoe-prometheus" and panel["targets"]
    sources = yaml.safe_load((DEPLOY / "grafana" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [s["uid"] for s in sources] == ["dmoe-prometheus"]


def test_scrape_and_provisioning_match_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    grafana_mount = next(v for v in services["grafana"]["volumes"] if v.startswith("./deploy/grafana:"))
    provisioning = grafana_mount.split(":")[1]
    provider = yaml.safe_load((DEPLOY / "grafana" / "dashboards" / "dmoe.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == f"{provisioning}/dashboards"
    assert any(v.startswith("./deploy/prometheus.yml:") for v in services["prometheus"]["volumes"])

    scrape = {job["job_name"]: job for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    coordinator_command = services["coordinator"]["command"]
    http_port = coordinator_command[coordinator_command.index("--http-port") + 1]
    assert scrape["coordinator"]["static_configs"][0]["targets"] == [f"coordinator:{http_port}"]
    metrics_port = int(re.search(r"^METRICS_PORT = (\d+)", (ROOT / "docker/entrypoint.py").read_text(), re.M)[1])
    for job in ("node", "trainer"):
        sd = scrape[job]["dns_sd_configs"][0]
        assert sd["names"] == [job] and job in services and sd["port"] == metrics_port
