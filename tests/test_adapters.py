"""Adapter fine-tuning and merging as a researcher runs them: fit, resume, export, load with peft, merge."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lantern.datamodules import InstructionDataModule
from lantern.lightning_modules import AdamW, AdapterFineTuning, AdapterMerge
from lantern.lightning_modules.adapters import deltas_applied
from lantern.models import load_model, lori

def _pairs(path: Path, n: int = 24) -> str:
    rows = [{"prompt": f"Add {i} and {i + 1}.", "response": f"The answer is {2 * i + 1}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(tmp_path: Path, **kw) -> InstructionDataModule:
    return InstructionDataModule(train=_pairs(tmp_path / "pairs.jsonl"), eval_tasks=["math"], tokenizer="byte", n_eval=2,
                                 batch_size=4, max_length=200, overlong="truncate", **kw)


def _module(**kw) -> AdapterFineTuning:
    args = dict(model_name="tiny-llama", variant="lori_d", rank=4, alpha=8, a_seed=3, optim=AdamW(lr=1e-2, min_lr_ratio=1.0))
    return AdapterFineTuning(**{**args, **kw})


def _fit(module, data, root: Path, steps: int, ckpt: str | None = None) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return trainer


def _layers(module):
    return lori.lori_layers(module.model)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_loss_is_the_summed_response_logprob_averaged_over_the_batch(tmp_path):
    data = _data(tmp_path)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = _module()
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        logp = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    labels = batch["labels"]
    hand = 0.0
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[row, t] != -100:
                hand += logp[row, t - 1, labels[row, t]].item()
    assert (labels != -100).sum() > 0 and (labels[:, 0] == -100).all()
    assert loss.item() == pytest.approx(-hand / labels.shape[0], rel=1e-4)
    mean = _module(loss="mean")
    with torch.no_grad():
        assert mean.training_step(batch, 0).item() < loss.item()  # the sum counts every response token


def test_lori_d_trains_B_keeps_A_checkpoints_only_the_adapter_and_exports_for_peft(tmp_path):
    from peft import PeftModel

    module = _module()
    A0 = {n: m.lora_A.clone() for n, m in _layers(module).items()}
    trainer = _fit(module, _data(tmp_path), tmp_path, steps=3)
    layers = _layers(module)
    assert all(torch.equal(layers[n].lora_A, a) for n, a in A0.items())  # frozen for good
    assert all(m.lora_B.abs().sum() > 0 for m in layers.values())  # every module learnt
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state), "the frozen base model was checkpointed"
    out = module.export(tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 12))
    peft_model = PeftModel.from_pretrained(load_model("tiny-llama", seed=0), str(out))
    torch.testing.assert_close(_logits(peft_model, ids), _logits(module.model, ids), atol=1e-5, rtol=1e-5)
    assert trainer.global_step == 3


@pytest.fixture
def lori_d_dir(tmp_path):
    module = _module()
    _fit(module, _data(tmp_path), tmp_path / "d", steps=3)
    return str(module.export(tmp_path / "lori_d"))


@pytest.mark.parametrize("variant", ["lora", "lori_d", "lori_s"])
def test_training_resumes_from_a_checkpoint_exactly(variant, tmp_path, lori_d_dir):
    kw = {"variant": variant, **({"mask_from": lori_d_dir, "sparsity": 0.5} if variant == "lori_s" else {})}
    straight = _module(**kw)
    _fit(straight, _data(tmp_path), tmp_path / "a", steps=4)
    _fit(_module(**kw), _data(tmp_path), tmp_path / "b", steps=2)
    resumed = _module(**kw)
    _fit(resumed, _data(tmp_path), tmp_path / "c", steps=4, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    mine, theirs = dict(resumed.named_parameters()), dict(straight.named_parameters())
    trained = [n for n, p in theirs.items() if p.requires_grad]
    assert trained
    for name in trained:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-6, rtol=1e-5)
    export = lori.load_factors(resumed.export(tmp_path / "export"))[1]
    if variant == "lori_s":  # the mask written is the one trained, not one recomputed from mask_from
        assert all(torch.equal(export[n], layer.mask) for n, layer in _layers(resumed).items())


def test_lori_s_trains_only_the_kept_entries_and_reuses_lori_d_A(tmp_path, lori_d_dir):
    module = _module(variant="lori_s", mask_from=lori_d_dir, sparsity=0.75,
                     optim=AdamW(lr=1e-2, weight_decay=0.1, min_lr_ratio=1.0))
    donor, _, _ = lori.load_factors(lori_d_dir)
    layers = _layers(module)
    total = sum(m.lora_B_base.numel() for m in layers.values())
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == round(0.25 * total)
    _fit(module, _data(tmp_path), tmp_path / "s", steps=5)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, donor[name].A)
        B = layer.B.detach()
        assert (B[~layer.mask] == 0).all()  # masked entries exactly zero, weight decay or not
    assert any((layer.B[layer.mask] != 0).any() for layer in layers.values())


def test_continual_lori_s_keeps_every_safety_entry_outside_the_task_mask(tmp_path, lori_d_dir):
    safety = _module(a_seed=7)
    _fit(safety, _data(tmp_path), tmp_path / "safety", steps=2)
    safety_dir = safety.export(tmp_path / "safety_adapter")
    before, _, _ = lori.load_factors(safety_dir)
    module = _module(variant="lori_s", init_from=str(safety_dir), mask_from=lori_d_dir, sparsity=0.9)
    _fit(module, _data(tmp_path), tmp_path / "task", steps=3)
    for name, layer in _layers(module).items():
        assert torch.equal(layer.lora_A, before[name].A)
        assert torch.equal(layer.B.detach()[~layer.mask], before[name].B[~layer.mask])


def test_merging_one_adapter_at_weight_one_is_that_adapter_and_restores_the_base(tmp_path, lori_d_dir):
    factors, _, _ = lori.load_factors(lori_d_dir)
    model = load_model("tiny-llama", seed=0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = load_model("tiny-llama", seed=0)
    lori.add_lori(adapted, rank=4, alpha=8, target_modules=lori.SEVEN, init={n: (f.A, f.B) for n, f in factors.items()})
    ids = torch.randint(0, 256, (2, 10))
    with deltas_applied(model, lori.merge_concat([factors], [1.0])):
        torch.testing.assert_close(_logits(model, ids), _logits(adapted, ids), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())  # bit-exact afterwards


def test_the_merge_study_scores_base_single_and_merged_models(tmp_path, lori_d_dir):
    study = AdapterMerge({"lori_d": {"math": lori_d_dir}}, model_name="tiny-llama", methods=["concat", "linear"],
                         weights={"lori_d": 1.0})
    data = InstructionDataModule(eval_tasks=["math"], tokenizer="byte", n_eval=2, eval_batch_size=2)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(study, datamodule=data)
    table = json.loads((tmp_path / "lori_merge.json").read_text())
    configs = {(r["variant"], r["config"], r["task"]) for r in table["scores"]}
    assert configs == {("base", "base", "math"), ("lori_d", "single", "math"),
                       ("lori_d", "merged_concat", "math"), ("lori_d", "merged_linear", "math")}
    assert all(r["n"] == 2 for r in table["scores"])
    # one adapter merged at weight 1 is that adapter: the same answers, token for token
    answers = {key[:2]: [text for _, text in pairs] for key, pairs in study._answers.items()}
    assert answers[("lori_d", "merged_concat")] == answers[("lori_d", "single")]
    assert table["weights"] == {"lori_d": 1.0}
