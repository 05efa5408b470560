"""The coordinator's DHT peer: a bootstrap address that stays the same across restarts.

A multiaddr is ``/ip4/HOST/tcp/PORT/p2p/PEER_ID``. The host and port come from ``--host-maddrs``
(a fixed port by default); the peer id is derived from a private key kept in the identity file, so
a restarted coordinator is reachable at exactly the address people pasted into ``--initial-peers``.

Three details make a restart seamless rather than merely "same address":

* **Identity file.** Created atomically on first start (write a temp file, then hard-link it into
  place, so two processes racing on a fresh path never read half a key) and validated on every
  start: an unreadable or corrupt file is a clear one-line error, never a silently new identity.
* **Stable DHT node id.** hivemind draws a random Kademlia id per start; we derive it from the peer
  id instead, so peers that still hold the old (node id, peer id) pair in their routing tables are
  not confused by a new id behind the same peer.
* **Own session for p2pd.** hivemind's p2pd daemon would share our process group, so a SIGTERM
  sent to the group (how launchers stop us) would kill it under our feet and leave the graceful
  shutdown with a dead daemon. It is spawned in its own session and dies with us (PDEATHSIG).
* **Known-peers file.** A peer that failed to reach us while we were down drops us from its routing
  table, and a fresh coordinator knows nobody, so neither side would ever call the other again.
  We therefore remember the multiaddrs of peers we were connected to (saved periodically and on
  shutdown) and bootstrap from them on restart: our ping puts us back into their routing tables,
  and their next announcement reaches us again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from dmoe.config import default_of
from dmoe.config.coordinator import CoordinatorOptions
from dmoe.dht.access import InLoopDHT
from dmoe.errors import DmoeError

logger = logging.getLogger(__name__)


class CoordinatorStartError(DmoeError):
    """The coordinator cannot start (identity file, ports, DHT); the message says which and why."""

    kind = "coordinator_start"


def load_or_create_identity(path: Path) -> PeerID:
    """Peer id of the key in ``path``, creating the key file first if it does not exist."""
    if not path.exists() and not path.is_symlink():
        _create_identity(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CoordinatorStartError(f"cannot read identity file {path}: {e.strerror or e}") from None
    try:
        return PeerID.from_identity(data)
    except Exception as e:  # protobuf DecodeError, cryptography ValueError/UnsupportedAlgorithm, ...
        raise CoordinatorStartError(
            f"identity file {path} is corrupt ({type(e).__name__}); restore it from a backup, or delete it "
            "to create a new identity (which changes the coordinator's multiaddr)"
        ) from None


def _create_identity(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=path.parent)
    except OSError as e:
        raise CoordinatorStartError(f"cannot create identity file {path}: {e.strerror or e}") from None
    try:
        os.close(fd)
        P2P.generate_identity(tmp)  # hivemind writes a libp2p-encoded RSA key (and makes it read-only)
        os.link(tmp, path)  # atomic and fails if another process created the file meanwhile: then use theirs
        logger.info("created a new coordinator identity in %s", path)
    except FileExistsError:
        pass
    except OSError as e:
        raise CoordinatorStartError(f"cannot create identity file {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_known_peers(path: Path | None, *, own_peer_id: PeerID) -> list[str]:
    """Multiaddrs saved by a previous run; a missing or unreadable file is just an empty list."""
    if path is None:
        return []
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        logger.warning("ignoring known-peers file %s: %s", path, e)
        return []
    peers = []
    for item in items if isinstance(items, list) else []:
        try:
            maddr = Multiaddr(str(item))
            if PeerID.from_base58(maddr["p2p"]) != own_peer_id:
                peers.append(str(maddr))
        except Exception:  # a hand-edited or foreign entry; skip it, keep the rest
            logger.warning("ignoring bad entry %r in known-peers file %s", item, path)
    return peers


def write_known_peers(path: Path, maddrs: Sequence[str]) -> None:
    """Replace the known-peers file atomically (a crash mid-write leaves the old list)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sorted(set(maddrs)), indent=1) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class BootstrapOptions:
    identity_path: Path
    host_maddrs: Sequence[str] = field(default_factory=lambda: default_of(CoordinatorOptions, "host_maddrs"))
    announce_maddrs: Sequence[str] = ()
    initial_peers: Sequence[str] = ()
    known_peers_path: Path | None = None  # None: do not remember peers across restarts
    max_known_peers: int = default_of(CoordinatorOptions, "max_known_peers")


