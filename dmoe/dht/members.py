"""Which nodes a member of a closed swarm uses: only those that are members of the same authority.

``MemberNodes`` is the registry's ``admit`` hook (``dmoe.dht.registry``): given the owners
(key fingerprints) of the entries a lookup found, it returns those whose published membership
(token + proof, ``dmoe.membership.node_membership``) holds. Verdicts are cached: a member until
its token expires, a non-member for ``RECHECK`` seconds (a node that just got its token is used
soon). One batched DHT lookup per set of owners not seen yet.
"""

from __future__ import annotations

import logging
import time

from dmoe.dht.registry import ExpertRegistry
from dmoe.membership import check_node_membership

log = logging.getLogger(__name__)

RECHECK = 15.0  # seconds a node found to be no member is skipped before its membership is looked up again


class MemberNodes:
    def __init__(self, registry: ExpertRegistry, authority: str) -> None:
        self.registry = registry
        self.authority = authority
        self._until: dict[str, float] = {}  # owner fingerprint -> member until (unix time)
        self._refused: dict[str, float] = {}  # owner fingerprint -> do not ask again before (unix time)

    async def __call__(self, owners: set[str]) -> set[str]:
        now = time.time()
        unknown = {fp for fp in owners if self._until.get(fp, 0.0) <= now and self._refused.get(fp, 0.0) <= now}
        if unknown:
            published = await self.registry.find_memberships(unknown)
            for fp in unknown:
                until = check_node_membership(published.get(fp), fp, authority=self.authority, now=now)
                if until is None:
                    self._refused[fp] = now + RECHECK
                    log.info("skipping the experts of node key %s: no valid membership of authority %s", fp,
                             self.authority)
                else:
                    self._until[fp] = until
        return {fp for fp in owners if self._until.get(fp, 0.0) > now}
