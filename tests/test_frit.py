"""FRIT: the step format, interventions that change one step, the faithful walk, resumable pairs, the table."""

import json

import pytest
import torch

from lantern.datamodules import ReasoningProblems
from lantern.datamodules.problems import ProblemScorer, Trace, answer_value, parse_trace, render_steps, solution_steps
from lantern.datamodules.tasks import Example
from lantern.lightning_modules.frit import FRIT, Probe, Problem, faithfulness_row, fact_kind, unrelated_fact, world_facts


# ----------------------------------------------------------------------------- the format
@pytest.mark.parametrize("text, steps, answer, well_formed", [
    ('<step n="1">2 + 3 = 5.</step>\n<step n="2">5 * 2 = 10.</step>\n<answer>10</answer>', ("2 + 3 = 5.", "5 * 2 = 10."), "10", True),
    ("<step>a</step><step n=2>b<answer>7</answer>", ("a", "b"), "7", False),  # a step closed by the answer
    ("<step n='1'>a\n<step n='2'>b</step>\n<answer>7", ("a", "b"), "7", False),  # unclosed step and answer
    ("Sure! <step>a</step> then <step>b</step><answer> 7 </answer> and more", ("a", "b"), "7", False),
    ("<step></step><step>  x  y </step><answer>z</answer>", ("x y",), "z", False),  # empty step dropped
    ("The answer is 7.", (), None, False),
    ("<answer>7</answer>", (), "7", False),
    ("<STEP>a</STEP><Answer>b</Answer>", ("a",), "b", True),
    ("<step>a</step><answer></answer>", ("a",), None, True),
])
def test_parser_reads_what_a_small_model_writes(text, steps, answer, well_formed):
    trace = parse_trace(text)
    assert trace.steps == steps and trace.answer == answer and trace.well_formed == well_formed
    assert trace.parsed == (bool(steps) and answer is not None)


def test_render_and_parse_round_trip():
    steps = ["Ann has 3 apples.", "3 + 4 = 7."]
    text = render_steps(steps, "7")
    assert text == '<step n="1">Ann has 3 apples.</step>\n<step n="2">3 + 4 = 7.</step>\n<answer>7</answer>'
    assert parse_trace(text) == Trace(tuple(steps), "7", True)
    assert render_steps(steps) == text[: text.index("<answer>")]  # a prefix to continue
    assert solution_steps("12 - 2 = 10. 10 - 7 = 3.") == ["12 - 2 = 10.", "10 - 7 = 3."]
    assert solution_steps("first line\nsecond line") == ["first line", "second line"]


def test_answers_match_numerically_and_case_blind():
    s = ProblemScorer("steps")
    assert answer_value("14 apples") == "14" and answer_value("$1,200") == "1200" and answer_value("3 and 4") == "3 and 4"
    assert answer_value("CO2") == "CO2" and answer_value("Apollo 11") == "Apollo 11" and answer_value("14.") == "14"
    assert not s.matches(answer_value("H2O"), answer_value("CO2")) and s.matches(answer_value("co2"), "CO2")
    assert s.matches("14", 14.0) and not s.matches("15", 14)
    assert s.matches("Paris.", "paris") and s.matches("the euro", "Euro") and s.matches("Yes", "yes")
    assert not s.matches("Paris", "Rome") and not s.matches(None, "x") and not s.matches("\\Frac{1}{2}", "\\frac{1}{2}")
    assert s.predicted("<step>a</step><answer>14 apples</answer>") == "14"


def test_step_problems_come_with_worked_traces(tmp_path):
    dm = ReasoningProblems(calibration="math:2", answer_format="steps", shots=2, n_calibration=3, n_eval=2)
    dm.setup()
    shot = dm.messages(dm.sets["calibration"][0])[1]["content"]
    trace = parse_trace(shot)
    assert trace.well_formed and len(trace.steps) == 2 and "<step n=" in dm.messages(dm.sets["calibration"][0])[0]["content"]
    facts = ReasoningProblems(calibration="facts", answer_format="steps", shots=1, n_calibration=20, n_eval=10)
    facts.setup()
    train, test = {e.prompt for e in facts.sets["calibration"]}, {e.prompt for e in facts.sets["evaluation"]}
    assert not train & test and all(e.id.startswith("facts:") for e in facts.sets["evaluation"])
    assert {e.group for e in facts.sets["evaluation"]} == {"world"} and {e.group for e in dm.sets["calibration"]} == {"math"}
    assert fact_kind("12") == "math" and fact_kind("Paris") == "world"
    svamp = tmp_path / "svamp.jsonl"
    svamp.write_text(json.dumps({"Body": "Ann has 3 apples.", "Question": "How many after 2 more?", "Answer": 5.0,
                                 "Equation": "( 3.0 + 2.0 )"}) + "\n")
    sqa = tmp_path / "sqa.jsonl"
    sqa.write_text(json.dumps({"question": "Is Paris in France?", "answer": True, "facts": ["Paris is in France."]}) + "\n")
    both = ReasoningProblems(calibration=str(svamp), evaluation=str(sqa), answer_format="steps", shots=0, n_calibration=2, n_eval=1)
    both.setup()
    (ex,), (q,) = both.sets["calibration"], both.sets["evaluation"]
    assert ex.prompt.startswith("Ann has 3 apples. How many after 2 more?") and ex.target == "5" and ex.group == "math"
    assert q.target == "yes" and parse_trace(q.response).steps == ("Paris is in France.",) and q.group == "world"


