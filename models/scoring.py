"""Log-probabilities of tokens, completions and multiple-choice answers: the one implementation
every study scores with (task accuracy, DPO, canary exposure, guardian probabilities)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the positions of its unpadded self."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits [B, ..., V], targets [B, ...] → float32 [B, ...].

    Gathers the target logit and subtracts a float32 logsumexp computed one batch row at a time, so
    no [B, S, V] log-softmax (or float32 copy of bf16 logits) is ever held (as TRL's selective_log_softmax).
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    norm = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return picked - norm


@dataclass(frozen=True)
class CompletionLogprobs:
    """Per-token log-probs aligned with the targets ``input_ids[:, 1:]``."""

    tokens: torch.Tensor  # [B, S-1] log p(input_ids[:, t+1] | input_ids[:, :t+1]); 0 outside the completion
    mask: torch.Tensor  # [B, S-1] bool, True where a completion token is scored

    @classmethod
    def from_logits(cls, logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> "CompletionLogprobs":
        """From logits already computed (e.g. under an intervention, or reused for argmax accuracy)."""
        mask = completion_mask[:, 1:].bool()
        # where, not a product: logits at padded positions may be non-finite
        return cls(torch.where(mask, token_logprobs(logits[:, :-1], input_ids[:, 1:]), 0.0), mask)

    @property
    def sum(self) -> torch.Tensor:
        """[B] log-likelihood of each completion (multiple choice, DPO)."""
        return self.tokens.sum(-1)

    @property
    def count(self) -> torch.Tensor:
        """[B] completion tokens scored."""
        return self.mask.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        """[B] mean log-prob per completion token (minus the mean loss, e.g. on a canary's secret); 0 if empty."""
        return self.sum / self.count.clamp(min=1)


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, per_sample: bool = False) -> CompletionLogprobs:
    """Log-probs of the completion tokens (``completion_mask`` True, [B, S]) given everything before them.

    Positions come from ``attention_mask``, so a row scores the same under left, right or no padding.
    Gradients flow (DPO, fine-tuning); wrap in ``torch.no_grad()`` to evaluate. The output layer runs
    on the scored positions only: at a 49k–128k vocabulary it is a fifth of the forward pass, and the
    [B, S, V] logits the largest activation, while a response is often a minority of the tokens.
    ``per_sample`` keeps the batch dimension in every layer instead (per-sample gradients, DP-SGD).
    """
    scored = completion_mask.bool() & attention_mask.bool()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    plain = not per_sample and getattr(getattr(base, "config", None), "model_type", None) in PLAIN_HEAD
    decoder = decoder_body(base) if plain else None
    head = base.get_output_embeddings() if decoder is not None else None
    if decoder is None or head is None:
        return CompletionLogprobs.from_logits(model(**kwargs).logits, input_ids, scored)
    hidden = decoder(**kwargs).last_hidden_state
    mask = scored[:, 1:]
    logits = head(hidden[:, :-1][mask])  # [N, V]: the predictions of the scored tokens only
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    picked = token_logprobs(logits.unsqueeze(0), input_ids[:, 1:][mask].unsqueeze(0)).squeeze(0)
    tokens = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return CompletionLogprobs(tokens, mask)


# Families whose logits are exactly ``lm_head(decoder(...))`` (Gemma: then soft-capped); others (a
# logit scale, extra heads) take the full forward.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "olmo2", "phi3", "gpt2"})


def decoder_body(model: nn.Module) -> nn.Module | None:
    """The model without its output layer (``LlamaModel`` of ``LlamaForCausalLM``), where it has one."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        return None
    return decoder if decoder is not None and decoder is not model else None


class MultipleChoice(NamedTuple):
    log_probs: torch.Tensor  # [I, C] log-softmax over each item's choices; -inf where an item has fewer than C
    prediction: torch.Tensor  # [I] index of the most likely choice within its item
    loss: torch.Tensor | None  # [I] cross-entropy of the answer among the choices; None without answers


def multiple_choice(choice_logprobs: torch.Tensor, item_index: torch.Tensor,
                    answers: torch.Tensor | None = None) -> MultipleChoice:
    """Multiple choice by log-likelihood (lm-eval's ``acc``) from summed log-probs per choice [N].

    ``item_index`` [N] names each choice's item; choices are numbered in order of appearance within
    their item, and items may have different numbers of choices.
    """
    n_items = int(item_index.max()) + 1 if answers is None else answers.numel()
    counts = torch.bincount(item_index, minlength=n_items)
    order = torch.argsort(item_index, stable=True)
    slot = torch.empty_like(item_index)
    slot[order] = torch.arange(item_index.numel(), device=item_index.device) - (counts.cumsum(0) - counts)[item_index[order]]
    grid = choice_logprobs.new_full((n_items, int(counts.max())), float("-inf"))
    grid[item_index, slot] = choice_logprobs
    log_probs = grid.log_softmax(-1)
    loss = None if answers is None else F.nll_loss(log_probs, answers, reduction="none")
    return MultipleChoice(log_probs, grid.argmax(-1), loss)
