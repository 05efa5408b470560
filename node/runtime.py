"""ExpertNode: builds the experts and wires server, scheduler, DHT, checkpoints and metrics.

Everything runs in one asyncio loop (uvloop under ``dmoe node``): the grpc.aio server, hivemind's
DHTNode, the announcer, the checkpoint timer and the batch scheduler. Torch compute and checkpoint
disk I/O run in worker threads.

Lifecycle: ``start()`` restores the newest checkpoint, starts gRPC, joins the DHT, picks its experts
(``--experts auto``) and takes the swarm's state of any expert a live holder is ahead on
(``dmoe.node.keeper``), announces, starts replica sync (``dmoe.node.replicas``) and returns the ready-line
fields. ``shutdown()`` (on SIGTERM/SIGINT) hands experts only it holds to other nodes, stops taking new
work, withdraws the DHT records, lets in-flight requests finish, saves a checkpoint and leaves the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from dmoe.node.announcer import Announcer, start_dht
from dmoe.node.backend import ExpertBackend
from dmoe.node.batching import BatchScheduler
from dmoe.node.checkpoint import CheckpointStore
from dmoe.node.keeper import ExpertKeeper
from dmoe.node.metrics import NodeMetrics
from dmoe.node.peers import PeerClient
from dmoe.node.reachability import NodeRoute
from dmoe.node.replicas import ReplicaSync
from dmoe.node.server import ExpertServicer, add_to_server
from hivemind.utils.crypto import RSAPrivateKey

from dmoe.config.node import NodeConfig
from dmoe.dht.access import InLoopDHT, load_or_create_signing_key
from dmoe.dht.members import MemberNodes
from dmoe.dht.registry import ExpertRegistry
from dmoe.experts import create_expert, expert_schema
from dmoe.membership import Member, MembershipCheck, TokenRenewer, member_from_options, node_membership
from dmoe.relay.directory import RelayAnnouncer
from dmoe.relay.metrics import RelayMetrics
from dmoe.relay.server import RelayServer
from dmoe.wire.codec import BACKWARD, FORWARD, GRPC_OPTIONS
from dmoe.wire.endpoints import guess_public_host, host_port, split_host_port
from dmoe.wire.tls import make_certificate

log = logging.getLogger(__name__)


class ExpertNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metrics = NodeMetrics()
        self.backends: dict[str, ExpertBackend] = {}  # shared with the scheduler and servicer; the keeper edits it
        for uid in [] if config.auto else config.experts:
            self.backends[uid] = self.make_backend(uid)
        self.metrics.experts.set(len(self.backends))
        self.scheduler = BatchScheduler(self.backends, options=config.batching, metrics=self.metrics)
        self.checkpoints = CheckpointStore(config.checkpoint_dir, keep=config.checkpoint_keep) \
            if config.checkpoint_dir else None
        self.dht: InLoopDHT | None = None
        self.announcer: Announcer | None = None
        self.server: grpc.aio.Server | None = None
        self.route: NodeRoute | None = None
        self.member: Member | None = None
        self.renewer: TokenRenewer | None = None
        self.endpoint: str | None = None
        # next to the checkpoints: the node that restores its experts also owns its old records
        self.identity_dir = Path(config.checkpoint_dir) / "identity" if config.checkpoint_dir else None
        self.relay: RelayServer | None = None
        self.relay_announcer: RelayAnnouncer | None = None
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self.peers: PeerClient | None = None
        self.keeper: ExpertKeeper | None = None
        self.replicas: ReplicaSync | None = None
        self._checkpoint_task: asyncio.Task | None = None
        self._save_lock = asyncio.Lock()
        self._updates_at_last_save = -1

    def make_backend(self, uid: str) -> ExpertBackend:
        """A backend for ``uid`` with its initial weights (seed ``(--seed, uid)``), not yet served."""
        cfg = self.config
        module = create_expert(cfg.expert_cls, hidden_dim=cfg.hidden_dim, seed=cfg.seed, uid=uid)
        return ExpertBackend(uid, module, schema=expert_schema(module, cfg.hidden_dim), expert_cls=cfg.expert_cls,
                             hidden_dim=cfg.hidden_dim, optimizer=cfg.optimizer, device=self.device)

    @property
    def node_id(self) -> str:
        return self.dht.peer_id if self.dht is not None else ""

    # ---- start ----

    def restore(self) -> None:
        if self.checkpoints is None:
            return
        found = self.checkpoints.load_latest()
        if found is None:
            log.info("no checkpoint in %s; starting from seed %d", self.checkpoints.directory, self.config.seed)
            return
        path, payload = found
        restored, skipped = 0, []
        cfg = self.config
        if cfg.auto:  # a returning --experts auto volunteer resumes the experts it held
            for uid, state in list(payload["experts"].items())[:cfg.max_experts]:
                if state.get("expert_cls") == cfg.expert_cls and state.get("hidden_dim") == cfg.hidden_dim:
                    self.backends[uid] = self.make_backend(uid)
        for uid, state in payload["experts"].items():
            backend = self.backends.get(uid)
            if backend is None or state.get("expert_cls") != backend.expert_cls \
                    or state.get("hidden_dim") != backend.hidden_dim:
                skipped.append(uid)
                continue
            backend.load_state_dict(state)
            restored += 1
        log.info("restored %d expert(s) from %s (%d updates)%s", restored, path.name, self.total_updates(),
                 f"; ignored {len(skipped)} not matching this node" if skipped else "")
        self._updates_at_last_save = self.total_updates()

    def total_updates(self) -> int:
        return sum(b.updates for b in self.backends.values())

    async def start(self) -> dict[str, Any]:
        cfg = self.config
        await asyncio.get_running_loop().run_in_executor(None, self.restore)
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        servicer = ExpertServicer(
            self.backends, self.scheduler, metrics=self.metrics, node_id=lambda: self.node_id,
            max_request_bytes=cfg.max_request_bytes, max_calls=cfg.max_calls,
            max_calls_per_peer=cfg.max_calls_per_peer,
            membership=MembershipCheck(cfg.authority) if cfg.authority else None,
            members_only=(FORWARD, BACKWARD) if cfg.members_only_forward else (BACKWARD,),
            backward_rate=cfg.backward_rate, grad_norm_band=cfg.grad_norm_band,
        )
        add_to_server(servicer, self.server)
        # the TLS key is the one that signs our DHT records (its identity file, next to the checkpoints)
        self.signing_key = load_or_create_signing_key(self.identity_dir / "signing.key") if self.identity_dir \
            else RSAPrivateKey()
        self.certificate: bytes | None = None
        if cfg.uses_tls:
            key_pem, self.certificate = make_certificate(self.signing_key._private_key)
            credentials = grpc.ssl_server_credentials([(key_pem, self.certificate)])
            self.grpc_port = self.server.add_secure_port(host_port(cfg.host, cfg.port), credentials)
        else:
            self.grpc_port = self.server.add_insecure_port(host_port(cfg.host, cfg.port))
        if not self.grpc_port:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        await self.server.start()
        wildcard = cfg.host in ("0.0.0.0", "::", "")
        local_host = "127.0.0.1" if wildcard else cfg.host
        log.info("serving %d %s expert(s) (hidden %d) on %s:%d, device %s; %s", len(self.backends), cfg.expert_cls,
                 cfg.hidden_dim, cfg.host, self.grpc_port, self.device,
                 f"closed swarm: only members of authority {cfg.authority} may "
                 + ("call" if cfg.members_only_forward else "train") + " its experts" if cfg.authority
                 else "open swarm: anyone may train its experts")

        default_maddr = "/ip4/0.0.0.0/tcp/0" if wildcard else (
            f"/ip6/{cfg.host}/tcp/0" if ":" in cfg.host else f"/ip4/{cfg.host}/tcp/0")
        self.dht = await start_dht(
            initial_peers=cfg.initial_peers, join_timeout=cfg.join_timeout,
            host_maddrs=cfg.dht_host_maddrs or [default_maddr],
            announce_maddrs=cfg.dht_announce_maddrs,
            identity_dir=self.identity_dir, signing_key=self.signing_key,
            # a full DHT peer only once peers are known to be able to dial it (dmoe.node.reachability)
            client_mode=cfg.reachability.reachability != "direct",
        )
        registry = ExpertRegistry(self.dht)
        own_relay = None
        if cfg.relay:
            self.relay = RelayServer(cfg.relay_limits, metrics=RelayMetrics(self.metrics.registry))
            relay_port = await self.relay.start(cfg.host, cfg.relay_port)
            own_relay = host_port(cfg.announce_host or (guess_public_host() if wildcard else cfg.host), relay_port)
        self.announcer = Announcer(
            registry, uids=list(self.backends), endpoint=None, node_id=self.node_id,
            ttl=cfg.announce_ttl, load=lambda: self.scheduler.load,
            node_info=lambda: {"expert_cls": cfg.expert_cls, "hidden_dim": cfg.hidden_dim,
                               "updates": self.total_updates(), "reachability": self.reachability,
                               "capacity": cfg.max_experts,
                               # per expert: optimizer steps behind its weights (how much a lost state would cost)
                               "lineage": {uid: b.updates for uid, b in self.backends.items()}},
        )
        self.announcer.on_result = lambda ok: self.metrics.announces.labels("ok" if ok else "failed").inc()
        if cfg.authority:  # a closed swarm: publish our membership, or members' trainers will not use us
            self.member = await asyncio.to_thread(member_from_options, cfg.membership)
            if self.member is not None:
                member, fingerprint = self.member, registry.fingerprint
                self.announcer.membership = lambda: node_membership(member, fingerprint)
                if cfg.membership.token_url:
                    self.renewer = TokenRenewer(member, cfg.membership.token_url).start()
        self.announcer.certificate = self.certificate
        # replicas are found with their own registry: in a closed swarm only members' entries count (a node never
        # takes state from, or syncs with, a replica the authority did not admit)
        holders = ExpertRegistry(self.dht)
        if cfg.authority:
            holders.admit = MemberNodes(holders, cfg.authority)
        self.peers = PeerClient(holders, member=self.member)
        self.keeper = ExpertKeeper(cfg, backends=self.backends, registry=holders, peers=self.peers,
                                   metrics=self.metrics, own_owner=registry.fingerprint, node_id=lambda: self.node_id,
                                   make_backend=self.make_backend, add=self._add_expert, drop=self._drop_expert)
        servicer.keeper = self.keeper
        if cfg.auto:
            for uid in await self.keeper.choose_initial():
                self.backends[uid] = self.make_backend(uid)
        await self.keeper.catch_up()  # the swarm's state of our experts where a live holder is ahead
        self.announcer.uids = list(self.backends)
        self.metrics.experts.set(len(self.backends))
        self.route = NodeRoute(cfg, dht=self.dht, registry=registry, grpc_port=self.grpc_port,
                               certificate=self.certificate,
                               local=split_host_port(cfg.reachability.tunnel_to) if cfg.reachability.tunnel_to
                               else (local_host, self.grpc_port), own_relay=own_relay,
                               on_endpoint=self._route_changed)
        self.endpoint = await self.route.start()
        await self.announcer.start()
        if self.relay is not None and own_relay is not None:
            if self.route.status == "direct" or cfg.reachability.reachability == "direct":
                self.relay_announcer = RelayAnnouncer(registry, self.relay, own_relay)
                await self.relay_announcer.start()
            else:
                log.warning("--relay ignored: this node is not reachable itself (%s)", self.route.status)

        self.peers.own_endpoint = self.endpoint or ""
        if cfg.sync_interval > 0:
            self.replicas = ReplicaSync(self.backends, holders, self.peers, interval=cfg.sync_interval,
                                        own_owner=registry.fingerprint, own_endpoint=lambda: self.endpoint,
                                        metrics=self.metrics)
            servicer.replicas = self.replicas
            self.replicas.start()
        self.keeper.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, host=cfg.host)
        if self.checkpoints is not None:
            self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="dmoe-checkpoints")
        return {
            "grpc": host_port(local_host, self.grpc_port),
            "announced": self.endpoint,
            "reachability": self.reachability,
            "relay": self.route.relay,
            "relay_port": self.relay.port if self.relay_announcer is not None else None,
            "dht": await self.dht.visible_maddrs(),
            "experts": list(self.backends),
            "node_id": self.node_id,
            "metrics_port": self.metrics_port,
        }

    @property
    def reachability(self) -> str:
        """direct, relayed, unreachable (no relay holds) or unknown (nobody could check)."""
        return self.route.status if self.route is not None else "unknown"

    def _route_changed(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        if self.peers is not None:
            self.peers.own_endpoint = endpoint or ""
        self.metrics.set_route(self.reachability, relayed=self.route is not None and self.route.relay is not None)
        if self.announcer is not None:
            self.announcer.reannounce(endpoint)

    # ---- experts coming and going (dmoe.node.keeper) ----

    async def _add_expert(self, uid: str, backend: ExpertBackend) -> bool:
        """Serve ``backend`` (its state already loaded) and announce it; True once the announce landed."""
        self.backends[uid] = backend
        self.metrics.experts.set(len(self.backends))
        if self.announcer is None:
            return False
        self.announcer.uids = list(self.backends)
        return await self.announcer.announce_once()

    async def _drop_expert(self, uid: str) -> None:
        """Stop announcing ``uid``, tombstone its records (not those its siblings share), then stop serving it."""
        if self.announcer is not None:
            self.announcer.uids = [u for u in self.announcer.uids if u != uid]
            with contextlib.suppress(TimeoutError, OSError, RuntimeError):
                await asyncio.wait_for(self.announcer.registry.withdraw_some(
                    [uid], kept=self.announcer.uids, ttl=self.config.announce_ttl), 10)
        self.backends.pop(uid, None)
        self.metrics.experts.set(len(self.backends))

    # ---- checkpoints ----

    async def save_checkpoint(self, *, force: bool = False) -> None:
        if self.checkpoints is None:
            return
        async with self._save_lock:
            updates = self.total_updates()
            if not force and updates == self._updates_at_last_save:
                return  # nothing changed since the last save
            started = time.perf_counter()

            def snapshot_and_save() -> Any:
                states = {uid: b.state_dict() for uid, b in self.backends.items()}
                return self.checkpoints.save(states)

            path = await asyncio.get_running_loop().run_in_executor(None, snapshot_and_save)
            self._updates_at_last_save = updates
            self.metrics.checkpoints.inc()
            log.info("checkpoint saved: %s (%d updates, %.2fs)", path.name, updates, time.perf_counter() - started)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval)
            try:
                await self.save_checkpoint()
            except OSError as e:
                log.error("checkpoint failed: %s", e)

    # ---- stop ----

    async def shutdown(self, *, save: bool = True) -> None:
        if self.keeper is not None:
            await self.keeper.stop()
            if save and self.server is not None:  # still serving: the adopters pull our state
                try:
                    await asyncio.wait_for(self.keeper.hand_off(self.endpoint), self.config.handoff_timeout)
                except TimeoutError:
                    log.warning("hand-off did not finish within --handoff-timeout %.0fs", self.config.handoff_timeout)
        if self.replicas is not None:
            await self.replicas.stop()
        log.info("shutting down: no new requests, finishing in-flight work")
        self.scheduler.stop_accepting()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
        server_stopped = asyncio.create_task(self.server.stop(self.config.shutdown_grace)) if self.server else None
        if self.announcer is not None:
            await self.announcer.stop(withdraw=True)
        if self.relay_announcer is not None:
            await self.relay_announcer.stop()
        if server_stopped is not None:
            await server_stopped
        if self.renewer is not None:
            self.renewer.stop()
        if self.route is not None:  # after the server: in-flight relayed calls still need their tunnel
            await self.route.stop()
        if self.relay is not None:
            await self.relay.stop()
        try:
            await asyncio.wait_for(self.scheduler.drain(), self.config.shutdown_grace)
        except TimeoutError:
            log.warning("in-flight compute did not finish within %.0fs", self.config.shutdown_grace)
        if save:
            try:
                await self.save_checkpoint(force=True)
            except OSError as e:
                log.error("final checkpoint failed: %s", e)
        if self.peers is not None:
            await self.peers.close()
        if self.dht is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.dht.shutdown(), 10)
        self.scheduler.close()
        self.metrics.close()
        log.info("node stopped")
