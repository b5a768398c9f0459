import pytest
import torch
import torch.nn.functional as F

from lantern.models.moe import MoEFeedForward, MoETransformer


def _layer(mode="default", **kw):
    torch.manual_seed(0)
    return MoEFeedForward(d_model=16, d_expert=32, n_experts=6, top_k=2, router_mode=mode, init_std=0.2, **kw)


def _reference(layer: MoEFeedForward, x: torch.Tensor, defaults: torch.Tensor) -> torch.Tensor:
    """Token-by-token, expert-by-expert evaluation of the layer formula."""
    ex = layer.experts
    probs = F.linear(x, layer.router.weight).softmax(-1)
    top_p, top_i = probs.topk(layer.top_k, -1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        gates = top_p[t] / top_p[t].sum() if layer.renormalize else top_p[t]
        for g, e in zip(gates, top_i[t]):
            h = F.silu(x[t] @ ex.w_gate[e]) * (x[t] @ ex.w_up[e])
            out[t] += g * (h @ ex.w_down[e])
        if layer.router_mode == "default":
            for e in range(layer.n_experts):
                if e not in top_i[t]:
                    out[t] += probs[t, e] * defaults[e]
    return out


@pytest.mark.parametrize("mode", ["topk", "default"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_vectorised_dispatch_matches_per_token_reference(mode, renormalize):
    layer = _layer(mode, renormalize=renormalize).eval()
    layer.default_outputs.normal_()
    x = torch.randn(37, 16)
    y, _ = layer(x)
    torch.testing.assert_close(y, _reference(layer, x, layer.default_outputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, nonzero_per_token", [("default", 6), ("topk", 2)])
def test_router_gradient_is_dense_only_in_default_mode(mode, nonzero_per_token):
    layer = _layer(mode).train()
    layer.default_outputs.normal_()  # as after some training
    x = torch.randn(50, 16)
    y, stats = layer(x)
    (y.pow(2).sum() + 0.01 * stats.aux_loss).backward()
    counts = layer.router_grad_nonzero.sum(-1)
    assert torch.equal(counts, torch.full((50,), nonzero_per_token))
    # ...and every router row (expert) got a gradient in both modes through the softmax.
    assert (layer.router.weight.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("weighting", ["mean", "scored"])
def test_ema_update_equals_formula(weighting):
    beta = 0.7
    layer = _layer("default", ema_beta=beta, ema_weighting=weighting).train()
    old = torch.randn(6, 16)
    layer.default_outputs.copy_(old)
    x = torch.randn(40, 16)
    layer(x)
    layer.commit_defaults()
    ex = layer.experts
    probs = F.linear(x, layer.router.weight).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    expected = old.clone()
    for e in range(6):
        rows = [(t, k) for t in range(40) for k in range(2) if top_i[t, k] == e]
        if not rows:
            continue
        outs = torch.stack([(F.silu(x[t] @ ex.w_gate[e]) * (x[t] @ ex.w_up[e])) @ ex.w_down[e] for t, _ in rows])
        w = torch.ones(len(rows)) if weighting == "mean" else torch.stack([top_p[t, k] for t, k in rows])
        target = (w[:, None] * outs).sum(0) / w.sum()
        expected[e] = beta * old[e] + (1 - beta) * target
    torch.testing.assert_close(layer.default_outputs, expected.detach(), atol=1e-5, rtol=1e-5)


def test_expert_without_tokens_keeps_its_default():
    layer = _layer("default").train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 0] = 10.0  # experts 0 and 1 take everything
    x = torch.randn(10, 16)
    x[:, 0] = x[:, 0].abs() + 1
    old = torch.randn(6, 16)
    layer.default_outputs.copy_(old)
    layer(x)
    layer.commit_defaults()
    assert torch.equal(layer.default_outputs[2:], old[2:])
    assert not torch.equal(layer.default_outputs[:2], old[:2])


def test_default_with_beta_one_and_zero_defaults_is_topk():
    x = torch.randn(30, 16)
    default = _layer("default", ema_beta=1.0).train()
    topk = _layer("topk").train()
    topk.load_state_dict(default.state_dict())
    torch.testing.assert_close(default(x)[0], topk(x)[0], rtol=0, atol=0)
    assert default.default_outputs.abs().sum() == 0


def test_defaults_frozen_in_eval_and_saved_in_state_dict():
    layer = _layer("default").train()
    layer(torch.randn(20, 16))
    layer.commit_defaults()
    trained = layer.default_outputs.clone()
    assert trained.abs().sum() > 0
    layer.eval()
    layer(torch.randn(20, 16))
    assert torch.equal(layer.default_outputs, trained)
    fresh = _layer("default")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.default_outputs, trained)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 7}, "top_k=7"),
        ({"top_k": 0}, "top_k=0"),
        ({"router_mode": "soft"}, "router_mode"),
        ({"ema_beta": 1.5}, "ema_beta"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    args = dict(d_model=16, d_expert=32, n_experts=6, top_k=2) | kwargs
    with pytest.raises(ValueError, match=message):
        MoEFeedForward(**args)


def test_transformer_is_causal_and_returns_router_stats():
    torch.manual_seed(0)
    model = MoETransformer(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=32, max_seq_len=16).eval()
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids)
    assert out.logits.shape == (2, 12, 50) and out.expert_counts.shape == (2, 4)
    assert torch.equal(out.expert_counts.sum(-1), torch.full((2,), 2 * 12 * 2))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(model(changed).logits[:, :8], out.logits[:, :8])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_experts=4, top_k=2, d_expert=32, max_seq_len=16, init_std=0.2)
    return MoETransformer(**(args | kw))


def test_training_forward_updates_then_uses_the_defaults():
    # The paper's order within a step: run the experts, update Ê, use the new Ê.
    layer = _layer("default", ema_beta=0.5).train()
    layer.default_outputs.normal_()
    x = torch.randn(30, 16)
    y, _ = layer(x)
    used = layer.defaults_in_use()
    assert not torch.allclose(used, layer.default_outputs)
    torch.testing.assert_close(y, _reference(layer, x, used), atol=1e-5, rtol=1e-5)
    layer.commit_defaults()
    torch.testing.assert_close(layer.default_outputs, used)


@pytest.mark.parametrize("weighting", ["mean", "scored"])
def test_defaults_move_once_per_step_whatever_the_accumulation(weighting):
    x = torch.randn(4 * 24, 16)
    one = _layer("default", ema_weighting=weighting).train()
    one.default_outputs.normal_()
    four = _layer("default", ema_weighting=weighting).train()
    four.load_state_dict(one.state_dict())
    one(x)
    one.commit_defaults()
    for micro in x.split(24):
        four(micro)
    four.commit_defaults()
    torch.testing.assert_close(four.default_outputs, one.default_outputs, atol=1e-6, rtol=1e-5)
    # ...and not four EMA steps: those decay the old Ê by β⁴ instead of β.
    stepwise = _layer("default", ema_weighting=weighting).train()
    stepwise.load_state_dict(one.state_dict())
    for micro in x.split(24):
        stepwise(micro)
        stepwise.commit_defaults()
    assert not torch.allclose(stepwise.default_outputs, one.default_outputs, atol=1e-3)


def test_grouped_matmul_and_per_expert_loop_agree(monkeypatch):
    import lantern.models.moe as moe

    layer = _layer("default").eval()
    layer.default_outputs.normal_()
    x = torch.randn(41, 16, requires_grad=True)  # uneven groups: the padded layout is exercised
    assert moe.grouped_mm_supported(x.device, x.dtype, 16, 32)
    monkeypatch.setattr(moe, "use_grouped_mm", moe.grouped_mm_supported)  # on CPU too
    inputs = (x, *layer.experts.parameters())
    y, _ = layer(x)
    grads = torch.autograd.grad(y.pow(2).sum(), inputs)
    monkeypatch.setattr(moe, "use_grouped_mm", lambda *a: False)
    y2, _ = layer(x)
    grads2 = torch.autograd.grad(y2.pow(2).sum(), inputs)
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients_and_one_ema_update():
    ids = torch.randint(0, 50, (3, 16))
    runs = []
    for ckpt in (False, True):
        model = _tiny(activation_checkpointing=ckpt).train()
        for m in model.moe_layers:
            m.default_outputs.normal_(generator=torch.Generator().manual_seed(1))
        out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + 0.01 * out.aux_loss).backward()
        density = [m.router_grad_nonzero.float().mean() for m in model.moe_layers]
        model.commit_defaults()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                     [m.default_outputs.clone() for m in model.moe_layers], density))
    (l0, g0, d0, r0), (l1, g1, d1, r1) = runs
    torch.testing.assert_close(l1, l0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)
    for a, b in zip(d0, d1):
        torch.testing.assert_close(b, a)  # the rerun added no second copy of the statistics
    assert r0 == r1 == [torch.tensor(1.0)] * 3


