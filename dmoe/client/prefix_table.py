"""``PrefixTable``: the client's cache of DHT grid records, shared by every search of a ``Swarm``.

``PrefixTable`` caches records for ``cache_ttl`` seconds (keep it below the nodes' announce TTL),
empty prefixes for ``negative_ttl``, drops endpoints whose record expired, shares in-flight
lookups, and caps every DHT call at ``lookup_timeout``.

Lookups slow down exactly when the swarm is in trouble: while a DHT peer is frozen, every
hivemind ``get`` waits out its RPC timeout (3 s). So a search that holds an older entry with
records still alive waits only ``stale_wait`` for its refresh and goes on with the older entry
(the refresh lands in the cache for the next step); it waits longer only for what it knows
nothing about. And *alive* means: the record is unexpired, or its endpoint answered this client
within ``vouch_window`` and has not failed since -- the client's own observation outranks a
DHT that serves late copies of records (a node whose refresh did not reach the peers we asked is
not dead). An entry whose records are all dead is not "empty" but unknown until it is read again.

An empty answer is not always the truth: hivemind's ``get`` reports "not found" when the peers
holding a key did not answer in time (frozen or overloaded peers), and a negative cache entry
would then hide alive experts for ``negative_ttl``. So a child record that comes back empty while
its parent record (cached, fresh) lists that very coordinate with unexpired endpoints is treated
as *unanswered*: it is not cached, the parent's entry is dropped (the next search reads both
again), and the fetch serves a stale entry of the child whose records are still unexpired if there
is one, else reports the prefix unanswered -- the search then says it is incomplete
(``budget_exhausted``), and a reroute retries shortly instead of giving its tokens up. When the
parent was the stale one (a node that just left: its tombstones are read at the child first), the
re-read parent no longer lists the coordinate and the next search is complete again. Likewise a
grid's root record that comes back empty while the cached entry still holds
records that are unexpired or whose endpoints answered lately is unanswered, not empty: when two
of four DHT peers froze together, the root came back empty and a negative entry skipped every
step for two seconds. (Only for a grid's root: a whole grid does not leave at once, while the last
node of a row may.) (Records that lose entries inside hivemind itself are fixed at the source:
``dmoe.dht.patches``.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hivemind.utils import get_dht_time

from dmoe.client import metrics
from dmoe.config.client import LookupOptions
from dmoe.dht.registry import ExpertEndpoint, ExpertRegistry
from dmoe.dht.uids import parent_cell

logger = logging.getLogger(__name__)

Children = dict[int, list[ExpertEndpoint]]  # coordinate -> endpoints (one prefix record)


@dataclass
class _CacheEntry:
    fetched: float  # time.monotonic()
    children: Children


class PrefixTable:
    """Cached, deduplicated DHT prefix lookups. Lives in (and is only touched from) the swarm's loop."""

    def __init__(
        self, registry: ExpertRegistry, options: LookupOptions, stats: Any, *,
        vouch: Callable[[str, float], bool] | None = None,
        on_endpoints: Callable[[list[tuple[str, float]]], None] | None = None,
    ) -> None:
        self.registry = registry
        self.options = options
        self.stats = stats
        self.vouch = vouch  # (endpoint, window) -> it answered within the window and has not failed since
        self.on_endpoints = on_endpoints  # told every (endpoint, announced load) a lookup returned
        self._cache: dict[str, _CacheEntry] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}

    def _alive(self, children: Children) -> Children:
        """The endpoints of ``children`` whose record is unexpired or whose endpoint answered us lately."""
        now = get_dht_time()
        window = self.options.vouch_window
        out: Children = {}
        for coord, endpoints in children.items():
            alive = [e for e in endpoints
                     if e.expiration > now or (self.vouch is not None and self.vouch(e.endpoint, window))]
            if alive:
                out[coord] = alive
        return out

    def _known(self, entry: _CacheEntry) -> Children | None:
        """What an entry says now: its alive children, or None if it had children and all are dead."""
        alive = self._alive(entry.children)
        return alive if alive or not entry.children else None

    async def fetch(self, prefixes: Sequence[str], timeout: float) -> dict[str, Children | None]:
        """Children of each prefix; ``None`` when a lookup did not finish in ``timeout`` and nothing is cached."""
        now = time.monotonic()
        result: dict[str, Children | None] = {}
        missing: list[str] = []
        stale_alive = True  # every missing prefix has an older entry with alive records to fall back on
        for prefix in dict.fromkeys(prefixes):
            entry = self._cache.get(prefix)
            known = self._known(entry) if entry is not None else None
            ttl = self.options.cache_ttl if entry is not None and entry.children else self.options.negative_ttl
            if entry is not None and known is not None and now - entry.fetched < ttl:
                result[prefix] = known
                self.stats.cache_hits += 1
            else:
                missing.append(prefix)
                stale_alive = stale_alive and bool(known)
        if not missing:
            return result
        new = [p for p in missing if p not in self._inflight]
        if new:
            task = asyncio.get_running_loop().create_task(self._lookup(new))
            for p in new:
                self._inflight[p] = task
        tasks = {self._inflight[p] for p in missing if p in self._inflight}
        wait = min(timeout, self.options.stale_wait) if stale_alive else timeout
        if tasks and wait > 0:
            await asyncio.wait(tasks, timeout=wait)  # never cancels them: they warm the cache
        for prefix in missing:
            entry = self._cache.get(prefix)
            # fresh if the lookup finished; else an older entry whose records are still alive
            result[prefix] = self._known(entry) if entry is not None else None
        return result

    async def _lookup(self, prefixes: list[str]) -> None:
        started = time.monotonic()
        try:
            found = await asyncio.wait_for(self.registry.get_prefixes(prefixes), self.options.lookup_timeout)
        except Exception as e:  # DHT trouble must not break a forward: stale cache / empty is the fallback
            self.stats.lookup_failures += 1
            metrics.LOOKUP_FAILURES.inc()
            logger.info("DHT lookup of %d prefixes failed: %r", len(prefixes), e)
            found = None
        finally:
            for p in prefixes:
                self._inflight.pop(p, None)
        elapsed = time.monotonic() - started
        self.stats.lookups += len(prefixes)
        self.stats.lookup_batches += 1
        self.stats.lookup_seconds += elapsed
        metrics.LOOKUPS.inc(len(prefixes))
        metrics.LOOKUP_SECONDS.observe(elapsed)
        if found is not None:
            done = time.monotonic()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("lookup %.3fs: %s", elapsed, {p: sorted(found.get(p, {})) for p in prefixes})
            for p in prefixes:
                children = found.get(p, {})
                if not children and self._listed_by_parent(p, done):
                    self._distrust(p)
                    continue
                older = self._cache.get(p)
                if not children and parent_cell(p) is None and older is not None and self._alive(older.children):
                    self._doubt(p)  # a whole grid gone at once while its records are unexpired: a DHT hiccup
                    continue
                self._cache[p] = _CacheEntry(done, children)
            if self.on_endpoints is not None:
                seen = {e.endpoint: e.load for children in found.values() for eps in children.values() for e in eps}
                self.on_endpoints(list(seen.items()))

    def _listed_by_parent(self, prefix: str, now: float) -> bool:
        """True if the fresh cached parent of ``prefix`` lists its coordinate with an unexpired endpoint."""
        parent = parent_cell(prefix)
        if parent is None:
            return False
        key, coord = parent
        entry = self._cache.get(key)
        if entry is None or not entry.children or now - entry.fetched >= self.options.cache_ttl:
            return False
        return coord in self._alive({coord: entry.children.get(coord, [])})

    def _distrust(self, prefix: str) -> None:
        """An empty answer that contradicts the parent: unanswered, and the parent is read again."""
        parent = parent_cell(prefix)
        assert parent is not None
        self._cache.pop(parent[0], None)
        stale = self._cache.get(prefix)
        if stale is not None and not stale.children:
            del self._cache[prefix]  # an old "empty" is no better than this one
        self.stats.lookup_failures += 1
        metrics.LOOKUP_FAILURES.inc()
        logger.info("DHT lookup of %r came back empty although %r lists it: treated as unanswered", prefix, parent[0])

    def _doubt(self, prefix: str) -> None:
        """An empty answer while our older entry still has unexpired (or lately answering) records: unanswered.

        The older entry stays (its records expire on their own; endpoints that fail get banned), the
        lookup counts as failed and the next search reads the prefix again.
        """
        self.stats.lookup_failures += 1
        metrics.LOOKUP_FAILURES.inc()
        logger.info("DHT lookup of %r came back empty while its records are still alive: treated as unanswered",
                    prefix)

    def clear(self) -> None:
        self._cache.clear()
