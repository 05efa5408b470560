"""The trainer's byte corpus: default stdlib sources, deterministic split by file, batches, --data paths."""

from __future__ import annotations

import pytest
import torch

from dmoe.errors import ConfigError
from dmoe.train.data import ByteCorpus, _is_validation, default_corpus_root


@pytest.fixture(scope="module")
def stdlib() -> ByteCorpus:
    return ByteCorpus.load(max_bytes=3_000_000)


def test_default_corpus_is_this_pythons_stdlib_split_by_file(stdlib):
    info = stdlib.info
    assert info.root == str(default_corpus_root())
    assert info.split == "by-file"
    assert info.train_files > 0 and info.val_files > 0
    assert info.train_files + info.val_files == info.num_files
    assert 0.02 < info.val_files / info.num_files < 0.25  # about the 10 % asked for
    assert info.train_bytes + info.val_bytes >= 3_000_000
    assert b"def " in bytes(stdlib.train[:200_000].tolist())  # it really is Python source


def test_split_is_deterministic_and_disjoint(stdlib):
    again = ByteCorpus.load(max_bytes=3_000_000)
    assert torch.equal(again.train, stdlib.train) and torch.equal(again.val, stdlib.val)
    # the rule depends only on the relative path
    assert _is_validation("json/decoder.py", 10.0) == _is_validation("json/decoder.py", 10.0)
    shares = [_is_validation(f"pkg/mod{i}.py", 10.0) for i in range(2000)]
    assert 0.07 < sum(shares) / len(shares) < 0.13


def test_batches_are_next_byte_windows(stdlib):
    g = torch.Generator().manual_seed(0)
    x, y = stdlib.batch("train", batch_size=8, block_size=32, generator=g)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256 and int(x.min()) >= 0
    g2 = torch.Generator().manual_seed(0)
    x2, _ = stdlib.batch("train", batch_size=8, block_size=32, generator=g2)
    assert torch.equal(x, x2)
    evals = stdlib.eval_batches(num_batches=2, batch_size=4, block_size=16)
    evals2 = stdlib.eval_batches(num_batches=2, batch_size=4, block_size=16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evals, evals2, strict=True))


def test_data_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(500)).encode()
    path = tmp_path / "book.txt"
    path.write_bytes(text)
    corpus = ByteCorpus.load(path, val_percent=20)
    assert corpus.info.split == "by-position"
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == text
    assert abs(corpus.val.numel() - 0.2 * len(text)) <= 1


def test_data_folder_is_split_by_file(tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    (tmp_path / ".hidden").write_text("never read")
    corpus = ByteCorpus.load(tmp_path)
    assert corpus.info.split == "by-file" and corpus.info.num_files == 60
    assert b"never read" not in bytes(corpus.train.tolist()) + bytes(corpus.val.tolist())


def test_bad_data_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a folder"):
        ByteCorpus.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no text files"):
        ByteCorpus.load(tmp_path / "empty")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc" * 10)
    corpus = ByteCorpus.load(tiny)
    with pytest.raises(ConfigError, match="smaller --block-size"):
        corpus.check_block_size(64)
