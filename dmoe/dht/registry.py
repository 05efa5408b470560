"""ExpertRegistry: how experts are announced in, and found through, hivemind's Kademlia DHT.

Key layout
----------
An expert ``PREFIX.i.j`` on a 2-D grid is announced under one DHT key per grid level, each a
*dictionary* record whose subkeys are the next coordinate, tagged with the announcing node's
public key::

    key "ffn."     subkey b"3[owner:<node A key>]"  -> (grpc endpoint, node id, load)
    key "ffn.3."   subkey b"5[owner:<node A key>]"  -> (grpc endpoint, node id, load)

* One ``get`` of ``ffn.3.`` returns every alive coordinate under it, i.e. all ``ffn.3.*``
  experts of a 2-D grid, each with every node serving it (replicas are separate subkeys, one per
  owner). A beam search over a d-dimensional grid therefore needs about beam x d lookups, never
  one per expert.
* Subkeys carry ``[owner:...]``: with hivemind's ``RSASignatureValidator`` only the owner can
  overwrite or erase them; entries without a well-formed owner marker (``NAME[owner:KEY]``, the
  only form the validator checks) are ignored on read, and so is every entry of an owner with more
  than ``MAX_ENTRIES_PER_OWNER`` under one key (nobody can grow a shared record for everyone).
* Inner levels are kept by a few owners, not by all: a coordinate's inner entry only says "something
  is alive below here", so ``INNER_WRITERS`` owners per coordinate are enough, and a shared inner
  record stays ``coordinates x INNER_WRITERS`` entries whatever the swarm's size (with every node
  writing, the root record grew with the swarm: 5,112 entries, 4 MB at 10,000 modelled nodes, read
  by every search). Each round a node reads its inner records and their children first and keeps its
  inner entry only while fewer than ``INNER_WRITERS`` other owners rank before it (a hash of owner
  and cell, so the choice is stable and spread); an owner counts only if it also has an entry in the
  child record, so keys that serve nothing cannot talk honest nodes out of announcing. When a keeper
  leaves or dies, the next owner sees the gap when it next re-reads (once per TTL, every third round:
  the keepers change slowly, and reading every round cost each node 5x its announce traffic) and
  writes; the other keepers carry the coordinate meanwhile. The last level
  (the experts themselves) keeps every replica. A failed read writes everything (fail open).
* Records expire (``ttl``); owners re-announce well before expiry, so a dead node vanishes
  within one TTL. A graceful leave overwrites its subkeys with a tombstone (``()``).
* Every node also publishes itself under ``_dmoe.nodes.S`` (subkey: node id + owner) with its
  endpoint, experts and load, which the coordinator reads to see the swarm. ``S`` is one of
  ``NODE_SHARDS`` shards, a hash of the node id: one record for the whole swarm grew with it (8.5 MB
  at 10,000 modelled nodes, past what one DHT message carries). The coordinator reads every shard
  in one batched lookup; a node handing its experts off reads ``sample`` random ones.
* Relays (``dmoe.relay``) publish themselves under ``_dmoe.relays`` (subkey: ``relay`` + owner)
  with their address and how many nodes they carry, so unreachable nodes find one.
* An endpoint is ``host:port`` or, for a node served through a relay, ``name@relay-host:port``
  (``dmoe.wire.endpoints``), either behind TLS as ``tls:FP@...``. A TLS entry counts only if ``FP`` is
  the fingerprint of the entry's owner key: nobody can point an expert at an endpoint whose key they do
  not hold. The certificate lives under ``_dmoe.cert.FP`` (subkey ``cert`` + owner), for clients to pin.
* Trainers publish the grids they train under ``_dmoe.grids`` (subkey: prefix + owner) with the grid's
  shape, expert class and hidden size, so nodes started with ``--experts auto`` know which experts the
  swarm wants, including those nobody serves.
* In a closed swarm a node publishes its membership (token + proof, ``dmoe.membership``) under
  ``_dmoe.member.FP``; a client that sets ``admit`` uses only entries of owners whose membership holds.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import get_dht_time

from dmoe.dht.access import DHTAccess
from dmoe.dht.uids import UID_DELIMITER, cell_key, split_uid
from dmoe.errors import ConfigError
from dmoe.wire.endpoints import parse_endpoint
from dmoe.wire.tls import certificate_fingerprint, key_fingerprint

NODES_KEY = "_dmoe.nodes"  # + "." + shard
NODE_SHARDS = 16
CERT_KEY_PREFIX = "_dmoe.cert."
MEMBER_KEY_PREFIX = "_dmoe.member."
RELAYS_KEY = "_dmoe.relays"
GRIDS_KEY = "_dmoe.grids"
MAX_GRID_EXPERTS = 65536  # a published grid larger than this is ignored (it would only cost lookups)
MAX_PROBE_DEPTH = 8  # grid dimensions a walk probes for when nobody said how many there are
# a shared record (one grid cell's key) holds one entry per owner and child coordinate: an owner with more
# entries than a grid row can have is growing it on purpose, and is ignored there; coordinates are small numbers
MAX_ENTRIES_PER_OWNER = 1024
INNER_WRITERS = 3  # owners that keep an inner-level entry per coordinate (see the module docstring)
INNER_RECHECK_TTLS = 1.0  # a node re-reads its inner cells' keepers once per this many TTLs (3 rounds)
MAX_COORD_DIGITS = 6


@dataclass(frozen=True)
class ExpertEndpoint:
    """One node serving one expert (or, at an inner grid level, some expert below a prefix)."""

    uid: str  # full uid at the last level; the prefix + coordinate at inner levels
    endpoint: str  # "host:port" of the node's gRPC server
    node_id: str
    load: float
    expiration: float
    owner: str = ""  # fingerprint of the key that signed the entry


@dataclass(frozen=True)
class RelayRecord:
    address: str  # host:port of the relay's listener
    tunnels: int  # nodes attached now
    max_tunnels: int
    expiration: float

    @property
    def free(self) -> int:
        return self.max_tunnels - self.tunnels


@dataclass(frozen=True)
class GridRecord:
    """A grid some trainer trains: ``prefix`` with ``grid`` cells per dimension."""

    prefix: str
    grid: tuple[int, ...]
    expert_cls: str
    hidden_dim: int
    expiration: float


@dataclass
class NodeRecord:
    node_id: str
    endpoint: str
    experts: list[str]
    load: float
    expiration: float
    info: dict[str, Any] = field(default_factory=dict)


# exactly what hivemind's RSASignatureValidator protects: NAME[owner:KEY] with a non-empty key. A
# malformed marker (b"0[owner:", no key or no closing bracket) is not signed by anyone, so anyone
# could write it: such subkeys are ignored
_OWNED_SUBKEY = re.compile(rb"([0-9A-Za-z_.\-]+)\[owner:([^\]]+)\]")


def _owned_subkey(subkey: bytes) -> tuple[str, bytes] | None:
    """(coordinate or node id, owner public key) of an owner-tagged subkey; None for untagged or malformed ones."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNED_SUBKEY.fullmatch(subkey)
    return (match.group(1).decode(), match.group(2)) if match else None


