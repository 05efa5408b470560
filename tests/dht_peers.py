"""Test helper: DHT peers in the test process that announce through ``ExpertRegistry`` like a node.

Each ``Announcer`` is a real hivemind ``DHTNode`` (with its own p2p daemon) with its own signing key,
running in the event loop of a ``Swarm`` that only lends its loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils.crypto import RSAPrivateKey

from dmoe.client.swarm import Swarm
from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertRegistry


@dataclass
class Announcer:
    """A DHT peer with its own signing key (like a node process) announcing through ExpertRegistry."""

    host: Swarm  # only lends its event loop
    dht: InLoopDHT
    registry: ExpertRegistry

    @classmethod
    def start(cls, host: Swarm, initial_peers: list[str]) -> Announcer:
        async def create() -> InLoopDHT:
            # one key per peer: hivemind's default key is per process, and these peers share one
            validator = RSASignatureValidator(RSAPrivateKey())
            node = await DHTNode.create(initial_peers=initial_peers or None, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                        record_validator=validator)
            return InLoopDHT(node, validator)

        dht = host.run(create(), timeout=60)
        return cls(host, dht, ExpertRegistry(dht))

    def maddrs(self) -> list[str]:
        return self.host.run(self.dht.visible_maddrs(), timeout=10)

    def shutdown(self) -> None:
        self.host.run(self.dht.shutdown(), timeout=30)


def announce(peer: Announcer, uids: list[str], endpoint: str, ttl: float = 60.0) -> None:
    coro = peer.registry.announce(uids, endpoint=endpoint, node_id=endpoint, load=0.0, ttl=ttl)
    assert peer.host.run(coro, timeout=30)
