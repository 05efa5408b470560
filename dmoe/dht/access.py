"""One async interface over the two ways dmoe reaches hivemind's DHT.

* ``InLoopDHT`` wraps a ``hivemind.dht.DHTNode`` running in *our* asyncio loop (nodes, the
  coordinator and the default client handle: one loop per process, no extra process).
* ``ProcessDHT`` wraps a ``hivemind.DHT`` (which runs its DHTNode in a child process), so users
  and the trainer's hivemind averager can share one DHT with the gating layer. Calls are shipped
  with ``DHT.run_coroutine`` and awaited as futures.

Joining retries: hivemind's ``DHTNode.create`` pings the initial peers once (``wait_timeout``, 3 s)
and raises if none answered, leaving its p2p daemon behind. A volunteer's first contact may well be
slower than that (a busy bootstrap peer, a swarm starting all at once, a slow uplink), so
``InLoopDHT.create`` lets the first round fail quietly and keeps pinging the initial peers with
backoff for up to ``join_timeout``; if none ever answers it shuts the daemon down and raises a
``DmoeError`` that names the peers it tried (``join_timeout=None``: come up alone, as a bootstrap
peer must).

Both sign records with an ``RSASignatureValidator``: a subkey carrying our ``[owner:...]`` marker
can only be overwritten by us, and values read back are stripped of signatures. Both apply
``dmoe.dht.patches`` before they touch hivemind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils import ValueWithExpiration
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from dmoe.config import NodeConfig, default_of
from dmoe.dht import patches
from dmoe.errors import DmoeError

log = logging.getLogger(__name__)
_JOIN_FIRST_RETRY = 1.0  # then doubling, up to _JOIN_MAX_RETRY
_JOIN_MAX_RETRY = 8.0


class DHTAccess(Protocol):
    owner_marker: bytes

    @property
    def peer_id(self) -> str: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, ValueWithExpiration | None]: ...

    async def store_many(
        self, keys: Sequence[str], subkeys: Sequence[bytes], values: Sequence[Any], expirations: Sequence[float]
    ) -> dict[tuple[str, bytes], bool]: ...

    async def visible_maddrs(self) -> list[str]: ...

    async def shutdown(self) -> None: ...


async def _node_get_many(node: DHTNode, keys: Sequence[str]) -> dict[str, ValueWithExpiration | None]:
    return await node.get_many(list(keys), sufficient_expiration_time=float("inf"))


async def _node_store_many(
    node: DHTNode, keys: Sequence[str], subkeys: Sequence[bytes], values: Sequence[Any], expirations: Sequence[float]
) -> dict[tuple[str, bytes], bool]:
    result = await node.store_many(list(keys), list(values), list(expirations), subkeys=list(subkeys))
    return {(k, s): ok for (k, s), ok in result.items()} if result else {}


def load_or_create_signing_key(path: str | os.PathLike[str]) -> RSAPrivateKey:
    """The RSA key that signs a peer's DHT records, kept in ``path`` (created, mode 0600, if missing).

    A node that keeps its key across restarts owns its old entries: its first announce refreshes
    them and a graceful leave can withdraw them, instead of leaving a stranger's copies to expire.
    """
    path = Path(path)
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.exists():
        key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own (pickle) form: DER
        return key
    fresh = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(fresh.to_bytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return fresh


class InLoopDHT:
    """A DHTNode living in the current event loop."""

    def __init__(self, node: DHTNode, validator: RSASignatureValidator) -> None:
        self.node = node
        self.owner_marker = validator.local_public_key
        # the key that signs our records; it also proves this peer's relay name (dmoe.relay.protocol)
        self.signing_key: RSAPrivateKey = validator._private_key

    @classmethod
    async def create(
        cls,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] | None = None,
        identity_path: str | None = None,
        client_mode: bool = False,
        signing_key: RSAPrivateKey | None = None,
        join_timeout: float | None = default_of(NodeConfig, "join_timeout"),
        **kwargs: Any,
    ) -> InLoopDHT:
        patches.apply()
        # own key, not the process-wide one (several peers may share a process)
        validator = RSASignatureValidator(signing_key or RSAPrivateKey())
        peers = list(initial_peers)
        joining = _Joining(peers, join_timeout)
        while True:
            try:
                with patches.p2pd_in_own_session():
                    node = await DHTNode.create(
                        initial_peers=peers or None,
                        host_maddrs=list(host_maddrs),
                        announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
                        identity_path=identity_path,
                        client_mode=client_mode,
                        record_validator=validator,
                        ensure_bootstrap_success=False,  # retried below, with backoff, and then a clear error
                        **kwargs,
                    )
                break
            except P2PDaemonError as e:  # p2pd exits at once if it cannot connect to any bootstrap peer
                if not peers or "bootstrap" not in str(e):
                    raise
                if join_timeout is None:
                    log.warning("none of the %d initial peer(s) could be reached; starting alone", len(peers))
                    peers = []
                    continue
                await joining.wait("could not connect to any")
        try:
            if peers and join_timeout is not None:  # None: come up alone if no initial peer answers
                await _ping_until_joined(node, joining)
        except BaseException:
            await node.shutdown()  # the p2p daemon too
            raise
        return cls(node, validator)

    @property
    def peer_id(self) -> str:
        return str(self.node.peer_id)

    async def get_many(self, keys: Sequence[str]) -> dict[str, ValueWithExpiration | None]:
        return await _node_get_many(self.node, keys)

    async def store_many(
        self, keys: Sequence[str], subkeys: Sequence[bytes], values: Sequence[Any], expirations: Sequence[float]
    ) -> dict[tuple[str, bytes], bool]:
        return await _node_store_many(self.node, keys, subkeys, values, expirations)

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in await self.node.get_visible_maddrs()]

    @property
    def client_mode(self) -> bool:
        return bool(self.node.protocol.client_mode)

    async def become_server(self) -> None:
        """Start serving DHT requests (joined in client mode until peers were shown to be able to dial us)."""
        await patches.become_dht_server(self.node)

    async def shutdown(self) -> None:
        await self.node.shutdown()


class _Joining:
    """The backoff and the deadline of one attempt to join through ``initial_peers``."""

    def __init__(self, initial_peers: list[str], timeout: float | None) -> None:
        self.initial_peers, self.timeout = initial_peers, timeout
        self.deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        self._wait = _JOIN_FIRST_RETRY
        self.retries = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    async def wait(self, what: str) -> None:
        """Sleep before the next try, or raise once ``timeout`` is spent; ``what`` failed with the peers."""
        left = self.left()
        if left <= 0:
            shown = ", ".join(self.initial_peers[:3]) + (", ..." if len(self.initial_peers) > 3 else "")
            raise DmoeError(f"could not join the swarm: {what} of its {len(self.initial_peers)} initial "
                            f"peer(s) within {self.timeout:g}s ({shown}); check the address (--initial-peers, or "
                            "the coordinator's) and that the peer is up")
        log.warning("%s of the initial peers yet; retrying in %.0fs (%.0fs left to join)", what,
                    min(self._wait, left), left)
        await asyncio.sleep(min(self._wait, left))
        self.retries += 1
        self._wait = min(2 * self._wait, _JOIN_MAX_RETRY)


async def _ping_until_joined(node: DHTNode, joining: _Joining) -> None:
    """Ping the initial peers (validating: hivemind refuses a clock far off the peer's) until one answers, with
    backoff, then look up our neighbourhood if ``DHTNode.create``'s own round had found nobody."""
    peers = {PeerID.from_base58(Multiaddr(maddr)["p2p"]) for maddr in joining.initial_peers}
    joined = bool(node.protocol.routing_table.peer_id_to_uid)
    while True:
        answers = await asyncio.gather(*(node.protocol.call_ping(peer, validate=True, strict=True) for peer in peers))
        answered = sum(answer is not None for answer in answers)
        if answered or joined:  # joined: the validation is the point of this round, and nobody refused it
            if not joined:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), max(joining.left(), 1.0))
            if joining.retries:
                log.info("joined the swarm after %d retries (%d of %d initial peer(s) answered)", joining.retries,
                         answered, len(peers))
            return
        await joining.wait("got no DHT ping answer from any")


