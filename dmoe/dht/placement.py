"""Which node serves which expert: the one placement rule of dmoe.

``dmoe simulate``, the docker-compose swarm (its nodes' entrypoint and the chaos service, each
computing it independently from the scenario, so nothing travels between containers) and
``dmoe train --print-node-command --nodes N`` all place experts with ``place_experts``.

Rule: the experts of every layer are numbered in grid order, layer after layer (``k`` counts over
all layers); copy ``r`` of expert ``k`` lives on node ``(k + r) mod N`` for ``r < replicas``.

* Copies of one expert always sit on different nodes (``replicas <= N``).
* Replica sets form overlapping chains (0,1), (1,2), (2,3), ... rather than fixed groups, so two
  random nodes failing together take out the experts of at most one chain link.
* Node loads differ by at most one expert per replica, and counting across layers spreads every
  layer's grid over all nodes instead of giving node ``i`` the same cells in every layer.
* With ``replicas = 1`` a node's crash removes exactly its own experts.

Nodes started with ``--experts auto`` place themselves instead (``neediest``, ``swap_candidate``):
the experts with the fewest live holders first, then the most requested, moving at most one expert at a
time and only from one with more than ``replicas`` holders to one with fewer.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

from dmoe.dht.uids import make_uid, split_uid


def grid_uids(prefix: str, grid: Sequence[int]) -> list[str]:
    """Every uid of a grid under ``prefix``, in grid (row-major) order."""
    return [make_uid(prefix, coords) for coords in itertools.product(*(range(int(g)) for g in grid))]


def place_experts(prefixes: Sequence[str], grid: Sequence[int], *, nodes: int, replicas: int) -> list[list[str]]:
    """The uids each of ``nodes`` nodes serves, for grids ``grid`` under every prefix (see module docstring)."""
    if nodes < 1:
        raise ValueError(f"need at least one node, got {nodes}")
    if not 1 <= replicas <= nodes:
        raise ValueError(f"replicas must be in 1..{nodes} (the number of nodes), got {replicas}")
    per_node: list[list[str]] = [[] for _ in range(nodes)]
    uids = [uid for prefix in prefixes for uid in grid_uids(prefix, grid)]
    for k, uid in enumerate(uids):
        for r in range(replicas):
            per_node[(k + r) % nodes].append(uid)
    return per_node


def experts_pattern(uids: Sequence[str]) -> str:
    """A ``--experts`` value naming exactly ``uids``: whole grids as ``PREFIX.[0:a].[0:b]``, the rest listed."""
    by_prefix: dict[str, list[tuple[int, ...]]] = {}
    for uid in uids:
        prefix, coords = split_uid(uid)
        by_prefix.setdefault(prefix, []).append(coords)
    items = []
    for prefix, cells in by_prefix.items():
        dims = {len(c) for c in cells}
        if len(dims) == 1:
            box = [max(c[d] for c in cells) + 1 for d in range(dims.pop())]
            if sorted(set(cells)) == list(itertools.product(*(range(b) for b in box))):
                items.append(prefix + "".join(f".[0:{b}]" for b in box))
                continue
        items.extend(make_uid(prefix, c) for c in cells)
    return ",".join(items)


# ---- automatic placement (``dmoe node --experts auto``) ----

def neediest(wanted: Sequence[str], holders: dict[str, int], loads: dict[str, float], *, exclude: Sequence[str] = (),
             salt: str = "") -> list[str]:
    """``wanted`` uids ordered by need: fewest live holders first, then the most requested (highest announced
    load), then a per-node order (``salt``: the node's id) so that nodes joining together spread out instead of
    all taking the same expert."""
    skip = set(exclude)
    return sorted((u for u in wanted if u not in skip),
                  key=lambda u: (holders.get(u, 0), -loads.get(u, 0.0), _spread(salt, u)))


def _spread(salt: str, uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}/{uid}".encode(), digest_size=4).digest(), "big")


def swap_candidate(mine: Sequence[str], wanted: Sequence[str], holders: dict[str, int], loads: dict[str, float], *,
                   replicas: int, salt: str = "") -> tuple[str, str] | None:
    """(expert to give up, expert to take) when a full node should move one expert, else None.

    Only when the move cannot make things worse anywhere: the expert given up keeps at least ``replicas``
    holders without us (it has ``replicas + 1`` or more), and the one taken has fewer than ``replicas``.
    The margin is what keeps nodes from flapping: after the move neither condition holds for that pair.
    """
    needy = [u for u in neediest(wanted, holders, loads, exclude=mine, salt=salt) if holders.get(u, 0) < replicas]
    spare = sorted((u for u in mine if holders.get(u, 0) > replicas),
                   key=lambda u: (-holders.get(u, 0), loads.get(u, 0.0), _spread(salt, u)))
    return (spare[0], needy[0]) if needy and spare else None
