import pytest
import torch

from lantern.callbacks import HeadAblation
from lantern.models import MoETransformer, get_adapter, load_model


def _capture(model, layer):
    adapter = get_adapter(model)
    seen = {}
    h1 = adapter.out_proj(model, layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))
    h2 = adapter.out_proj(model, layer).register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.clone()))
    return seen, (h1, h2)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zeroing_a_head_removes_exactly_its_o_proj_term(name, attn):
    model = load_model(name, seed=0, attn_implementation=attn)
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (2, 9))
    seen, handles = _capture(model, 1)
    with torch.no_grad():
        base_logits = model(ids).logits
        base_in, base_out = seen["in"], seen["out"]
        with HeadAblation([]).applied(model):
            assert torch.equal(model(ids).logits, base_logits)  # nothing ablated → bit-identical
        with HeadAblation([(1, 2)]).applied(model):
            model(ids)
        after_out = seen["out"]
        assert torch.equal(model(ids).logits, base_logits)  # hooks gone after the context
    for h in handles:
        h.remove()
    d = adapter.head_dim(model)
    proj = adapter.out_proj(model, 1)
    w = proj.weight if isinstance(proj, torch.nn.Linear) else proj.weight.T  # GPT-2 Conv1D stores [in, out]
    o_h = base_in[..., 2 * d : 3 * d]
    torch.testing.assert_close(after_out - base_out, -(o_h @ w[:, 2 * d : 3 * d].T), atol=1e-5, rtol=1e-4)


def test_ablation_on_the_moe_transformer_and_range_errors():
    model = MoETransformer(n_layers=2).eval()
    ids = torch.randint(0, 257, (1, 8))
    with torch.no_grad():
        base = model(ids).logits
        with HeadAblation([(0, 0), (1, 3)]).applied(model):
            assert not torch.equal(model(ids).logits, base)
    hooks_before = len(model._forward_pre_hooks)
    with pytest.raises(ValueError, match=r"head \(2, 0\) out of range: the model has 2 layers × 4 heads"):
        HeadAblation([(2, 0)]).attach(model)
    assert len(model._forward_pre_hooks) == hooks_before  # a rejected argument leaves no hook behind


def test_callback_hooks_live_only_during_a_trainer_stage(corpus, tmp_path):
    import lightning as L

    from lantern.datamodules import TextDataModule
    from lantern.lightning_modules import MoEPretraining

    torch.manual_seed(0)
    module = MoEPretraining(MoETransformer(d_model=32, n_layers=2, n_heads=4, n_experts=4, d_expert=32, max_seq_len=32))
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path))

    def val_loss(callbacks):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2, callbacks=callbacks)
        return trainer.validate(module, data, verbose=False)[0]["val/loss"]

    ablation = HeadAblation([(0, 1), (1, 2)])
    base, ablated = val_loss([]), val_loss([ablation])
    assert ablated != base and not ablation._handles
    assert val_loss([]) == base


# ----------------------------------------------------------------------------- ActivationCache
from safetensors.torch import load_file  # noqa: E402

from lantern.callbacks import ActivationCache, SinkMeasurement  # noqa: E402


