"""The training loop in-process (experts in-process too): log records, evaluation, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch

from dmoe.errors import ConfigError
from dmoe.train.data import ByteCorpus
from dmoe.train.model import GPT, ExpertOptimizer, ModelConfig, local_moe_factory
from dmoe.train.trainer import LocalUpdater, Trainer, TrainOptions, load_checkpoint

CFG = ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, grid_size=(2, 2), k_best=2)


@pytest.fixture(scope="module")
def corpus() -> ByteCorpus:
    return ByteCorpus.load(max_bytes=1_000_000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(corpus: ByteCorpus, tmp_path, *, steps: int, config: ModelConfig = CFG, **kw) -> Trainer:
    torch.manual_seed(0)
    model = GPT(config, local_moe_factory(config, seed=0))
    options = TrainOptions(steps=steps, batch_size=8, lr=3e-3, eval_every=10, eval_batches=2, progress=False,
                           log_file=str(tmp_path / "log.jsonl"), checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    return Trainer(model=model, corpus=corpus, options=options,
                   updater=LocalUpdater(model.local_parameters(), lr=options.lr),
                   expert_optimizer=ExpertOptimizer(model, lr=3e-3))


def records(tmp_path, kind: str) -> list[dict]:
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_run_logs_every_step_evaluates_and_checkpoints(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, steps=20)
    result = trainer.run()
    trainer.close()
    assert result.steps == 20 and result.batches == 20 and result.skipped == 0 and result.stopped_by == "steps"
    steps = records(tmp_path, "step")
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        assert {"time", "loss", "tokens_per_s", "step_time", "failures", "skipped", "experts_alive"} <= r.keys()
        assert r["skipped"] is False and r["tokens_per_s"] > 0
    evals = records(tmp_path, "eval")
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    state = load_checkpoint(tmp_path / "ckpt")
    assert state is not None and state["step"] == 20


def test_resume_continues_the_step_count_with_the_same_weights(corpus, tmp_path):
    first = make_trainer(corpus, tmp_path, steps=6)
    first.run()
    first.close()
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    second = make_trainer(corpus, tmp_path, steps=9)
    assert second.resume() and second.step == 6
    assert all(torch.equal(saved[k], v) for k, v in second.model.state_dict().items())
    assert second.generator.get_state().equal(first.generator.get_state())
    second.run()
    second.close()
    assert [r["step"] for r in records(tmp_path, "step")] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert load_checkpoint(tmp_path / "ckpt")["step"] == 9


def test_checkpoint_of_another_model_is_refused(corpus, tmp_path):
    trainer = make_trainer(corpus, tmp_path, steps=1)
    trainer.run()
    trainer.close()
    bigger = ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=64, grid_size=(2, 2), k_best=2)
    other = make_trainer(corpus, tmp_path, steps=2, config=bigger)
    with pytest.raises(ConfigError, match="n_embd: 32 there, 64 here"):
        other.resume()
    other.close()
