"""Beam search over real DHT records: exact top-k, batched lookups, caches, bans, time budget.

Two announcer peers (real hivemind DHT nodes with their own p2p daemons, each signing its own
records) publish a sparse random grid through ``ExpertRegistry``, some experts on both (replicas);
a client ``Swarm`` joins through them and searches. The endpoints are never called here.
"""

from __future__ import annotations

import random
import time

import hivemind
import numpy as np
import pytest
from dht_peers import Announcer, announce
from hivemind.utils import get_dht_time

from dmoe.client.beam_search import BeamSearch, exhaustive_top_k
from dmoe.client.swarm import Swarm
from dmoe.config.client import LookupOptions
from dmoe.dht.uids import make_uid

pytestmark = pytest.mark.integration  # real processes

ENDPOINT_A = "127.0.0.1:1"  # never called: beam search only reads DHT records
ENDPOINT_B = "127.0.0.1:2"


@pytest.fixture(scope="module")
def peers():
    host = Swarm(use_dht=False)
    a = Announcer.start(host, [])
    b = Announcer.start(host, a.maddrs())
    yield a, b
    b.shutdown()
    a.shutdown()
    host.shutdown()


def make_client(peers, **lookup) -> Swarm:
    a, _ = peers
    return Swarm(initial_peers=a.maddrs(), lookup=LookupOptions(**lookup) if lookup else None)


def random_grid(rng: random.Random, prefix: str, grid: tuple[int, ...], density: float) -> list[tuple[int, ...]]:
    cells = [tuple(c) for c in np.ndindex(*grid)]
    return sorted(rng.sample(cells, max(1, int(density * len(cells)))))


@pytest.mark.parametrize(
    ("prefix", "grid", "density", "k"),
    [("bs2d", (8, 8), 0.3, 4), ("bs3d", (4, 3, 5), 0.25, 3), ("bs1d", (16,), 0.5, 2), ("bsk1", (6, 6), 0.5, 1)],
)
def test_top_k_equals_exhaustive_search(peers, prefix, grid, density, k):
    a, b = peers
    rng = random.Random(hash(prefix) % 1000)
    alive = random_grid(rng, prefix, grid, density)
    on_a = [c for c in alive if rng.random() < 0.7]
    on_b = [c for c in alive if c not in on_a or rng.random() < 0.3]  # every expert somewhere, some on both
    announce(a, [make_uid(prefix, c) for c in on_a], ENDPOINT_A)
    announce(b, [make_uid(prefix, c) for c in on_b], ENDPOINT_B)
    client = make_client(peers)
    try:
        search = BeamSearch(client, prefix, grid)
        gen = np.random.default_rng(0)
        scores = [gen.normal(size=(64, g)) for g in grid]
        result = search.find_best_experts(scores, k, budget=30.0)
        assert not result.budget_exhausted
        expected = exhaustive_top_k(scores, alive, k)
        got = [[e.coords for e in chosen] for chosen in result.experts]
        assert got == expected
        for b, chosen in enumerate(result.experts):
            for e in chosen:
                want = {ENDPOINT_A} if e.coords in on_a else set()
                want |= {ENDPOINT_B} if e.coords in on_b else set()
                assert set(e.endpoints) == want, e  # every replica is reported
                assert e.uid == make_uid(prefix, e.coords)
                assert e.score == pytest.approx(sum(float(scores[j][b, c]) for j, c in enumerate(e.coords)))
    finally:
        client.shutdown()