def test_chunked_loss_equals_full_cross_entropy():
    model = _tiny(loss_chunk_tokens=7).train()
    ids = torch.randint(0, 50, (2, 16))
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    out = model(ids[:, :-1], labels=labels)
    assert out.logits is None
    (g_chunked,) = torch.autograd.grad(out.loss, model.lm_head.weight)
    model.zero_grad()
    ref_model = _tiny(loss_chunk_tokens=7).train()
    logits = ref_model(ids[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref, ref_model.lm_head.weight)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(g_chunked, g_ref, atol=1e-6, rtol=1e-5)


def test_dense_first_layer_layernorm_and_balancing_loss_summed_over_moe_layers():
    from lantern.models.moe import DenseFeedForward, _rope

    model = _tiny(n_dense_layers=1, norm="layernorm").eval()
    assert isinstance(model.blocks[0].mlp, DenseFeedForward) and len(model.moe_layers) == 2
    assert isinstance(model.norm, torch.nn.LayerNorm)
    ids = torch.randint(0, 50, (2, 16))
    out = model(ids)
    assert out.expert_counts.shape == (2, 4)
    x, (cos, sin) = model.embed(ids), _rope(16, 8, model.rope_base, ids.device)
    per_layer = []
    for block in model.blocks:
        x, stats = block(x, cos, sin)
        if stats is not None:
            per_layer.append(stats.aux_loss)
    torch.testing.assert_close(out.aux_loss, per_layer[0] + per_layer[1])  # each layer at full weight
    with pytest.raises(ValueError, match="n_dense_layers"):
        _tiny(n_dense_layers=4)


def test_paper_8c1_preset_has_the_papers_parameter_counts():
    # 8 experts × 2816, K = 1, dense first layer: 1.96B total, 565M active (paper §4.1).
    with torch.device("meta"):
        model = MoETransformer(vocab_size=128256, d_model=1024, n_layers=24, n_heads=16, n_experts=8, top_k=1,
                               d_expert=2816, max_seq_len=2048, tie_embeddings=False, n_dense_layers=1, norm="layernorm")
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * 1024 * 2816
    active = total - 23 * 7 * expert  # each MoE layer runs 1 of its 8 experts
    assert round(total / 1e9, 2) == 1.96
    assert 0.56e9 < active < 0.58e9


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_grouped_matmul_matches_the_loop_in_bf16(monkeypatch):
    import lantern.models.moe as moe

    torch.manual_seed(0)
    layer = MoEFeedForward(d_model=256, d_expert=512, n_experts=8, top_k=2, init_std=0.05).cuda().eval()
    layer.default_outputs.normal_()
    x = torch.randn(4096, 256, device="cuda", requires_grad=True)
    assert moe.grouped_mm_supported(x.device, torch.bfloat16, 256, 512)
    x = x[:4093]  # uneven groups: the 16-byte-aligned padding is exercised
    results = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(moe, "use_grouped_mm", lambda *a: False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x)
        grads = torch.autograd.grad(y.float().pow(2).mean(), (x, *layer.experts.parameters()))
        results.append((y.float(), *grads))
    for a, b in zip(*results):  # bf16: compare as a relative error of the whole tensor
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


@cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_training_step_has_no_host_sync(checkpointing):
    model = _tiny(activation_checkpointing=checkpointing, d_model=64, d_expert=64, n_experts=8).cuda().train()
    ids = torch.randint(0, 50, (4, 16), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + 0.01 * out.aux_loss).backward()
        model.commit_defaults()

    step()  # warm-up: allocations, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(m.default_outputs.abs().sum() > 0 for m in model.moe_layers)
