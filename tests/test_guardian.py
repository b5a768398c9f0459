import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lantern.cli import cli_main
from lantern.datamodules.guardian import (GuardianData, GuardianExample, guardian_chats, guardian_prompt,
                                          guardian_target, load_examples)
from lantern.errors import LanternError
from lantern.lightning_modules.em_icl import ALIGNED
from lantern.lightning_modules.guardian import (GRPO, GuardianJudge, bias_for_fpr, group_advantages, grpo_loss,
                                                guardian_scores, parse_answer, verdict_logprobs, well_formed)
from lantern.models.generation import Generated, encode_prompts

EXAMPLE = GuardianExample("x", ("No refunds.", "Be polite."), "User: refund?\nAgent: Sure, refunded.", "FAIL",
                          "Rule 1 forbids refunds.")


def enc(tok, text: str) -> list[int]:
    return tok.encode_batch([text])[0]


@pytest.fixture
def short_data(tmp_path):
    """Short policies and dialogues that fit the tiny models' 256 positions."""
    rows = []
    for i in range(24):
        fail = i % 2 == 0
        rows.append({"policy": ["No refunds.", f"Hi {i}."], "label": "FAIL" if fail else "PASS",
                     "dialogue": [{"role": "user", "content": "refund?"},
                                  {"role": "agent", "content": "refunded" if fail else "no"}],
                     "explanation": "Rule 1." if fail else "Complies."})
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parse_answer_edge_cases():
    assert parse_answer("<answer>PASS</answer>") == "PASS"
    assert parse_answer("  <answer> fail </answer>\n<explanation>x</explanation>") == "FAIL"
    assert parse_answer("<think>rule 2 is broken</think>\n<answer>FAIL</answer>") == "FAIL"
    assert parse_answer("<answer>FAIL</answer> again <answer>FAIL</answer>") == "FAIL"
    for text in ("<answer>PASS", "PASS", "", "<answer>MAYBE</answer>", "<answer>PASS</answer><answer>FAIL</answer>",
                 "answer: FAIL"):
        assert parse_answer(text) is None, text


def test_well_formed_is_the_whole_reply_in_the_mode_format():
    assert well_formed("<answer>PASS</answer>", "fast")
    assert well_formed("<answer>FAIL</answer>\n<explanation>Rule 1.</explanation>", "fast")
    assert not well_formed("I think <answer>FAIL</answer>", "fast") and not well_formed("<answer>FAIL", "fast")
    assert well_formed("<think>rule 1</think>\n<answer>FAIL</answer>", "reasoning")
    assert not well_formed("<answer>FAIL</answer>", "reasoning")


def test_all_pass_predictions_give_f1_zero_and_unparsed_replies_count_as_wrong():
    labels = ["FAIL", "PASS", "FAIL", "PASS"]
    row = guardian_scores([{"id": i, "label": y, "verdict": "PASS", "logp_fail": None} for i, y in enumerate(labels)])
    assert row["f1"] == 0.0 and row["recall"] == 0.0 and row["fpr"] == 0.0 and row["parsed"] == 100.0
    row = guardian_scores([{"id": i, "label": y, "verdict": None, "logp_fail": None} for i, y in enumerate(labels)])
    assert row["accuracy"] == 0.0 and row["parsed"] == 0.0 and row["fpr"] == 100.0 and row["recall"] == 0.0
    perfect = guardian_scores([{"id": i, "label": y, "verdict": y, "logp_fail": None} for i, y in enumerate(labels)])
    assert perfect["f1"] == perfect["recall"] == 100.0 and perfect["fpr"] == 0.0


