"""``dmoe train`` through real ``dmoe node`` processes: learning, node crashes, an empty swarm, resume,
and two trainers sharing one model with ``--run-id``.

Every process is real (gRPC servers, hivemind DHT peers) and every failure is a real signal.
The model is small (hidden 64, context 64, batch 8) so each test takes well under a minute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dmoe.train.trainer import load_checkpoint

pytestmark = pytest.mark.integration  # real processes

H = "64"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROC = {"env": ONE_THREAD, "timeout": 180}  # one torch thread; patient start-up on a busy machine
MODEL = ["--hidden-dim", H, "--n-head", "4", "--block-size", "64", "--batch-size", "8", "--grid-size", "4x4",
         "--k-best", "2", "--eval-batches", "2", "--no-progress", "--torch-threads", "1", "--max-data-mb", "4"]


def node_args(experts: str, *extra: str) -> list[str]:
    return ["--experts", experts, "--hidden-dim", H, "--seed", "0", "--host", "127.0.0.1", "--announce-ttl", "10",
            *extra]


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, *, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited while waiting for {what}:\n{proc.log_tail()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f":\n{proc.log_tail()}" if proc else ""))


def steps_done(path: Path) -> int:
    return max((r["step"] for r in read_log(path) if r["type"] == "step"), default=0)


def finish(proc, timeout: float = 180) -> int:
    code = proc.proc.wait(timeout)
    assert code == 0, f"{proc.name} exited with {code}:\n{proc.log_tail()}"
    return code


# generous limits: these only bite on a machine far busier than the 2-core CI box
@pytest.mark.timeout(600)
def test_training_through_nodes_learns_survives_a_killed_node_and_resumes(launch, tmp_path):
    a = launch("node", node_args("layer0.ffn.[0:2].[0:4],layer1.ffn.[0:2].[0:4]"), name="node_a", **PROC)
    b = launch("node", node_args("layer0.ffn.[2:4].[0:4],layer1.ffn.[2:4].[0:4]", "--initial-peers", *a.ready["dht"]),
               name="node_b", **PROC)
    log = tmp_path / "train.jsonl"
    ckpt = tmp_path / "ckpt"
    common = ["--initial-peers", *a.ready["dht"], *MODEL, "--log-file", str(log), "--checkpoint-dir", str(ckpt)]
    trainer = launch("train", [*common, "--steps", "24", "--eval-every", "12"], name="trainer", **PROC)
    assert trainer.ready["experts"] == "remote" and trainer.ready["step"] == 0

    wait_for(lambda: steps_done(log) >= 6, timeout=120, what="6 steps", proc=trainer)
    b.kill()  # SIGKILL: half of every layer's experts vanish without a goodbye
    killed_at = steps_done(log)
    finish(trainer)

    records = read_log(log)
    steps = [r for r in records if r["type"] == "step"]
    evals = [r for r in records if r["type"] == "eval" and r["val_loss"] is not None]
    assert [e["step"] for e in evals] == [0, 12, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals
    assert steps[-1]["step"] == 24
    # the dead node's calls failed and were counted; training went on with the other node's experts
    failures = steps[-1]["failures_total"]
    assert sum(failures.values()) > 0, failures
    assert set(failures) <= {"unreachable", "deadline", "rejected", "bad_answer", "abandoned", "call_failed"}
    after = [r for r in steps if r["step"] > killed_at + 2 and not r["skipped"]]
    assert len(after) >= 8 and all(r["experts_reached"] <= 16 for r in after[-5:])
    assert load_checkpoint(ckpt)["step"] == 24

    # resume from the checkpoint: the step count continues
    trainer2 = launch("train", [*common, "--steps", "27", "--eval-every", "0"], name="trainer2", **PROC)
    assert trainer2.ready["step"] == 24
    finish(trainer2)
    records = read_log(log)
    resume = [r for r in records if r["type"] == "resume"]
    assert resume and resume[-1]["step"] == 24
    later = [r["step"] for r in records[records.index(resume[-1]):] if r["type"] == "step" and not r["skipped"]]
    assert later[0] == 25 and later[-1] == 27
    assert load_checkpoint(ckpt)["step"] == 27


@pytest.mark.timeout(600)
def test_every_node_gone_for_a_while_skips_steps_then_training_resumes(launch, tmp_path):
    coordinator = launch("coordinator", ["--identity", str(tmp_path / "id.key"), "--host-maddrs",
                                         "/ip4/127.0.0.1/tcp/0", "--http-host", "127.0.0.1", "--http-port", "0",
                                         "--relay-host", "127.0.0.1", "--relay-port", "0"],
                         name="coordinator", timeout=180)
    bootstrap = coordinator.ready["dht"]
    experts = "layer0.ffn.[0:4].[0:4],layer1.ffn.[0:4].[0:4]"
    node = launch("node", node_args(experts, "--initial-peers", *bootstrap), name="node1", **PROC)
    log = tmp_path / "train.jsonl"
    trainer = launch("train", ["--initial-peers", *bootstrap, *MODEL, "--steps", "16", "--eval-every", "0",
                               "--log-file", str(log)], name="trainer", **PROC)
    wait_for(lambda: steps_done(log) >= 4, timeout=120, what="4 steps", proc=trainer)
    node.kill()
    wait_for(lambda: sum(r["type"] == "step" and r["skipped"] for r in read_log(log)) >= 3, timeout=90,
             what="3 skipped batches", proc=trainer)
    time.sleep(3)
    skipped_while_gone = sum(r["type"] == "step" and r["skipped"] for r in read_log(log))
    launch("node", node_args(experts, "--initial-peers", *bootstrap), name="node2", **PROC)
    finish(trainer)

    records = read_log(log)
    steps = [r for r in records if r["type"] == "step"]
    skipped = [r for r in steps if r["skipped"]]
    assert len(skipped) >= skipped_while_gone >= 3
    assert all(r["error_kind"] == "not_enough_experts" for r in skipped)
    assert steps[-1]["skipped_total"] == len(skipped)
    last_skip = steps.index(skipped[-1])
    assert any(not r["skipped"] for r in steps[last_skip:])  # trained again once a node was back
    assert steps[-1]["step"] == 16 and records[-1]["type"] == "stop" and records[-1]["skipped"] == len(skipped)


@pytest.mark.timeout(600)
def test_two_trainers_with_one_run_id_end_with_equal_parameters(launch, tmp_path):
    node = launch("node", node_args("layer0.ffn.[0:4].[0:4],layer1.ffn.[0:4].[0:4]"), name="node", **PROC)
    common = ["--initial-peers", *node.ready["dht"], *MODEL, "--run-id", "shared", "--steps", "12",
              "--eval-every", "0", "--target-batch-size", "64", "--matchmaking-time", "2", "--averaging-timeout", "10",
              "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    log_a, log_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = launch("train", [*common, "--seed", "0", "--log-file", str(log_a), "--checkpoint-dir", str(tmp_path / "ca")],
               name="trainer_a", **PROC)
    # B starts while A trains alone (8 batches per step): B's start-up takes several of A's steps, so B joins
    # late, far from step 12, and must first download A's state (B has other initial weights and other data)
    b = launch("train", [*common, "--seed", "5", "--log-file", str(log_b), "--checkpoint-dir", str(tmp_path / "cb")],
               name="trainer_b", wait=False, **PROC)
    wait_for(lambda: steps_done(log_a) >= 1, timeout=120, what="trainer A at step 1", proc=a)
    b.wait_ready(PROC["timeout"])
    finish(a)
    finish(b)

    join_b = next(r for r in read_log(log_b) if r["type"] == "join")
    assert join_b["downloaded"] and join_b["local_epoch"] >= 1
    steps_a = [r for r in read_log(log_a) if r["type"] == "step"]
    steps_b = [r for r in read_log(log_b) if r["type"] == "step"]
    # each saw the other's progress in the DHT: B really trained alongside A
    assert max(r["peers"] for r in steps_a) == max(r["peers"] for r in steps_b) == 2
    # at --steps both waited for each other and agreed on one set of parameters (downloading if needed)
    sync_a = next(r for r in read_log(log_a) if r["type"] == "final_sync")
    sync_b = next(r for r in read_log(log_b) if r["type"] == "final_sync")
    assert sync_a["agreed"] and sync_b["agreed"] and sync_a["peers"] == sync_b["peers"] == 2, (sync_a, sync_b)
    final_a = next(r for r in read_log(log_a) if r["type"] == "final")
    final_b = next(r for r in read_log(log_b) if r["type"] == "final")
    assert final_a["step"] == final_b["step"] == 12
    assert final_a["params"] == final_b["params"] == sync_a["params"]
    state_a, state_b = load_checkpoint(tmp_path / "ca"), load_checkpoint(tmp_path / "cb")
    for name, tensor in state_a["model"].items():
        assert torch.equal(tensor, state_b["model"][name]), name
    # not equal merely because they started equal: B's seed gave it other weights until it downloaded A's
    assert join_b["params_before"] != join_b["params"]
