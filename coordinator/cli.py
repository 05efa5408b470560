"""``dmoe coordinator``: a stable bootstrap peer for a swarm and a live view of what it holds.

Start-up order is chosen so that every failure an operator can cause is reported in one line
before anything slow happens: flags are parsed, the HTTP port is bound, the identity file is read
(or created), and only then is the DHT peer started (which spawns hivemind's p2pd). Once the view
has done its first refresh, the ``dmoe-ready`` line is printed. SIGTERM/SIGINT stop the refresh
loop, save the known peers, close HTTP and shut the DHT peer down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop
from dmoe.coordinator.bootstrap import BootstrapOptions, BootstrapPeer, CoordinatorStartError, load_or_create_identity
from dmoe.coordinator.http import HttpServer, QueryRoute, Response, coordinator_routes
from dmoe.coordinator.swarm_metrics import make_registry
from dmoe.coordinator.view import PrefixSpec, SwarmView, parse_prefixes
from hivemind.utils.multiaddr import Multiaddr

from dmoe.config import add_options, default_of, make_parser, options_from, setup_logging
from dmoe.config.coordinator import PEERS_NEXT_TO_IDENTITY, CoordinatorOptions
from dmoe.config.relay import RelayOptions
from dmoe.dht.registry import ExpertRegistry
from dmoe.errors import ConfigError
from dmoe.membership import MembershipError, authority_key_from_identity, check_token_request, issue_token, read_members
from dmoe.ready import print_ready
from dmoe.relay.directory import RelayAnnouncer
from dmoe.relay.metrics import RelayMetrics
from dmoe.relay.server import RelayServer
from dmoe.wire.endpoints import guess_public_host, host_port

logger = logging.getLogger("dmoe.coordinator")
_PEERS_SAVE_PERIOD = default_of(CoordinatorOptions, "peers_save_period")

def _maddr(text: str) -> str:
    try:
        return str(Multiaddr(text))
    except Exception as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiaddr ({e})") from None


def _peer_maddr(text: str) -> str:
    maddr = _maddr(text)
    if "p2p" not in Multiaddr(maddr):
        raise argparse.ArgumentTypeError(f"{text!r} lacks the /p2p/PEER_ID part (copy it from a dmoe-ready line)")
    return maddr


def _prefixes(text: str) -> list[PrefixSpec]:
    try:
        return parse_prefixes(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """Flags derived from ``dmoe.config.CoordinatorOptions``, where each default and its documentation live."""
    parser = make_parser(
        "dmoe coordinator",
        "Bootstrap peer with a stable multiaddr (persistent identity) and a live view of the swarm's "
        "experts and nodes, served over HTTP: / (page), /status (JSON), /metrics (Prometheus).",
    )
    groups = add_options(parser, CoordinatorOptions, parse={
        "host_maddrs": _maddr, "announce_maddrs": _maddr, "initial_peers": _peer_maddr, "prefixes": _prefixes})
    add_options(parser, RelayOptions, groups=groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return uvloop.run(_serve(args))
    except CoordinatorStartError as e:
        print(f"dmoe coordinator: {e}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    http = HttpServer({})
    http_host, http_port = http.bind(args.http_host, args.http_port)
    identity = Path(args.identity).expanduser()
    peers_file = None if args.peers_file.lower() == "none" else Path(
        f"{identity}.peers.json" if args.peers_file == PEERS_NEXT_TO_IDENTITY else args.peers_file).expanduser()
    relay = RelayServer(options_from(RelayOptions, args)) if args.relay else None
    try:
        load_or_create_identity(identity)  # a bad identity file fails here, before the DHT starts
        if args.members:  # and so does an unreadable members list
            try:
                read_members(Path(args.members).expanduser())
            except OSError as e:
                raise CoordinatorStartError(f"cannot read the members list {args.members}: {e.strerror or e}") \
                    from None
            except MembershipError as e:
                raise CoordinatorStartError(str(e)) from None
        if relay is not None:
            try:  # so does a taken relay port
                await relay.start(args.relay_host, args.relay_port)
            except OSError as e:
                raise CoordinatorStartError(f"{e} (another coordinator running? pass --relay-port or --no-relay)") \
                    from None
        peer = await BootstrapPeer.start(BootstrapOptions(
            identity_path=identity, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
            initial_peers=args.initial_peers, known_peers_path=peers_file,
        ))
    except BaseException:
        await http.close()
        if relay is not None:
            await relay.stop()
        raise
    try:
        return await _run(args, stop, peer, http, f"{http_host}:{http_port}", relay)
    finally:
        await peer.remember_peers()
        await http.close()
        if relay is not None:
            await relay.stop()
        await peer.shutdown()
        logger.info("coordinator stopped")


async def _run(args: argparse.Namespace, stop: asyncio.Event, peer: BootstrapPeer, http: HttpServer,
               http_address: str, relay: RelayServer | None) -> int:
    registry = ExpertRegistry(peer.dht)
    view = SwarmView(registry, prefixes=args.prefixes, period=args.refresh_period, forget_after=args.forget_after)
    maddrs = await peer.visible_maddrs()
    wildcard = args.relay_host in ("0.0.0.0", "::", "")
    relay_address = host_port(args.relay_announce_host or (guess_public_host() if wildcard else args.relay_host),
                              relay.port) if relay else None
    about: dict[str, Any] = {"peer_id": str(peer.peer_id), "dht": maddrs, "http": http_address, "relay": relay_address}
    metrics = make_registry(view, dht_peers=peer.routing_table_size)
    if relay is not None:
        relay.use_metrics(RelayMetrics(metrics))
    if args.members:
        http.routes["/token"] = token_route(Path(args.identity).expanduser(), Path(args.members).expanduser(),
                                            ttl=args.token_ttl)
        about["authority"] = str(peer.peer_id)
    http.routes.update(coordinator_routes(view, metrics, about=lambda: {
        **about, "dht_peers": peer.routing_table_size(), "relay_stats": relay.stats() if relay else None}))
    await http.start()
    relay_announcer = RelayAnnouncer(registry, relay, relay_address) if relay and relay_address else None
    if relay_announcer is not None:
        await relay_announcer.start()
    with contextlib.suppress(Exception):  # an empty first view is fine; the loop below retries
        await asyncio.wait_for(view.refresh(), view.lookup_timeout)
    tasks = [asyncio.create_task(view.run(stop)), asyncio.create_task(_save_peers_periodically(peer, view, stop))]
    print_ready("coordinator", dht=maddrs, http=http_address, peer_id=str(peer.peer_id), relay=relay_address)
    logger.info("coordinator %s ready: DHT %s, HTTP http://%s/", peer.peer_id, " ".join(maddrs), http_address)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if relay_announcer is not None:
            await relay_announcer.stop()
    logger.info("shutting down")
    return 0


def token_route(identity: Path, members_file: Path, *, ttl: float) -> QueryRoute:
    """``GET /token?member=..&time=..&sig=..``: a membership token for a listed member who proves its key.

    The members file is read again when it changes, so the operator adds or removes members without a restart
    (a removed member keeps its current token until it expires: keep --token-ttl short)."""
    authority = authority_key_from_identity(identity.read_bytes())
    members: set[str] = set()
    stamp: list[float] = [-1.0]

    def current() -> set[str]:
        try:
            mtime = members_file.stat().st_mtime
            if mtime != stamp[0]:
                members.clear()
                members.update(read_members(members_file))
                stamp[0] = mtime
                logger.info("members list %s: %d member(s)", members_file, len(members))
        except (OSError, MembershipError) as e:
            logger.error("cannot read the members list %s: %s (keeping the previous one)", members_file, e)
        return members

    def handle(query: dict[str, str]) -> Response:
        try:
            member = check_token_request(query, current())
        except MembershipError as e:
            return Response(401 if e.unauthenticated else 403, f"{e}\n".encode())
        logger.info("issued a membership token to %s... (valid %.0fs)", member[:12], ttl)
        return Response(200, issue_token(authority, member, ttl=ttl).encode())

    current()
    return QueryRoute(handle)


async def _save_peers_periodically(peer: BootstrapPeer, view: SwarmView, stop: asyncio.Event) -> None:
    """Save known peers every _PEERS_SAVE_PERIOD seconds, and soon after the set of nodes changes.

    A coordinator that crashes (no graceful save) then still finds the nodes it last saw.
    """
    saved_nodes: frozenset[str] = frozenset()
    loop_time = asyncio.get_running_loop().time
    last = loop_time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(view.period, _PEERS_SAVE_PERIOD))
        nodes = frozenset(view.snapshot.nodes)
        if nodes == saved_nodes and loop_time() - last < _PEERS_SAVE_PERIOD:
            continue
        # nodes may publish their DHT multiaddrs in their record ("dht"); remember those too
        announced = [m for node in view.snapshot.nodes.values() for m in _as_list(node.info.get("dht"))]
        await peer.remember_peers(announced)
        saved_nodes, last = nodes, loop_time()


def _as_list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []
