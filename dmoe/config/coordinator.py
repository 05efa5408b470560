"""Coordinator options: the swarm's stable bootstrap peer and its live view (``dmoe coordinator``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dmoe.config.flags import option, port_number, positive_float
from dmoe.config.relay import RELAY_PORT

DHT_PORT = 31337  # the coordinator's well-known DHT port (a stable bootstrap address)
HTTP_PORT = 8470  # its page, /status and /metrics
PEERS_NEXT_TO_IDENTITY = "IDENTITY.peers.json"  # --peers-file value meaning "<identity>.peers.json"


def default_identity_path() -> str:
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "dmoe", "coordinator.key")


@dataclass(frozen=True)
class CoordinatorOptions:
    """coordinator"""

    identity: str = option(factory=default_identity_path)
    """private key file that fixes the peer id; created on first start, reused after"""
    host_maddrs: list[str] = option(factory=lambda: [f"/ip4/0.0.0.0/tcp/{DHT_PORT}"], nargs="+")
    """multiaddrs the DHT peer listens on; keep the port fixed for a stable address"""
    announce_maddrs: list[str] = option(factory=list, nargs="*")
    """public multiaddrs to advertise (behind NAT/port forwarding); explicit ports only"""
    initial_peers: list[str] = option(factory=list, nargs="*")
    """multiaddrs of other coordinators or peers to join (for redundancy)"""
    prefixes: list[str] = option(factory=list)
    """grid prefixes to watch, comma-separated, e.g. 'ffn' or 'ffn.[0:4].[0:8]' (which also declares the grid
    size); prefixes that nodes announce are always discovered"""
    http_host: str = option("0.0.0.0")
    """address the HTTP server binds"""
    http_port: int = option(HTTP_PORT, parse=port_number)
    """HTTP port for /, /status, /metrics (0: any free port)"""
    refresh_period: float = option(3.0, parse=positive_float)
    """seconds between reads of the swarm from the DHT"""
    forget_after: float = option(300.0, parse=positive_float)
    """seconds a vanished node or expert stays listed as recently gone"""
    peers_file: str = option(PEERS_NEXT_TO_IDENTITY)
    """where to remember peers across restarts, so nodes that knew this coordinator find it again; 'none'
    disables"""
    members: str | None = option(None, metavar="FILE")
    """closed swarm: file of member public keys (one per line, from `dmoe member key`); listed members get
    membership tokens signed with this coordinator's identity from /token. Nodes join the closed swarm with
    --authority <this coordinator's peer id>"""
    token_ttl: float = option(3600.0, parse=positive_float)
    """seconds a membership token is valid (trainers renew theirs at half-life)"""
    relay: bool = option(True, flag="--no-relay")
    """relay for nodes that cannot be dialed (behind NAT); --no-relay turns it off"""
    relay_host: str = option("0.0.0.0")
    """address the relay binds"""
    relay_port: int = option(RELAY_PORT, parse=port_number)
    """relay port (0: any free port); keep it fixed so nodes can be told HOST:PORT"""
    relay_announce_host: str | None = option(None)
    """host nodes reach the relay at, announced in the DHT; default: --relay-host, or this machine's outbound address
    when binding 0.0.0.0"""
    peers_save_period: float = option(10.0, cli=False)
    """seconds between saves of the known-peers file"""
    max_known_peers: int = option(64, cli=False)
    """peers remembered across restarts"""
