"""FRIT: faithful reasoning via intervention training — preference pairs by intervention, and faithfulness.

Swaroop et al., "FRIT: Using Causal Importance to Improve Chain-of-Thought Faithfulness",
arXiv 2509.13334. The model writes ``<step n="i">…</step>`` steps and ``<answer>…</answer>``
(``ReasoningProblems(answer_format="steps")`` asks for it with worked examples). Per problem:

1. the preliminary trace at temperature 0.2, answer a;
2. an intervention on step i: an unrelated fact of the same kind (an arithmetic fact for numeric
   answers, a world fact otherwise), rewritten by the model in the style of step i; steps before
   i are kept, the rest regenerated (temperature 0.2);
3. step i is causally important ⇔ the regenerated answer is not equivalent to a (numbers
   numerically, words case-blind: ``ProblemScorer.matches``); a regeneration with no answer
   counts as changed;
4. chosen (faithful): walk the steps; at an unimportant step i, drop it and the rest and
   regenerate from steps[:i] with the temperature ramping 0.2 → 1.0 over up to 6 tries until the
   answer is equivalent to a, then check the new steps from i on; rejected (unfaithful): the
   preliminary trace with one random step replaced by its intervention, answer unchanged.

``predict`` builds the pairs of the datamodule's calibration problems into ``pairs.jsonl`` (with
provenance, and the reference log-probs of both replies under this model for DPO), batch by
batch: an interrupted run, started again with the same command, skips the problems already done.
``validate`` measures, on the held-out problems and for this model and each of ``compare``:
accuracy, faithfulness (the share of a trace's steps that are causally important, averaged over
traces) and the share of fully faithful traces, with bootstrap intervals: ``frit.{md,csv,json}``.

Choices where the paper is silent: the fact's kind comes from the problem's source (``Example.group``:
the arithmetic sources are "math", ``facts`` and StrategyQA "world"); the rewrite is greedy and
falls back to the fact itself when the model's rewrite is empty, tagged, the original step, or
drops the fact's numbers or most of its words (counted as ``rewrite_fallbacks``); a position of
the walk gets at most ``len(ramp)`` regenerations, kept or not; a chosen trace needs at least one
step; faithfulness averages over parsed traces (a step and an answer), and accuracy counts
unparsed traces as wrong. Answer equivalence is the numeric / normalised match only: the
paper's NLI alternative (and its entailment metric) is not implemented.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lantern import reporting
from lantern.datamodules.preference import encode_pairs, model_key, reference_logprobs, reference_settings
from lantern.datamodules.problems import ProblemScorer, Trace, answer_value, parse_trace, render_steps
from lantern.datamodules.tasks import Example
from lantern.errors import ConfigError, DataError, require
from lantern.metrics import bootstrap_ci
from lantern.models import load_model
from lantern.models.generation import Sampling, generate, render_prompt
from lantern.models.loading import load_tokenizer

WORLD_FACTS = Path(__file__).resolve().parents[1] / "datamodules" / "data" / "world_facts.txt"
REWRITE = ("Here is a step of a solution: {step}\nRestate this fact in the same style as that step: {fact}\n"
           "Reply with the restated fact only.")
REWRITE_SHOTS = (
    ("Tom has 12 - 5 = 7 apples left.", "4 + 9 = 13.", "Tom has 4 + 9 = 13 apples left."),
    ("The Eiffel Tower stands in France.", "The Danube flows into the Black Sea.",
     "The Danube flows into the Black Sea."),
)
_CLOSE = "</answer>"


@functools.cache
def world_facts() -> tuple[str, ...]:
    lines = [ln.strip() for ln in WORLD_FACTS.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{WORLD_FACTS}: no facts")
    return tuple(lines)


def fact_kind(target: object) -> Literal["math", "world"]:
    """For problems whose source does not say its domain: numeric answers get arithmetic facts, the rest world facts."""
    value = answer_value(str(target))
    try:
        float(value)
        return "math"
    except (TypeError, ValueError):
        return "world"


def unrelated_fact(kind: str, rng: random.Random) -> str:
    """A true fact with nothing to do with the problem: random arithmetic, or a line of the world facts."""
    if kind == "world":
        return rng.choice(world_facts())
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    return f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}."


def _keeps(fact: str, text: str) -> bool:
    """A rewrite still states the fact: all its numbers, and most of its longer words."""
    numbers = re.findall(r"\d+", fact)
    if numbers:
        return all(n in re.findall(r"\d+", text) for n in numbers)
    words = {w for w in re.findall(r"[a-z]+", fact.casefold()) if len(w) > 3}
    return len(words & set(re.findall(r"[a-z]+", text.casefold()))) >= 0.5 * len(words)


def _rng(*key) -> random.Random:
    """A generator fixed by its key (seed, problem id, step): the same draws whatever the batching."""
    return random.Random(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


@dataclass
class Problem:
    """One problem's state through the FRIT procedure."""

    example: Example
    prompt: str  # the rendered chat prompt; a trace prefix is appended to it verbatim
    kind: str
    trace: Trace | None = None  # the preliminary trace
    important: list[bool] = field(default_factory=list)  # per preliminary step
    interventions: list[dict] = field(default_factory=list)  # per preliminary step: fact, text, answer, fallback
    chosen: list[str] | None = None  # steps of the faithful trace once found
    chosen_answer: str | None = None
    regenerations: int = 0


