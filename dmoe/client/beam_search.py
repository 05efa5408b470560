"""Batch-wide search for each sample's best alive experts on a grid, over DHT prefix records.

Where experts are
-----------------
Experts of one layer live at uids ``{prefix}.{i}.{j}...`` on a grid of ``grid_size``. The
``ExpertRegistry`` keeps one dictionary record per grid level (see ``dmoe.dht.registry``): ``get`` of
``ffn.`` returns the alive first coordinates, ``ffn.3.`` the alive second coordinates under 3, and
at the last level each coordinate comes with every endpoint serving that expert (replicas).
``ExpertRegistry.get_prefixes`` fetches any set of such keys in one batched DHT call.

What is searched
----------------
The gate gives every sample one score vector per grid dimension; an expert's score is the sum of
its coordinates' scores. For every sample we want the ``k`` highest-scoring experts that are
alive (announced, unexpired, at least one endpoint not banned) -- exactly the top-k an exhaustive
scan over all alive experts would return, while fetching only the prefixes on the way.

How
---
A best-first search with an admissible bound: a prefix ``(c0, .., cl)`` can hold no expert scoring
more than ``s0[c0] + .. + sl[cl] + sum_{j>l} max(sj)``. Each sample keeps a heap of prefixes and
experts ordered by that bound (an expert's bound is its exact score). Popping the heap:

* an expert popped before any unresolved prefix is final (nothing left can beat it);
* a prefix whose record is known is expanded in place (children pushed with their bounds);
* a prefix whose record is unknown is set aside as *pending*; the sample then keeps popping (to
  collect up to ``beam_size`` pending prefixes worth fetching now) but accepts nothing further.

Every round, the pending prefixes of *all* samples are merged (one lookup per distinct prefix,
however many samples need it) and fetched with one ``get_prefixes``; then the samples resume.
On a dense grid this takes ``1 + dims`` rounds of at most ``beam_size`` distinct prefixes per
sample per level -- traffic grows with beam x dims and never with the number of experts -- and the
result is exact (the test suite compares it with an exhaustive scan).

Caching and time
----------------
Lookups go through the swarm's ``PrefixTable`` (``dmoe.client.prefix_table``): cached,
deduplicated, bounded in time, and careful about what an empty or late answer means.

A search has a time budget (it counts against the layer's ``forward_timeout``): when it runs out,
unanswered prefixes are served from stale cache entries if any (their records are still
unexpired) or treated as empty, lookups keep running in the background to warm the cache for the
next step, and the search finishes with what it knows. Experts whose endpoints are all banned are
skipped, unless a sample finds fewer than ``k_min`` others: then they are tried anyway.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np

from dmoe.client import metrics
from dmoe.client.candidates import FoundExpert, SearchResult
from dmoe.client.prefix_table import Children
from dmoe.client.swarm import Swarm
from dmoe.dht.uids import UID_DELIMITER, cell_key, make_uid

logger = logging.getLogger(__name__)

# Heap entry: (-bound, coords, partial score of coords, endpoints at the last level). A plain tuple
# so heap comparisons run in C; coords are unique per sample, so comparisons end there.
_Item = tuple[float, tuple[int, ...], float, tuple[str, ...]]


@dataclass
class _SampleSearch:
    scores: list[list[float]]  # per dimension
    rest_max: list[float]  # rest_max[l] = sum_{j >= l} max(scores[j])
    heap: list[_Item]
    k: int
    exclude: set[tuple[int, ...]] = field(default_factory=set)
    accepted: list[FoundExpert] = field(default_factory=list)
    banned: list[FoundExpert] = field(default_factory=list)
    done: bool = False


class BeamSearch:
    """Finds each sample's top-k alive experts under ``uid_prefix`` on ``grid_size`` (see module docstring)."""

    def __init__(
        self, swarm: Swarm, uid_prefix: str, grid_size: Sequence[int], *, beam_size: int | None = None
    ) -> None:
        if swarm.prefixes is None:
            raise ValueError("beam search needs a Swarm with a DHT (use_dht=True)")
        if not grid_size or any(int(g) <= 0 for g in grid_size):
            raise ValueError(f"grid_size must be positive integers, got {tuple(grid_size)}")
        self.swarm = swarm
        self.uid_prefix = uid_prefix.rstrip(UID_DELIMITER)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.beam_size = beam_size
        self._keys: dict[tuple[int, ...], str] = {}
        self._uids: dict[tuple[int, ...], str] = {}

    def prefix_key(self, coords: tuple[int, ...]) -> str:
        key = self._keys.get(coords)
        if key is None:
            key = cell_key(self.uid_prefix, coords)
            self._keys[coords] = key
        return key

    def uid(self, coords: tuple[int, ...]) -> str:
        uid = self._uids.get(coords)
        if uid is None:
            uid = self._uids[coords] = make_uid(self.uid_prefix, coords)
        return uid

    def find_best_experts(
        self, grid_scores: Sequence[np.ndarray], k: int, *, budget: float, k_min: int = 1
    ) -> SearchResult:
        """``grid_scores[j]``: (batch, grid_size[j]) scores. Blocks the caller at most ~``budget`` seconds.

        Runs in the caller's thread; each round's lookups are handed to the swarm's loop.
        """
        started = time.monotonic()
        deadline = started + max(budget, 0.0)
        search = self._search(grid_scores, [k] * grid_scores[0].shape[0], k_min=k_min)
        assert self.swarm.prefixes is not None
        try:
            prefixes = next(search)
            while True:
                remaining = max(deadline - time.monotonic(), 0.0)
                fetched = self.swarm.run(
                    self.swarm.prefixes.fetch(prefixes, timeout=remaining),
                    timeout=remaining + 5.0,  # the fetch itself returns by `remaining`
                )
                prefixes = search.send(fetched)
        except StopIteration as stop:
            result: SearchResult = stop.value
        result.elapsed = time.monotonic() - started
        metrics.SEARCH_SECONDS.observe(result.elapsed)
        return result

    async def find_best_experts_async(
        self,
        grid_scores: Sequence[np.ndarray],
        k: Sequence[int],
        *,
        deadline: float,
        exclude: Sequence[set[tuple[int, ...]]] | None = None,
        is_banned: Callable[[str], bool] | None = None,
    ) -> SearchResult:
        """Same search from inside the swarm's loop (used to reroute a few tokens mid-call).

        ``k[b]`` experts for sample b, none of ``exclude[b]`` (coordinates); ``deadline`` is a
        ``time.monotonic()`` instant; ``is_banned`` overrides the swarm's ban list.
        """
        started = time.monotonic()
        search = self._search(grid_scores, k, k_min=1, exclude=exclude, is_banned=is_banned)
        assert self.swarm.prefixes is not None
        try:
            prefixes = next(search)
            while True:
                fetched = await self.swarm.prefixes.fetch(prefixes, timeout=max(deadline - time.monotonic(), 0.0))
                prefixes = search.send(fetched)
        except StopIteration as stop:
            result: SearchResult = stop.value
        result.elapsed = time.monotonic() - started
        return result

    def _search(
        self,
        grid_scores: Sequence[np.ndarray],
        k: Sequence[int],
        *,
        k_min: int,
        exclude: Sequence[set[tuple[int, ...]]] | None = None,
        is_banned: Callable[[str], bool] | None = None,
    ) -> Generator[list[str], dict[str, Children | None], SearchResult]:
        """The search as a generator: yields prefixes to fetch, receives their children, returns the result."""
        dims = len(self.grid_size)
        if len(grid_scores) != dims:
            raise ValueError(f"expected {dims} score arrays, got {len(grid_scores)}")
        batch = grid_scores[0].shape[0]
        for j, s in enumerate(grid_scores):
            if s.shape != (batch, self.grid_size[j]):
                raise ValueError(f"scores of dimension {j} have shape {s.shape}, expected {(batch, self.grid_size[j])}")
        if not all(np.isfinite(s).all() for s in grid_scores):
            raise ValueError("gate scores contain NaN or Inf")
        per_dim = [s.astype(np.float64).tolist() for s in grid_scores]
        maxes = np.stack([s.max(axis=1) for s in grid_scores], axis=1).astype(np.float64)  # (batch, dims)
        states = []
        for b in range(batch):
            rest = [0.0] * (dims + 1)
            for j in range(dims - 1, -1, -1):
                rest[j] = rest[j + 1] + float(maxes[b, j])
            state = _SampleSearch([per_dim[j][b] for j in range(dims)], rest, [(-rest[0], (), 0.0, ())], k=int(k[b]))
            state.exclude = exclude[b] if exclude is not None else set()
            states.append(state)

        known: dict[str, list[tuple[int, tuple[str, ...]]]] = {}  # prefix -> [(coord, endpoints)] in the grid
        check = is_banned or self.swarm.health.is_banned
        verdicts: dict[str, bool] = {}

        def banned(endpoint: str) -> bool:  # one verdict per endpoint and search
            verdict = verdicts.get(endpoint)
            if verdict is None:
                verdict = verdicts[endpoint] = check(endpoint)
            return verdict

        rounds = 0
        requested: set[str] = set()
        exhausted = False
        while True:
            pending: dict[str, None] = {}
            for state in states:
                if not state.done:
                    wanted = self._advance(state, known, self._beam(state.k), banned)
                    if wanted:
                        pending.update(dict.fromkeys(wanted))
                    else:
                        state.done = True
            if not pending:
                break
            rounds += 1
            requested.update(pending)
            fetched = yield list(pending)
            for prefix in pending:
                children = fetched.get(prefix)
                if children is None:
                    exhausted = True  # lookup unfinished and nothing cached: empty for this search
                level = prefix.count(UID_DELIMITER) - self.uid_prefix.count(UID_DELIMITER) - 1
                known[prefix] = [
                    (coord, tuple(e.endpoint for e in endpoints))
                    for coord, endpoints in (children or {}).items()
                    if 0 <= coord < self.grid_size[level]  # ignore what is announced outside this grid
                ]
        self.swarm.stats_counters.searches += 1
        results = [self._finish(state, k_min, banned) for state in states]
        return SearchResult(results, rounds, len(requested), 0.0, exhausted)

    def _beam(self, k: int) -> int:
        return max(1, self.beam_size or k)

    def _advance(
        self,
        state: _SampleSearch,
        known: dict[str, list[tuple[int, tuple[str, ...]]]],
        beam: int,
        is_banned: Callable[[str], bool],
    ) -> list[str]:
        """Pop the sample's heap until it has k experts or needs unknown prefixes; returns those prefixes."""
        dims = len(self.grid_size)
        k = state.k
        pending: list[_Item] = []
        held: list[_Item] = []
        heap = state.heap
        pop, push = heapq.heappop, heapq.heappush
        while heap and len(state.accepted) < k:
            item = pop(heap)
            neg_bound, coords, partial, endpoints = item
            level = len(coords)
            if level == dims:  # an expert: its bound is its exact score
                if coords in state.exclude:
                    continue
                if pending:
                    held.append(item)
                    if len(held) >= k - len(state.accepted):
                        break
                    continue
                if all(is_banned(e) for e in endpoints):
                    state.banned.append(FoundExpert(self.uid(coords), coords, partial, endpoints, banned=True))
                else:
                    state.accepted.append(FoundExpert(self.uid(coords), coords, partial, endpoints))
                continue
            children = known.get(self.prefix_key(coords))
            if children is None:
                pending.append(item)
                if len(pending) >= beam:
                    break
                continue
            scores = state.scores[level]
            rest = state.rest_max[level + 1]
            last = level + 1 == dims
            for coord, eps in children:
                child = partial + scores[coord]
                push(heap, (-(child + rest), (*coords, coord), child, eps if last else ()))
        for item in pending + held:
            push(heap, item)
        return [self.prefix_key(item[1]) for item in pending]

    def _finish(self, state: _SampleSearch, k_min: int, is_banned: Callable[[str], bool]) -> list[FoundExpert]:
        k = state.k
        chosen = list(state.accepted)
        if len(chosen) < k:  # budget ran out: take the best unbanned experts already seen
            seen = sorted(i for i in state.heap if len(i[1]) == len(self.grid_size))
            for _, coords, partial, endpoints in seen:
                if len(chosen) >= k:
                    break
                if coords in state.exclude:
                    continue
                if all(is_banned(e) for e in endpoints):
                    state.banned.append(FoundExpert(self.uid(coords), coords, partial, endpoints, banned=True))
                else:
                    chosen.append(FoundExpert(self.uid(coords), coords, partial, endpoints))
        if len(chosen) < k_min and state.banned:  # every candidate banned: try them anyway
            chosen += sorted(state.banned, key=lambda e: (-e.score, e.coords))[: k - len(chosen)]
        return sorted(chosen, key=lambda e: (-e.score, e.coords))[:k]


def exhaustive_top_k(
    grid_scores: Sequence[np.ndarray], alive: Sequence[tuple[int, ...]], k: int
) -> list[list[tuple[int, ...]]]:
    """Reference: each sample's top-k of ``alive`` coordinates by summed score (ties by coordinates)."""
    batch = grid_scores[0].shape[0]
    per_dim = [s.astype(np.float64).tolist() for s in grid_scores]
    out = []
    for b in range(batch):
        scored = []
        for coords in alive:
            total = 0.0
            for j, c in enumerate(coords):
                total += per_dim[j][b][c]
            scored.append((-total, tuple(coords)))
        out.append([c for _, c in sorted(scored)[:k]])
    return out
