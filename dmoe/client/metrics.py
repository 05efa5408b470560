"""Prometheus metrics of the client side (remote experts, gating layers, expert lookups).

Registered once per process in prometheus-client's default registry, so a trainer that serves
``/metrics`` (``prometheus_client.start_http_server``) exposes them with no extra wiring. Every
``Swarm`` in the process feeds the same series; per-swarm and per-layer numbers for programs are
in ``Swarm.stats`` / ``RemoteMixtureOfExperts.stats``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CALLS = Counter("dmoe_client_calls_total", "Expert calls attempted (one per endpoint attempt)", ["method"])
FAILURES = Counter(
    "dmoe_client_call_failures_total",
    "Expert calls that gave no usable answer, by failure kind (deadline, unreachable, rejected, bad_answer, stuck)",
    ["method", "kind"],
)
LATE = Counter(
    "dmoe_client_late_calls_total", "Calls cancelled because every token already had enough answers", ["method"]
)
RETRIES = Counter("dmoe_client_retries_total", "Calls retried on another replica of the same expert", ["method"])
BANS = Counter("dmoe_client_bans_total", "Endpoints banned after a failure")
HEDGES = Counter(
    "dmoe_client_hedges_total", "Hedged calls: second requests sent to another replica (sent), and those that won",
    ["method", "outcome"],
)
PROBES = Counter("dmoe_client_probes_total", "Pings to banned endpoints (sent) and bans they lifted (recovered)",
                 ["outcome"])
CALL_SECONDS = Histogram(
    "dmoe_client_call_seconds", "Latency of successful expert calls, seconds", ["method"], buckets=_LATENCY_BUCKETS
)
LOOKUPS = Counter("dmoe_client_dht_lookups_total", "DHT prefix keys fetched (cache misses)")
LOOKUP_SECONDS = Histogram(
    "dmoe_client_dht_lookup_seconds", "Duration of one batched DHT prefix lookup, seconds", buckets=_LATENCY_BUCKETS
)
LOOKUP_FAILURES = Counter("dmoe_client_dht_lookup_failures_total", "Batched DHT lookups that failed or timed out")
SEARCH_SECONDS = Histogram(
    "dmoe_client_beam_search_seconds", "Duration of one batch-wide beam search, seconds", buckets=_LATENCY_BUCKETS
)
NOT_ENOUGH = Counter(
    "dmoe_client_not_enough_experts_total", "Samples left with fewer than k_min answers", ["method"]
)
