"""Node options: what a volunteer's ``dmoe node`` serves, how it batches, trains and checkpoints.

``NodeConfig`` is what ``dmoe node``'s flags build (``dmoe.node.cli``) and what ``ExpertNode``
runs; its ``batching`` and ``optimizer`` parts are their own small dataclasses because the batch
scheduler and the expert backends take them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmoe.config.flags import non_negative_float, option, port_number, positive_float, positive_int
from dmoe.config.membership import MembershipOptions
from dmoe.config.relay import ReachabilityOptions, RelayOptions

OPTIMIZERS = ("adam", "sgd")
AUTO = "auto"  # --experts auto: the node picks what the swarm needs (dmoe.node.keeper)
AUTO_CAPACITY = 4  # experts an --experts auto node serves unless --capacity says otherwise
TLS_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class BatchingOptions:
    """batching and limits"""

    max_batch_size: int = option(1024, parse=positive_int)
    """rows (dim 0) per merged batch"""
    max_batch_delay_ms: float = option(0.0, parse=non_negative_float)
    """ms an idle worker may wait for a partial batch to fill; 0 starts at once"""
    max_queued_rows: int = option(16384, parse=positive_int)
    """rows that may wait in the queues before new requests get RESOURCE_EXHAUSTED"""
    num_workers: int = option(1, parse=positive_int)
    """compute threads"""
    activation_cache_mb: float = option(256.0, parse=non_negative_float)
    """MiB of forward activations kept for the matching backward (no recompute); 0 always recomputes"""
    activation_cache_s: float = option(30.0, parse=positive_float)
    """seconds a kept forward waits for its backward before it is dropped (the backward then recomputes)"""


@dataclass(frozen=True)
class OptimizerOptions:
    """training"""

    optimizer: str = option("adam", choices=OPTIMIZERS)
    """optimizer of every expert"""
    lr: float = option(1e-3, parse=positive_float)
    """learning rate of every expert"""
    clip_grad_norm: float = option(1.0, parse=non_negative_float)
    """max L2 norm of each expert's parameter gradient per step; 0 disables"""


