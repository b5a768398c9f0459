"""Batched text generation for every method that generates and scores (LoRI tasks, ALS, FRIT, judges)."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lantern.errors import ConfigError, LanternError, require
from lantern.models.adapters import get_adapter
from lantern.models.scoring import position_ids

Messages = Sequence[dict]


def render_prompt(tokenizer, prompt: str | Messages, system: str | None = None, chat: bool = True) -> str:
    """The text a model sees before its answer; training (response appended) and generation share it.

    With ``chat`` and a tokenizer that has a chat template, the template with the generation prompt;
    otherwise (byte tokenizer, base models) a plain ``User:``/``Assistant:`` layout, or the bare prompt
    when ``chat`` is False.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if not chat:
        return "\n\n".join(m["content"] for m in messages)
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and getattr(hf, "chat_template", None):
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns + "Assistant:"


def bos_ids(tokenizer, rendered: str) -> list[int]:
    """The BOS a Hugging Face tokenizer adds by default, where the rendered text lacks it.

    Chat templates write their own BOS into the text; a model without one (Gemma-3 base) still
    needs it, or its first token attends to nothing it was trained on.
    """
    hf = getattr(tokenizer, "tokenizer", None)
    bos = getattr(hf, "bos_token_id", None)
    if hf is None or bos is None or rendered.startswith(hf.bos_token or "\x00"):
        return []
    return [bos] if hf("x")["input_ids"][:1] == [bos] else []


def encode_prompts(tokenizer, prompts: Sequence[str | Messages], system: str | None = None,
                   chat: bool = True) -> list[list[int]]:
    """Token ids of each rendered prompt, exactly as ``generate`` feeds them (and training data encodes them)."""
    texts = [render_prompt(tokenizer, p, system, chat) for p in prompts]
    return [bos_ids(tokenizer, t) + row for t, row in zip(texts, tokenizer.encode_batch(texts))]


# ----------------------------------------------------------------------------- sampling settings
@dataclass(frozen=True)
class Sampling:
    """How to pick each token; frozen so one instance can be shared by every call of a study."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept after temperature; 1 = no filtering
    seed: int | None = None  # per-call generator: same seed → same samples; None draws from torch's global RNG
    stop: tuple[str, ...] = ()  # the completion ends before the first of these strings
    # log p of each generated token under the model's own distribution (log-softmax of the raw
    # logits at temperature 1, before top-p), as vLLM reports by default: scores stay comparable
    # across sampling settings.
    logprobs: bool = False

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        require(isinstance(stop, (tuple, list)) and all(isinstance(s, str) and s for s in stop),
                "sampling", "stop", self.stop, "a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                "sampling", "max_new_tokens", self.max_new_tokens, "an integer ≥ 1")
        require(_is_real(self.temperature) and 0 <= self.temperature < math.inf,
                "sampling", "temperature", self.temperature, "a finite number ≥ 0 (0 = greedy)")
        require(_is_real(self.top_p) and 0 < self.top_p <= 1, "sampling", "top_p", self.top_p, "a number in (0, 1]")
        require(self.seed is None or (_is_int(self.seed) and self.seed >= 0),
                "sampling", "seed", self.seed, "None or an integer ≥ 0")
        require(isinstance(self.logprobs, bool), "sampling", "logprobs", self.logprobs, "true or false")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass
class Generated:
    """Completions in the caller's order."""

    text: list[str]  # stop string (and anything after it) and eos removed
    tokens: list[list[int]]  # up to and including eos; cut after a stop string's last token
    logprobs: list[list[float]] | None  # one per token in ``tokens``; None unless Sampling.logprobs
    finish: list[str]  # "eos" | "stop" | "length"
    prompt_tokens: list[int] = field(default_factory=list)  # prompt length in tokens, as the model saw it
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.text)

    @property
    def num_tokens(self) -> int:
        """Generated tokens in all (tokens/s = num_tokens / seconds)."""
        return sum(len(t) for t in self.tokens)


@dataclass
class Step:
    """What a generation hook knows about the forward it sees; rows are the batch's, in batch order."""

    index: int  # 0 = the prefill of this batch; restarts with each batch
    rows: list[int]  # for each batch row, its index in the caller's prompts
    alive: torch.Tensor  # bool [B]: rows still generating (their output at this step is kept)
    last_tokens: torch.Tensor  # long [B]: the token at the last position (the prompt's last at step 0)


Hook = Callable[[torch.Tensor, Step], "torch.Tensor | None"]

_RUNNING, _EOS, _LENGTH, _STOP = 0, 1, 2, 3
_FINISH = {_EOS: "eos", _LENGTH: "length", _STOP: "stop"}


