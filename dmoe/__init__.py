"""dmoe: decentralized Mixture-of-Experts training on volunteer computers.

Public client API::

    from dmoe import Swarm, RemoteExpert, RemoteMixtureOfExperts, NotEnoughExperts

    swarm = Swarm(initial_peers=["/ip4/.../p2p/..."])  # or Swarm.from_dht(hivemind_dht)
    moe = RemoteMixtureOfExperts(in_features=256, grid_size=(4, 4), uid_prefix="layer0.ffn", swarm=swarm, k_best=4)
    y = moe(x)  # x: (batch, 256) or (batch, seq, 256)

Imports are lazy so ``import dmoe`` (and ``dmoe node``) does not pull torch/grpc until needed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Before anything of dmoe loads grpc: with gRPC's fork support on (its default), a process that has
# live channels and forks a child with preexec_fn (our launcher; hivemind's p2pd spawn) can see that
# child abort before exec ("epoll_wait error: Bad file descriptor", grpc/grpc#43055, grpcio >= 1.80).
# dmoe never uses gRPC in a forked child, so it needs no fork support. An explicit setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from dmoe.errors import (
    BadAnswer,
    ConfigError,
    DeadlineExceeded,
    DmoeError,
    ExpertCallError,
    NodeUnreachable,
    NotEnoughExperts,
    RequestRejected,
    WireFormatError,
)

if TYPE_CHECKING:
    from dmoe.client.gating import LocalMixtureOfExperts
    from dmoe.client.moe import RemoteMixtureOfExperts
    from dmoe.client.remote_expert import RemoteExpert
    from dmoe.client.swarm import Swarm

_LAZY = {
    "Swarm": "dmoe.client.swarm",
    "RemoteExpert": "dmoe.client.remote_expert",
    "RemoteMixtureOfExperts": "dmoe.client.moe",
    "LocalMixtureOfExperts": "dmoe.client.gating",
}

__all__ = [
    "BadAnswer",
    "ConfigError",
    "DeadlineExceeded",
    "DmoeError",
    "ExpertCallError",
    "LocalMixtureOfExperts",
    "NodeUnreachable",
    "NotEnoughExperts",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RequestRejected",
    "Swarm",
    "WireFormatError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dmoe' has no attribute {name!r}")
