import pytest
import torch

from callbacks import HeadAblation
from models import MoETransformer, get_adapter, load_model


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
    with pytest.raises(ValueError, match=r"head \(2, 0\) out of range: the model has 2 layers × 4 heads"):
        HeadAblation([(2, 0)]).attach(model)


def test_callback_hooks_live_only_during_a_trainer_stage(corpus, tmp_path):
    import lightning as L

    from datamodules import TextDataModule
    from lightning_modules import MoEPretraining

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
