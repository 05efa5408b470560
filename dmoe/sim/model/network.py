"""The model's network: a Kademlia DHT's storage and costs, and home links carrying expert calls.

Nothing here is dmoe policy; it is what the policies act *on*, replacing sockets and hivemind's
DHT network with arithmetic on the virtual clock (``dmoe.sim.model.clock``):

* ``DhtStore`` is what the peers responsible for each key hold, merged: one dictionary record
  per key, subkey -> (value, expiration), with hivemind's acceptance rule (a subkey is replaced
  only by a value that expires later) and expired entries invisible. Replication and the loss of
  a replica are not modelled (hivemind stores every key on several peers, and a departed peer's
  copies are refreshed by their owners within a TTL).
* ``ModelDHT`` is one peer's view (a ``dmoe.dht.access.DHTAccess``), so dmoe's real
  ``ExpertRegistry`` announces and reads through it. A lookup or store of several keys runs them
  in parallel and costs ``hops`` round trips, ``hops = 1 + ceil(log_bucket(servers))`` (iterative
  Kademlia with ``bucket_size`` contacts per answer), each to a random DHT server over both ends'
  links, plus the record's transfer over the requester's downlink. Bytes are counted per hop
  (a request, and an answer listing ``bucket_size`` contacts) plus the record itself, sized as
  hivemind sends it: subkey (with the owner's 380-byte public key), msgpack value, RSA signature.
* ``Node`` and ``ExpertCalls`` carry a forward or backward over home links: the request queues on
  the client's uplink, crosses both one-way latencies (and a relay's, for a node behind NAT),
  waits in the node's FIFO compute queue (per-row cost measured on this machine, divided by the
  node's CPU share), and the reply queues on the node's uplink. A crashed node refuses at once
  (one round trip), a frozen one never answers, a ``drop_prob`` glitch resets the call. Nodes'
  request batching across clients is folded into the per-row cost; one RPC per node (dmoe's call
  coalescing) is not modelled: every expert call pays its own latency, concurrently.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import MSGPackSerializer, ValueWithExpiration

from dmoe.errors import NodeUnreachable
from dmoe.sim.links import LinkModel

OWNER_KEY_BYTES = 380  # an OpenSSH RSA-2048 public key, as hivemind's owner markers carry it
SIGNATURE_BYTES = len(b"[signature:]") + 344  # base64 of a 256-byte RSA signature, appended to each value
CONTACT_BYTES = 80  # one peer in a routing answer: peer id and an address
REQUEST_BYTES = 120  # one DHT RPC's request: key id, sender, framing
BUCKET_SIZE = 20  # hivemind's default: contacts per routing answer


def owner_marker(index: int, kind: str = "n") -> bytes:
    """A distinct owner marker of a real marker's size (generating 10,000 RSA keys would take minutes)."""
    body = f"ssh-rsa MODEL{kind}{index:08d}".encode()
    return b"[owner:" + body + b"A" * (OWNER_KEY_BYTES - len(body)) + b"]"


@dataclass
class DhtCounters:
    lookups: int = 0  # keys looked up
    stores: int = 0  # entries stored
    bytes_down: int = 0  # to the requesting peer
    bytes_up: int = 0  # from it


class DhtStore:
    """Every key's merged dictionary record (see module docstring)."""

    def __init__(self) -> None:
        self.records: dict[str, dict[bytes, tuple[Any, float, int]]] = {}  # key -> subkey -> (value, exp, bytes)

    def store(self, key: str, subkey: bytes, value: Any, expiration: float, now: float) -> bool:
        record = self.records.setdefault(key, {})
        held = record.get(subkey)
        if held is not None and held[1] >= expiration and held[1] > now:
            return False
        size = len(subkey) + len(MSGPackSerializer.dumps(value)) + SIGNATURE_BYTES + 8
        record[subkey] = (value, expiration, size)
        return True

    def read(self, key: str, now: float) -> ValueWithExpiration | None:
        record = self.records.get(key)
        if not record:
            return None
        alive = {s: ValueWithExpiration(v, e) for s, (v, e, _) in record.items() if e >= now}
        if not alive:
            return None
        return ValueWithExpiration(alive, max(item.expiration_time for item in alive.values()))

    def size(self, key: str, now: float) -> tuple[int, int]:
        """(unexpired entries, bytes) of ``key``'s record: what one lookup of it transfers."""
        record = self.records.get(key, {})
        entries = [b for _, e, b in record.values() if e >= now]
        return len(entries), sum(entries)

    def prune(self, now: float) -> None:
        for key in list(self.records):
            record = self.records[key]
            for subkey in [s for s, (_, e, _) in record.items() if e < now]:
                del record[subkey]
            if not record:
                del self.records[key]