@dataclass
class BootstrapPeer:
    """The coordinator's DHT node plus its persistent identity and peer memory."""

    dht: InLoopDHT
    options: BootstrapOptions
    peer_id: PeerID
    _remembered: dict[str, str] = field(default_factory=dict)  # peer id -> multiaddr

    @classmethod
    async def start(cls, options: BootstrapOptions) -> BootstrapPeer:
        peer_id = load_or_create_identity(options.identity_path)
        remembered = read_known_peers(options.known_peers_path, own_peer_id=peer_id)
        initial_peers = list(dict.fromkeys([*options.initial_peers, *remembered]))
        _check_maddrs(options.host_maddrs, "--host-maddrs")
        _check_maddrs(options.announce_maddrs, "--announce-maddrs")
        _check_maddrs(options.initial_peers, "--initial-peers", need_peer_id=True)
        try:
            dht = await InLoopDHT.create(
                initial_peers=initial_peers,
                host_maddrs=options.host_maddrs,
                announce_maddrs=options.announce_maddrs or None,
                identity_path=str(options.identity_path),
                node_id=DHTID.generate(source=peer_id.to_bytes()),
                # a bootstrap peer must come up even when every other peer is down (it is what
                # they will reconnect to); unreachable initial peers are logged, not fatal
                join_timeout=None,
            )
        except Exception as e:
            raise CoordinatorStartError(f"cannot start the DHT peer on {' '.join(options.host_maddrs)}: "
                                        f"{_one_line(e)}") from None
        if initial_peers:
            logger.info("bootstrapped from %d peer(s) (%d remembered from the last run)",
                        len(initial_peers), len(remembered))
        self = cls(dht=dht, options=options, peer_id=peer_id)
        self._remembered = {str(Multiaddr(m)["p2p"]): m for m in remembered}
        return self

    async def visible_maddrs(self) -> list[str]:
        return await self.dht.visible_maddrs()

    def routing_table_size(self) -> int:
        return len(self.dht.node.protocol.routing_table.uid_to_peer_id)

    async def remember_peers(self, extra_maddrs: Sequence[str] = ()) -> None:
        """Save multiaddrs of peers we are connected to (plus ``extra_maddrs``) for the next start."""
        path = self.options.known_peers_path
        if path is None:
            return
        current: dict[str, str] = {}
        try:
            for info in await asyncio.wait_for(self.dht.node.p2p.list_peers(), 5.0):
                for addr in info.addrs:
                    if "tcp" in addr or "udp" in addr:
                        current[str(info.peer_id)] = f"{addr}/p2p/{info.peer_id}"
                        break
        except Exception as e:  # p2pd gone (shutting down): keep what we have
            logger.debug("cannot list connected peers: %s", e)
        for maddr in extra_maddrs:
            with contextlib.suppress(Exception):
                current[str(Multiaddr(maddr)["p2p"])] = str(Multiaddr(maddr))
        current.pop(str(self.peer_id), None)
        # connected peers first, then older memories, capped so the file cannot grow without bound
        merged = {**current, **{k: v for k, v in self._remembered.items() if k not in current}}
        self._remembered = dict(list(merged.items())[: self.options.max_known_peers])
        try:
            await asyncio.to_thread(write_known_peers, path, list(self._remembered.values()))
        except OSError as e:
            logger.warning("cannot save known peers to %s: %s", path, e)

    async def shutdown(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.dht.shutdown(), timeout)
        except Exception as e:  # already half-dead (p2pd killed): nothing left to close cleanly
            logger.warning("DHT shutdown incomplete: %s", _one_line(e))


def _check_maddrs(maddrs: Sequence[str], flag: str, *, need_peer_id: bool = False) -> None:
    for text in maddrs:
        try:
            maddr = Multiaddr(text)
        except Exception as e:
            raise CoordinatorStartError(f"{flag}: {text!r} is not a multiaddr ({_one_line(e)})") from None
        if need_peer_id and "p2p" not in maddr:
            raise CoordinatorStartError(f"{flag}: {text!r} lacks the /p2p/PEER_ID part")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
