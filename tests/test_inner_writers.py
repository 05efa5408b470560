"""Inner grid levels are kept by ``INNER_WRITERS`` owners per coordinate, not by every node (real DHT peers).

Six peers, each with its own key, serve experts under the same first coordinate ``iw.0``. After two
announce rounds only the three best-ranked owners still write the shared root entry; every replica
stays in the leaf record. When those three leave, the others take the root over at their next round.
Keys that write root entries but serve nothing below cannot talk the honest owners out of writing.
"""

from __future__ import annotations

import time

import pytest
from dht_peers import Announcer
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dmoe.client.swarm import Swarm
from dmoe.dht.registry import INNER_WRITERS, _owned_entries, _rank

pytestmark = pytest.mark.integration
TTL = 60.0
ROOT, COORD, CHILD = "iw.", "0", "iw.0."


@pytest.fixture
def peers():
    host = Swarm(use_dht=False)
    first = Announcer.start(host, [])
    rest = [Announcer.start(host, first.maddrs()) for _ in range(5)]
    for peer in [first, *rest]:
        peer.registry.inner_recheck = 0.0  # re-read every round: the rounds here are seconds apart, the TTL a minute
    yield host, [first, *rest]
    for peer in reversed([first, *rest]):
        peer.shutdown()
    host.shutdown()


def announce_round(peers: list[tuple[int, Announcer]]) -> float:
    """Every peer announces its expert ``iw.0.<i>`` once, in turn; returns the round's start (DHT time).

    Rounds are 1.5 s apart, so an entry written in this round (expiring at or after start + TTL) is told
    from one an earlier round wrote."""
    time.sleep(1.5)
    started = get_dht_time()
    for i, peer in peers:
        coro = peer.registry.announce([f"iw.0.{i}"], endpoint=f"127.0.0.1:{20000 + i}", node_id=f"n{i}", load=0.0,
                                      ttl=TTL)
        assert peer.host.run(coro, timeout=30)
    return started


def entries(reader: Announcer, key: str) -> dict[bytes, tuple[object, float]]:
    record = reader.host.run(reader.dht.get_many([key]), timeout=30)[key]
    return {owner: (value, exp) for name, owner, value, exp in _owned_entries(record, get_dht_time())
            if key != ROOT or name == COORD}


def marker(peer: Announcer) -> bytes:
    return peer.dht.owner_marker


def owner_of(peer: Announcer) -> bytes:
    return marker(peer)[len(b"[owner:"):-1]


def ranked(peers: list[tuple[int, Announcer]]) -> list[tuple[int, Announcer]]:
    return sorted(peers, key=lambda p: _rank(marker(p[1]), ROOT, COORD))


@pytest.mark.timeout(300)
def test_only_the_best_ranked_owners_keep_the_root_and_the_rest_take_over(peers):
    host, all_peers = peers
    numbered = list(enumerate(all_peers))
    announce_round(numbered)
    second = announce_round(numbered)
    fresh = {o for o, (value, exp) in entries(all_peers[0], ROOT).items() if value and exp >= second + TTL}
    keepers = ranked(numbered)[:INNER_WRITERS]
    assert fresh == {owner_of(p) for _, p in keepers}  # the rest stopped refreshing the shared root entry
    leaf = entries(all_peers[0], CHILD)
    assert {owner_of(p) for p in all_peers} <= set(leaf)  # every replica below is still there

    # the keepers leave gracefully; the others notice at their next round
    for i, peer in keepers:
        assert host.run(peer.registry.withdraw([f"iw.0.{i}"], node_id=f"n{i}", ttl=TTL), timeout=30)
    left = [p for p in numbered if p not in keepers]
    assert not {o for o, (value, _) in entries(all_peers[0], ROOT).items() if value} - {owner_of(p) for _, p in left}
    third = announce_round(left)
    fresh = {o for o, (value, exp) in entries(all_peers[0], ROOT).items() if value and exp >= third + TTL}
    assert fresh == {owner_of(p) for _, p in left}
    found = host.run(all_peers[0].registry.get_prefixes([ROOT]), timeout=30)[ROOT]
    assert int(COORD) in found


@pytest.mark.timeout(300)
def test_keys_that_serve_nothing_below_do_not_count(peers):
    host, all_peers = peers
    honest = list(enumerate(all_peers[:4]))
    squatters = all_peers[4:]
    best_honest = _rank(marker(honest[0][1]), ROOT, COORD)
    for _, p in honest:
        best_honest = min(best_honest, _rank(marker(p), ROOT, COORD))
    # give the two squatters keys that rank before every honest owner (about 1 in 5 keys does)
    for squatter in squatters:
        validator = squatter.dht.node.protocol.record_validator
        while True:
            key = RSAPrivateKey()
            validator._private_key = key
            validator._local_public_key = validator.PUBLIC_KEY_FORMAT.replace(b"_key_", key.get_public_key().to_bytes())
            squatter.dht.owner_marker = validator.local_public_key
            if _rank(squatter.dht.owner_marker, ROOT, COORD) < best_honest:
                break
        store = squatter.dht.store_many([ROOT], [COORD.encode() + squatter.dht.owner_marker],
                                        [("127.0.0.1:1", "squatter", 0.0)], [get_dht_time() + TTL])
        assert all(host.run(store, timeout=30).values())
    root = entries(all_peers[0], ROOT)
    assert {owner_of(s) for s in squatters} <= set(root)  # their entries are there, ranked first
    announce_round(honest)
    second = announce_round(honest)
    fresh = {o for o, (value, exp) in entries(all_peers[0], ROOT).items() if value and exp >= second + TTL}
    assert fresh == {owner_of(p) for _, p in ranked(honest)[:INNER_WRITERS]}  # the squatters did not count


@pytest.mark.timeout(120)
def test_keepers_are_reread_once_per_ttl_not_every_round(peers):
    host, all_peers = peers
    peer = all_peers[0]
    peer.registry.inner_recheck = 1.0  # the default: once per TTL
    reads: list[list[str]] = []
    get_many = peer.dht.get_many

    async def counting(keys):  # the real lookup, counted
        reads.append(list(keys))
        return await get_many(keys)

    peer.dht.get_many = counting
    for _ in range(3):  # three rounds within one TTL
        assert host.run(peer.registry.announce(["iw.0.0"], endpoint="127.0.0.1:20000", node_id="n0", load=0.0, ttl=TTL),
                        timeout=30)
    assert sum(ROOT in keys for keys in reads) == 1, reads
    peer.registry._checked_at -= TTL  # a TTL later
    assert host.run(peer.registry.announce(["iw.0.0"], endpoint="127.0.0.1:20000", node_id="n0", load=0.0, ttl=TTL),
                    timeout=30)
    assert sum(ROOT in keys for keys in reads) == 2, reads
