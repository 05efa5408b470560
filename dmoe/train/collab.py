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
of the run after the same collaborative update.

An all-reduce round is best effort: matchmaking can miss a peer on a busy machine, a round can
fall back to local gradients, and a peer that finishes first and exits can cut off the results
the others were still receiving from it. So the run ends with a **final agreement**
(``CollaborativeUpdater.agree``): every trainer that reaches the last epoch publishes a
fingerprint of its parameters in the DHT and waits (bounded by ``final_sync_budget``) for the
run's other trainers at or one epoch before that epoch. If the fingerprints differ, all adopt one
of them (the most common, ties to the smallest peer id): the others download that trainer's
parameters and optimizer state through hivemind's state sharing, which copies them bit for bit.
Nobody leaves until all fingerprints match, so the peer being downloaded from stays up. A trainer
alone in its run finds nobody to wait for and finishes at once. Each fingerprint is stored under
a subkey carrying its trainer's owner marker, so the DHT's signature check lets nobody else
overwrite it; entries without one are ignored.

The optimizer is not offloaded (``offload_optimizer=False``): it works on the model's own
parameters, so loading a checkpoint into the model needs no extra copy.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.grad_averager import GradientAverager
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dmoe.config.train import CollabOptions
from dmoe.dht import patches

log = logging.getLogger(__name__)


@dataclass
class _FinalRecord:
    epoch: int
    params: str


