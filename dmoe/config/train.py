"""Trainer options: the model, the training loop, its data, how it joins a swarm, and collaboration.

``dmoe train``'s flags are derived from these dataclasses plus ``MoEOptions`` (the gating
layer's calls); ``dmoe.train`` takes them as they are.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass
from typing import Any

from dmoe.config.flags import (
    default_of,
    non_negative_float,
    option,
    port_number,
    positive_float,
    positive_int,
)
from dmoe.config.node import OptimizerOptions

BYTE_VOCAB = 256  # the model reads raw bytes


def grid_size(text: str) -> tuple[int, ...]:
    """``'4x4'`` or ``'4,4'`` -> ``(4, 4)``."""
    parts = [p for p in re.split(r"[x,]", text.strip()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid size must look like 4x4 or 4,4, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"grid size must be positive integers like 4x4, got {text!r}")
    return dims


@dataclass
class ModelConfig:
    """model"""

    vocab_size: int = option(BYTE_VOCAB, cli=False)
    """input and output vocabulary (bytes)"""
    block_size: int = option(128, parse=positive_int)
    """context length, bytes"""
    n_layer: int = option(2, parse=positive_int)
    """transformer blocks (one MoE layer each)"""
    n_head: int = option(4, parse=positive_int)
    """attention heads"""
    n_embd: int = option(128, parse=positive_int, flag="--hidden-dim", metavar="HIDDEN_DIM")
    """hidden size; experts must match it"""
    grid_size: tuple[int, ...] = option((4, 4), parse=grid_size, metavar="AxB")
    """expert grid per layer, e.g. 4x4"""
    k_best: int = option(2, parse=positive_int)
    """experts per token"""
    uid_prefix: str = option("layer{layer}.ffn")
    """expert uid prefix per block ({layer} = index)"""
    expert_cls: str = option("ffn")
    """expert class the nodes must serve (ffn: residual FFN)"""
    dropout: float = option(0.0, cli=False)
    """dropout of the attention and local layers"""

    def __post_init__(self) -> None:
        self.grid_size = tuple(int(g) for g in self.grid_size)
        if self.n_embd % self.n_head:
            raise ValueError(f"hidden size {self.n_embd} is not divisible by {self.n_head} heads")

    def prefix(self, layer: int) -> str:
        return self.uid_prefix.format(layer=layer)

    @property
    def prefixes(self) -> list[str]:
        return [self.prefix(i) for i in range(self.n_layer)]

    def shape_dict(self) -> dict[str, Any]:
        """What must match for a checkpoint to load into this model."""
        d = asdict(self)
        d.pop("dropout")
        d["grid_size"] = list(self.grid_size)
        return d


@dataclass
class TrainOptions:
    """training"""

    steps: int = option(500, parse=positive_int)
    """optimizer steps to reach (with --run-id: collaborative steps of --target-batch-size)"""
    batch_size: int = option(16, parse=positive_int)
    """sequences per batch"""
    micro_batches: int = option(1, parse=positive_int)
    """pieces of each batch in flight at once, on threads of their own, so one piece's wait for its experts
    overlaps another's compute (dmoe.train.pipeline); the update is still the whole batch's gradient"""
    lr: float = option(1e-3, parse=positive_float)
    """AdamW learning rate of local parameters"""
    weight_decay: float = option(0.0, parse=non_negative_float)
    """AdamW weight decay"""
    aux_loss_weight: float = option(0.01, parse=non_negative_float)
    """weight of the load-balancing loss added to the LM loss"""
    clip_grad_norm: float = option(1.0, parse=non_negative_float)
    """max L2 norm of the local parameters' gradient; 0 disables"""
    expert_lr: float = option(default_of(OptimizerOptions, "lr"), parse=positive_float)
    """Adam learning rate of in-process experts (--local-experts; nodes use their own --lr)"""
    expert_clip_grad_norm: float = option(default_of(OptimizerOptions, "clip_grad_norm"), parse=non_negative_float)
    """per-expert gradient clipping of in-process experts (nodes use their own --clip-grad-norm)"""
    seed: int = option(0, parse=int)
    """seed of local weights and data order; the printed node command uses it for experts"""
    device: str | None = option(None)
    """torch device; default: cuda when available, else cpu"""
    torch_threads: int = option(0, parse=int)
    """CPU threads for torch ops; 0 keeps torch's default (1 is faster for small models on a machine shared with
    nodes)"""

    eval_every: int = option(50, parse=int, group="data and evaluation")
    """steps between validation evaluations; 0 disables"""
    eval_batches: int = option(8, parse=positive_int, group="data and evaluation")
    """validation batches per evaluation"""

    log_file: str | None = option(None, group="output")
    """JSON-lines metrics log: one record per batch, plus evals"""
    checkpoint_dir: str | None = option(None, group="output")
    """save and resume local parameters here; none disables"""
    checkpoint_interval: float = option(120.0, parse=positive_float, group="output")
    """seconds between checkpoints (one is also saved on exit)"""
    metrics_port: int | None = option(None, parse=port_number, group="output")
    """serve Prometheus /metrics on this port (0 picks one); none disables"""
    progress: bool = option(True, flag="--no-progress", group="output")
    """no progress bar"""

    skip_pause: float = option(0.25, cli=False)
    """seconds to pause after the first skipped batch (not enough experts), doubling per consecutive skip"""
    max_skip_pause: float = option(4.0, cli=False)
    """cap of that pause, seconds"""
    extra_log_fields: dict[str, Any] = option(factory=dict, cli=False)
    """fields added to every log record (the run id of collaborative runs)"""


