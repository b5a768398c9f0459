"""Pretraining text: read documents, tokenise, pack into fixed-length blocks, cache on disk.

Sources: ``stdlib`` (the embedded default: the Python standard library's own source, one
document per file, present on every machine without network), a local ``.txt``/``.jsonl``
file or a directory of them, or ``hf:NAME`` for ``datasets.load_dataset(NAME)``.
Documents go to train or validation by a hash of their id, so the split is the same on
every run and does not move when documents are added. Packed blocks are saved as ``.npy``
and memory-mapped, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lantern.errors import DataError, require
from lantern.models.loading import TextTokenizer, cache_root, hub_online, load_tokenizer, writable_dir


_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
_TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [f for f in sorted(root.rglob("*.py")) if not _STDLIB_SKIP & set(f.relative_to(root).parts)]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a binary or non-UTF-8 file fails naming the line."""
    try:
        with path.open("rb") as fh:  # decoded line by line, so the error names the right line
            for lineno, raw in enumerate(fh, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at column {err.start + 1})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record) of a JSONL file, blank lines skipped; a bad line fails naming it."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for lineno, record in read_jsonl(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); set data.text_field")
        if not isinstance(record[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} must be a string")
        yield f"{path}:{lineno}", record[text_field]


def _read_file(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    else:
        try:
            yield str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _local_files(source: str) -> list[Path]:
    if not source.strip():
        raise DataError("data.source is empty: expected 'stdlib', a .txt/.jsonl file or directory, or 'hf:NAME'")
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(_TEXT_SUFFIXES)} files")
        return files
    raise DataError(f"data.source {source!r}: no such file or directory (or use 'stdlib' or 'hf:NAME')")


def _fingerprint_files(files: list[Path]) -> str:
    return "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def _is_val(doc_id: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return bucket < val_fraction


def hf_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` → (name, config or None, split or ``default_split``)."""
    name, config, split = (spec[3:].split(":") + [None, None])[:3]
    return name, config or None, split or default_split


def load_hf_dataset(where: str, name: str, config: str | None, split: str):
    """``datasets.load_dataset`` with one clear error; offline, it fails at once instead of retrying."""
    import datasets

    if not Path(name).expanduser().exists() and not hub_online():
        datasets.config.HF_HUB_OFFLINE = True  # read by datasets at import time, so set here too
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types; all mean "not loadable here"
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{where}: could not load ({type(err).__name__}: {first})") from None


class BlockDataset(Dataset):
    """Rows of ``block_size + 1`` token ids: inputs are ``row[:-1]``, labels ``row[1:]``."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))
        return {"input_ids": row[:-1], "labels": row[1:]}


class ResumableSampler(DistributedSampler):
    """Seeded shuffle per epoch, sharded by rank, able to start part-way into an epoch.

    A ``DistributedSampler`` so Lightning leaves it in place under DDP. On resume the
    DataModule skips the samples the checkpointed run already consumed, so the loss
    curve continues exactly where it stopped.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip_epoch, self.skip = 0, 0

    def resume_at(self, epoch: int, samples: int) -> None:
        self.skip_epoch, self.skip = epoch, samples

    def _skip(self) -> int:
        return self.skip if self.epoch == self.skip_epoch else 0

    def __iter__(self):
        return iter(list(super().__iter__())[self._skip() :])

    def __len__(self) -> int:
        return self.num_samples - self._skip()


def resumable_sampler(trainer, dataset: Dataset, batch_size: int, seed: int) -> ResumableSampler:
    """A seeded sampler; when the trainer resumed part-way into an epoch, it skips the batches already consumed."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    sampler = ResumableSampler(dataset, world, rank, seed)
    if trainer is not None and trainer.global_step > 0:
        per_epoch = math.ceil(sampler.num_samples / batch_size)
        done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * per_epoch
        sampler.resume_at(trainer.current_epoch, max(done, 0) * batch_size)
    return sampler


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "stdlib",
        tokenizer: str | None = "byte",
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        text_field: str = "text",
        hf_config: str | None = None,
        hf_split: str = "train",
        max_documents: int | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            source: ``stdlib`` (embedded corpus), a ``.txt``/``.jsonl`` file or directory, or ``hf:NAME``.
            tokenizer: ``byte``, an embedded model name, a local tokenizer path or a hub id (None: the
                model's, filled in by the CLI).
            block_size: tokens per training sequence.
            batch_size: sequences per batch and device.
            val_fraction: share of documents (by hash of their id) held out for validation.
            text_field: JSONL / dataset field holding the text.
            hf_config: dataset configuration name for ``hf:`` sources.
            hf_split: dataset split for ``hf:`` sources.
            max_documents: read at most this many documents (after sorting), for quick runs.
            cache_dir: where packed blocks are kept; defaults to ``$LANTERN_CACHE/data``.
            num_workers: DataLoader worker processes.
            seed: shuffling seed.
        """
        super().__init__()
        require(block_size >= 1, self, "block_size", block_size, "≥ 1")
        require(batch_size >= 1, self, "batch_size", batch_size, "≥ 1")
        require(0.0 < val_fraction < 1.0, self, "val_fraction", val_fraction, "a number strictly between 0 and 1")
        require(num_workers >= 0, self, "num_workers", num_workers, "≥ 0 (0 loads in the main process)")
        require(max_documents is None or max_documents >= 1, self, "max_documents", max_documents, "≥ 1, or null for all")
        require(bool(text_field), self, "text_field", text_field, "the name of the field holding the text")
        require(tokenizer is None or bool(tokenizer), self, "tokenizer", tokenizer, "'byte', a model name or a tokenizer path")
        if source != "stdlib" and not source.startswith("hf:"):
            _local_files(source)  # fail at configuration time, not after the trainer started
        self.save_hyperparameters()
        self.source, self.tokenizer_name, self.block_size = source, tokenizer, block_size
        self.batch_size, self.val_fraction, self.text_field = batch_size, val_fraction, text_field
        self.hf_config, self.hf_split, self.max_documents = hf_config, hf_split, max_documents
        self.cache_dir = (
            writable_dir(Path(cache_dir), self, "cache_dir") if cache_dir
            else writable_dir(cache_root() / "data", "environment", "LANTERN_CACHE")
        )
        self.num_workers, self.seed = num_workers, seed
        self._tokenizer: TextTokenizer | None = None
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            require(self.tokenizer_name is not None, self, "tokenizer", None, "'byte', a model name or a tokenizer path")
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ------------------------------------------------------------------ reading documents
    def _source_files(self) -> list[Path] | None:
        if self.source == "stdlib":
            return stdlib_files()
        if self.source.startswith("hf:"):
            return None
        return _local_files(self.source)

    def _documents(self) -> Iterator[tuple[str, str]]:
        files = self._source_files()
        if files is None:
            docs = self._hf_documents()
        elif self.source == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            docs = ((str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")) for f in files)
        else:
            docs = (doc for f in files for doc in _read_file(f, self.text_field))
        for i, doc in enumerate(docs):
            if self.max_documents is not None and i >= self.max_documents:
                return
            yield doc

    def _hf_documents(self) -> Iterator[tuple[str, str]]:
        name = self.source[3:]
        ds = load_hf_dataset(f"data.source {self.source!r}", name, self.hf_config, self.hf_split)
        if self.text_field not in ds.column_names:
            raise DataError(f"data.source {self.source!r}: no field {self.text_field!r} (columns {ds.column_names}); set data.text_field")
        for i, text in enumerate(ds[self.text_field]):
            yield f"{name}:{self.hf_split}:{i}", text

    def _cache_key(self) -> str:
        files = self._source_files()
        if files is None:
            origin = f"{self.source}|{self.hf_config}|{self.hf_split}"
        elif self.source == "stdlib":
            origin = f"stdlib|{sys.version}|{len(files)}|{sum(f.stat().st_size for f in files)}"
        else:
            origin = _fingerprint_files(files)
        parts = [origin, self.tokenizer.fingerprint, self.block_size, self.val_fraction, self.text_field, self.max_documents]
        return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ packing and caching
    def _build(self, target: Path) -> None:
        tok = self.tokenizer
        dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        n_docs = {"train": 0, "val": 0}
        batch: list[tuple[str, str]] = []

        def flush():
            for (doc_id, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
                split = "val" if _is_val(doc_id, self.val_fraction) else "train"
                streams[split].append(np.asarray(ids + [tok.eos_token_id], dtype=dtype))
                n_docs[split] += 1
            batch.clear()

        for doc in self._documents():
            if doc[1].strip():
                batch.append(doc)
            if len(batch) >= 256:
                flush()
        flush()
        if n_docs["train"] + n_docs["val"] == 0:
            raise DataError(f"data.source {self.source!r}: the corpus is empty (no non-blank documents)")
        width = self.block_size + 1
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        meta = {"source": self.source, "tokenizer": self.tokenizer_name, "block_size": self.block_size}
        for split, chunks in streams.items():
            flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
            n = len(flat) // width
            if n == 0:
                raise DataError(
                    f"data.source {self.source!r}: the {split} split has {len(flat)} tokens in {n_docs[split]} documents, "
                    f"fewer than one block of {width}; add documents, lower data.block_size or change data.val_fraction"
                )
            np.save(tmp / f"{split}.npy", flat[: n * width].reshape(n, width))
            meta[split] = {"documents": n_docs[split], "tokens": int(len(flat)), "blocks": n}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    def _cache_path(self) -> Path:
        return self.cache_dir / self._cache_key()

    def prepare_data(self) -> None:
        target = self._cache_path()
        if not (target / "meta.json").exists():
            self._build(target)

    def setup(self, stage: str | None = None) -> None:
        target = self._cache_path()
        if not (target / "meta.json").exists():  # setup() called without prepare_data()
            self._build(target)
        self.train_set = BlockDataset(np.load(target / "train.npy", mmap_mode="r"))
        self.val_set = BlockDataset(np.load(target / "val.npy", mmap_mode="r"))
        self.meta = json.loads((target / "meta.json").read_text())

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, resumable_sampler(self.trainer, self.train_set, self.batch_size, self.seed))

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        return self._loader(self.val_set, DistributedSampler(self.val_set, world, rank, shuffle=False, drop_last=False))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, dataset: Dataset, sampler) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )
