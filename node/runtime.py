"""ExpertNode: builds the experts and wires server, scheduler, DHT, checkpoints and metrics.

Everything runs in one asyncio loop (uvloop under ``dmoe node``): the grpc.aio server, hivemind's
DHTNode, the announcer, the checkpoint timer and the batch scheduler. Torch compute and checkpoint
disk I/O run in worker threads.

Lifecycle: ``start()`` restores the newest checkpoint, starts gRPC, joins the DHT, announces, and
returns the ready-line fields. ``shutdown()`` (on SIGTERM/SIGINT) stops taking new work, withdraws
the DHT records, lets in-flight requests finish, saves a checkpoint and leaves the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from dmoe.node.announcer import Announcer, start_dht
from dmoe.node.backend import ExpertBackend
from dmoe.node.batching import BatchScheduler
from dmoe.node.checkpoint import CheckpointStore
from dmoe.node.metrics import NodeMetrics
from dmoe.node.server import ExpertServicer, add_to_server

from dmoe.config.node import NodeConfig
from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertRegistry
from dmoe.experts import create_expert, expert_schema
from dmoe.wire.codec import GRPC_OPTIONS

log = logging.getLogger(__name__)


def host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:5000``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def guess_public_host() -> str:
    """The local address used for outbound traffic (no packet is sent); 127.0.0.1 if none."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects a route
        return s.getsockname()[0]
    return "127.0.0.1"


class ExpertNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metrics = NodeMetrics()
        self.backends: dict[str, ExpertBackend] = {}
        for uid in config.experts:
            module = create_expert(config.expert_cls, hidden_dim=config.hidden_dim, seed=config.seed, uid=uid)
            self.backends[uid] = ExpertBackend(
                uid, module, schema=expert_schema(module, config.hidden_dim), expert_cls=config.expert_cls,
                hidden_dim=config.hidden_dim, optimizer=config.optimizer, device=self.device,
            )
        self.metrics.experts.set(len(self.backends))
        self.scheduler = BatchScheduler(self.backends, options=config.batching, metrics=self.metrics)
        self.checkpoints = CheckpointStore(config.checkpoint_dir, keep=config.checkpoint_keep) \
            if config.checkpoint_dir else None
        self.dht: InLoopDHT | None = None
        self.announcer: Announcer | None = None
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self._checkpoint_task: asyncio.Task | None = None
        self._save_lock = asyncio.Lock()
        self._updates_at_last_save = -1

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
        )
        add_to_server(servicer, self.server)
        self.grpc_port = self.server.add_insecure_port(host_port(cfg.host, cfg.port))
        if not self.grpc_port:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        await self.server.start()
        wildcard = cfg.host in ("0.0.0.0", "::", "")
        local_host = "127.0.0.1" if wildcard else cfg.host
        announce_host = cfg.announce_host or (guess_public_host() if wildcard else cfg.host)
        self.endpoint = host_port(announce_host, cfg.announce_port or self.grpc_port)
        log.info("serving %d %s expert(s) (hidden %d) on %s:%d, device %s", len(self.backends), cfg.expert_cls,
                 cfg.hidden_dim, cfg.host, self.grpc_port, self.device)

        default_maddr = "/ip4/0.0.0.0/tcp/0" if wildcard else (
            f"/ip6/{cfg.host}/tcp/0" if ":" in cfg.host else f"/ip4/{cfg.host}/tcp/0")
        self.dht = await start_dht(
            initial_peers=cfg.initial_peers,
            host_maddrs=cfg.dht_host_maddrs or [default_maddr],
            announce_maddrs=cfg.dht_announce_maddrs,
            # next to the checkpoints: the node that restores its experts also owns its old records
            identity_dir=Path(cfg.checkpoint_dir) / "identity" if cfg.checkpoint_dir else None,
        )
        self.announcer = Announcer(
            ExpertRegistry(self.dht), uids=list(self.backends), endpoint=self.endpoint, node_id=self.node_id,
            ttl=cfg.announce_ttl, load=lambda: self.scheduler.load,
            node_info=lambda: {"expert_cls": cfg.expert_cls, "hidden_dim": cfg.hidden_dim,
                               "updates": self.total_updates()},
        )
        self.announcer.on_result = lambda ok: self.metrics.announces.labels("ok" if ok else "failed").inc()
        await self.announcer.start()

        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, host=cfg.host)
        if self.checkpoints is not None:
            self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="dmoe-checkpoints")
        return {
            "grpc": host_port(local_host, self.grpc_port),
            "announced": self.endpoint,
            "dht": await self.dht.visible_maddrs(),
            "experts": list(self.backends),
            "node_id": self.node_id,
            "metrics_port": self.metrics_port,
        }

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
        log.info("shutting down: no new requests, finishing in-flight work")
        self.scheduler.stop_accepting()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
        server_stopped = asyncio.create_task(self.server.stop(self.config.shutdown_grace)) if self.server else None
        if self.announcer is not None:
            await self.announcer.stop(withdraw=True)
        if server_stopped is not None:
            await server_stopped
        try:
            await asyncio.wait_for(self.scheduler.drain(), self.config.shutdown_grace)
        except TimeoutError:
            log.warning("in-flight compute did not finish within %.0fs", self.config.shutdown_grace)
        if save:
            try:
                await self.save_checkpoint(force=True)
            except OSError as e:
                log.error("final checkpoint failed: %s", e)
        if self.dht is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.dht.shutdown(), 10)
        self.scheduler.close()
        self.metrics.close()
        log.info("node stopped")