@dataclass
class Probe:
    """The outcome of intervening on one step."""

    fact: str
    text: str  # the step as intervened (the model's rewrite, or the fact itself)
    fallback: bool
    answer: str | None  # the answer regenerated after it
    important: bool


class FRIT(L.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m-instruct",
        temperature: float = 0.2,
        ramp: list[float] = (0.2, 0.36, 0.52, 0.68, 0.84, 1.0),
        max_new_tokens: int = 256,
        rewrite_tokens: int = 48,
        generation_batch_size: int = 32,
        max_length: int = 512,
        only_correct: bool = False,
        reference_logprobs: bool = True,
        pairs_path: str | None = None,
        compare: list[str] = (),
        seed: int = 0,
    ):
        """
        Args:
            model_name: the model that writes (and, for DPO, is the reference of) the traces.
            temperature: sampling temperature of preliminary traces and regenerations (the paper's 0.2).
            ramp: temperatures of the tries that regenerate a faithful tail (0.2 → 1.0 over 6 tries).
            max_new_tokens: most tokens of a trace or a regenerated tail.
            rewrite_tokens: most tokens of a rewritten fact.
            generation_batch_size: rows decoded together.
            max_length: the DPO sequence length the reference log-probs are computed at (the recipe's 512).
            only_correct: build pairs only where the preliminary answer is correct (the notes are silent;
                off keeps the model's own answer as the paper's a).
            reference_logprobs: store this model's summed log-probs of both replies with each pair.
            pairs_path: the progress file ``predict`` appends every problem's record to (pairs, and
                problems that gave none), and continues when it finds it; None: ``pairs-<settings
                digest>.jsonl`` beside the run folders. The pairs alone go to ``pairs.jsonl`` in the run.
            compare: more models (paths of trained ``model/`` folders, or names) that ``validate``
                evaluates on the same problems, one table row each (this model is the first row).
            seed: seed of samples, fact draws and the rejected step.
        """
        super().__init__()
        require(isinstance(ramp, (list, tuple)) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ramp),
                self, "ramp", ramp, "a list of temperatures, e.g. [0.2, 0.36, 0.52, 0.68, 0.84, 1.0]")
        ramp = [float(t) for t in ramp]
        require(isinstance(temperature, (int, float)) and 0 <= temperature < math.inf, self, "temperature",
                temperature, "a finite number ≥ 0")
        require(len(ramp) >= 1 and all(0 <= t < math.inf for t in ramp), self, "ramp", ramp,
                "one temperature ≥ 0 per try, e.g. [0.2, 0.36, 0.52, 0.68, 0.84, 1.0]")
        for name, value, low in (("max_new_tokens", max_new_tokens, 8), ("rewrite_tokens", rewrite_tokens, 4),
                                 ("generation_batch_size", generation_batch_size, 1), ("max_length", max_length, 16)):
            require(isinstance(value, int) and value >= low, self, name, value, f"an integer ≥ {low}")
        compare = [compare] if isinstance(compare, str) else list(compare)
        require(all(isinstance(c, str) and c for c in compare), self, "compare", compare, "a list of model names or paths")
        for c in compare:  # a folder that is not there fails now, not after the first model's evaluation
            local = Path(c).expanduser().exists() or c.startswith((".", "/", "~")) or Path(c.split("/")[0]).is_dir()
            require(not local or (Path(c).expanduser() / "config.json").is_file(), self, "compare", c,
                    "a saved model folder holding config.json (e.g. runs/frit_dpo_smollm2/latest/model), or a model name")
        self.save_hyperparameters()
        self.hparams["ramp"], self.hparams["compare"] = ramp, compare
        self.tokenizer_name = model_name
        self.tokenizer = load_tokenizer(model_name)
        for c in compare:  # compared models read and write through this model's tokenizer
            require(load_tokenizer(c).fingerprint == self.tokenizer.fingerprint, self, "compare", c,
                    f"models that share {model_name}'s tokenizer (e.g. its fine-tuned copies)")
        self.model = load_model(model_name, seed=seed)
        self.model.requires_grad_(False)
        self.scorer = ProblemScorer("steps")
        self._results: dict[str, list[dict]] = {}
        self._calls = 0

    def check_datamodule(self, dm) -> None:
        require(getattr(dm.hparams, "answer_format", None) == "steps", "data", "answer_format",
                getattr(dm.hparams, "answer_format", None), "'steps' (FRIT reads <step> and <answer> tags)")

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # problems and prompts: nothing to move

    def configure_optimizers(self):
        return None

    # ------------------------------------------------------------------ generation
    def _complete(self, model, prompts: list[str], prefixes: list[str], temperature: float, max_new_tokens: int,
                  stop: tuple[str, ...] = (_CLOSE,)) -> list[str]:
        """Continue each rendered prompt + prefix; the text returned includes the prefix (and a closed answer)."""
        if not prompts:
            return []
        self._calls += 1
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                            seed=(self.hparams.seed * 1_000_003 + self._calls) % 2**31)
        out = generate(model, self.tokenizer, [p + x for p, x in zip(prompts, prefixes)], sampling, chat=False,
                       batch_size=self.hparams.generation_batch_size)
        return [x + t + (_CLOSE if f == "stop" and _CLOSE in stop else "") for x, t, f in zip(prefixes, out.text, out.finish)]

    def _traces(self, model, problems: list[Problem], prefixes: list[list[str]], temperature: float) -> list[Trace]:
        texts = self._complete(model, [p.prompt for p in problems], [render_steps(s) for s in prefixes], temperature,
                               self.hparams.max_new_tokens)
        return [parse_trace(t) for t in texts]

    def _rewrite(self, model, steps: list[str], facts: list[str]) -> list[tuple[str, bool]]:
        """Each fact in the style of its step, greedy; the fact itself where the rewrite is unusable."""
        shots = [m for step, fact, out in REWRITE_SHOTS for m in (
            {"role": "user", "content": REWRITE.format(step=step, fact=fact)}, {"role": "assistant", "content": out})]
        prompts = [render_prompt(self.tokenizer, [*shots, {"role": "user", "content": REWRITE.format(step=s, fact=f)}])
                   for s, f in zip(steps, facts)]
        texts = self._complete(model, prompts, [""] * len(prompts), 0.0, self.hparams.rewrite_tokens, stop=("\n",))
        out = []
        for step, fact, text in zip(steps, facts, texts):
            text = " ".join(text.split())
            usable = (bool(text) and "<" not in text and text.casefold() != step.casefold()
                      and len(text) <= 3 * len(fact) + 40 and _keeps(fact, text))
            out.append((text, False) if usable else (fact, True))
        return out

    def _probe(self, model, problems: list[Problem], steps: list[list[str]], index: list[int],
               answers: list[str | None]) -> list[Probe]:
        """Intervene on step ``index[k]`` of ``steps[k]`` and regenerate; important ⇔ the answer is not ``answers[k]``."""
        facts = [unrelated_fact(p.kind, _rng(self.hparams.seed, p.example.id, tuple(s[:i + 1]), "fact"))
                 for p, s, i in zip(problems, steps, index)]
        rewrites = self._rewrite(model, [s[i] for s, i in zip(steps, index)], facts)
        prefixes = [[*s[:i], text] for s, i, (text, _) in zip(steps, index, rewrites)]
        traces = self._traces(model, problems, prefixes, self.hparams.temperature)
        probes = []
        for fact, (text, fallback), trace, a in zip(facts, rewrites, traces, answers):
            new = answer_value(trace.answer)
            probes.append(Probe(fact, text, fallback, new, not self.scorer.matches(new, a)))
        return probes

    def _preliminary(self, model, problems: list[Problem]) -> None:
        """Sample each trace and probe every one of its steps (one batched call for all steps of all problems)."""
        for p, trace in zip(problems, self._traces(model, problems, [[] for _ in problems], self.hparams.temperature)):
            p.trace = trace
        items = [(p, k) for p in problems if p.trace.parsed for k in range(len(p.trace.steps))]
        probes = self._probe(model, [p for p, _ in items], [list(p.trace.steps) for p, _ in items], [k for _, k in items],
                             [answer_value(p.trace.answer) for p, _ in items])
        for (p, _), probe in zip(items, probes):
            p.important.append(probe.important)
            p.interventions.append(probe.__dict__)

    # ------------------------------------------------------------------ faithful traces
    def _faithful(self, model, problems: list[Problem]) -> None:
        """Step 4 of FRIT, batched across problems: truncate at the first unimportant step and regenerate."""
        # per problem: [steps, importance of each step (None: unchecked), position reached, regenerations at it];
        # a position gets at most len(ramp) regenerations, the i-th at ramp[i], whether or not the earlier ones were kept
        state = {id(p): [list(p.trace.steps), list(p.important), 0, 0] for p in problems if p.trace.parsed}
        while state:
            # 1) probe every unchecked step (after a regeneration, the new tail)
            todo = [(p, k) for p in problems if id(p) in state
                    for k, known in enumerate(state[id(p)][1]) if known is None]
            if todo:
                probes = self._probe(model, [p for p, _ in todo], [state[id(p)][0] for p, _ in todo], [k for _, k in todo],
                                     [answer_value(p.trace.answer) for p, _ in todo])
                for (p, k), probe in zip(todo, probes):
                    state[id(p)][1][k] = probe.important
            # 2) advance to the first unimportant step; done when there is none
            regenerate = []
            for p in problems:
                s = state.get(id(p))
                if s is None:
                    continue
                steps, important, at, tries = s
                while at < len(steps) and important[at]:
                    at, tries = at + 1, 0
                s[2], s[3] = at, tries
                if at == len(steps):
                    p.chosen = steps
                    p.chosen_answer = p.chosen_answer or p.trace.answer
                    del state[id(p)]
                elif tries >= len(self.hparams.ramp):
                    del state[id(p)]  # no faithful trace within the tries
                else:
                    regenerate.append(p)
            # 3) regenerate the tails, one temperature per try (problems at the same try share a call)
            tries = {id(p): state[id(p)][3] for p in regenerate}  # one regeneration per problem per pass
            for t, temperature in enumerate(self.hparams.ramp):
                group = [p for p in regenerate if tries[id(p)] == t]
                if not group:
                    continue
                traces = self._traces(model, group, [state[id(p)][0][:state[id(p)][2]] for p in group], temperature)
                for p, trace in zip(group, traces):
                    s = state[id(p)]
                    p.regenerations += 1
                    s[3] += 1  # every try at this position counts, kept or not: the ramp bounds the walk
                    at = s[2]
                    ok = trace.parsed and self.scorer.matches(answer_value(trace.answer), answer_value(p.trace.answer))
                    if ok and len(trace.steps) >= max(1, at):  # answering right after steps[:at] is kept too
                        s[0], s[1] = list(trace.steps), s[1][:at] + [None] * (len(trace.steps) - at)
                        p.chosen_answer = trace.answer

    def _pair(self, p: Problem) -> dict | None:
        """The preference record of a problem, or None when it has no faithful trace."""
        a = answer_value(p.trace.answer) if p.trace else None
        correct = self.scorer.matches(a, answer_value(str(p.example.target)))
        if p.chosen is None or (self.hparams.only_correct and not correct):
            return None
        j = _rng(self.hparams.seed, p.example.id, "rejected").randrange(len(p.trace.steps))
        probe = p.interventions[j]
        rejected_steps = [*p.trace.steps[:j], probe["text"], *p.trace.steps[j + 1:]]
        chosen, rejected = render_steps(p.chosen, p.chosen_answer), render_steps(rejected_steps, p.trace.answer)
        if chosen == rejected:
            return None
        return {"id": p.example.id, "prompt": self._messages[p.example.id], "chosen": chosen, "rejected": rejected,
                "provenance": {"target": p.example.target, "answer": a, "correct": correct, "step_index": j,
                               "fact": probe["fact"], "intervention": probe["text"], "rewrite_fallback": probe["fallback"],
                               "intervened_answer": probe["answer"], "important": p.important,
                               "regenerations": p.regenerations, "preliminary": render_steps(p.trace.steps, p.trace.answer)}}

    def _problems(self, batch: dict) -> list[Problem]:
        dm = self.trainer.datamodule
        problems = []
        for ex, messages in zip(batch["examples"], batch["prompts"]):
            self._messages[ex.id] = messages
            kind = ex.group if ex.group in ("math", "world") else fact_kind(ex.target)
            problems.append(Problem(ex, render_prompt(self.tokenizer, messages, dm.hparams.system, dm.hparams.chat), kind))
        return problems

    # ------------------------------------------------------------------ predict: pairs
    def on_predict_start(self) -> None:
        self._messages: dict[str, list[dict]] = {}
        run = reporting.run_dir(self.trainer)
        self._final = run / "pairs.jsonl"
        settings = self._run_settings = self._settings()  # fixed for the run: every record carries it
        if self.hparams.pairs_path:
            self._out = Path(self.hparams.pairs_path).expanduser()
            require(not self._out.is_dir() and self._out.resolve() != self._final.resolve(), self, "pairs_path",
                    self.hparams.pairs_path, "a file path other than the run's pairs.jsonl (where the pairs alone go)")
        else:  # beside the run folders, named by the settings: the same command finds it again
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
            self._out = (run.parent if run.name.startswith("version_") else run) / f"pairs-{digest}.jsonl"
        rank = self.trainer.global_rank
        self._mine = self._out if rank == 0 else self._out.with_name(f"{self._out.stem}.rank{rank}.jsonl")
        self._done = set()
        for path in self._parts():
            self._done |= self._finished(path, settings)
        if self._done:
            reporting.say(self.trainer, f"{self._out}: {len(self._done)} problems already done; continuing")

    def _parts(self) -> list[Path]:
        """The progress file and what other ranks of a multi-device run left beside it."""
        return [self._out, *sorted(self._out.parent.glob(f"{self._out.stem}.rank*.jsonl"))]

    def _finished(self, path: Path, settings: dict) -> set[str]:
        """Problem ids already in a progress file (with a pair or without), which must share these settings.

        A last line cut short when a run stopped is removed (that problem is done again)."""
        if not path.exists():
            return set()
        lines = path.read_text().splitlines(keepends=True)
        done = set()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
                if lineno == len(lines):
                    if path == self._mine:
                        path.write_text("".join(lines[:-1]))
                    continue
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: not a JSON object; move the file away or set model.pairs_path")
            if record.get("settings") != settings:
                raise ConfigError(self, "pairs_path", str(path),
                                  f"a pairs file written with these settings, to continue it (line {lineno} has "
                                  f"{record.get('settings')}), or a new path")
            done.add(record.get("id"))
        return done

    def _settings(self) -> dict:
        """Everything a pair depends on except how many problems are asked for (more extends a file)."""
        dm, hp = self.trainer.datamodule, self.hparams
        return {"model": model_key(hp.model_name), "temperature": hp.temperature, "ramp": hp.ramp, "seed": hp.seed,
                "max_new_tokens": hp.max_new_tokens, "rewrite_tokens": hp.rewrite_tokens, "only_correct": hp.only_correct,
                "reference_logprobs": hp.reference_logprobs, "max_length": hp.max_length,
                "problems": dm.calibration, "data_seed": dm.hparams.seed, "shots": dm.hparams.shots,
                "system": dm.hparams.system, "chat": dm.hparams.chat}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        problems = [p for p in self._problems(batch) if p.example.id not in self._done]
        self._preliminary(self.model, problems)
        self._faithful(self.model, problems)
        pairs = [self._pair(p) for p in problems]
        built = [r for r in pairs if r is not None]
        if built and self.hparams.reference_logprobs:
            self._reference(built)
        settings = self._run_settings
        records = [{**r, "settings": settings} if r is not None else
                   {"id": p.example.id, "pair": None, "parsed": bool(p.trace and p.trace.parsed), "settings": settings}
                   for p, r in zip(problems, pairs)]
        if records:  # each rank appends to its own file: ranks may get different numbers of batches
            self._mine.parent.mkdir(parents=True, exist_ok=True)
            with self._mine.open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)
            self._done.update(r["id"] for r in records)
        return {"problems": len(problems), "pairs": len(built)}

    def _reference(self, records: list[dict]) -> None:
        """This model's summed reply log-probs, encoded exactly as DPO encodes the pairs."""
        dm, hp = self.trainer.datamodule, self.hparams
        pairs, _ = encode_pairs(self.tokenizer, [r["prompt"] for r in records], [r["chosen"] for r in records],
                                [r["rejected"] for r in records], dm.hparams.system, dm.hparams.chat, hp.max_length,
                                [f"problem {r['id']}" for r in records], "model.max_length")
        settings = reference_settings(hp.model_name, hp.max_length, dm.hparams.system, dm.hparams.chat)
        scores = reference_logprobs(self.model, pairs, self.tokenizer.eos_token_id, max(1, hp.generation_batch_size // 2))
        for record, (chosen, rejected) in zip(records, scores):
            record.update(ref_chosen=chosen, ref_rejected=rejected, ref_settings=settings)

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier()
        if not self.trainer.is_global_zero:
            return
        records = {}
        for path in self._parts():
            for line in path.read_text().splitlines() if path.exists() else []:
                record = json.loads(line)
                records.setdefault(record["id"], record)
        if len(self._parts()) > 1:  # fold the other ranks' files into the one a later run continues
            self._out.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
            for path in self._parts()[1:]:
                path.unlink()
        pairs = [r for r in records.values() if "chosen" in r]
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self._final.write_text("".join(json.dumps(r) + "\n" for r in pairs))
        unparsed = sum(1 for r in records.values() if r.get("parsed") is False)
        reporting.say(self.trainer, f"{len(pairs)} preference pairs from {len(records)} problems ({unparsed} preliminary "
                                    f"traces unparsed, {len(records) - len(pairs) - unparsed} without a faithful trace "
                                    f"or left out): {self._final}")

    # ------------------------------------------------------------------ validate: faithfulness and accuracy
    def on_validation_epoch_start(self) -> None:
        self._messages = {}
        self._results = {}

    def _models(self):
        yield self.hparams.model_name, self.model
        for name in self.hparams.compare:
            other = load_model(name).to(self.device)
            yield name, other
            del other

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for name, model in self._models():
            self._calls = 1_000 * batch_idx  # every model draws the same seeds: differences are the models'
            problems = self._problems(batch)
            self._preliminary(model, problems)
            for p in problems:
                a = answer_value(p.trace.answer)
                self._results.setdefault(name, []).append({
                    "id": p.example.id, "parsed": p.trace.parsed,
                    "correct": p.trace.parsed and self.scorer.matches(a, answer_value(str(p.example.target))),
                    "steps": len(p.important), "important": sum(p.important),
                    "fallbacks": sum(i["fallback"] for i in p.interventions)})

    def on_validation_epoch_end(self) -> None:
        rows = []
        for name in [self.hparams.model_name, *self.hparams.compare]:
            results = {r["id"]: r for r in reporting.gather_objects(self._results.get(name, []))}.values()  # a sampler pads with repeats
            if results:
                rows.append(faithfulness_row(name, list(results)))
        if not rows or self.trainer.sanity_checking:
            return
        main = rows[0]
        for key in ("accuracy", "faithfulness", "fully_faithful", "parsed"):
            if isinstance(main[key], float):
                self.log(f"frit/{key}", main[key], rank_zero_only=True, batch_size=main["n"])
        reporting.write_table(self.trainer, rows, "frit", "frit/table")


def faithfulness_row(model: str, results: list[dict]) -> dict:
    """One table row: accuracy over all problems; faithfulness over parsed traces; 95% bootstrap intervals (%)."""
    correct = torch.tensor([float(r["correct"]) for r in results])
    parsed = [r for r in results if r["parsed"] and r["steps"]]
    share = torch.tensor([r["important"] / r["steps"] for r in parsed])
    full = torch.tensor([float(r["important"] == r["steps"]) for r in parsed])

    def pct(values: torch.Tensor) -> tuple:
        if values.numel() == 0:
            return "", ""
        low, high = bootstrap_ci(lambda x: x.mean(-1), values)
        return round(100 * values.mean().item(), 1), f"[{100 * low.item():.1f}, {100 * high.item():.1f}]"

    acc, acc_ci = pct(correct)
    faith, faith_ci = pct(share)
    fully, fully_ci = pct(full)
    return {"model": model, "n": len(results), "parsed": round(100 * len(parsed) / len(results), 1),
            "accuracy": acc, "accuracy_ci": acc_ci, "faithfulness": faith, "faithfulness_ci": faith_ci,
            "fully_faithful": fully, "fully_faithful_ci": fully_ci,
            "steps_per_trace": round(sum(r["steps"] for r in parsed) / max(1, len(parsed)), 2),
            "rewrite_fallbacks": sum(r["fallbacks"] for r in results)}
