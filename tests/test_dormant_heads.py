import json

import lightning as L
import pytest
import torch

from lantern.datamodules import DataError, EvalTasksDataModule
from lantern.datamodules.eval_tasks import BUILTIN, _records, parse_gsm8k, parse_mc
from lantern.lightning_modules import DormantHeadsStudy
from lantern.lightning_modules.dormant_heads import head_scores, most_dormant
from lantern.models import get_adapter, load_model


def _batch(lengths, width):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def test_output_norm_ratio_averages_to_one_and_ignores_value_scale():
    model = load_model("tiny-llama", seed=0)
    ids, mask = _batch([7, 5], 7)
    r = head_scores(model, ids, mask)["output_norm"]
    torch.testing.assert_close(r.mean(-1), torch.ones(2, 2))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(3.0)
    r_scaled = head_scores(model, ids, mask)["output_norm"]
    torch.testing.assert_close(r_scaled[:, 1], r[:, 1], atol=1e-5, rtol=1e-5)


def test_scores_ignore_appended_padding_and_weights_lie_in_unit_interval():
    model = load_model("tiny-llama", seed=0)
    ids, mask = _batch([6], 6)
    padded = torch.cat([ids, torch.full((1, 4), 256)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], 1)
    a, b = head_scores(model, ids, mask), head_scores(model, padded, pmask)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert ((a["attention_weight"] >= 0) & (a["attention_weight"] <= 1)).all()
    eager = load_model("tiny-llama", seed=0, attn_implementation="eager")
    with torch.no_grad():
        att = eager(ids, output_attentions=True).attentions
    direct = torch.stack([x[:, :, :, 0].mean(-1) for x in att], 1)
    torch.testing.assert_close(a["attention_weight"], direct, atol=1e-6, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # scoring switched to eager and back


def test_most_dormant_picks_the_extreme_heads():
    scores = torch.tensor([[[0.9, 0.1], [0.5, 0.7]]])
    assert most_dormant(scores, 1, higher_is_dormant=True).nonzero().tolist() == [[0, 0, 0]]
    assert most_dormant(scores, 2, higher_is_dormant=False).nonzero().tolist() == [[0, 0, 1], [0, 1, 0]]
    assert not most_dormant(scores, 0, True).any()


def test_task_formats_parse_from_local_files(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return str(path)

    mmlu = parse_mc("mmlu", _records(write("m.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])), "m")
    assert mmlu[0].pairs == [("Question: 2+2?\nAnswer:", " 3"), ("Question: 2+2?\nAnswer:", " 4")] and mmlu[0].answer == 1
    piqa = parse_mc("piqa", [{"goal": "open a jar", "sol1": "twist", "sol2": "bite", "label": 0}], "p")
    assert piqa[0].pairs[1] == ("Question: open a jar\nAnswer:", " bite")
    wino = parse_mc("winogrande", [{"sentence": "The cup fell because _ was full.", "option1": "the cup",
                                    "option2": "the table", "answer": "1"}], "w")
    assert wino[0].pairs == [("The cup fell because the cup", " was full."), ("The cup fell because the table", " was full.")]
    assert wino[0].answer == 0
    assert parse_gsm8k([{"question": "1+1?", "answer": "2\n#### 2"}], "g")[0][1] == " 2\n#### 2"
    with pytest.raises(DataError, match=r"p item 1: no field 'sol2'"):
        parse_mc("piqa", [{"goal": "x", "sol1": "y", "label": 0}], "p")
    with pytest.raises(ValueError, match="hellaswag:x"):
        EvalTasksDataModule(tasks=["hellaswag:x"])
    assert len(_records(str(BUILTIN["commonsense"]))) == 40


def test_baseline_accuracy_equals_a_direct_log_likelihood_computation(tmp_path):
    rows = [{"question": f"Pick {i}", "choices": ["red", "green", "blue"], "answer": i % 3} for i in range(6)]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    study = DormantHeadsStudy("tiny-llama", fractions=[0.0, 0.25], definitions=["output_norm", "random"])
    data = EvalTasksDataModule(tokenizer="byte", tasks=[f"mc:{path}"], batch_size=4)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path).validate(study, data, verbose=False)
    assert (tmp_path / "dormant_heads.csv").is_file() and (tmp_path / "dormant_heads.png").is_file()
    saved = json.loads((tmp_path / "dormant_heads.json").read_text())
    assert saved["sweep"] == study.results and set(saved["share_dormant_at_tau"]) == {"attention_weight", "output_norm"}
    assert (tmp_path / "dormant_heads.md").read_text().splitlines()[0] == "| task | definition | 0% | 25% |"
    assert not _hooks_on_o_proj(study.model) and study.ablation.mask is None
    got = {(r["definition"], r["percent_zeroed"]): r["accuracy"] for r in study.results}

    model, correct = study.model, 0
    for row in rows:
        ctx = list(f"Question: {row['question']}\nAnswer:".encode())
        lls = []
        for choice in row["choices"]:
            cont = list(f" {choice}".encode())
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            lls.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct += int(max(range(3), key=lls.__getitem__) == row["answer"])
    assert got[("output_norm", 0)] == got[("random", 0)] == correct / 6
    assert set(got) == {("output_norm", 0), ("output_norm", 25), ("random", 0), ("random", 25)}

    # 25% of 8 heads = 2 per question, the lowest output-norm ratios averaged over its choices.
    from lantern.callbacks import HeadAblation
    from lantern.datamodules.eval_tasks import pad
    from lantern.models import position_ids

    ablated_correct, losses = 0, []
    with HeadAblation().applied(model) as ablation:
        for row in rows:
            ctx = list(f"Question: {row['question']}\nAnswer:".encode())
            seqs = [(ctx + list(f" {c}".encode()), [False] * len(ctx) + [True] * len(f" {c}")) for c in row["choices"]]
            b = pad(seqs, 256)
            scores = head_scores(model, b["input_ids"], b["attention_mask"])["output_norm"].mean(0, keepdim=True)
            ablation.set_mask(most_dormant(scores, 2, higher_is_dormant=False).expand(3, -1, -1))
            with torch.no_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               position_ids=position_ids(b["attention_mask"])).logits
            logp = logits[:, :-1].log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
            lls = (logp * b["target_mask"][:, 1:]).sum(-1)
            ablated_correct += int(lls.argmax() == row["answer"])
            losses.append(-lls.log_softmax(0)[row["answer"]].item())
    ablated = {r["definition"]: r for r in study.results if r["percent_zeroed"] == 25}
    assert ablated["output_norm"]["accuracy"] == ablated_correct / 6
    assert ablated["output_norm"]["loss"] == pytest.approx(sum(losses) / 6, rel=1e-4)
    baseline_loss = next(r["loss"] for r in study.results if r["percent_zeroed"] == 0)
    assert ablated["output_norm"]["loss"] != pytest.approx(baseline_loss, rel=1e-6)  # the ablation acted


def test_zeroing_no_heads_is_bit_identical():
    study = DormantHeadsStudy("tiny-llama")
    ids, mask = _batch([5, 5], 5)
    with torch.no_grad(), study.ablation.applied(study.model):
        base = study.model(ids).logits
        study.ablation.set_mask(most_dormant(head_scores(study.model, ids, mask)["output_norm"], 0, False))
        assert torch.equal(study.model(ids).logits, base)
        study.ablation.set_mask(most_dormant(head_scores(study.model, ids, mask)["output_norm"], 2, False))
        assert not torch.equal(study.model(ids).logits, base)
    assert get_adapter(study.model).num_heads(study.model) == 4


def test_fewshot_prompts_hold_k_solved_other_items():
    from lantern.datamodules.eval_tasks import MCItem, with_fewshot

    items = [MCItem([(f"Q{i}:", " a"), (f"Q{i}:", " b")], i % 2) for i in range(6)]
    shot = with_fewshot(items, 3)
    for i, item in enumerate(shot):
        context = item.pairs[0][0]
        assert context.endswith(f"Q{i}:") and f"Q{i}:" not in context[: -len(f"Q{i}:")]
        solved = [f"Q{j}: {'ab'[j % 2]}" for j in range(6) if f"Q{j}:" in context[: -len(f"Q{i}:")]]
        assert len(solved) == 3 and all(s in context for s in solved)
        assert item.pairs[1][1] == " b" and item.answer == items[i].answer
    assert with_fewshot(items, 3) == shot  # deterministic
    with pytest.raises(DataError, match="6-shot prompts need more than 6 items"):
        with_fewshot(items, 6)
    with pytest.raises(DataError, match=r"field 'answer' must be an integer label, got ''"):
        parse_mc("winogrande", [{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""}], "w")


def _hooks_on_o_proj(model) -> int:
    adapter = get_adapter(model)
    return sum(len(adapter.out_proj(model, l)._forward_pre_hooks) + len(adapter.out_proj(model, l)._forward_hooks)
               for l in range(adapter.num_layers(model)))


def test_ablation_hooks_live_only_inside_a_step_even_when_it_fails(monkeypatch):
    study = DormantHeadsStudy("tiny-llama", fractions=[0.25], definitions=["random"])
    assert not _hooks_on_o_proj(study.model)
    ids, mask = _batch([5, 5], 5)
    batch = {"task": "t", "kind": "lm", "input_ids": ids, "attention_mask": mask, "target_mask": mask.bool()}
    seen = []

    def failing_score(batch, logits, definitions, fraction):
        seen.append((_hooks_on_o_proj(study.model), study.ablation.mask is not None))
        if fraction > 0:
            raise RuntimeError("scoring failed")

    monkeypatch.setattr(study, "_score", failing_score)
    with pytest.raises(RuntimeError, match="scoring failed"):
        study.validation_step(batch, 0)
    assert seen == [(2, False), (2, True)]  # one pre-hook per layer while sweeping, the random mask set last
    assert not _hooks_on_o_proj(study.model) and not study.model._forward_pre_hooks
    assert study.ablation.mask is None