def test_lookups_grow_with_beam_and_dims_not_experts(peers):
    a, _ = peers
    grid = (16, 16)  # 256 experts, all alive
    announce(a, [make_uid("dense", c) for c in np.ndindex(*grid)], ENDPOINT_A)
    client = make_client(peers)
    try:
        search = BeamSearch(client, "dense", grid)
        gen = np.random.default_rng(1)
        one = [gen.normal(size=(1, g)) for g in grid]
        before = client.stats["lookups"]
        result = search.find_best_experts(one, 4, budget=30.0)
        fetched = client.stats["lookups"] - before
        # root + at most beam (=k) prefixes of the second level, far below the 16 + 1 of a full scan
        assert fetched == result.prefixes_fetched <= 1 + 4
        assert result.rounds == 2
        assert [e.coords for e in result.experts[0]] == exhaustive_top_k(one, list(np.ndindex(*grid)), 4)[0]

        # a whole batch: one lookup per distinct prefix, however many samples need it
        client.run(_clear(client), timeout=5)
        batch = [gen.normal(size=(128, g)) for g in grid]
        before = client.stats["lookups"]
        result = search.find_best_experts(batch, 4, budget=30.0)
        fetched = client.stats["lookups"] - before
        assert fetched == result.prefixes_fetched <= 1 + 16
        assert client.stats["lookup_batches"] <= result.rounds + 2
        assert [[e.coords for e in c] for c in result.experts] == exhaustive_top_k(batch, list(np.ndindex(*grid)), 4)
    finally:
        client.shutdown()


async def _clear(swarm: Swarm) -> None:
    assert swarm.prefixes is not None
    swarm.prefixes.clear()


def test_cache_negative_cache_and_expiry(peers):
    a, _ = peers
    grid = (4, 4)
    announce(a, [make_uid("cache", c) for c in [(0, 0), (0, 1), (2, 3)]], ENDPOINT_A)
    cache_ttl = 2.0
    client = make_client(peers, cache_ttl=cache_ttl, negative_ttl=cache_ttl)
    try:
        search = BeamSearch(client, "cache", grid)
        scores = [np.array([[5.0, 0, 1, 2]]), np.array([[0.0, 3, 0, 5.0]])]  # 0.1: 8, (3.3: 7), 2.3: 6, 0.0: 5
        fetched = time.monotonic()
        first = search.find_best_experts(scores, 3, budget=30.0)
        first_done = time.monotonic()
        assert [e.coords for e in first.experts[0]] == [(0, 1), (2, 3), (0, 0)]
        lookups = client.stats["lookups"]
        again = search.find_best_experts(scores, 3, budget=30.0)
        assert again.experts == first.experts
        assert client.stats["lookups"] == lookups  # all from cache, no DHT traffic
        # an empty prefix is remembered as empty too
        empty = BeamSearch(client, "nothing_here", grid)
        assert empty.find_best_experts(scores, 2, budget=30.0).experts == [[]]
        lookups = client.stats["lookups"]
        assert empty.find_best_experts(scores, 2, budget=30.0).experts == [[]]
        assert client.stats["lookups"] == lookups
        # a new expert is seen once the cached records are older than cache_ttl, not before
        announce(a, ["cache.3.3"], ENDPOINT_A)
        cached = search.find_best_experts(scores, 3, budget=30.0)
        if time.monotonic() - fetched < cache_ttl:  # (a very busy machine may have let the entries expire)
            assert cached.experts == first.experts
        time.sleep(max(0.0, first_done + cache_ttl + 0.2 - time.monotonic()))  # every entry is older
        # a search holding older, still alive entries waits only briefly for their refresh (stale_wait)
        # and goes on with them; the refresh lands for the next search
        deadline = time.monotonic() + 20
        while True:
            later = search.find_best_experts(scores, 3, budget=30.0)
            if [e.coords for e in later.experts[0]] == [(0, 1), (3, 3), (2, 3)] or time.monotonic() > deadline:
                break
            assert later.experts == first.experts
            time.sleep(0.1)
        assert [e.coords for e in later.experts[0]] == [(0, 1), (3, 3), (2, 3)]
        assert client.stats["lookups"] > lookups
    finally:
        client.shutdown()


def announce_short_lived(peer: Announcer, client: Swarm, search: BeamSearch, scores: list[np.ndarray],
                         records: dict[str, str], ttl: float, want: set[tuple[int, ...]]) -> tuple[float, float]:
    """Announce ``records`` (uid -> endpoint) with ``ttl`` until the search reads them back as ``want`` in time.

    A busy machine may take longer than the ttl to read the records back: the ttl is then doubled.
    Returns (when they were announced, the ttl used).
    """
    for _ in range(4):
        client.run(_clear(client), timeout=5)
        announced = time.monotonic()
        for uid, endpoint in records.items():
            announce(peer, [uid], endpoint, ttl=ttl)
        found = {e.coords for e in search.find_best_experts(scores, 2, budget=30.0).experts[0]}
        if found == want or time.monotonic() - announced < ttl:
            break
        ttl *= 2
    assert found == want
    return announced, ttl


def test_expired_records_are_not_returned(peers):
    a, _ = peers
    announce(a, ["short.1.1"], ENDPOINT_A, ttl=60.0)
    client = make_client(peers)
    try:
        search = BeamSearch(client, "short", (2, 2))
        scores = [np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])]
        # its own node record: a shorter ttl cannot overwrite that of ENDPOINT_A
        announced, ttl = announce_short_lived(a, client, search, scores, {"short.0.0": "127.0.0.1:3"}, 1.5,
                                              {(0, 0), (1, 1)})
        time.sleep(max(0.0, announced + ttl + 0.5 - time.monotonic()))  # past the record's expiration
        # the client's cache must not resurrect it
        assert [e.coords for e in search.find_best_experts(scores, 2, budget=30.0).experts[0]] == [(1, 1)]
    finally:
        client.shutdown()


def test_an_endpoint_that_answered_lately_outlives_its_expired_record(peers):
    """The client saw the endpoint answer a moment ago: a record the DHT let expire does not hide it."""
    a, _ = peers
    client = make_client(peers, cache_ttl=30.0, vouch_window=30.0)
    try:
        search = BeamSearch(client, "vouch", (2, 2))
        scores = [np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])]
        announced, ttl = announce_short_lived(
            a, client, search, scores, {"vouch.0.0": "127.0.0.1:5", "vouch.1.1": "127.0.0.1:6"}, 2.0, {(0, 0), (1, 1)}
        )
        client.health.record_success("127.0.0.1:5", 0.01)  # as if the client had just called it
        time.sleep(max(0.0, announced + ttl + 0.5 - time.monotonic()))  # both records expired, still cached
        assert [e.coords for e in search.find_best_experts(scores, 2, budget=30.0).experts[0]] == [(0, 0)]
        client.health.record_failure("127.0.0.1:5", "unreachable")  # a failure since: no longer vouched for
        assert search.find_best_experts(scores, 2, budget=30.0).experts[0] == []
    finally:
        client.shutdown()


def test_an_older_copy_of_a_record_does_not_hide_the_newer(peers):
    """hivemind 1.1 evicted a subkey at the expiration of an *older* copy merged after it (dmoe.dht.patches)."""
    a, _ = peers
    announce(a, ["older.0.0"], ENDPOINT_A, ttl=60.0)
    # a late, older copy of the same entries (a delayed replica, a peer's cached copy): rejected, and harmless
    late = a.registry.announce(["older.0.0"], endpoint=ENDPOINT_A, node_id="older", load=0.0, ttl=1.0)
    assert not a.host.run(late, timeout=30)
    time.sleep(1.5)  # past the older copy's expiration, far from the newer one's
    client = make_client(peers)
    try:
        search = BeamSearch(client, "older", (1, 1))
        result = search.find_best_experts([np.zeros((1, 1)), np.zeros((1, 1))], 1, budget=30.0)
        assert [e.uid for e in result.experts[0]] == ["older.0.0"]
    finally:
        client.shutdown()


