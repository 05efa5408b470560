"""The trainer tells the swarm which experts it trains: its grids under ``_dmoe.grids`` in the DHT.

Nodes started with ``--experts auto`` (``dmoe.node.keeper``) read these records to know every expert the
swarm wants, including the ones nobody serves (which no expert lookup can show). Published before the
trainer waits for experts, so a swarm of ``auto`` nodes fills itself in; refreshed every ``ttl / 3`` while
the trainer runs, and gone within ``ttl`` after it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dmoe.config.train import ModelConfig

log = logging.getLogger(__name__)
GRID_TTL = 60.0


class GridPublisher:
    def __init__(self, swarm: Any, config: ModelConfig, *, ttl: float = GRID_TTL) -> None:
        self.swarm = swarm
        self.grids = [(prefix, config.grid_size, config.expert_cls, config.n_embd) for prefix in config.prefixes]
        self.ttl = ttl
        self._future: Any = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                ok = await asyncio.wait_for(self.swarm.registry.announce_grids(self.grids, ttl=self.ttl), self.ttl / 3)
            except (TimeoutError, OSError, RuntimeError):
                ok = False
            failures = 0 if ok else failures + 1
            if failures in (1, 10):
                log.warning("could not publish this trainer's grids in the DHT (%d in a row); --experts auto nodes "
                            "may not find them", failures)
            await asyncio.sleep(self.ttl / 3)

    def start(self) -> GridPublisher:
        self._future = asyncio.run_coroutine_threadsafe(self._run(), self.swarm.loop)
        return self

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
            with contextlib.suppress(Exception):
                self._future.result(timeout=5)