# ----------------------------------------------------------------------------- generation
def generate(model, tokenizer, prompts: Sequence[str | Messages], sampling: Sampling = Sampling(), *,
             chat: bool = True, system: str | None = None, batch_size: int = 16,
             hook: Hook | None = None, hook_layer: int | None = None, transient: bool = False,
             eos_token_ids: Sequence[int] | None = None) -> Generated:
    """Complete every prompt with ``model``: one decode loop that every method shares.

    Prompts are rendered with ``render_prompt``, sorted by length into left-padded batches of
    ``batch_size`` (less padding) and decoded with a KV cache; a row that finished keeps being fed
    a pad token until the whole batch is done. ``eos_token_ids`` defaults to the tokenizer's eos
    and the model's ``generation_config.eos_token_id``; an empty list never ends on eos. A row
    also ends ("length") when the next position would exceed the model's maximum positions.
    With ``hook``, ``hook(hidden, step)`` sees the hidden state entering decoder block
    ``hook_layer`` at every forward ([B, prompt width, d] at step 0, [B, 1, d] after; ``step`` is a
    ``Step``) and may return a replacement. The replacement persists: the KV cache keeps the keys
    and values computed from it. With ``transient`` it does not: blocks ``hook_layer`` onwards
    are run a second time on the unedited states to write the cache, so later steps see what an
    uncached decode that edits only its newest position would (ALS's steering); this costs those
    blocks once more per step. Sampled tokens depend on the seed and on how prompts share a batch.
    """
    if isinstance(prompts, (str, dict)):
        raise ConfigError("generate", "prompts", prompts, "a list of prompts (strings or message lists)")
    require(_is_int(batch_size) and batch_size >= 1, "generate", "batch_size", batch_size, "an integer ≥ 1")
    require(isinstance(sampling, Sampling), "generate", "sampling", sampling, "a Sampling")
    require((hook is None) == (hook_layer is None), "generate", "hook_layer", hook_layer,
            "set together with hook (the decoder block whose input the hook sees)")
    start = time.perf_counter()
    prompts = list(prompts)
    if not prompts:
        return Generated([], [], [] if sampling.logprobs else None, [], [], 0.0)

    for i, prompt in enumerate(prompts):
        ok = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt))
        require(ok, "generate", f"prompts[{i}]", prompt, "a string or a list of {'role': ..., 'content': ...} messages")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    ids = encode_prompts(tokenizer, prompts, system, chat)
    max_positions = context_length(base)
    for i, row in enumerate(ids):
        if not row:
            raise ConfigError("generate", f"prompts[{i}]", prompts[i], "a prompt of at least one token")
        if max_positions is not None and len(row) > max_positions:
            raise LanternError(f"generate: prompt {i} is {len(row)} tokens long; the model takes at most "
                               f"{max_positions} positions")
    vocab = _vocab_size(base, tokenizer)
    eos = _eos_ids(base, tokenizer, eos_token_ids, vocab)
    pad = int(tokenizer.eos_token_id)

    handles = []
    state = _HookState()
    require(isinstance(transient, bool) and (hook is not None or not transient), "generate", "transient", transient,
            "true or false (true only with a hook)")
    if hook is not None:
        blocks = get_adapter(base).blocks(base)
        n_blocks = len(blocks)
        require(_is_int(hook_layer) and -n_blocks <= hook_layer < n_blocks, "generate", "hook_layer", hook_layer,
                f"a decoder block index in [0, {n_blocks - 1}] (or negative, from the end)")
        first = hook_layer % n_blocks
        sliding = [i for i, kind in enumerate(getattr(_text_config(base), "layer_types", None) or []) if "sliding" in kind]
        require(not transient or not any(i >= first for i in sliding), "generate", "hook_layer", hook_layer,
                f"with transient=True, a block from which every later block has full attention (sliding-window caches "
                f"drop positions and cannot be rewound): {max(sliding) + 1}..{n_blocks - 1}" if sliding else "")
        handles.append(blocks[first].register_forward_pre_hook(_pre_hook(hook, state, transient), with_kwargs=True))
        if transient:
            adapter = get_adapter(base)
            handles += [blocks[i].register_forward_hook(_clean_rerun(state, i, i == n_blocks - 1, adapter), with_kwargs=True)
                        for i in range(first, n_blocks)]

    device = next(base.parameters()).device
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    device = embed.weight.device if embed is not None else device  # where input ids go under a device map
    modes = [(m, m.training) for m in model.modules()]
    results: list[tuple | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # longest first: memory trouble shows at once
    try:
        model.eval()
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                chunk = order[lo:lo + batch_size]
                state.rows = chunk
                rows = _generate_batch(model, device, tokenizer, [ids[i] for i in chunk], sampling, eos, pad,
                                       max_positions, _logits_to_keep(base), state)
                for i, row in zip(chunk, rows):
                    results[i] = row
    finally:
        for handle in handles:
            handle.remove()
        state.clean = None
        for module, training in modes:
            module.training = training

    text, tokens, logprobs, finish = (list(x) for x in zip(*results))
    return Generated(text, tokens, logprobs if sampling.logprobs else None, finish,
                     [len(row) for row in ids], time.perf_counter() - start)


class _HookState:
    step: Step | None = None
    rows: list[int] = []
    clean: torch.Tensor | None = None  # the unedited stream while a transient edit is being undone


def _pre_hook(hook: Hook, state: _HookState, transient: bool = False):
    """A forward pre-hook (``with_kwargs``) that hands the block's input to ``hook`` with the step."""

    def pre(module, args, kwargs):
        positional = bool(args)
        hidden = args[0] if positional else kwargs["hidden_states"]
        new = hook(hidden.clone() if transient else hidden, state.step)  # an in-place edit must not reach the rerun
        if new is None:
            return None
        if not isinstance(new, torch.Tensor) or new.shape != hidden.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise LanternError(f"generate: the hook returned {got}; expected None or a tensor of shape {tuple(hidden.shape)}")
        if transient:
            state.clean = hidden
        if positional:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return pre


def _clean_rerun(state: _HookState, index: int, last: bool, adapter):
    """A forward hook (``with_kwargs``) for each block from the hooked one on: after the block ran on the
    edited stream (its output goes on), drop the keys and values it cached for the new positions and
    run it again, hooks bypassed, on the unedited stream, whose output feeds the next block's rerun.
    The last block's output is not needed: where the adapter knows its pre-attention norm, only
    norm and attention run again (the MLP is two thirds of a block)."""

    def post(module, args, kwargs, output):
        if state.clean is None:
            return None
        cache = next((v for v in (*args, *kwargs.values()) if hasattr(v, "layers") and hasattr(v, "crop")), None)
        if cache is None:
            raise LanternError(f"generate: transient=True needs a Hugging Face Cache in the blocks' arguments; "
                               f"{type(module).__name__} got none")
        layer = cache.layers[index]
        if "Sliding" in type(layer).__name__:
            raise LanternError(f"generate: transient=True cannot undo edits in block {index}: its sliding-window "
                               "cache drops old positions; hook a block with full attention")
        layer.crop(-state.clean.shape[1])
        if last and adapter.attn_norm and len(args) <= 1:
            norm, attn = getattr(module, adapter.attn_norm), getattr(module, adapter.attn)
            attn.forward(norm(state.clean), **{k: v for k, v in kwargs.items() if k != "hidden_states"})
            state.clean = None
            return None
        if args:
            clean = module.forward(state.clean, *args[1:], **kwargs)
        else:
            clean = module.forward(**{**kwargs, "hidden_states": state.clean})
        state.clean = None if last else (clean[0] if isinstance(clean, tuple) else clean)
        return None

    return post


def _text_config(model):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model) -> int | None:
    config = _text_config(model)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if _is_int(value) and value > 0:
            return value
    return None