def test_an_empty_child_listed_by_its_parent_is_unanswered_not_empty(peers):
    a, b = peers
    announce(a, ["cons.1.1"], ENDPOINT_A)
    assert b.host.run(b.registry.announce(["cons.0.0"], endpoint=ENDPOINT_B, node_id="cons-b", load=0.0, ttl=60.0),
                      timeout=30)
    client = make_client(peers, cache_ttl=30.0)  # the parent record stays cached throughout
    try:
        search = BeamSearch(client, "cons", (2, 2))
        scores = [np.array([[0.0, 5.0]]), np.array([[0.0, 5.0]])]  # 1.1 first: "cons.0." is not read yet
        first = search.find_best_experts(scores, 1, budget=30.0)
        assert [e.uid for e in first.experts[0]] == ["cons.1.1"] and not first.budget_exhausted

        # b's expert leaves; the cached root still lists coordinate 0, its child record is now empty
        assert b.host.run(b.registry.withdraw(["cons.0.0"], node_id="cons-b", ttl=60.0), timeout=30)
        failures = client.stats["lookup_failures"]
        doubtful = search.find_best_experts(scores, 2, budget=30.0)
        assert [e.uid for e in doubtful.experts[0]] == ["cons.1.1"]
        assert doubtful.budget_exhausted  # incomplete: a reroute would retry, not give its tokens up
        assert client.stats["lookup_failures"] == failures + 1

        settled = search.find_best_experts(scores, 2, budget=30.0)  # root read again: 0 is gone there too
        assert [e.uid for e in settled.experts[0]] == ["cons.1.1"]
        assert not settled.budget_exhausted
        assert client.stats["lookup_failures"] == failures + 1
    finally:
        client.shutdown()


def test_banned_endpoints_are_skipped_unless_nothing_else(peers):
    a, b = peers
    announce(a, ["ban.0.0", "ban.0.1", "ban.1.0"], ENDPOINT_A)
    announce(b, ["ban.1.1", "ban.1.0"], ENDPOINT_B)  # ban.1.0 is replicated on both
    client = make_client(peers)
    try:
        search = BeamSearch(client, "ban", (2, 2))
        scores = [np.array([[3.0, 0.0]]), np.array([[2.0, 0.0]])]  # order: 0.0, 0.1, 1.0, 1.1
        assert [e.uid for e in search.find_best_experts(scores, 2, budget=30.0).experts[0]] == ["ban.0.0", "ban.0.1"]
        client.health.record_failure(ENDPOINT_A, "unreachable")
        chosen = search.find_best_experts(scores, 2, budget=30.0).experts[0]
        assert [e.uid for e in chosen] == ["ban.1.0", "ban.1.1"]  # A's experts skipped, the replica stays
        client.health.record_failure(ENDPOINT_B, "unreachable")
        chosen = search.find_best_experts(scores, 2, budget=30.0, k_min=1).experts[0]
        assert [e.uid for e in chosen] == ["ban.0.0", "ban.0.1"]  # everyone banned: try them anyway
        assert all(e.banned for e in chosen)
        client.health.record_success(ENDPOINT_A, 0.01)
        assert [e.uid for e in search.find_best_experts(scores, 2, budget=30.0).experts[0]] == ["ban.0.0", "ban.0.1"]
    finally:
        client.shutdown()


def test_exclusions_give_next_best(peers):
    a, _ = peers
    grid = (3, 3)
    cells = list(np.ndindex(*grid))
    announce(a, [make_uid("excl", c) for c in cells], ENDPOINT_A)
    client = make_client(peers)
    try:
        search = BeamSearch(client, "excl", grid)
        gen = np.random.default_rng(3)
        scores = [gen.normal(size=(5, g)) for g in grid]
        full = exhaustive_top_k(scores, cells, 6)
        exclude = [set(full[b][:2]) for b in range(5)]
        result = client.run(
            search.find_best_experts_async(scores, [3] * 5, deadline=time.monotonic() + 30, exclude=exclude),
            timeout=35,
        )
        assert [[e.coords for e in c] for c in result.experts] == [full[b][2:5] for b in range(5)]
    finally:
        client.shutdown()


def test_time_budget_bounds_the_search(peers):
    a, _ = peers
    announce(a, [make_uid("budget", c) for c in np.ndindex(4, 4)], ENDPOINT_A)
    client = make_client(peers)
    try:
        search = BeamSearch(client, "budget", (4, 4))
        scores = [np.zeros((2, 4)), np.zeros((2, 4))]
        started = time.monotonic()
        cold = search.find_best_experts(scores, 4, budget=0.0)
        assert time.monotonic() - started < 0.5
        assert cold.budget_exhausted and cold.experts == [[], []]
        # the lookups went on in the background and warmed the cache
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            warm = search.find_best_experts(scores, 4, budget=0.0)
            if all(len(c) == 4 for c in warm.experts):
                break
            time.sleep(0.1)
        assert all(len(c) == 4 for c in warm.experts)
    finally:
        client.shutdown()


