"""A virtual clock for dmoe's own asyncio code: an event loop whose time jumps to the next timer.

``VirtualClockLoop`` is a plain selector event loop (so ``asyncio.sleep``, ``wait_for``,
``asyncio.wait(timeout=...)``, tasks and cancellation behave exactly as in production) except
for two things: ``loop.time()`` is a number the loop owns, and when nothing is ready the loop
does not sleep until its next timer but *advances* that number to it. An hour of a swarm's
timers therefore runs in the CPU time its callbacks take, in the same order as they would in real
time. Nothing here may do real I/O or use threads: a callback that waited on a socket would see
no time pass.

dmoe's client code reads ``time.monotonic()`` for deadlines and hivemind's ``get_dht_time()``
for record expirations. ``virtual_time(loop)`` points both, in the modules listed in
``CLOCKED_MODULES``, at the loop's clock for the duration of a model run (and restores them
after), so the policies run unmodified against virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import selectors
import types
from collections.abc import Iterator
from typing import Any

# modules whose `time` module / `get_dht_time` are read on the paths the model drives
CLOCKED_MODULES = (
    "dmoe.client.swarm", "dmoe.client.dispatch", "dmoe.client.beam_search", "dmoe.client.prefix_table",
    "dmoe.dht.registry",
)


class _AdvancingSelector:
    """Wraps the loop's selector: a poll that would block advances the clock instead."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = self._inner.select(0)
        if events:
            return events
        loop = self._loop
        if timeout is None:
            raise RuntimeError("virtual clock: nothing is scheduled and nothing can wake the loop (a deadlock)")
        # asyncio runs a timer due within the clock's resolution at once; on a real clock time then moves
        # on by itself, here it must be moved to that timer, or code that re-arms a timer for the
        # remaining sliver (Dispatch's wake-ups) would spin without time passing
        step = timeout
        scheduled = loop._scheduled  # type: ignore[attr-defined]
        if scheduled:
            ahead = scheduled[0].when() - loop.time()
            if 0 < ahead <= loop._clock_resolution:  # type: ignore[attr-defined]
                step = max(step, ahead)
        loop.advance(step)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        super().__init__(selectors.DefaultSelector())
        self._now = float(start)
        self._selector = _AdvancingSelector(self._selector, self)  # type: ignore[assignment]
        self._clock_resolution = 1e-6  # timers due within a microsecond run together

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)


@contextlib.contextmanager
def virtual_time(loop: VirtualClockLoop) -> Iterator[None]:
    """Make ``time.monotonic``/``time.time``/``get_dht_time`` of ``CLOCKED_MODULES`` read ``loop.time()``."""
    shim = types.SimpleNamespace(monotonic=loop.time, time=loop.time, perf_counter=loop.time)
    saved: list[tuple[types.ModuleType, str, Any]] = []
    try:
        for name in CLOCKED_MODULES:
            module = importlib.import_module(name)
            for attr, value in (("time", shim), ("get_dht_time", loop.time)):
                if hasattr(module, attr):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
