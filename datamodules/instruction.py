"""Supervised instruction tuning data: (prompt, response) pairs in, loss on the response only.

Training pairs come from a task (``task:math``), a ``.jsonl`` file or ``hf:NAME[:CONFIG[:SPLIT]]``.
Each prompt is rendered and encoded exactly as generation does it (``encode_prompts``), so what the model
learns to answer is what it is later asked. Validation yields the raw ``Example``s of each eval
task, for the module to generate replies and score them with the task's own scorer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lantern.datamodules.tasks import Example, Task, get_task
from lantern.datamodules.text import hf_spec, load_hf_dataset, read_jsonl, resumable_sampler
from lantern.errors import ConfigError, DataError, require
from lantern.models.generation import encode_prompts
from lantern.models.loading import TextTokenizer, load_tokenizer
from lantern.reporting import say


class InstructionDataset(Dataset):
    """Tokenised pairs: ``input_ids`` = prompt + response + eos, ``labels`` = -100 over the prompt."""

    def __init__(self, rows: list[tuple[list[int], list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.rows[i]


def collate_pairs(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; ``labels`` follow the Hugging Face convention (aligned with ``input_ids``, the model shifts)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (seq, lab) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, : len(lab)] = torch.tensor(lab)
        attention[r, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class _ExampleBatches:
    """Collate for validation: the task's name and its examples, untouched."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, examples: list[Example]) -> dict:
        return {"task": self.name, "examples": list(examples)}


class ModelTokenizer:
    """For datamodules that encode with the tokenizer of the model being trained: ``tokenizer_name``
    (the CLI fills a None from the module), loaded on first use."""

    tokenizer_name: str | None = None
    _tokenizer: TextTokenizer | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            require(self.tokenizer_name is not None, self, "tokenizer", None, "the tokenizer of the model being trained")
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer


class InstructionDataModule(ModelTokenizer, L.LightningDataModule):
    def __init__(
        self,
        train: str = "task:math",
        eval_tasks: list[str] = ("math",),
        tokenizer: str | None = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        system: str | None = None,
        chat: bool = True,
        max_length: int = 512,
        overlong: Literal["error", "truncate"] = "error",
        n_train: int | None = None,
        n_eval: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 20,
        seed: int = 0,
        num_workers: int = 0,
    ):
        """
        Args:
            train: ``task:NAME`` (a task spec of ``lantern.datamodules.tasks``), a ``.jsonl`` file of pairs,
                or ``hf:NAME[:CONFIG[:SPLIT]]`` (split defaults to ``train``).
            eval_tasks: task specs scored in validation, one dataloader each, in this order.
            tokenizer: the model's tokenizer; under the CLI, None takes the module's.
            prompt_field: JSONL / dataset field holding the user message.
            response_field: JSONL / dataset field holding the reference reply.
            system: system message for every prompt; None keeps the chat template's default.
            chat: render with the tokenizer's chat template (else the bare prompt).
            max_length: most tokens per training pair (prompt + response + eos).
            overlong: a longer pair is an ``error``, or its response is cut (``truncate``) and counted.
            n_train: training pairs (tasks: how many to generate; files: the first N); None: the task's default or all.
            n_eval: test examples per eval task; None: each task's default.
            batch_size: training pairs per batch and device.
            eval_batch_size: examples per validation batch.
            seed: task generation and shuffling seed.
            num_workers: DataLoader worker processes for training.
        """
        super().__init__()
        require(isinstance(train, str) and bool(train.strip()), self, "train", train,
                "task:NAME, a .jsonl file or hf:NAME[:CONFIG[:SPLIT]]")
        for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1)):
            require(value >= low, self, name, value, f"≥ {low}")
        require(overlong in ("error", "truncate"), self, "overlong", overlong, "'error' or 'truncate'")
        require(n_train is None or n_train >= 1, self, "n_train", n_train, "≥ 1, or null for the default")
        require(n_eval is None or n_eval >= 1, self, "n_eval", n_eval, "≥ 1, or null for each task's default")
        require(num_workers >= 0, self, "num_workers", num_workers, "≥ 0 (0 loads in the main process)")
        require(bool(prompt_field), self, "prompt_field", prompt_field, "the name of the field holding the prompt")
        require(bool(response_field), self, "response_field", response_field, "the name of the field holding the response")
        eval_tasks = [eval_tasks] if isinstance(eval_tasks, str) else list(eval_tasks)
        require(len(set(eval_tasks)) == len(eval_tasks), self, "eval_tasks", eval_tasks, "each task once")
        self.tasks: dict[str, Task] = {}
        for spec in eval_tasks:
            self.tasks[spec] = self._task(spec, "eval_tasks")
        self.train_task = self._check_train(train)
        self.save_hyperparameters()
        self.train_spec, self.tokenizer_name = train, tokenizer
        self.prompt_field, self.response_field = prompt_field, response_field
        self.system, self.chat, self.max_length, self.overlong = system, chat, max_length, overlong
        self.n_train, self.n_eval, self.batch_size, self.eval_batch_size = n_train, n_eval, batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.train_set: InstructionDataset | None = None
        self.eval_examples: dict[str, list[Example]] = {}
        self.truncated = 0

    def _task(self, spec: str, field: str, value: str | None = None) -> Task:
        try:
            return get_task(spec)
        except ConfigError as err:
            raise ConfigError(self, field, value or spec, f"task:NAME with NAME {err.expected}" if value else err.expected) from None

    def _check_train(self, train: str) -> Task | None:
        """Fail at configuration time, not after the trainer started."""
        if train.startswith("task:"):
            return self._task(train[5:], "train", train)
        if train.startswith("hf:"):
            require(bool(train[3:].split(":")[0]), self, "train", train, "hf:NAME[:CONFIG[:SPLIT]]")
            return None
        path = Path(train).expanduser()
        if path.suffix != ".jsonl":
            raise ConfigError(self, "train", train, "task:NAME, a .jsonl file or hf:NAME[:CONFIG[:SPLIT]]")
        if not path.is_file():
            raise DataError(f"data.train {train!r}: no such file")
        return None

    @property
    def task_names(self) -> list[str]:
        """Eval task names in dataloader order: ``dataloader_idx`` i is ``task_names[i]``."""
        return list(self.tasks)

    # ------------------------------------------------------------------ reading pairs
    def pairs(self) -> list[tuple[str, str, str]]:
        """(where, prompt, response) for every training pair; ``where`` names its file and line or index."""
        if self.train_task is not None:
            examples = self.train_task.examples("train", self.n_train, self.seed)
            return [(f"{self.train_spec} example {i}", ex.prompt, ex.response) for i, ex in enumerate(examples)]
        rows = self._hf_pairs() if self.train_spec.startswith("hf:") else self._jsonl_pairs(Path(self.train_spec).expanduser())
        if not rows:
            raise DataError(f"data.train {self.train_spec!r}: no training pairs")
        return rows[: self.n_train]

    def _fields(self, record, where: str) -> tuple[str, str]:
        values = []
        for field, setting in ((self.prompt_field, "prompt_field"), (self.response_field, "response_field")):
            if not isinstance(record, dict) or field not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: no field {field!r} (found {found}); set data.{setting}")
            if not isinstance(record[field], str):
                raise DataError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
            values.append(record[field])
        return values[0], values[1]

    def _jsonl_pairs(self, path: Path) -> list[tuple[str, str, str]]:
        rows = []
        for lineno, record in read_jsonl(path):
            where = f"{path}:{lineno}"
            rows.append((where, *self._fields(record, where)))
            if self.n_train is not None and len(rows) >= self.n_train:
                break
        return rows

    def _hf_pairs(self) -> list[tuple[str, str, str]]:
        ds = load_hf_dataset(f"data.train {self.train_spec!r}", *hf_spec(self.train_spec, "train"))
        for field, setting in ((self.prompt_field, "prompt_field"), (self.response_field, "response_field")):
            if field not in ds.column_names:
                raise DataError(f"data.train {self.train_spec!r}: no field {field!r} (columns {ds.column_names}); set data.{setting}")
        if self.n_train is not None:
            ds = ds.select(range(min(self.n_train, len(ds))))
        return [(f"{self.train_spec} item {i}", *self._fields(row, f"{self.train_spec} item {i}")) for i, row in enumerate(ds)]

    # ------------------------------------------------------------------ tokenising
    def encode_pairs(self, pairs: list[tuple[str, str, str]]) -> list[tuple[list[int], list[int]]]:
        tok = self.tokenizer
        prompts = encode_prompts(tok, [p for _, p, _ in pairs], self.system, self.chat)
        responses = tok.encode_batch([r for _, _, r in pairs])
        rows, truncated = [], 0
        for (where, _, _), p_ids, r_ids in zip(pairs, prompts, responses):
            r_ids = r_ids + [tok.eos_token_id]
            total = len(p_ids) + len(r_ids)
            if total > self.max_length:
                if self.overlong == "error" or len(p_ids) >= self.max_length:
                    hint = ("raise data.max_length or set data.overlong=truncate" if len(p_ids) < self.max_length
                            else "its prompt alone fills it; raise data.max_length")
                    raise DataError(f"{where}: {total} tokens (prompt {len(p_ids)} + response {len(r_ids)}) "
                                    f"> data.max_length={self.max_length}; {hint}")
                r_ids = r_ids[: self.max_length - len(p_ids)]  # the cut response keeps no eos: it did not end there
                truncated += 1
            rows.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
        self.truncated = truncated
        if truncated:
            say(self.trainer, f"truncated {truncated} of {len(pairs)} training pairs to max_length {self.max_length}")
        return rows

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = InstructionDataset(self.encode_pairs(self.pairs()))
        if not self.eval_examples:
            self.eval_examples = {name: task.examples("test", self.n_eval, self.seed) for name, task in self.tasks.items()}

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        sampler = resumable_sampler(self.trainer, self.train_set, self.batch_size, self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=False,
            collate_fn=_PadCollate(self.tokenizer.eos_token_id),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        if not self.eval_examples:
            self.setup("validate")
        return [DataLoader(self.eval_examples[name], batch_size=self.eval_batch_size, shuffle=False,
                           collate_fn=_ExampleBatches(name)) for name in self.tasks]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


class _PadCollate:
    """Picklable (for worker processes) right-padding collate."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        return collate_pairs(rows, self.pad_id)
