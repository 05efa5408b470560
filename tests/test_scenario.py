"""Scenario files: the shipped ones load, and every malformed one fails with one clear ConfigError
naming the key and what was expected — before anything is launched."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dmoe.errors import ConfigError
from dmoe.sim.churn import ChurnModel
from dmoe.sim.scenario import Distribution, SwarmSpec, load_scenario, scenario_from_dict
from dmoe.sim.simulate import builtin_scenario
from dmoe.sim.swarm_layout import node_experts

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
SHIPPED = ["baseline", "home-broadband", "churn", "home-churn", "mass-failure", "freeze"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenarios_load_and_document_themselves(name):
    path = SCENARIOS / f"{name}.toml"
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each scenario explains what it represents in a leading comment"
    sc = load_scenario(path)
    assert sc.name == name and sc.description and sc.duration_s > 0
    json.dumps(sc.to_dict())  # plain data, usable by another launcher
    tl = ChurnModel(sc).timeline()
    assert len(tl.links) == sc.swarm.nodes


def test_churn_scenario_is_heavy_tailed_weibull():
    sc = load_scenario(SCENARIOS / "churn.toml")
    assert sc.churn.enabled and sc.churn.online.dist == "weibull" and sc.churn.online.params["shape"] < 1
    assert {"crash", "leave", "freeze"} <= {k for k, w in sc.churn.departure.items() if w > 0}


def test_builtin_default_shows_churn_and_slow_links():
    sc = builtin_scenario()
    tl = ChurnModel(sc).timeline()
    actions = {e.action for e in tl.events}
    assert {"crash", "freeze", "partition", "rejoin"} <= actions or {"leave", "freeze", "partition"} <= actions
    assert all(link.up_mbit <= 30 and link.latency_ms >= 10 for link in tl.links)
    assert sc.duration_s <= 240


def test_experts_are_spread_with_replicas_on_different_nodes():
    sc = load_scenario(SCENARIOS / "churn.toml")
    per_node = [node_experts(sc.swarm, i) for i in range(sc.swarm.nodes)]
    owners: dict[str, list[int]] = {}
    for node, uids in enumerate(per_node):
        for uid in uids:
            owners.setdefault(uid, []).append(node)
    assert len(owners) == sc.swarm.layers * sc.swarm.experts_per_layer
    assert all(len(set(nodes)) == sc.swarm.replicas for nodes in owners.values())
    sizes = [len(u) for u in per_node]
    assert max(sizes) - min(sizes) <= sc.swarm.replicas
    # replica sets overlap in a chain: no two nodes hold exactly the same experts
    assert len({frozenset(u) for u in per_node}) == sc.swarm.nodes


MINIMAL = {"name": "x", "duration_s": 60}


def with_(path: str, value, base: dict | None = None) -> dict:
    data = json.loads(json.dumps(base or MINIMAL))
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    "data, key, expected",
    [
        ({"duration_s": 60}, "name", "missing required key"),
        ({"name": "x"}, "duration_s", "missing required key"),
        (with_("duration_s", -1), "duration_s", "a number > 0"),
        (with_("duration_s", "long"), "duration_s", "a number"),
        (with_("swarm.nodes", 0), "swarm.nodes", "an integer in [1, 256]"),
        (with_("swarm.nodes", 2.5), "swarm.nodes", "an integer"),
        (with_("swarm.replicas", 9), "swarm.replicas", "an integer in [1, swarm.nodes = 4]"),
        (with_("swarm.grid", []), "swarm.grid", "a non-empty list of integers"),
        (with_("swarm.bootstrap", "dns"), "swarm.bootstrap", "one of 'auto', 'coordinator', 'node'"),
        (with_("swarm.colour", "red"), "swarm.colour", "unknown key"),
        (with_("churn.onlin", {"dist": "fixed", "value": 3}), "churn.onlin", "unknown key"),
        (with_("churn.online", {"dist": "weibull", "shape": -0.5, "scale": 10}), "churn.online.shape",
         "a finite number > 0"),
        (with_("churn.online", {"dist": "weibull", "scale": 10}), "churn.online.shape", "missing required key"),
        (with_("churn.online", {"dist": "gamma", "k": 2}), "churn.online.dist", "one of 'fixed', 'exponential'"),
        (with_("churn.online", {"dist": "exponential", "mean": 5, "sd": 1}), "churn.online.sd", "unknown key"),
        (with_("churn.offline", {"dist": "uniform", "low": 5, "high": 1}), "churn.offline.high",
         ">= churn.offline.low"),
        (with_("churn.keep_checkpoint", 1.5), "churn.keep_checkpoint", "a number in [0, 1]"),
        (with_("churn.departure", {"crash": 0, "leave": 0}), "churn.departure", "a weight > 0"),
        (with_("churn.departure", {"explode": 1}), "churn.departure.explode", "unknown key"),
        (with_("churn.exempt_nodes", [7]), "churn.exempt_nodes", "integers in [0, 3]"),
        (with_("churn.enabled", "yes"), "churn.enabled", "true or false"),
        (with_("links.latency_ms", -3), "links.latency_ms", "a number >= 0"),
        (with_("links.up_mbit", 0), "links.up_mbit", "a number > 0"),
        (with_("links.drop_prob", 2), "links.drop_prob", "a number in [0, 1]"),
        (with_("links.latency_ms", {"dist": "lognormal", "median": 20}), "links.latency_ms.sigma",
         "missing required key"),
        (with_("trainer.k_min", 3), "trainer.k_min", "an integer in [1, trainer.k_best = 2]"),
        (with_("trainer.n_head", 5), "trainer.n_head", f"a divisor of swarm.hidden_dim = {SwarmSpec().hidden_dim}"),
        (with_("trainer.compression", "zip"), "trainer.compression", "one of 'none'"),
        (with_("trainer.extra_args", "--lr 1"), "trainer.extra_args", "a list of strings"),
        (with_("node.announce_ttl_s", 0), "node.announce_ttl_s", "a number > 0"),
        (with_("report.min_experts", 0), "report.min_experts", "an integer >= 1"),
        (with_("events", {"at_s": 1}), "events", "an array of tables"),
        (with_("events", [{"at_s": 10, "action": "explode", "nodes": [0]}]), "events[0].action", "one of 'crash'"),
        (with_("events", [{"at_s": 99, "action": "crash", "nodes": [0]}]), "events[0].at_s", "in [0, 60.0]"),
        (with_("events", [{"at_s": 9, "action": "crash", "nodes": [4]}]), "events[0].nodes", "integers in [0, 3]"),
        (with_("events", [{"at_s": 9, "action": "crash"}]), "events[0]", "exactly one of"),
        (with_("events", [{"at_s": 9, "action": "crash", "count": 1, "fraction": 0.5}]), "events[0]",
         "exactly one of"),
        (with_("events", [{"at_s": 9, "action": "freeze", "count": 1}]), "events[0].duration_s",
         "missing required key"),
        (with_("events", [{"at_s": 9, "action": "partition", "count": 1, "duration_s": 5, "mode": "drop"}]),
         "events[0].mode", "one of 'blackhole', 'refuse'"),
        (with_("events", [{"at_s": 9, "action": "crash", "count": 1, "up_mbit": 5}]), "events[0].up_mbit",
         "only valid with action = \"link\""),
        (with_("events", [{"at_s": 9, "action": "link", "count": 1}]), "events[0]", "at least one of"),
        (with_("events", [{"at_s": 9, "action": "crash", "count": 1, "when": "now"}]), "events[0].when",
         "unknown key"),
    ],
)
def test_malformed_scenarios_name_the_key(data, key, expected):
    with pytest.raises(ConfigError) as err:
        scenario_from_dict(data, source="bad.toml")
    message = str(err.value)
    assert message.startswith("scenario bad.toml: ")
    assert key in message and expected in message, message
    assert "\n" not in message


def test_unknown_top_level_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key durration_s; expected one of: .*duration_s"):
        scenario_from_dict({"name": "x", "duration_s": 5, "durration_s": 6})


def test_bad_toml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "x"\nduration_s = = 5\n')
    with pytest.raises(ConfigError, match=r"broken.toml is not valid TOML.*line 2"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="cannot read scenario"):
        load_scenario(tmp_path / "nope.toml")


def test_numbers_are_distributions_and_defaults_fill_in():
    sc = scenario_from_dict({"name": "x", "duration_s": 30, "links": {"latency_ms": 12, "up_mbit": 5},
                             "churn": {"enabled": True, "online": 30}})
    assert sc.links.latency_ms == 12.0 and sc.links.up_mbit == 5.0
    assert sc.churn.online == Distribution.fixed(30)
    assert sc.swarm.nodes == 4 and sc.trainer.k_best == 2 and sc.min_experts == 2
    inf = tomllib.loads('name = "x"\nduration_s = 5\n[links]\nup_mbit = inf\n')
    assert scenario_from_dict(inf).links.up_mbit == float("inf")


@pytest.mark.integration
def test_cli_rejects_a_bad_scenario_before_launching_anything(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nduration_s = 60\n[churn]\nenabled = true\n'
                   'online = { dist = "weibull", shape = 0, scale = 10 }\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dmoe", "simulate", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "churn.online.shape must be a finite number > 0, got 0.0" in lines[0], proc.stderr
    assert not out.exists()  # nothing was launched, nothing written
