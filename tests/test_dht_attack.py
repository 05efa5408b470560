"""A plain hivemind DHT peer of its own key attacks a real node's records; the node's experts keep resolving.

The attacker runs no dmoe code (and none of dmoe's hivemind patches): a ``hivemind.DHT`` with its own
``RSASignatureValidator`` that stores, under the node's grid keys, plain values, subkeys with a
malformed owner marker, and entries signed with its own key that claim the node's experts, both at
the node's TLS key fingerprint (an endpoint it does not own) and at an address of its own, with
normal and far-future expirations. Through dmoe's own lookup and the gating layer, the experts keep
resolving to the node and training keeps working, during the attack and after the attacker left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dmoe import RemoteMixtureOfExperts, Swarm
from dmoe.wire.endpoints import parse_endpoint, tls_endpoint

pytestmark = pytest.mark.integration

H = 16
ATTACKER = """
import sys, time
import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
fake_tls, own_address, peers = sys.argv[1], sys.argv[2], sys.argv[3:]
validator = RSASignatureValidator()  # a key of its own: its entries are validly signed, by it
dht = hivemind.DHT(initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, record_validators=[validator])
mine = validator.local_public_key
for expiration in (get_dht_time() + 60, get_dht_time() + 10**6):
    for key in ("at.", "at.0.", "at.1."):
        dht.store(key, b"gotcha", expiration_time=expiration)  # a plain value over the dictionary
        for coord in ("0", "1"):
            dht.store(key, subkey=coord.encode() + b"[owner:", value=(own_address, "forger", 0.0),
                      expiration_time=expiration)  # a malformed owner marker: signed by nobody
            for endpoint in (fake_tls, own_address):  # entries signed by its own key claiming the node's experts
                dht.store(key, subkey=coord.encode() + mine, value=(endpoint, "forger", 0.0),
                          expiration_time=expiration)
print("stored", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_a_hostile_dht_peer_cannot_hide_or_hijack_a_nodes_experts(launch):
    node = launch("node", ["--experts", "at.[0:2].[0:2]", "--hidden-dim", str(H), "--host", "127.0.0.1",
                           "--tls", "on", "--announce-ttl", "10"], name="attacked")
    announced = node.ready["announced"]
    fingerprint = parse_endpoint(announced).tls
    assert fingerprint is not None
    uids = [f"at.{i}.{j}" for i in range(2) for j in range(2)]
    fake_tls = tls_endpoint(fingerprint, "127.0.0.1:9")  # the node's key, somebody else's address
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, fake_tls, "127.0.0.1:9", *node.ready["dht"]],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "stored"

        def check(swarm: Swarm) -> None:
            found = swarm.run(swarm.registry.find_experts(uids), timeout=30)
            for uid in uids:
                endpoints = {e.endpoint for e in found[uid]}
                assert announced in endpoints, (uid, endpoints)
                assert fake_tls not in endpoints, (uid, endpoints)  # signed by someone without the node's key
            layer = RemoteMixtureOfExperts(in_features=H, grid_size=(2, 2), uid_prefix="at", swarm=swarm, k_best=4,
                                           k_min=1, forward_timeout=5, backward_timeout=5)
            for _ in range(4):
                x = torch.randn(4, H, requires_grad=True)
                layer(x).pow(2).sum().backward()
                assert x.grad is not None and torch.isfinite(x.grad).all()

        with Swarm(initial_peers=node.ready["dht"]) as swarm:
            check(swarm)  # during the attack
        leave(attacker)
        time.sleep(12)  # past the node's record ttl: only its own refreshes keep it visible
        with Swarm(initial_peers=node.ready["dht"]) as swarm:
            check(swarm)  # after it
    finally:
        leave(attacker)


def leave(attacker: subprocess.Popen) -> None:
    """Kill the attacker's whole session: hivemind.DHT forked a DHT process that started p2pd."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(attacker.pid, signal.SIGKILL)
    attacker.wait(30)
