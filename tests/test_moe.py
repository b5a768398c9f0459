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
