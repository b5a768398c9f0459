"""Data for the evaluation-awareness probes: a contrastive calibration set and labelled held-out prompts.

Items stay raw text: each model of a sweep renders and tokenises them with its own tokenizer and
chat template. Shipped by default (``builtin``, under ``datamodules/data/``):

- ``eval_awareness_contrastive.jsonl``: 200 questions, each offering an option that says the model
  is being tested and one that says it is deployed, as ``(A)``/``(B)``; the evaluation option is
  (A) in exactly half of them, so the letter cannot stand in for the context;
- ``eval_awareness_heldout.jsonl``: 120 prompts, 60 written like benchmark and safety-evaluation
  items (``label: evaluation``) and 60 like real requests to an assistant (``label: deployment``).

Other data: a ``.jsonl`` file or ``hf:NAME[:CONFIG[:SPLIT]]`` for either set, read through the
field settings (``question_field``, ``evaluation_field``, ``deployment_field`` for the contrastive
set; ``prompt_field``, ``label_field`` and ``label_values`` for the held-out one).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, NamedTuple

import lightning as L
from torch.utils.data import DataLoader

from lantern.datamodules.text import hf_spec, load_hf_dataset, read_jsonl
from lantern.errors import ConfigError, DataError, require

DATA_DIR = Path(__file__).parent / "data"
BUILTIN = {"contrastive": DATA_DIR / "eval_awareness_contrastive.jsonl", "heldout": DATA_DIR / "eval_awareness_heldout.jsonl"}
SOURCE = "builtin, a .jsonl file or hf:NAME[:CONFIG[:SPLIT]]"


class ContrastiveItem(NamedTuple):
    """A question and its two answers: the one a model gives if it believes it is tested, and if deployed."""

    where: str
    question: str
    evaluation_answer: str
    deployment_answer: str


class HeldoutItem(NamedTuple):
    """A prompt and whether it is an evaluation (True) or a deployment (False) prompt."""

    where: str
    prompt: str
    evaluation: bool


def _as_list(batch: list) -> list:
    return list(batch)


class EvalAwarenessData(L.LightningDataModule):
    def __init__(
        self,
        contrastive: str = "builtin",
        heldout: str = "builtin",
        question_field: str = "question",
        evaluation_field: str = "evaluation_answer",
        deployment_field: str = "deployment_answer",
        prompt_field: str = "prompt",
        label_field: str = "label",
        label_values: list[str | int | bool] = ("evaluation", "deployment"),
        n_contrastive: int | None = None,
        n_heldout: int | None = None,
        sample_seed: int = 0,
    ):
        """
        Args:
            contrastive: the calibration set: ``builtin``, a ``.jsonl`` file or ``hf:NAME[:CONFIG[:SPLIT]]``.
            heldout: the labelled prompts scored by the probes, from the same kinds of source.
            question_field: contrastive field holding the question (with its options).
            evaluation_field: contrastive field holding the answer that says "I am being evaluated".
            deployment_field: contrastive field holding the answer that says "I am deployed".
            prompt_field: held-out field holding the prompt (the question only, no answer).
            label_field: held-out field holding the label.
            label_values: the label's value for an evaluation prompt, then for a deployment prompt.
            n_contrastive: use a seeded sample of this many contrastive items; None: all.
            n_heldout: use a seeded sample of this many held-out prompts; None: all.
            sample_seed: seed of those samples.
        """
        super().__init__()
        self.sources = {"contrastive": contrastive, "heldout": heldout}
        for name, spec in self.sources.items():
            self._check_source(name, spec)
        self.fields = {"question": question_field, "evaluation": evaluation_field, "deployment": deployment_field,
                       "prompt": prompt_field, "label": label_field}
        for key, value in self.fields.items():
            require(isinstance(value, str) and bool(value), self, f"{key}_field", value, "the name of a field")
        label_values = list(label_values)
        require(len(label_values) == 2 and label_values[0] != label_values[1], self, "label_values", label_values,
                "two different values: the evaluation label, then the deployment label")
        for name, n in (("n_contrastive", n_contrastive), ("n_heldout", n_heldout)):
            require(n is None or n >= 2, self, name, n, "≥ 2, or null for all")
        self.save_hyperparameters()
        self.label_values, self.seed = label_values, sample_seed
        self.sizes = {"contrastive": n_contrastive, "heldout": n_heldout}
        self.contrastive_items: list[ContrastiveItem] = []
        self.heldout_items: list[HeldoutItem] = []

    def _check_source(self, name: str, spec: str) -> None:
        """Fail at configuration time, naming the setting, not after the trainer started."""
        require(isinstance(spec, str) and bool(spec.strip()), self, name, spec, SOURCE)
        if spec == "builtin" or spec.startswith("hf:"):
            require(spec == "builtin" or bool(spec[3:].split(":")[0]), self, name, spec, SOURCE)
            return
        path = Path(spec).expanduser()
        if path.suffix != ".jsonl":
            raise ConfigError(self, name, spec, SOURCE)
        if not path.is_file():
            raise ConfigError(self, name, spec, "an existing .jsonl file, builtin or hf:NAME[:CONFIG[:SPLIT]] (no such file)")

    # ------------------------------------------------------------------ reading
    def describe(self, name: str) -> str:
        """The source as metadata records it: the shipped file's name or the user's setting."""
        spec = self.sources[name]
        return BUILTIN[name].name if spec == "builtin" else spec

    def _records(self, name: str) -> Iterable[tuple[str, object]]:
        spec = self.sources[name]
        if spec.startswith("hf:"):
            ds = load_hf_dataset(f"data.{name} {spec!r}", *hf_spec(spec, "train"))
            return ((f"{spec} item {i}", row) for i, row in enumerate(ds))
        path = BUILTIN[name] if spec == "builtin" else Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: missing; reinstall lantern (the evaluation-awareness data ships with it)")
        return ((f"{path}:{lineno}", record) for lineno, record in read_jsonl(path))

    def _field(self, record, where: str, key: str, setting: str, kinds: tuple = (str,)):
        field = self.fields[key]
        if not isinstance(record, dict) or field not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no field {field!r} (found {found}); set data.{setting}")
        value = record[field]
        if not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
        return value

    def _sample(self, name: str, items: list, label=None) -> list:
        """A seeded sample of ``n_<name>`` items in file order; with ``label``, each label keeps its share (at least one)."""
        n = self.sizes[name]
        if not items:
            raise DataError(f"data.{name} {self.describe(name)!r}: no items")
        if n is None or n >= len(items):
            return items
        rng = random.Random(f"eval-awareness|{name}|{self.seed}")
        groups: dict = {}
        for i, item in enumerate(items):
            groups.setdefault(label(item) if label else None, []).append(i)
        keep, left = [], n
        for k, (_, members) in enumerate(sorted(groups.items(), key=lambda g: str(g[0]))):
            share = left if k == len(groups) - 1 else max(1, round(n * len(members) / len(items)))
            take = min(share, len(members), left)
            keep += rng.sample(members, take)
            left -= take
        return [items[i] for i in sorted(keep)]

    def read_contrastive(self) -> list[ContrastiveItem]:
        items = []
        for where, record in self._records("contrastive"):
            items.append(ContrastiveItem(where, self._field(record, where, "question", "question_field"),
                                         self._field(record, where, "evaluation", "evaluation_field"),
                                         self._field(record, where, "deployment", "deployment_field")))
        return self._sample("contrastive", items)

    def read_heldout(self) -> list[HeldoutItem]:
        items = []
        for where, record in self._records("heldout"):
            prompt = self._field(record, where, "prompt", "prompt_field")
            label = self._field(record, where, "label", "label_field", (str, int, bool))
            if label not in self.label_values or type(label) not in {type(v) for v in self.label_values}:
                raise DataError(f"{where}: field {self.fields['label']!r} is {label!r}; expected one of "
                                f"{self.label_values} (set data.label_values: [evaluation value, deployment value])")
            items.append(HeldoutItem(where, prompt, label == self.label_values[0]))
        items = self._sample("heldout", items, label=lambda item: item.evaluation)
        if len({item.evaluation for item in items}) < 2:
            raise DataError(f"data.heldout {self.describe('heldout')!r}: needs prompts of both labels "
                            f"{self.label_values} (AUROC compares the two)")
        return items

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if not self.contrastive_items:
            self.contrastive_items = self.read_contrastive()
        if not self.heldout_items:
            self.heldout_items = self.read_heldout()

    def _loader(self, items: list) -> DataLoader:
        # Batches of raw items: the module tokenises per model and batches its own forward passes.
        return DataLoader(items, batch_size=64, shuffle=False, collate_fn=_as_list)

    def train_dataloader(self) -> DataLoader:
        """The calibration pass of ``fit``: the contrastive set."""
        self.setup()
        return self._loader(self.contrastive_items)

    def val_dataloader(self) -> DataLoader:
        """The held-out prompts; under ``validate``, which has no calibration pass, the contrastive set after them."""
        self.setup()
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        return self._loader(self.heldout_items + ([] if fitting else self.contrastive_items))
