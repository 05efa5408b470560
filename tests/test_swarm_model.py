"""The swarm model (dmoe.sim.model): its virtual clock, and a small churned swarm checked against invariants."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dmoe.sim.model.clock import VirtualClockLoop, virtual_time
from dmoe.sim.model.network import ServiceCost
from dmoe.sim.model.run import ModelOptions, ModelRun
from dmoe.sim.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
COST = ServiceCost({"forward": 20e-6, "backward": 60e-6}, 0.5e-3)  # fixed, so the test does not time this CPU


def test_virtual_clock_runs_an_hour_of_timers_at_once_in_order():
    loop = VirtualClockLoop()
    seen: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        seen.append((name, loop.time()))

    async def main() -> None:
        import dmoe.client.dispatch as dispatch

        assert dispatch.time.monotonic() == loop.time()  # patched inside virtual_time
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 2.5)
        assert loop.time() == pytest.approx(2.5)
        await asyncio.gather(sleeper("late", 3600), sleeper("early", 60))

    started = time.perf_counter()
    with virtual_time(loop):
        loop.run_until_complete(main())
    loop.close()
    assert time.perf_counter() - started < 5
    assert [n for n, _ in seen] == ["early", "late"]
    assert seen[1][1] == pytest.approx(2.5 + 3600)
    import dmoe.client.dispatch as dispatch

    assert dispatch.time is time  # restored


def test_a_churned_swarm_keeps_the_invariants():
    # home-churn's compressed time (sessions of ~1 min, ttl 8 s) at 24 nodes: many crashes, leaves and freezes
    scenario = load_scenario(SCENARIOS / "home-churn.toml")
    scenario = replace(scenario, swarm=replace(scenario.swarm, nodes=24, trainers=2))
    result = ModelRun(scenario, ModelOptions(duration_s=150.0, tokens_per_step=64), COST).run()
    inv = result.invariants
    assert len(result.steps) > 50
    assert result.events.get("crash", 0) >= 3 and result.events.get("freeze", 0) >= 1, result.events
    assert inv.crashed_checked >= 1, "a crashed node stayed down a whole ttl"
    assert inv.records_after_ttl == 0, "a crashed node's records outlived their ttl"
    assert inv.chosen_not_alive == 0, "a step chose an expert that was not alive in the model"
    assert 0 < inv.longest_ban_s <= inv.ban_limit_s, "bans happened and none outlived the longest ban"
    failed = sum(sum(r.failed.values()) for r in result.steps)
    assert failed > 0, "churn cost some calls"
    assert sum(1 for r in result.steps if not r.skipped) > 0.5 * len(result.steps)
    assert result.announces["ok"] > 24
