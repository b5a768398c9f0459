import json

import lightning as L
import pytest
import torch

from lantern.datamodules import ReasoningProblems
from lantern.datamodules.problems import ProblemScorer, boxed, json_answer, reference_answer
from lantern.datamodules.tasks import Example, TaskScore
from lantern.errors import ConfigError, DataError, LanternError
from lantern.lightning_modules import AmortizedLatentSteering
from lantern.lightning_modules.als import answer_states, latent_seek, offset_logprobs, self_reward
from lantern.models import get_adapter, load_model, load_tokenizer
from lantern.models.generation import Sampling, Step, generate, render_prompt
from lantern.models.steering import ALSSteer, Direction, mean_hidden

from conftest import peaked

PROMPTS = ["the quick brown fox", "a", "hello there, how are you?", "xyz", "jumps over the lazy dog"]
N = 12


def unit(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    v = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    return scale * v / v.norm()


def steered(model, tok, prompts, v, alpha, tau, layer=-1, batch_size=8, gate=None):
    steer = ALSSteer(v, alpha, tau, gate)
    out = generate(model, tok, prompts, Sampling(max_new_tokens=N), chat=False, batch_size=batch_size,
                   hook=steer, hook_layer=layer, transient=True, eos_token_ids=[])
    return out, steer


def uncached(model, tok, prompt, v, alpha, tau, layer):
    """The definition: a full forward per step, the nudge at the newest position only."""
    block = get_adapter(model).blocks(model)[layer]

    def nudge(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        last = h[:, -1]
        if torch.nn.functional.cosine_similarity(last, v[None], dim=-1).item() < tau:
            h[:, -1] = last + alpha * v
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    ids = tok.encode_batch([prompt])[0]
    handle = block.register_forward_pre_hook(nudge, with_kwargs=True)
    try:
        with torch.no_grad():
            for _ in range(N):
                ids = ids + [int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())]
    finally:
        handle.remove()
    return ids[-N:]


def test_alpha_zero_and_a_closed_gate_are_plain_greedy(llama, tok):
    greedy = generate(llama, tok, PROMPTS, Sampling(max_new_tokens=N), chat=False, eos_token_ids=[])
    ids = torch.tensor([list(PROMPTS[0].encode())])
    hf = llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                        pad_token_id=256, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert greedy.tokens[0] == hf
    for alpha, tau in ((0.0, 2.0), (20.0, -1.0), (20.0, -1.5)):
        out, steer = steered(llama, tok, PROMPTS, unit(), alpha, tau)
        assert out.tokens == greedy.tokens
    assert steer.firing_rate == 0.0


def test_tau_above_one_fires_every_step_and_zero_vector_is_a_no_op(llama, tok):
    greedy = generate(llama, tok, PROMPTS, Sampling(max_new_tokens=N), chat=False, eos_token_ids=[])
    out, steer = steered(llama, tok, PROMPTS, unit(), 20.0, 1.01)
    assert steer.firing_rate == 1.0 and int(steer.steps) == N * len(PROMPTS)
    assert out.tokens != greedy.tokens  # a strong nudge at every step changes the text
    zero = Direction(torch.zeros(64), 1).unit  # identical good and bad sets: v = 0
    out, steer = steered(llama, tok, PROMPTS, zero, 20.0, 1.01)
    assert out.tokens == greedy.tokens and steer.firing_rate == 1.0


@pytest.mark.parametrize("name,layer", [("tiny-llama", 0), ("tiny-llama", 1), ("tiny-qwen2", 0), ("tiny-gpt2", 0)])
def test_cached_steering_equals_uncached_and_batches_equal_one_by_one(tok, name, layer):
    model = peaked(load_model(name, seed=0))
    v, alpha, tau = unit(2), 2.0, 0.0  # fires at some steps and not others
    batched, steer = steered(model, tok, PROMPTS, v, alpha, tau, layer=layer, batch_size=2)
    assert 0 < steer.firing_rate < 1
    for prompt, tokens in zip(PROMPTS, batched.tokens):
        assert tokens == uncached(model, tok, prompt, v, alpha, tau, layer)
        alone, _ = steered(model, tok, [prompt], v, alpha, tau, layer=layer)
        assert alone.tokens[0] == tokens
    persistent = generate(model, tok, PROMPTS, Sampling(max_new_tokens=N), chat=False, hook=ALSSteer(v, alpha, tau),
                          hook_layer=layer, eos_token_ids=[], batch_size=2)
    assert persistent.tokens != batched.tokens  # a nudge left in the cache would be a different method


def test_transient_hooks_are_checked_before_decoding(llama, tok):
    def in_place(hidden, step):
        hidden[:, -1] += 50.0  # edits its argument: the cache must still get the unedited stream
        return hidden

    v = unit(2)
    ref = generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=N), chat=False, eos_token_ids=[],
                   hook=lambda h, s: h.clone().index_add_(1, torch.tensor([h.shape[1] - 1]), torch.full_like(h[:, -1:], 50.0)),
                   hook_layer=1, transient=True)
    out = generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=N), chat=False, eos_token_ids=[], hook=in_place,
                   hook_layer=1, transient=True)
    assert out.tokens == ref.tokens
    with pytest.raises(ConfigError, match="generate.transient=True: expected true or false \\(true only with a hook\\)"):
        generate(llama, tok, PROMPTS[:1], transient=True)
    llama.config.layer_types = ["full_attention", "sliding_attention"]
    try:
        with pytest.raises(ConfigError, match=r"hook_layer=0: expected with transient=True, a block from which every later block has full attention .*: 2..1"):
            generate(llama, tok, PROMPTS[:1], hook=ALSSteer(v, 1.0, 0.0), hook_layer=0, transient=True)
    finally:
        del llama.config.layer_types