@dataclass
class Peer:
    """What the network knows of one participant: its link and whether its process runs."""

    name: str
    link: LinkModel
    nat: bool = False
    state: str = "up"  # up | down | frozen
    dht_server: bool = True
    up_free_at: float = 0.0  # its uplink is busy sending until then


class DhtNetwork:
    """Shared by every ``ModelDHT``: the store, the servers a hop may land on, the counters."""

    def __init__(self, rng: random.Random, *, fixed_rtt: float | None = None) -> None:
        self.store = DhtStore()
        self.servers: list[Peer] = []
        self.rng = rng
        self.fixed_rtt = fixed_rtt  # seconds per hop instead of links (a sim whose DHT runs on loopback)
        self.counters = DhtCounters()

    def hops(self) -> int:
        servers = len(self.servers)  # departed servers still sit in routing tables; the hop count barely moves
        return 1 + max(0, math.ceil(math.log(max(servers, 1)) / math.log(BUCKET_SIZE)))

    def hop_time(self, peer: Peer) -> float:
        if self.fixed_rtt is not None:
            return self.fixed_rtt
        other = peer
        for _ in range(8):  # a random server that is up (most are): no scan of ten thousand peers per hop
            pick = self.rng.choice(self.servers) if self.servers else peer
            if pick.state == "up":
                other = pick
                break
        return 2 * (peer.link.latency_ms + other.link.latency_ms) / 1000.0


class ModelDHT:
    """One peer's ``DHTAccess`` over the modelled DHT (see module docstring)."""

    def __init__(self, network: DhtNetwork, peer: Peer, marker: bytes) -> None:
        self.network = network
        self.peer = peer
        self.owner_marker = marker
        self.counters = DhtCounters()  # this peer's own share of the traffic

    @property
    def peer_id(self) -> str:
        return self.peer.name

    def _count(self, keys: int, hops: int, record_bytes: int, *, store: bool) -> None:
        down = keys * hops * BUCKET_SIZE * CONTACT_BYTES + (0 if store else record_bytes)
        up = keys * hops * REQUEST_BYTES + (record_bytes if store else 0)
        for c in (self.counters, self.network.counters):
            c.bytes_down += down
            c.bytes_up += up
            if store:
                c.stores += keys
            else:
                c.lookups += keys

    async def _travel(self, keys: int, payload_bytes: int) -> int:
        net = self.network
        hops = net.hops()
        seconds = max(sum(net.hop_time(self.peer) for _ in range(hops)) for _ in range(max(1, min(keys, 4))))
        seconds += payload_bytes * 8 / (self.peer.link.down_mbit * 1e6)
        await asyncio.sleep(seconds)
        return hops

    async def get_many(self, keys: Sequence[str]) -> dict[str, ValueWithExpiration | None]:
        loop = asyncio.get_running_loop()
        store = self.network.store
        size = sum(store.size(k, loop.time())[1] for k in keys)
        hops = await self._travel(len(keys), size)
        now = loop.time()
        found = {k: store.read(k, now) for k in keys}
        self._count(len(keys), hops, size, store=False)
        return found

    async def store_many(
        self, keys: Sequence[str], subkeys: Sequence[bytes], values: Sequence[Any], expirations: Sequence[float]
    ) -> dict[tuple[str, bytes], bool]:
        payload = sum(len(s) + SIGNATURE_BYTES + 64 for s in subkeys)
        hops = await self._travel(len(set(keys)), 0)
        now = asyncio.get_running_loop().time()
        result = {(k, s): self.network.store.store(k, s, v, e, now)
                  for k, s, v, e in zip(keys, subkeys, values, expirations, strict=True)}
        self._count(len(set(keys)), hops, payload, store=True)
        return result

    async def visible_maddrs(self) -> list[str]:
        return []

    async def shutdown(self) -> None:
        return None


