"""``dmoe node``: serve experts over gRPC, train them, checkpoint them, announce them in the DHT.

Parses flags (also settable as ``DMOE_<FLAG>`` or in ``--config``; all derived from
``dmoe.config.NodeConfig``, where each default and its documentation live), builds a ``NodeConfig`` and
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

from dmoe.config import (
    BatchingOptions,
    NodeConfig,
    OptimizerOptions,
    add_options,
    make_parser,
    options_from,
    setup_logging,
)
from dmoe.config.membership import MembershipOptions
from dmoe.config.node import AUTO
from dmoe.config.relay import ReachabilityOptions, RelayOptions
from dmoe.dht.uids import parse_expert_pattern
from dmoe.errors import ConfigError
from dmoe.ready import print_ready
from dmoe.wire.endpoints import split_host_port

log = logging.getLogger("dmoe.node")

EPILOG = """examples:
  dmoe node --experts 'ffn.[0:4].[0:8]' --expert-cls ffn --hidden-dim 1024 \\
            --host 0.0.0.0 --announce-host 203.0.113.7 --initial-peers /ip4/.../tcp/.../p2p/... \\
            --checkpoint-dir ckpt --metrics-port 9100
  dmoe node --experts auto --capacity 4 --hidden-dim 1024 --initial-peers /ip4/.../tcp/.../p2p/...
            # serve the 4 experts the swarm needs most, with their trained state from live holders
"""


def _expert_pattern(text: str) -> list[str]:
    if text.strip() == AUTO:
        return [AUTO]
    try:
        return parse_expert_pattern(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """Flags derived from ``NodeConfig`` and its parts (``dmoe.config.node``): each default lives there."""
    p = make_parser("dmoe node", "Serve experts over gRPC and announce them in the DHT.", EPILOG)
    groups = add_options(p, NodeConfig, parse={"experts": _expert_pattern})
    add_options(p, BatchingOptions, groups=groups)
    add_options(p, OptimizerOptions, groups=groups)
    add_options(p, ReachabilityOptions, groups=groups)
    add_options(p, RelayOptions, groups=groups)
    add_options(p, MembershipOptions, groups=groups)
    return p


def _check_maddrs(flag: str, values: list[str] | None) -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for value in values or []:
        try:
            Multiaddr(value)
        except Exception as e:
            raise ConfigError(f"{flag}: {value!r} is not a multiaddr ({e})") from None


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    from dmoe.experts import load_expert_class

    load_expert_class(args.expert_cls)  # fail fast with a one-line reason
    for flag in ("initial_peers", "dht_host_maddrs", "dht_announce_maddrs"):
        _check_maddrs("--" + flag.replace("_", "-"), getattr(args, flag))
    reachability = options_from(ReachabilityOptions, args)
    for flag, values in (("--relays", reachability.relays), ("--tunnel-to", [reachability.tunnel_to or "h:1"])):
        for value in values:
            try:
                split_host_port(value)
            except ValueError as e:
                raise ConfigError(f"{flag}: {e}") from None
    if args.authority:
        import multihash
        from hivemind.p2p import PeerID

        try:
            multihash.decode(PeerID.from_base58(args.authority).to_bytes())
        except (ValueError, TypeError, multihash.MultihashError):
            raise ConfigError(f"--authority: {args.authority[:60]!r} is not a peer id (copy \"peer_id\" from the "
                              "coordinator's dmoe-ready line)") from None
    if args.authority and not args.member_key:
        raise ConfigError("--authority (a closed swarm) needs --member-key with --token-url or --token: its members "
                          "use only experts of nodes that are members too")
    if args.grid:
        try:
            parse_expert_pattern(args.grid)
        except ConfigError as e:
            raise ConfigError(f"--grid: {e}") from None
    if args.capacity is not None and args.experts != [AUTO] and args.capacity < len(args.experts):
        raise ConfigError(f"--capacity {args.capacity} is less than the {len(args.experts)} experts of --experts")
    if args.relay and reachability.reachability == "relay":
        raise ConfigError("--relay needs a node others can dial; it cannot be combined with --reachability relay")
    return options_from(NodeConfig, args, batching=options_from(BatchingOptions, args),
                        optimizer=options_from(OptimizerOptions, args), reachability=reachability,
                        membership=options_from(MembershipOptions, args),
                        relay_limits=options_from(RelayOptions, args))


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
    # a signal during start-up (joining may retry for --join-timeout) stops the start, not only what follows it
    starting = asyncio.ensure_future(node.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            log.info("stopped while starting")
        ready = await starting
    except asyncio.CancelledError:
        await node.shutdown(save=False)
        return 0
    except BaseException:
        await node.shutdown(save=False)  # never shadow a good checkpoint with unsaved seed weights
        raise
    finally:
        stopping.cancel()
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
        log.error("node failed: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        print(f"dmoe node: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    if fast_exit:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