def test_gate_holds_the_nudge_inside_the_structured_answer():
    steer = ALSSteer(unit(), 1.0, 2.0, gate_open=torch.tensor([7]), gate_close=torch.tensor([8]))
    hidden, alive = torch.zeros(2, 1, 64), torch.tensor([True, True])
    fired = []
    for index, last in enumerate([[7, 1], [7, 2], [3, 7], [8, 4], [5, 6], [6, 8]]):
        out = steer(hidden, Step(index, [0, 1], alive, torch.tensor(last)))
        fired.append((out[:, -1] != 0).any(-1).tolist())
    # step 0's token is the prompt's: it opens nothing. Row 0 opens at step 1 and closes at step 3;
    # row 1 opens at step 2 and closes at step 5.
    assert fired == [[True, True], [False, True], [False, False], [True, False], [True, False], [True, True]]
    assert int(steer.fired) == 7 and int(steer.steps) == 12


def test_steer_counts_only_rows_still_generating():
    steer = ALSSteer(unit(), 1.0, 2.0)
    steer(torch.zeros(3, 1, 64), Step(1, [0, 1, 2], torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.long)))
    assert (int(steer.fired), int(steer.steps)) == (2, 2)


def test_mean_hidden_reads_block_inputs_over_the_selected_positions(llama):
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    select = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1]]).bool()
    seen = []
    handle = get_adapter(llama).blocks(llama)[1].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    with torch.no_grad():
        got = mean_hidden(llama, ids, mask, select, [1])[:, 0]
    handle.remove()
    h = seen[0]
    torch.testing.assert_close(got[0], h[0, 2:5].mean(0))
    torch.testing.assert_close(got[1], h[1, [0, 3]].mean(0))  # position 5 is padding


