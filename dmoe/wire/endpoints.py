"""Endpoint strings: how a record says where an expert is served, and how a client dials it.

An endpoint is an opaque string everywhere in the client (peer health, channels and bans are
keyed by it); only this module reads its grammar::

    10.0.0.7:5000                   direct: the node's own gRPC server
    [2001:db8::7]:5000              direct, IPv6
    r-3f9c1a...@198.51.100.4:31338  relayed: node "r-3f9c1a..." attached to the relay at 198.51.100.4:31338
    tls:3f9c1a...@10.0.0.7:5000     either form behind TLS with the key of fingerprint 3f9c1a... (``dmoe.wire.tls``)

A relayed endpoint is dialed through gRPC's own HTTP CONNECT proxy support: the channel's target
is the node's relay name (never resolved, it only travels inside the ``CONNECT`` line) and the
proxy is the relay. The relay splices the connection onto the node's outbound tunnel
(``dmoe.relay``), so everything inside it, HTTP/2 framing, deadlines, cancellation, status codes,
streaming, and TLS when it lands, is the node's own, end to end.
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass

import grpc

from dmoe.wire.codec import GRPC_OPTIONS
from dmoe.wire.tls import FINGERPRINT_HEX, TLS_NAME

RELAY_SEPARATOR = "@"
RELAYED_TARGET_PORT = 1  # the port in a relayed channel's CONNECT target: the relay ignores it
# a relay name: what ``dmoe.relay.protocol.relay_name`` derives from a node's public key
_NAME = re.compile(r"[a-z0-9][a-z0-9\-]{0,62}")
TLS_PREFIX = "tls:"
_FINGERPRINT = re.compile(f"[0-9a-f]{{{FINGERPRINT_HEX}}}")


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint: where to open the TCP connection, and through which relay if any."""

    text: str  # the endpoint string as announced
    address: str  # host:port to connect to: the node's server, or the relay
    relay_name: str | None = None  # the node's name at the relay, for relayed endpoints
    tls: str | None = None  # fingerprint of the key the node's TLS certificate must have; None: plaintext

    @property
    def relayed(self) -> bool:
        return self.relay_name is not None


def host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:5000``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """``"h:p"`` / ``"[v6]:p"`` -> (host, port); ValueError naming the problem otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def guess_public_host() -> str:
    """The local address used for outbound traffic (no packet is sent); 127.0.0.1 if none."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects a route
        return s.getsockname()[0]
    return "127.0.0.1"


def relayed_endpoint(name: str, relay: str) -> str:
    return f"{name}{RELAY_SEPARATOR}{relay}"


def tls_endpoint(fingerprint: str, endpoint: str) -> str:
    return f"{TLS_PREFIX}{fingerprint}{RELAY_SEPARATOR}{endpoint}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse an announced endpoint; ValueError for anything that is none of the forms."""
    tls = None
    rest = text
    if text.startswith(TLS_PREFIX):
        tls, _, rest = text[len(TLS_PREFIX):].partition(RELAY_SEPARATOR)
        if not _FINGERPRINT.fullmatch(tls):
            raise ValueError(f"{text[:80]!r}: {tls[:40]!r} is not a key fingerprint")
    name, sep, address = rest.rpartition(RELAY_SEPARATOR)
    split_host_port(address)
    if not sep:
        return Endpoint(text=text, address=address, tls=tls)
    if not _NAME.fullmatch(name):
        raise ValueError(f"{text[:80]!r}: {name[:40]!r} is not a relay name")
    return Endpoint(text=text, address=address, relay_name=name, tls=tls)


def is_relayed(text: str) -> bool:
    return RELAY_SEPARATOR in (text[len(TLS_PREFIX):].partition(RELAY_SEPARATOR)[2]
                               if text.startswith(TLS_PREFIX) else text)


def open_channel(text: str, options: list[tuple[str, object]] | None = None, *,
                 certificate: bytes | None = None) -> grpc.aio.Channel:
    """An asyncio gRPC channel to an endpoint, direct or through its relay; a TLS endpoint needs the node's
    ``certificate`` (PEM, already checked against the endpoint's fingerprint), which becomes the only trusted root."""
    endpoint = parse_endpoint(text)
    opts = list(GRPC_OPTIONS if options is None else options)
    target = endpoint.address
    if endpoint.relayed:
        opts.append(("grpc.http_proxy", f"http://{endpoint.address}"))
        target = f"{endpoint.relay_name}:{RELAYED_TARGET_PORT}"
    if endpoint.tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    if certificate is None:
        raise ValueError(f"{text[:80]}: a TLS endpoint needs the node's certificate")
    opts.append(("grpc.ssl_target_name_override", TLS_NAME))
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=certificate), options=opts)
