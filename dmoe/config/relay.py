"""Relay and reachability options (``dmoe.relay``): what a relay carries, how a node learns it can be dialed.

``RelayOptions`` bound what one relay process carries (``dmoe coordinator`` runs one by default,
``dmoe node --relay`` on request); ``ReachabilityOptions`` say how a node decides between serving
directly and serving through a relay.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmoe.config.flags import non_negative_float, option, positive_float, positive_int

REACHABILITY_MODES = ("auto", "direct", "relay")
RELAY_PORT = 31338  # the coordinator's relay port, next to its DHT port: a stable address too


@dataclass(frozen=True)
class RelayOptions:
    """relay"""

    relay_max_tunnels: int = option(64, parse=positive_int)
    """nodes that may attach to this relay at once; more are told to try another relay"""
    relay_max_connections: int = option(64, parse=positive_int)
    """client connections one attached node may have through this relay at once (each carries any number of
    calls; a trainer opens one per node)"""
    relay_max_connections_per_client: int = option(8, parse=positive_int)
    """client connections one client address may have open to one attached node"""
    relay_tunnel_mbit: float = option(200.0, parse=positive_float)
    """Mbit/s one attached node's traffic may use (both directions together)"""
    relay_total_mbit: float = option(1000.0, parse=positive_float)
    """Mbit/s the relay carries in total, shared fairly between the attached nodes that are busy"""
    relay_dialbacks_per_minute: int = option(30, parse=positive_int, cli=False)
    """reachability checks one client address may ask for per minute"""
    relay_handshake_timeout: float = option(10.0, parse=positive_float, cli=False)
    """seconds a new connection may take to say what it is (and a node to answer a challenge)"""
    relay_open_timeout: float = option(5.0, parse=positive_float, cli=False)
    """seconds an attached node may take to answer an OPEN with its data connection"""
    relay_heartbeat: float = option(5.0, parse=positive_float, cli=False)
    """seconds between heartbeats on a node's control connection; three missed ones end the tunnel"""
    dialback_timeout: float = option(3.0, parse=positive_float, cli=False)
    """seconds a reachability check waits for the node to answer the dial-back Ping"""


@dataclass(frozen=True)
class ReachabilityOptions:
    """reachability"""

    reachability: str = option("auto", choices=REACHABILITY_MODES)
    """auto: ask relays to dial this node back and serve through a relay if nothing can reach it; direct: announce
    the address as given without checking; relay: always serve through a relay (nothing dials in)"""
    relays: list[str] = option(factory=list, nargs="*", metavar="HOST:PORT")
    """relays to use or to ask for the dial-back check, besides those announced in the DHT (e.g. the coordinator's,
    HOST:31338)"""
    relay_attachments: int = option(2, parse=positive_int, cli=False)
    """relays an unreachable node keeps attached at once; it announces the first, the others are warm spares (the
    route moves to one at once when the first dies)"""
    tunnel_to: str | None = option(None, metavar="HOST:PORT")
    """where connections arriving through a relay are handed on; default: this node's own gRPC server (set it to a
    local proxy in front of the server)"""
    reachability_check_interval: float = option(300.0, parse=non_negative_float)
    """seconds between re-checks of reachability (a changed network, a new port forward); 0 checks only at start"""
    relay_retry: float = option(2.0, parse=positive_float, cli=False)
    """seconds between attempts to attach when no relay accepts"""
