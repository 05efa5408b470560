"""Byte-level text corpus for the trainer: real text on every machine, no downloads.

Default corpus: the ``.py`` source files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), about 30 MB on CPython 3.11.
``--data`` points at a text file or a folder of text files instead.

Split: a file goes to validation when a hash of its path *relative to the corpus root* falls in
the first ``val_percent`` of 100 buckets, so the split is the same on every machine and every
run, and no file leaks into both halves. When that leaves a split empty (one file, or a folder
with very few files), every file is instead cut by position: the first part trains, the tail
validates.

Batches: each split is one contiguous ``uint8`` tensor (files joined by a blank line); a batch is
``batch_size`` random windows of ``block_size + 1`` bytes, gathered with one indexing op, giving
inputs ``x`` and next-byte targets ``y`` (both ``[B, T]`` int64). Validation uses a fixed set of
windows drawn from a seeded generator, so every evaluation of a run (and of a run it is compared
with) scores the same bytes.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dmoe.config.flags import default_of
from dmoe.config.train import BYTE_VOCAB, DataOptions
from dmoe.errors import ConfigError

VOCAB_SIZE = BYTE_VOCAB
FILE_SEPARATOR = b"\n\n"
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".html", ".csv", ".tex"}


def default_corpus_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_validation(relative_path: str, val_percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:8], "big") % 10_000
    return bucket < val_percent * 100


def _list_files(root: Path, *, stdlib: bool) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"--data {str(root)!r} is neither a file nor a folder")
    if stdlib:
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    else:
        files = [p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)]
        # a folder of text files: skip obvious binaries by suffix when the folder mixes them
        texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES or p.suffix == ""]
        files = texts or files
    return sorted(files)


@dataclass
class CorpusInfo:
    root: str
    num_files: int
    train_files: int
    val_files: int
    train_bytes: int
    val_bytes: int
    split: str  # "by-file" or "by-position"


class ByteCorpus:
    """Train/validation byte tensors plus batch sampling."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, info: CorpusInfo) -> None:
        self.train = train
        self.val = val
        self.info = info

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        val_percent: float = default_of(DataOptions, "val_percent"),
        max_bytes: int | None = None,
    ) -> ByteCorpus:
        """Read ``path`` (default: the stdlib sources) and split it; ``max_bytes`` caps what is read."""
        if not 0 < val_percent < 100:
            raise ConfigError(f"validation share must be between 0 and 100 %, got {val_percent}")
        stdlib = path is None
        root = default_corpus_root() if stdlib else Path(path).expanduser()
        files = _list_files(root, stdlib=stdlib)
        if not files:
            raise ConfigError(f"no text files found under {str(root)!r}")
        base = root if root.is_dir() else root.parent
        train_parts: list[bytes] = []
        val_parts: list[bytes] = []
        contents: list[bytes] = []
        total = 0
        for file in files:
            try:
                data = file.read_bytes()
            except OSError:
                continue
            if not data:
                continue
            contents.append(data)
            target = val_parts if _is_validation(file.relative_to(base).as_posix(), val_percent) else train_parts
            target.append(data)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        if not contents:
            raise ConfigError(f"every file under {str(root)!r} is empty or unreadable")
        split = "by-file"
        if not train_parts or not val_parts:
            # too few files for a by-file split: cut every file at the same relative position
            split = "by-position"
            train_parts, val_parts = [], []
            for data in contents:
                cut = int(len(data) * (1 - val_percent / 100))
                train_parts.append(data[:cut])
                val_parts.append(data[cut:])
        train = _to_tensor(FILE_SEPARATOR.join(train_parts))
        val = _to_tensor(FILE_SEPARATOR.join(val_parts))
        info = CorpusInfo(
            root=str(root),
            num_files=len(contents),
            train_files=len(train_parts) if split == "by-file" else len(contents),
            val_files=len(val_parts) if split == "by-file" else len(contents),
            train_bytes=int(train.numel()),
            val_bytes=int(val.numel()),
            split=split,
        )
        return cls(train, val, info)

    def check_block_size(self, block_size: int) -> None:
        for name, data in (("training", self.train), ("validation", self.val)):
            if data.numel() < block_size + 2:
                raise ConfigError(
                    f"the {name} split has {data.numel()} bytes, fewer than one window of {block_size + 1}; "
                    "use more data or a smaller --block-size"
                )

    def batch(
        self,
        split: str,
        *,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs and next-byte targets, each ``[B, T]`` int64."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)  # (B,)
        index = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
        windows = data[index].long()  # (B, T+1)
        x, y = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
        if torch.device(device).type != "cpu":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def eval_batches(
        self, *, num_batches: int, batch_size: int, block_size: int, seed: int = 1234
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of validation batches (same seed -> same bytes)."""
        generator = torch.Generator().manual_seed(seed)
        return [
            self.batch("val", batch_size=batch_size, block_size=block_size, generator=generator)
            for _ in range(num_batches)
        ]


def _to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
