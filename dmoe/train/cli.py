"""``dmoe train``: join a swarm and train a byte-level language model whose MoE layers live on nodes.

Order of work:

1. Parse flags (also ``DMOE_<FLAG>`` / ``--config``); ``--print-node-command`` prints the
   ``dmoe node`` command that hosts every expert this model needs, and exits.
2. Load the corpus (default: this interpreter's standard library sources).
3. Join the swarm: an in-loop DHT node through ``Swarm``; with ``--run-id`` a ``hivemind.DHT``
   shared by the gating layers (``Swarm.from_dht``) and hivemind's collaborative optimizer.
4. Start-up check: under every layer prefix, find announced experts (within
   ``--startup-timeout``) and ask each node through the ``Info`` RPC whether its experts take
   ``[rows, hidden]`` float32 with our hidden size and are of the expected class. Any mismatch,
   or no experts in time, ends the command with one line naming the cause.
5. Build the model (``--local-experts``: experts in-process, no network at all), resume from
   ``--checkpoint-dir`` if a checkpoint is there, with ``--run-id`` download the current state
   from peers that are ahead, print ``dmoe-ready {json}``, then run ``dmoe.train.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from dmoe.config import MoEOptions, add_options, make_parser, options_from, setup_logging
from dmoe.config.membership import MembershipOptions
from dmoe.config.train import CollabOptions, DataOptions, ModelConfig, TrainOptions, TrainSwarmOptions
from dmoe.dht.placement import experts_pattern, place_experts
from dmoe.dht.uids import split_uid
from dmoe.errors import ConfigError, DmoeError
from dmoe.membership import TokenRenewer, member_from_options, read_token_unchecked
from dmoe.ready import print_ready
from dmoe.train.collab import CollaborativeUpdater
from dmoe.train.data import ByteCorpus
from dmoe.train.grids import GridPublisher
from dmoe.train.model import GPT, ExpertOptimizer, local_moe_factory
from dmoe.train.trainer import LocalUpdater, SwarmSnapshot, Trainer, Updater

log = logging.getLogger("dmoe.train")

EPILOG = """examples:
  dmoe train --print-node-command                     # the node command matching these flags
  dmoe train --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEER --steps 500 --log-file train.jsonl
  dmoe train --local-experts --steps 500              # same model, experts in-process (baseline)
  dmoe train --initial-peers ... --run-id demo         # several trainers, one model
"""


def build_parser() -> argparse.ArgumentParser:
    """Flags derived from the trainer's part of the config tree (``dmoe.config.train``) and the gating
    layer's ``MoEOptions``: each default and its documentation live there."""
    p = make_parser("dmoe train", "Train a byte-level language model whose MoE layers live on dmoe nodes.", EPILOG)
    groups = add_options(p, TrainSwarmOptions)
    add_options(p, ModelConfig, groups=groups)
    add_options(p, MoEOptions, groups=groups)
    add_options(p, TrainOptions, groups=groups)
    add_options(p, DataOptions, groups=groups)
    add_options(p, CollabOptions, groups=groups)
    add_options(p, MembershipOptions, groups=groups)
    return p


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    if args.n_embd % args.n_head:
        raise ConfigError(f"--hidden-dim {args.n_embd} is not divisible by --n-head {args.n_head}")
    num_experts = math.prod(args.grid_size)
    if args.k_best > num_experts:
        raise ConfigError(f"--k-best {args.k_best} is more than the {num_experts} experts of a {args.grid_size} grid")
    if args.k_min > args.k_best:
        raise ConfigError(f"--k-min {args.k_min} is more than --k-best {args.k_best}")
    if args.backward_k_min > args.k_best:
        raise ConfigError(f"--backward-k-min {args.backward_k_min} is more than --k-best {args.k_best}")
    try:
        prefixes = [args.uid_prefix.format(layer=i) for i in range(args.n_layer)]
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--uid-prefix {args.uid_prefix!r} is not a valid template ({e})") from None
    for prefix in prefixes:
        split_uid(prefix + ".0")  # validates the name
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"--uid-prefix {args.uid_prefix!r} gives every layer the same prefix; include {{layer}}")
    return options_from(ModelConfig, args)


