"""Reasoning problems with exact answers, for methods that decode and check (ALS; FRIT next).

Sources: ``math:D`` (the embedded arithmetic word problems, difficulty D), a GSM8K-format JSONL
file (``question``, ``answer`` ending in ``#### N``), a MATH-format one (``problem``,
``solution`` with a final ``\\boxed{...}``), or ``hf:NAME[:CONFIG[:SPLIT]]`` with either layout.
Batches are ``{"task", "examples", "prompts"}``: the module decodes ``prompts`` (chat messages,
worked examples first) and scores the replies with ``dm.scorer``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from lantern.datamodules.tasks import Example, TaskScore, arithmetic_problems, extract_answer
from lantern.datamodules.tasks.arithmetic import INSTRUCTION, LEVELS
from lantern.datamodules.tasks.base import percent
from lantern.datamodules.text import hf_spec, load_hf_dataset, read_jsonl
from lantern.errors import ConfigError, DataError, require

AnswerFormat = Literal["text", "json"]
JSON_INSTRUCTION = 'Show the steps and end with a JSON object {"answer": N}.'
LAYOUTS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
_BOXED = re.compile(r"\\boxed\s*\{")


def boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def reference_answer(solution: str) -> str | None:
    """The answer a reference solution states: after GSM8K's ``####``, else the last ``\\boxed{}``."""
    if "####" in solution:
        return solution.rsplit("####", 1)[1].strip().replace(",", "")
    return boxed(solution)


