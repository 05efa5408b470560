"""The config tree: every option of every dmoe process, defined once, with its documentation.

Each concern is a small dataclass whose fields carry their default and, right under them, a
docstring (unit included). The command lines are derived from these (``dmoe.config.flags``),
and so are environment variables (``DMOE_<FLAG>``), ``--config`` files (``flag = value``
lines) and the defaults of simulation scenarios (``dmoe.sim.scenario``). Where a scenario or the
demo deliberately differs from a default, its TOML file says so and why.

=====================  ==========================================================================
``client``             ``MoEOptions`` (the gating layer's calls), ``HealthOptions`` (latency, stuck
                       rule, bans, probes), ``HedgeOptions``, ``LookupOptions`` (DHT cache),
                       ``SwarmOptions``
``node``               ``NodeConfig`` (``dmoe node``), ``BatchingOptions``, ``OptimizerOptions``
``train``              ``ModelConfig``, ``TrainOptions``, ``DataOptions``, ``TrainSwarmOptions``,
                       ``CollabOptions`` (``dmoe train``)
``coordinator``        ``CoordinatorOptions`` (``dmoe coordinator``)
``relay``              ``RelayOptions`` (what a relay carries), ``ReachabilityOptions`` (direct or relayed)
``membership``         ``MembershipOptions`` (a closed swarm's member key and token)
``sim``                ``SimulationOptions`` (``dmoe simulate``), ``ChaosOptions`` (``dmoe chaos``)
=====================  ==========================================================================

This package is the base of every plane: it imports nothing of dmoe but ``dmoe.errors``.
"""

from __future__ import annotations

from dmoe.config.client import COMPRESSIONS, HealthOptions, HedgeOptions, LookupOptions, MoEOptions, SwarmOptions
from dmoe.config.coordinator import CoordinatorOptions
from dmoe.config.flags import (
    add_options,
    default_of,
    fail,
    make_parser,
    non_negative_float,
    non_negative_int,
    option,
    options_from,
    port_number,
    positive_float,
    positive_int,
    setup_logging,
)
from dmoe.config.node import BatchingOptions, NodeConfig, OptimizerOptions
from dmoe.config.sim import ChaosOptions, SimulationOptions
from dmoe.config.train import CollabOptions, DataOptions, ModelConfig, TrainOptions, TrainSwarmOptions

__all__ = [
    "COMPRESSIONS",
    "BatchingOptions",
    "ChaosOptions",
    "CollabOptions",
    "CoordinatorOptions",
    "DataOptions",
    "HealthOptions",
    "HedgeOptions",
    "LookupOptions",
    "ModelConfig",
    "MoEOptions",
    "NodeConfig",
    "OptimizerOptions",
    "SimulationOptions",
    "SwarmOptions",
    "TrainOptions",
    "TrainSwarmOptions",
    "add_options",
    "default_of",
    "fail",
    "make_parser",
    "non_negative_float",
    "non_negative_int",
    "option",
    "options_from",
    "port_number",
    "positive_float",
    "positive_int",
    "setup_logging",
]
