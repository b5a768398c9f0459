import pytest
import torch

from lantern.errors import ConfigError, LanternError
from lantern.models import completion_logprobs, get_adapter, load_model, load_tokenizer
from lantern.models.generation import Generated, Sampling, generate, render_prompt

from conftest import peaked

PROMPTS = ["the quick brown fox", "a", "hello there, how are you?", "xyz", "jumps over the lazy dog"]
TINY = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


def reference(model, tok, prompt: str, max_new_tokens: int, chat: bool = False) -> list[int]:
    ids = torch.tensor(tok.encode_batch([render_prompt(tok, prompt, chat=chat)]))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", TINY)
def test_greedy_batches_equal_one_by_one_generate(name, tok):
    model = peaked(load_model(name, seed=0))
    expected = [reference(model, tok, p, 10) for p in PROMPTS]
    for batch_size in (2, 16):  # several left-padded batches, and one batch holding everything
        out = generate(model, tok, PROMPTS, Sampling(max_new_tokens=10), chat=False, batch_size=batch_size)
        assert out.tokens == expected  # in the caller's order, though batches are sorted by length
        assert out.finish == ["eos" if t[-1] == tok.eos_token_id else "length" for t in expected]
        assert out.text == [tok.decode(t[:-1] if t[-1] == tok.eos_token_id else t) for t in expected]
        assert out.prompt_tokens == [len(p.encode()) for p in PROMPTS]


def test_chat_layout_and_system_prompt_reach_the_model(llama, tok):
    out = generate(llama, tok, [[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=6), system="be brief")
    ids = torch.tensor(tok.encode_batch(["System: be brief\nUser: hi\nAssistant:"]))
    ref = llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, pad_token_id=256)
    assert out.tokens[0] == ref[0, ids.shape[1]:].tolist()


def test_same_seed_same_samples_and_global_rng_untouched(tok):
    model = load_model("tiny-llama", seed=0)  # near-uniform logits: samples differ between seeds
    rng = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, Sampling(max_new_tokens=12, temperature=1.0, seed=1), chat=False, batch_size=2)
    b = generate(model, tok, PROMPTS, Sampling(max_new_tokens=12, temperature=1.0, seed=1), chat=False, batch_size=2)
    c = generate(model, tok, PROMPTS, Sampling(max_new_tokens=12, temperature=1.0, seed=2), chat=False, batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = generate(model, tok, PROMPTS, Sampling(max_new_tokens=12), chat=False)
    assert a.tokens != greedy.tokens


def test_tiny_top_p_samples_the_greedy_token(llama, tok):
    greedy = generate(llama, tok, PROMPTS, Sampling(max_new_tokens=8), chat=False, batch_size=2)
    nucleus = generate(llama, tok, PROMPTS, Sampling(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=0),
                       chat=False, batch_size=2)
    assert nucleus.tokens == greedy.tokens


def test_stop_string_cuts_text_and_tokens(llama, tok):
    full = generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=24), chat=False)
    row = full.tokens[0]
    j = next(j for j in range(3, 20) if row[j] < 128 and row[j + 1] < 128)  # an ASCII pair decodes to itself
    stop = bytes(row[j:j + 2]).decode()
    start = bytes(row).find(stop.encode())
    out = generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=24, stop=("never", stop)), chat=False)
    assert out.finish[0] == "stop"
    assert out.tokens[0] == row[:start + 2]  # up to the stop string's last token
    assert out.text[0] == tok.decode(row[:start]) and stop not in out.text[0]
    if stop.encode() not in bytes(full.tokens[1]):
        assert out.finish[1] == "length" and out.tokens[1] == full.tokens[1]
    steps = []
    alone = generate(llama, tok, PROMPTS[:1], Sampling(max_new_tokens=24, stop=(stop,)), chat=False,
                     hook=lambda h, step: steps.append(step), hook_layer=0)
    assert alone.tokens[0] == out.tokens[0] and len(steps) == start + 2  # on CPU the loop ends at the stop


