"""A volunteer behind a real NAT router trains with the swarm through a relay, and survives the relay dying.

The network is real: three Linux network namespaces (``netns.nat_topology``): a public side
(two coordinators, both relays, and the trainer), a router that masquerades, and a home LAN with
the ``dmoe node``. Nothing on the public side can dial the home node; the node dials out. Every
process is a real ``dmoe`` process, every kill a real signal. The namespaces are removed at the
end, also when the test fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from netns import nat_topology, netns_available

pytestmark = pytest.mark.integration

H = "64"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROC = {"env": ONE_THREAD, "timeout": 180}
MODEL = ["--hidden-dim", H, "--n-head", "4", "--block-size", "64", "--batch-size", "8", "--grid-size", "4x4",
         "--k-best", "2", "--eval-batches", "2", "--no-progress", "--torch-threads", "1", "--max-data-mb", "4"]
EXPERTS = "layer0.ffn.[0:4].[0:4],layer1.ffn.[0:4].[0:4]"


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps(path: Path) -> list[dict]:
    return [r for r in read_log(path) if r["type"] == "step"]


def wait_for(predicate, *, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited while waiting for {what}:\n{proc.log_tail()}")
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def coordinator_args(tmp_path: Path, name: str, host: str, *extra: str) -> list[str]:
    return ["--identity", str(tmp_path / f"{name}.key"), "--host-maddrs", f"/ip4/{host}/tcp/0", "--http-host",
            "127.0.0.1", "--http-port", "0", "--relay-host", host, "--relay-port", "0", "--peers-file", "none",
            *extra]


@pytest.mark.timeout(900)
def test_node_behind_nat_trains_through_a_relay_and_moves_to_another_when_it_dies(launch, tmp_path):
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with nat_topology() as net:
        first = launch("coordinator", coordinator_args(tmp_path, "c1", net.public_ip), name="relay1",
                       netns=net.public, timeout=180)
        second = launch("coordinator", coordinator_args(tmp_path, "c2", net.public_ip, "--initial-peers",
                                                        *first.ready["dht"]), name="relay2", netns=net.public,
                        timeout=180)
        relays = {first.ready["relay"]: first, second.ready["relay"]: second}
        node = launch("node", ["--experts", EXPERTS, "--hidden-dim", H, "--seed", "0", "--host", "0.0.0.0",
                               "--announce-ttl", "10", "--initial-peers", *first.ready["dht"]],
                      name="home_node", netns=net.home, **PROC)

        # behind the router: the check says not reachable, and the node serves through one of the relays
        port = int(node.ready["grpc"].rsplit(":", 1)[1])
        assert net.can_connect(net.home, net.home_ip, port), "the node's server is up at home"
        assert not net.can_connect(net.public, net.home_ip, port), "the public side must not reach the home node"
        assert not net.can_connect(net.public, net.router_public_ip, port), "the router forwards no port"
        assert node.ready["reachability"] == "relayed", node.ready
        assert node.ready["relay"] in relays and node.ready["announced"].endswith("@" + node.ready["relay"])
        node_log = Path(node.log_path).read_text()
        assert "not reachable from outside" in node_log and f"UNREACHABLE {net.router_public_ip}" in node_log

        log = tmp_path / "train.jsonl"
        trainer = launch("train", ["--initial-peers", *first.ready["dht"], *second.ready["dht"], *MODEL,
                                   "--steps", "30", "--eval-every", "0", "--log-file", str(log)],
                         name="trainer", netns=net.public, **PROC)
        wait_for(lambda: len(steps(log)) >= 8, timeout=300, what="8 steps through the relay", procs=[trainer, node])
        before = steps(log)
        assert not any(r["skipped"] for r in before), [r for r in before if r["skipped"]]
        assert before[-1]["loss"] < before[0]["loss"], (before[0]["loss"], before[-1]["loss"])

        # the relay the node announced dies; the node moves to the other one and training goes on
        dead = node.ready["relay"]
        relays[dead].kill()
        survivor = next(address for address in relays if address != dead)
        def moved() -> bool:
            return any("relay route changed" in line and f"@{survivor}" in line.split("->")[-1]
                       for line in Path(node.log_path).read_text().splitlines())

        wait_for(moved, timeout=60, what=f"the node's route to move to {survivor}", procs=[node])
        killed_at = len(steps(log))
        code = trainer.proc.wait(600)
        assert code == 0, trainer.log_tail()
        after = steps(log)[killed_at:]
        trained_after = [r for r in after if not r["skipped"]]
        assert len(trained_after) >= 5, f"only {len(trained_after)} steps trained after the relay died: {after}"
        assert steps(log)[-1]["step"] == 30
        assert node.alive()
        skipped_after = len(after) - len(trained_after)
        print(f"NAT: {len(before)} steps through {dead} (loss {before[0]['loss']:.3f} -> {before[-1]['loss']:.3f}), "
              f"relay killed, {len(trained_after)} trained and {skipped_after} skipped through {survivor}")


def metric(url: str, name: str) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.timeout(300)
def test_reachability_on_loopback_is_direct_and_forced_relaying_or_no_relay_is_reported(launch, tmp_path):
    coordinator = launch("coordinator", coordinator_args(tmp_path, "c", "127.0.0.1"), name="coordinator", timeout=180)
    peers = coordinator.ready["dht"]
    common = ["--hidden-dim", "32", "--host", "127.0.0.1", "--initial-peers", *peers, "--metrics-port", "0"]
    direct = launch("node", ["--experts", "a.[0:2]", *common], name="direct", **PROC)
    assert direct.ready["reachability"] == "direct" and direct.ready["relay"] is None
    assert direct.ready["announced"] == direct.ready["grpc"]
    assert "REACHABLE 127.0.0.1" in Path(direct.log_path).read_text()
    relayed = launch("node", ["--experts", "b.[0:2]", *common, "--reachability", "relay"], name="relayed", **PROC)
    assert relayed.ready["reachability"] == "relayed"
    assert relayed.ready["relay"] == coordinator.ready["relay"]
    for proc, reachable, via_relay in ((direct, 1, 0), (relayed, 0, 1)):
        url = f"http://127.0.0.1:{proc.ready['metrics_port']}/metrics"
        assert metric(url, "dmoe_node_reachable") == reachable and metric(url, "dmoe_node_relayed") == via_relay
    http = coordinator.ready["http"].replace("0.0.0.0", "127.0.0.1")
    assert metric(f"http://{http}/metrics", "dmoe_relay_tunnels") == 1
    # a reachable volunteer can relay too (dmoe node --relay); a node told to use it attaches there
    volunteer_relay = launch("node", ["--experts", "d.[0:1]", *common, "--relay", "--relay-port", "0"],
                             name="volunteer_relay", **PROC)
    assert volunteer_relay.ready["reachability"] == "direct" and volunteer_relay.ready["relay_port"]
    via_node = f"127.0.0.1:{volunteer_relay.ready['relay_port']}"
    second = launch("node", ["--experts", "e.[0:1]", *common, "--reachability", "relay", "--relays", via_node],
                    name="via_volunteer", **PROC)
    assert second.ready["reachability"] == "relayed" and second.ready["relay"] == via_node
    # nothing to relay through: the node says it is unreachable and what the volunteer can do
    alone = launch("node", ["--experts", "c.[0:1]", "--hidden-dim", "32", "--host", "127.0.0.1",
                            "--reachability", "relay", "--relays", "127.0.0.1:9"], name="alone", **PROC)
    assert alone.ready["reachability"] == "unreachable" and alone.ready["announced"] is None
    text = Path(alone.log_path).read_text()
    assert "forward TCP port" in text and "--relays" in text