async def _remote_get_many(_dht: hivemind.DHT, node: DHTNode, keys: Sequence[str]) -> dict:
    return await _node_get_many(node, keys)


async def _remote_store_many(_dht: hivemind.DHT, node: DHTNode, args: tuple) -> dict:
    return await _node_store_many(node, *args)


class ProcessDHT:
    """An existing ``hivemind.DHT`` (child-process DHT); adds our signature validator to it."""

    def __init__(self, dht: hivemind.DHT) -> None:
        patches.apply()  # in this process; the DHT's own child process has it if applied before it started
        self.dht = dht
        # The process-wide key, unlike InLoopDHT: a hivemind.DHT keeps only the first
        # RSASignatureValidator it is given, and hivemind's own users of it (the optimizer's progress
        # tracker) sign with the process-wide key; with a key of our own, whichever came second had
        # its protected records stored unsigned and rejected by every peer.
        validator = RSASignatureValidator(RSAPrivateKey.process_wide())
        dht.add_validators([validator])
        self.owner_marker = validator.local_public_key

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id)

    async def _run(self, fn: Any) -> Any:
        # MPFuture is a concurrent.futures.Future, so asyncio can await it from any loop
        return await asyncio.wrap_future(self.dht.run_coroutine(fn, return_future=True))

    async def get_many(self, keys: Sequence[str]) -> dict[str, ValueWithExpiration | None]:
        return await self._run(partial(_remote_get_many, keys=list(keys)))

    async def store_many(
        self, keys: Sequence[str], subkeys: Sequence[bytes], values: Sequence[Any], expirations: Sequence[float]
    ) -> dict[tuple[str, bytes], bool]:
        args = (list(keys), list(subkeys), list(values), list(expirations))
        return await self._run(partial(_remote_store_many, args=args))

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    async def shutdown(self) -> None:
        """The wrapped DHT belongs to the caller; leave it running."""