def test_eos_ends_its_row_while_the_others_go_on(llama, tok):
    full = generate(llama, tok, PROMPTS, Sampling(max_new_tokens=16), chat=False, eos_token_ids=[])
    others = {t for row in full.tokens[1:] for t in row}
    j, eos = next((j, t) for j, t in enumerate(full.tokens[0]) if j >= 2 and t not in others and t not in full.tokens[0][:j])
    out = generate(llama, tok, PROMPTS, Sampling(max_new_tokens=16, logprobs=True), chat=False, batch_size=2,
                   eos_token_ids=[eos])
    assert out.finish == ["eos"] + ["length"] * (len(PROMPTS) - 1)
    assert out.tokens[0] == full.tokens[0][:j + 1]  # eos is kept in the tokens ...
    assert out.text[0] == tok.decode(full.tokens[0][:j])  # ... and left out of the text
    assert out.tokens[1:] == full.tokens[1:] and len(out.logprobs[0]) == j + 1


def test_logprobs_equal_a_full_forward_pass(tok):
    model = load_model("tiny-qwen2", seed=0)
    out = generate(model, tok, PROMPTS, Sampling(max_new_tokens=7, temperature=1.0, seed=3, logprobs=True),
                   chat=False, batch_size=2)
    for prompt, completion, scores in zip(PROMPTS, out.tokens, out.logprobs):
        ids = torch.tensor([list(prompt.encode()) + completion])
        completion_mask = torch.zeros_like(ids, dtype=torch.bool)
        completion_mask[0, -len(completion):] = True
        with torch.no_grad():
            ref = completion_logprobs(model, ids, torch.ones_like(ids), completion_mask)
        assert len(scores) == len(completion) == 7
        torch.testing.assert_close(torch.tensor(scores), ref.tokens[0][ref.mask[0]], atol=1e-4, rtol=1e-4)
    assert generate(model, tok, PROMPTS[:1], Sampling(max_new_tokens=2), chat=False).logprobs is None


def test_hook_sees_every_step_and_can_steer(llama, tok):
    calls = []

    def record(hidden, step):
        calls.append((step.index, tuple(hidden.shape)))

    base = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=5), chat=False, batch_size=3)
    out = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=5), chat=False, batch_size=3,
                   hook=record, hook_layer=1)
    width = max(len(p) for p in PROMPTS[:3])
    assert calls == [(0, (3, width, 64))] + [(s, (3, 1, 64)) for s in range(1, 5)]
    assert out.tokens == base.tokens
    zero = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=5), chat=False,
                    hook=lambda h, step: h + 0.0, hook_layer=0)
    assert zero.tokens == base.tokens
    push = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 50

    def steer(hidden, step):  # what steering does: add a vector at the last position
        hidden = hidden.clone()
        hidden[:, -1] += push
        return hidden

    steered = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=5), chat=False, hook=steer, hook_layer=0)
    assert steered.tokens != base.tokens
    blocks = get_adapter(llama).blocks(llama)
    assert all(not b._forward_pre_hooks for b in blocks)


def test_hook_is_removed_and_mode_restored_after_an_error(llama, tok):
    def broken(hidden, step):
        raise RuntimeError("boom")

    llama.train()
    with pytest.raises(RuntimeError, match="boom"):
        generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=3), hook=broken, hook_layer=0)
    assert all(not b._forward_pre_hooks for b in get_adapter(llama).blocks(llama))
    assert llama.training and all(m.training for m in llama.modules())
    llama.eval()
    with pytest.raises(LanternError, match=r"hook returned \(2, 5\)"):
        generate(llama, tok, PROMPTS[:2], Sampling(max_new_tokens=3), hook=lambda h, s: torch.zeros(2, 5), hook_layer=0)
    assert not llama.training


