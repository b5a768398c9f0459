"""DPO: the loss against a hand computation, the reference that never moves, the [chosen; rejected] layout."""

import json
import math

import pytest
import torch

from lantern.datamodules.preference import (
    Pair, PreferenceDataModule, collate_preference, encode_pairs, reference_logprobs, reference_settings,
)
from lantern.errors import ConfigError, DataError
from lantern.lightning_modules.dpo import DPO, LoRA, dpo_loss
from lantern.models import load_model

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to three.", "Say hi.", "Spell cat.", "What is 4 - 1?"]


def _pairs_file(path, refs=None, settings=None):
    with path.open("w") as fh:
        for i, prompt in enumerate(PROMPTS):
            record = {"prompt": prompt, "chosen": f"good answer {i}", "rejected": f"a much worse answer number {i}"}
            if refs is not None:
                record.update(ref_chosen=refs[i][0], ref_rejected=refs[i][1], ref_settings=settings)
            fh.write(json.dumps(record) + "\n")
    return str(path)


def _data(path, **kwargs):
    dm = PreferenceDataModule(train=path, tokenizer="byte", max_length=64, batch_size=3, eval_batch_size=3,
                              val_fraction=0.34, **kwargs)
    dm.setup()
    return dm


def test_loss_equals_the_hand_computation():
    pc, pr, rc, rr, beta = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -1.0]), 0.1
    terms = dpo_loss(pc, pr, rc, rr, beta)
    by_hand = [-math.log(1 / (1 + math.exp(-beta * ((-1 + 2) - (-3 + 2))))),
               -math.log(1 / (1 + math.exp(-beta * ((-5 + 4) - (-2 + 1)))))]
    assert torch.allclose(terms.loss, torch.tensor(by_hand))
    assert torch.allclose(terms.chosen_rewards, torch.tensor([0.1, -0.1]))
    assert torch.allclose(terms.rejected_rewards, torch.tensor([-0.1, -0.1]))


def test_batches_are_chosen_then_rejected_and_prompts_carry_no_loss(tok, tmp_path):
    dm = _data(_pairs_file(tmp_path / "p.jsonl"))
    pairs = dm.sets["train"]
    batch = collate_preference(pairs, tok.eos_token_id)
    n = len(pairs)
    assert batch["input_ids"].shape[0] == 2 * n
    for i, p in enumerate(pairs):
        for row, reply in ((i, p.chosen), (n + i, p.rejected)):
            ids = batch["input_ids"][row, batch["completion_mask"][row]].tolist()
            assert ids == reply  # exactly the reply (with eos) is scored: no prompt token, no padding
            assert batch["input_ids"][row, :len(p.prompt)].tolist() == p.prompt
            assert tok.decode(reply[:-1]).startswith("good" if row < n else "a much") and reply[-1] == tok.eos_token_id
    # the policy's log-prob sums are over reply tokens only: equal to a hand gather from full logits
    model = load_model("tiny-llama", seed=0)
    module = DPO("tiny-llama", reference="live")
    module.model = model
    _, policy = module.terms(batch)
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    picked = logp[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    by_hand = (picked * batch["completion_mask"][:, 1:]).sum(-1)
    assert torch.allclose(policy, by_hand, atol=1e-4)


def test_policy_equal_to_reference_gives_log2_and_zero_margins(tmp_path):
    dm = _data(_pairs_file(tmp_path / "p.jsonl"))
    batch = collate_preference(dm.sets["train"], 256)
    for lora in (None, LoRA(rank=4, alpha=8)):
        module = DPO("tiny-llama", reference="live", lora=lora)
        terms, _ = module.terms(batch)
        assert torch.allclose(terms.loss, torch.full_like(terms.loss, math.log(2)), atol=1e-6)
        assert torch.allclose(terms.chosen_rewards - terms.rejected_rewards, torch.zeros_like(terms.loss), atol=1e-6)


def _train(module, batch, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        terms, _ = module.terms(batch)
        opt.zero_grad()
        terms.loss.mean().backward()
        opt.step()


@pytest.mark.parametrize("lora", [None, LoRA(rank=4, alpha=8)], ids=["full", "lora"])
def test_the_reference_never_changes_while_the_policy_learns(tmp_path, lora):
    dm = _data(_pairs_file(tmp_path / "p.jsonl"))
    batch = collate_preference(dm.sets["train"], 256)
    module = DPO("tiny-llama", reference="live", lora=lora)
    ref_before, (terms, policy_before) = module._reference(batch).clone(), module.terms(batch)
    _train(module, batch)
    terms, policy_after = module.terms(batch)
    assert torch.equal(module._reference(batch), ref_before)
    assert (policy_after - policy_before).abs().max() > 1e-3
    margins = terms.chosen_rewards - terms.rejected_rewards
    assert margins.mean() > 0 and terms.loss.mean() < math.log(2)  # it learned the preference


def test_precomputed_and_live_references_give_the_same_loss(tmp_path, tok):
    plain_path = _pairs_file(tmp_path / "plain.jsonl")
    plain = _data(plain_path)
    records = [json.loads(line) for line in open(plain_path)]
    pairs, _ = encode_pairs(tok, [r["prompt"] for r in records], [r["chosen"] for r in records],
                            [r["rejected"] for r in records], None, True, 64)
    refs = reference_logprobs(load_model("tiny-llama", seed=0), pairs, tok.eos_token_id, batch_size=4)
    settings = reference_settings("tiny-llama", 64, None, True)
    stored = _data(_pairs_file(tmp_path / "ref.jsonl", refs, settings))
    assert stored.has_reference and not plain.has_reference
    live, pre = DPO("tiny-llama", reference="live"), DPO("tiny-llama", reference="precomputed")
    pre.check_datamodule(stored)
    batch = collate_preference(stored.sets["train"], tok.eos_token_id)
    assert "ref" in batch
    assert torch.allclose(live.terms(batch)[0].loss, pre.terms(batch)[0].loss, atol=1e-5)


def test_precomputed_reference_is_checked_against_the_run(tmp_path):
    pre = DPO("tiny-llama", reference="precomputed")
    with pytest.raises(ConfigError, match="reference='precomputed': expected pairs that carry ref_chosen"):
        pre.check_datamodule(_data(_pairs_file(tmp_path / "plain.jsonl")))
    refs = [(-1.0, -2.0)] * 6
    other = _data(_pairs_file(tmp_path / "other.jsonl", refs, reference_settings("tiny-qwen2", 64, None, True)))
    with pytest.raises(ConfigError, match="differ in model \\(model='tiny-qwen2' vs model='tiny-llama'\\)"):
        pre.check_datamodule(other)


@pytest.mark.parametrize("record, match", [
    ({"prompt": "hi", "chosen": "a"}, "no field 'rejected'"),
    ({"prompt": "hi", "chosen": "a", "rejected": ""}, "field 'rejected' must be a non-empty string"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "ref_chosen": 1.5, "ref_rejected": -1}, "finite log-probabilities"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "ref_chosen": float("nan"), "ref_rejected": -1}, "finite log-probabilities"),
    ({"prompt": "x" * 80, "chosen": "a", "rejected": "b"}, "fills data.max_length=64"),
])
def test_bad_pairs_name_their_line(tmp_path, record, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=match):
        _data(str(path), val=str(path))


