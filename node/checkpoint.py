"""Crash-safe checkpoints of every expert, its optimizer state and its update counter.

Layout: ``DIR/checkpoint-000042.pt`` (one file per save, sequence number increasing) holding
``{"format": 1, "saved_at": unix time, "experts": {uid: ExpertBackend.state_dict()}}``.

A save writes ``DIR/.checkpoint-000042.pt.tmp``, fsyncs it, renames it to its final name (an
atomic step on POSIX) and fsyncs the directory, then deletes all but the newest ``keep`` files.
A SIGKILL at any moment therefore leaves either the previous complete set or the new file, plus
at most a stray ``.tmp`` and one file over ``keep`` (a kill between the rename and the
deletions), both of which the next start removes. Loading tries the newest file first and
falls back to older ones if a file cannot be read (e.g. a damaged disk).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d{6,})\.pt$")


class CheckpointStore:
    def __init__(self, directory: str | Path, *, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".checkpoint-*.tmp"):
            stale.unlink(missing_ok=True)
        self._prune()

    def files(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = []
        for path in self.directory.iterdir():
            m = _NAME.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
        return [p for _, p in sorted(found)]

    def save(self, experts: dict[str, dict[str, Any]]) -> Path:
        """Write one checkpoint atomically (call from a worker thread: this does disk I/O)."""
        existing = self.files()
        seq = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1
        final = self.directory / f"checkpoint-{seq:06d}.pt"
        tmp = self.directory / f".{final.name}.tmp"
        payload = {"format": FORMAT, "saved_at": time.time(), "experts": experts}
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._fsync_dir()
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.files()[: -self.keep]:
            old.unlink(missing_ok=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint as (path, payload), or None when there is none."""
        for path in reversed(self.files()):
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                    raise ValueError("not a dmoe checkpoint")
                return path, payload
            except Exception as e:  # unreadable: fall back to the previous one
                log.warning("skipping unreadable checkpoint %s: %s: %s", path.name, type(e).__name__, e)
        return None
