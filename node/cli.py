"""``dmoe node``: serve experts over gRPC, train them, checkpoint them, announce them in the DHT.

Parses flags (also settable as ``DMOE_<FLAG>`` or in ``--config``), builds a ``NodeConfig`` and
runs an ``ExpertNode`` in one uvloop event loop until SIGTERM/SIGINT. Prints one
``dmoe-ready {json}`` line once the gRPC server listens and the experts are announced.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a busy machine
# (the node shares cores with its gRPC threads, and volunteers' machines run other work) spinning
# threads were measured to cut throughput by ~5x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

from dmoe.config import (
    make_parser,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
    setup_logging,
)
from dmoe.dht.uids import parse_expert_pattern
from dmoe.errors import ConfigError
from dmoe.ready import print_ready

if TYPE_CHECKING:  # torch, grpc and hivemind load only after the flags parsed (fast errors, fast --help)
    from dmoe.node.runtime import NodeConfig

log = logging.getLogger("dmoe.node")

EPILOG = """example:
  dmoe node --experts 'ffn.[0:4].[0:8]' --expert-cls ffn --hidden-dim 1024 \\
            --host 0.0.0.0 --announce-host 203.0.113.7 --initial-peers /ip4/.../tcp/.../p2p/... \\
            --checkpoint-dir ckpt --metrics-port 9100