def node_commands(config: ModelConfig, *, seed: int, nodes: int = 1, replicas: int = 1,
                  initial_peers: Sequence[str] = (), auto: bool = False) -> list[str]:
    """``dmoe node`` commands that together serve every expert of ``config``, placed over ``nodes`` nodes
    with ``replicas`` copies each by ``dmoe.dht.placement`` (the rule ``dmoe simulate`` and docker-compose use);
    with ``auto``, ``--experts auto`` commands of the same capacity that place themselves."""
    if replicas > nodes:
        raise ConfigError(f"--replicas {replicas} is more than --nodes {nodes}: copies of an expert need different "
                          "nodes")
    placed = place_experts(config.prefixes, config.grid_size, nodes=nodes, replicas=replicas)
    commands = []
    for uids in placed:
        # auto: the same capacity, but the node picks what the swarm lacks (its trainers publish the grids)
        experts = f"auto --capacity {max(len(u) for u in placed)} --replicas {replicas}" if auto \
            else f"'{experts_pattern(uids)}'"
        cmd = (f"dmoe node --experts {experts} --expert-cls {config.expert_cls} "
               f"--hidden-dim {config.n_embd} --seed {seed}")
        if initial_peers:
            cmd += " --initial-peers " + " ".join(initial_peers)
        commands.append(cmd)
    return commands


# ---- start-up check through the DHT and the Info RPC ----


async def discover_experts(swarm: Any, prefix: str, grid_size: Sequence[int]) -> dict[str, list[str]]:
    """Announced experts under ``prefix`` on a grid: uid -> endpoints (one DHT get per prefix per level)."""
    found = await swarm.registry.walk_grid(prefix, len(grid_size))
    return {uid: [e.endpoint for e in endpoints] for uid, endpoints in found.items()}


def _in_grid(uid: str, grid_size: Sequence[int]) -> bool:
    _, coords = split_uid(uid)
    return len(coords) == len(grid_size) and all(0 <= c < g for c, g in zip(coords, grid_size, strict=True))


async def _info(swarm: Any, endpoint: str, uid: str, timeout: float) -> Any:
    from dmoe.wire.proto import expert_pb2 as pb

    reply = await (await swarm.stub_for(endpoint)).Info(pb.InfoRequest(uid=uid), timeout=timeout)
    for info in reply.experts:
        if info.uid == uid:
            return info
    raise ConfigError(f"node {endpoint} announced {uid} but its Info does not list it")


def _check_info(info: Any, *, uid: str, endpoint: str, config: ModelConfig) -> None:
    hint = f"expert {uid} at {endpoint}"
    if info.expert_cls != config.expert_cls:
        raise ConfigError(f"{hint} is of class {info.expert_cls!r}, but this model expects {config.expert_cls!r} "
                          "(--expert-cls)")
    if info.hidden_dim != config.n_embd:
        raise ConfigError(f"{hint} has hidden size {info.hidden_dim}, but this model's is {config.n_embd}: start "
                          f"nodes with --hidden-dim {config.n_embd} or train with --hidden-dim {info.hidden_dim}")
    want = [-1, config.n_embd]
    for kind, specs in (("input", info.inputs), ("output", info.outputs)):
        if len(specs) != 1:
            raise ConfigError(f"{hint} has {len(specs)} {kind}s; MoE layers need exactly one [rows, hidden] tensor")
        spec = specs[0]
        if spec.dtype != "float32":
            raise ConfigError(f"{hint} takes {kind} dtype {spec.dtype}, but this model sends float32")
        if list(spec.shape) != want:
            raise ConfigError(f"{hint} has {kind} shape {list(spec.shape)}, but this model needs {want} "
                              "(rows, hidden)")


def check_swarm(swarm: Any, config: ModelConfig, *, timeout: float, need: int, seed: int) -> dict[str, int]:
    """Wait until every layer prefix has ``need`` experts whose node confirms a matching schema.

    Returns experts found per prefix; raises ConfigError (one line) on a mismatch or at the deadline.
    """
    deadline = time.monotonic() + timeout
    verified_endpoints: set[str] = set()
    found: dict[str, int] = {}
    warned_outside: set[str] = set()
    while True:
        missing = []
        for prefix in config.prefixes:
            left = max(0.5, deadline - time.monotonic())
            try:
                experts = swarm.run(discover_experts(swarm, prefix, config.grid_size), timeout=min(left, 10.0))
            except DmoeError as e:
                log.debug("lookup of %s. failed: %s", prefix, e)
                experts = {}
            usable: dict[str, list[str]] = {}
            for uid, endpoints in experts.items():
                if _in_grid(uid, config.grid_size):
                    usable[uid] = endpoints
                elif uid not in warned_outside:
                    warned_outside.add(uid)
                    log.warning("expert %s lies outside the %s grid of this model; ignored", uid, config.grid_size)
            for uid, endpoints in usable.items():
                for endpoint in endpoints:
                    if endpoint in verified_endpoints:
                        continue
                    try:
                        info = swarm.run(_info(swarm, endpoint, uid, 5.0), timeout=6.0)
                    except ConfigError:
                        raise
                    except Exception as e:  # node gone since it announced: the gating layer will skip it
                        log.info("node %s did not answer Info (%s); skipping it in the check", endpoint, e)
                        continue
                    _check_info(info, uid=uid, endpoint=endpoint, config=config)
                    verified_endpoints.add(endpoint)
            confirmed = sum(1 for eps in usable.values() if any(e in verified_endpoints for e in eps))
            found[prefix] = confirmed
            if confirmed < need:
                missing.append(f"{prefix}. ({confirmed} found)")
        if not missing:
            return found
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"fewer than {need} expert(s) with a matching schema under {', '.join(missing)} within {timeout:g}s; "
                f"start nodes with: {node_commands(config, seed=seed)[0]} --initial-peers ..."
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def join_as_member(swarm: Any, args: argparse.Namespace) -> TokenRenewer | None:
    """With --member-key: a member of a closed swarm. Every call is signed, and only experts of nodes that are
    members of the token's authority are used."""
    member = member_from_options(options_from(MembershipOptions, args))
    if member is None:
        return None
    swarm.member = member
    swarm.restrict_to_members(read_token_unchecked(member.token).authority)
    log.info("closed swarm of authority %s: member %s", read_token_unchecked(member.token).authority, member.id)
    url = args.token_url
    return TokenRenewer(swarm.member, url).start() if url else None