def normalise(answer: str) -> str:
    """Compare answers as text after dropping spaces, ``$``, ``\\left``/``\\right``, ``\\!`` and a final period."""
    out = re.sub(r"\\left|\\right|\\!|\s|\$", "", answer).rstrip(".")
    return out.replace("dfrac", "frac").replace("tfrac", "frac")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def json_answer(text: str) -> str | None:
    """The ``answer`` of the last JSON object in ``text`` that parses and has one, else None."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, c in enumerate(text) if c == "{"]):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "answer" in value:
            return str(value["answer"])
    return None


class ProblemScorer:
    """Exact-answer scoring; ``json`` also requires the answer as the last JSON object (the format check)."""

    def __init__(self, answer_format: AnswerFormat = "text"):
        self.answer_format = answer_format

    def predicted(self, text: str) -> str | None:
        if self.answer_format == "json":
            return json_answer(text)
        stated = boxed(text)
        if stated is not None:
            return stated
        number = extract_answer(text)
        if number is None:
            return None
        return str(int(number)) if number.is_integer() else repr(number)

    def matches(self, predicted: str | None, target: object) -> bool:
        if predicted is None:
            return False
        a, b = _number(normalise(predicted)), _number(normalise(str(target)))
        if a is not None and b is not None:
            return a == b
        return normalise(predicted) == normalise(str(target))

    def score(self, examples: list[Example], texts: list[str]) -> TaskScore:
        if len(examples) != len(texts):
            raise ValueError(f"{len(texts)} texts for {len(examples)} problems; expected one per problem")
        predicted = [self.predicted(t) for t in texts]
        correct = [float(self.matches(p, ex.target)) for p, ex in zip(predicted, examples)]
        return TaskScore(correct, {"score": percent(correct), "answered": percent([float(p is not None) for p in predicted])})


class ReasoningProblems(L.LightningDataModule):
    def __init__(
        self,
        calibration: str = "math:1",
        evaluation: str | None = None,
        n_calibration: int = 200,
        n_eval: int = 60,
        shots: int = 2,
        answer_format: AnswerFormat = "text",
        question_field: str | None = None,
        answer_field: str | None = None,
        system: str | None = None,
        chat: bool = True,
        batch_size: int = 32,
        seed: int = 0,
    ):
        """
        Args:
            calibration: problems whose greedy answers calibrate (``math:D``, a ``.jsonl`` file, ``hf:...``;
                ``math:D`` calibrates on its train split).
            evaluation: held-out problems; None: the test split of ``math:D``, or required for files.
            n_calibration: calibration problems (files: the first N).
            n_eval: held-out problems (files: the first N).
            shots: worked examples from the calibration source shown first as chat turns (never the
                problems that calibrate or evaluate; SmolLM2-135M needs two to answer in format).
            answer_format: ``text`` (the answer in words, "The answer is N.") or ``json`` (the answer as
                a final ``{"answer": N}`` that must parse: the structured-answer variant).
            question_field / answer_field: JSONL / dataset fields; None: ``question``/``answer`` (GSM8K) or
                ``problem``/``solution`` (MATH), whichever the records have.
            system: system message; None keeps the chat template's default.
            chat: render with the tokenizer's chat template.
            batch_size: problems per batch.
            seed: problem generation seed (``math:D``).
        """
        super().__init__()
        require(answer_format in ("text", "json"), self, "answer_format", answer_format, "'text' or 'json'")
        for name, value, low in (("n_calibration", n_calibration, 2), ("n_eval", n_eval, 1), ("batch_size", batch_size, 1),
                                 ("shots", shots, 0)):
            require(isinstance(value, int) and value >= low, self, name, value, f"an integer ≥ {low}")
        self._check_source(calibration, "calibration")
        if evaluation is None:
            require(calibration.startswith("math:"), self, "evaluation", None,
                    "held-out problems (a .jsonl file or hf:...) when calibration is not math:D")
            evaluation = calibration
        self._check_source(evaluation, "evaluation")
        self.save_hyperparameters()
        self.calibration, self.evaluation = calibration, evaluation
        self.scorer = ProblemScorer(answer_format)
        self.sets: dict[str, list[Example]] = {}
        self._shots: list[Example] = []

    def _check_source(self, spec: str, field: str) -> None:
        expected = "math:D (D in 1..5), a .jsonl file or hf:NAME[:CONFIG[:SPLIT]]"
        require(isinstance(spec, str) and bool(spec.strip()), self, field, spec, expected)
        if spec.startswith("math:"):
            require(spec[5:].isdigit() and int(spec[5:]) in LEVELS, self, field, spec, expected)
        elif spec.startswith("hf:"):
            require(bool(spec[3:].split(":")[0]), self, field, spec, expected)
        elif Path(spec).expanduser().suffix != ".jsonl":
            raise ConfigError(self, field, spec, expected)
        elif not Path(spec).expanduser().is_file():
            raise DataError(f"data.{field} {spec!r}: no such file")

    # ------------------------------------------------------------------ reading
    def _load(self, spec: str, split: str, n: int, offset: int = 0) -> list[Example]:
        """``n`` problems after skipping ``offset`` (the worked examples come first in a calibration source)."""
        if spec.startswith("math:"):  # a longer draw extends a shorter one, so offsets never overlap
            drawn = arithmetic_problems(offset + n, int(spec[5:]), self.hparams.seed, split)
            return [self._phrase(ex) for ex in drawn[offset:]]
        records = self._hf_records(spec, split) if spec.startswith("hf:") else self._jsonl_records(spec)
        picked = records[offset:offset + n]
        if not picked:
            raise DataError(f"data {spec!r}: no problems after the first {offset}")
        return [self._record(where, record) for where, record in picked]

    def _jsonl_records(self, spec: str) -> list[tuple[str, object]]:
        path = Path(spec).expanduser()
        return [(f"{path}:{lineno}", record) for lineno, record in read_jsonl(path)]

    def _hf_records(self, spec: str, split: str) -> list[tuple[str, object]]:
        ds = load_hf_dataset(f"data {spec!r}", *hf_spec(spec, split))
        return [(f"{spec} item {i}", row) for i, row in enumerate(ds)]

    @staticmethod
    def _resolved(spec: str, split: str) -> tuple:
        """What a source reads, so two spellings of one file or split count as the same."""
        if spec.startswith("math:"):
            return (spec, split)
        if spec.startswith("hf:"):
            return hf_spec(spec, split)
        return (str(Path(spec).expanduser().resolve()),)

    def _record(self, where: str, record) -> Example:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        q_field, a_field = self.hparams.question_field, self.hparams.answer_field
        if q_field is None or a_field is None:
            layout = next((fields for fields in LAYOUTS.values() if all(f in record for f in fields)), None)
            if layout is None:
                raise DataError(f"{where}: no question/answer or problem/solution fields (found {sorted(record)}); "
                                "set data.question_field and data.answer_field")
            q_field, a_field = q_field or layout[0], a_field or layout[1]
        for field, setting in ((q_field, "question_field"), (a_field, "answer_field")):
            if not isinstance(record.get(field), str):
                raise DataError(f"{where}: field {field!r} missing or not a string (found {sorted(record)}); "
                                f"set data.{setting}")
        answer = reference_answer(record[a_field])
        if answer is None:
            answer = record[a_field].strip()  # a bare answer field (e.g. MATH-500's "answer")
        solution = record[a_field].split("####")[0].strip()
        return self._phrase(Example(where, record[q_field].strip(), solution, answer), generated=False)

    def _phrase(self, ex: Example, generated: bool = True) -> Example:
        """Ask for the answer in the configured format; the reference reply ends in that format."""
        question = ex.prompt.replace(INSTRUCTION, "").strip() if generated else ex.prompt
        body = re.sub(r"\s*The answer is [^.]*\.$", "", ex.response) if generated else ex.response
        if self.hparams.answer_format == "json":
            return Example(ex.id, f"{question} {JSON_INSTRUCTION}", f'{body} {{"answer": {json.dumps(ex.target)}}}', ex.target)
        return Example(ex.id, f"{question} {INSTRUCTION}", f"{body} The answer is {ex.target}.", ex.target)

    # ------------------------------------------------------------------ prompts
    def messages(self, ex: Example) -> list[dict]:
        """The chat a problem is asked in: the worked examples, then the problem."""
        turns = [m for s in self._shots for m in ({"role": "user", "content": s.prompt},
                                                  {"role": "assistant", "content": s.response})]
        return turns + [{"role": "user", "content": ex.prompt}]

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        # the calibration source gives the worked examples, then the calibration problems; a file that
        # also evaluates gives the held-out problems after both (math:D holds out its test split)
        self._shots = self._load(self.calibration, "train", hp.shots) if hp.shots else []
        self.sets["calibration"] = self._load(self.calibration, "train", hp.n_calibration, offset=hp.shots)
        same = self._resolved(self.calibration, "train") == self._resolved(self.evaluation, "test")
        self.sets["evaluation"] = self._load(self.evaluation, "test", hp.n_eval,
                                             offset=hp.shots + hp.n_calibration if same else 0)

    def _loader(self, name: str) -> DataLoader:
        self.setup()
        return DataLoader(self.sets[name], batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=lambda examples: {"task": name, "examples": list(examples),
                                                       "prompts": [self.messages(e) for e in examples]})

    def train_dataloader(self) -> DataLoader:
        return self._loader("calibration")

    def val_dataloader(self) -> DataLoader:
        return self._loader("evaluation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("evaluation")
