"""Each of dmoe's hivemind patches (``dmoe.dht.patches``) fixes a flaw that is still there without it.

Every test shows both sides: with the patch hivemind behaves, with the patch reverted the upstream
flaw reproduces. When a hivemind release fixes one, the "without" half fails: the patch can go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time

from dmoe.dht import patches


@pytest.fixture
def unpatched():
    """hivemind as shipped for the duration of a test; dmoe's patch restored afterwards."""
    patches.revert()
    yield
    patches.apply()


def _older_copy_survives(wait: float = 0.6) -> bool:
    """Store a subkey, then an older copy of it (rejected); is the newer one still there after the older expires?"""
    record = DictionaryDHTValue()
    now = get_dht_time()
    assert record.store(b"coord", b"newest", now + 30)
    assert not record.store(b"coord", b"older", now + wait / 2)  # rejected either way: it is older
    asyncio.run(asyncio.sleep(wait))
    return record.get(b"coord") is not None


def test_keep_newest_copy_keeps_a_subkey_an_older_copy_was_merged_into():
    patches.apply()
    assert _older_copy_survives()


def test_without_keep_newest_copy_hivemind_evicts_the_newest_copy(unpatched):
    assert not _older_copy_survives(), "hivemind fixed TimedStorage.store: drop patches.keep_newest_copy"


def test_patches_apply_only_in_the_tested_version_range(monkeypatch, unpatched, caplog):
    assert patches.hivemind_is_tested("1.1.12") and not patches.hivemind_is_tested("1.2.0")
    monkeypatch.setattr(hivemind, "__version__", "9.0.0")
    monkeypatch.setattr(patches.apply, "_warned", False, raising=False)
    with caplog.at_level(logging.WARNING, logger="dmoe.dht.patches"):
        assert patches.apply() is False
    assert "outside the versions dmoe is tested with" in caplog.text
    assert not _older_copy_survives()  # nothing was applied


def _p2pd_session(own_session: bool) -> tuple[int, int]:
    """(our session id, p2pd's session id) for a DHT node started with or without the patch."""

    async def start() -> tuple[int, int]:
        from hivemind.dht.node import DHTNode

        if own_session:
            with patches.p2pd_in_own_session():
                node = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        else:
            node = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
            daemons = [int(pid) for pid in children if "p2pd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()]
            assert daemons, "no p2pd child found"
            return os.getsid(0), os.getsid(daemons[-1])
        finally:
            await node.shutdown()

    return asyncio.run(start())


@pytest.mark.integration
def test_p2pd_in_own_session_survives_a_signal_to_our_process_group():
    ours, daemon = _p2pd_session(own_session=True)
    assert daemon != ours


@pytest.mark.integration
def test_without_the_session_patch_p2pd_shares_our_session():
    ours, daemon = _p2pd_session(own_session=False)
    assert daemon == ours, "hivemind starts p2pd in a session of its own now: drop patches.p2pd_in_own_session"


ATTACKER = """
import sys, time
import hivemind
from hivemind.utils import get_dht_time
dht = hivemind.DHT(initial_peers=sys.argv[2:], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
far = get_dht_time() + 10**6  # "valid" for eleven days
for key in sys.argv[1].split(","):
    dht.store(key, b"gotcha", expiration_time=far)  # a plain, unsigned value under the grid's keys
print("stored", flush=True)
time.sleep(600)
"""


def _attack(keys: list[str], peers: list[str]):
    """A plain hivemind DHT peer of its own (no dmoe code, no dmoe patches) stores plain values under ``keys``."""
    import subprocess
    import sys

    # its own session: hivemind.DHT forks a DHT process that starts p2pd; all of them go with the group
    proc = subprocess.Popen([sys.executable, "-c", ATTACKER, ",".join(keys), *peers], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "stored"
    return proc


@pytest.mark.integration
def test_a_plain_value_under_a_grid_key_cannot_erase_its_experts():
    from dht_peers import Announcer, announce

    from dmoe.client.swarm import Swarm

    patches.apply()
    host = Swarm(use_dht=False)
    a = Announcer.start(host, [])
    b = Announcer.start(host, a.maddrs())
    attackers = []
    try:
        def visible(prefix: str) -> list[str]:
            found = host.run(b.registry.walk_grid(prefix, 2), timeout=60)
            return sorted(found)

        announce(a, ["safe.0.0", "safe.1.0"], "127.0.0.1:1")
        attackers.append(_attack(["safe.", "safe.0.", "safe.1."], a.maddrs()))
        assert visible("safe") == ["safe.0.0", "safe.1.0"]
        # the owner's refresh lands, and the owner knows it did: hivemind reports the last replica's
        # answer (the attacker's refusal), the registry reads its entries back
        assert host.run(a.registry.announce(["safe.0.0", "safe.1.0"], endpoint="127.0.0.1:1", node_id="n",
                                            load=0.0, ttl=60.0), timeout=30)
        assert visible("safe") == ["safe.0.0", "safe.1.0"]

        patches.revert()  # hivemind as shipped: the same attack erases the grid
        announce(a, ["gone.0.0", "gone.1.0"], "127.0.0.1:1")
        attackers.append(_attack(["gone.", "gone.0.", "gone.1."], a.maddrs()))
        assert visible("gone") == [], "hivemind keeps dictionaries over plain values now: drop dictionaries_win"
    finally:
        patches.apply()
        for proc in attackers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        b.shutdown()
        a.shutdown()
        host.shutdown()
