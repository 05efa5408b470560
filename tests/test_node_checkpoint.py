"""Checkpoints survive crashes: atomic files, SIGKILL in the middle of saving, SIGKILL during training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from dmoe.node.checkpoint import CheckpointStore
from node_rpc import call, close_channels, updates

from dmoe.experts import create_expert

H = 16


def test_store_keeps_newest_and_skips_unreadable(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for i in range(5):
        store.save({"e.0": {"step": torch.tensor(i)}})
    assert [p.name for p in store.files()] == [f"checkpoint-00000{i}.pt" for i in (3, 4, 5)]
    (tmp_path / ".checkpoint-000006.pt.tmp").write_bytes(b"half written")
    store.files()[-1].write_bytes(b"damaged disk")
    store = CheckpointStore(tmp_path, keep=3)
    assert not list(tmp_path.glob("*.tmp")), "stale temporary files are removed on start"
    path, payload = store.load_latest()
    assert path.name == "checkpoint-000004.pt" and int(payload["experts"]["e.0"]["step"]) == 3


def test_a_kill_between_rename_and_deletion_is_tidied_on_the_next_start(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(2):
        store.save({"e.0": {"step": torch.tensor(i)}})
    # what a SIGKILL right after the rename leaves: one complete file over the limit
    torch.save({"format": 1, "saved_at": 0.0, "experts": {"e.0": {"step": torch.tensor(2)}}},
               tmp_path / "checkpoint-000003.pt")
    store = CheckpointStore(tmp_path, keep=2)
    assert [p.name for p in store.files()] == ["checkpoint-000002.pt", "checkpoint-000003.pt"]
    assert int(store.load_latest()[1]["experts"]["e.0"]["step"]) == 2


SAVER = """
import os, sys, time, torch
from dmoe.node.checkpoint import CheckpointStore
store = CheckpointStore(sys.argv[1])
pause_in_save = sys.argv[2] == "pause"
real_fsync = os.fsync

def fsync_then_report(fd):
    # the temporary file is written but not yet renamed: announce it and linger, so the test's
    # SIGKILL lands inside the save whatever the machine's speed
    real_fsync(fd)
    if pause_in_save and saving[0] >= 2:
        print("in-save", flush=True)
        time.sleep(5)

saving = [0]
os.fsync = fsync_then_report
for i in range(10**6):
    saving[0] = i
    big = torch.full((2_000_000,), float(i))  # 8 MB
    store.save({"e.0": {"step": i, "weights": big}})
    print(i, flush=True)
"""


def _check_latest(tmp_path) -> int:
    found = CheckpointStore(tmp_path).load_latest()
    assert found is not None
    _, payload = found
    state = payload["experts"]["e.0"]
    assert torch.equal(state["weights"], torch.full((2_000_000,), float(state["step"]))), "complete, not torn"
    assert len(CheckpointStore(tmp_path).files()) <= 3
    return int(state["step"])


@pytest.mark.integration
def test_sigkill_in_the_middle_of_saving_leaves_a_loadable_checkpoint(tmp_path):
    # 1) a kill that certainly lands between writing the temporary file and renaming it
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), "pause"], stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline().strip() for _ in range(3)]
    assert lines == ["0", "1", "in-save"], lines
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".checkpoint-*.tmp")), "the kill landed inside a save"
    assert _check_latest(tmp_path) == 1, "the interrupted save is ignored, the last complete one restores"
    # 2) kills at arbitrary points of later saves (the store also cleans the stale temporary file)
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), "free"], stdout=subprocess.PIPE, text=True)
        for _ in range(2 + round_):
            assert proc.stdout.readline(), "saver died"
        time.sleep(0.013 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _check_latest(tmp_path) >= 0


@pytest.mark.integration
def test_node_killed_during_training_restarts_from_its_last_checkpoint(launch, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--experts", "ffn.[0:2]", "--host", "127.0.0.1", "--hidden-dim", str(H), "--seed", "3",
            "--checkpoint-dir", str(ckpt), "--checkpoint-interval", "0.3", "--lr", "0.01"]
    node = launch("node", args, name="node")
    ep = node.ready["grpc"]
    stop = threading.Event()
    sent = {"n": 0}

    def train() -> None:
        while not stop.is_set():
            try:
                call(ep, "Backward", "ffn.1", [torch.randn(8, H), torch.randn(8, H)], timeout=5)
                sent["n"] += 1
            except grpc.RpcError:
                return  # the node was killed

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = CheckpointStore(ckpt).files()
            if len(files) >= 2 and updates(ep, "ffn.1") >= 20:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no checkpoints written during training")
        node.kill()  # SIGKILL to the process group while the trainer is still sending
    finally:
        stop.set()
        trainer.join(30)
        close_channels()
    assert not node.alive()

    path, payload = CheckpointStore(ckpt).load_latest()
    saved = payload["experts"]["ffn.1"]
    assert saved["updates"] > 0
    assert saved["updates"] <= sent["n"]

    first_id = node.ready["node_id"]
    node = launch("node", args, name="node")
    ep = node.ready["grpc"]
    try:
        # the same identity: its peer id, and the key that signs (and so may refresh or withdraw) its records
        assert node.ready["node_id"] == first_id
        assert (ckpt / "identity" / "signing.key").stat().st_mode & 0o777 == 0o600
        assert updates(ep, "ffn.1") == saved["updates"]
        assert updates(ep, "ffn.0") == 0
        expected = create_expert("ffn", hidden_dim=H, seed=3, uid="ffn.1")
        expected.load_state_dict(saved["module"])
        x = torch.randn(4, H)
        (y,) = call(ep, "Forward", "ffn.1", [x])
        with torch.no_grad():
            assert torch.allclose(y, expected(x), atol=1e-6), "restored weights are the checkpoint's"
            fresh = create_expert("ffn", hidden_dim=H, seed=3, uid="ffn.1")(x)
        assert not torch.allclose(y, fresh, atol=1e-4)
        assert f"restored 2 expert(s) from {path.name}" in node.log_tail(60)
        # and it keeps training from there, optimizer state included
        call(ep, "Backward", "ffn.1", [torch.randn(8, H), torch.randn(8, H)])
        assert updates(ep, "ffn.1") == saved["updates"] + 1
    finally:
        close_channels()
    assert node.stop(timeout=30) == 0
    assert os.path.exists(ckpt)
