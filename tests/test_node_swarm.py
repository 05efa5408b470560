"""Two real node processes in one hivemind DHT swarm: discovery, replicas, signed records, leaving.

Node A starts a new swarm, node B joins through A's multiaddr; they share one expert (a replica
pair). Lookups go through fresh DHT peers joining via either node. An attacker peer then tries to
overwrite and to erase A's record, which hivemind's RSASignatureValidator must refuse.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from dmoe.node.checkpoint import CheckpointStore
from hivemind.utils import get_dht_time
from node_rpc import call, close_channels, find_experts

from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertRegistry
from dmoe.experts import create_expert

pytestmark = pytest.mark.integration  # real processes

H = 16
UIDS = ["ffn.0.0", "ffn.0.1", "ffn.0.2"]


def node_args(experts: str, ckpt, *extra: str) -> list[str]:
    return ["--experts", experts, "--host", "127.0.0.1", "--hidden-dim", str(H), "--seed", "5",
            "--announce-ttl", "20", "--checkpoint-dir", str(ckpt), *extra]


def endpoints(found: dict) -> dict[str, list[str]]:
    return {uid: sorted(e.endpoint for e in eps) for uid, eps in found.items()}


async def attack(initial_peers: list[str], victim_endpoint: str) -> dict:
    """Another peer tries to overwrite and to erase the victim's ``ffn.0.`` -> ``0`` record."""
    attacker = await InLoopDHT.create(initial_peers=initial_peers)
    try:
        record = await attacker.node.get("ffn.0.", latest=True)
        victim_subkey = next(
            subkey for subkey, item in record.value.items()
            if isinstance(item.value, tuple | list) and item.value and item.value[0] == victim_endpoint
            and subkey.startswith(b"0[owner:")
        )
        assert attacker.owner_marker not in victim_subkey
        later = get_dht_time() + 120  # a newer expiration would win if the record were not signed
        overwrite = await attacker.store_many(["ffn.0."], [victim_subkey], [("127.0.0.1:1", "evil", 0.0)], [later])
        erase = await attacker.store_many(["ffn.0."], [victim_subkey], [()], [later])
        # the same peer can write records it owns: the refusals above are about ownership
        own = await attacker.store_many(["attacker.0."], [b"0" + attacker.owner_marker], [("x:1", "me", 0.0)], [later])
        after = await ExpertRegistry(attacker).find_experts(["ffn.0.0"])
        return {"overwrite": overwrite, "erase": erase, "own": own, "after": after}
    finally:
        await attacker.shutdown()


def test_two_nodes_replicas_signed_records_and_graceful_leave(launch, tmp_path):
    a = launch("node", node_args("ffn.0.[0:2]", tmp_path / "ckpt_a"), name="a")
    b = launch("node", node_args("ffn.0.[1:3]", tmp_path / "ckpt_b", "--initial-peers", *a.ready["dht"]), name="b")
    ep_a, ep_b = a.ready["grpc"], b.ready["grpc"]
    expected = {"ffn.0.0": [ep_a], "ffn.0.1": sorted([ep_a, ep_b]), "ffn.0.2": [ep_b]}
    try:
        # found through either node's DHT, the replica pair as two endpoints
        assert endpoints(find_experts(a.ready["dht"], UIDS)) == expected
        found = find_experts(b.ready["dht"], UIDS)
        assert endpoints(found) == expected
        ids = {e.endpoint: e.node_id for e in found["ffn.0.1"]}
        assert ids == {ep_a: a.ready["node_id"], ep_b: b.ready["node_id"]}

        # both replicas serve the same seeded module
        x = torch.randn(3, H)
        with torch.no_grad():
            want = create_expert("ffn", hidden_dim=H, seed=5, uid="ffn.0.1")(x)
        for ep in (ep_a, ep_b):
            (y,) = call(ep, "Forward", "ffn.0.1", [x])
            assert torch.allclose(y, want, atol=1e-5)

        # another peer cannot overwrite or erase A's record
        result = asyncio.run(attack(b.ready["dht"], ep_a))
        assert result["overwrite"] and not any(result["overwrite"].values())
        assert result["erase"] and not any(result["erase"].values())
        assert all(result["own"].values())
        assert [e.endpoint for e in result["after"]["ffn.0.0"]] == [ep_a]

        # SIGTERM: B withdraws its records, saves a checkpoint and exits 0
        assert b.stop(timeout=30) == 0
        assert CheckpointStore(tmp_path / "ckpt_b").files(), "graceful exit must save a checkpoint"
        assert "withdrew" in b.log_tail(40)
        after = endpoints(find_experts(a.ready["dht"], UIDS))
        assert after == {"ffn.0.0": [ep_a], "ffn.0.1": [ep_a], "ffn.0.2": []}, "records withdrawn, not left to expire"
    finally:
        close_channels()