def _padded(pad_side: str):
    """Two sequences of lengths 6 and 9 padded to 9 on one side, with matching position ids."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, 256, (6,)), torch.randint(0, 256, (9,))]
    ids = torch.full((2, 9), 256)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(9 - len(s), 9) if pad_side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_cached_residuals_equal_output_hidden_states(name):
    model = load_model(name, seed=0)
    ids = torch.randint(0, 256, (2, 7))
    cache = ActivationCache(sites=["resid_pre", "resid_post"], positions="all")
    with torch.no_grad(), cache.applied(model):
        hidden = model(ids, output_hidden_states=True).hidden_states
    acts = cache.activations()
    assert set(acts) == {f"blocks.{l}.hook_resid_{s}" for l in (0, 1) for s in ("pre", "post")}
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1], rtol=0, atol=0)


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_cached_positions_agree_under_left_and_right_padding(positions):
    model = load_model("tiny-llama", seed=0)
    got = {}
    for side in ("left", "right"):
        ids, mask, pos = _padded(side)
        cache = ActivationCache(sites=["resid_post", "head_out", "mlp_out"], positions=positions)
        with torch.no_grad(), cache.applied(model):
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        got[side] = cache.activations()
    ids, mask, _ = _padded("right")
    alone = ActivationCache(sites=["resid_post", "head_out", "mlp_out"], positions=positions)
    with torch.no_grad(), alone.applied(model):
        model(ids[:1, :6])
    for name, value in got["left"].items():
        torch.testing.assert_close(value, got["right"][name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(value[:1], alone.activations()[name], atol=1e-5, rtol=1e-4)
    assert got["left"]["blocks.1.attn.hook_z"].shape == (2, 4, 16)


def test_name_filter_and_disk_shards(tmp_path):
    model = load_model("tiny-qwen2", seed=0)
    batches = [torch.randint(0, 256, (2, 5)) for _ in range(3)]
    memory = ActivationCache(sites=["attn_out", "mlp_out"], names=r"^blocks\.1\.")
    disk = ActivationCache(sites=["attn_out", "mlp_out"], names=r"^blocks\.1\.", save_dir=str(tmp_path / "acts"),
                           batches_per_shard=2)
    with torch.no_grad():
        with memory.applied(model):
            for b in batches:
                model(b)
        with disk.applied(model):
            for b in batches:
                model(b)
                disk._after_batch()
    assert set(memory.activations()) == {"blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"}
    shards = sorted((tmp_path / "acts").glob("*.safetensors"))
    assert [p.name for p in shards] == ["activations-00000.safetensors", "activations-00001.safetensors"]
    joined = {k: torch.cat([load_file(str(p))[k] for p in shards]) for k in memory.activations()}
    for k, v in memory.activations().items():
        torch.testing.assert_close(joined[k], v, rtol=0, atol=0)


def test_bad_callback_arguments_fail_with_one_line():
    model = load_model("tiny-llama", seed=0)
    with pytest.raises(ValueError, match="unknown site 'resid_mid'"):
        ActivationCache(sites=["resid_mid"])
    with pytest.raises(ValueError, match="layer 5 out of range: the model has 2 layers"):
        ActivationCache(layers=[5]).attach(model)
    with pytest.raises(ValueError, match="mode='half'"):
        HeadAblation([(0, 0)], mode="half")


# ----------------------------------------------------------------------------- HeadAblation modes
def test_mean_replacement_is_the_causal_running_mean_over_real_tokens():
    model = load_model("tiny-llama", seed=0)
    ids, mask, pos = _padded("right")
    plain = ActivationCache(sites=["head_out"], positions="all", layers=[1])
    with torch.no_grad(), plain.applied(model):
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    z = plain.activations()["blocks.1.attn.hook_z"][:, :, 2]  # [B, S, D]
    ablation = HeadAblation([(1, 2)], mode="mean")
    after = ActivationCache(sites=["head_out"], positions="all", layers=[1])
    with torch.no_grad(), ablation.applied(model), after.applied(model):  # ablation's hook runs first
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        changed = ids.clone()
        changed[1, 8] = (changed[1, 8] + 1) % 256  # the last token of row 1
        logits_changed = model(input_ids=changed, attention_mask=mask, position_ids=pos).logits
    z_after = after.activations()["blocks.1.attn.hook_z"][:2]
    for b in range(2):
        for t in range(int(mask[b].sum())):
            torch.testing.assert_close(z_after[b, t, 2], z[b, : t + 1].mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z_after[:, :, 3], plain.activations()["blocks.1.attn.hook_z"][:, :, 3])
    torch.testing.assert_close(logits_changed[1, :8], logits[1, :8], rtol=0, atol=0)  # no look-ahead


def test_mask_fn_chooses_heads_per_batch_with_ablation_off(corpus, tmp_path):
    import lightning as L

    from lantern.datamodules import TextDataModule
    from lantern.lightning_modules import MoEPretraining

    torch.manual_seed(0)
    module = MoEPretraining(MoETransformer(d_model=32, n_layers=2, n_heads=4, n_experts=4, d_expert=32, max_seq_len=32))
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path))
    calls = []

    def choose(pl_module, batch):
        calls.append(ablation.enabled)
        mask = torch.zeros(batch["input_ids"].shape[0], 2, 4, dtype=torch.bool)
        mask[:, 1, 2] = True
        return mask

    def val_loss(callbacks):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2,
                            callbacks=callbacks, default_root_dir=tmp_path)
        return trainer.validate(module, data, verbose=False)[0]["val/loss"]

    ablation = HeadAblation(mask_fn=choose)
    per_batch = val_loss([ablation])
    assert calls == [False, False]
    assert per_batch == pytest.approx(val_loss([HeadAblation([(1, 2)])]), abs=1e-6)
    assert per_batch != val_loss([])


def test_per_input_mask_ablates_different_heads_per_row():
    model = load_model("tiny-llama", seed=0)
    ids = torch.randint(0, 256, (2, 6))
    ablation = HeadAblation()
    with torch.no_grad(), ablation.applied(model):
        mask = torch.zeros(2, 2, 4, dtype=torch.bool)
        mask[0, 0, 1] = mask[1, 1, 3] = True
        ablation.set_mask(mask)
        both = model(ids).logits
        for row, head in ((0, (0, 1)), (1, (1, 3))):
            fixed = torch.zeros(2, 4, dtype=torch.bool)
            fixed[head] = True
            ablation.set_mask(fixed)
            torch.testing.assert_close(both[row], model(ids).logits[row], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"must end in \(layers, heads\) = \(2, 4\)"):
            ablation.set_mask(torch.zeros(3, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- SinkMeasurement
def test_sink_mass_equals_direct_computation_from_eager_attentions():
    model = load_model("tiny-llama", seed=0, attn_implementation="eager")
    ids = torch.randint(0, 256, (3, 8))
    sinks = SinkMeasurement(top_k=2)
    with torch.no_grad(), sinks.applied(model):
        model(ids)
        attentions = model(ids, output_attentions=True).attentions
    res = sinks.results()  # two identical passes: the average equals one pass
    direct = torch.stack([a[:, :, :, 0].mean(-1).mean(0) for a in attentions])
    torch.testing.assert_close(res["sink_mass"], direct, atol=1e-6, rtol=1e-5)
    top2 = torch.stack([a.mean(-2).topk(2, -1).values.sum(-1).mean(0) for a in attentions])
    torch.testing.assert_close(res["topk_mass"], top2, atol=1e-6, rtol=1e-5)
    assert ((res["sink_mass"] >= 0) & (res["sink_mass"] <= 1)).all()


def test_sink_measures_are_identical_under_left_and_right_padding_and_restore_sdpa():
    model = load_model("tiny-llama", seed=0, attn_implementation="sdpa")
    got = []
    for side in ("left", "right"):
        ids, mask, pos = _padded(side)
        sinks = SinkMeasurement(top_k=2)
        with torch.no_grad(), sinks.applied(model):
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        got.append(sinks.results())
        assert model.config._attn_implementation == "sdpa"
    assert set(got[0]) == {"sink_mass", "topk_mass", "output_norm_ratio", "dormant_share"}
    for key in got[0]:
        torch.testing.assert_close(got[0][key], got[1][key], atol=1e-6, rtol=1e-5)


def test_sinks_are_measured_during_moe_pretraining(corpus, tmp_path):
    import json

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lantern.datamodules import TextDataModule
    from lantern.lightning_modules import MoEPretraining

    torch.manual_seed(0)
    net = MoETransformer(d_model=32, n_layers=2, n_heads=4, n_experts=4, d_expert=32, max_seq_len=32)
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=2, enable_progress_bar=False,
                        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[SinkMeasurement()],
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(MoEPretraining(net, warmup_steps=1), data)
    records = json.loads((tmp_path / "run" / "version_0" / "sinks.json").read_text())
    assert [r["step"] for r in records] == [2, 4]
    assert len(records[0]["sink_mass"]) == 2 and len(records[0]["sink_mass"][0]) == 4
    assert 0 < trainer.callback_metrics["attn/sink_mass/L1"] < 1
    assert 0 <= trainer.callback_metrics["attn/dormant_share/L1"] <= 1
    torch.testing.assert_close(torch.tensor(records[1]["output_norm_ratio"]).mean(-1), torch.ones(2))
    assert net.attn_implementation == "sdpa"
