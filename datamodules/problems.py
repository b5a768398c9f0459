"""Reasoning problems with exact answers, for methods that decode and check (ALS, FRIT).

Sources: ``math:D`` (the embedded arithmetic word problems, difficulty D), ``facts`` (the embedded
multi-hop factual questions), or a JSONL file / ``hf:NAME[:CONFIG[:SPLIT]]`` in one of the layouts
of ``LAYOUTS``: GSM8K (``question``, ``answer`` ending in ``#### N``), MATH (``problem``,
``solution`` with a final ``\\boxed{...}``), SVAMP (``Body``, ``Question``, ``Answer``) or
StrategyQA (``question``, boolean ``answer``, optional ``facts``). Batches are
``{"task", "examples", "prompts"}``: the module decodes ``prompts`` (chat messages, worked
examples first) and scores the replies with ``dm.scorer``.

The ``steps`` answer format is FRIT's (arXiv 2509.13334): numbered ``<step n="i">…</step>`` and a
final ``<answer>…</answer>``; ``parse_trace`` reads what a small model actually writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from lantern.datamodules.tasks import Example, TaskScore, arithmetic_problems, extract_answer
from lantern.datamodules.tasks.arithmetic import INSTRUCTION, LEVELS
from lantern.datamodules.tasks.base import percent
from lantern.datamodules.text import hf_spec, load_hf_dataset, read_jsonl
from lantern.errors import ConfigError, DataError, require
from lantern.reporting import say

AnswerFormat = Literal["text", "json", "steps"]
JSON_INSTRUCTION = 'Show the steps and end with a JSON object {"answer": N}.'
STEPS_INSTRUCTION = ('Think step by step. Write each step as <step n="1">...</step>, then the final answer '
                     'as <answer>...</answer>.')
# question field(s), answer field: the first layout whose fields a record has is used
LAYOUTS = {"gsm8k": (("question",), "answer"), "math": (("problem",), "solution"),
           "svamp": (("Body", "Question"), "Answer"), "strategyqa": (("question",), "answer")}
FACTS = Path(__file__).parent / "data" / "multihop_facts.jsonl"
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


# ----------------------------------------------------------------------------- FRIT's step format
_STEP_OPEN = re.compile(r"<\s*step\b[^>]*>", re.I)
_STEP_CLOSE = re.compile(r"<\s*/\s*step\s*>", re.I)
_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.I)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.I)


@dataclass(frozen=True)
class Trace:
    """A reasoning trace as parsed: its steps, its answer, and whether every tag was well formed."""

    steps: tuple[str, ...]
    answer: str | None  # the text inside <answer>, stripped; None without one
    well_formed: bool  # steps opened and closed in order, one answer, nothing after it

    @property
    def parsed(self) -> bool:
        """Usable by FRIT: at least one step and an answer."""
        return bool(self.steps) and bool(self.answer)


def parse_trace(text: str) -> Trace:
    """Steps and answer of a trace in the step format, read leniently.

    What a small model writes: a missing ``</step>`` (the next ``<step``, ``<answer>`` or the end closes
    it), any ``n=`` attribute or none, an unclosed ``<answer>`` (closed at the end of its line),
    text between tags (ignored). Empty steps are dropped; anything after the answer is ignored.
    """
    answer_at = _ANSWER_OPEN.search(text)
    body = text[:answer_at.start()] if answer_at else text
    opens = list(_STEP_OPEN.finditer(body))
    steps, well_formed = [], bool(opens) and answer_at is not None
    for k, m in enumerate(opens):
        end = opens[k + 1].start() if k + 1 < len(opens) else len(body)
        chunk = body[m.end():end]
        close = _STEP_CLOSE.search(chunk)
        well_formed &= close is not None and not chunk[close.end():].strip()
        chunk = chunk[:close.start()] if close else chunk
        chunk = " ".join(chunk.split())
        if chunk:
            steps.append(chunk)
    answer = None
    if answer_at is not None:
        rest = text[answer_at.end():]
        close = _ANSWER_CLOSE.search(rest)
        well_formed &= close is not None and not rest[close.end():].strip()
        answer = (rest[:close.start()] if close else rest.split("\n", 1)[0]).strip() or None
    return Trace(tuple(steps), answer, well_formed and len(steps) == len(opens))


def render_steps(steps, answer: str | None = None) -> str:
    """The canonical trace text; without an answer it is a prefix that generation continues."""
    text = "".join(f'<step n="{i}">{step}</step>\n' for i, step in enumerate(steps, 1))
    return text if answer is None else f"{text}<answer>{answer}</answer>"


def solution_steps(solution: str) -> list[str]:
    """A reference solution as steps: its lines, or its sentences when it is one line."""
    lines = [" ".join(line.split()) for line in solution.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", " ".join(solution.split())) if s]


def answer_value(answer: str | None) -> str | None:
    """What an answer states: its number when it opens with one and has no other digit (``14 apples`` → ``14``,
    ``$1,200`` → ``1200``), else the text (``CO2``, ``Apollo 11``, ``3 and 4`` stay words)."""
    if answer is None:
        return None
    m = _LEADING_NUMBER.match(answer)
    if m and not re.search(r"\d", answer[m.end():]):
        value = _number(m.group(1).replace("$", ""))
        if value is not None:
            return str(int(value)) if value.is_integer() else repr(value)
    return answer.strip()


_LEADING_NUMBER = re.compile(r"\s*(-?\$?\d[\d,]*(?:\.\d+)?)(?!\w|\.\d)")


def _words(text: str) -> str:
    """Plain-word answers compare case-blind, without a leading article or trailing punctuation."""
    text = re.sub(r"^(the|a|an)\s+", "", text.casefold().strip())
    return text.strip(" .!?\"'")


class ProblemScorer:
    """Exact-answer scoring; ``json`` also requires the answer as the last JSON object (the format
    check), ``steps`` the answer inside ``<answer>`` (FRIT's format)."""

    def __init__(self, answer_format: AnswerFormat = "text"):
        self.answer_format = answer_format

    def predicted(self, text: str) -> str | None:
        if self.answer_format == "json":
            return json_answer(text)
        if self.answer_format == "steps":
            return answer_value(parse_trace(text).answer)
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
        a, b = normalise(predicted), normalise(str(target))
        if a == b:
            return True
        return "\\" not in a + b and _words(predicted) == _words(str(target)) != ""  # LaTeX stays exact

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
        require(answer_format in ("text", "json", "steps"), self, "answer_format", answer_format, "'text', 'json' or 'steps'")
        for name, value, low in (("n_calibration", n_calibration, 2), ("n_eval", n_eval, 1), ("batch_size", batch_size, 1),
                                 ("shots", shots, 0)):
            require(isinstance(value, int) and value >= low, self, name, value, f"an integer ≥ {low}")
        self._check_source(calibration, "calibration")
        if evaluation is None:
            require(calibration.startswith("math:") or calibration == "facts", self, "evaluation", None,
                    "held-out problems (a .jsonl file or hf:...) when calibration is not math:D or facts")
            evaluation = calibration
        self._check_source(evaluation, "evaluation")
        self.save_hyperparameters()
        self.calibration, self.evaluation = calibration, evaluation
        self.scorer = ProblemScorer(answer_format)
        self.sets: dict[str, list[Example]] = {}
        self._shots: list[Example] = []

    def _check_source(self, spec: str, field: str) -> None:
        expected = "math:D (D in 1..5), facts, a .jsonl file or hf:NAME[:CONFIG[:SPLIT]]"
        require(isinstance(spec, str) and bool(spec.strip()), self, field, spec, expected)
        if spec == "facts":
            return
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
        if spec == "facts":
            records = [(f"facts:{lineno}", r) for lineno, r in read_jsonl(FACTS) if _facts_split(r) == split]
        else:
            records = self._hf_records(spec, split) if spec.startswith("hf:") else self._jsonl_records(spec)
        picked = records[offset:offset + n]
        if not picked:
            raise DataError(f"data {spec!r}: no problems after the first {offset}")
        if len(picked) < n:
            say(self.trainer, f"data {spec!r} ({split}): {len(picked)} problems after the first {offset}, not the {n} asked for")
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
        if spec.startswith("math:") or spec == "facts":
            return (spec, split)
        if spec.startswith("hf:"):
            return hf_spec(spec, split)
        return (str(Path(spec).expanduser().resolve()),)

    def _record(self, where: str, record) -> Example:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        q_fields, a_field = self._fields(where, record)
        for field, setting in [*((f, "question_field") for f in q_fields), (a_field, "answer_field")]:
            value = record.get(field)
            if not (isinstance(value, str) or (field == a_field and isinstance(value, (int, float)))):
                raise DataError(f"{where}: field {field!r} missing or not a string (found {sorted(record)}); "
                                f"set data.{setting}")
        question = " ".join(record[f].strip() for f in q_fields)
        raw = record[a_field]
        if isinstance(raw, bool):  # StrategyQA: a yes/no answer, the supporting facts as the solution
            answer, solution = ("yes" if raw else "no"), "\n".join(map(str, record.get("facts") or []))
        elif isinstance(raw, (int, float)):  # SVAMP: a number, its equation as the solution
            answer, solution = answer_value(str(raw)), str(record.get("Equation", "")).strip()
        else:
            answer = reference_answer(raw)
            if answer is None:
                answer = raw.strip()  # a bare answer field (e.g. MATH-500's "answer")
            solution = raw.split("####")[0].strip()
        if isinstance(record.get("steps"), list):  # the embedded facts: one hop per step
            solution = "\n".join(map(str, record["steps"]))
        factual = isinstance(raw, bool) or isinstance(record.get("steps"), list)  # StrategyQA, the embedded facts
        return self._phrase(Example(where, question, solution, answer, "world" if factual else "math"), generated=False)

    def _fields(self, where: str, record: dict) -> tuple[tuple[str, ...], str]:
        q_field, a_field = self.hparams.question_field, self.hparams.answer_field
        if q_field is not None and a_field is not None:
            return (q_field,), a_field
        layout = next((fields for fields in LAYOUTS.values() if all(f in record for f in (*fields[0], fields[1]))), None)
        if layout is None:
            raise DataError(f"{where}: no question/answer, problem/solution or Body/Question/Answer fields "
                            f"(found {sorted(record)}); set data.question_field and data.answer_field")
        return ((q_field,) if q_field else layout[0]), a_field or layout[1]

    def _phrase(self, ex: Example, generated: bool = True) -> Example:
        """Ask for the answer in the configured format; the reference reply ends in that format."""
        question = ex.prompt.replace(INSTRUCTION, "").strip() if generated else ex.prompt
        body = re.sub(r"\s*The answer is [^.]*\.$", "", ex.response) if generated else ex.response
        group = "math" if generated else ex.group  # the domain: FRIT draws its unrelated facts from it
        if self.hparams.answer_format == "json":
            return Example(ex.id, f"{question} {JSON_INSTRUCTION}", f'{body} {{"answer": {json.dumps(ex.target)}}}', ex.target, group)
        if self.hparams.answer_format == "steps":
            return Example(ex.id, f"{question} {STEPS_INSTRUCTION}", render_steps(solution_steps(body), ex.target), ex.target, group)
        return Example(ex.id, f"{question} {INSTRUCTION}", f"{body} The answer is {ex.target}.", ex.target, group)

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

    def predict_dataloader(self) -> DataLoader:
        """The calibration problems: what a method builds its data from (FRIT's preference pairs)."""
        return self._loader("calibration")


def _facts_split(record) -> str:
    """The embedded facts' held-out quarter, fixed by a hash of the question."""
    question = record.get("question", "") if isinstance(record, dict) else ""
    return "test" if hashlib.sha256(question.encode()).digest()[0] % 4 == 0 else "train"