@dataclass(frozen=True)
class DataOptions:
    """data and evaluation"""

    data: str | None = option(None)
    """text file or folder of text files; default: this Python's standard library sources"""
    val_percent: float = option(10.0, parse=positive_float)
    """share of files held out for validation, percent"""
    max_data_mb: float | None = option(None, parse=positive_float)
    """read at most this many MiB of text"""


@dataclass(frozen=True)
class TrainSwarmOptions:
    """swarm"""

    initial_peers: list[str] = option(factory=list, nargs="*")
    """DHT multiaddrs of any swarm member (a node's or coordinator's `dht` address)"""
    local_experts: bool = option(False)
    """run every expert in-process instead (no network; the baseline for comparisons)"""
    startup_timeout: float = option(60.0, parse=positive_float)
    """seconds to wait for experts under every layer prefix before giving up"""
    dht_host_maddrs: list[str] | None = option(None, nargs="*")
    """multiaddrs our DHT listens on (with --run-id); default /ip4/0.0.0.0/tcp/0"""
    print_node_command: bool = option(False)
    """print the `dmoe node` commands that host every expert this model needs, then exit"""
    nodes: int = option(1, parse=positive_int)
    """with --print-node-command: spread the experts over this many node commands"""
    replicas: int = option(1, parse=positive_int)
    """with --print-node-command: how many of those nodes serve each expert (at most --nodes)"""
    auto_placement: bool = option(False)
    """with --print-node-command: print `--experts auto --capacity N` commands, nodes that pick the experts the
    swarm lacks themselves, instead of fixed expert lists"""


@dataclass(frozen=True)
class CollabOptions:
    """several trainers (--run-id)"""

    run_id: str | None = option(None)
    """trainers with the same run id average their local parameters (hivemind.Optimizer)"""
    target_batch_size: int = option(256, parse=positive_int)
    """sequences all trainers together process per collaborative step"""
    matchmaking_time: float = option(3.0, parse=positive_float)
    """seconds to wait for peers before an averaging round"""
    averaging_timeout: float = option(30.0, parse=positive_float)
    """seconds an averaging round may take"""
    average_state_every: int = option(1, parse=positive_int)
    """collaborative steps between parameter-averaging rounds"""
    final_sync_timeout: float | None = option(None, parse=non_negative_float)
    """seconds the trainers that reach --steps may wait for each other to end with identical parameters;
    default 3 x --averaging-timeout + 15 (a trainer alone in its run does not wait)"""
    load_state_timeout: float = option(60.0, cli=False)
    """seconds to download state from a peer"""
    join_timeout: float = option(10.0, cli=False)
    """seconds to wait for the swarm's progress before deciding to download"""
    poll_interval: float = option(0.5, cli=False)
    """seconds between DHT reads while agreeing"""

    @property
    def final_sync_budget(self) -> float:
        """How long the trainers of a run may take to agree at the last epoch.

        A trainer one epoch behind may still have to wait for hivemind's pending background state
        round, run its last gradient round and wait for its last state round, each bounded by
        ``averaging_timeout``; hence three of those plus time to notice the run's new epoch.
        """
        if self.final_sync_timeout is not None:
            return self.final_sync_timeout
        return 3 * self.averaging_timeout + 15.0
