"""Every change dmoe makes to hivemind's behaviour, in one place, each naming the upstream flaw.

dmoe uses hivemind as a library and pins it to the range it is tested with (``TESTED``, also in
``pyproject.toml``). Where hivemind misbehaves in ways that hurt a volunteer swarm, the fix lives
here and nowhere else:

1. ``keep_newest_copy`` (process-wide, applied by ``apply()``): hivemind's
   ``TimedStorage.store`` (``hivemind/utils/timed_storage.py``, 1.1.x) indexes a key under the
   new expiration *before* deciding whether the value is newer. Storing an older copy of a subkey
   already held with a later expiration is rejected, yet the key is now indexed under the older
   time; once that passes, the subkey is evicted although its newest copy is valid. Older copies
   arrive all the time: a ``get`` merges every visited peer's copy of a dictionary record
   (``_SearchState.add_candidate``) and peers cache merged results (``cache_nearest``), so a
   healthy node's experts vanished from lookups (a 4x4 grid's root came back as ``[2, 3]`` while
   every peer listed ``0..3``). The wrapper rejects an older or equal copy before hivemind touches
   its index; plain records (hivemind's averager uses them) keep their newest copy too.
2. ``p2pd_in_own_session`` (a context manager around starting a DHT node): hivemind's ``P2P.create``
   (``hivemind/p2p/p2p_daemon.py``) spawns the ``p2pd`` daemon in our process group, so a SIGTERM
   to the group -- how launchers and container runtimes stop a program -- killed p2pd before the
   node could withdraw its records, and a SIGKILL of ours left p2pd orphaned. While the node
   starts, subprocesses are spawned in a session of their own that dies with us (PDEATHSIG).
3. ``count_state_downloads`` (one ``hivemind.Optimizer`` instance): the optimizer downloads state
   from peers by itself when it falls behind the run and offers no hook to learn that it did; the
   trainer needs to know (an epoch reached by download is not an averaging round). The instance's
   ``load_state_from_peers`` is wrapped to call back.

4. ``dictionaries_win`` (process-wide, applied by ``apply()``): in hivemind a key holds either a
   plain value or a dictionary of signed subkeys, and whichever has the later expiration wins -- in
   ``DHTLocalStorage.store``/``store_subkey`` (``hivemind/dht/storage.py``) and when a ``get`` merges
   the answers of several peers (``_SearchState.add_candidate``, ``hivemind/dht/node.py``). So one
   unsigned store of a plain value with a far-future expiration under a grid's key erased every
   expert under it from all lookups, for as long as the attacker liked, and the owners' refreshes
   were refused. With the patch a plain value never replaces or shadows a dictionary (in storage
   and in merges), and a dictionary store replaces a plain value whatever its expiration.
   hivemind's own users of the DHT (averager, optimizer progress) never mix the two under one key.

5. ``become_dht_server`` (one running ``DHTNode``): hivemind fixes a node's client mode when it is
   created (``DHTProtocol.create``, ``hivemind/dht/protocol.py``), but a dmoe node learns whether it
   can be dialed only after joining (the dial-back check asks relays it finds in the DHT). So nodes
   join in client mode and are promoted once the check says peers can dial them: the helper does
   at run time what server mode does at creation (registers the DHT request handlers, sends the
   node id in ``node_info``) and pings the routing table so peers add it. The other way round does
   not work: a node demoted after joining stays in its peers' routing tables, they hand its id back
   to it, and ``DHTNode.store_many`` asserts that a node never finds itself.

Not patches, but workarounds worth knowing, kept where they are used: hivemind 1.1 passes
``averager_opts`` to the state averager only, so ``dmoe.train.collab`` gives the gradient
averager its request timeout through ``grad_averager_factory`` (matchmaking can deadlock
otherwise).

Nothing is patched on import. ``apply()`` is called by whatever starts a DHT: ``InLoopDHT.create``
(nodes, coordinator, ``Swarm``), ``Swarm.from_dht`` and ``dmoe train`` before it starts a
``hivemind.DHT`` (whose child process inherits the patch). A library user who starts a
``hivemind.DHT`` and hands it to ``Swarm.from_dht`` should call ``apply()`` before starting it.
Outside ``TESTED`` the patches are not applied and a warning says so: an upstream release may have
fixed the flaw or changed what the patch relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import hivemind
from hivemind.dht.node import _SearchState
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils.timed_storage import TimedStorage

logger = logging.getLogger(__name__)

TESTED = ((1, 1, 10), (1, 2, 0))  # hivemind versions dmoe is tested with: [low, high)
_MARK = "_dmoe_patch"  # set on every wrapper this module installs
_PR_SET_PDEATHSIG = 1


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple((parts + [0, 0, 0])[:3])


def hivemind_is_tested(version: str | None = None) -> bool:
    """True if ``version`` (default: the installed hivemind's) lies in ``TESTED``."""
    low, high = TESTED
    return low <= _version(version or hivemind.__version__) < high


def apply() -> bool:
    """Apply the process-wide patch (idempotent); False (with a warning) outside the tested versions."""
    if not hivemind_is_tested():
        if not getattr(apply, "_warned", False):
            apply._warned = True  # type: ignore[attr-defined]
            logger.warning("hivemind %s is outside the versions dmoe is tested with (%s to %s): its patches are "
                           "not applied; see dmoe.dht.patches", hivemind.__version__,
                           ".".join(map(str, TESTED[0])), ".".join(map(str, TESTED[1])))
        return False
    keep_newest_copy()
    dictionaries_win()
    return True


def keep_newest_copy() -> None:
    """Patch 1 (see module docstring): ``TimedStorage.store`` refuses older copies before indexing them."""
    original = TimedStorage.store
    if getattr(original, _MARK, False):
        return

    def store(self: TimedStorage, key: Any, value: Any, expiration_time: float) -> bool:
        held = self.data.get(key)
        if held is not None and held.expiration_time >= expiration_time:
            return False  # what hivemind answers too, minus re-indexing the key under the older time
        return original(self, key, value, expiration_time)

    setattr(store, _MARK, True)
    store.__wrapped__ = original  # type: ignore[attr-defined]
    TimedStorage.store = store  # type: ignore[method-assign]


def dictionaries_win() -> None:
    """Patch 4 (see module docstring): plain values never replace or shadow dictionaries of owned subkeys."""
    if getattr(DHTLocalStorage.store, _MARK, False):
        return
    store, store_subkey, add_candidate = DHTLocalStorage.store, DHTLocalStorage.store_subkey, _SearchState.add_candidate

    def guarded_store(self: DHTLocalStorage, key: Any, value: Any, expiration_time: float,
                      subkey: Any = None) -> bool:
        if subkey is None:
            held = self.get(key)
            if held is not None and isinstance(held.value, DictionaryDHTValue):
                return False  # a plain value may not replace a dictionary, however late it expires
        return store(self, key, value, expiration_time, subkey)

    def guarded_store_subkey(self: DHTLocalStorage, key: Any, subkey: Any, value: Any,
                             expiration_time: float) -> bool:
        held = self.get(key)
        if held is not None and not isinstance(held.value, DictionaryDHTValue):
            del self[key]  # a plain value squatting on the key: the dictionary takes its place
        return store_subkey(self, key, subkey, value, expiration_time)

    def guarded_add_candidate(self: _SearchState, candidate: Any, source_node_id: Any) -> None:
        if candidate is not None and not self.finished:
            current = self.binary_value
            if isinstance(current, DictionaryDHTValue) and not isinstance(candidate.value, DictionaryDHTValue):
                return  # a peer answering with a plain value cannot shadow the owners' dictionary
            if isinstance(candidate.value, DictionaryDHTValue) and current is not None \
                    and not isinstance(current, DictionaryDHTValue):
                self.binary_value, self.expiration_time = None, None  # the dictionary replaces it
        add_candidate(self, candidate, source_node_id)

    for owner, name, wrapper, original in ((DHTLocalStorage, "store", guarded_store, store),
                                           (DHTLocalStorage, "store_subkey", guarded_store_subkey, store_subkey),
                                           (_SearchState, "add_candidate", guarded_add_candidate, add_candidate)):
        setattr(wrapper, _MARK, True)
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(owner, name, wrapper)


def revert() -> None:
    """Undo the process-wide patches (tests use it to show the upstream flaws are still there)."""
    for owner, name in ((TimedStorage, "store"), (DHTLocalStorage, "store"), (DHTLocalStorage, "store_subkey"),
                        (_SearchState, "add_candidate")):
        current = owner.__dict__.get(name)
        if current is not None and getattr(current, _MARK, False):
            setattr(owner, name, current.__wrapped__)


def _daemon_preexec() -> None:
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def p2pd_in_own_session() -> Iterator[None]:
    """Patch 2 (see module docstring): while a DHT node starts, its p2pd gets a session of its own."""
    original = asyncio.subprocess.create_subprocess_exec

    async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", _daemon_preexec)
        return await original(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = spawn  # type: ignore[assignment]
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = original  # type: ignore[assignment]


async def become_dht_server(node: Any) -> None:
    """Patch 5 (see module docstring): switch a running client-mode ``DHTNode`` to a full DHT peer."""
    from hivemind.proto import dht_pb2
    from hivemind.utils.auth import AuthRole, AuthRPCWrapper

    protocol = node.protocol
    if not protocol.client_mode:
        return
    await protocol.add_p2p_handlers(protocol.p2p, AuthRPCWrapper(protocol, AuthRole.SERVICER, protocol.authorizer))
    protocol.client_mode = False
    protocol.node_info = dht_pb2.NodeInfo(node_id=node.node_id.to_bytes())
    peers = list(protocol.routing_table.uid_to_peer_id.values())
    await asyncio.gather(*(protocol.call_ping(peer) for peer in peers), return_exceptions=True)


def count_state_downloads(optimizer: hivemind.Optimizer, on_download: Callable[[], None]) -> None:
    """Patch 3 (see module docstring): ``on_download()`` runs whenever ``optimizer`` loads state from peers."""
    download = optimizer.load_state_from_peers

    def counted_download(**kwargs: Any) -> None:
        on_download()
        download(**kwargs)

    optimizer.load_state_from_peers = counted_download  # type: ignore[method-assign]
