"""Fast checks of the compose swarm's pure parts: expert placement, role flags, apt sources, log frames."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from dmoe.sim.churn import ChurnModel
from dmoe.sim.docker_api import demultiplex
from dmoe.sim.scenario import load_scenario, scenario_from_dict
from dmoe.sim.swarm_layout import layer_uids, node_args, node_experts, node_link, trainer_args

REPO = Path(__file__).resolve().parent.parent


def _scenario(**swarm: object):
    return scenario_from_dict({"name": "t", "duration_s": 60, "swarm": {"nodes": 3, "grid": [2, 3], **swarm}})


@pytest.mark.parametrize(("nodes", "replicas"), [(3, 1), (3, 2), (4, 3), (5, 2)])
def test_every_expert_has_its_replicas(nodes: int, replicas: int) -> None:
    sc = _scenario(nodes=nodes, replicas=replicas, layers=2, grid=[4, 4])
    served = Counter(uid for i in range(nodes) for uid in node_experts(sc.swarm, i))
    every = [uid for layer in range(2) for uid in layer_uids(sc.swarm, layer)]
    assert sorted(served) == sorted(every)
    assert set(served.values()) == {replicas}
    shares = [len(node_experts(sc.swarm, i)) for i in range(nodes)]
    assert max(shares) - min(shares) <= 2  # about the same share each


def test_single_replica_crash_removes_exactly_that_nodes_experts() -> None:
    sc = _scenario(replicas=1, layers=2)
    per_node = [set(node_experts(sc.swarm, i)) for i in range(3)]
    assert not (per_node[0] & per_node[1]) and not (per_node[0] & per_node[2])
    assert all(any(u.startswith("layer0.") for u in s) and any(u.startswith("layer1.") for u in s) for s in per_node)


def test_extra_containers_become_replicas_of_existing_slots() -> None:
    sc = _scenario(replicas=1)
    assert node_experts(sc.swarm, 3) == node_experts(sc.swarm, 0)
    assert node_experts(sc.swarm, 4, nodes=5) != node_experts(sc.swarm, 0, nodes=5)


def test_simulate_compose_and_print_node_command_place_experts_alike(capsys) -> None:
    """One placement rule: the node commands dmoe train prints for a scenario's model serve what the
    scenario's nodes serve under dmoe simulate and docker-compose."""
    from dmoe.cli import main as dmoe_main
    from dmoe.dht.uids import parse_expert_pattern

    sc = load_scenario(REPO / "scenarios" / "churn.toml")
    model = trainer_args(sc)[:10]  # --n-layer, --grid-size, --hidden-dim, --expert-cls, --uid-prefix
    assert dmoe_main(["train", *model, "--print-node-command", "--nodes", str(sc.swarm.nodes),
                      "--replicas", str(sc.swarm.replicas)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == sc.swarm.nodes
    for i, line in enumerate(printed):
        pattern = line.split("--experts '")[1].split("'")[0]
        assert parse_expert_pattern(pattern) == sorted(node_experts(sc.swarm, i))


def test_node_link_matches_the_churn_timeline_links() -> None:
    sc = load_scenario(REPO / "docker" / "scenarios" / "compose.toml")
    links = ChurnModel(sc).timeline().links
    assert [node_link(sc, i) for i in range(sc.swarm.nodes)] == list(links)


def test_role_flags_parse_with_the_real_parsers() -> None:
    from dmoe.node.cli import build_parser as node_parser

    from dmoe.train.cli import build_parser as train_parser

    sc = load_scenario(REPO / "docker" / "scenarios" / "compose.toml")
    node = node_parser().parse_args(node_args(sc, 1))
    assert node.hidden_dim == sc.swarm.hidden_dim and node.announce_ttl == sc.node.announce_ttl_s
    train = train_parser().parse_args(trainer_args(sc))
    assert train.n_layer == sc.swarm.layers and tuple(train.grid_size) == sc.swarm.grid


def test_demultiplex_docker_log_frames() -> None:
    frames = b"\x01\0\0\0\0\0\0\x06hello\n" + b"\x02\0\0\0\0\0\0\x04err\n"
    assert demultiplex(frames) == "hello\nerr\n"
    assert demultiplex(b"plain tty text\n") == "plain tty text\n"


def _docker_env():
    spec = importlib.util.spec_from_file_location("dmoe_docker_env_unit", REPO / "scripts" / "docker_env.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_apt_sources_both_formats(tmp_path: Path) -> None:
    env = _docker_env()
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg] http://mirror.example/debian trixie main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n")
    found = env.apt_sources(tmp_path)
    assert [(s.uri, s.suite) for s in found] == [("http://mirror.example/debian", "trixie"),
                                                ("http://deb.example/debian", "bookworm"),
                                                ("http://deb.example/debian", "bookworm-updates")]
    assert found[0].keyring == "/k.gpg"
    assert found[1].keyring == "/usr/share/keyrings/debian-archive-keyring.gpg"