class CollaborativeUpdater:
    """``Updater`` (see ``dmoe.train.trainer``) backed by ``hivemind.Optimizer``; ``step_count`` is the epoch."""

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
        self.params = list(params)
        request_timeout = min(3.0, options.matchmaking_time / 2)
        self.opt = hivemind.Optimizer(
            dht=dht,
            run_id=options.run_id,
            target_batch_size=options.target_batch_size,
            batch_size_per_step=batch_size,
            optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
            params=self.params,
            offload_optimizer=False,
            matchmaking_time=options.matchmaking_time,
            averaging_timeout=options.averaging_timeout,
            load_state_timeout=options.load_state_timeout,
            average_state_every=options.average_state_every,
            verbose=False,
            # matchmaking can deadlock unless a request times out before the matchmaking time is over;
            # hivemind 1.1 passes averager_opts to the state averager only, so the gradient averager
            # gets the same limit through its factory
            averager_opts={"request_timeout": request_timeout},
            grad_averager_factory=partial(GradientAverager, request_timeout=request_timeout),
        )
        self.loaded_from_peers = 0  # state downloads: at join, when out of sync, at the final agreement
        self.local_only_steps = 0  # epochs applied with local gradients although other trainers were seen
        self._averaged_with = 0  # group size of the last gradient all-reduce (0: none)
        self._last_round: object | None = None
        self._final_key = f"{options.run_id}_final_params"
        self._me = self.dht.peer_id.to_bytes()
        # our fingerprint's subkey carries our owner marker, so the DHT lets nobody else overwrite it
        # (the process-wide key: the one ProcessDHT gave this hivemind.DHT's validator)
        self._owner = RSASignatureValidator(RSAPrivateKey.process_wide()).local_public_key
        # hivemind downloads by itself when the trainer falls behind the run; count those downloads too
        patches.count_state_downloads(self.opt, self._count_download)

    def _count_download(self) -> None:
        self.loaded_from_peers += 1

    @property
    def step_count(self) -> int:
        return int(self.opt.local_epoch)

    def step(self, batch_size: int) -> bool:
        before, downloads = self.opt.local_epoch, self.loaded_from_peers
        self.opt.step(batch_size=batch_size)
        if self.opt.local_epoch == before:
            return False
        if self.loaded_from_peers == downloads:
            self._note_round(before)
        else:
            log.info("fell behind the run: downloaded epoch %d from peers", self.step_count)
        return True

    def _note_round(self, epoch: int) -> None:
        """Say so when an epoch was applied with local gradients only although other trainers were seen.

        hivemind keeps the control of the round it just ran in ``scheduled_grads``; a control we
        saw before, none, or a failed one means no averaged gradients reached the optimizer.
        """
        control = self.opt.scheduled_grads
        group, reason = 0, "no averaging round"
        if control is not None and control is not self._last_round and control.done():
            try:
                group, reason = len(control.result(timeout=0)), "a group of one"
            except BaseException as e:  # the round failed; hivemind used local gradients
                reason = f"round failed: {e!r}"[:200]
        self._last_round = control
        self._averaged_with = group
        peers = self.opt.tracker.global_progress.num_peers
        if group < 2 and peers > 1:
            self.local_only_steps += 1
            log.warning("epoch %d -> %d used local gradients only (%s) although %d trainers are in the run; "
                        "parameter averaging and the final agreement repair the drift", epoch, self.step_count,
                        reason, peers)

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
            "averaged_with": self._averaged_with,
            "local_only_steps": self.local_only_steps,
        }

    def flush(self, *, final: bool = False, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Finish background averaging before a checkpoint; at the run's last step (``final``), also agree
        on the parameters with the run's other trainers (see ``agree``) and return what happened."""
        try:
            self.opt.state_averager.step(wait_for_delayed_updates=True)
        except Exception as e:  # a failed last round leaves the (already synchronous) parameters as they are
            log.warning("last state averaging round failed: %s", e)
        return self.agree(should_stop=should_stop) if final else None

    # ---- final agreement ----

    def agree(self, *, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Make the trainers that reached this epoch end with bit-identical parameters (bounded in time).

        Returns a summary for the log: ``agreed`` (all trainers seen at this epoch match), ``peers``
        (how many, us included), ``downloaded`` (we adopted another trainer's state), ``seconds``.
        """
        opts = self.options
        epoch = self.step_count
        t0 = time.monotonic()
        deadline = t0 + opts.final_sync_budget
        mine = params_fingerprint(self.params)
        self._publish(epoch, mine)
        downloaded = False
        waiting: set[bytes] = set()
        finals: dict[bytes, str] = {self._me: mine}
        chosen = mine
        agreed = False
        while True:
            records = self._read_finals()
            finals = {peer: r.params for peer, r in records.items() if r.epoch == epoch}
            finals[self._me] = mine
            finished_elsewhere = {peer for peer, r in records.items() if r.epoch != epoch}
            waiting = self._training_peers(epoch) - finals.keys() - finished_elsewhere - {self._me}
            chosen = _choose(finals)
            if not waiting and all(fp == chosen for fp in finals.values()):
                agreed = True
                break
            if time.monotonic() >= deadline or (should_stop is not None and should_stop()):
                break
            if not waiting and mine != chosen:
                mine, got = self._adopt(chosen, epoch, deadline)
                downloaded = downloaded or got
                self._publish(epoch, mine)
                continue
            time.sleep(opts.poll_interval)
        self.opt.state_averager.allow_state_sharing = True
        summary = {"epoch": epoch, "agreed": agreed, "peers": len(finals), "waiting_for": len(waiting),
                   "downloaded": downloaded, "params": mine, "seconds": round(time.monotonic() - t0, 3)}
        if agreed and len(finals) > 1:
            log.info("final agreement at epoch %d: %d trainers hold identical parameters %s%s", epoch,
                     len(finals), mine, " (downloaded)" if downloaded else "")
        elif not agreed:
            log.warning("final agreement at epoch %d not reached in %.0fs: %d trainer(s) still training, "
                        "fingerprints %s; keeping ours (%s)", epoch, summary["seconds"], len(waiting),
                        sorted(set(finals.values())), mine)
        return summary

    def _adopt(self, chosen: str, epoch: int, deadline: float) -> tuple[str, bool]:
        """Download the state of a trainer holding ``chosen``; returns our new fingerprint and whether it changed.

        We stop sharing our own (outvoted) state first, so that others download from a holder.
        """
        log.warning("parameters differ from the run's at epoch %d (%s here, %s chosen): downloading them",
                    epoch, params_fingerprint(self.params), chosen)
        self.opt.state_averager.allow_state_sharing = False
        before = params_fingerprint(self.params)
        timeout = max(1.0, min(self.options.load_state_timeout, deadline - time.monotonic()))
        try:
            self.opt.state_averager.load_state_from_peers(timeout=timeout)
        except Exception as e:  # retried by the caller's loop until its deadline
            log.warning("download at the final agreement failed: %r", e)
            time.sleep(self.options.poll_interval)
        after = params_fingerprint(self.params)
        if after != before:
            self.loaded_from_peers += 1
        if after == chosen:
            self.opt.state_averager.allow_state_sharing = True
        return after, after != before

    def _publish(self, epoch: int, fingerprint: str) -> None:
        expiration = get_dht_time() + self.options.final_sync_budget + 60.0
        ok = self.dht.store(self._final_key, subkey=self._me + self._owner,
                            value={"epoch": epoch, "params": fingerprint}, expiration_time=expiration)
        if not ok:
            log.warning("could not publish the final parameter fingerprint to the DHT")

    def _read_finals(self) -> dict[bytes, _FinalRecord]:
        found = self.dht.get(self._final_key, latest=True)
        records: dict[bytes, _FinalRecord] = {}
        for subkey, entry in _subkeys(found).items():
            peer = owned_peer(subkey)
            value = entry.value if isinstance(entry, ValueWithExpiration) else None
            if peer is None:
                continue  # unsigned: anybody could have written it
            if isinstance(value, dict) and isinstance(value.get("epoch"), int) and isinstance(value.get("params"), str):
                records[peer] = _FinalRecord(epoch=value["epoch"], params=value["params"])
        return records

    def _training_peers(self, epoch: int) -> set[bytes]:
        """Peers whose progress record says they are at ``epoch`` or one before it (and so should arrive).

        A live trainer's tracker refreshes its record even while blocked in an averaging round; a
        trainer that exits withdraws it, and one that died drops out when the record expires.
        """
        found = self.dht.get(f"{self.options.run_id}_progress", latest=True)
        peers: set[bytes] = set()
        for entry in _subkeys(found).values():
            value = entry.value if isinstance(entry, ValueWithExpiration) else None
            if not isinstance(value, dict) or value.get("client_mode"):
                continue
            if epoch - 1 <= value.get("epoch", -1) <= epoch:
                peers.add(bytes(value["peer_id"]))
        return peers

    def shutdown(self) -> None:
        self.opt.shutdown()


def owned_peer(subkey: Any) -> bytes | None:
    """The peer id of a ``PEER_ID[owner:KEY]`` subkey (signed by KEY's holder); None for anything else."""
    if not isinstance(subkey, bytes):
        return None
    head, sep, rest = subkey.rpartition(b"[owner:")
    return head if sep and head and len(rest) > 1 and rest.endswith(b"]") and b"]" not in rest[:-1] else None


def _subkeys(found: Any) -> dict[bytes, Any]:
    """The ``{subkey: ValueWithExpiration}`` dict of a DHT ``get(..., latest=True)`` result, or {}."""
    value = found.value if isinstance(found, ValueWithExpiration) else None
    return value if isinstance(value, dict) else {}


def _choose(finals: dict[bytes, str]) -> str:
    """The fingerprint everyone adopts: the most common one, ties to the one held by the smallest peer id."""
    counts = Counter(finals.values())
    return min(finals.items(), key=lambda item: (-counts[item[1]], item[0]))[1]


def params_fingerprint(params: list[torch.nn.Parameter]) -> str:
    """A short hash of the parameter bytes: equal fingerprints mean bit-identical parameters."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for p in params:
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
