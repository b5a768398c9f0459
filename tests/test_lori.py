import copy
import json
import math

import pytest
import torch
from torch import nn

from lantern.errors import CheckpointError, ConfigError
from lantern.models import load_model
from lantern.models.lori import (
    SEVEN, Factors, LoRILinear, adapter_overlap, add_lori, apply_deltas, clip_per_tensor_, concat_factors,
    count_trainable, export_peft, linear_factors, load_factors, lora_factors, lori_disabled, magnitude_masks,
    merge_concat, merge_linear, merged_model, projection_shapes, remove_lori, subspace_overlap, trainable_counts,
)

R = 4


def _ids(seed=0, batch=2, seq=12):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=20, lr=1e-2, weight_decay=0.1, between=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    for i in range(steps):
        ids = _ids(i)
        model(ids, labels=ids).loss.backward()
        clip_per_tensor_(p for g in opt.param_groups for p in g["params"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if between is not None:
            between(i)
    model.eval()
    return opt


def _random_masks(layers, density=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(l.base.out_features, R, generator=gen) < density for n, l in layers.items()}


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids(99) if ids is None else ids).logits


def test_A_is_a_frozen_buffer_drawn_from_seed_and_name():
    torch.manual_seed(123)
    layers = add_lori(load_model("tiny-llama", seed=0), rank=R, alpha=2 * R, seed=7)
    assert len(layers) == 14 and {n.rpartition(".")[2] for n in layers} == set(SEVEN)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert "lora_A" in dict(q.named_buffers()) and all("lora_A" not in n for n, _ in q.named_parameters())
    assert not q.A.requires_grad and q.A.abs().max() <= 1 / math.sqrt(64)

    torch.manual_seed(999)  # the global RNG plays no part
    again = add_lori(load_model("tiny-llama", seed=3), rank=R, alpha=2 * R, seed=7)
    assert all(torch.equal(layers[n].A, again[n].A) for n in layers)
    other_seed = add_lori(load_model("tiny-llama", seed=0), rank=R, alpha=2 * R, seed=8)
    assert not torch.equal(q.A, other_seed["model.layers.0.self_attn.q_proj"].A)
    assert not torch.equal(q.A, layers["model.layers.1.self_attn.q_proj"].A)  # same shape, other name
    assert not torch.equal(q.A, layers["model.layers.0.self_attn.o_proj"].A)


def test_A_and_masked_B_entries_survive_adamw_with_weight_decay_and_enable_disable():
    model = load_model("tiny-llama", seed=0)
    layers = add_lori(model, rank=R, alpha=2 * R, seed=1)
    masks = _random_masks(layers)
    A0 = {n: l.A.clone() for n, l in layers.items()}
    remove_lori(model)
    layers = add_lori(model, rank=R, alpha=2 * R, seed=1, masks=masks)
    assert all(torch.equal(layers[n].A, A0[n]) for n in layers)  # LoRI-S redraws LoRI-D's A

    def round_trip(step):
        with lori_disabled(model):
            _logits(model)
        model.requires_grad_(True)  # what a careless enable_adapter does; A is no parameter to flip
        model.requires_grad_(False)
        for layer in layers.values():
            layer.lora_B_values.requires_grad_(True)

    base_logits = _logits(model)
    _train(model, steps=15, weight_decay=0.1, between=round_trip)
    for n, layer in layers.items():
        assert torch.equal(layer.A, A0[n]) and layer.A.grad is None
        B = layer.B.detach()
        assert torch.equal(B[~masks[n]], torch.zeros_like(B[~masks[n]]))  # exactly 0, not 1e-30
        assert (B[masks[n]] != 0).all()
    with lori_disabled(model):
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    assert not torch.equal(_logits(model), base_logits)


def test_continual_lori_s_keeps_the_earlier_adapter_outside_its_mask():
    model = load_model("tiny-llama", seed=0)
    shapes = projection_shapes(model)
    gen = torch.Generator().manual_seed(5)
    safety = {n: Factors(torch.randn(R, d_in, generator=gen), torch.randn(d_out, R, generator=gen), 2.0)
              for n, (d_out, d_in) in shapes.items()}
    masks = magnitude_masks({n: torch.randn(d_out, R, generator=gen) for n, (d_out, _) in shapes.items()}, 0.9)
    layers = add_lori(model, rank=R, alpha=2 * R, masks=masks, init=safety)
    assert all(torch.equal(layers[n].B, safety[n].B) for n in layers)  # starts from the safety B
    _train(model, steps=10, weight_decay=0.1)
    for n, layer in layers.items():
        assert torch.equal(layer.A, safety[n].A)
        assert torch.equal(layer.B.detach()[~masks[n]], safety[n].B[~masks[n]])
        assert not torch.equal(layer.B.detach()[masks[n]], safety[n].B[masks[n]])


def test_optimizer_state_of_lori_s_holds_only_the_kept_entries():
    model = load_model("tiny-llama", seed=0)
    layers = add_lori(model, rank=R, alpha=2 * R)
    masks = magnitude_masks({n: torch.randn_like(l.B) for n, l in layers.items()}, 0.9)
    remove_lori(model)
    layers = add_lori(model, rank=R, alpha=2 * R, masks=masks)
    opt = _train(model, steps=1)
    for n, layer in layers.items():
        state = opt.state[layer.lora_B_values]
        k = int(masks[n].sum())
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == k
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == round(0.1 * sum(m.numel() for m in masks.values()))


def test_gradient_of_sparse_B_is_the_dense_gradient_at_kept_entries():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    mask = torch.rand(8, R) < 0.5
    B = torch.randn(8, R)
    dense = LoRILinear(copy.deepcopy(base), "m", R, 2 * R, B=B)
    sparse = LoRILinear(copy.deepcopy(base), "m", R, 2 * R, B=B, mask=mask)
    x = torch.randn(3, 16)
    torch.testing.assert_close(dense(x), sparse(x), rtol=0, atol=0)
    dense(x).pow(2).sum().backward()
    sparse(x).pow(2).sum().backward()
    torch.testing.assert_close(sparse.lora_B_values.grad, dense.lora_B.grad[mask])


def test_parameter_counts_equal_the_formulas():
    from peft import LoraConfig, get_peft_model

    model = load_model("tiny-llama", seed=0)
    shapes = projection_shapes(model)
    assert len(shapes) == 14
    d = copy.deepcopy(model)
    layers = add_lori(d, rank=R, alpha=2 * R)
    assert count_trainable(d) == trainable_counts(model, "lori-d", R) == sum(R * o for o, _ in shapes.values())
    assert projection_shapes(d) == shapes
    s = copy.deepcopy(model)
    add_lori(s, rank=R, alpha=2 * R, masks=magnitude_masks({n: torch.randn_like(l.B) for n, l in layers.items()}, 0.9))
    assert count_trainable(s) == trainable_counts(shapes, "lori-s", R, 0.9) == round(0.1 * trainable_counts(shapes, "lori-d", R))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(SEVEN)))
    assert count_trainable(peft_model) == trainable_counts(model, "lora", R) == sum(R * (o + i) for o, i in shapes.values())
    assert projection_shapes(peft_model) == shapes


