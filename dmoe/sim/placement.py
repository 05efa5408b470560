"""Which experts each node of a scenario serves, and the ``dmoe`` flags of each role.

A scenario (``dmoe.sim.scenario``) says how many nodes there are, the trainer's model (layers, expert
grid, hidden size) and how many replicas each expert has. The container entrypoint and the chaos
service both derive the layout from it, independently and identically, so nothing has to be
passed between containers: node ``i`` knows its experts from ``i`` alone, and chaos records the
same layout in ``run.json`` for the report.

Placement: the experts of each layer are numbered in grid order; expert ``j`` lives on nodes
``(j + r) mod N`` for ``r < replicas``. Every node gets about the same share of every layer, and
with ``replicas = 1`` a node's crash removes exactly its own experts. Extra nodes beyond ``N``
(``docker compose up --scale node=M`` with ``M > N``) take the slot ``index mod N``: more replicas.
"""

from __future__ import annotations

import itertools
import math
import random

from dmoe.dht.uids import make_uid
from dmoe.sim.churn import ChurnModel
from dmoe.sim.links import LinkModel
from dmoe.sim.scenario import Scenario, SwarmSpec

UID_PREFIX_TEMPLATE = "layer{layer}.ffn"  # the trainer's default --uid-prefix


def layer_uids(swarm: SwarmSpec, layer: int) -> list[str]:
    prefix = UID_PREFIX_TEMPLATE.format(layer=layer)
    return [make_uid(prefix, coords) for coords in itertools.product(*(range(g) for g in swarm.grid))]


def node_experts(swarm: SwarmSpec, index: int, nodes: int | None = None) -> list[str]:
    """Uids node ``index`` serves when the swarm has ``nodes`` placement slots (default: swarm.nodes)."""
    n = nodes or swarm.nodes
    slot = index % n
    replicas = min(swarm.replicas, n)
    return [uid for layer in range(swarm.layers) for j, uid in enumerate(layer_uids(swarm, layer))
            if any((j + r) % n == slot for r in range(replicas))]


def node_link(scenario: Scenario, index: int) -> LinkModel:
    """The link drawn for node ``index`` (the same draw ``dmoe simulate`` makes; slots wrap like experts)."""
    model = ChurnModel(scenario)
    links = model.draw_links(random.Random(model.seed))  # the first draws of ChurnModel.timeline()
    return links[index % len(links)]


def node_args(scenario: Scenario, index: int, nodes: int | None = None) -> list[str]:
    """``dmoe node`` flags that follow from the scenario (network flags are the launcher's business)."""
    swarm, spec = scenario.swarm, scenario.node
    return ["--experts", ",".join(node_experts(swarm, index, nodes)), "--expert-cls", swarm.expert_cls,
            "--hidden-dim", str(swarm.hidden_dim), "--seed", str(scenario.seed),
            "--announce-ttl", f"{spec.announce_ttl_s:g}", "--checkpoint-interval", f"{spec.checkpoint_interval_s:g}",
            *spec.extra_args]


def trainer_args(scenario: Scenario) -> list[str]:
    """``dmoe train`` flags that follow from the scenario (peers and log file are the launcher's)."""
    swarm, spec = scenario.swarm, scenario.trainer
    steps = spec.steps if spec.steps is not None else 10**9  # "until the scenario ends": the launcher stops it
    args = ["--n-layer", str(swarm.layers), "--grid-size", "x".join(map(str, swarm.grid)),
            "--hidden-dim", str(swarm.hidden_dim), "--expert-cls", swarm.expert_cls,
            "--uid-prefix", UID_PREFIX_TEMPLATE, "--n-head", str(spec.n_head),
            "--k-best", str(spec.k_best), "--k-min", str(spec.k_min), "--lr", f"{spec.lr:g}",
            "--batch-size", str(spec.batch_size), "--block-size", str(spec.block_size),
            "--eval-every", str(spec.eval_every), "--eval-batches", str(spec.eval_batches),
            "--forward-timeout", f"{spec.forward_timeout_s:g}", "--backward-timeout", f"{spec.backward_timeout_s:g}",
            "--timeout-after-k-min", f"{spec.timeout_after_k_min_s:g}", "--compression", spec.compression,
            "--steps", str(steps), "--seed", str(scenario.seed)]
    if spec.max_data_mb is not None:
        args += ["--max-data-mb", f"{spec.max_data_mb:g}"]
    return [*args, *spec.extra_args]


def experts_per_layer(swarm: SwarmSpec) -> int:
    return math.prod(swarm.grid)
