"""Can this node be dialed? Ask relays to dial it back, and learn the address they see it at.

A node sends ``DMOE-DIALBACK <port>`` to a few relays (the explicit ``--relays`` first, then those
announced in the DHT; the coordinator runs one). Each relay Pings the node's gRPC server at the
address it sees the request coming from, and answers ``REACHABLE <ip> <node id>`` or
``UNREACHABLE <ip>`` (``dmoe.relay.server``). The verdict:

* ``direct`` when some relay reached *this* node (the node id matches): the address the relay saw
  is the one to announce unless ``--announce-host`` says otherwise (a guessed private address is
  replaced by the public one a port-forwarding router shows);
* ``unreachable`` when every relay that answered could not reach it (behind NAT, firewalled);
* ``unknown`` when no relay answered (none known, all down): the node then serves directly as
  before, and says so.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from dmoe.config.relay import RelayOptions
from dmoe.relay import protocol
from dmoe.relay.protocol import ProtocolError, read_line
from dmoe.relay.splice import close
from dmoe.wire.endpoints import split_host_port

log = logging.getLogger(__name__)

DIRECT, UNREACHABLE, UNKNOWN = "direct", "unreachable", "unknown"
MAX_ASKED = 3  # relays asked per check
_DIALBACK_TIMEOUT = RelayOptions().dialback_timeout


@dataclass
class Reachability:
    status: str  # DIRECT, UNREACHABLE or UNKNOWN
    observed_host: str | None = None  # the address relays saw this node at
    answers: dict[str, str] = field(default_factory=dict)  # relay -> its answer line (or the error)

    def describe(self) -> str:
        """What each relay answered, for the log."""
        return "; ".join(f"{relay} says {answer}" for relay, answer in self.answers.items()) or "no relay known"


async def ask_dialback(relay: str, port: int, timeout: float, certificate: bytes | None = None) -> str:
    """One relay's answer line to ``DMOE-DIALBACK port [certificate]``; raises OSError/ProtocolError/TimeoutError."""
    host, relay_port = split_host_port(relay)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, relay_port), timeout)
    try:
        cert = f" {base64.b64encode(certificate).decode()}" if certificate else ""
        writer.write(f"{protocol.DIALBACK} {port}{cert}\n".encode())
        return await read_line(reader, timeout)
    finally:
        close(writer)


async def check_reachability(relays: Sequence[str], *, port: int, node_id: str,
                             certificate: bytes | None = None) -> Reachability:
    """Ask up to ``MAX_ASKED`` relays, all at once, to dial ``port`` back (over TLS pinned to ``certificate``)."""
    asked = list(dict.fromkeys(relays))[:MAX_ASKED]
    timeout = _DIALBACK_TIMEOUT + 2.0
    answers = await asyncio.gather(*(ask_dialback(r, port, timeout, certificate) for r in asked),
                                   return_exceptions=True)
    result = Reachability(UNKNOWN)
    refused = False
    for relay, answer in zip(asked, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, OSError | ProtocolError | TimeoutError):
                raise answer
            result.answers[relay] = f"no answer ({type(answer).__name__})"
            continue
        result.answers[relay] = answer
        verb, *rest = answer.split(" ")
        if verb == "REACHABLE" and len(rest) == 2 and rest[1] == (node_id or "-"):
            result.status, result.observed_host = DIRECT, rest[0]
        elif verb in ("REACHABLE", "UNREACHABLE") and rest:
            refused = True  # something else answers at that address, or nothing does
            result.observed_host = result.observed_host or rest[0]
    if result.status != DIRECT and refused:
        result.status = UNREACHABLE
    return result