def test_unrelated_facts_are_of_the_problems_kind():
    import random

    rng = random.Random(0)
    math_fact = unrelated_fact("math", rng)
    a, op, b, _, c = math_fact.rstrip(".").split()
    assert int(c) == eval(f"{a} {op} {b}")
    assert unrelated_fact("world", rng) in world_facts() and len(world_facts()) >= 100


# ----------------------------------------------------------------------------- the procedure, scripted
PRELIM = ["s1", "s2", "s3"]


@pytest.fixture
def frit():
    return FRIT("tiny-llama", generation_batch_size=4)


def _problem(i=0, target="7"):
    return Problem(Example(f"p{i}", "Q", "", target), "PROMPT", "math")


def test_an_intervention_changes_exactly_one_step(frit, monkeypatch):
    seen = []

    def complete(model, prompts, prefixes, temperature, max_new_tokens, stop=("</answer>",)):
        if stop == ("\n",):  # the rewrite: the model restates the fact
            return [p.rsplit("same style as that step: ", 1)[1].split("\n")[0] for p in prompts]
        seen.extend(prefixes)
        return [x + "<answer>" + ("7" if "s1" in x and x.count("<step") == 2 else "9") + "</answer>" for x in prefixes]

    monkeypatch.setattr(frit, "_complete", complete)
    probes = frit._probe(None, [_problem()] * 3, [PRELIM] * 3, [0, 1, 2], ["7"] * 3)
    for k, (probe, prefix) in enumerate(zip(probes, seen)):
        steps = parse_trace(prefix).steps
        assert len(steps) == k + 1 and steps[:k] == tuple(PRELIM[:k]) and steps[k] == probe.text != PRELIM[k]
        assert not probe.fallback and probe.text == probe.fact
    assert [p.important for p in probes] == [True, False, True]  # step 2's intervention leaves the answer at 7


def _scripted(frit, monkeypatch, important, tails, temperatures):
    """``_probe``: important ⇔ ``important(step)``; ``_traces``: by the prefix (``tails``), recording temperatures."""

    def probe(model, problems, steps, index, answers):
        return [Probe("fact", f"X{s[i]}", False, "99" if important(s[i]) else a, important(s[i]))
                for s, i, a in zip(steps, index, answers)]

    def traces(model, problems, prefixes, temperature):
        temperatures.append(temperature)
        return [Trace(*tails(tuple(x))) for x in prefixes]

    monkeypatch.setattr(frit, "_probe", probe)
    monkeypatch.setattr(frit, "_traces", traces)


def test_the_faithful_trace_drops_unimportant_steps(frit, monkeypatch):
    temps = []
    tails = {(): (tuple(PRELIM), "7", True), ("s1",): (("s1", "t2"), "7", True)}
    _scripted(frit, monkeypatch, lambda s: s != "s2", lambda x: tails[x], temps)
    p = _problem()
    frit._preliminary(None, [p])
    assert p.important == [True, False, True]
    frit._faithful(None, [p])
    assert p.chosen == ["s1", "t2"] and p.chosen_answer == "7" and p.regenerations == 1
    assert temps == [0.2, 0.2]  # the preliminary trace, then the first try of the ramp
    frit._messages = {"p0": [{"role": "user", "content": "Q"}]}
    pair = frit._pair(p)
    chosen, rejected = parse_trace(pair["chosen"]), parse_trace(pair["rejected"])
    assert chosen.steps == ("s1", "t2") and rejected.answer == "7"
    j = pair["provenance"]["step_index"]
    differ = [k for k in range(3) if rejected.steps[k] != PRELIM[k]]
    assert differ == [j] and rejected.steps[j] == f"X{PRELIM[j]}"  # one step replaced, answer kept
    assert pair["prompt"] == [{"role": "user", "content": "Q"}]  # chosen and rejected share it


