"""Preference pairs (prompt, chosen, rejected) for DPO, from a ``.jsonl`` file or ``hf:NAME[:CONFIG[:SPLIT]]``.

A record holds ``prompt`` (a user message, or a list of chat messages), ``chosen`` and ``rejected``
(the assistant replies). Records may carry the reference model's summed log-probs of both replies
(``ref_chosen``, ``ref_rejected``) with the settings they were computed under (``ref_settings``);
FRIT's pair builder writes them, so DPO needs no second model in memory.

Each prompt is rendered and encoded as generation does it (``encode_prompts``); each reply gets eos
and is cut to ``max_length`` with its prompt. A batch of B pairs is laid out ``[chosen; rejected]``:
2B rows, the chosen replies first, one forward for both.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from lantern.datamodules.instruction import ModelTokenizer, collate_pairs
from lantern.datamodules.text import hf_spec, load_hf_dataset, read_jsonl, resumable_sampler
from lantern.errors import ConfigError, DataError, require
from lantern.models.generation import encode_prompts
from lantern.models.scoring import completion_logprobs
from lantern.reporting import say


class Pair(NamedTuple):
    """One encoded pair; ``ref`` is (chosen, rejected) reference log-probs when the record has them."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None


def model_key(name: str) -> str:
    """A model's name as settings record it: a local folder by its real path (``latest`` links move on)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def reference_settings(model_name: str, max_length: int, system: str | None, chat: bool) -> dict:
    """What pre-computed reference log-probs depend on besides the pair's text; stored with them, checked on use."""
    return {"model": model_key(model_name), "max_length": max_length, "system": system, "chat": chat}


def encode_pairs(tokenizer, prompts: list, chosen: list[str], rejected: list[str], system: str | None, chat: bool,
                 max_length: int, where: list[str] | None = None, setting: str = "data.max_length") -> tuple[list[Pair], int]:
    """Token ids of each pair and how many replies were cut to ``max_length`` (prompt + reply + eos).

    A prompt that leaves no room for a reply token is an error naming its record.
    """
    prompt_ids = encode_prompts(tokenizer, prompts, system, chat)
    replies = tokenizer.encode_batch([*chosen, *rejected])
    eos, n, cut, out = tokenizer.eos_token_id, len(prompts), 0, []
    for i, p_ids in enumerate(prompt_ids):
        room = max_length - len(p_ids)
        if room < 1:
            name = where[i] if where else f"pair {i}"
            raise DataError(f"{name}: its prompt is {len(p_ids)} tokens, which fills {setting}={max_length}; raise {setting}")
        pair = []
        for ids in (replies[i], replies[n + i]):
            ids = ids + [eos]
            cut += len(ids) > room
            pair.append(ids[:room])
        out.append(Pair(p_ids, *pair))
    return out, cut