def test_global_mask_keeps_exactly_k_of_the_largest_magnitudes_with_deterministic_ties():
    gen = torch.Generator().manual_seed(0)
    Bs = {f"model.layers.{l}.mlp.{p}": torch.randint(-5, 6, (8 * (p == "up_proj") + 6, R), generator=gen).float()
          for l in range(3) for p in ("up_proj", "down_proj")}
    total = sum(b.numel() for b in Bs.values())
    masks = magnitude_masks(Bs, 0.7)
    k = round(0.3 * total)
    assert sum(int(m.sum()) for m in masks.values()) == k and list(masks) == list(Bs)
    kept = torch.cat([b[masks[n]].abs() for n, b in Bs.items()])
    dropped = torch.cat([b[~masks[n]].abs() for n, b in Bs.items()])
    assert kept.min() >= dropped.max()
    shuffled = magnitude_masks(dict(reversed(list(Bs.items()))), 0.7)
    assert all(torch.equal(masks[n], shuffled[n]) for n in Bs)

    per_module = magnitude_masks(Bs, 0.7, scope="module")
    assert all(int(per_module[n].sum()) == round(0.3 * b.numel()) for n, b in Bs.items())
    per_layer = magnitude_masks(Bs, 0.7, scope="layer")
    for layer in range(3):
        names = [n for n in Bs if n.startswith(f"model.layers.{layer}.")]
        assert sum(int(per_layer[n].sum()) for n in names) == round(0.3 * sum(Bs[n].numel() for n in names))
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_masks(Bs, 1.5)