def test_answer_states_average_the_positions_that_produced_the_answer(llama, tok):
    out = generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=4), chat=False, eos_token_ids=[])
    states = answer_states(llama, tok, PROMPTS[:2], out.tokens, 1, chat=False, system=None)
    seen = []
    handle = get_adapter(llama).blocks(llama)[1].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS[:2], out.tokens):
            llama(torch.tensor([list(prompt.encode()) + completion[:-1]]))
    handle.remove()
    for i, (prompt, h) in enumerate(zip(PROMPTS[:2], seen)):
        torch.testing.assert_close(states[i], h[0, len(prompt) - 1:].mean(0), atol=1e-5, rtol=1e-5)


def test_direction_file_round_trip_and_bad_files(tmp_path, llama):
    d = Direction(torch.arange(64.0), 1, {"model": "tiny-llama", "good": 3})
    loaded = Direction.load(d.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded.vector, d.vector) and loaded.layer == 1 and loaded.metadata == d.metadata
    torch.testing.assert_close(loaded.unit.norm(), torch.tensor(1.0))
    assert torch.equal(Direction(torch.zeros(4), 0).unit, torch.zeros(4))
    with pytest.raises(ConfigError, match="expected an existing direction file"):
        Direction.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(DataError, match="junk.safetensors: not a safetensors file"):
        Direction.load(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="a direction of width 64"):
        Direction(torch.zeros(32), 1).check_fits(llama)


