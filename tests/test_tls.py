"""Endpoints belong to their announcers: TLS pinned to the key that signs a node's records, against a real node.

* A man in the middle presenting another certificate is refused (the handshake fails; nothing is
  decrypted), while a plain byte-forwarding proxy (what a relay is) carries TLS to the real node.
* A foreign DHT peer announces the node's experts at an address under the node's key fingerprint
  (the registry drops it: the peer does not own that key) and at a third address under its own key
  (the handshake fails there). The client never sends a request to either, and training goes on.
"""

from __future__ import annotations

import asyncio
import ssl
import threading

import pytest
import torch
from dht_peers import Announcer
from hivemind.utils.crypto import RSAPrivateKey

from dmoe import NodeUnreachable, RemoteExpert, RemoteMixtureOfExperts, Swarm
from dmoe.relay.splice import splice
from dmoe.wire.endpoints import parse_endpoint, tls_endpoint
from dmoe.wire.tls import make_certificate

pytestmark = pytest.mark.integration

H = 16


class Listener:
    """A TCP listener in its own loop thread that records what arrives; optionally speaks TLS with ``cert``."""

    def __init__(self, *, tls: tuple[bytes, bytes] | None = None, forward_to: tuple[str, int] | None = None,
                 tmp: object = None) -> None:
        self.received = bytearray()
        self.connections = 0
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        context = None
        if tls is not None:
            key_pem, cert_pem = tls
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            path = tmp / f"mitm-{id(self)}.pem"  # type: ignore[operator]
            path.write_bytes(key_pem + cert_pem)
            context.load_cert_chain(path)
            context.set_alpn_protocols(["h2"])

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            if context is not None:
                self.handshakes += 1  # only reached after a completed TLS handshake
            if forward_to is not None:
                await splice((reader, writer), await asyncio.open_connection(*forward_to))
                return
            while data := await reader.read(65536):
                self.received += data
            writer.close()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.timeout(300)
def test_tls_is_pinned_to_the_announcers_key(launch, tmp_path):
    node = launch("node", ["--experts", "tl.[0:2].[0:2]", "--hidden-dim", str(H), "--host", "127.0.0.1",
                           "--tls", "on", "--announce-ttl", "20"], name="tls_node")
    announced = node.ready["announced"]
    fingerprint = parse_endpoint(announced).tls
    assert fingerprint and announced.startswith("tls:"), announced
    host, port = node.ready["grpc"].rsplit(":", 1)
    listeners: list[Listener] = []
    with Swarm(initial_peers=node.ready["dht"]) as swarm:
        x = torch.randn(3, H)
        y = RemoteExpert("tl.0.0", announced, swarm=swarm, forward_timeout=10)(x)  # the real node: fine

        # a proxy that only forwards bytes (like a relay) carries the node's own TLS: the same answer
        forwarder = Listener(forward_to=(host, int(port)))
        listeners.append(forwarder)
        via = tls_endpoint(fingerprint, forwarder.address)
        torch.testing.assert_close(RemoteExpert("tl.0.0", via, swarm=swarm, forward_timeout=10)(x), y)

        # a man in the middle with a certificate of another key: refused, nothing decrypted
        mitm = Listener(tls=make_certificate(RSAPrivateKey()._private_key), tmp=tmp_path)
        listeners.append(mitm)
        with pytest.raises(NodeUnreachable):
            RemoteExpert("tl.0.0", tls_endpoint(fingerprint, mitm.address), swarm=swarm, forward_timeout=5)(x)
        assert mitm.handshakes == 0

        # a foreign peer claims the node's experts: at a listener of its own under the node's fingerprint, and at a
        # third address under its own key (with its own certificate published, so clients do try to dial it)
        attacker = Announcer.start(swarm, node.ready["dht"])
        own, third = Listener(), Listener()
        listeners += [own, third]
        key = attacker.dht.signing_key._private_key
        attacker_fp = attacker.registry.fingerprint
        uids = [f"tl.{i}.{j}" for i in range(2) for j in range(2)]
        for endpoint, certificate in ((tls_endpoint(fingerprint, own.address), None),
                                      (tls_endpoint(attacker_fp, third.address), make_certificate(key)[1])):
            assert swarm.run(attacker.registry.announce(uids, endpoint=endpoint, node_id=node.ready["node_id"],
                                                        load=0.0, ttl=60, certificate=certificate), timeout=30)
        found = swarm.run(swarm.registry.find_experts(uids), timeout=30)
        for uid in uids:
            endpoints = {e.endpoint for e in found[uid]}
            assert announced in endpoints and tls_endpoint(fingerprint, own.address) not in endpoints, endpoints

        layer = RemoteMixtureOfExperts(in_features=H, grid_size=(2, 2), uid_prefix="tl", swarm=swarm, k_best=4,
                                       k_min=1, forward_timeout=5, backward_timeout=5)
        for _ in range(6):  # training goes on through the real node
            inputs = torch.randn(4, H, requires_grad=True)
            layer(inputs).pow(2).sum().backward()
            assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
        assert own.connections == 0, "the client dialed an endpoint claimed under someone else's key"
        for listener in (own, third):  # no gRPC request ever reached them in the clear
            assert b"PRI * HTTP/2.0" not in listener.received and b"tl." not in listener.received
        attacker.shutdown()
    for listener in listeners:
        listener.close()
