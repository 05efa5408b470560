"""ChurnModel: the timeline is a pure function of scenario + seed, and its statistics are the configured ones.

Fast mode: no processes are launched; the realised periods are read off the timeline itself.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from scipy import stats

from dmoe.sim.churn import ChurnEvent, ChurnModel, node_states, serving_intervals
from dmoe.sim.scenario import scenario_from_dict


def make(churn: dict | None = None, *, nodes: int = 8, duration: float = 600, events: list | None = None,
         links: dict | None = None, seed: int = 0):
    data: dict = {"name": "t", "duration_s": duration, "seed": seed, "swarm": {"nodes": nodes, "replicas": 1}}
    if churn is not None:
        data["churn"] = {"enabled": True, **churn}
    if events:
        data["events"] = events
    if links:
        data["links"] = links
    return scenario_from_dict(data)


HEAVY_TAILED = {"start_after_s": 0, "online": {"dist": "weibull", "shape": 0.6, "scale": 40.0},
                "offline": {"dist": "exponential", "mean": 8.0}}


def test_same_seed_same_timeline_and_different_seed_differs():
    sc = make(HEAVY_TAILED, links={"latency_ms": {"dist": "uniform", "low": 10, "high": 50}})
    a, b = ChurnModel(sc).timeline(), ChurnModel(sc).timeline()
    assert a == b and len(a.events) > 20
    c = ChurnModel(sc, seed=1).timeline()
    assert c.events != a.events and c.links != a.links
    assert [e.t for e in a.events] == sorted(e.t for e in a.events)


def test_online_periods_follow_the_configured_weibull():
    """Kolmogorov-Smirnov: realised online periods ~ Weibull(shape 0.6, scale 40), and not ~ an exponential."""
    tl = ChurnModel(make(HEAVY_TAILED, nodes=40, duration=20_000), seed=7).timeline()
    online = tl.online_periods()
    assert len(online) > 1500
    fit = stats.kstest(online, stats.weibull_min(c=0.6, scale=40.0).cdf)
    assert fit.pvalue > 0.01, fit
    mean = 40.0 * math.gamma(1 + 1 / 0.6)
    wrong = stats.kstest(online, stats.expon(scale=mean).cdf)  # same mean, light tail: must be rejected
    assert wrong.pvalue < 1e-6, wrong
    # the heavy tail is real: many short sessions and a few very long ones
    assert stats.median_abs_deviation(online) < mean and max(online) > 8 * mean


def test_offline_and_freeze_periods_follow_their_distributions():
    churn = {**HEAVY_TAILED, "departure": {"crash": 1, "leave": 1, "freeze": 1},
             "freeze": {"dist": "uniform", "low": 2, "high": 6}}
    tl = ChurnModel(make(churn, nodes=40, duration=20_000), seed=3).timeline()
    down, frozen = tl.periods("down"), tl.periods("frozen")
    assert len(down) > 500 and len(frozen) > 300
    assert stats.kstest(down, stats.expon(scale=8.0).cdf).pvalue > 0.01
    assert stats.kstest(frozen, stats.uniform(loc=2, scale=4).cdf).pvalue > 0.01


def test_departure_mix_and_checkpoint_keeping_match_the_weights():
    churn = {**HEAVY_TAILED, "departure": {"crash": 0.5, "leave": 0.3, "freeze": 0.2}, "keep_checkpoint": 0.25}
    tl = ChurnModel(make(churn, nodes=40, duration=20_000), seed=11).timeline()
    kinds = Counter(e.action for e in tl.events if e.action in ("crash", "leave", "freeze"))
    total = sum(kinds.values())
    observed = [kinds["crash"], kinds["leave"], kinds["freeze"]]
    assert stats.chisquare(observed, [total * 0.5, total * 0.3, total * 0.2]).pvalue > 0.01
    rejoins = [e for e in tl.events if e.action == "rejoin"]
    assert all(e.keep_checkpoint is not None for e in rejoins)
    kept = sum(e.keep_checkpoint for e in rejoins) / len(rejoins)
    assert kept == pytest.approx(0.25, abs=0.04)
    # every departure is matched by its return of the right kind, after the drawn time
    pending: dict[int, ChurnEvent] = {}
    for e in tl.events:
        if e.action in ("crash", "leave", "freeze"):
            assert e.node not in pending
            pending[e.node] = e
        else:
            gone = pending.pop(e.node)
            assert e.action == ("resume" if gone.action == "freeze" else "rejoin")
            assert e.t == pytest.approx(gone.t + gone.duration_s)


def test_no_churn_before_start_and_exempt_nodes_stay_up():
    tl = ChurnModel(make({**HEAVY_TAILED, "start_after_s": 100, "exempt_nodes": [0, 3]}, duration=2000)).timeline()
    assert tl.events and min(e.t for e in tl.events) >= 100
    assert not [e for e in tl.events if e.node in (0, 3)]


def test_scheduled_events_preempt_churn_and_skip_nodes_that_are_down():
    events = [
        {"at_s": 60, "action": "crash", "fraction": 0.5, "duration_s": 30, "keep_checkpoint": False},
        {"at_s": 61, "action": "leave", "nodes": "all", "duration_s": 10},
        {"at_s": 90, "action": "partition", "nodes": [3], "duration_s": 20, "mode": "refuse"},
        {"at_s": 100, "action": "link", "nodes": [1], "up_mbit": 1.5, "latency_ms": 300, "duration_s": 50},
        {"at_s": 120, "action": "freeze", "count": 2, "duration_s": 5},
    ]
    sc = make(None, nodes=6, duration=200, events=events, links={"up_mbit": 30, "latency_ms": 20})
    tl = ChurnModel(sc, seed=5).timeline()
    crashed = [e.node for e in tl.events if e.action == "crash"]
    assert len(crashed) == 3 and len(set(crashed)) == 3
    assert all(e.t == 60 for e in tl.events if e.action == "crash")
    left = [e.node for e in tl.events if e.action == "leave"]
    assert sorted(left + crashed) == list(range(6))  # the leave skipped the three crashed nodes...
    assert {s["node"] for s in tl.skipped if s["action"] == "leave"} == set(crashed)  # ...and says so
    rejoins = {(e.node, e.t): e.keep_checkpoint for e in tl.events if e.action == "rejoin"}
    assert all(rejoins[(n, 90.0)] is False for n in crashed)  # keep_checkpoint = false -> from scratch
    assert all((n, 71.0) in rejoins for n in left)
    part = [e for e in tl.events if e.node == 3 and e.action in ("partition", "heal")]
    assert [(e.action, e.t) for e in part] == [("partition", 90), ("heal", 110)] and part[0].mode == "refuse"
    changes = [e for e in tl.events if e.action == "link"]
    assert [(e.node, e.t) for e in changes] == [(1, 100), (1, 150)]
    assert changes[0].link["up_mbit"] == 1.5 and changes[0].link["latency_ms"] == 300
    assert changes[1].link == tl.links[1].to_dict()  # restored to the node's own line
    frozen = [e for e in tl.events if e.action == "freeze"]
    assert len(frozen) == 2 and all(e.t == 120 for e in frozen)
    assert len([e for e in tl.events if e.action == "resume" and e.t == 125]) == 2


def test_scheduled_crash_without_duration_keeps_the_node_down_and_stops_its_churn():
    churn = {**HEAVY_TAILED, "online": {"dist": "fixed", "value": 30}, "offline": {"dist": "fixed", "value": 5}}
    sc = make(churn, nodes=2, duration=300, events=[{"at_s": 50, "action": "crash", "nodes": [0]}])
    tl = ChurnModel(sc).timeline()
    node0 = [e for e in tl.events if e.node == 0]
    assert node0[-1].action == "crash" and node0[-1].t == 50
    node1 = [(e.action, e.t) for e in tl.events if e.node == 1][:4]
    assert [t for _, t in node1] == [30, 35, 65, 70]  # fixed periods, untouched by node 0's fate


def test_links_are_drawn_per_node_within_their_distributions():
    links = {"up_mbit": {"dist": "uniform", "low": 10, "high": 30}, "down_mbit": 100,
             "latency_ms": {"dist": "lognormal", "median": 25, "sigma": 0.4}, "jitter_ms": 3}
    tl = ChurnModel(make(None, nodes=50, links=links), seed=2).timeline()
    ups = [lk.up_mbit for lk in tl.links]
    assert all(10 <= u <= 30 for u in ups) and len(set(ups)) == 50
    assert all(lk.down_mbit == 100 and lk.jitter_ms == 3 for lk in tl.links)
    lat = [lk.latency_ms for lk in tl.links]
    assert stats.kstest(lat, stats.lognorm(s=0.4, scale=25).cdf).pvalue > 0.01


def test_serving_intervals_exclude_down_frozen_and_partitioned_time():
    events = [ChurnEvent(10, 0, "crash"), ChurnEvent(20, 0, "rejoin", keep_checkpoint=True),
              ChurnEvent(30, 0, "partition", mode="blackhole"), ChurnEvent(35, 0, "heal"),
              ChurnEvent(50, 0, "freeze"), ChurnEvent(55, 0, "resume"), ChurnEvent(12, 1, "leave")]
    assert serving_intervals(events, 0, 60) == [(0, 10), (20, 30), (35, 50), (55, 60)]
    assert serving_intervals([e.to_dict() for e in events], 1, 60) == [(0, 12)]
    assert node_states(events, 0, 60)[0] == (0, 10, "up")


@pytest.mark.parametrize("dist", [
    {"dist": "weibull", "shape": 0.6, "scale": 40.0},
    {"dist": "uniform", "low": 10.0, "high": 50.0},
    {"dist": "lognormal", "median": 20.0, "sigma": 0.8},
    {"dist": "pareto", "shape": 2.5, "scale": 10.0},
    {"dist": "fixed", "value": 30.0},
])
def test_a_steady_start_leaves_what_an_observer_at_a_random_moment_sees(dist):
    """``residual`` ~ the time left of the session in progress at random moments of one long renewal process
    (two-sample Kolmogorov-Smirnov), which is not the distribution of a fresh session."""
    import bisect
    import random

    from dmoe.sim.churn import residual, sample
    from dmoe.sim.scenario import Distribution

    d = Distribution(dist["dist"], {k: v for k, v in dist.items() if k != "dist"})
    rng = random.Random(3)
    ends = [0.0]
    for _ in range(200_000):
        ends.append(ends[-1] + sample(d, rng))
    observed = []
    for _ in range(5_000):
        t = rng.uniform(0, ends[-1])
        observed.append(ends[bisect.bisect_right(ends, t)] - t)
    drawn = [residual(d, rng) for _ in range(5_000)]
    assert stats.ks_2samp(observed, drawn).pvalue > 0.001
    if dist["dist"] != "fixed":
        fresh = [sample(d, rng) for _ in range(5_000)]
        assert stats.ks_2samp(observed, fresh).pvalue < 1e-6


def test_steady_start_first_sessions_are_residual_and_off_by_default():
    steady = ChurnModel(make({**HEAVY_TAILED, "steady_start": True}, nodes=250, duration=60), seed=1).timeline()
    fresh = ChurnModel(make(HEAVY_TAILED, nodes=250, duration=60), seed=1).timeline()
    early = [sum(1 for e in tl.events if e.action in ("crash", "leave", "freeze") and e.t < 10)
             for tl in (steady, fresh)]
    # shape 0.6: fresh sessions end early far more often than sessions already under way
    assert early[0] < 0.7 * early[1], early