# ----------------------------------------------------------------------------- data and scoring
def test_problem_answers_from_gsm8k_math_and_json_replies():
    assert reference_answer("She has 3 + 4 = 7.\n#### 1,007") == "1007"
    assert reference_answer(r"So $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert boxed(r"\boxed{a{b}c} and \boxed{2}") == "2" and boxed(r"\boxed{x{y}") is None
    assert json_answer('steps {"answer": 12} then {"answer": 13}') == "13" and json_answer("{broken") is None
    assert json_answer('so {"answer": "\\\\frac{1}{2}", "note": {"x": 1}}') == "\\frac{1}{2}"  # braces inside the answer
    text, js = ProblemScorer("text"), ProblemScorer("json")
    ex = [Example("a", "q", "r", 12), Example("b", "q", "r", r"\frac{1}{2}"), Example("c", "q", "r", 5)]
    score = text.score(ex, ["The answer is 12.", r"so \boxed{\dfrac{1}{2}}", "no number here"])
    assert score.correct == [1.0, 1.0, 0.0] and round(score.metrics["answered"]) == 67
    assert text.predicted("The answer is 1,234,567.") == "1234567" and text.predicted("It is 2.5") == "2.5"
    assert js.score(ex[:1], ['{"answer": 12}']).correct == [1.0]
    assert js.score(ex[:1], ["The answer is 12."]).correct == [0.0]  # right number, wrong format


def test_problem_files_load_with_either_layout(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                             for i in range(10)))
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "Half of one?", "solution": r"It is \boxed{\frac12}."}) + "\n")
    dm = ReasoningProblems(calibration=str(gsm), evaluation=str(math), n_calibration=5, n_eval=3, shots=2)
    dm.setup()
    cal, ev = dm.sets["calibration"], dm.sets["evaluation"]
    assert [e.target for e in cal] == ["3", "4", "5", "6", "7"] and ev[0].target == r"\frac12"
    assert "The answer is N" in cal[0].prompt and cal[0].response.endswith("The answer is 3.")
    messages = dm.messages(ev[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"].endswith("The answer is 1.")  # the worked examples come first in the file
    same = ReasoningProblems(calibration=str(gsm), evaluation=str(gsm), n_calibration=4, n_eval=10, shots=2)
    same.setup()
    assert [e.target for e in same.sets["evaluation"]] == ["7", "8", "9", "10"]  # after shots and calibration
    generated = ReasoningProblems(answer_format="json", n_calibration=4, n_eval=2, shots=1)
    generated.setup()
    assert generated.sets["calibration"][0].response.endswith('{"answer": %d}' % generated.sets["calibration"][0].target)
    assert generated._shots[0].id not in {e.id for e in generated.sets["calibration"]}


def test_hf_sources_go_through_datasets_load_dataset(tmp_path):
    local = tmp_path / "gsm8k_local"
    local.mkdir()
    for split, lo in (("train", 0), ("test", 100)):
        (local / f"{split}.jsonl").write_text("\n".join(
            json.dumps({"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) for i in range(lo, lo + 6)))
    dm = ReasoningProblems(calibration=f"hf:{local}", evaluation=f"hf:{local}", n_calibration=3, n_eval=2, shots=1)
    dm.setup()
    assert [e.target for e in dm.sets["calibration"]] == ["3", "4", "5"]  # train split, after the worked example (2)
    assert [e.target for e in dm.sets["evaluation"]] == ["102", "103"]  # the test split
    same = ReasoningProblems(calibration=f"hf:{local}::test", evaluation=f"hf:{local}", n_calibration=2, n_eval=2, shots=1)
    same.setup()  # one split both calibrates and evaluates: the held-out problems come after the others
    assert [e.target for e in same.sets["evaluation"]] == ["105", "106"]
    with pytest.raises(DataError, match=r"hf:.*could not load"):
        ReasoningProblems(calibration=f"hf:{tmp_path / 'absent'}", evaluation=f"hf:{local}").setup()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(calibration="gsm.txt"), ConfigError, r"Problems.calibration='gsm.txt': expected math:D"),
    (dict(calibration="math:9"), ConfigError, "calibration='math:9'"),
    (dict(calibration="missing.jsonl", evaluation="x.jsonl"), DataError, "missing.jsonl': no such file"),
    (dict(calibration="{tmp}/bad.jsonl"), ConfigError, "Problems.evaluation=None: expected held-out problems"),
    (dict(answer_format="xml"), ConfigError, "answer_format='xml'"),
    (dict(shots=-1), ConfigError, "shots=-1"),
])
def test_bad_problem_settings_fail_in_one_line(tmp_path, kwargs, error, match):
    (tmp_path / "bad.jsonl").write_text('{"q": "x"}\n')
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        ReasoningProblems(**kwargs)


def test_bad_problem_records_name_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "a": "1"}\n' * 4)
    dm = ReasoningProblems(calibration=str(bad), evaluation=str(bad), shots=0, n_calibration=2, n_eval=2)
    with pytest.raises(DataError, match=r"bad.jsonl:1: no question/answer, problem/solution or Body/Question/Answer fields .* set data.question_field"):
        dm.setup()
    ok = ReasoningProblems(calibration=str(bad), evaluation=str(bad), shots=0, n_calibration=2, n_eval=2,
                           question_field="q", answer_field="a")
    ok.setup()
    assert ok.sets["calibration"][0].target == "1"


# ----------------------------------------------------------------------------- the module
class HalfRight(ProblemScorer):
    """Marks alternate answers right, so a random model's calibration has both kinds."""

    def score(self, examples, texts):
        return TaskScore([float(i % 2 == 0) for i in range(len(texts))], {"score": 50.0, "answered": 100.0})


def tiny_module(**kw):
    args = dict(model_name="tiny-llama", alphas=[0.3], max_new_tokens=6, self_consistency=2, latent_steps=1,
                generation_batch_size=4)
    return AmortizedLatentSteering(**{**args, **kw})


def tiny_data():
    return ReasoningProblems(n_calibration=6, n_eval=3, shots=0, batch_size=3)


def test_calibration_is_the_difference_of_good_and_bad_means_and_validation_reports_every_method(tmp_path):
    module, dm = tiny_module(), tiny_data()
    dm.scorer = HalfRight()
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, dm)
    # by hand: greedy answers of the six problems, states entering the last block, alternate labels
    states = []
    for lo in (0, 3):  # the calibration's batches of three
        prompts = [dm.messages(e) for e in dm.sets["calibration"][lo:lo + 3]]
        out = generate(module.model, module.tokenizer, prompts, Sampling(max_new_tokens=6), batch_size=4)
        states.append(answer_states(module.model, module.tokenizer, prompts, out.tokens, 1, True, None))
    states = torch.cat(states)
    good = torch.tensor([i % 3 % 2 == 0 for i in range(6)])  # alternate within each batch of three
    torch.testing.assert_close(module.vector, states[good].mean(0) - states[~good].mean(0), atol=1e-5, rtol=1e-4)
    saved = Direction.load(tmp_path / "als_vector.safetensors")
    assert saved.layer == 1 and saved.metadata["good"] == 4 and saved.metadata["bad"] == 2
    torch.testing.assert_close(saved.vector, module.vector)
    methods = [r["method"] for r in module.results]
    assert methods == ["greedy CoT", "self-consistency k=2", "ALS α=0", "ALS α=0.3", "LatentSeek-style"]
    rows = {r["method"]: r for r in module.results}
    assert [t for _, t in module._answers[("ALS α=0", 0.0)]] == [t for _, t in module._answers[("greedy CoT", None)]]
    assert rows["greedy CoT"]["firing_rate"] == ""
    assert 0 <= rows["ALS α=0.3"]["firing_rate"] <= 1
    slowest = max(r["seconds_per_problem"] for r in module.results)
    for r in module.results:
        assert r["tradeoff"] == pytest.approx((r["accuracy"] + 100 - 100 * r["seconds_per_problem"] / slowest) / 2)
    assert json.loads((tmp_path / "als.json").read_text())["vector"]["good"] == 4
    assert set(module.state_dict()) == {"vector", "calibrated"}  # the frozen model is rebuilt, not stored

    # the saved vector steers a fresh module in validate alone
    again = tiny_module(vector_path=str(tmp_path / "als_vector.safetensors"), methods=["als"])
    torch.testing.assert_close(again.vector, module.vector)
    with pytest.raises(ConfigError, match="Steering.layer=0: expected the layer the vector was made at \\(1\\)"):
        tiny_module(vector_path=str(tmp_path / "als_vector.safetensors"), layer=0)


def test_calibration_needs_right_and_wrong_answers(tmp_path):
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    with pytest.raises(LanternError, match="0 of 6 greedy answers were right"):
        trainer.fit(tiny_module(), tiny_data())  # a random model solves nothing


def test_validate_without_a_vector_says_what_to_do(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(LanternError, match="run fit .* or set model.vector_path"):
        trainer.validate(tiny_module(methods=["als"]), tiny_data())


def test_an_offset_step_with_a_good_reward_makes_the_answer_more_likely(llama, tok):
    out = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=5), chat=False)
    delta = torch.zeros(3, 64, requires_grad=True)
    with torch.enable_grad():
        before = offset_logprobs(llama, tok, PROMPTS[:3], out.tokens, delta, 1, False, None)
        optimizer = torch.optim.Adam([delta], lr=1e-3)  # tiny-llama's states are ~0.2 long: a small step
        (-((torch.ones(3) - 0.5) * before).sum()).backward()  # the update latent_seek makes for reward 1
        optimizer.step()
        after = offset_logprobs(llama, tok, PROMPTS[:3], out.tokens, delta, 1, False, None)
    assert (after > before).all()
    with torch.no_grad():  # δ = 0 is the model itself
        plain = offset_logprobs(llama, tok, PROMPTS[:3], out.tokens, torch.zeros(3, 64), 1, False, None)
    scored = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=5, logprobs=True), chat=False)
    torch.testing.assert_close(plain, torch.tensor([sum(x) for x in scored.logprobs]), atol=1e-4, rtol=1e-4)


