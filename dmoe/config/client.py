"""Client options: how a gating layer calls remote experts, judges peers and caches the DHT.

``MoEOptions`` are the keyword defaults of ``RemoteMixtureOfExperts`` and the "remote experts"
flags of ``dmoe train``; ``HealthOptions`` and ``LookupOptions`` tune a ``Swarm``. The defaults
suit home links (tens of ms away, tens of Mbit/s up); every timeout is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmoe.config.flags import non_negative_int, option, positive_float, positive_int

COMPRESSIONS = ("none", "float16", "bfloat16", "uniform8", "quantile8")


@dataclass(frozen=True)
class MoEOptions:
    """remote experts"""

    k_min: int = option(1, parse=positive_int)
    """fewest expert answers a token may use; fewer raises NotEnoughExperts (or zeros with allow_zero_outputs)"""
    backward_k_min: int = option(0, parse=non_negative_int, metavar="N")
    """fewest backward answers a token needs, else the batch is skipped; 0: an expert whose node failed after
    its forward answer just counts as a constant in that backward"""
    forward_timeout: float = option(10.0, parse=positive_float)
    """seconds a MoE forward (expert search + calls) may take"""
    backward_timeout: float = option(20.0, parse=positive_float)
    """seconds a MoE backward may take"""
    timeout_after_k_min: float = option(1.0, parse=positive_float)
    """seconds to wait for slower experts once every token has k_min answers"""
    search_timeout: float = option(2.0, cli=False)
    """seconds the expert search may take (at most half of forward_timeout)"""
    compression: str = option("none", choices=COMPRESSIONS)
    """how activations and gradients travel: none (float32), float16, bfloat16, or 8 bits with a codebook (uniform8:
    uniform bins over +-3 standard deviations; quantile8: bins at the tensor's quantiles); tensors too small for a
    codebook to pay off travel as float16"""
    allow_zero_outputs: bool = option(False, cli=False)
    """a token with fewer than k_min answers gets a zero output instead of raising NotEnoughExperts"""


@dataclass(frozen=True)
class HealthOptions:
    """How one client judges the endpoints it calls (``dmoe.client.peer_health``)."""

    ban_base: float = option(5.0, cli=False)
    """seconds a first failure bans an endpoint"""
    ban_max: float = option(300.0, cli=False)
    """cap of the doubling ban, seconds"""
    rtt_alpha: float = option(0.3, cli=False)
    """EWMA weight of the newest latency sample (per endpoint and method)"""
    rtt_beta: float = option(0.3, cli=False)
    """EWMA weight of the newest latency deviation (the spread an endpoint's own latency has)"""
    stuck_factor: float = option(2.0, cli=False)
    """a call is suspected stuck when its endpoint made no progress for this many times its own 95th-percentile
    latency (mean + 2 deviations, scaled by the rows the call carries), and never before timeout_after_k_min: its
    tokens stop waiting for it, and a Ping checks the node; only an unanswered Ping makes it a failure"""
    relayed_penalty: float = option(1.5, cli=False)
    """a replica served through a relay counts as this many times slower than its measured latency (which already
    includes the relay's hop), so a direct replica of about the same speed is preferred"""
    probe_interval: float = option(2.0, cli=False)
    """seconds between cheap Ping probes of a banned endpoint (a recovered node comes back at the first answer)"""
    probe_timeout: float = option(1.0, cli=False)
    """seconds a probe waits for its answer (a liveness check waits 4 x the node's latency, within 0.25 s and
    this)"""


@dataclass(frozen=True)
class HedgeOptions:
    """Hedged calls ("The Tail at Scale"): a slow call is also sent to another replica, the first answer wins."""

    enabled: bool = option(True, cli=False)
    """hedge forward calls of replicated experts"""
    budget: float = option(0.1, cli=False)
    """extra calls hedging may add, as a share of all calls (a token bucket refilled by every call)"""
    burst: float = option(4.0, cli=False)
    """hedges that may be spent at once when the bucket is full"""
    min_delay: float = option(0.005, cli=False)
    """seconds: never hedge a call younger than this"""


@dataclass(frozen=True)
class LookupOptions:
    """How a client caches DHT grid records (``dmoe.client.prefix_table``)."""

    cache_ttl: float = option(5.0, cli=False)
    """seconds a fetched prefix record is reused (keep below the nodes' announce TTL)"""
    negative_ttl: float = option(2.0, cli=False)
    """seconds an empty prefix is remembered as empty"""
    lookup_timeout: float = option(10.0, cli=False)
    """hard cap of one DHT lookup, seconds (it finishes in the background)"""
    stale_wait: float = option(0.3, cli=False)
    """seconds a search waits for a refresh when it holds an older, still alive entry"""
    vouch_window: float = option(10.0, cli=False)
    """seconds: an endpoint that answered this recently is alive, record expired or not"""


@dataclass(frozen=True)
class SwarmOptions:
    """A client's handle on the swarm (``dmoe.client.swarm.Swarm``)."""

    max_channels: int = option(256, cli=False)
    """gRPC channels kept open at once; the least recently used are closed past it"""
    start_timeout: float = option(60.0, cli=False)
    """seconds joining the DHT may take"""
    coalesce: bool = option(True, cli=False)
    """send the calls one step makes to the same node together, as one batch RPC (``dmoe.client.coalesce``)"""