def test_bad_arguments(peers):
    client = make_client(peers)
    try:
        search = BeamSearch(client, "bad", (2, 3))
        with pytest.raises(ValueError, match="shape"):
            search.find_best_experts([np.zeros((1, 2)), np.zeros((1, 2))], 1, budget=1.0)
        with pytest.raises(ValueError, match="NaN"):
            search.find_best_experts([np.zeros((1, 2)), np.full((1, 3), np.nan)], 1, budget=1.0)
        with pytest.raises(ValueError, match="grid_size"):
            BeamSearch(client, "bad", (2, 0))
    finally:
        client.shutdown()


def test_swarm_from_an_existing_hivemind_dht(peers):
    a, _ = peers
    announce(a, ["hd.0.0", "hd.1.1"], ENDPOINT_A)
    dht = hivemind.DHT(initial_peers=a.maddrs(), client_mode=True, start=True)
    try:
        with Swarm.from_dht(dht) as client:
            search = BeamSearch(client, "hd", (2, 2))
            scores = [np.array([[1.0, 0.5]]), np.array([[0.0, 1.0]])]  # 1.1: 1.5, 0.0: 1.0
            assert [e.uid for e in search.find_best_experts(scores, 2, budget=30.0).experts[0]] == ["hd.1.1", "hd.0.0"]
        assert dht.is_alive()  # the caller's DHT outlives the Swarm
    finally:
        dht.shutdown()


def test_subkeys_with_a_malformed_owner_marker_are_not_experts(peers):
    """hivemind signs only NAME[owner:KEY] subkeys; b"1[owner:" is writable by anyone and must be ignored."""
    a, b = peers
    announce(a, ["mal.0.0"], ENDPOINT_A)
    forged = b.dht.node.store("mal.", subkey=b"1[owner:", value=(ENDPOINT_B, "forger", 0.0),
                              expiration_time=get_dht_time() + 60)
    assert b.host.run(forged, timeout=30)  # unsigned, so the honest peers accept it
    table = a.host.run(a.registry.get_prefixes(["mal."]), timeout=30)
    assert list(table["mal."]) == [0]
    client = make_client(peers)
    try:
        result = BeamSearch(client, "mal", (2, 1)).find_best_experts([np.zeros((1, 2)), np.zeros((1, 1))], 2,
                                                                    budget=30.0)
        assert [e.uid for e in result.experts[0]] == ["mal.0.0"]
    finally:
        client.shutdown()


def test_an_owner_growing_a_shared_record_without_bound_is_ignored_there(peers):
    """One key storing more entries under a grid cell than any grid row has (or absurd coordinates) cannot
    flood everyone's lookups of that cell; the other owners' entries still resolve."""
    from dmoe.dht.registry import MAX_ENTRIES_PER_OWNER

    a, b = peers
    announce(a, ["grow.0", "grow.1"], ENDPOINT_A)
    expiration = get_dht_time() + 60
    flood = [("grow.", b.registry._owned(str(c)), (ENDPOINT_B, "grower", 0.0), expiration)
             for c in range(MAX_ENTRIES_PER_OWNER + 1)]
    keys, subkeys, values, expirations = map(list, zip(*flood, strict=True))
    b.host.run(b.dht.store_many(keys, subkeys, values, expirations), timeout=120)
    huge = b.host.run(b.dht.store_many(["grow."], [b.registry._owned("12345678901")], [(ENDPOINT_B, "g", 0.0)],
                                       [expiration]), timeout=30)
    assert huge
    table = a.host.run(a.registry.get_prefixes(["grow."]), timeout=30)
    assert sorted(table["grow."]) == [0, 1]
    assert {e.endpoint for eps in table["grow."].values() for e in eps} == {ENDPOINT_A}
