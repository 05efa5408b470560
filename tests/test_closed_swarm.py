"""A closed swarm end to end, every process real: the coordinator hands tokens to listed members, the node
trains its experts only for them, a trainer that is no member is told so and changes nothing, and members'
trainers use only nodes that are members themselves.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from node_rpc import close_channels, updates

from dmoe.membership import load_or_create_member_key, member_id

pytestmark = pytest.mark.integration

PROC = {"env": {"OMP_NUM_THREADS": "1"}, "timeout": 180}
MODEL = ["--hidden-dim", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "4", "--grid-size", "2x2",
         "--k-best", "2", "--eval-every", "0", "--no-progress", "--torch-threads", "1", "--max-data-mb", "2"]
EXPERTS = "layer0.ffn.[0:2].[0:2],layer1.ffn.[0:2].[0:2]"


def steps(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "step"] if path.exists() else []


@pytest.mark.timeout(600)
def test_only_members_train_the_experts_of_a_closed_swarm(launch, tmp_path):
    alice = load_or_create_member_key(tmp_path / "alice.key")
    volunteer = load_or_create_member_key(tmp_path / "volunteer.key")
    members = tmp_path / "members.txt"
    members.write_text(f"{member_id(alice.public_key())}  # alice\n{member_id(volunteer.public_key())}  # a node\n")
    coordinator = launch("coordinator", [
        "--identity", str(tmp_path / "coordinator.key"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http-host",
        "127.0.0.1", "--http-port", "0", "--relay-host", "127.0.0.1", "--relay-port", "0", "--peers-file", "none",
        "--members", str(members), "--token-ttl", "60"], name="coordinator", timeout=180)
    peers, http = coordinator.ready["dht"], coordinator.ready["http"].replace("0.0.0.0", "127.0.0.1")
    closed = ["--hidden-dim", "32", "--host", "127.0.0.1", "--initial-peers", *peers, "--authority",
              coordinator.ready["peer_id"]]
    node = launch("node", ["--experts", EXPERTS, *closed, "--member-key", str(tmp_path / "volunteer.key"),
                           "--token-url", http], name="node", **PROC)
    endpoint, uids = node.ready["grpc"], node.ready["experts"]
    try:
        # a stranger: its forwards are answered, its backwards refused; the experts stay as they were
        stranger_log = tmp_path / "stranger.jsonl"
        stranger = launch("train", ["--initial-peers", *peers, *MODEL, "--steps", "3", "--log-file",
                                    str(stranger_log)], name="stranger", **PROC)
        assert stranger.proc.wait(300) == 0, stranger.log_tail()
        assert sum(updates(endpoint, uid) for uid in uids) == 0
        assert "This swarm is closed to non-members" in Path(stranger.log_path).read_text()

        # a key that is not on the list gets no token: the trainer stops at once with the reason
        mallory = launch("train", ["--initial-peers", *peers, *MODEL, "--steps", "3", "--member-key",
                                   str(tmp_path / "mallory.key"), "--token-url", http], name="mallory", wait=False,
                         **PROC)
        assert mallory.proc.wait(300) != 0
        assert "not on this swarm's members list" in Path(mallory.log_path).read_text()

        # a node that is not on the list serves the same experts: members must not use it
        outsider = launch("node", ["--experts", EXPERTS, "--hidden-dim", "32", "--host", "127.0.0.1",
                                   "--initial-peers", *peers, "--metrics-port", "0"], name="outsider", **PROC)

        # alice, on the list, gets a token from the coordinator and trains the experts
        alice_log = tmp_path / "alice.jsonl"
        member = launch("train", ["--initial-peers", *peers, *MODEL, "--steps", "4", "--log-file", str(alice_log),
                                  "--member-key", str(tmp_path / "alice.key"), "--token-url", http],
                        name="alice", **PROC)
        assert member.proc.wait(300) == 0, member.log_tail()
        assert not any(r["skipped"] for r in steps(alice_log))
        assert sum(updates(endpoint, uid) for uid in uids) > 0
        assert sum(updates(outsider.ready["grpc"], uid) for uid in uids) == 0
        assert "no valid membership" in Path(member.log_path).read_text()  # it saw the outsider and skipped it
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{outsider.ready['metrics_port']}/metrics", timeout=10)
        forwards = [line for line in scrape.read().decode().splitlines()
                    if line.startswith("dmoe_node_requests_total") and 'method="Forward"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in forwards) == 0, forwards
        assert "issued a membership token" in Path(coordinator.log_path).read_text()
    finally:
        close_channels()
