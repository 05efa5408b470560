"""``dmoe train`` as a user meets it: flag errors, the node command, the start-up check, SIGINT."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from dmoe.cli import main as dmoe_main
from dmoe.dht.uids import parse_expert_pattern
from dmoe.train.trainer import load_checkpoint

SMALL = ["--batch-size", "4", "--block-size", "32", "--eval-batches", "1", "--no-progress", "--torch-threads", "1"]


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dmoe", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_bad_flags_get_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        dmoe_main(["train", "--grid-size", "0x4"])
    assert exc.value.code == 2
    assert "grid size must be positive integers" in capsys.readouterr().err
    assert dmoe_main(["train", "--k-best", "2", "--k-min", "3", "--local-experts"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dmoe train: --k-min 3 is more than --k-best 2"
    assert dmoe_main(["train"]) == 2
    assert "pass --initial-peers" in capsys.readouterr().err
    assert dmoe_main(["train", "--local-experts", "--run-id", "x"]) == 2
    assert "--run-id" in capsys.readouterr().err
    assert dmoe_main(["train", "--hidden-dim", "100", "--n-head", "3", "--local-experts"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_print_node_command_hosts_every_expert_of_the_default_model(capsys):
    assert dmoe_main(["train", "--print-node-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[:2] == ["dmoe", "node"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    uids = parse_expert_pattern(flags["--experts"])
    assert len(uids) == 32 and uids[0] == "layer0.ffn.0.0" and uids[-1] == "layer1.ffn.3.3"
    assert flags["--hidden-dim"] == "128" and flags["--expert-cls"] == "ffn" and flags["--seed"] == "0"


def test_print_node_command_auto_placement_prints_self_placing_nodes_of_the_same_capacity(capsys):
    assert dmoe_main(["train", "--print-node-command", "--nodes", "3", "--replicas", "2", "--auto-placement"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        flags = dict(zip(shlex.split(line)[2::2], shlex.split(line)[3::2], strict=True))
        # 32 experts x 2 replicas over 3 nodes: the fixed placement's largest share, 22
        assert flags["--experts"] == "auto" and flags["--capacity"] == "22" and flags["--replicas"] == "2"
    from dmoe.node.cli import build_parser, config_from_args  # the printed command is a valid dmoe node command

    config = config_from_args(build_parser().parse_args(shlex.split(lines[0])[2:]))
    assert config.auto and config.max_experts == 22


def test_node_help_states_the_auto_capacity_default(capsys):
    from dmoe.node.cli import build_parser

    from dmoe.config.node import AUTO_CAPACITY

    help_text = " ".join(build_parser().format_help().split())
    assert f"or {AUTO_CAPACITY} with --experts auto" in help_text  # the help's number is the one the code uses


@pytest.mark.integration
def test_startup_check_names_the_mismatch_or_the_missing_prefix(launch):
    node = launch("node", ["--experts", "layer0.ffn.[0:2].[0:2]", "--hidden-dim", "64", "--host", "127.0.0.1"],
                  name="node", env={"OMP_NUM_THREADS": "1"})
    peers = node.ready["dht"]
    wrong = run_train("--initial-peers", *peers, "--grid-size", "2x2", "--hidden-dim", "128", *SMALL)
    assert wrong.returncode == 2
    last = wrong.stderr.strip().splitlines()[-1]
    assert last.startswith("dmoe train: expert layer0.ffn.") and "has hidden size 64, but this model's is 128" in last
    started = time.monotonic()
    missing = run_train("--initial-peers", *peers, "--grid-size", "2x2", "--hidden-dim", "64", "--startup-timeout",
                        "3", *SMALL)
    assert missing.returncode == 2
    last = missing.stderr.strip().splitlines()[-1]
    assert "under layer1.ffn. (0 found) within 3s" in last and "dmoe node --experts" in last
    assert time.monotonic() - started < 60


@pytest.mark.integration
def test_sigint_stops_after_the_current_batch_and_saves(launch, tmp_path):
    log = tmp_path / "log.jsonl"
    trainer = launch("train", ["--local-experts", "--steps", "100000", "--eval-every", "0", "--log-file", str(log),
                               "--checkpoint-dir", str(tmp_path / "ckpt"), "--n-layer", "1", "--hidden-dim", "32",
                               "--metrics-port", "0", *SMALL], name="trainer", env={"OMP_NUM_THREADS": "1"})
    assert trainer.ready["experts"] == "local"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(1 for line in open(log) if '"type": "step"' in line) < 3:
        time.sleep(0.2)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{trainer.ready['metrics_port']}/metrics", timeout=10).read()
    steps_metric = next(line for line in metrics.decode().splitlines() if line.startswith("dmoe_trainer_steps_total"))
    assert float(steps_metric.split()[-1]) >= 3
    os.kill(trainer.pid, signal.SIGINT)  # the trainer only, like Ctrl-C would reach it
    assert trainer.proc.wait(30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    stop = records[-1]
    assert stop["type"] == "stop" and stop["stopped_by"] == "signal" and stop["steps"] == steps[-1]["step"]
    state = load_checkpoint(tmp_path / "ckpt")
    assert state["step"] == steps[-1]["step"] >= 3
    assert isinstance(state["model"]["wte.weight"], torch.Tensor)
