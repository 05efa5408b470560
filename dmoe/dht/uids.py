"""Expert uids and the patterns that name grids of them.

An expert uid is ``PREFIX.i.j...``: a non-empty prefix (may itself contain dots, e.g.
``layer0.ffn``) followed by one integer coordinate per grid dimension. The coordinates are the
trailing run of integer components, so ``layer0.ffn.3.5`` has prefix ``layer0.ffn`` and
coordinates ``(3, 5)``.

Patterns (``--experts``) are comma-separated items; each item is either an explicit uid or a grid
with ranges ``[a:b]`` (half-open) in place of coordinates: ``ffn.[0:4].[0:8]`` is 32 uids,
``ffn.[0:2].5,ffn.3.1`` is three.
"""

from __future__ import annotations

import itertools
import re

from dmoe.errors import ConfigError

UID_DELIMITER = "."
_RANGE = re.compile(r"^\[(\d+):(\d+)\]$")
_INT = re.compile(r"^\d+$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def split_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """``'layer0.ffn.3.5'`` -> ``('layer0.ffn', (3, 5))``; raises ConfigError if it is not a grid uid."""
    parts = uid.split(UID_DELIMITER)
    n = len(parts)
    while n > 0 and _INT.match(parts[n - 1]):
        n -= 1
    prefix_parts, coords = parts[:n], parts[n:]
    if not prefix_parts or not coords or not all(_NAME.match(p) for p in prefix_parts):
        raise ConfigError(
            f"expert uid {uid!r} must look like PREFIX.i[.j...] (a name, then one integer per grid dimension)"
        )
    return UID_DELIMITER.join(prefix_parts), tuple(int(c) for c in coords)


def make_uid(prefix: str, coords: tuple[int, ...] | list[int]) -> str:
    return UID_DELIMITER.join([prefix, *map(str, coords)])


def cell_key(prefix: str, coords: tuple[int, ...] | list[int] = ()) -> str:
    """DHT key of a grid cell's record: ``('ffn', ())`` -> ``'ffn.'``, ``('ffn', (3,))`` -> ``'ffn.3.'``.

    The record under a cell's key lists the alive coordinates one level below it (see
    ``dmoe.dht.registry``); every reader and writer of the grid builds its keys here.
    """
    return (make_uid(prefix, coords) if len(coords) else prefix) + UID_DELIMITER


def parent_cell(key: str) -> tuple[str, int] | None:
    """``('ffn.3.', 5)`` for the key ``'ffn.3.5.'``; None for a key whose last part is not a coordinate."""
    body = key[: -len(UID_DELIMITER)] if key.endswith(UID_DELIMITER) else key
    head, sep, last = body.rpartition(UID_DELIMITER)
    if not sep or not last.isdigit():
        return None
    return head + UID_DELIMITER, int(last)


def uid_prefixes(uid: str) -> list[str]:
    """Every DHT prefix key above an expert: ``ffn.3.5`` -> ``['ffn.', 'ffn.3.']``."""
    prefix, coords = split_uid(uid)
    return [cell_key(prefix, coords[:level]) for level in range(len(coords))]


def parse_expert_pattern(pattern: str) -> list[str]:
    """Expand a ``--experts`` pattern into a sorted, de-duplicated list of uids."""
    uids: list[str] = []
    for item in filter(None, (p.strip() for p in pattern.split(","))):
        parts = item.split(UID_DELIMITER)
        choices: list[list[str]] = []
        for part in parts:
            m = _RANGE.match(part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi <= lo:
                    raise ConfigError(f"empty range {part!r} in expert pattern {item!r}: need [a:b] with a < b")
                choices.append([str(i) for i in range(lo, hi)])
            elif "[" in part or "]" in part:
                raise ConfigError(f"bad range {part!r} in expert pattern {item!r}: write [a:b] with integers")
            else:
                choices.append([part])
        for combo in itertools.product(*choices):
            uid = UID_DELIMITER.join(combo)
            split_uid(uid)  # validates
            uids.append(uid)
    if not uids:
        raise ConfigError(f"expert pattern {pattern!r} names no experts")
    return sorted(set(uids), key=lambda u: (split_uid(u)[0], split_uid(u)[1]))