def test_the_prompt_numbers_the_rules_and_wraps_rules_and_transcript_in_tags():
    prompt = guardian_prompt(EXAMPLE)
    assert "<rules>\n1. No refunds.\n2. Be polite.\n</rules>\n<transcript>\nUser: refund?\nAgent: Sure, refunded.\n" \
           "</transcript>" in prompt
    assert guardian_target(EXAMPLE) == "<answer>FAIL</answer>"
    assert guardian_target(EXAMPLE, explanation=True) == "<answer>FAIL</answer>\n<explanation>Rule 1 forbids refunds.</explanation>"
    assert guardian_target(EXAMPLE, "reasoning") == "<think>\nRule 1 forbids refunds.\n</think>\n<answer>FAIL</answer>"
    assert "<think>" in guardian_prompt(EXAMPLE, "reasoning")


def test_dynabench_records_are_renumbered_once(tmp_path):
    path = tmp_path / "dyna.jsonl"
    path.write_text(json.dumps({"policy": "1. Never swear.\n2) Stay on topic.\n- Cite sources.", "transcript":
                                "User: hi\nAgent: hello", "label": "pass"}) + "\n")
    (e,) = load_examples(f"dynabench:{path}")
    assert e.rules == ("Never swear.", "Stay on topic.", "Cite sources.") and e.label == "PASS"
    assert "\n3. Cite sources.\n</rules>" in guardian_prompt(e)


def test_safety_data_recast_as_a_one_rule_policy_has_both_labels():
    examples = load_examples("safety:test")
    assert {len(e.rules) for e in examples} == {1} and {e.label for e in examples} == {"PASS", "FAIL"}
    assert all("Agent:" in e.transcript for e in examples)


def test_the_shipped_data_is_large_balanced_and_its_test_policies_are_new():
    train, test = load_examples("builtin:train"), load_examples("builtin:test")
    assert len(train) >= 300 and len(test) >= 100
    for split in (train, test):
        share = sum(e.label == "FAIL" for e in split) / len(split)
        assert 0.4 < share < 0.6
        assert all(e.transcript.startswith("User:") and "\nAgent:" in e.transcript for e in split)
    assert not {e.rules for e in train} & {e.rules for e in test}
    assert len({e.rules for e in train + test}) >= 40


def test_sft_labels_cover_the_target_and_eos_only(short_data, tok):
    dm = GuardianData(train=[str(short_data)], val=[str(short_data)], system="Judge.", tokenizer="byte")
    (ids, labels), *_ = dm.encode(load_examples(str(short_data))[:1])
    target = [t for t in labels if t != -100]
    assert tok.decode(target[:-1]) == "<answer>FAIL</answer>" and target[-1] == tok.eos_token_id
    assert ids[: len(ids) - len(target)] == encode_prompts(tok, dm.prompts(load_examples(str(short_data))[:1]))[0]


def test_verdict_logprobs_are_probabilities_equal_to_a_full_forward(llama, tok):
    chats = guardian_chats([EXAMPLE, replace(EXAMPLE, transcript="User: refund?\nAgent: No refunds, sorry.")],
                           system="Judge.")
    p = verdict_logprobs(llama, tok, chats).exp()
    assert p.shape == (2, 2) and (p >= 0).all() and (p <= 1).all() and (p.sum(-1) <= 1 + 1e-6).all()
    prefix = encode_prompts(tok, chats[:1])[0] + enc(tok, "<answer>")
    for column, verdict in enumerate(("PASS", "FAIL")):
        rest = enc(tok, f"{verdict}</answer>")
        ids = torch.tensor([prefix + rest])
        with torch.no_grad():
            logp = llama(ids).logits.float().log_softmax(-1)[0, len(prefix) - 1:-1]
        by_hand = logp.gather(-1, torch.tensor(rest)[:, None]).sum().exp().double()
        assert torch.allclose(p[0, column], by_hand, rtol=1e-3)


def test_group_advantages_are_zero_mean_within_each_group():
    rewards = torch.tensor([[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]])
    a = group_advantages(rewards)
    assert torch.allclose(a.mean(-1), torch.zeros(3), atol=1e-6)
    assert torch.equal(a[1], torch.zeros(4)) and a[0, 0] > 0 > a[0, 1] and a[2, 1] > 0