def test_the_ramp_gives_up_after_its_tries(frit, monkeypatch):
    temps = []
    tails = {(): (tuple(PRELIM), "7", True), ("s1",): (("s1", "t2"), "8", True)}  # never back to 7
    _scripted(frit, monkeypatch, lambda s: s != "s2", lambda x: tails[x], temps)
    p = _problem()
    frit._preliminary(None, [p])
    frit._faithful(None, [p])
    assert p.chosen is None and p.regenerations == 6
    assert temps[1:] == pytest.approx([0.2, 0.36, 0.52, 0.68, 0.84, 1.0])
    frit._messages = {"p0": []}
    assert frit._pair(p) is None


def test_the_walk_ends_when_regenerations_keep_writing_unimportant_steps(frit, monkeypatch):
    temps = []  # the regenerated step reaches a but never matters: each try counts, kept or not
    tails = {(): (tuple(PRELIM), "7", True), ("s1",): (("s1", "u2"), "7", True)}
    _scripted(frit, monkeypatch, lambda s: s not in ("s2", "u2"), lambda x: tails[x], temps)
    p = _problem()
    frit._preliminary(None, [p])
    frit._faithful(None, [p])
    assert p.chosen is None and p.regenerations == 6 and temps[1:] == pytest.approx(frit.hparams.ramp)


def test_answering_right_after_the_kept_steps_is_a_faithful_trace(frit, monkeypatch):
    temps = []
    tails = {(): (tuple(PRELIM), "7", True), ("s1",): (("s1",), "7", True)}  # drop s2 and s3, answer at once
    _scripted(frit, monkeypatch, lambda s: s != "s2", lambda x: tails[x], temps)
    p = _problem()
    frit._preliminary(None, [p])
    frit._faithful(None, [p])
    assert p.chosen == ["s1"] and p.regenerations == 1


def test_a_trace_whose_steps_all_matter_is_its_own_chosen(frit, monkeypatch):
    temps = []
    _scripted(frit, monkeypatch, lambda s: True, lambda x: (tuple(PRELIM), "7", True), temps)
    p, unparsed = _problem(0), _problem(1)
    frit._preliminary(None, [p])
    unparsed.trace = Trace((), None, False)
    frit._faithful(None, [p, unparsed])
    assert p.chosen == PRELIM and p.regenerations == 0 and unparsed.chosen is None


# ----------------------------------------------------------------------------- predict and validate through Lightning
def _fake_run(frit, monkeypatch, probed, models=None):
    """Every trace has two steps and the right answer; every step matters. ``probed``: problem ids probed."""

    def probe(model, problems, steps, index, answers):
        probed.extend(p.example.id for p in problems)
        return [Probe("fact", f"X{s[i]}", False, "99", True) for s, i in zip(steps, index)]

    def traces(model, problems, prefixes, temperature):
        if models is not None:
            models.append(model)
        return [Trace(("a", "b"), str(p.example.target), True) for p in problems]

    monkeypatch.setattr(frit, "_probe", probe)
    monkeypatch.setattr(frit, "_traces", traces)


def test_pairs_resume_without_redoing_problems(frit, monkeypatch, tmp_path):
    import lightning as L

    from lantern.datamodules.preference import PreferenceDataModule, collate_preference
    from lantern.lightning_modules.dpo import DPO

    out = tmp_path / "progress.jsonl"
    frit.hparams.pairs_path = str(out)
    probed = []
    _fake_run(frit, monkeypatch, probed)
    dm = ReasoningProblems(calibration="math:1", answer_format="steps", shots=0, n_calibration=4, n_eval=2, batch_size=2)
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, limit_predict_batches=1)
    trainer.predict(frit, datamodule=dm)
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(first) == 2 and len(probed) == 4  # one batch of two problems, two steps each
    for r in first:
        assert r["ref_chosen"] < 0 and r["ref_rejected"] < 0 and r["ref_settings"]["model"] == "tiny-llama"
        assert r["provenance"]["important"] == [True, True] and r["prompt"][-1]["role"] == "user"
    with out.open("a") as fh:
        fh.write('{"id": "math1-train-2", "chosen": "<st')  # the run was stopped while writing
    probed.clear()
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.predict(frit, datamodule=dm)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 4 and len({r["id"] for r in records}) == 4
    assert len(probed) == 4 and not {r["id"] for r in first} & set(probed)  # only the two new problems
    final = tmp_path / "pairs.jsonl"
    assert [json.loads(x)["id"] for x in final.read_text().splitlines()] == [r["id"] for r in records]
    # DPO reads the pairs: the stored reference equals the live one of the same model
    pairs = PreferenceDataModule(train=str(final), tokenizer="byte", max_length=512, batch_size=2, val_fraction=0.25)
    pre, live = DPO("tiny-llama", reference="precomputed"), DPO("tiny-llama", reference="live")
    pre.check_datamodule(pairs)
    batch = collate_preference(pairs.sets["train"], 256)
    assert torch.allclose(pre.terms(batch)[0].loss, live.terms(batch)[0].loss, atol=1e-5)
    frit.hparams.temperature = 0.7  # other settings: the file is not this run's to continue
    with pytest.raises(Exception, match="pairs_path=.*a pairs file written with these settings"):
        L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False).predict(frit, datamodule=dm)