def collate_preference(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """``[chosen; rejected]``: rows 0..B-1 the chosen replies, B..2B-1 the rejected, right-padded.

    ``completion_mask`` marks the reply tokens (the prompt carries no loss); ``ref`` [2B] holds the
    reference log-probs in the same order when every pair has them.
    """
    replies = [(p, p.chosen) for p in pairs] + [(p, p.rejected) for p in pairs]
    rows = [(p.prompt + reply, [-100] * len(p.prompt) + reply) for p, reply in replies]
    batch = collate_pairs(rows, pad_id)
    batch["completion_mask"] = batch.pop("labels") != -100
    if all(p.ref is not None for p in pairs):
        batch["ref"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float64)
    return batch


@torch.no_grad()
def reference_logprobs(model, pairs: list[Pair], pad_id: int, batch_size: int = 16) -> list[tuple[float, float]]:
    """(chosen, rejected) summed reply log-probs of each pair under ``model``, batched as DPO batches them."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo:lo + batch_size]
            batch = {k: v.to(device) for k, v in collate_preference(chunk, pad_id).items()}
            sums = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            sums = sums.sum.double().cpu().tolist()
            out += list(zip(sums[:len(chunk)], sums[len(chunk):]))
    finally:
        model.train(training)
    return out


class PreferenceDataModule(ModelTokenizer, L.LightningDataModule):
    def __init__(
        self,
        train: str,
        val: str | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        system: str | None = None,
        chat: bool = True,
        max_length: int = 512,
        n_train: int | None = None,
        batch_size: int = 5,
        eval_batch_size: int = 10,
        seed: int = 0,
    ):
        """
        Args:
            train: a ``.jsonl`` file of pairs or ``hf:NAME[:CONFIG[:SPLIT]]`` (split defaults to ``train``).
            val: held-out pairs (same forms); None: ``val_fraction`` of ``train``, drawn with ``seed``.
            val_fraction: the share of ``train`` held out when ``val`` is None (at least one pair).
            tokenizer: the model's tokenizer; under the CLI, None takes the module's.
            prompt_field / chosen_field / rejected_field: the record fields.
            system: system message for every prompt; None keeps the chat template's default.
            chat: render with the tokenizer's chat template (else the bare prompt).
            max_length: most tokens per sequence (prompt + reply + eos); longer replies are cut.
            n_train: the first N pairs of ``train``; None: all.
            batch_size: pairs per training batch and device (2× sequences).
            eval_batch_size: pairs per validation batch.
            seed: held-out draw and shuffling seed.
        """
        super().__init__()
        for field, spec in (("train", train), ("val", val)):
            if spec is not None:
                self._check_source(spec, field)
        require(isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1, self, "val_fraction", val_fraction,
                "a share in (0, 1)")
        for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1)):
            require(isinstance(value, int) and value >= low, self, name, value, f"an integer ≥ {low}")
        require(n_train is None or (isinstance(n_train, int) and n_train >= 2), self, "n_train", n_train,
                "an integer ≥ 2, or null for all")
        for name, value in (("prompt_field", prompt_field), ("chosen_field", chosen_field), ("rejected_field", rejected_field)):
            require(isinstance(value, str) and bool(value), self, name, value, "the name of a record field")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.sets: dict[str, list[Pair]] = {}
        self.ref_settings: list[dict | None] = []  # one per training and validation record, as read

    def _check_source(self, spec: str, field: str) -> None:
        expected = "a .jsonl file of pairs or hf:NAME[:CONFIG[:SPLIT]]"
        require(isinstance(spec, str) and bool(spec.strip()), self, field, spec, expected)
        if spec.startswith("hf:"):
            require(bool(spec[3:].split(":")[0]), self, field, spec, expected)
        elif Path(spec).expanduser().suffix != ".jsonl":
            raise ConfigError(self, field, spec, expected)
        elif not Path(spec).expanduser().is_file():
            raise DataError(f"data.{field} {spec!r}: no such file")

    # ------------------------------------------------------------------ reading
    def _records(self, spec: str) -> list[tuple[str, object]]:
        if spec.startswith("hf:"):
            ds = load_hf_dataset(f"data {spec!r}", *hf_spec(spec, "train"))
            return [(f"{spec} item {i}", row) for i, row in enumerate(ds)]
        path = Path(spec).expanduser()
        return [(f"{path}:{lineno}", record) for lineno, record in read_jsonl(path)]

    def _fields(self, where: str, record) -> tuple:
        hp = self.hparams
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field, setting in ((hp.prompt_field, "prompt_field"), (hp.chosen_field, "chosen_field"),
                               (hp.rejected_field, "rejected_field")):
            if field not in record:
                raise DataError(f"{where}: no field {field!r} (found {sorted(record)}); set data.{setting}")
        prompt = record[hp.prompt_field]
        messages = isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
        if not (isinstance(prompt, str) or messages) or not prompt:
            raise DataError(f"{where}: field {hp.prompt_field!r} must be a string or a list of "
                            "{'role': ..., 'content': ...} messages")
        for field in (hp.chosen_field, hp.rejected_field):
            if not isinstance(record[field], str) or not record[field].strip():
                raise DataError(f"{where}: field {field!r} must be a non-empty string")
        ref = None
        if "ref_chosen" in record or "ref_rejected" in record:
            values = (record.get("ref_chosen"), record.get("ref_rejected"))
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 0 for v in values):
                raise DataError(f"{where}: ref_chosen and ref_rejected must both be finite log-probabilities ≤ 0, "
                                f"got {values}")
            ref = (float(values[0]), float(values[1]))
            if not isinstance(record.get("ref_settings", {}), dict):
                raise DataError(f"{where}: ref_settings must be an object (the settings the reference was computed under)")
        return prompt, record[hp.chosen_field], record[hp.rejected_field], ref, record.get("ref_settings")

    def _encode(self, rows: list[tuple]) -> list[Pair]:
        pairs, cut = encode_pairs(self.tokenizer, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                                  self.hparams.system, self.hparams.chat, self.hparams.max_length, [r[0] for r in rows])
        self.ref_settings += [r[5] if r[4] is not None else None for r in rows]
        if cut:
            say(self.trainer, f"cut {cut} of {2 * len(rows)} replies to data.max_length={self.hparams.max_length}")
        return [p._replace(ref=r[4]) for p, r in zip(pairs, rows)]

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        records = [(where, *self._fields(where, r)) for where, r in self._records(hp.train)[: hp.n_train]]
        if len(records) < (1 if hp.val else 2):
            raise DataError(f"data.train {hp.train!r}: {len(records)} pairs; expected at least {1 if hp.val else 2}")
        if hp.val is not None:
            train, val = records, [(where, *self._fields(where, r)) for where, r in self._records(hp.val)]
            if not val:
                raise DataError(f"data.val {hp.val!r}: no pairs")
        else:
            order = list(range(len(records)))
            random.Random(hp.seed).shuffle(order)
            n_val = min(len(records) - 1, max(1, round(hp.val_fraction * len(records))))
            held = set(order[:n_val])
            train = [r for i, r in enumerate(records) if i not in held]
            val = [r for i, r in enumerate(records) if i in held]
        self.sets = {"train": self._encode(train), "val": self._encode(val)}

    @property
    def has_reference(self) -> bool:
        """Every pair carries pre-computed reference log-probs."""
        self.setup()
        return all(p.ref is not None for pairs in self.sets.values() for p in pairs)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        sampler = resumable_sampler(self.trainer, self.sets["train"], self.hparams.batch_size, self.hparams.seed)
        return DataLoader(self.sets["train"], batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=_Collate(self.tokenizer.eos_token_id))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.sets["val"], batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=_Collate(self.tokenizer.eos_token_id))


class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        return collate_preference(pairs, self.pad_id)