def _vocab_size(model, tokenizer) -> int:
    value = getattr(_text_config(model), "vocab_size", None)
    return value if _is_int(value) else tokenizer.vocab_size


def _eos_ids(model, tokenizer, eos_token_ids, vocab: int) -> list[int]:
    if eos_token_ids is None:
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        configured = [] if configured is None else [configured] if _is_int(configured) else list(configured)
        eos_token_ids = [tokenizer.eos_token_id, *configured]
    eos_token_ids = list(eos_token_ids)
    require(all(_is_int(t) and 0 <= t < vocab for t in eos_token_ids), "generate", "eos_token_ids", eos_token_ids,
            f"token ids in [0, {vocab - 1}]")
    return sorted(set(eos_token_ids))


def _logits_to_keep(model) -> bool:
    """Whether the model computes logits for the last position only when asked (saves [B, S, V] at prefill)."""
    try:
        return "logits_to_keep" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float32 logits [B, V]: argmax, or temperature → top-p → multinomial."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scaled = logits / sampling.temperature
    if sampling.top_p < 1:
        # stable sort: among equal logits the lowest id comes first, as argmax picks it
        ranked, index = scaled.sort(dim=-1, descending=True, stable=True)
        probs = ranked.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # the top token always survives (mass_before 0 < top_p)
        ranked = ranked.masked_fill(mass_before >= sampling.top_p, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, index, ranked)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