@dataclass
class ServiceCost:
    """Seconds of one CPU core per row and per call, by method (measured by ``dmoe.sim.model.calibrate``)."""

    per_row: dict[str, float]
    per_call: float


@dataclass
class Node(Peer):
    """An expert node: its compute queue and what it serves."""

    endpoint: str = ""
    uids: list[str] = field(default_factory=list)
    cpu_cores: float = 1.0
    busy_until: float = 0.0
    queued: int = 0  # calls waiting or being computed: the load it announces
    since: float = 0.0  # when it last came up


class ExpertCalls:
    """Carries one expert call to a node and back (see module docstring)."""

    def __init__(self, rng: random.Random, cost: ServiceCost, *, relay_latency_ms: float,
                 bytes_per_value: float, hidden_dim: int) -> None:
        self.rng = rng
        self.cost = cost
        self.relay_latency_ms = relay_latency_ms
        self.bytes_per_value = bytes_per_value
        self.hidden_dim = hidden_dim
        self.calls = 0
        self.bytes = 0

    def one_way(self, client: Peer, node: Node) -> float:
        ms = client.link.latency_ms + node.link.latency_ms
        if node.nat:
            ms += 2 * self.relay_latency_ms  # in to the relay and out through the node's tunnel
        jitter = client.link.jitter_ms + node.link.jitter_ms
        if jitter:
            ms += abs(self.rng.gauss(0.0, jitter))
        return ms / 1000.0

    async def _hang(self) -> None:
        await asyncio.get_running_loop().create_future()  # a frozen peer: only the caller's timeout ends this

    async def _arrive(self, client: Peer, node: Node, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if node.state == "frozen":
            await self._hang()
        if node.state == "down":
            raise NodeUnreachable(f"{node.name}: connection refused (the node is gone)")

    async def call(self, client: Peer, node: Node, method: str, rows: int) -> None:
        """Returns when the reply has arrived; raises ``NodeUnreachable`` or never returns (frozen)."""
        loop = asyncio.get_running_loop()
        self.calls += 1
        if node.state == "down":
            await asyncio.sleep(2 * self.one_way(client, node))
            raise NodeUnreachable(f"{node.name}: connection refused (the node is gone)")
        if self.rng.random() < client.link.drop_prob + node.link.drop_prob:
            await asyncio.sleep(self.one_way(client, node))
            raise NodeUnreachable(f"{node.name}: connection reset")
        values = rows * self.hidden_dim
        request = int(values * self.bytes_per_value * (2 if method == "backward" else 1)) + 200
        reply = int(values * self.bytes_per_value) + 100
        self.bytes += request + reply
        now = loop.time()
        client.up_free_at = max(now, client.up_free_at) + request * 8 / (client.link.up_mbit * 1e6)
        await self._arrive(client, node, client.up_free_at - now + self.one_way(client, node))
        node.queued += 1
        try:
            start = max(loop.time(), node.busy_until)
            service = (self.cost.per_row[method] * rows + self.cost.per_call) / node.cpu_cores
            node.busy_until = start + service
            await self._arrive(client, node, node.busy_until - loop.time())
        finally:
            node.queued -= 1
        now = loop.time()
        node.up_free_at = max(now, node.up_free_at) + reply * 8 / (node.link.up_mbit * 1e6)
        await self._arrive(client, node, node.up_free_at - now + self.one_way(client, node))

    async def ping(self, client: Peer, node: Node) -> bool:
        await asyncio.sleep(2 * self.one_way(client, node))
        if node.state == "frozen":
            await self._hang()
        return node.state == "up"
