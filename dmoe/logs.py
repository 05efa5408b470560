"""Log helpers for input nobody controls: one line per reason per interval, however often it happens."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one log line per reason every ``interval`` seconds; counts what it suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, reason: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -self.interval) < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        skipped = self._suppressed.pop(reason, 0)
        self._last[reason] = now
        extra = f" (+{skipped} similar in the last {self.interval:.0f}s)" if skipped else ""
        self.logger.warning("%s%s", message, extra)