class SwarmWatcher:
    """``SwarmProbe`` for remote experts: call counters from the Swarm and the layers, and the number of
    announced experts, refreshed in the swarm's loop every ``refresh`` seconds without blocking training."""

    def __init__(self, swarm: Any, model: GPT, *, refresh: float = 5.0) -> None:
        self.swarm = swarm
        self.model = model
        self.refresh = refresh
        self.alive: int | None = None
        self._future: concurrent.futures.Future[int] | None = None
        self._last = 0.0

    async def _count(self) -> int:
        config = self.model.config
        total = 0
        for prefix in config.prefixes:
            experts = await asyncio.wait_for(discover_experts(self.swarm, prefix, config.grid_size), timeout=10.0)
            total += sum(1 for uid in experts if _in_grid(uid, config.grid_size))
        return total

    def __call__(self) -> SwarmSnapshot:
        if self._future is not None and self._future.done():
            try:
                self.alive = self._future.result()
            except Exception as e:
                log.debug("expert count failed: %s", e)
            self._future = None
        if self._future is None and time.monotonic() - self._last >= self.refresh:
            self._last = time.monotonic()
            self._future = asyncio.run_coroutine_threadsafe(self._count(), self.swarm.loop)
        stats = self.swarm.stats
        layers = [m.stats for m in self.model.moe_layers()]
        return SwarmSnapshot(
            failures={k: int(v) for k, v in stats.get("failures", {}).items()},
            answers=int(sum(stats.get("answers", {}).values())),
            experts_alive=self.alive,
            experts_reached=sum(int(s.get("experts_reached", 0)) for s in layers),
            remote_seconds=sum(float(s.get("last_forward_seconds", 0.0)) + float(s.get("last_backward_seconds", 0.0))
                               for s in layers),
        )


    def close(self) -> None:
        """Cancel a count still running in the swarm's loop (before the swarm shuts down)."""
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result(timeout=2.0)
            except BaseException:  # cancelled, timed out or failed: nothing to keep
                pass
            self._future = None


