"""A frozen DHT peer must not make the other nodes' experts vanish from lookups.

While a peer is SIGSTOPped (node and its p2pd daemon: a laptop asleep), every DHT store that
involves it waits for hivemind's RPC timeout. Announce rounds that were cut short at the next
refresh then never landed, every node's records expired together, and whole layers vanished
from clients' lookups for as long as the freeze lasted. Four real nodes; one is frozen for
longer than the records' TTL while a client keeps looking up the others' experts.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertRegistry

pytestmark = pytest.mark.integration  # real processes

TTL = 6.0  # seconds; refreshed every 2 s
FREEZE = 14.0  # > 2 TTL: without refreshes landing, every record would be gone well before the end


def node_args(experts: str, *extra: str) -> list[str]:
    return ["--experts", experts, "--host", "127.0.0.1", "--hidden-dim", "16", "--announce-ttl", str(TTL), *extra]


async def watch_through_freeze(initial_peers: list[str], uids: list[str], frozen) -> list[tuple[float, dict[str, int]]]:
    """A client that already knows the swarm looks ``uids`` up again and again while ``frozen`` is stopped."""
    client = await InLoopDHT.create(initial_peers=initial_peers)
    registry = ExpertRegistry(client)
    seen = []
    try:
        first = await registry.find_experts(uids)
        assert all(len(eps) == 1 for eps in first.values()), first
        frozen.freeze()
        try:
            start = time.monotonic()
            while time.monotonic() - start < FREEZE:
                found = await registry.find_experts(uids)
                seen.append((round(time.monotonic() - start, 1), {uid: len(eps) for uid, eps in found.items()}))
                await asyncio.sleep(0.5)
        finally:
            frozen.resume()
    finally:
        await client.shutdown()
    return seen


def test_experts_stay_visible_while_a_dht_peer_is_frozen(launch):
    a = launch("node", node_args("fr.0.[0:2]"), name="a")
    peers = ["--initial-peers", *a.ready["dht"]]
    b = launch("node", node_args("fr.1.[0:2]", *peers), name="b")
    c = launch("node", node_args("fr.2.[0:2]", *peers), name="c")
    frozen = launch("node", node_args("fr.3.[0:2]", *peers), name="frozen")
    uids = [f"fr.{i}.{j}" for i in range(3) for j in range(2)]
    seen = asyncio.run(watch_through_freeze(b.ready["dht"], uids, frozen))
    lost = [(t, [uid for uid, n in found.items() if n == 0]) for t, found in seen]
    lost = [(t, uids) for t, uids in lost if uids]
    assert len(seen) >= 3
    assert not lost, f"experts of live nodes vanished while a peer was frozen: {lost}; all lookups: {seen}"
    for proc in (a, b, c):
        assert proc.alive()
