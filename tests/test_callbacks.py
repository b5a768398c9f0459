import pytest
import torch

from lantern.callbacks import HeadAblation
from lantern.errors import ConfigError, DataError
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
    with pytest.raises(ConfigError, match=r"HeadAblation.heads=\[\[2, 0\]\]: expected \(layer, head\) pairs within 2 layers × 4 heads"):
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


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ActivationCache(sites=["resid_mid"]), "ActivationCache.sites=['resid_mid']: expected a non-empty list"),
        (lambda: ActivationCache(sites=[]), "ActivationCache.sites=[]: expected a non-empty list"),
        (lambda: ActivationCache(names="blocks.(1"), "ActivationCache.names='blocks.(1': expected a regular expression (missing )"),
        (lambda: ActivationCache(positions="first"), "ActivationCache.positions='first': expected 'all', 'last' or 'mean'"),
        (lambda: ActivationCache(batches_per_shard=0), "ActivationCache.batches_per_shard=0: expected an integer ≥ 1"),
        (lambda: HeadAblation([(0, 0)], mode="half"), "HeadAblation.mode='half': expected 'zero' or 'mean'"),
        (lambda: HeadAblation([(0, 0, 1)]), "HeadAblation.heads=[[0, 0, 1]]: expected a list of (layer, head) pairs"),
        (lambda: SinkMeasurement(top_k=0), "SinkMeasurement.top_k=0: expected an integer ≥ 1"),
    ],
)
def test_bad_callback_arguments_raise_a_config_error_naming_the_field(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ActivationCache(layers=[5]), "ActivationCache.layers=[5]: expected a non-empty list of layer indices in [0, 2)"),
        (lambda: ActivationCache(layers=[]), "ActivationCache.layers=[]: expected a non-empty list"),
        (lambda: ActivationCache(names="^blocks.9"), "ActivationCache.names='^blocks.9': expected a pattern matching"),
        (lambda: HeadAblation([(0, 4)]), "HeadAblation.heads=[[0, 4]]: expected (layer, head) pairs within 2 layers × 4 heads"),
        (lambda: HeadAblation([(-1, 0)]), "HeadAblation.heads=[[-1, 0]]: expected (layer, head) pairs"),
    ],
)
def test_arguments_checked_against_the_model_fail_on_attach_and_leave_no_hook(build, message):
    model = load_model("tiny-llama", seed=0)
    callback = build()
    with pytest.raises(ConfigError) as err:
        callback.attach(model)
    assert str(err.value).startswith(message)
    assert not callback._handles and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_top_k_beyond_the_keys_is_rejected_when_measured():
    model = load_model("tiny-llama", seed=0)
    with pytest.raises(ConfigError, match=r"SinkMeasurement.top_k=5: expected at most the 4 key positions"):
        with torch.no_grad(), SinkMeasurement(top_k=5).applied(model):
            model(torch.randint(0, 256, (1, 4)))
    assert model.config._attn_implementation == "sdpa"


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
    from lantern.lightning_modules.optim import AdamW

    torch.manual_seed(0)
    net = MoETransformer(d_model=32, n_layers=2, n_heads=4, n_experts=4, d_expert=32, max_seq_len=32)
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=2, enable_progress_bar=False,
                        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[SinkMeasurement()],
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(MoEPretraining(net, optim=AdamW(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=1)), data)
    records = json.loads((tmp_path / "run" / "version_0" / "sinks.json").read_text())
    assert [r["step"] for r in records] == [2, 4]
    assert len(records[0]["sink_mass"]) == 2 and len(records[0]["sink_mass"][0]) == 4
    assert 0 < trainer.callback_metrics["attn/sink_mass/L1"] < 1
    assert 0 <= trainer.callback_metrics["attn/dormant_share/L1"] <= 1
    torch.testing.assert_close(torch.tensor(records[1]["output_norm_ratio"]).mean(-1), torch.ones(2))
    assert net.attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- KV-cached generate