def _generate_batch(model, device: torch.device, tokenizer, rows: list[list[int]], sampling: Sampling, eos: list[int], pad: int,
                    max_positions: int | None, logits_to_keep: bool, state: _HookState) -> list[tuple]:
    n, width, max_new = len(rows), max(len(r) for r in rows), sampling.max_new_tokens
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = position_ids(mask)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    # A prompt of L tokens can get max_positions - L + 1 more: the last token is never fed back.
    budget = lengths.new_full((n,), max_new) if max_positions is None else (max_positions - lengths + 1).clamp(max=max_new)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    generator = None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed)

    tokens = torch.full((n, max_new), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new), device=device) if sampling.logprobs else None
    produced = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    code = torch.full((n,), _RUNNING, dtype=torch.int8, device=device)
    # On an accelerator a host sync stalls the queue, so "all finished?" (and the stop-string look at
    # each row's last tokens) happens every few steps; finished rows just emit pad meanwhile.
    sync_every = 1 if device.type == "cpu" else 8
    lookback = max((len(s.encode("utf-8")) for s in sampling.stop), default=0) + 2
    checked = 0

    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    cache, cache_kw = None, "cache"
    feed = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    last_tokens = input_ids[:, -1]
    for step in range(max_new):
        state.step = Step(step, state.rows, ~finished, last_tokens)
        out = model(**feed, **({cache_kw: cache} if cache is not None else {}), use_cache=True, **extra)
        if cache is None:
            cache_kw = next((k for k in ("cache", "past_key_values") if out.get(k) is not None), None)
            if cache_kw is None:
                raise LanternError(f"generate: {type(model).__name__} returned no KV cache with use_cache=True")
            cache = out[cache_kw]
        logits = out.logits[:, -1].float()
        token = _choose(logits, sampling, generator)
        alive = ~finished
        token = torch.where(alive, token, pad)
        tokens[:, step] = token
        if logprobs is not None:
            picked = logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(-1)
            logprobs[:, step] = torch.where(alive, picked, 0.0)
        produced += alive
        hit_eos = alive & torch.isin(token, eos_ids)
        hit_length = alive & ~hit_eos & (produced >= budget)
        code = torch.where(hit_eos, _EOS, torch.where(hit_length, _LENGTH, code)).to(torch.int8)
        finished = finished | hit_eos | hit_length
        if step == max_new - 1:
            break
        if (step + 1) % sync_every == 0:
            if sampling.stop:
                start = max(0, checked - lookback)
                window, done = tokens[:, start:step + 1].tolist(), finished.tolist()
                hits = [r for r in range(n) if not done[r] and _has_stop(tokenizer.decode(window[r]), sampling.stop)]
                checked = step + 1
                if hits:
                    hit = torch.tensor(hits, device=device)
                    finished[hit], code[hit] = True, _STOP
            if bool(finished.all()):
                break
        positions = positions[:, -1:] + 1
        last_tokens = token
        feed = {"input_ids": token[:, None],
                "attention_mask": torch.cat([mask, mask.new_ones((n, 1))], dim=1),
                # rows already finished may run past the last position; their output is ignored
                "position_ids": positions if max_positions is None else positions.clamp(max=max_positions - 1)}
        mask = feed["attention_mask"]

    tokens, produced, code = tokens.tolist(), produced.tolist(), code.tolist()
    logprobs = logprobs.tolist() if logprobs is not None else [[] for _ in range(n)]
    results = []
    for r in range(n):
        row, scores, finish = tokens[r][:produced[r]], logprobs[r][:produced[r]], _FINISH.get(code[r], "length")
        body = row[:-1] if finish == "eos" else row
        cut = _cut_at_stop(tokenizer, body, sampling.stop) if sampling.stop else None
        if cut is not None:
            keep, text = cut
            row, scores, finish = row[:keep], scores[:keep], "stop"
        else:  # a stop seen in a decoded tail but not in the whole text (tokenizer quirk) still ended the row
            text = tokenizer.decode(body)
        results.append((text, row, scores if sampling.logprobs else None, finish))
    return results


def _has_stop(text: str, stops: tuple[str, ...]) -> bool:
    return any(s in text for s in stops)


def _cut_at_stop(tokenizer, row: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(fewest tokens whose text holds a stop string, that text before its first stop) or None.

    Binary search over prefixes: a handful of decodes per stopped row, once, after the loop.
    """
    if not row or not _has_stop(tokenizer.decode(row), stops):
        return None
    lo, hi = 1, len(row)
    while lo < hi:
        mid = (lo + hi) // 2
        if _has_stop(tokenizer.decode(row[:mid]), stops):
            hi = mid
        else:
            lo = mid + 1
    text = tokenizer.decode(row[:lo])
    return lo, text[:min(text.find(s) for s in stops if s in text)]
