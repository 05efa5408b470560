"""The relay's line protocol: the first line of every connection says what it is.

One TCP port serves four kinds of connection, told apart by their first line (ASCII, at most
``MAX_LINE`` bytes, ``\\n``-terminated; longer or unknown lines close the connection)::

    CONNECT r-3f9c...:1 HTTP/1.1      a client's tunnel to an attached node (gRPC's HTTP proxy support)
    DMOE-ATTACH 1 <b64 public key>    a node's control connection (kept open, heartbeats both ways)
    DMOE-DATA <name> <connection id>  a node's answer to OPEN: this socket carries one client connection
    DMOE-DIALBACK <port>              "dial me back at <port>": the reachability check

Attach handshake (proves the node holds the key its relay name is derived from, so nobody can
take over another node's name)::

    node  -> DMOE-ATTACH 1 <public key>
    relay -> CHALLENGE <nonce>
    node  -> SIGNED <signature of "dmoe-relay-attach:" + nonce>
    relay -> ATTACHED <name>            (or ERROR <reason>, then close)

then on the control connection: relay -> ``OPEN <connection id> <client ip>``, both ways
``PING`` / ``PONG``. Connection ids are random 128-bit secrets, so a ``DMOE-DATA`` line cannot be
forged for a connection the relay did not announce to that node. The node's name is
``relay_name(public key)``: the same key signs its DHT records, so the record's owner and the
relay name it announces are bound together.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from dmoe.wire.tls import key_fingerprint

MAX_LINE = 4096
PROTOCOL_VERSION = "1"
ATTACH = "DMOE-ATTACH"
DATA = "DMOE-DATA"
DIALBACK = "DMOE-DIALBACK"
CONNECT = "CONNECT"
_CHALLENGE_CONTEXT = b"dmoe-relay-attach:"


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the connection is closed."""


async def read_line(reader: asyncio.StreamReader, timeout: float) -> str:
    """One ``\\n``-terminated ASCII line without its terminator; ProtocolError on EOF, overlong or binary input."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes") from None
    except TimeoutError:
        raise ProtocolError(f"no line within {timeout:.0f}s") from None
    try:
        return raw.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ProtocolError("line is not ASCII") from None


def relay_name(public_key: bytes) -> str:
    """A node's name at every relay: derived from the public key that also signs its DHT records."""
    return "r-" + key_fingerprint(public_key)


def encode_key(public_key: bytes) -> str:
    return base64.b64encode(public_key).decode()


def decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
        RSAPublicKey.from_bytes(key)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"not a public key ({type(e).__name__})") from None
    return key


def challenge_payload(nonce: str) -> bytes:
    """What a node signs: a fresh random nonce per attach (so a signature is never accepted twice), with a
    context prefix (so it is no valid signature of anything else the key signs)."""
    return _CHALLENGE_CONTEXT + nonce.encode()


def sign_challenge(key: RSAPrivateKey, nonce: str) -> str:
    return key.sign(challenge_payload(nonce)).decode()


def verify_challenge(public_key: bytes, nonce: str, signature: str) -> bool:
    try:
        return RSAPublicKey.from_bytes(public_key).verify(challenge_payload(nonce), signature.encode())
    except ValueError:
        return False