def _trained_lori(seed=0, masks=None, steps=8):
    model = load_model("tiny-llama", seed=0)
    add_lori(model, rank=R, alpha=2 * R, seed=seed, masks=masks)
    _train(model, steps=steps, weight_decay=0.0)
    return model


def test_concat_merge_of_one_adapter_at_weight_one_is_that_adapter():
    model = _trained_lori()
    factors = lora_factors(model)
    deltas = merge_concat([factors], [1.0])
    for n, f in factors.items():
        torch.testing.assert_close(deltas[n], f.scale * f.B @ f.A)
    merged = apply_deltas(load_model("tiny-llama", seed=0), deltas)
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(merged_model(load_model("tiny-llama", seed=0), factors)), _logits(model),
                               rtol=0, atol=1e-5)
    stacked = concat_factors([factors, factors], [0.5, 0.5])
    n = next(iter(factors))
    assert stacked[n].A.shape[0] == 2 * R and stacked[n].scale == 1.0
    torch.testing.assert_close(stacked[n].delta(), deltas[n])


def test_linear_merge_has_the_cross_terms_of_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    A1, A2, B1, B2 = (torch.randn(*s, generator=gen) for s in ((2, 5), (2, 5), (3, 2), (3, 2)))
    a, b = {"m": Factors(A1, B1, 2.0)}, {"m": Factors(A2, B2, 0.5)}
    w1, w2 = 0.3, 0.7
    c1, c2 = math.sqrt(w1 * 2.0), math.sqrt(w2 * 0.5)
    hand = (c1 * B1 + c2 * B2) @ (c1 * A1 + c2 * A2)
    torch.testing.assert_close(merge_linear([a, b], [w1, w2])["m"], hand)
    cat = merge_concat([a, b], [w1, w2])["m"]
    torch.testing.assert_close(cat, w1 * 2.0 * B1 @ A1 + w2 * 0.5 * B2 @ A2)
    torch.testing.assert_close(merge_linear([a, b], [w1, w2])["m"] - cat, c1 * c2 * (B1 @ A2 + B2 @ A1))
    with pytest.raises(ConfigError, match="one rank"):
        merge_linear([a, {"m": Factors(torch.randn(3, 5), torch.randn(3, 3), 1.0)}], [0.5, 0.5])


def test_merges_match_peft_add_weighted_adapter(tmp_path):
    from peft import PeftModel

    f1, f2 = lora_factors(_trained_lori(seed=1)), lora_factors(_trained_lori(seed=2))
    export_peft(f1, tmp_path / "a", "tiny-llama")
    export_peft(f2, tmp_path / "b", "tiny-llama")
    peft_model = PeftModel.from_pretrained(load_model("tiny-llama", seed=0), str(tmp_path / "a"), adapter_name="a")
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for kind, ours, layout in (("cat", merge_concat, concat_factors), ("linear", merge_linear, linear_factors)):
        peft_model.add_weighted_adapter(["a", "b"], [0.4, -0.6], f"m_{kind}", combination_type=kind)
        theirs = lora_factors(peft_model, adapter=f"m_{kind}")
        deltas, factors = ours([f1, f2], [0.4, -0.6]), layout([f1, f2], [0.4, -0.6])
        assert set(theirs) == set(deltas) == set(factors)
        for n in deltas:
            torch.testing.assert_close(theirs[n].delta(), deltas[n], rtol=1e-5, atol=1e-6)
            for ours_t, theirs_t in zip(factors[n], theirs[n]):  # same A, B and scale, not just the product
                torch.testing.assert_close(ours_t, theirs_t)


