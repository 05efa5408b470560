"""The simulation report from synthetic run files: expert states lost from swarm.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dmoe.sim.report import expert_states_lost, format_table, swarm_replication, write_report


def _write_run(out: Path, swarm: list[dict[str, Any]]) -> None:
    (out / "trainers").mkdir(parents=True)
    nodes = [{"index": i, "name": f"n{i}", "experts": [f"layer0.ffn.{i}", f"layer0.ffn.{i + 1}"], "link": {}}
             for i in range(2)]
    (out / "run.json").write_text(json.dumps({"scenario": {"name": "synthetic"}, "seed": 1, "t0": 1000.0,
                                              "duration_s": 60.0, "nodes": nodes, "min_experts": 1,
                                              "experts_per_layer": 3}))
    (out / "events.jsonl").write_text("")
    steps = [{"type": "step", "step": i, "time": 1000.0 + 5 * i, "loss": 3.0 - 0.1 * i, "step_time": 0.5,
              "tokens_per_s": 100.0} for i in range(1, 10)]
    (out / "trainers" / "t0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (out / "swarm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swarm))


def _sample(t: float, replication: dict[str, int]) -> dict[str, Any]:
    return {"t": t, "nodes": 2, "experts_alive": sum(1 for n in replication.values() if n), "replication": replication}


def test_an_expert_served_again_from_far_fewer_steps_counts_as_state_lost():
    a, b = "layer0.ffn.0", "layer0.ffn.1"
    swarm = [
        {**_sample(1, {a: 2, b: 2}), "lineage": {a: 10, b: 40}},
        {**_sample(2, {a: 1, b: 1}), "lineage": {a: 12, b: 60}},
        {**_sample(3, {a: 1, b: 1}), "lineage": {a: 3, b: 35}},   # a: too little trained to count; b: > half
        {**_sample(4, {a: 1, b: 1}), "lineage": {a: 4, b: 2}},    # b: a fresh holder took it over without state
        {**_sample(5, {a: 1, b: 2}), "lineage": {a: 5, b: 70}},   # counted once
    ]
    states = expert_states_lost(swarm)
    assert states is not None and states.uids == {b: 4.0} and states.lost == [0, 0, 0, 1, 1]


def test_an_expert_that_comes_back_with_its_checkpoint_is_not_lost_but_one_still_gone_at_the_end_is():
    a, b = "layer0.ffn.0", "layer0.ffn.1"
    swarm = [
        {**_sample(1, {a: 2, b: 1}), "lineage": {a: 90, b: 50}},
        {**_sample(2, {}), "lineage": {}},
        {**_sample(3, {}), "lineage": {}},                          # both gone for 2 samples
        {**_sample(4, {a: 1}), "lineage": {a: 96}},                 # a: back with its checkpoint's steps
        {**_sample(5, {a: 2}), "lineage": {a: 99}},                 # b: never back
    ]
    states = expert_states_lost(swarm)
    assert states is not None and states.uids == {b: 3.0}


def test_expert_states_lost_needs_two_empty_samples_and_counts_each_uid_once(tmp_path):
    a, b, c = "layer0.ffn.0", "layer0.ffn.1", "layer0.ffn.2"
    swarm = [
        _sample(1, {a: 1, b: 2}),
        _sample(2, {b: 2}),            # a: one empty sample (a DHT miss) is not a loss
        _sample(3, {a: 1, b: 1}),
        _sample(4, {b: 1}),
        _sample(5, {b: 1, c: 0}),      # a: second empty sample in a row -> lost at t=5; c never had a holder
        _sample(6, {a: 1}),            # a served again (fresh weights): still lost once
        {"t": 6.5, "nodes": 1, "experts_alive": 1},  # a sample without replication does not take part
        _sample(7, {}),                # b: second empty sample -> lost at t=7
        _sample(8, {}),                # a empty twice again: not counted again
    ]
    states = expert_states_lost(swarm)
    assert states is not None
    assert states.uids == {a: 5.0, b: 7.0}
    assert states.times == [1, 2, 3, 4, 5, 6, 7, 8] and states.lost == [0, 0, 0, 0, 1, 1, 2, 2]
    assert states.at_risk == [1, 0, 2, 1, 1, 1, 0, 0]

    _write_run(tmp_path, swarm)
    summary = write_report(tmp_path, plot_png=False)
    assert summary["expert_states_lost"] == 2 and summary["expert_states_lost_uids"] == [a, b]
    assert summary["experts_at_risk_max"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["expert_states_lost"] == 2
    assert "expert states lost (served again from under half its steps, or without a holder until the end): 2 " \
           "(layer0.ffn.0, layer0.ffn.1)" in format_table(summary)


@pytest.mark.integration  # the first matplotlib import may run fc-list to build its font cache
def test_report_png_has_a_state_loss_panel_only_when_the_run_has_replication(tmp_path):
    import matplotlib.image

    sizes = {}
    for name, swarm in (("with", [_sample(1, {"x.0": 1}), _sample(2, {}), _sample(3, {})]),
                        ("without", [{"t": 1, "nodes": 1, "experts_alive": 1}])):
        _write_run(tmp_path / name, swarm)
        write_report(tmp_path / name)
        sizes[name] = matplotlib.image.imread(tmp_path / name / "report.png").shape[:2]
    assert sizes["with"][0] > sizes["without"][0]  # one panel more, so a taller figure
    assert sizes["with"][1] == sizes["without"][1]


def test_old_runs_without_replication_have_no_state_loss_figure(tmp_path):
    _write_run(tmp_path, [{"t": t, "nodes": 2, "experts_alive": 3} for t in (1, 2, 3)])
    summary = write_report(tmp_path, plot_png=False)
    assert summary["expert_states_lost"] is None and summary["expert_states_lost_uids"] is None
    assert "expert states lost" not in format_table(summary)
    assert expert_states_lost([]) is None


def test_swarm_replication_reads_a_sample_or_a_full_status():
    assert swarm_replication({"replication": {"x.0": 2}}) == {"x.0": 2}
    status = {"prefixes": {"x": {"replication": {"x.0": 1}}, "y": {"replication": {"y.3": 2}}}}
    assert swarm_replication(status) == {"x.0": 1, "y.3": 2}
    assert swarm_replication({"prefixes": {"x": {"alive": 1}}}) is None  # a coordinator from before issue 15
    assert swarm_replication({"nodes": 1}) is None