def test_long_replies_are_cut_and_the_split_holds_out_pairs(tmp_path, tok):
    pairs, cut = encode_pairs(tok, ["hi"], ["a" * 100], ["b"], None, True, 40)
    assert cut == 1 and len(pairs[0].prompt) + len(pairs[0].chosen) == 40 and pairs[0].rejected[-1] == tok.eos_token_id
    dm = _data(_pairs_file(tmp_path / "p.jsonl"))
    assert len(dm.sets["train"]) == 4 and len(dm.sets["val"]) == 2
    assert isinstance(dm.sets["train"][0], Pair)


def test_fit_exports_a_model_that_loads_by_path(tmp_path, monkeypatch):
    from lantern.cli import cli_main

    monkeypatch.chdir(tmp_path)
    path = _pairs_file(tmp_path / "p.jsonl")
    cli = cli_main(["fit", "--config", str(_recipe()), "--model.init_args.model_name", "tiny-llama",
                    "--model.init_args.reference", "live", "--model.init_args.optim.lr", "1e-3",
                    "--data.init_args.train", path, "--data.init_args.max_length", "64", "--trainer.max_steps", "2"])
    out = tmp_path / cli.trainer.log_dir / "model"
    reloaded = load_model(str(out))
    for (name, a), b in zip(cli.model.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    logged = cli.trainer.callback_metrics
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "val/rewards/margins", "val/loss"} <= set(logged)
    assert torch.allclose(logged["rewards/margins"], logged["rewards/chosen"] - logged["rewards/rejected"], atol=1e-6)


def _recipe():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs/frit/dpo_smollm2.yaml"


def test_lora_policy_exports_with_the_adapter_folded_in(tmp_path):
    dm = _data(_pairs_file(tmp_path / "p.jsonl"))
    batch = collate_preference(dm.sets["train"], 256)
    module = DPO("tiny-llama", reference="live", lora=LoRA(rank=4, alpha=8))
    _train(module, batch, steps=2)
    assert set(module.state_dict()) == module._trainable and all("lora_" in k for k in module._trainable)
    merged = module.trained_model()
    with torch.no_grad():
        want = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(want, got, atol=1e-4) and not hasattr(merged, "peft_config")