def test_hook_accepts_hidden_states_as_keyword():
    from lantern.models.generation import _HookState, _pre_hook

    hook = _pre_hook(lambda h, step: h + 1, _HookState())
    hidden, other = torch.zeros(1, 2, 3), torch.ones(1)
    args, kwargs = hook(None, (), {"hidden_states": hidden, "mask": other})
    assert args == () and torch.equal(kwargs["hidden_states"], hidden + 1) and kwargs["mask"] is other
    args, kwargs = hook(None, (hidden, other), {})
    assert torch.equal(args[0], hidden + 1) and args[1] is other


def test_peft_wrapped_model_generates_like_its_base(llama, tok):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(peaked(load_model("tiny-llama", seed=0)),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: same outputs
    base = generate(llama, tok, PROMPTS[:3], Sampling(max_new_tokens=6), chat=False)
    calls = []
    out = generate(wrapped, tok, PROMPTS[:3], Sampling(max_new_tokens=6), chat=False,
                   hook=lambda h, s: calls.append(s.index), hook_layer=1)
    assert out.tokens == base.tokens and calls == list(range(6))


def test_position_limit_ends_rows_and_long_prompts_fail(tok):
    model = peaked(load_model("tiny-gpt2", seed=0))  # absolute positions: 256 at most
    long, short = "x" * 250, "hi"
    out = generate(model, tok, [long, short], Sampling(max_new_tokens=20), chat=False)
    assert out.finish == ["length", "length"] and [len(t) for t in out.tokens] == [7, 20]
    with pytest.raises(LanternError, match="prompt 1 is 300 tokens long; the model takes at most 256"):
        generate(model, tok, [short, "y" * 300], chat=False)


def test_bad_arguments_fail_in_one_line(llama, tok):
    assert generate(llama, tok, []) == Generated([], [], None, [], [], 0.0)
    for kwargs, match in [
        (dict(max_new_tokens=0), r"sampling.max_new_tokens=0: expected an integer ≥ 1"),
        (dict(temperature=-1.0), r"sampling.temperature=-1.0"),
        (dict(top_p=0.0), r"sampling.top_p=0.0: expected a number in \(0, 1\]"),
        (dict(seed=1.5), r"sampling.seed=1.5"),
        (dict(stop=("",)), r"sampling.stop"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Sampling(**kwargs)
    assert Sampling(stop="\n").stop == ("\n",)
    with pytest.raises(ConfigError, match=r"generate.hook_layer=2: expected a decoder block index in \[0, 1\]"):
        generate(llama, tok, ["a"], hook=lambda h, s: None, hook_layer=2)
    with pytest.raises(ConfigError, match="generate.hook_layer=None"):
        generate(llama, tok, ["a"], hook=lambda h, s: None)
    with pytest.raises(ConfigError, match="generate.prompts"):
        generate(llama, tok, "a single string")
    with pytest.raises(ConfigError, match=r"generate.prompts\[1\]"):
        generate(llama, tok, ["a", ""], chat=False)
    with pytest.raises(ConfigError, match=r"generate.prompts\[0\]=.*a string or a list of"):
        generate(llama, tok, [{"role": "user", "content": "hi"}])  # one conversation, not wrapped in a list
    with pytest.raises(ConfigError, match="generate.batch_size=0"):
        generate(llama, tok, ["a"], batch_size=0)
    with pytest.raises(ConfigError, match="generate.eos_token_ids"):
        generate(llama, tok, ["a"], eos_token_ids=[999])


@pytest.mark.slow
def test_smollm2_chat_batches_equal_one_by_one_generate():
    model, tok = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    prompts = ["What is 2+2?", "Name a colour.", "Say hello to the reader in French, please."]
    eos = model.generation_config.eos_token_id  # what model.generate stops on
    out = generate(model, tok, prompts, Sampling(max_new_tokens=8), batch_size=2,
                   eos_token_ids=[eos] if isinstance(eos, int) else eos)
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == reference(model, tok, prompt, 8, chat=True)
    assert all(text.strip() for text in out.text)