def test_validate_writes_the_before_after_table(frit, monkeypatch, tmp_path):
    import lightning as L

    models = []
    _fake_run(frit, monkeypatch, [], models)
    frit.hparams.compare = ["tiny-qwen2"]
    dm = ReasoningProblems(calibration="math:1", answer_format="steps", shots=0, n_calibration=2, n_eval=3, batch_size=3)
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.validate(frit, datamodule=dm)
    rows = json.loads((tmp_path / "frit.json").read_text())
    assert [r["model"] for r in rows] == ["tiny-llama", "tiny-qwen2"]
    assert rows[0]["accuracy"] == 100.0 and rows[0]["faithfulness"] == 100.0 and rows[0]["n"] == 3
    assert [type(m).__name__ for m in models] == ["LlamaForCausalLM", "Qwen2ForCausalLM"]  # each row its own model


def test_faithfulness_row_by_hand():
    results = [
        {"parsed": True, "correct": True, "steps": 2, "important": 1, "fallbacks": 0},
        {"parsed": True, "correct": False, "steps": 3, "important": 3, "fallbacks": 1},
        {"parsed": False, "correct": False, "steps": 0, "important": 0, "fallbacks": 0},
        {"parsed": True, "correct": True, "steps": 4, "important": 1, "fallbacks": 2},
    ]
    row = faithfulness_row("m", results)
    assert row["accuracy"] == 50.0 and row["parsed"] == 75.0
    assert row["faithfulness"] == pytest.approx(100 * (0.5 + 1 + 0.25) / 3, abs=0.05)
    assert row["fully_faithful"] == pytest.approx(100 / 3, abs=0.05) and row["rewrite_fallbacks"] == 3
    assert row["steps_per_trace"] == 3.0


def test_frit_needs_the_step_format():
    from lantern.errors import ConfigError

    with pytest.raises(ConfigError, match="answer_format='text': expected 'steps'"):
        FRIT("tiny-llama").check_datamodule(ReasoningProblems(answer_format="text"))
    with pytest.raises(ConfigError, match="ramp"):
        FRIT("tiny-llama", ramp=[])


@pytest.mark.slow
def test_pairs_then_dpo_on_the_embedded_model(tmp_path, monkeypatch):
    """The recipes end to end on SmolLM2-135M: parsed traces, pairs whose stored reference DPO accepts."""
    from pathlib import Path

    from lantern.cli import cli_main

    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "configs/frit"
    cli = cli_main(["predict", "--config", str(configs / "pairs_smollm2.yaml"), "--data.init_args.n_calibration", "4",
                    "--data.init_args.batch_size", "4", "--model.init_args.max_new_tokens", "80"])
    run = Path(cli.trainer.log_dir)
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 2  # two worked examples: SmolLM2 writes the format
    for r in pairs:
        chosen, rejected = parse_trace(r["chosen"]), parse_trace(r["rejected"])
        assert chosen.parsed and rejected.parsed and r["ref_chosen"] < 0 and r["ref_rejected"] < 0
        j = r["provenance"]["step_index"]
        assert rejected.steps[j] == r["provenance"]["intervention"] and rejected.answer is not None
    dpo = cli_main(["fit", "--config", str(configs / "dpo_smollm2.yaml"), "--data.init_args.train", str(run / "pairs.jsonl"),
                    "--data.init_args.val_fraction", "0.5", "--trainer.max_steps", "1", "--checkpoint.monitor", "null",
                    "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0", "--model.init_args.export", "false"])
    metrics = dpo.trainer.callback_metrics
    assert abs(float(metrics["val/rewards/margins"])) < 0.5 and float(metrics["val/loss"]) == pytest.approx(0.693, abs=0.05)
