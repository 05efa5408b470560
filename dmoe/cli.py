"""The ``dmoe`` console entry point: dispatches to subcommands, each with its own ``--help``.

The library never imports ``dmoe.node`` or ``dmoe.coordinator``; only this dispatcher does, and
only the subcommand being run is imported.
"""

from __future__ import annotations

import importlib
import os
import sys

from dmoe.errors import DmoeError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "node": ("dmoe.node.cli", "serve experts over gRPC and announce them in the DHT"),
    "train": ("dmoe.train.cli", "join a swarm and train a language model through remote experts"),
    "coordinator": ("dmoe.coordinator.cli", "stable bootstrap peer and live view of a swarm"),
    "simulate": ("dmoe.sim.cli", "run a swarm under churn and home links, write a report"),
    "model": ("dmoe.sim.model.cli", "model a swarm of thousands of nodes on a virtual clock (dmoe's own policies)"),
    "chaos": ("dmoe.sim.chaos_cli", "inject churn into a docker-compose swarm through the Docker API"),
    "member": ("dmoe.member_cli", "keys and tokens of a closed swarm (only members train experts)"),
}

USAGE = "usage: dmoe {" + ",".join(SUBCOMMANDS) + "} [--help] ...\n\n" + "\n".join(
    f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("dmoe: decentralized Mixture-of-Experts training on volunteer computers\n\n" + USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dmoe: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # idle OpenMP threads spin by default; on a 2-core volunteer box that steals the CPU the event
    # loop and the other process need (measured: 5x lower node throughput under load)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except DmoeError as e:
        print(f"dmoe {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
