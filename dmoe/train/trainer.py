"""The training loop behind ``dmoe train``: one process, one model, experts wherever they live.

A *step* is one update of the trainer's local parameters. Alone, that is one batch; with
``--run-id`` (``dmoe.train.collab``), it is one collaborative epoch of hivemind's optimizer, which
may take several local batches. Every attempted batch writes one JSON line to ``--log-file``:

    {"type": "step", "time": ..., "step": 12, "batch": 13, "loss": 3.1, "aux_loss": 1.0,
     "tokens_per_s": 9000.0, "step_time": 0.23, "skipped": false, "skipped_total": 0,
     "failures": {"deadline": 1}, "failures_total": {...}, "experts_alive": 31, "experts_reached": 9,
     "remote_s": 0.18}

plus ``eval`` records (validation loss every ``--eval-every`` steps), ``checkpoint``, ``start``
and ``stop`` records, and with ``--run-id`` a ``final_sync`` record (the trainers' agreement at
``--steps``, see ``dmoe.train.collab``). The simulator and plots read this file.

Failure handling: a batch whose forward or backward raises ``NotEnoughExperts`` (some sample got
fewer than ``k_min`` answers) is *skipped*: gradients are dropped, the record says
``"skipped": true`` with the reason, the trainer waits a short, growing pause (so a swarm that
vanished is not hammered) and carries on; nothing is counted as a step. Calls that failed but
were covered by other experts show up only in ``failures``.

Stopping: SIGINT or SIGTERM ends the loop after the current batch, then the trainer saves a
checkpoint and exits 0; a second signal interrupts at once. Checkpoints (local parameters,
optimizer state, step counters, data RNG) are written atomically (temp file, fsync, rename)
every ``--checkpoint-interval`` seconds and on exit, and ``Trainer`` resumes from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from prometheus_client import Counter, Gauge
from tqdm import tqdm

from dmoe.config.train import TrainOptions
from dmoe.errors import ConfigError, DmoeError
from dmoe.metrics_exporter import MetricsExporter
from dmoe.train.data import ByteCorpus
from dmoe.train.model import GPT, ExpertOptimizer
from dmoe.train.pipeline import MicroBatches

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "trainer.pt"
CHECKPOINT_FORMAT = 1


class Updater(Protocol):
    """Applies gradients to the local parameters: plain AdamW, or hivemind's collaborative optimizer."""

    @property
    def step_count(self) -> int: ...

    def step(self, batch_size: int) -> bool: ...  # True when the local parameters changed

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], step: int) -> None: ...

    def status(self) -> dict[str, Any]: ...  # extra fields for the step record

    def flush(self, *, final: bool = False, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Finish background work before a checkpoint; ``final``: the run reached ``--steps``, so agree with
        other trainers of the run (if any) before the last checkpoint. Returns a record for the log, or None."""
        ...

    def shutdown(self) -> None: ...


class LocalUpdater:
    """AdamW over the trainer's local parameters, one update per batch."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0) -> None:
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self._steps = 0

    @property
    def step_count(self) -> int:
        return self._steps

    def step(self, batch_size: int) -> bool:
        self.optimizer.step()
        self._steps += 1
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.optimizer.load_state_dict(state)
        self._steps = step

    def status(self) -> dict[str, Any]:
        return {}

    def flush(self, *, final: bool = False, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        return None

    def shutdown(self) -> None:
        pass


@dataclass
class SwarmSnapshot:
    """Cumulative call counters of the MoE client and what it currently sees of the swarm."""

    failures: dict[str, int] = field(default_factory=dict)  # by failure kind, cumulative
    answers: int = 0  # cumulative successful expert calls
    experts_alive: int | None = None  # experts the client currently knows to be announced
    experts_reached: int | None = None  # distinct experts that answered in the last batch
    # seconds the last batch (its last piece, with --micro-batches) spent in its MoE layers' search, expert
    # calls and backward calls, all layers: what of a step is the swarm's (and its links') rather than local
    remote_seconds: float | None = None


SwarmProbe = Callable[[], SwarmSnapshot]


class TrainerMetrics(MetricsExporter):
    """Prometheus metrics of one trainer, on their own registry (several trainers may share a process)."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.steps = Counter("dmoe_trainer_steps", "optimizer steps of the local parameters", registry=r)
        self.batches = Counter("dmoe_trainer_batches", "batches processed (including skipped)", registry=r)
        self.skipped = Counter("dmoe_trainer_skipped_batches", "batches skipped for lack of experts", registry=r)
        self.tokens = Counter("dmoe_trainer_tokens", "training tokens (bytes) processed", registry=r)
        self.failures = Counter(
            "dmoe_trainer_expert_failures", "failed expert calls by kind", ["kind"], registry=r
        )
        self.loss = Gauge("dmoe_trainer_loss", "training loss of the last batch", registry=r)
        self.val_loss = Gauge("dmoe_trainer_val_loss", "last validation loss", registry=r)
        self.tokens_per_s = Gauge("dmoe_trainer_tokens_per_second", "tokens per second, last batch", registry=r)
        self.experts_alive = Gauge("dmoe_trainer_experts_alive", "experts announced and visible", registry=r)


class JsonLog:
    """Append-only JSON-lines file, flushed per record; a no-op without a path."""

    def __init__(self, path: str | None) -> None:
        self._file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=_json_default) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ---- checkpoints ----


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: temp file in the same folder, fsync, rename, fsync the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory)
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a dmoe trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# ---- the loop ----


@dataclass
class TrainResult:
    steps: int
    batches: int
    skipped: int
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    elapsed: float
    stopped_by: str  # "steps", "signal"
    evals: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        *,
        model: GPT,
        corpus: ByteCorpus,
        options: TrainOptions,
        updater: Updater,
        expert_optimizer: ExpertOptimizer | None = None,
        probe: SwarmProbe | None = None,
        endpoint_stats: Callable[[], dict[str, Any]] | None = None,
        device: torch.device | str = "cpu",
        skip_errors: tuple[type[BaseException], ...] = (DmoeError,),
        data_seed: int | None = None,
    ) -> None:
        self.model = model
        self.corpus = corpus
        self.options = options
        self.updater = updater
        self.expert_optimizer = expert_optimizer
        self.probe = probe
        self.endpoint_stats = endpoint_stats  # per expert endpoint: latency, answers, failures (logged at stop)
        self.device = torch.device(device)
        self.skip_errors = skip_errors
        self.block_size = model.config.block_size
        corpus.check_block_size(self.block_size)
        self.generator = torch.Generator().manual_seed(options.seed if data_seed is None else data_seed)
        self.eval_set = corpus.eval_batches(
            num_batches=options.eval_batches, batch_size=options.batch_size, block_size=self.block_size
        )
        self.log = JsonLog(options.log_file)
        self.micro = MicroBatches(options.micro_batches)
        self.metrics = TrainerMetrics()
        self.metrics_port: int | None = None
        self.batches = 0
        self.skipped = 0
        self.tokens = 0
        self.stop_requested: str | None = None
        self._signals_seen = 0
        self._last_failures: dict[str, int] = {}
        self._last_checkpoint = time.monotonic()
        self._last_eval_step: int | None = None
        self.evals: list[dict[str, Any]] = []

    # ---- state ----

    @property
    def step(self) -> int:
        return self.updater.step_count

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "time": time.time(),
            "step": self.step,
            "batches": self.batches,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "model_config": self.model.config.shape_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.updater.state_dict(),
            "expert_optimizer": self.expert_optimizer.state_dict() if self.expert_optimizer else None,
            "data_rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine, theirs = self.model.config.shape_dict(), state.get("model_config", {})
        if mine != theirs:
            diff = ", ".join(
                f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in mine if mine[k] != theirs.get(k)
            )
            raise ConfigError(f"checkpoint was made for a different model ({diff})")
        if (state.get("expert_optimizer") is None) != (self.expert_optimizer is None):
            raise ConfigError("checkpoint was made with experts " + (
                "in-process; run with --local-experts to resume it" if state.get("expert_optimizer") is not None
                else "on nodes; run without --local-experts to resume it"))
        self.model.load_state_dict(state["model"])
        self.updater.load_state_dict(state["optimizer"], int(state["step"]))
        if self.expert_optimizer is not None:
            self.expert_optimizer.load_state_dict(state["expert_optimizer"])
        self.batches = int(state.get("batches", 0))
        self.skipped = int(state.get("skipped", 0))
        self.tokens = int(state.get("tokens", 0))
        if state.get("data_rng") is not None:
            self.generator.set_state(state["data_rng"])

    def resume(self) -> bool:
        """Load the checkpoint in ``--checkpoint-dir`` if there is one; True when resumed."""
        if not self.options.checkpoint_dir:
            return False
        state = load_checkpoint(self.options.checkpoint_dir)
        if state is None:
            return False
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", checkpoint_path(self.options.checkpoint_dir), self.step)
        self.log.write({"type": "resume", "time": time.time(), "step": self.step, "batches": self.batches})
        return True

    def save(self) -> Path | None:
        if not self.options.checkpoint_dir:
            return None
        path = save_checkpoint(self.options.checkpoint_dir, self.state_dict())
        self._last_checkpoint = time.monotonic()
        self.log.write({"type": "checkpoint", "time": time.time(), "step": self.step, "path": str(path)})
        log.info("checkpoint saved at step %d: %s", self.step, path)
        return path

    # ---- signals ----

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            raise KeyboardInterrupt
        self.stop_requested = signal.Signals(signum).name
        log.warning("%s received: stopping after the current batch (send again to stop at once)", self.stop_requested)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the fixed eval set; None if experts were missing."""
        was_training = self.model.training
        self.model.eval()
        try:
            losses = []
            for x, y in self.eval_set:
                _, loss = self.model(x.to(self.device), y.to(self.device))
                losses.append(float(loss))
            return sum(losses) / len(losses)
        except self.skip_errors as e:
            log.warning("evaluation at step %d failed: %s", self.step, e)
            return None
        finally:
            self.model.train(was_training)

    def _maybe_evaluate(self, *, force: bool = False) -> None:
        every = self.options.eval_every
        if self.step == self._last_eval_step or not (force or (every > 0 and self.step % every == 0)):
            return
        t0 = time.perf_counter()
        val_loss = self.evaluate()
        record = {"type": "eval", "time": time.time(), "step": self.step, "val_loss": val_loss,
                  "eval_time": time.perf_counter() - t0}
        self._last_eval_step = self.step
        self.evals.append(record)
        self.log.write(record)
        if val_loss is not None:
            self.metrics.val_loss.set(val_loss)
            log.info("step %d: validation loss %.4f", self.step, val_loss)

    # ---- one batch ----

    def _probe(self) -> SwarmSnapshot:
        if self.probe is None:
            return SwarmSnapshot()
        try:
            return self.probe()
        except Exception as e:  # metrics must never stop training
            log.debug("swarm probe failed: %s", e)
            return SwarmSnapshot()

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM loss and load-balancing loss of one (micro-)batch, with their graph."""
        _, loss = self.model(x, y)
        assert loss is not None
        return loss, self.model.aux_loss().to(loss.device)

    def train_batch(self) -> dict[str, Any]:
        """Forward, backward and update on one batch; returns its log record."""
        opts = self.options
        x, y = self.corpus.batch(
            "train", batch_size=opts.batch_size, block_size=self.block_size, generator=self.generator,
            device=self.device,
        )
        t0 = time.perf_counter()
        step_before = self.step
        record: dict[str, Any] = {"type": "step", "time": 0.0}
        try:
            loss, aux = self.micro.forward_backward(self._losses, x, y, aux_weight=opts.aux_loss_weight)
        except self.skip_errors as e:
            self.updater.zero_grad()
            if self.expert_optimizer is not None:
                self.expert_optimizer.zero_grad()
            self.skipped += 1
            record.update(skipped=True, error=f"{type(e).__name__}: {e}"[:500], error_kind=getattr(e, "kind", "error"))
        else:
            if opts.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.local_parameters(), opts.clip_grad_norm)
            self.updater.step(x.shape[0])
            self.updater.zero_grad()
            if self.expert_optimizer is not None:
                self.expert_optimizer.step()
            record.update(skipped=False, loss=_finite(loss), aux_loss=_finite(aux))
        step_time = time.perf_counter() - t0
        self.batches += 1
        tokens = x.numel() if not record["skipped"] else 0
        self.tokens += tokens
        snap = self._probe()
        failures_delta = {k: v - self._last_failures.get(k, 0) for k, v in snap.failures.items()}
        failures_delta = {k: v for k, v in failures_delta.items() if v}
        self._last_failures = dict(snap.failures)
        record.update(
            time=time.time(),
            step=self.step,
            batch=self.batches,
            updated=self.step != step_before,
            tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
            step_time=step_time,
            skipped_total=self.skipped,
            failures=failures_delta,
            failures_total=dict(snap.failures),
            experts_alive=snap.experts_alive,
            experts_reached=snap.experts_reached,
            remote_s=snap.remote_seconds,
            **self.updater.status(),
            **opts.extra_log_fields,
        )
        # metrics
        m = self.metrics
        m.batches.inc()
        if record["skipped"]:
            m.skipped.inc()
        else:
            m.tokens.inc(tokens)
            if record["loss"] is not None:
                m.loss.set(record["loss"])
            m.tokens_per_s.set(record["tokens_per_s"])
        if record["updated"]:
            m.steps.inc(self.step - step_before)
        for kind, n in failures_delta.items():
            m.failures.labels(kind=kind).inc(n)
        if snap.experts_alive is not None:
            m.experts_alive.set(snap.experts_alive)
        self.log.write(record)
        return record

    # ---- the loop ----

    def start_metrics(self) -> int | None:
        """Serve Prometheus metrics on ``--metrics-port`` (once); returns the bound port or None."""
        if self.metrics_port is None and self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_port)
        return self.metrics_port

    def run(self) -> TrainResult:
        opts = self.options
        self.start_metrics()
        self.log.write({"type": "start", "time": time.time(), "step": self.step, "steps": opts.steps,
                        "options": {k: v for k, v in asdict(opts).items() if k != "extra_log_fields"},
                        "model": self.model.config.shape_dict(), "corpus": asdict(self.corpus.info),
                        "metrics_port": self.metrics_port, **opts.extra_log_fields})
        start_step = self.step
        t_start = time.perf_counter()
        tokens_start = self.tokens
        bar = tqdm(total=opts.steps, initial=min(start_step, opts.steps), unit="step", dynamic_ncols=True,
                   disable=not opts.progress, desc="train")
        consecutive_skips = 0
        last_loss: float | None = None
        tok_ema: float | None = None
        stopped_by = "steps"
        try:
            if start_step == 0 and opts.eval_every > 0:
                self._maybe_evaluate(force=True)
            while self.step < opts.steps:
                if self.stop_requested:
                    stopped_by = "signal"
                    break
                before = self.step
                record = self.train_batch()
                if record["skipped"]:
                    consecutive_skips += 1
                    if consecutive_skips in (1, 10) or consecutive_skips % 100 == 0:
                        log.warning("batch skipped (%d in a row): %s", consecutive_skips, record["error"])
                    pause = min(opts.max_skip_pause, opts.skip_pause * 2 ** (consecutive_skips - 1))
                    self._sleep(pause)
                else:
                    if consecutive_skips:
                        log.info("training resumed after %d skipped batches", consecutive_skips)
                    consecutive_skips = 0
                    last_loss = record["loss"]
                    tps = record["tokens_per_s"]
                    tok_ema = tps if tok_ema is None else 0.9 * tok_ema + 0.1 * tps
                if self.step != before:
                    bar.update(min(self.step, opts.steps) - min(before, opts.steps))
                    self._maybe_evaluate()
                bar.set_postfix(_postfix(record, last_loss, tok_ema, self.skipped), refresh=False)
                if self.options.checkpoint_dir and time.monotonic() - self._last_checkpoint >= opts.checkpoint_interval:
                    self.save()
            if self.stop_requested:
                stopped_by = "signal"
            if stopped_by == "steps" and self.step >= opts.steps:
                self._final_sync()
            if self.step >= opts.steps and opts.eval_every > 0:
                self._maybe_evaluate(force=True)
        finally:
            bar.close()
            elapsed = time.perf_counter() - t_start
            self.updater.flush()
            self.save()
            last_val = next((e["val_loss"] for e in reversed(self.evals) if e["val_loss"] is not None), None)
            result = TrainResult(
                steps=self.step, batches=self.batches, skipped=self.skipped, final_loss=last_loss,
                val_loss=last_val, tokens_per_s=(self.tokens - tokens_start) / elapsed if elapsed > 0 else 0.0,
                elapsed=elapsed, stopped_by=stopped_by, evals=self.evals,
            )
            if self.endpoint_stats is not None:
                with contextlib.suppress(Exception):  # a diagnostic: never in the way of stopping
                    self.log.write({"type": "endpoints", "time": time.time(), "endpoints": self.endpoint_stats()})
            self.log.write({"type": "stop", "time": time.time(), **{k: v for k, v in asdict(result).items()
                                                                     if k != "evals"}})
        return result

    def _final_sync(self) -> None:
        """Let the updater agree with the run's other trainers before the final evaluation and checkpoint."""
        sync = self.updater.flush(final=True, should_stop=lambda: self.stop_requested is not None)
        if sync is not None:
            self.log.write({"type": "final_sync", "time": time.time(), **sync})

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def close(self) -> None:
        self.micro.close()
        self.log.close()
        self.metrics.close()


def _postfix(record: dict[str, Any], last_loss: float | None, tok_ema: float | None, skipped: int) -> dict[str, Any]:
    postfix: dict[str, Any] = {}
    if last_loss is not None:
        postfix["loss"] = f"{last_loss:.3f}"
    if tok_ema is not None:
        postfix["tok/s"] = f"{tok_ema:,.0f}"
    if record.get("experts_reached") is not None:
        alive = record.get("experts_alive")
        postfix["experts"] = f"{record['experts_reached']}" + (f"/{alive}" if alive is not None else "")
    postfix["failed"] = sum(record.get("failures_total", {}).values())
    if skipped:
        postfix["skipped"] = skipped
    return postfix
