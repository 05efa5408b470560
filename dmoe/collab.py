"""Several trainers, one model: keep the trainers' local parameters in agreement with hivemind.

Experts are shared by construction (they live on the nodes). What each trainer owns is the rest
of the model: embeddings, attention, norms, gates, head. Trainers started with the same
``--run-id`` train those together through ``hivemind.Optimizer`` in its default, synchronous
mode:

* every trainer computes gradients on its own batches and reports progress to the DHT;
* when the trainers *together* have processed ``target_batch_size`` samples (one *epoch*), they
  average their accumulated gradients in one all-reduce round and each applies the same AdamW
  update, so parameters that were equal stay equal;
* after each update hivemind also averages the parameters and optimizer statistics
  (``average_state_every`` epochs), which repairs drift from a missed round;
* a trainer that is behind the swarm's epoch (a late joiner, or one that missed rounds) first
  downloads parameters and optimizer state from a peer (``load_state_from_peers``).

For the trainer a *step* is then one epoch (``local_epoch``): ``--steps N`` stops every trainer
of the run right after the same collaborative update, so they end with equal parameters.

The optimizer is not offloaded (``offload_optimizer=False``): it works on the model's own
parameters, so loading a checkpoint into the model needs no extra copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import hivemind
import torch

log = logging.getLogger(__name__)


@dataclass
class CollabOptions:
    run_id: str
    target_batch_size: int = 256  # samples (sequences) per collaborative step, summed over trainers
    matchmaking_time: float = 3.0  # seconds to wait for peers before an averaging round
    averaging_timeout: float = 30.0  # seconds an averaging round may take before giving up
    load_state_timeout: float = 60.0  # seconds to download state from a peer
    average_state_every: int = 1  # epochs between parameter/optimizer-state averaging rounds
    join_timeout: float = 10.0  # seconds to wait for the swarm's progress before deciding to download


class CollaborativeUpdater:
    """``Updater`` (see ``dmoe.trainer``) backed by ``hivemind.Optimizer``; ``step_count`` is the epoch."""

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        params: list[torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        batch_size: int,
        options: CollabOptions,
    ) -> None:
        self.options = options
        self.dht = dht
        self.opt = hivemind.Optimizer(
            dht=dht,
            run_id=options.run_id,
            target_batch_size=options.target_batch_size,
            batch_size_per_step=batch_size,
            optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
            params=params,
            offload_optimizer=False,
            matchmaking_time=options.matchmaking_time,
            averaging_timeout=options.averaging_timeout,
            load_state_timeout=options.load_state_timeout,
            average_state_every=options.average_state_every,
            verbose=False,
            # hivemind warns (deadlock risk) unless its request timeout is below the matchmaking time
            averager_opts={"request_timeout": min(3.0, options.matchmaking_time / 2)},
        )
        self.loaded_from_peers = 0

    @property
    def step_count(self) -> int:
        return int(self.opt.local_epoch)

    def step(self, batch_size: int) -> bool:
        before = self.opt.local_epoch
        self.opt.step(batch_size=batch_size)
        return self.opt.local_epoch != before

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        state = dict(state)
        state["state"] = dict(state["state"])
        state["state"]["local_epoch"] = step
        self.opt.load_state_dict(state)

    def join(self) -> dict[str, Any]:
        """Catch up with the run before training: download state from peers if they are ahead."""
        tracker = self.opt.tracker
        deadline = time.monotonic() + self.options.join_timeout
        # wait until the run's progress shows it ahead of us, or the deadline: the first progress
        # fetch can come back before the other trainers' records are visible (seen on busy machines)
        while time.monotonic() < deadline and not (
            tracker.fetched_global_progress_this_epoch.is_set() and tracker.global_epoch > self.step_count
        ):
            time.sleep(0.1)
        peers = tracker.global_progress.num_peers
        global_epoch = tracker.global_epoch
        info: dict[str, Any] = {"peers": peers, "global_epoch": global_epoch, "local_epoch": self.step_count,
                                "downloaded": False}
        if global_epoch > self.step_count:
            t0 = time.monotonic()
            log.info("run %r is at epoch %d (we are at %d): downloading state from peers",
                     self.options.run_id, global_epoch, self.step_count)
            self.opt.load_state_from_peers()
            self.loaded_from_peers += 1
            info.update(downloaded=True, local_epoch=self.step_count, seconds=time.monotonic() - t0)
            log.info("state downloaded in %.1fs; now at epoch %d", info["seconds"], self.step_count)
        return info

    def status(self) -> dict[str, Any]:
        tracker = self.opt.tracker
        return {
            "epoch": self.step_count,
            "global_epoch": tracker.global_epoch,
            "peers": tracker.global_progress.num_peers,
            "samples_accumulated": tracker.local_progress.samples_accumulated,
        }

    def flush(self) -> None:
        """Wait for and apply a background state-averaging round, so a final checkpoint includes it."""
        try:
            self.opt.state_averager.step(wait_for_delayed_updates=True)
        except Exception as e:  # a failed last round leaves the (already synchronous) parameters as they are
            log.warning("last state averaging round failed: %s", e)

    def shutdown(self) -> None:
        self.opt.shutdown()


def params_fingerprint(params: list[torch.nn.Parameter]) -> str:
    """A short hash of the parameter bytes: equal fingerprints mean bit-identical parameters."""
    import hashlib

    digest = hashlib.sha1()
    with torch.no_grad():
        for p in params:
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