@dataclass
class NodeConfig:
    """experts"""

    experts: list[str] = option(metavar="PATTERN")
    """uid pattern: PREFIX.[a:b].[c:d] grids (half-open ranges) and/or comma-separated uids; or "auto": serve the
    experts the swarm needs most (fewest live holders first, then the most requested), see --capacity"""
    expert_cls: str = option("ffn")
    """ffn, transformer, or package.module:Class"""
    hidden_dim: int = option(1024, parse=positive_int)
    """hidden size of every expert"""
    seed: int = option(0, parse=int)
    """initial weights of expert U come from seed (SEED, U)"""
    device: str | None = option(None)
    """torch device; default: cuda when available, else cpu"""

    host: str = option("0.0.0.0", group="network")
    """address the gRPC server binds"""
    port: int = option(0, parse=port_number, group="network")
    """gRPC port; 0 picks a free one"""
    announce_host: str | None = option(None, group="network")
    """host announced in the DHT; default: --host, or this machine's outbound address when binding 0.0.0.0"""
    announce_port: int | None = option(None, parse=port_number, group="network")
    """port announced in the DHT (e.g. a proxy in front of the node); default: the bound port"""
    tls: str = option("auto", choices=TLS_MODES, group="network")
    """TLS with a certificate of the key that signs this node's DHT records, so clients verify the endpoint is
    this node's: auto = on unless the node binds a loopback address (a local run); off = plaintext (loopback runs
    or trusted networks only)"""
    initial_peers: list[str] = option(factory=list, nargs="*", group="network")
    """multiaddrs of peers in the swarm to join; none starts a new swarm"""
    join_timeout: float = option(60.0, parse=positive_float, group="network")
    """seconds to keep retrying the initial peers (with backoff) before giving up with an error"""
    dht_host_maddrs: list[str] | None = option(None, nargs="*", group="network")
    """multiaddrs the DHT listens on; default /ip4/<host>/tcp/0"""
    dht_announce_maddrs: list[str] | None = option(None, nargs="*", group="network")
    """multiaddrs the DHT tells peers to use"""
    announce_ttl: float = option(30.0, parse=positive_float, group="network")
    """expiration of DHT records, seconds (refreshed every ttl/3)"""

    max_request_mb: float = option(64.0, parse=positive_float, group="batching and limits")
    """largest request tensor payload, MiB (bigger ones get RESOURCE_EXHAUSTED)"""
    max_calls: int = option(1024, parse=positive_int, group="batching and limits")
    """expert calls (Forward/Backward, unary or streamed) the node works on at once, from everyone; more get
    RESOURCE_EXHAUSTED at once"""
    max_calls_per_peer: int = option(256, parse=positive_int, group="batching and limits")
    """expert calls one peer address may have in flight at once, so no single peer can take the node"""

    backward_rate: float = option(500.0, parse=non_negative_float, group="batching and limits")
    """open swarm: Backward calls per second one peer address may make (bursts of 2 s worth); more get
    RESOURCE_EXHAUSTED; 0 disables. A trainer sends one per chosen expert on this node and layer per step, so
    even a fast one stays well below it (several trainers behind one home router share it)"""
    grad_norm_band: float = option(100.0, parse=non_negative_float, group="batching and limits")
    """open swarm: refuse a Backward whose output-gradient RMS is more than this many times above the expert's
    running level (INVALID_ARGUMENT, counted in dmoe_node_rejections{reason="grad_norm"}); far smaller ones are
    harmless and pass; 0 disables"""

    checkpoint_dir: str | None = option(None, group="checkpoints and metrics")
    """directory for checkpoints; none disables them"""
    checkpoint_interval: float = option(120.0, parse=positive_float, group="checkpoints and metrics")
    """seconds between checkpoints (only saved when weights changed); at most this much training is lost in a
    crash"""
    checkpoint_keep: int = option(3, parse=positive_int, group="checkpoints and metrics")
    """newest checkpoints kept"""
    metrics_port: int | None = option(None, parse=port_number, group="checkpoints and metrics")
    """serve Prometheus /metrics on this port (0 picks one); none disables"""
    shutdown_grace: float = option(10.0, parse=positive_float, group="checkpoints and metrics")
    """seconds in-flight requests get to finish on SIGTERM before the final checkpoint"""

    capacity: int | None = option(None, parse=positive_int, group="replicas and placement")
    """experts this node may serve; spare room adopts experts with fewer than --replicas live holders and takes
    over experts of leaving holders. Default: the number of --experts, or 4 with --experts auto"""
    replicas: int = option(2, parse=positive_int, group="replicas and placement")
    """live holders the swarm should keep of every expert (adoption fills up to it where capacity allows)"""
    sync_interval: float = option(60.0, parse=non_negative_float, group="replicas and placement")
    """seconds between replica syncs: holders of one expert average its weights and optimizer state; 0 disables"""
    placement_interval: float = option(60.0, parse=positive_float, group="replicas and placement")
    """seconds between checks for under-replicated experts to adopt (--experts auto nodes also move at most one
    expert per check, from one with more than --replicas holders to one with fewer)"""
    grid: str | None = option(None, metavar="PATTERN", group="replicas and placement")
    """the experts an --experts auto node chooses from, e.g. 'ffn.[0:4].[0:4]'; default: the grids the swarm's
    trainers publish in the DHT (those matching --expert-cls and --hidden-dim)"""
    state_transfer: bool = option(True, flag="--no-state-transfer", group="replicas and placement")
    """never take experts' state from live holders (at start, on adoption) nor hand it off on leaving: every expert
    starts from its checkpoint or initial weights, as before replicas shared state (for comparisons)"""
    handoff_timeout: float = option(20.0, parse=positive_float, group="replicas and placement")
    """on SIGTERM, seconds to find another node for experts this node is the last holder of, before withdrawing"""

    authority: str | None = option(None, metavar="PEER_ID", group="membership")
    """closed swarm: peer id of its authority (the coordinator's "peer_id" in its dmoe-ready line); only members
    holding a token it signed may train this node's experts (Backward), and the node needs a token itself
    (--member-key with --token-url or --token) for clients to use it. None: an open swarm"""
    members_only_forward: bool = option(False, group="membership")
    """in a closed swarm, require membership for Forward too (not only Backward)"""

    relay: bool = option(False, group="relay")
    """also relay for nodes that cannot be dialed (this node must be reachable itself)"""
    relay_port: int = option(0, parse=port_number, group="relay")
    """port of this node's relay (with --relay); 0 picks a free one"""

    batching: BatchingOptions = option(factory=BatchingOptions, cli=False)
    optimizer: OptimizerOptions = option(factory=OptimizerOptions, cli=False)
    membership: MembershipOptions = option(factory=MembershipOptions, cli=False)
    reachability: ReachabilityOptions = option(factory=ReachabilityOptions, cli=False)
    relay_limits: RelayOptions = option(factory=RelayOptions, cli=False)

    @property
    def uses_tls(self) -> bool:
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        return self.tls == "on" or (self.tls == "auto" and not loopback)

    @property
    def auto(self) -> bool:
        return self.experts == [AUTO]

    @property
    def max_experts(self) -> int:
        """How many experts this node may serve (``--capacity`` or its default)."""
        if self.capacity is not None:
            return self.capacity
        return AUTO_CAPACITY if self.auto else len(self.experts)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)