def test_latent_seek_moves_the_offset_and_keeps_its_best_judged_answer(llama, tok):
    questions = PROMPTS[:3]
    greedy = generate(llama, tok, questions, Sampling(max_new_tokens=5), chat=False)
    with torch.enable_grad():
        found = latent_seek(llama, tok, questions, questions, Sampling(max_new_tokens=5), layer=1, steps=2, lr=0.5,
                            chat=False)
    assert found.delta.abs().sum(-1).gt(0).all()  # every problem's offset got a gradient
    rewards = self_reward(llama, tok, questions, found.texts, chat=False, system=None)
    torch.testing.assert_close(rewards, found.rewards)
    first = self_reward(llama, tok, questions, greedy.text, chat=False, system=None)
    assert (found.rewards >= first).all() and ((rewards > 0) & (rewards < 1)).all()
    assert found.tokens > greedy.num_tokens  # three rounds decoded


@pytest.mark.parametrize("kwargs,match", [
    (dict(alphas=[-0.1]), "alphas"), (dict(methods=["beam"]), "methods"), (dict(layer=5), "layer=5"),
    (dict(layer=2), "layer=2: expected a decoder block whose input is steered"), (dict(tau=3.0), "tau=3.0"),
    (dict(latent_steps=0), "latent_steps=0"), (dict(vector_path="nowhere.safetensors"), "vector_path"),
    (dict(gate="{"), "gate='{': expected two non-empty strings"),
])
def test_bad_module_settings_fail_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_module(**kwargs)


