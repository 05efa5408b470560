"""A scenario's swarm as processes: which experts each node serves, and the flags of each role.

A scenario (``dmoe.sim.scenario``) says how many nodes there are, the trainer's model (layers,
expert grid, hidden size) and how many replicas each expert has. ``dmoe simulate``, the container
entrypoint and the chaos service all derive the layout from it here, independently and
identically, so nothing has to be passed between containers: node ``i`` knows its experts from
``i`` alone, and chaos records the same layout in ``run.json`` for the report.

Placement is ``dmoe.dht.placement.place_experts`` (the rule ``dmoe train --print-node-command``
uses too). Extra nodes beyond ``N`` (``docker compose up --scale node=M`` with ``M > N``) take the
slot ``index mod N``: more replicas.
"""

from __future__ import annotations

import math
import random

from dmoe.config import default_of
from dmoe.config.train import ModelConfig
from dmoe.dht.placement import grid_uids, place_experts
from dmoe.sim.churn import ChurnModel
from dmoe.sim.links import LinkModel
from dmoe.sim.scenario import Scenario, SwarmSpec

UID_PREFIX_TEMPLATE = default_of(ModelConfig, "uid_prefix")  # the trainer's uid prefixes, one per layer


def layer_prefixes(swarm: SwarmSpec) -> list[str]:
    return [UID_PREFIX_TEMPLATE.format(layer=layer) for layer in range(swarm.layers)]


def layer_uids(swarm: SwarmSpec, layer: int) -> list[str]:
    return grid_uids(UID_PREFIX_TEMPLATE.format(layer=layer), swarm.grid)


def node_experts(swarm: SwarmSpec, index: int, nodes: int | None = None) -> list[str]:
    """Uids node ``index`` serves when the swarm has ``nodes`` placement slots (default: swarm.nodes); none for a
    late node (it places itself)."""
    if is_late(swarm, index, nodes):
        return []
    n = nodes or swarm.nodes
    return place_experts(layer_prefixes(swarm), swarm.grid, nodes=n, replicas=min(swarm.replicas, n))[index % n]


def is_late(swarm: SwarmSpec, index: int, nodes: int | None = None) -> bool:
    """Node ``index`` is one of the scenario's late volunteers (``--experts auto``, started by a join event)."""
    return nodes is None and swarm.nodes <= index < swarm.total_nodes


def node_capacity(swarm: SwarmSpec) -> int:
    """``--capacity`` of every node: the scenario's, else the largest placement (a late node then fills one slot)."""
    if swarm.capacity is not None:
        return swarm.capacity
    return max(len(uids) for uids in place_experts(layer_prefixes(swarm), swarm.grid, nodes=swarm.nodes,
                                                   replicas=min(swarm.replicas, swarm.nodes)))

def node_link(scenario: Scenario, index: int) -> LinkModel:
    """The link drawn for node ``index`` (the same draw ``dmoe simulate`` makes; slots wrap like experts)."""
    model = ChurnModel(scenario)
    links = model.draw_links(random.Random(model.seed))  # the first draws of ChurnModel.timeline()
    return links[index % len(links)]


def behind_nat(scenario: Scenario, index: int, nodes: int | None = None) -> bool:
    """Whether node ``index`` sits behind NAT: ``round(nat_share x nodes)`` slots drawn from the seed (slots wrap)."""
    n = nodes or scenario.swarm.nodes
    slots = list(range(n))
    random.Random(f"nat:{scenario.seed}").shuffle(slots)
    return index % n in set(slots[:round(scenario.swarm.nat_share * n)])


def reachability_args(scenario: Scenario, index: int, *, link_address: str, nodes: int | None = None) -> list[str]:
    """How node ``index`` is reached. A node behind NAT announces nothing of its own: it serves through a relay,
    whose connections are handed to its link (``--tunnel-to``), so relayed traffic crosses the home link too. The
    others are dialable by construction (their link listens on loopback), so they skip the dial-back check."""
    if behind_nat(scenario, index, nodes):
        return ["--reachability", "relay", "--tunnel-to", link_address]
    return ["--reachability", "direct"]


def node_args(scenario: Scenario, index: int, nodes: int | None = None) -> list[str]:
    """``dmoe node`` flags that follow from the scenario (network flags are the launcher's business)."""
    swarm, spec = scenario.swarm, scenario.node
    if is_late(swarm, index, nodes):
        experts = ["--experts", "auto", "--capacity", str(node_capacity(swarm)), "--replicas", str(swarm.replicas)]
    else:
        experts = ["--experts", ",".join(node_experts(swarm, index, nodes)), "--replicas", str(swarm.replicas),
                   *(["--capacity", str(swarm.capacity)] if swarm.capacity is not None else [])]
    return [*experts, "--expert-cls", swarm.expert_cls,
            "--hidden-dim", str(swarm.hidden_dim), "--seed", str(scenario.seed),
            "--announce-ttl", f"{spec.announce_ttl_s:g}", "--checkpoint-interval", f"{spec.checkpoint_interval_s:g}",
            *spec.extra_args]


def trainer_args(scenario: Scenario, index: int = 0) -> list[str]:
    """``dmoe train`` flags of trainer ``index`` that follow from the scenario (peers, logs and checkpoints are
    the launcher's). Several trainers train one model together (``--run-id``), each with its own seed."""
    swarm, spec = scenario.swarm, scenario.trainer
    steps = spec.steps if spec.steps is not None else 10**9  # "until the scenario ends": the launcher stops it
    args = ["--n-layer", str(swarm.layers), "--grid-size", "x".join(map(str, swarm.grid)),
            "--hidden-dim", str(swarm.hidden_dim), "--expert-cls", swarm.expert_cls,
            "--uid-prefix", UID_PREFIX_TEMPLATE, "--n-head", str(spec.n_head),
            "--k-best", str(spec.k_best), "--k-min", str(spec.k_min), "--lr", f"{spec.lr:g}",
            "--batch-size", str(spec.batch_size), "--micro-batches", str(spec.micro_batches),
            "--block-size", str(spec.block_size),
            "--eval-every", str(spec.eval_every), "--eval-batches", str(spec.eval_batches),
            "--forward-timeout", f"{spec.forward_timeout_s:g}", "--backward-timeout", f"{spec.backward_timeout_s:g}",
            "--timeout-after-k-min", f"{spec.timeout_after_k_min_s:g}", "--compression", spec.compression,
            "--steps", str(steps), "--seed", str(scenario.seed + index)]
    if spec.max_data_mb is not None:
        args += ["--max-data-mb", f"{spec.max_data_mb:g}"]
    if swarm.trainers > 1:
        target = spec.target_batch_size or spec.batch_size * swarm.trainers
        args += ["--run-id", scenario.name, "--target-batch-size", str(target)]
    return [*args, *spec.extra_args]


def experts_per_layer(swarm: SwarmSpec) -> int:
    return math.prod(swarm.grid)
