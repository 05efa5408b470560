"""The ``dmoe-ready {json}`` line every long-running dmoe process prints once it serves.

Scripts, tests and the simulator wait for this line instead of sleeping. The JSON carries at
least ``role``; nodes add ``grpc`` (host:port), ``dht`` (multiaddrs) and ``experts``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

READY_PREFIX = "dmoe-ready "


def print_ready(role: str, **fields: Any) -> None:
    """Print the ready line to stdout and flush (stdout may be a pipe)."""
    sys.stdout.write(READY_PREFIX + json.dumps({"role": role, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_ready(line: str) -> dict[str, Any] | None:
    """The JSON of a ready line, or None if ``line`` is not one."""
    line = line.strip()
    if not line.startswith(READY_PREFIX):
        return None
    try:
        data = json.loads(line[len(READY_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
