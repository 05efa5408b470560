"""The final agreement of ``dmoe.train.collab``: trainers of one run that reach the last epoch with different
parameters end bit-identical, and a trainer alone in its run does not wait.

Each trainer is a real OS process (a fresh interpreter) with its own hivemind DHT and
``hivemind.Optimizer``; the two of one run differ from the start (other seeds) and never average,
so only the final agreement can make them equal. Two trainers cannot share one process: hivemind's
progress records are keyed by the process-wide signing key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch

from dmoe.train.collab import CollabOptions, CollaborativeUpdater, params_fingerprint

pytestmark = pytest.mark.integration  # real processes

TESTS_DIR = Path(__file__).resolve().parent


def _trainer(*, initial_peers: list[str], run_id: str, seed: int, expect_peers: int) -> dict[str, Any]:
    """One trainer at epoch 0: show up in the run, wait until ``expect_peers`` are seen, then agree."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))]
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    options = CollabOptions(run_id=run_id, target_batch_size=10**6, matchmaking_time=1.0, final_sync_timeout=60.0)
    updater = CollaborativeUpdater(dht=dht, params=params, lr=1e-3, weight_decay=0.0, batch_size=1, options=options)
    try:
        before = params_fingerprint(params)
        tracker = updater.opt.tracker
        deadline = time.monotonic() + 90
        while tracker.global_progress.num_peers < expect_peers and time.monotonic() < deadline:
            tracker.report_local_progress(0, 1)  # a record the others can see
            time.sleep(0.5)
        summary = updater.flush(final=True) or {}
        return {"seed": seed, "before": before, "after": params_fingerprint(params), **summary}
    finally:
        updater.shutdown()
        dht.shutdown()


def _main() -> None:
    print("result " + json.dumps(_trainer(**json.loads(sys.argv[1]))), flush=True)


def _run(trainers: list[dict[str, Any]], timeout: float = 180) -> dict[int, dict[str, Any]]:
    """Start one process per trainer (all joined through a bootstrap DHT peer); their results by seed."""
    bootstrap = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    peers = [str(m) for m in bootstrap.get_visible_maddrs()]
    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_collab; test_collab._main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps({"initial_peers": peers, **t})], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for t in trainers]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        bootstrap.shutdown()
    results = {}
    for p, out in zip(procs, outputs, strict=True):
        lines = [line for line in out.splitlines() if line.startswith("result ")]
        assert p.returncode == 0 and lines, f"trainer exited with {p.returncode}:\n{out[-3000:]}"
        result = json.loads(lines[-1][len("result "):])
        results[result["seed"]] = result
    return results


@pytest.mark.timeout(300)
def test_final_agreement_makes_trainers_bit_identical_and_a_lone_trainer_does_not_wait():
    results = _run([{"run_id": "pair", "seed": 1, "expect_peers": 2}, {"run_id": "pair", "seed": 2, "expect_peers": 2},
                    {"run_id": "alone", "seed": 3, "expect_peers": 1}])
    a, b, alone = results[1], results[2], results[3]
    assert a["before"] != b["before"]
    assert a["agreed"] and b["agreed"] and a["peers"] == b["peers"] == 2
    assert a["after"] == b["after"] == a["params"] == b["params"]
    assert a["after"] in (a["before"], b["before"])  # one trainer's parameters, not a mix
    assert a["downloaded"] != b["downloaded"]  # exactly one adopted the other's

    assert alone["agreed"] and alone["peers"] == 1 and not alone["downloaded"]
    assert alone["after"] == alone["before"]
    assert alone["seconds"] < 10  # nobody to wait for (the timeout is 60 s)