class LocalWatcher:
    """``SwarmProbe`` for in-process experts: every expert is alive; reached = distinct experts used."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.num_experts = sum(len(m.experts) for m in model.moe_layers())

    def __call__(self) -> SwarmSnapshot:
        return SwarmSnapshot(experts_alive=self.num_experts, experts_reached=None)


def _device(name: str | None) -> torch.device:
    if name:
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"--device {name!r}: {e}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level)
    config = model_config_from_args(args)
    moe_options = options_from(MoEOptions, args)
    options = options_from(TrainOptions, args)
    data = options_from(DataOptions, args)
    collab = options_from(CollabOptions, args)
    if args.print_node_command:
        for command in node_commands(config, seed=args.seed, nodes=args.nodes, replicas=args.replicas,
                                     initial_peers=args.initial_peers, auto=args.auto_placement):
            print(command)
        return 0
    if args.local_experts and args.run_id:
        raise ConfigError("--run-id trains one model with other trainers through shared remote experts; "
                          "it cannot be combined with --local-experts")
    if not args.local_experts and not args.initial_peers:
        raise ConfigError("pass --initial-peers (the `dht` multiaddr a node prints) or --local-experts; "
                          "`dmoe train --print-node-command` prints a node command for this model")
    device = _device(args.device)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    corpus = ByteCorpus.load(
        data.data, val_percent=data.val_percent,
        max_bytes=int(data.max_data_mb * 2**20) if data.max_data_mb else None,
    )
    corpus.check_block_size(config.block_size)
    log.info("corpus: %d files from %s (%.1f MB train, %.1f MB validation, split %s)", corpus.info.num_files,
             corpus.info.root, corpus.info.train_bytes / 1e6, corpus.info.val_bytes / 1e6, corpus.info.split)

    dht = None
    swarm = None
    updater: Updater | None = None
    trainer: Trainer | None = None
    watcher: SwarmWatcher | None = None
    renewer: TokenRenewer | None = None
    grids: GridPublisher | None = None
    try:
        if not args.local_experts:
            from dmoe.client.moe import RemoteMixtureOfExperts
            from dmoe.client.swarm import Swarm

            if args.run_id:
                import hivemind

                from dmoe.dht import patches

                patches.apply()  # before the DHT's child process starts, so it inherits the fixes
                dht = hivemind.DHT(initial_peers=args.initial_peers, start=True,
                                   host_maddrs=args.dht_host_maddrs or ["/ip4/0.0.0.0/tcp/0"])
                swarm = Swarm.from_dht(dht)
            else:
                swarm = Swarm(initial_peers=args.initial_peers)
            renewer = join_as_member(swarm, args)
            grids = GridPublisher(swarm, config).start()  # before waiting: --experts auto nodes need it
            found = check_swarm(swarm, config, timeout=args.startup_timeout, need=moe_options.k_min, seed=args.seed)
            log.info("experts found: %s", ", ".join(f"{p}.: {n}" for p, n in found.items()))

            def factory(layer: int, prefix: str) -> torch.nn.Module:
                return RemoteMixtureOfExperts(
                    in_features=config.n_embd, grid_size=config.grid_size, uid_prefix=prefix, swarm=swarm,
                    k_best=config.k_best, **asdict(moe_options),
                )
        else:
            factory = local_moe_factory(config, seed=args.seed)

        torch.manual_seed(args.seed)
        model = GPT(config, factory).to(device)
        expert_optimizer = (
            ExpertOptimizer(model, lr=args.expert_lr, clip_grad_norm=args.expert_clip_grad_norm)
            if args.local_experts else None
        )
        data_seed = args.seed
        if args.run_id:
            updater = CollaborativeUpdater(
                dht=dht, params=model.local_parameters(), lr=args.lr, weight_decay=args.weight_decay,
                batch_size=args.batch_size,
                options=collab,
            )
            # each trainer of a run must see different batches
            peer = str(dht.peer_id).encode()
            data_seed = int.from_bytes(hashlib.sha256(b"%d:" % args.seed + peer).digest()[:8], "little")
        else:
            updater = LocalUpdater(model.local_parameters(), lr=args.lr, weight_decay=args.weight_decay)

        if args.run_id:
            options = replace(options, extra_log_fields={"run_id": args.run_id})
        watcher = SwarmWatcher(swarm, model) if swarm is not None else None
        trainer = Trainer(model=model, corpus=corpus, options=options, updater=updater,
                          expert_optimizer=expert_optimizer, probe=watcher or LocalWatcher(model), device=device,
                          data_seed=data_seed, endpoint_stats=swarm.health.snapshot if swarm is not None else None)
        trainer.resume()
        ready: dict[str, Any] = {"step": trainer.step, "steps": args.steps, "experts": "local" if args.local_experts
                                 else "remote", "log_file": args.log_file}
        if isinstance(updater, CollaborativeUpdater):
            before = _fingerprint(model)
            joined = updater.join()
            trainer.log.write({"type": "join", "time": time.time(), **joined, "params_before": before,
                               "params": _fingerprint(model)})
            ready.update(run_id=args.run_id, joined=joined)
        if dht is not None:
            ready["dht"] = [str(m) for m in dht.get_visible_maddrs()]
        ready["metrics_port"] = trainer.start_metrics()
        print_ready("trainer", **ready)
        trainer.install_signal_handlers()
        result = trainer.run()
        summary = (f"dmoe train: {result.steps} steps, {result.batches} batches ({result.skipped} skipped) in "
                   f"{result.elapsed:.1f}s, {result.tokens_per_s:,.0f} tokens/s")
        if result.val_loss is not None:
            summary += f", validation loss {result.val_loss:.4f}"
        if result.stopped_by == "signal":
            summary += " (stopped by signal)"
        print(summary, flush=True)
        if isinstance(updater, CollaborativeUpdater):
            trainer.log.write({"type": "final", "time": time.time(), "step": trainer.step,
                               "params": _fingerprint(model)})
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        if updater is not None:
            updater.shutdown()
        if watcher is not None:
            watcher.close()
        if renewer is not None:
            renewer.stop()
        if grids is not None:
            grids.stop()
        if swarm is not None:
            swarm.shutdown()
        if dht is not None:
            dht.shutdown()


def _fingerprint(model: GPT) -> str:
    from dmoe.train.collab import params_fingerprint

    return params_fingerprint(model.local_parameters())
