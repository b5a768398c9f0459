import pytest
import torch
from torch import nn

from lantern.models import ModelLoadError, UnsupportedArchitecture, get_adapter, load_model, load_tokenizer
from lantern.models.loading import cache_root


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_adapter_finds_blocks_and_per_head_o_proj_input(name):
    model = load_model(name, seed=0)
    adapter = get_adapter(model)
    assert adapter.num_layers(model) == 2
    seen = {}
    handle = adapter.out_proj(model, 1).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert seen["x"].shape == (2, 7, adapter.num_heads(model) * adapter.head_dim(model))
    assert isinstance(adapter.feed_forward(model, 0), nn.Module)
    assert adapter.attention(model, 0) is not None


def test_moe_transformer_has_an_adapter():
    from lantern.models import MoETransformer

    model = MoETransformer(n_layers=3)
    adapter = get_adapter(model)
    assert adapter.num_layers(model) == 3 and adapter.num_heads(model) == 4 and adapter.head_dim(model) == 32


def test_unknown_family_fails_with_the_supported_list():
    with pytest.raises(UnsupportedArchitecture, match=r"model_type=None .*supported: .*llama"):
        get_adapter(nn.Linear(2, 2))


def test_tiny_models_are_seeded_and_share_the_byte_tokenizer():
    a, b = load_model("tiny-llama", seed=1), load_model("tiny-llama", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    tok = load_tokenizer("tiny-llama")
    assert tok.vocab_size == a.config.vocab_size and tok.decode(tok.encode_batch(["héllo"])[0]) == "héllo"


def test_missing_local_path_and_unreachable_hub_id(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(str(tmp_path / "absent-model"))
    with pytest.raises(ModelLoadError, match=r"hub has no cached copy.*smollm2-135m-instruct"):
        load_model("lantern-test/no-such-model", local_files_only=True)


@pytest.mark.slow
def test_embedded_smollm2_loads_caches_and_answers():
    model = load_model("smollm2-135m-instruct")  # the first load in a session de-quantises the GGUF
    tok = load_tokenizer("smollm2-135m-instruct")
    cached = list((cache_root() / "models").glob("smollm2-135m-instruct-*/model.safetensors"))
    assert len(cached) == 1
    assert get_adapter(model).num_layers(model) == 30 and get_adapter(model).num_heads(model) == 9

    hf = tok.tokenizer
    prompt = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    tokenize=False, add_generation_prompt=True)
    ids = hf(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in hf.decode(out[0, ids["input_ids"].shape[1]:])

    written = cached[0].stat().st_mtime_ns
    again = load_model("smollm2-135m-instruct")  # the safetensors copy, not a second de-quantisation
    assert cached[0].stat().st_mtime_ns == written and len(list(cached[0].parent.parent.iterdir())) == 1
    assert getattr(again.config, "quantization_config", None) is None
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits)