def _subkey_coord(subkey: bytes) -> str | None:
    """Coordinate (or node id) part of an owner-tagged subkey; None for untagged, malformed or foreign ones."""
    owned = _owned_subkey(subkey)
    return owned[0] if owned else None


def _owned_entries(record: Any, now: float) -> Iterator[tuple[str, bytes, Any, float]]:
    """(name, owner key, value, expiration) of every unexpired, well-owned entry of a dictionary record."""
    if record is None or not isinstance(record.value, dict):
        return
    for subkey, item in record.value.items():
        owned = _owned_subkey(subkey)
        expiration = getattr(item, "expiration_time", 0.0)
        if owned is not None and expiration >= now:
            yield owned[0], owned[1], getattr(item, "value", None), float(expiration)


def _owner_may_announce(endpoint: str, owner: bytes) -> bool:
    """A TLS endpoint names the key it must present: only that key's owner may announce it."""
    tls = parse_endpoint(endpoint).tls
    return tls is None or tls == key_fingerprint(owner)


class ExpertRegistry:
    """Announce and look up experts; ``dht`` is any ``DHTAccess`` (in-loop node or hivemind.DHT)."""

    def __init__(self, dht: DHTAccess) -> None:
        self.dht = dht
        # a closed swarm's filter: owner fingerprints -> those that are members (None: an open swarm)
        self.admit: Callable[[set[str]], Awaitable[set[str]]] | None = None
        self._inner_written: dict[tuple[str, str], float] = {}  # inner (key, coord) we wrote -> its expiration
        # who keeps our inner cells changes slowly: re-read them every inner_recheck TTLs, not every round
        self.inner_recheck = INNER_RECHECK_TTLS
        self._checked_cells: set[tuple[str, str]] = set()
        self._checked_at = -math.inf
        self._deferred: set[tuple[str, str]] = set()

    # ---- announcing (nodes) ----

    def _owned(self, text: str) -> bytes:
        return text.encode() + self.dht.owner_marker

    async def announce(
        self,
        uids: Iterable[str],
        *,
        endpoint: str,
        node_id: str,
        load: float,
        ttl: float,
        node_info: dict[str, Any] | None = None,
        certificate: bytes | None = None,
        membership: dict[str, str] | None = None,
    ) -> bool:
        """Store (or refresh) this node's records for ``uids`` (and its TLS ``certificate``); True if all landed."""
        uids = list(uids)
        cells = [_cell_entries(uid) for uid in uids]
        leaves = {c[-1] for c in cells}
        inner = {cell for c in cells for cell in c[:-1]} - leaves
        now = get_dht_time()
        if inner != self._checked_cells or now >= self._checked_at + self.inner_recheck * ttl:
            self._deferred = await self._kept_by_others(inner) if inner else set()
            self._checked_cells, self._checked_at = inner, now
        deferred = self._deferred
        expiration = get_dht_time() + ttl
        entries: dict[tuple[str, bytes], Any] = {}
        for key, coord in sorted(leaves | (inner - deferred)):
            entries[(key, self._owned(coord))] = (endpoint, node_id, float(load))
        self._inner_written.update({cell: expiration for cell in inner - deferred})
        info = {"endpoint": endpoint, "experts": uids, "load": float(load), **(node_info or {})}
        entries[(node_shard_key(node_id), self._owned(node_id))] = info
        if certificate is not None:
            entries[(CERT_KEY_PREFIX + self.fingerprint, self._owned("cert"))] = certificate
        if membership is not None:
            entries[(MEMBER_KEY_PREFIX + self.fingerprint, self._owned("member"))] = membership
        return await self._store(entries, expiration)

    async def _kept_by_others(self, inner: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """The inner cells that ``INNER_WRITERS`` other owners, ranked before us, keep alive already."""
        children = {cell: cell[0] + cell[1] + UID_DELIMITER for cell in inner}
        try:
            found = await self.dht.get_many(list(dict.fromkeys([k for k, _ in inner] + list(children.values()))))
        except (TimeoutError, OSError, RuntimeError):
            return set()  # fail open: write them all
        now = get_dht_time()
        ours = self.dht.owner_marker
        kept = set()
        for key, coord in inner:
            serving = {owner for _, owner, value, _ in _owned_entries(found.get(children[(key, coord)]), now)
                       if value}  # owners with a live entry below this cell (tombstones are empty)
            mine = _rank(ours, key, coord)
            others = {_marker(owner) for name, owner, value, _ in _owned_entries(found.get(key), now)
                      if name == coord and value and owner in serving}
            before = {m for m in others - {ours} if _rank(m, key, coord) < mine}
            if len(before) >= INNER_WRITERS:
                kept.add((key, coord))
        return kept

    def _our_cells(self, uids: Iterable[str]) -> set[tuple[str, str]]:
        """The (key, coord) entries of ``uids`` that may hold a live entry of ours: every leaf, and the inner
        cells we wrote (tombstoning the others would only add entries to shared records)."""
        now = get_dht_time()
        cells = [_cell_entries(uid) for uid in uids]
        return {c[-1] for c in cells} | {cell for c in cells for cell in c[:-1]
                                         if self._inner_written.get(cell, 0.0) >= now}

    @property
    def fingerprint(self) -> str:
        """Fingerprint of this peer's record-signing key (what its TLS endpoints are announced with)."""
        owned = _owned_subkey(b"x" + self.dht.owner_marker)
        assert owned is not None, "the DHT's owner marker is not NAME[owner:KEY]"
        return key_fingerprint(owned[1])

    async def find_certificate(self, fingerprint: str) -> bytes | None:
        """The TLS certificate published by the owner of key ``fingerprint``, checked to carry that key."""
        key = CERT_KEY_PREFIX + fingerprint
        record = (await self.dht.get_many([key])).get(key)
        for name, owner, value, _ in _owned_entries(record, get_dht_time()):
            if name == "cert" and key_fingerprint(owner) == fingerprint and isinstance(value, bytes) \
                    and certificate_fingerprint(value) == fingerprint:  # not someone else's entry under this key
                return value
        return None

    async def withdraw(self, uids: Iterable[str], *, node_id: str, ttl: float) -> bool:
        """Overwrite this node's records with tombstones (graceful leave of the whole node).

        Inner-level entries are shared by all of a node's experts under a prefix, so withdrawing a
        subset would also hide its siblings: call this with every uid the node announced.
        """
        expiration = get_dht_time() + ttl + 1.0  # must outlive the record it replaces
        entries: dict[tuple[str, bytes], Any] = {(key, self._owned(coord)): () for key, coord in self._our_cells(uids)}
        entries[(node_shard_key(node_id), self._owned(node_id))] = ()
        return await self._store(entries, expiration)

    async def withdraw_some(self, dropped: Iterable[str], *, kept: Iterable[str], ttl: float) -> bool:
        """Tombstone the records of ``dropped`` uids only, keeping every inner-level entry ``kept`` uids share."""
        keep = {e for uid in kept for e in _cell_entries(uid)}
        gone = self._our_cells(dropped) - keep
        if not gone:
            return True
        entries = {(key, self._owned(coord)): () for key, coord in gone}
        return await self._store(entries, get_dht_time() + ttl + 1.0)

    async def announce_grids(self, grids: Sequence[tuple[str, Sequence[int], str, int]], *, ttl: float) -> bool:
        """Publish (prefix, grid shape, expert class, hidden size) of each grid this trainer trains."""
        entries = {(GRIDS_KEY, self._owned(prefix)): {"grid": [int(g) for g in grid], "expert_cls": str(cls),
                                                       "hidden_dim": int(hidden)}
                   for prefix, grid, cls, hidden in grids}
        return await self._store(entries, get_dht_time() + ttl)

    async def list_grids(self) -> list[GridRecord]:
        """Grids published under ``_dmoe.grids`` (one per prefix: the freshest), sanity-bounded."""
        record = (await self.dht.get_many([GRIDS_KEY])).get(GRIDS_KEY)
        best: dict[str, GridRecord] = {}
        for prefix, _, value, expiration in _owned_entries(record, get_dht_time()):
            try:
                grid = tuple(int(g) for g in value["grid"])
                found = GridRecord(prefix, grid, str(value["expert_cls"])[:200], int(value["hidden_dim"]), expiration)
                split_uid(prefix + UID_DELIMITER + "0")
            except (KeyError, TypeError, ValueError, ConfigError):
                continue
            if not 1 <= len(grid) <= MAX_PROBE_DEPTH or min(grid) < 1 or math.prod(grid) > MAX_GRID_EXPERTS:
                continue
            if prefix not in best or expiration > best[prefix].expiration:
                best[prefix] = found
        return sorted(best.values(), key=lambda g: g.prefix)

    async def _store(self, entries: dict[tuple[str, bytes], Any], expiration: float) -> bool:
        keys = [k for k, _ in entries]
        subkeys = [s for _, s in entries]
        result = await self.dht.store_many(keys, subkeys, list(entries.values()), [expiration] * len(entries))
        if bool(result) and all(result.values()):
            return True
        # hivemind reports the answer of the *last* replica it stored to: one peer holding forged or
        # stale copies makes every round look failed. What counts is whether our entries can be read.
        return await self._landed(entries, expiration)

    async def _landed(self, entries: dict[tuple[str, bytes], Any], expiration: float) -> bool:
        """True if a lookup finds every entry as stored: our subkey, expiring no earlier, naming the same
        endpoint and node (the load may have moved on: an overlapping later round of ours)."""
        found = await self.dht.get_many(list(dict.fromkeys(k for k, _ in entries)))
        for (key, subkey), value in entries.items():
            record = found.get(key)
            held = record.value.get(subkey) if record is not None and isinstance(record.value, dict) else None
            if held is None or getattr(held, "expiration_time", 0.0) < expiration:
                return False
            if _identity(getattr(held, "value", None)) != _identity(value):
                return False
        return True

    async def announce_relay(self, address: str, *, tunnels: int, max_tunnels: int, ttl: float) -> bool:
        """Store (or refresh) this process's relay record."""
        entries = {(RELAYS_KEY, self._owned("relay")): {"address": address, "tunnels": int(tunnels),
                                                         "max_tunnels": int(max_tunnels)}}
        return await self._store(entries, get_dht_time() + ttl)

    async def withdraw_relay(self, *, ttl: float) -> bool:
        return await self._store({(RELAYS_KEY, self._owned("relay")): ()}, get_dht_time() + ttl + 1.0)

    # ---- looking up (clients, coordinator) ----

    async def get_prefixes(self, prefixes: Sequence[str]) -> dict[str, dict[int, list[ExpertEndpoint]]]:
        """For each prefix key (``'ffn.'``, ``'ffn.3.'``): alive coordinate -> endpoints serving it.

        One DHT lookup per prefix, all issued together.
        """
        prefixes = list(dict.fromkeys(prefixes))
        found = await self.dht.get_many(prefixes) if prefixes else {}
        now = get_dht_time()
        result: dict[str, dict[int, list[ExpertEndpoint]]] = {}
        for prefix in prefixes:
            by_coord: dict[int, list[ExpertEndpoint]] = defaultdict(list)
            per_owner: Counter[bytes] = Counter()
            record = found.get(prefix)
            items = record.value.items() if record is not None and isinstance(record.value, dict) else ()
            owned_items = [(_owned_subkey(subkey), item) for subkey, item in items]
            for owned, _ in owned_items:
                if owned is not None:
                    per_owner[owned[1]] += 1
            if items:
                for owned, item in owned_items:
                    entry = _parse_entry(item, now)
                    if owned is None or entry is None or not owned[0].isdigit() or len(owned[0]) > MAX_COORD_DIGITS:
                        continue
                    if per_owner[owned[1]] > MAX_ENTRIES_PER_OWNER:
                        continue  # one key growing a shared record without bound: all of its entries are ignored
                    coord = owned[0]
                    endpoint, node_id, load, expiration = entry
                    if not _owner_may_announce(endpoint, owned[1]):
                        continue  # a TLS endpoint of a key this owner does not hold
                    uid = prefix + coord
                    by_coord[int(coord)].append(ExpertEndpoint(uid, endpoint, node_id, load, expiration,
                                                               key_fingerprint(owned[1])))
            result[prefix] = {c: _dedupe(eps) for c, eps in sorted(by_coord.items())}
        if self.admit is not None:  # a closed swarm: only entries of member owners
            owners = {e.owner for table in result.values() for eps in table.values() for e in eps}
            admitted = await self.admit(owners) if owners else set()
            for prefix, table in result.items():
                kept = {c: [e for e in eps if e.owner in admitted] for c, eps in table.items()}
                result[prefix] = {c: eps for c, eps in kept.items() if eps}
        return result

    async def find_memberships(self, fingerprints: Iterable[str]) -> dict[str, Any]:
        """What each owner published as its membership (``dmoe.membership.node_membership``), by key fingerprint."""
        keys = {MEMBER_KEY_PREFIX + fp: fp for fp in fingerprints}
        found = await self.dht.get_many(list(keys)) if keys else {}
        now = get_dht_time()
        out: dict[str, Any] = {}
        for key, fp in keys.items():
            for name, owner, value, _ in _owned_entries(found.get(key), now):
                if name == "member" and key_fingerprint(owner) == fp:
                    out[fp] = value
        return out

    async def find_experts(self, uids: Sequence[str]) -> dict[str, list[ExpertEndpoint]]:
        """Endpoints serving each full uid (empty list when none is alive)."""
        parents = {}
        for uid in uids:
            prefix, coords = split_uid(uid)
            parents[uid] = (cell_key(prefix, coords[:-1]), coords[-1])
        table = await self.get_prefixes([p for p, _ in parents.values()])
        return {uid: table[p].get(c, []) for uid, (p, c) in parents.items()}

    async def walk_grid(self, prefix: str, dims: int | None) -> dict[str, list[ExpertEndpoint]]:
        """Every alive expert under ``prefix`` with its replicas: uid -> endpoints.

        The one full walk of a grid (the trainer's start-up check and the coordinator's view use
        it; the beam search walks the same keys best-first): level 0 asks ``ffn.``, level 1 asks
        ``ffn.<i>.`` for every alive ``i`` in one batched lookup, and so on, so lookups grow with
        alive inner cells, never with the grid's size. With ``dims=None`` (nobody said how many
        dimensions the grid has) it probes one level deeper until a level comes back empty, up to
        ``MAX_PROBE_DEPTH``; a cell without children is then an expert.
        """
        leaves: dict[str, list[ExpertEndpoint]] = {}
        frontier: dict[str, list[ExpertEndpoint]] = {}  # inner cells found at the previous level
        keys = [cell_key(prefix)]
        for depth in range(1, (dims or MAX_PROBE_DEPTH) + 1):
            table = await self.get_prefixes(keys)
            found = {eps[0].uid: eps for key in keys for eps in table[key].values() if eps}
            if dims is None:  # probing: a cell without children at this level was a leaf
                parents = {uid.rpartition(UID_DELIMITER)[0] for uid in found}
                leaves.update({uid: eps for uid, eps in frontier.items() if uid not in parents})
            if dims is not None and depth == dims:
                leaves.update(found)
                break
            if not found:
                break
            frontier = found
            keys = [uid + UID_DELIMITER for uid in found]
        else:
            leaves.update(frontier if dims is None else {})
        return leaves

    async def list_relays(self) -> list[RelayRecord]:
        """Relays announced under ``_dmoe.relays``, most free capacity first."""
        record = (await self.dht.get_many([RELAYS_KEY])).get(RELAYS_KEY)
        relays = []
        for name, _, value, expiration in _owned_entries(record, get_dht_time()):
            if name != "relay" or not isinstance(value, dict):
                continue
            try:
                relays.append(RelayRecord(str(value["address"]), int(value["tunnels"]), int(value["max_tunnels"]),
                                          expiration))
            except (KeyError, TypeError, ValueError):
                continue
        return sorted(relays, key=lambda r: (-r.free, r.address))

    async def list_nodes(self, sample: int | None = None) -> list[NodeRecord]:
        """Every node currently announced under the ``_dmoe.nodes`` shards (``sample``: of that many random ones)."""
        keys = [f"{NODES_KEY}.{shard}" for shard in range(NODE_SHARDS)]
        if sample is not None:
            keys = random.sample(keys, min(sample, len(keys)))
        found = await self.dht.get_many(keys)
        now = get_dht_time()
        nodes = []
        for key in keys:
            for node_id, value, expiration in _node_entries(key, found.get(key), now):
                try:
                    nodes.append(NodeRecord(node_id=node_id, endpoint=str(value["endpoint"]),
                                            experts=[str(u) for u in value["experts"]], load=float(value["load"]),
                                            expiration=expiration, info=value))
                except (KeyError, TypeError, ValueError):
                    continue
        return sorted(nodes, key=lambda n: n.endpoint)


def node_shard_key(node_id: str) -> str:
    """The ``_dmoe.nodes`` shard a node announces itself under."""
    return f"{NODES_KEY}.{int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], 'big') % NODE_SHARDS}"


def _node_entries(key: str, record: Any, now: float) -> Iterator[tuple[str, dict, float]]:
    """(node id, value, expiration) of a shard's entries, only those that belong in that shard."""
    for node_id, _, value, expiration in _owned_entries(record, now):
        if isinstance(value, dict) and node_shard_key(node_id) == key:
            yield node_id, value, expiration


def _cell_entries(uid: str) -> list[tuple[str, str]]:
    """(DHT key, coordinate) of every entry announcing ``uid``, one per grid level."""
    prefix, coords = split_uid(uid)
    return [(cell_key(prefix, coords[:level]), str(coord)) for level, coord in enumerate(coords)]


def _marker(owner: bytes) -> bytes:
    """The subkey marker of an owner key (what ``DHTAccess.owner_marker`` is for our own)."""
    return b"[owner:" + owner + b"]"


def _rank(owner_marker: bytes, key: str, coord: str) -> bytes:
    """Where an owner stands among the candidate keepers of inner cell (key, coord): stable, and spread."""
    return hashlib.sha256(owner_marker + key.encode() + b"\0" + coord.encode()).digest()


def _identity(value: Any) -> Any:
    """What an entry says about who serves where, without its load: (endpoint, node id), or the value itself."""
    if isinstance(value, list | tuple) and len(value) == 3:
        return tuple(value[:2])
    if isinstance(value, dict):
        return value.get("endpoint"), tuple(value.get("experts") or ())
    return tuple(value) if isinstance(value, list) else value


def _parse_entry(item: Any, now: float) -> tuple[str, str, float, float] | None:
    value = getattr(item, "value", None)
    expiration = getattr(item, "expiration_time", 0.0)
    if expiration < now or not isinstance(value, list | tuple) or len(value) != 3:
        return None  # expired, tombstone or garbage
    endpoint, node_id, load = value
    if not isinstance(endpoint, str) or not isinstance(node_id, str) or not isinstance(load, int | float):
        return None
    try:
        parse_endpoint(endpoint)  # neither host:port nor name@relay: nobody can dial it
    except ValueError:
        return None
    return endpoint, node_id, float(load), float(expiration)


def _dedupe(endpoints: list[ExpertEndpoint]) -> list[ExpertEndpoint]:
    """Keep the freshest record per endpoint (a restarted node may briefly appear twice)."""
    best: dict[str, ExpertEndpoint] = {}
    for ep in endpoints:
        if ep.endpoint not in best or ep.expiration > best[ep.endpoint].expiration:
            best[ep.endpoint] = ep
    return sorted(best.values(), key=lambda e: e.endpoint)