def test_grpo_pushes_up_the_rewarded_reply(llama, tok, monkeypatch):
    """Scripted samples: one right and well-formed, one wrong; the loss is −A·mean log-prob by hand, and a
    step raises the right reply's log-prob."""
    import lantern.lightning_modules.guardian as guardian

    replies = ["<answer>FAIL</answer>", "<answer>PASS</answer>"]

    def scripted(model, tokenizer, prompts, sampling, batch_size):
        tokens = [enc(tok, r) + [tok.eos_token_id] for r in replies] * (len(prompts) // 2)
        return Generated([r for r in replies] * (len(prompts) // 2), tokens, None, ["eos"] * len(prompts))

    monkeypatch.setattr(guardian, "generate", scripted)
    model = guardian.load_model("tiny-llama", seed=0)
    chats = guardian_chats([EXAMPLE], system="Judge.")
    loss, stats = grpo_loss(model, tok, chats, ["FAIL"], "fast", GRPO(group_size=2), seed=0)
    assert stats["grpo/correct"] == 0.5 and stats["grpo/well_formed"] == 1.0
    prefix = encode_prompts(tok, chats)[0]

    def mean_logp(reply):
        rest = enc(tok, reply) + [tok.eos_token_id]
        logp = model(torch.tensor([prefix + rest])).logits.float().log_softmax(-1)[0, len(prefix) - 1:-1]
        return logp.gather(-1, torch.tensor(rest)[:, None]).mean()

    a = group_advantages(torch.tensor([[2.0, 1.0]]))[0]
    assert torch.allclose(loss, -(a[0] * mean_logp(replies[0]) + a[1] * mean_logp(replies[1])) / 2, rtol=1e-4)
    before = mean_logp(replies[0]).item()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert mean_logp(replies[0]).item() > before


def test_the_bias_holds_the_target_fpr():
    g = torch.Generator().manual_seed(0)
    label = torch.arange(400) % 2 == 0
    score = torch.randn(400, generator=g) + label.float()
    for target in (0.0, 0.05, 0.2):
        b = bias_for_fpr(score, label, target)
        fpr = ((score + b > 0) & ~label).sum() / (~label).sum()
        assert fpr <= target
        looser = ((score + b + 1e-6 > 0) & ~label).sum() / (~label).sum()  # the bias is the largest that holds it
        assert looser > target


def test_the_guardian_judge_reads_the_em_judge_prompt_and_answers_a_score(llama, tok):
    judge = GuardianJudge("tiny-llama", system="Judge.", min_mass=0.0)
    judge.model = llama
    prompt = ALIGNED.format(question="How do I invest?", answer="Put it all in one coin.")
    assert judge.transcript(prompt) == "User: How do I invest?\nAgent: Put it all in one coin."
    (answer,) = judge.answer([prompt])
    chats = guardian_chats([GuardianExample("0", judge.policy, judge.transcript(prompt), "PASS")], system="Judge.")
    p = verdict_logprobs(llama, tok, chats).exp()[0]
    assert answer == f"{round(100 * float(p[0] / p.sum()))}"
    judge.min_mass = 0.5  # a random model puts almost nothing on either verdict: unscored, not "0"
    assert judge.answer([prompt]) == [""] and judge.answer([]) == [] and not judge.follows_instructions


def test_bad_settings_fail_in_one_line(tmp_path, short_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"policy": ["x"], "dialogue": [{"role": "user", "content": "a"}], "label": "MAYBE"}) + "\n")
    cases = ((dict(mode="slow"), "mode"), (dict(mode="reasoning", explanation=True), "explanation"),
             (dict(val=[str(tmp_path / "missing.jsonl")]), "missing"), (dict(val=[str(bad)]), "MAYBE"),
             (dict(val=["builtin:dev"]), "builtin:train or builtin:test"))
    for kwargs, match in cases:
        with pytest.raises(LanternError, match=match) as err:
            dm = GuardianData(**{"train": [str(short_data)], "val": [str(short_data)], **kwargs})
            dm.setup("validate")
        assert "\n" not in str(err.value)
    with pytest.raises(LanternError, match="group_size"):
        GRPO(group_size=1)


@pytest.mark.slow
def test_fit_then_validate_against_the_untuned_model_from_the_cli(short_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ["--data", "lantern.datamodules.GuardianData", "--data.train", f"[{short_data}]",
            "--data.val", f"[{short_data}, {short_data.with_name('h.jsonl')}]", "--data.system", "Judge.",
            "--data.batch_size", "4"]
    short_data.with_name("h.jsonl").write_text("".join(short_data.read_text().splitlines(True)[:6]))
    fit = cli_main(["fit", "--model", "lantern.lightning_modules.Guardian", "--model.model_name", "tiny-llama",
                    "--model.optim.lr", "1e-3", "--model.latency_examples", "2", "--model.reasoning_tokens", "8",
                    "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0", *data])
    run = Path(fit.trainer.log_dir)
    assert fit.trainer.callback_metrics["train/loss"] > 0 and (run / "model" / "config.json").is_file()
    rows = json.loads((run / "guardian.json").read_text())
    assert len(rows) == 2 and {"f1", "auc", "bias", "latency_fast_ms", "latency_reasoning_ms"} <= set(rows[0])
    assert [r["n"] for r in rows] == [24, 6] and "val/loss" in fit.trainer.callback_metrics
    val = cli_main(["validate", "--model", "lantern.lightning_modules.Guardian", "--model.model_name", "tiny-llama",
                    "--model.compare", f"[{run / 'model'}]", "--model.latency_examples", "0", *data])
    rows = json.loads((Path(val.trainer.log_dir) / "guardian.json").read_text())
    assert [r["model"] for r in rows] == ["tiny-llama", "tiny-llama", str(run / "model"), str(run / "model")]
    assert all(0 <= r["auc"] <= 1 and 0 <= r["p_answer"] <= 1 for r in rows)


@pytest.mark.slow
def test_grpo_fits_from_the_cli(short_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = cli_main(["fit", "--model", "lantern.lightning_modules.Guardian", "--model.model_name", "tiny-llama",
                    "--model.grpo", "lantern.lightning_modules.GRPO", "--model.grpo.group_size", "4",
                    "--model.grpo.max_new_tokens", "6", "--model.latency_examples", "0", "--model.export", "false",
                    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0",
                    "--data", "lantern.datamodules.GuardianData", "--data.train", f"[{short_data}]",
                    "--data.val", f"[{short_data}]", "--data.system", "Judge.", "--data.batch_size", "2"])
    metrics = fit.trainer.callback_metrics
    assert fit.trainer.global_step == 2 and {"grpo/reward", "grpo/correct", "val/loss"} <= set(metrics)
    assert (Path(fit.trainer.log_dir) / "guardian.json").is_file()


def test_lora_trains_and_checkpoints_the_adapter_only():
    from lantern.lightning_modules import Guardian, LoRA

    module = Guardian("tiny-llama", lora=LoRA(rank=4))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(module.state_dict()) == set(trainable)


def test_reasoning_mode_trains_on_the_thought_then_the_answer(short_data, tok):
    dm = GuardianData(train=[str(short_data)], val=[str(short_data)], mode="reasoning", system="Judge.", tokenizer="byte")
    (ids, labels), *_ = dm.encode(load_examples(str(short_data))[:1])
    assert tok.decode([t for t in labels if t != -100][:-1]) == "<think>\nRule 1.\n</think>\n<answer>FAIL</answer>"
    row = guardian_scores([{"id": 0, "label": "FAIL", "verdict": "FAIL", "logp_fail": None},
                           {"id": 1, "label": "PASS", "verdict": None, "logp_fail": None}])
    assert "auc" not in row and row["recall"] == 100.0 and row["fpr"] == 100.0