@pytest.mark.slow
def test_steering_on_the_embedded_model_keeps_greedy_at_alpha_zero_and_agrees_uncached():
    model, tok = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    prompts = ["What is 7 + 5? End with 'The answer is N.'", "Name a colour.", "Count to three."]
    greedy = generate(model, tok, prompts, Sampling(max_new_tokens=N), eos_token_ids=[])
    v = unit(0, 1.0).repeat(9)  # width 576
    v = v / v.norm()
    for alpha, tau in ((0.0, 0.1), (8.0, -1.0)):
        out = generate(model, tok, prompts, Sampling(max_new_tokens=N), hook=ALSSteer(v, alpha, tau), hook_layer=-1,
                       transient=True, eos_token_ids=[])
        assert out.tokens == greedy.tokens
    steer = ALSSteer(v, 8.0, 1.01)
    out = generate(model, tok, prompts[:1], Sampling(max_new_tokens=N), hook=steer, hook_layer=-1, transient=True,
                   eos_token_ids=[])
    assert steer.firing_rate == 1.0
    text = render_prompt(tok, prompts[0])  # uncached encodes the text as generate does
    assert out.tokens[0] == uncached(model, tok, text, v, 8.0, 1.01, get_adapter(model).num_layers(model) - 1)


@pytest.mark.slow
def test_the_recipe_calibrates_evaluates_and_reloads_on_the_embedded_model(tmp_path, monkeypatch):
    from pathlib import Path

    from lantern.cli import cli_main

    monkeypatch.chdir(tmp_path)
    recipe = str(Path(__file__).resolve().parents[1] / "configs/steering/als_smollm2.yaml")
    small = ["--data.init_args.n_calibration", "16", "--data.init_args.n_eval", "4", "--data.init_args.batch_size", "16",
             "--model.init_args.max_new_tokens", "48", "--model.init_args.self_consistency", "2",
             "--model.init_args.latent_steps", "1"]
    cli = cli_main(["fit", "--config", recipe, *small])
    run = Path(cli.trainer.log_dir)
    rows = {r["method"]: r for r in json.loads((run / "als.json").read_text())["rows"]}
    assert set(rows) == {"greedy CoT", "self-consistency k=2", "ALS α=0", "ALS α=0.1", "ALS α=0.3", "ALS α=0.6",
                         "LatentSeek-style"}
    assert rows["ALS α=0"]["accuracy"] == rows["greedy CoT"]["accuracy"]
    vector = Direction.load(run / "als_vector.safetensors")
    assert vector.metadata["good"] > 0 and vector.metadata["bad"] > 0 and vector.layer == 29
    again = cli_main(["validate", "--config", recipe, *small, "--model.init_args.methods", "[als]",
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    torch.testing.assert_close(again.model.vector, vector.vector)