def test_exported_adapter_loads_in_peft_and_reproduces_the_logits(tmp_path):
    from peft import PeftModel

    dense = _trained_lori()
    masks = magnitude_masks(lora_factors(dense), 0.9)
    model = _trained_lori(masks=masks)
    factors = lora_factors(model)
    out = export_peft(factors, tmp_path / "adapter", "tiny-llama", R, 2 * R, SEVEN, masks=masks, seed=0,
                      meta={"task": "math"})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == 2 * R and set(config["target_modules"]) == set(SEVEN)

    peft_model = PeftModel.from_pretrained(load_model("tiny-llama", seed=0), str(out))
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=0, atol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model), _logits(load_model("tiny-llama", seed=0)))
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=0, atol=1e-5)
    assert all(torch.equal(g.A, factors[n].A) and torch.equal(g.B, factors[n].B) for n, g in lora_factors(peft_model).items())

    loaded, loaded_masks, meta = load_factors(out)
    assert meta["variant"] == "lori-s" and meta["seed"] == 0 and meta["rank"] == R and meta["task"] == "math"
    assert meta["sparsity"] == pytest.approx(0.9, abs=1e-3)
    for n, f in factors.items():
        assert torch.equal(loaded[n].A, f.A) and torch.equal(loaded[n].B, f.B) and loaded[n].scale == f.scale
        assert torch.equal(loaded_masks[n], masks[n]) and (loaded[n].B[~masks[n]] == 0).all()


def test_load_factors_fails_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_factors(tmp_path / "absent")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        load_factors(tmp_path / "pickled")
    out = export_peft(lora_factors(_trained_lori(steps=1)), tmp_path / "ok", "tiny-llama")
    (out / "adapter_model.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors") as err:
        load_factors(out)
    assert "\n" not in str(err.value)
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json is not"):
        load_factors(out)


def test_subspace_overlap_is_one_for_the_same_delta_and_small_for_random_ones():
    gen = torch.Generator().manual_seed(0)
    f1 = Factors(torch.randn(4, 300, generator=gen), torch.randn(256, 4, generator=gen), 2.0)
    f2 = Factors(torch.randn(4, 300, generator=gen), torch.randn(256, 4, generator=gen), 2.0)
    assert subspace_overlap(f1.delta(), f1.delta()) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(f1.delta(), 3.0 * f1.delta()) == pytest.approx(1.0, abs=1e-9)
    random = subspace_overlap(f1.delta(), f2.delta())
    assert random < 0.1  # ≈ k/d = 4/256
    assert subspace_overlap(f1, f2) == pytest.approx(random, abs=1e-9)  # from factors, no 256×300 SVD
    assert adapter_overlap({"m": f1, "n": f1}, {"m": f1, "n": f2, "o": f2}) == pytest.approx((1 + random) / 2)
    assert math.isnan(subspace_overlap(torch.zeros(5, 5), f1.delta()[:5, :5]))


def test_per_tensor_clipping_bounds_each_tensor_and_leaves_small_ones_alone():
    params = [torch.zeros(3, 4, requires_grad=True) for _ in range(3)]
    params[0].grad = torch.full((3, 4), 10.0)
    params[1].grad = torch.full((3, 4), 0.01)
    params[2].grad = torch.randn(3, 4) * 5
    small = params[1].grad.clone()
    norms = clip_per_tensor_(params, max_norm=1.0)
    assert norms[0].item() == pytest.approx(math.sqrt(12) * 10)
    assert all(p.grad.norm() <= 1.0 + 1e-6 for p in params)
    assert params[0].grad.norm() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(params[1].grad, small)


def test_remove_lori_restores_the_plain_model_and_bad_arguments_fail():
    model = load_model("tiny-llama", seed=0)
    before = _logits(model)
    layers = add_lori(model, rank=R, alpha=2 * R)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    assert not torch.equal(_logits(model), before)
    remove_lori(model)
    assert not any(isinstance(m, LoRILinear) for m in model.modules())
    assert torch.equal(_logits(model), before)
    with pytest.raises(ConfigError, match="target_modules"):
        add_lori(model, target_modules=["nope"])
    with pytest.raises(ConfigError, match="masks"):
        add_lori(model, rank=R, masks={"model.layers.0.self_attn.q_proj": torch.ones(64, R, dtype=torch.bool)})


def test_low_precision_base_trains_float32_adapters():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRILinear(base, "m", R, 2 * R)
    assert layer.A.dtype == layer.lora_B.dtype == torch.float32
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
