import math

import pytest
import torch

from lantern.models import completion_logprobs, load_model, multiple_choice, token_logprobs

PAD = 256


def test_token_logprobs_equal_log_softmax_and_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    logits[0, 0] += 1000.0  # a large shift must not overflow the normalisation
    targets = torch.randint(0, 11, (2, 5), generator=g)
    expected = logits.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logprobs(logits, targets)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)
    half = logits.bfloat16()
    torch.testing.assert_close(token_logprobs(half, targets).double(),
                               half.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1), atol=1e-4, rtol=1e-5)
    assert token_logprobs(half, targets).dtype == torch.float32


def _rows():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 2, 6)]
    completions = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 1, 2)]
    return list(zip(prompts, completions))


def _batch(rows, side):
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    completion = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span] = torch.tensor(p + c)
        attention[i, span] = 1
        completion[i, span] = torch.tensor([False] * len(p) + [True] * len(c))
    return ids, attention, completion


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # relative (RoPE) and absolute positions
def test_left_and_right_padding_score_like_the_unpadded_rows(name):
    model = load_model(name, seed=0)
    rows = _rows()
    with torch.no_grad():
        alone = [completion_logprobs(model, *_batch([row], "right")) for row in rows]
        batched = {side: completion_logprobs(model, *_batch(rows, side)) for side in ("left", "right")}
    for side, out in batched.items():
        for i, (single, (p, c)) in enumerate(zip(alone, rows)):
            scored = out.tokens[i][out.mask[i]]
            assert scored.numel() == len(c) == int(out.count[i])
            torch.testing.assert_close(scored, single.tokens[0][single.mask[0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.sum[i], single.sum[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.mean[i], single.sum[0] / len(c), atol=1e-5, rtol=1e-5)
    assert batched["left"].tokens.isfinite().all()


def test_prompt_tokens_carry_nothing_and_completion_tokens_match_a_hand_computation():
    model = load_model("tiny-llama", seed=0)
    prompt, completion = _rows()[0]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        out = completion_logprobs(model, *_batch([(prompt, completion)], "right"))
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    assert out.tokens.shape == (1, ids.shape[1] - 1)
    assert (out.tokens[0, : len(prompt) - 1] == 0).all() and (out.tokens[0, len(prompt) - 1:] < 0).all()
    hand = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion))
    assert out.sum.item() == pytest.approx(hand, abs=1e-4)
    # the prompt changes the completion's score only through conditioning, never by being scored
    other = [(t + 1) % 256 for t in prompt]
    with torch.no_grad():
        shifted = completion_logprobs(model, *_batch([(other, completion)], "right"))
    assert shifted.count.item() == len(completion) and shifted.sum.item() != pytest.approx(out.sum.item())


def test_multiple_choice_picks_the_most_likely_choice_of_each_item():
    # item 0 has three choices, item 1 two; the rows of the items interleave
    lls = torch.tensor([-3.0, -1.0, -2.0, -0.5, -4.0])
    item = torch.tensor([0, 1, 0, 0, 1])
    mc = multiple_choice(lls, item, answers=torch.tensor([2, 1]))
    assert mc.prediction.tolist() == [2, 0]  # item 0: (-3, -2, -0.5); item 1: (-1, -4)
    lse0, lse1 = math.log(sum(math.exp(x) for x in (-3, -2, -0.5))), math.log(math.exp(-1) + math.exp(-4))
    torch.testing.assert_close(mc.loss, torch.tensor([0.5 + lse0, 4 + lse1]))
    assert mc.log_probs.shape == (2, 3) and mc.log_probs[1, 2] == float("-inf")
    torch.testing.assert_close(mc.log_probs.exp().sum(-1), torch.ones(2))
    assert multiple_choice(lls, item).loss is None


def test_scoring_only_the_completion_positions_equals_the_full_logits_and_trains_an_adapter():
    from peft import LoraConfig, get_peft_model

    from lantern.models import CompletionLogprobs

    model = get_peft_model(load_model("tiny-llama", seed=0), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    ids, attention, completion = _batch(_rows(), "left")
    fast = completion_logprobs(model, ids, attention, completion)
    from lantern.models.scoring import position_ids

    logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
    full = CompletionLogprobs.from_logits(logits, ids, completion.bool() & attention.bool())
    torch.testing.assert_close(fast.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.mask, full.mask)
    fast.sum.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # B starts at zero, so A gets none yet
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
