"""Experts outlive their volunteers: replica sync, state transfer, adoption, hand-off and ``--experts auto``,
with real ``dmoe node`` and ``dmoe train`` processes, real DHT peers and real signals.

The model is tiny (one MoE layer of a 1x4 grid, hidden 64) so training moves weights visibly within seconds.
"""

from __future__ import annotations

import time

import pytest
from node_rpc import expert_weights, relative_distance, stub, updates
from test_train_swarm import read_log, steps_done, wait_for

from dmoe.dht.placement import grid_uids
from dmoe.experts import create_expert
from dmoe.wire.proto import expert_pb2 as pb

pytestmark = pytest.mark.integration

H = 64
GRID = "layer0.ffn.[0:1].[0:4]"
UIDS = grid_uids("layer0.ffn", (1, 4))
PROC = {"env": {"OMP_NUM_THREADS": "1"}, "timeout": 180}
MODEL = ["--hidden-dim", str(H), "--n-layer", "1", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
         "--grid-size", "1x4", "--k-best", "2", "--eval-batches", "2", "--no-progress", "--torch-threads", "1",
         "--max-data-mb", "2"]


def node_args(experts: str, *extra: str) -> list[str]:
    return ["--experts", experts, "--hidden-dim", str(H), "--seed", "0", "--host", "127.0.0.1", "--announce-ttl", "6",
            *extra]


def initial_weights(uid: str) -> dict:
    return create_expert("ffn", hidden_dim=H, seed=0, uid=uid).state_dict()


def train(launch, tmp_path, peers: list[str], *, steps: int, name: str = "trainer", **extra) -> tuple:
    log = tmp_path / f"{name}.jsonl"
    args = ["--initial-peers", *peers, *MODEL, "--log-file", str(log), "--steps", str(steps), *extra.pop("args", [])]
    return launch("train", args, name=name, **PROC), log


@pytest.mark.timeout(300)
def test_replicas_trained_apart_agree_after_a_sync_round(launch, tmp_path):
    sync = ["--sync-interval", "6"]
    a = launch("node", node_args(GRID, *sync), name="a", **PROC)
    b = launch("node", node_args(GRID, *sync, "--initial-peers", *a.ready["dht"]), name="b", **PROC)
    trainer, log = train(launch, tmp_path, a.ready["dht"], steps=40, args=["--eval-every", "0"])
    assert trainer.proc.wait(240) == 0, trainer.log_tail()
    uid = max(UIDS, key=lambda u: min(updates(a.ready["grpc"], u), updates(b.ready["grpc"], u)))
    ua, ub = updates(a.ready["grpc"], uid), updates(b.ready["grpc"], uid)
    assert ua > 0 and ub > 0, f"the trainer should have trained {uid} through both replicas ({ua}, {ub})"

    before = relative_distance(expert_weights(a.ready["grpc"], uid), expert_weights(b.ready["grpc"], uid))
    # the trainer has stopped: the next complete round brings the replicas together exactly
    deadline = time.monotonic() + 40
    after = before
    while time.monotonic() < deadline and after >= 1e-3:
        time.sleep(1.0)
        after = relative_distance(expert_weights(a.ready["grpc"], uid), expert_weights(b.ready["grpc"], uid))
    print(f"{uid}: replica distance {before:.3g} before the sync, {after:.3g} after ({ua} and {ub} updates)")
    assert before > 1e-3, f"replicas trained on different batches should differ before a sync ({before:.3g})"
    assert after < 1e-3, f"replicas still {after:.3g} apart after a sync round:\n{a.log_tail()}\n{b.log_tail()}"
    assert relative_distance(expert_weights(a.ready["grpc"], uid), initial_weights(uid)) > 1e-2  # trained


@pytest.mark.timeout(360)
def test_expert_survives_its_first_holder_being_killed_and_a_fresh_node_takes_the_trained_state(launch, tmp_path):
    fast = ["--sync-interval", "4", "--placement-interval", "2"]
    a = launch("node", node_args(GRID, *fast), name="a", **PROC)
    # the backup: an auto node takes every expert that has fewer than --replicas 2 holders, state first
    b = launch("node", node_args("auto", *fast, "--capacity", "4", "--grid", GRID, "--initial-peers",
                                 *a.ready["dht"]), name="b", **PROC)
    assert sorted(b.ready["experts"]) == sorted(UIDS), b.log_tail()
    trainer, log = train(launch, tmp_path, a.ready["dht"], steps=60, args=["--eval-every", "20"])
    wait_for(lambda: steps_done(log) >= 25, timeout=180, what="25 steps", proc=trainer)
    a.kill()  # SIGKILL: no hand-off; the replica on b is all that is left
    assert trainer.proc.wait(240) == 0, trainer.log_tail()
    evals = [r for r in read_log(log) if r["type"] == "eval" and r["val_loss"] is not None]
    assert [e["step"] for e in evals] == [0, 20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_loss"] <= evals[1]["val_loss"] * 1.02, \
        f"validation loss jumped back after the kill: {[round(e['val_loss'], 4) for e in evals]}"

    # a node started afterwards, without any checkpoint, serves the trained weights, not its initial ones
    c = launch("node", node_args(GRID, "--initial-peers", *b.ready["dht"]), name="c", **PROC)
    for uid in UIDS:
        on_b, on_c = expert_weights(b.ready["grpc"], uid), expert_weights(c.ready["grpc"], uid)
        fresh = initial_weights(uid)
        assert relative_distance(on_c, on_b) < 1e-3, f"{uid}: c did not take the swarm's state:\n{c.log_tail()}"
        assert relative_distance(on_c, fresh) > 1e-2, f"{uid}: c serves (nearly) initial weights"
        assert updates(c.ready["grpc"], uid) == updates(b.ready["grpc"], uid) > 0


@pytest.mark.timeout(300)
def test_auto_node_picks_unserved_experts_of_the_trainers_grid_and_a_leaving_holder_hands_off(launch, tmp_path):
    a = launch("node", node_args("layer0.ffn.0.0,layer0.ffn.0.1", "--capacity", "3"), name="a", **PROC)
    trainer, log = train(launch, tmp_path, a.ready["dht"], steps=100000, args=["--eval-every", "0"])
    wait_for(lambda: steps_done(log) >= 3, timeout=120, what="3 steps", proc=trainer)
    # no --grid: the auto node learns the grid from the trainer's _dmoe.grids record
    b = launch("node", node_args("auto", "--capacity", "2", "--initial-peers", *a.ready["dht"]), name="b", **PROC)
    assert sorted(b.ready["experts"]) == ["layer0.ffn.0.2", "layer0.ffn.0.3"], b.log_tail()
    # the trainer finds the new experts in the DHT and trains them
    wait_for(lambda: min(updates(b.ready["grpc"], u) for u in b.ready["experts"]) > 0, timeout=120,
             what="the trainer to use b's experts", proc=trainer)

    # b leaves gracefully: it is the only holder of its experts, so it hands them to a (one spare slot)
    b.stop(timeout=60)
    text = (tmp_path / "b.log").read_text()
    assert "handed" in text and "off to" in text, text[-3000:]
    served = [e.uid for e in stub(a.ready["grpc"]).Info(pb.InfoRequest(), timeout=10).experts]
    assert len(served) == 3 and set(b.ready["experts"]) & set(served), served
    taken = next(u for u in b.ready["experts"] if u in served)
    assert updates(a.ready["grpc"], taken) > 0, "the adopter should hold the trained state, not initial weights"
    trainer.stop(timeout=30)