"""


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("dmoe node", "Serve experts over gRPC and announce them in the DHT.", EPILOG)
    g = p.add_argument_group("experts")
    g.add_argument("--experts", required=True,
                   help="uid pattern: PREFIX.[a:b].[c:d] grids (half-open ranges) and/or comma-separated uids")
    g.add_argument("--expert-cls", default="ffn", help="ffn, transformer, or package.module:Class")
    g.add_argument("--hidden-dim", type=positive_int, default=1024, help="hidden size of every expert")
    g.add_argument("--seed", type=int, default=0, help="initial weights of expert U come from seed (SEED, U)")
    g.add_argument("--device", default=None, help="torch device; default: cuda when available, else cpu")

    g = p.add_argument_group("network")
    g.add_argument("--host", default="0.0.0.0", help="address the gRPC server binds")
    g.add_argument("--port", type=port_number, default=0, help="gRPC port; 0 picks a free one")
    g.add_argument("--announce-host", default=None,
                   help="host announced in the DHT; default: --host, or this machine's outbound address "
                        "when binding 0.0.0.0")
    g.add_argument("--announce-port", type=port_number, default=None,
                   help="port announced in the DHT (e.g. a proxy in front of the node); default: the bound port")
    g.add_argument("--initial-peers", nargs="*", default=[],
                   help="multiaddrs of peers in the swarm to join; none starts a new swarm")
    g.add_argument("--dht-host-maddrs", nargs="*", default=None,
                   help="multiaddrs the DHT listens on; default /ip4/<host>/tcp/0")
    g.add_argument("--dht-announce-maddrs", nargs="*", default=None, help="multiaddrs the DHT tells peers to use")
    g.add_argument("--announce-ttl", type=positive_float, default=30.0,
                   help="expiration of DHT records, seconds (refreshed every ttl/3)")

    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=positive_int, default=1024,
                   help="rows (dim 0) per merged batch")
    g.add_argument("--max-batch-delay-ms", type=non_negative_float, default=0.0,
                   help="ms an idle worker may wait for a partial batch to fill; 0 starts at once")
    g.add_argument("--max-request-mb", type=positive_float, default=64.0,
                   help="largest request tensor payload, MiB (bigger ones get RESOURCE_EXHAUSTED)")
    g.add_argument("--max-queued-rows", type=positive_int, default=16384,
                   help="rows that may wait in the queues before new requests get RESOURCE_EXHAUSTED")
    g.add_argument("--num-workers", type=positive_int, default=1, help="compute threads")

    g = p.add_argument_group("training")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer of every expert")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate")
    g.add_argument("--clip-grad-norm", type=non_negative_float, default=1.0,
                   help="max L2 norm of each expert's parameter gradient per step; 0 disables")

    g = p.add_argument_group("checkpoints and metrics")
    g.add_argument("--checkpoint-dir", default=None, help="directory for checkpoints; none disables them")
    g.add_argument("--checkpoint-interval", type=positive_float, default=120.0,
                   help="seconds between checkpoints (only saved when weights changed)")
    g.add_argument("--checkpoint-keep", type=positive_int, default=3, help="newest checkpoints kept")
    g.add_argument("--metrics-port", type=port_number, default=None,
                   help="serve Prometheus /metrics on this port (0 picks one); none disables")

    def one_line_error(message: str) -> None:
        print(f"dmoe node: {message} (see dmoe node --help)", file=sys.stderr)
        sys.exit(2)

    p.error = one_line_error  # type: ignore[method-assign]
    return p


def _check_maddrs(flag: str, values: list[str] | None) -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for value in values or []:
        try:
            Multiaddr(value)
        except Exception as e:
            raise ConfigError(f"{flag}: {value!r} is not a multiaddr ({e})") from None


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    uids = parse_expert_pattern(args.experts)
    from dmoe.node.backend import OptimizerOptions
    from dmoe.node.batching import BatchingOptions
    from dmoe.node.runtime import NodeConfig

    from dmoe.experts import load_expert_class

    load_expert_class(args.expert_cls)  # fail fast with a one-line reason
    for flag in ("initial_peers", "dht_host_maddrs", "dht_announce_maddrs"):
        _check_maddrs("--" + flag.replace("_", "-"), getattr(args, flag))
    return NodeConfig(
        experts=uids,
        expert_cls=args.expert_cls,
        hidden_dim=args.hidden_dim,
        seed=args.seed,
        device=args.device,
        host=args.host,
        port=args.port,
        announce_host=args.announce_host,
        announce_port=args.announce_port,
        initial_peers=list(args.initial_peers or []),
        dht_host_maddrs=args.dht_host_maddrs,
        dht_announce_maddrs=args.dht_announce_maddrs,
        announce_ttl=args.announce_ttl,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_interval=args.checkpoint_interval,
        checkpoint_keep=args.checkpoint_keep,
        metrics_port=args.metrics_port,
        max_request_bytes=int(args.max_request_mb * 2**20),
        batching=BatchingOptions(
            max_batch_size=args.max_batch_size,
            max_batch_delay=args.max_batch_delay_ms / 1000.0,
            max_queued_rows=args.max_queued_rows,
            num_workers=args.num_workers,
        ),
        optimizer=OptimizerOptions(name=args.optimizer, lr=args.lr, clip_grad_norm=args.clip_grad_norm),
    )


async def serve(config: NodeConfig) -> int:
    from dmoe.node.runtime import ExpertNode

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("received %s again; still shutting down", signal.Signals(signum).name)
        else:
            log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    node = ExpertNode(config)
    try:
        ready = await node.start()
    except BaseException:
        await node.shutdown(save=False)  # never shadow a good checkpoint with unsaved seed weights
        raise
    print_ready("node", **ready)
    await stop.wait()
    await node.shutdown()
    return 0


def main(argv: list[str] | None = None, *, fast_exit: bool = True) -> int:
    """Run a node until SIGTERM/SIGINT; returns the exit code (0 after a graceful shutdown).

    With ``fast_exit`` the process ends right after a complete shutdown (records withdrawn,
    checkpoint fsynced, logs flushed) instead of returning: interpreter teardown of torch,
    grpc and hivemind was measured at 3-8 s on a busy 2-core machine, time a leaving volunteer
    (and the churn simulator) should not wait for.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    config = config_from_args(args)
    import uvloop

    try:
        code = uvloop.run(serve(config))
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as e:
        log.error("node failed: %s: %s", type(e).__name__, e)
        print(f"dmoe node: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    if fast_exit:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
