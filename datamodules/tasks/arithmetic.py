"""Multi-step arithmetic word problems with exact integer answers, generated from a seed.

Held-out problems are new number combinations (and new names and objects) of the same
templates: the split is decided by a hash of the numbers and operations, so train and test
never share a problem whatever ``n`` and ``seed`` are. ALS and FRIT reuse
``arithmetic_problems``; LoRI trains and scores on it as the ``math`` task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lantern.datamodules.tasks.base import (
    Example, Split, Task, TaskScore, check_lengths, check_split, generate_unique, percent, split_rng,
)
from lantern.errors import ConfigError


@dataclass(frozen=True)
class Level:
    ops: int  # operations after the starting amount
    low: int  # operands drawn from [low, high]
    high: int
    kinds: str  # allowed operations: + - * /


LEVELS = {
    1: Level(1, 2, 20, "+-"),
    2: Level(2, 2, 20, "+-"),
    3: Level(2, 2, 50, "+-*"),
    4: Level(3, 2, 100, "+-*/"),
    5: Level(4, 10, 500, "+-*/"),
}
DEFAULT_DIFFICULTY = 2

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Maya", "Noah",
         "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Xena", "Yusuf", "Zoe", "Amir", "Bella",
         "Carlos", "Dina", "Emil", "Fatima", "Gus", "Hana", "Ivan", "June")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "stamps", "shells", "cards", "beads",
         "toy cars", "balloons", "candles", "buttons", "eggs", "plums", "tickets", "crayons", "rocks")
START = ("{name} has {a} {item}.", "{name} starts with {a} {item}.", "{name} collects {a} {item}.")
ADD = ("{name} buys {k} more.", "{name} finds {k} more.", "A friend gives {name} {k} more.", "{name} gets {k} more.")
SUB = ("{name} gives away {k}.", "{name} loses {k}.", "{name} sells {k}.", "{name} uses {k}.")
MUL = ("Then {name} ends up with {k} times as many.",)
DIV = ("Then {name} splits them into {k} equal groups and keeps one group.",)
INSTRUCTION = "Show the steps and end with 'The answer is N.'"


@dataclass(frozen=True)
class _Problem:
    start: int
    ops: tuple[tuple[str, int], ...]
    name: str
    item: str
    phrasing: tuple[int, ...]


def _draw(level: Level, rng: random.Random) -> _Problem:
    value = rng.randint(level.low, level.high)
    start, ops = value, []
    for _ in range(level.ops):
        choices = list(level.kinds)
        if value <= level.low:
            choices = [c for c in choices if c not in "-/"] or ["+"]
        op = rng.choice(choices)
        if op == "+":
            k = rng.randint(level.low, level.high)
            value += k
        elif op == "-":
            k = rng.randint(1, value - 1) if value - 1 < level.low else rng.randint(level.low, value - 1)
            value -= k
        elif op == "*":
            k = rng.randint(2, 5)
            value *= k
        else:
            divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
            if not divisors:  # keep answers integral: fall back to addition
                op, k = "+", rng.randint(level.low, level.high)
                value += k
            else:
                k = rng.choice(divisors)
                value //= k
        ops.append((op, k))
    phrasing = tuple(rng.randrange(12) for _ in range(level.ops + 1))
    return _Problem(start, tuple(ops), rng.choice(NAMES), rng.choice(ITEMS), phrasing)


def _solve(p: _Problem) -> tuple[list[str], int]:
    value, steps = p.start, []
    for op, k in p.ops:
        new = {"+": value + k, "-": value - k, "*": value * k, "/": value // k}[op]
        steps.append(f"{value} {op} {k} = {new}.")
        value = new
    return steps, value


def _example(p: _Problem, difficulty: int, split: str, index: int) -> Example:
    fmt = {"name": p.name, "item": p.item}
    sentences = [START[p.phrasing[0] % len(START)].format(a=p.start, **fmt)]
    for (op, k), ph in zip(p.ops, p.phrasing[1:]):
        pool = {"+": ADD, "-": SUB, "*": MUL, "/": DIV}[op]
        sentences.append(pool[ph % len(pool)].format(k=k, **fmt))
    question = f"How many {p.item} does {p.name} have now?"
    steps, answer = _solve(p)
    prompt = " ".join(sentences + [question]) + " " + INSTRUCTION
    response = " ".join(steps + [f"The answer is {answer}."])
    return Example(f"math{difficulty}-{split}-{index}", prompt, response, answer)


def arithmetic_problems(n: int, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0, split: Split = "train") -> list[Example]:
    """``n`` distinct word problems, the same for the same arguments; ``target`` is the integer answer."""
    if difficulty not in LEVELS:
        raise ConfigError("math", "difficulty", difficulty, f"one of {sorted(LEVELS)}")
    if split not in ("train", "test"):
        raise ConfigError("math", "split", split, "'train' or 'test'")
    level = LEVELS[difficulty]
    problems = generate_unique(
        lambda rng: _draw(level, rng),
        split_key=lambda p: f"{difficulty}|{p.start}|{p.ops}",
        unique_key=lambda p: repr(p),
        split=split, n=n, rng=split_rng(f"math{difficulty}", split, seed), what=f"math:{difficulty}",
    )
    return [_example(p, difficulty, split, i) for i, p in enumerate(problems)]


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER = re.compile(r"answer\s+is\s*:?\s*(-?\s*\$?\s*\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def _to_number(text: str) -> float | None:
    cleaned = re.sub(r"[\s$,]", "", text)
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The number after the last "answer is", else the last number in the text; commas and ``$`` ignored."""
    found = _ANSWER.findall(text)
    if found:
        return _to_number(found[-1])
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


class ArithmeticTask(Task):
    default_test_size = 60
    default_train_size = 2000

    def __init__(self, difficulty: int = DEFAULT_DIFFICULTY, name: str = "math"):
        if difficulty not in LEVELS:
            raise ConfigError("math", "difficulty", difficulty, f"one of {sorted(LEVELS)}")
        self.difficulty, self.name = difficulty, name
        # The reference needs ~12 tokens per operation; the rest leaves an untrained model room for its own
        # longer working, so a base score is not an artefact of cutting it off (adapters stop at eos early).
        self.max_new_tokens = 64 + 24 * LEVELS[difficulty].ops

    def examples(self, split: Split, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(self, split, n)
        size = n or (self.default_test_size if split == "test" else self.default_train_size)
        return arithmetic_problems(size, self.difficulty, seed, split)

    def score(self, examples: list[Example], texts: list[str]) -> TaskScore:
        check_lengths(examples, texts, self.name)
        correct = []
        for ex, text in zip(examples, texts):
            got = extract_answer(text)
            correct.append(float(got is not None and got == float(ex.target)))
        return TaskScore(correct, {"score": percent(correct)})
