"""What every generated-and-scored task shares: the example record, the score record, the protocol.

Tasks are scored on generated text (not log-likelihood), so a method can train on ``response``
and be judged by ``score`` on what the model actually writes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Literal

from lantern.errors import ConfigError

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str  # the user message, instruction included
    response: str  # reference answer used for training
    target: object  # what the scorer checks (JSON-serialisable)
    group: str = ""  # a sub-population scored separately (safety: "harmful" | "benign")


@dataclass
class TaskScore:
    correct: list[float]  # per example, 0/1
    metrics: dict[str, float] = field(default_factory=dict)  # percentages; "score" is primary, higher is better


class Task:
    """A task: examples per split and a scorer of generated texts (one text per example, in order)."""

    name: str = ""
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    default_test_size: int = 60
    default_train_size: int = 2000

    def examples(self, split: Split, n: int | None = None, seed: int = 0) -> list[Example]:
        raise NotImplementedError

    def score(self, examples: list[Example], texts: list[str]) -> TaskScore:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def check_split(task: Task, split: str, n: int | None) -> None:
    if split not in ("train", "test"):
        raise ConfigError(task.name, "split", split, "'train' or 'test'")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(task.name, "n", n, "≥ 1, or None for the default size")


def check_lengths(examples: list[Example], texts: list[str], task: str) -> None:
    if len(examples) != len(texts):
        raise ValueError(f"{task}: {len(texts)} texts for {len(examples)} examples; expected one per example")


def percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def is_test_key(key: str, fraction: float = 0.2) -> bool:
    """Which split a generated problem belongs to, from a hash of its content: the two never share one."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


def split_rng(task: str, split: str, seed: int) -> random.Random:
    """A separate random stream per (task, split, seed); string seeds are hashed stably by ``random``."""
    return random.Random(f"{task}|{split}|{seed}")


def generate_unique(make, split_key, unique_key, split: str, n: int, rng: random.Random, what: str) -> list:
    """Draw ``n`` items of ``split`` from ``make(rng)``.

    ``split_key`` (the content that makes a problem the same problem, e.g. its numbers) decides the
    split, so train and test never share one; ``unique_key`` keeps a list free of duplicates. A space
    too small for ``n`` fails clearly instead of looping.
    """
    want_test = split == "test"
    seen: set[str] = set()
    out = []
    tries, limit = 0, 200 * n + 1000
    while len(out) < n:
        tries += 1
        if tries > limit:
            raise ConfigError(what, "n", n, f"at most {len(out)}: the {split} split has no more distinct problems")
        item = make(rng)
        key = unique_key(item)
        if key in seen or is_test_key(split_key(item)) != want_test:
            continue
        seen.add(key)
        out.append(item)
    return out