def _prompts():
    """Prompts of lengths 5 and 9, left-padded to 9 as ``generate`` expects."""
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[0, :4], mask[0, :4] = 256, 0
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _generate(model, ids, mask, steps=6):
    """Cached greedy decoding: the final sequences and each step's logits [B, steps, V]."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, use_cache=True,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _greedy_uncached(model, ids, mask, steps=6):
    """Greedy decoding by full-sequence forwards, with the masks and positions ``generate`` passes."""
    logits = []
    for _ in range(steps):
        logits.append(model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1])
        token = logits[-1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids, torch.stack(logits, 1)


def _fed(sequences, mask):
    """What ``generate`` fed the model in all: every token but the last generated one, and its mask."""
    fed = sequences[:, :-1]
    return fed, torch.cat([mask, torch.ones(mask.shape[0], fed.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_under_cached_generate_equals_uncached_greedy_decoding(mode):
    model = load_model("tiny-llama", seed=0, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(2):  # louder heads, so that ablating three of them changes which tokens win
            get_adapter(model).out_proj(model, layer).weight.mul_(20)
        ids, mask = _prompts()
        plain, _ = _generate(model, ids, mask)
        with HeadAblation([(0, 1), (1, 2), (1, 3)], mode=mode).applied(model):
            cached, cached_logits = _generate(model, ids, mask)
            again, _ = _generate(model, ids, mask)  # a new prompt restarts the running mean
            full, full_logits = _greedy_uncached(model, ids, mask)
    assert torch.equal(cached, full) and torch.equal(again, cached)
    torch.testing.assert_close(cached_logits, full_logits.float())  # generate hands back float32 logits
    assert not torch.equal(cached[:, 9:], plain[:, 9:])  # the ablation acted on the generated tokens


def test_a_cached_continuation_the_mean_ablation_did_not_see_raises():
    model = load_model("tiny-llama", seed=0)
    ids, mask = _prompts()
    longer = torch.cat([mask, mask[:, -1:]], 1)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True).cache
        with HeadAblation([(1, 2)], mode="mean").applied(model):
            with pytest.raises(DataError, match="running mean at layer 1 was not tracked"):
                model(input_ids=ids[:, -1:], attention_mask=longer, position_ids=_positions(longer)[:, -1:], cache=cache)


@pytest.mark.parametrize("mask", [torch.ones(2, 3, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)])
@pytest.mark.parametrize("build", [lambda: HeadAblation([(0, 0)], mode="mean"), lambda: ActivationCache(positions="mean"),
                                   lambda: SinkMeasurement()])
def test_a_mask_that_does_not_fit_the_call_raises_instead_of_being_ignored(mask, build):
    model = load_model("tiny-llama", seed=0)
    with pytest.raises(DataError, match=r"attention_mask of shape \(\d, \d\) does not"):
        with torch.no_grad(), build().applied(model):
            model(input_ids=torch.randint(0, 256, (2, 5)), attention_mask=mask)


def test_activations_under_cached_generate_equal_one_full_forward():
    model = load_model("tiny-llama", seed=0, dtype=torch.float64)
    ids, mask = _prompts()
    sites = ["resid_pre", "resid_post", "attn_out", "mlp_out", "head_out"]
    stepwise, whole = ActivationCache(sites=sites, positions="all"), ActivationCache(sites=sites, positions="all")
    with torch.no_grad():
        with stepwise.applied(model):
            sequences, _ = _generate(model, ids, mask)
        fed, fed_mask = _fed(sequences, mask)
        with whole.applied(model):
            model(input_ids=fed, attention_mask=fed_mask, position_ids=_positions(fed_mask))
    real = fed_mask.bool()
    for name, full in whole.activations().items():
        calls = stepwise._store[name]  # one entry per forward call: the prompt, then one token each
        assert [c.shape[1] for c in calls] == [9, 1, 1, 1, 1, 1]
        torch.testing.assert_close(torch.cat(calls, 1)[real], full[real], rtol=1e-9, atol=1e-9)


def _sink_rows(attentions, mask, start, stop, k):
    """Per input [B, L, H]: the sink and top-k masses of query rows start…stop of a full forward."""
    att = torch.stack(attentions, 1)[..., start:stop, :]  # [B, L, H, Q, K]
    q = mask[:, start:stop].bool().view(mask.shape[0], 1, 1, -1)
    first = mask.argmax(-1).view(-1, 1, 1, 1, 1).expand(*att.shape[:4], 1)
    sink = att.gather(-1, first).squeeze(-1).where(q, 0).sum(-1) / q.sum(-1)
    columns = att.where(q.unsqueeze(-1), 0).sum(-2) / q.sum(-1, keepdim=True)
    return sink, columns.topk(k, -1).values.sum(-1)


def test_sink_scores_under_cached_generate_equal_the_full_forwards_rows():
    model = load_model("tiny-llama", seed=0, attn_implementation="eager")  # float64 eager leaks NaN from padding
    ids, mask = _prompts()
    sinks, per_call = SinkMeasurement(top_k=2), []
    with torch.no_grad(), sinks.applied(model):
        handle = model.register_forward_hook(lambda module, args, out: per_call.append(sinks.last_scores()["sink_mass"]))
        sequences, _ = _generate(model, ids, mask)
        handle.remove()
    fed, fed_mask = _fed(sequences, mask)
    with torch.no_grad():
        attentions = model(input_ids=fed, attention_mask=fed_mask, position_ids=_positions(fed_mask),
                           output_attentions=True).attentions
    spans = [(0, 9)] + [(8 + t, 9 + t) for t in range(1, 6)]  # the prompt, then one query row per step
    expected = [_sink_rows(attentions, fed_mask, a, b, 2) for a, b in spans]
    torch.testing.assert_close(torch.stack(per_call), torch.stack([s for s, _ in expected]))
    torch.testing.assert_close(sinks.results()["topk_mass"], torch.stack([t for _, t in expected]).mean((0, 1)))


def test_a_cached_chunk_of_queries_is_measured_against_all_keys():
    """Three new query rows over twelve keys: swapping the query and key masks would change every number."""
    model = load_model("tiny-llama", seed=0, attn_implementation="eager")  # float64 eager leaks NaN from padding
    ids, mask = _prompts()
    more, full_mask = torch.randint(0, 256, (2, 3)), torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    sinks = SinkMeasurement(top_k=3)
    with torch.no_grad(), sinks.applied(model):
        cache = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True).cache
        sinks.reset()
        model(input_ids=more, attention_mask=full_mask, position_ids=_positions(full_mask)[:, 9:], cache=cache)
        got = sinks.last_scores()["sink_mass"]
    with torch.no_grad():
        attentions = model(input_ids=torch.cat([ids, more], 1), attention_mask=full_mask,
                           position_ids=_positions(full_mask), output_attentions=True).attentions
    sink, topk = _sink_rows(attentions, full_mask, 9, 12, 3)
    torch.testing.assert_close(got, sink)
    torch.testing.assert_close(sinks.results()["topk_mass"], topk.mean(0))
