"""Decoder-only Mixture-of-Experts transformer with TopK and Default MoE routing.

Default MoE (Panda et al., "Dense Backpropagation Improves Training for Sparse
Mixture-of-Experts", arXiv 2504.12463): every non-selected expert contributes its
router probability times a default output Ê_i, an exponential moving average of that
expert's outputs, so ∂L/∂π_i is non-zero for all E experts while only K experts run.

    y = Σ_{i∈TopK} g_i·E_i(x) + Σ_{i∉TopK} π_i·stopgrad(Ê_i)
    Ê_i ← β·Ê_i + (1−β)·mean_{x routed to i} E_i(x)      (training forward passes only)

As in the paper: g_i = π_i, the full-softmax probability (``renormalize`` rescales the
selected ones to sum to 1, an option); Ê starts at 0; each training forward pass first
updates Ê with its own batch, then uses it; β = 0.9 for 8 experts. Choices the notes leave
open, kept as arguments: the EMA target is the plain mean over routed tokens
(``ema_weighting="scored"`` weights it by π_i, the paper's final variant, whose exact
normalisation we could not confirm: Σπ·E(x)/Σπ); an expert that received no token keeps
its default; under data parallelism the per-expert sums and counts are all-reduced, so
every rank holds the same defaults and the load-balancing loss sees the global load
(the paper computes that loss "across nodes").
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lantern.errors import ConfigError, require

RouterMode = Literal["topk", "default"]
EmaWeighting = Literal["mean", "scored"]


class RouterStats(NamedTuple):
    aux_loss: torch.Tensor  # load-balancing loss α·E·Σ f_i·P_i (α applied by the caller)
    z_loss: torch.Tensor  # mean (logsumexp z)²
    counts: torch.Tensor  # [E] tokens dispatched to each expert (this rank)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SwiGLUExperts(nn.Module):
    """E SwiGLU feed-forward networks stored as stacked weights, run with one bmm each."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, init_std: float, out_std: float):
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) * init_std)
        self.w_up = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) * init_std)
        self.w_down = nn.Parameter(torch.randn(n_experts, d_hidden, d_model) * out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [E, C, d] (row e holds the tokens of expert e) → [E, C, d]; zero rows stay zero."""
        h = F.silu(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(h, self.w_down)


class MoEFeedForward(nn.Module):
    """Top-K routed SwiGLU experts with dropless, vectorised dispatch.

    Tokens are sorted by expert and scattered into an [E, C, d] buffer (C = the busiest
    expert's load), so all experts run as one batched matmul; no loop over tokens or experts.
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        n_experts: int,
        top_k: int,
        router_mode: RouterMode = "default",
        ema_beta: float = 0.9,
        renormalize: bool = False,
        ema_weighting: EmaWeighting = "mean",
        init_std: float = 0.02,
        out_std: float = 0.02,
    ):
        super().__init__()
        owner = "MoETransformer"  # the class a recipe configures; this layer is built inside it
        require(n_experts >= 1, owner, "n_experts", n_experts, "≥ 1")
        require(1 <= top_k <= n_experts, owner, "top_k", top_k, f"between 1 and n_experts={n_experts}")
        require(d_expert >= 1, owner, "d_expert", d_expert, "≥ 1 (the hidden width of each expert)")
        require(router_mode in ("topk", "default"), owner, "router_mode", router_mode, "'topk' or 'default'")
        require(0.0 <= ema_beta <= 1.0, owner, "ema_beta", ema_beta, "a number in [0, 1]")
        require(ema_weighting in ("mean", "scored"), owner, "ema_weighting", ema_weighting, "'mean' or 'scored'")
        self.n_experts, self.top_k = n_experts, top_k
        self.router_mode, self.ema_beta, self.renormalize = router_mode, ema_beta, renormalize
        self.ema_weighting = ema_weighting
        self.router = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.router.weight, std=init_std)
        self.experts = SwiGLUExperts(n_experts, d_model, d_expert, init_std, out_std)
        # Ê: a buffer, so it is checkpointed, resumed and moved with the module, never trained.
        self.register_buffer("default_outputs", torch.zeros(n_experts, d_model))
        # Per (token, expert): did the mixture path give ∂L/∂π a non-zero value? Set by a hook.
        self.router_grad_nonzero: torch.Tensor | None = None

    def _record_mix_grad(self, grad: torch.Tensor) -> None:
        self.router_grad_nonzero = grad.detach() != 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, E, K = x.shape[0], self.n_experts, self.top_k

        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(K, dim=-1)  # [T, K]

        # Dropless dispatch: sort the T·K assignments by expert, place each in its expert's row.
        flat_e = top_i.reshape(-1)
        order = flat_e.argsort(stable=True)
        sorted_e = flat_e[order]
        counts = torch.bincount(flat_e, minlength=E)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(flat_e.numel(), device=x.device) - starts[sorted_e]
        capacity = int(counts.max())
        buf = x.new_zeros(E, capacity, x.shape[-1])
        buf[sorted_e, slot] = x[order // K]
        out = self.experts(buf)  # [E, C, d]
        per_assign = torch.empty(flat_e.numel(), x.shape[-1], dtype=out.dtype, device=x.device)
        per_assign[order] = out[sorted_e, slot]
        per_assign = per_assign.view(n_tokens, K, -1)

        global_counts = counts
        if self.training:
            # This batch's statistics, global under data parallelism: the load f_i for the
            # balancing loss and, in default mode, the EMA target. Ê is updated before it is
            # used (the paper's order); eval passes never touch it.
            global_counts = counts.clone()
            stats = [global_counts]
            if self.router_mode == "default":
                weight = torch.zeros(E, capacity, device=x.device, dtype=torch.float32)
                weight[sorted_e, slot] = 1.0 if self.ema_weighting == "mean" else top_p.detach().reshape(-1)[order]
                stats += [torch.einsum("ecd,ec->ed", out.detach().float(), weight), weight.sum(1)]
            if _distributed():
                for t in stats:
                    dist.all_reduce(t)
            if self.router_mode == "default":
                self._update_defaults(stats[1], stats[2], global_counts > 0)

        # The mixture reads π through its own node so the hook sees only the mixture's gradient
        # (the load-balancing loss below gives every π a gradient in either mode).
        mix_probs = probs.clone()
        if mix_probs.requires_grad:
            mix_probs.register_hook(self._record_mix_grad)
        gates = mix_probs.gather(-1, top_i)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        y = (gates.unsqueeze(-1).to(per_assign.dtype) * per_assign).sum(1)
        if self.router_mode == "default":
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_i, True)
            rest = mix_probs.masked_fill(selected, 0.0)
            # A snapshot: the next step's in-place EMA update must not touch a tensor autograd saved.
            y = y + (rest @ self.default_outputs.float().clone()).to(y.dtype)

        load = global_counts.float() / global_counts.sum().clamp(min=1)  # f_i, sums to 1
        aux = E * (load * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y.view(shape).to(x.dtype), RouterStats(aux, z_loss, counts)

    @torch.no_grad()
    def _update_defaults(self, numer: torch.Tensor, denom: torch.Tensor, seen: torch.Tensor) -> None:
        """Ê_i ← β·Ê_i + (1−β)·(weighted) mean output; experts that saw no token keep Ê_i.

        A non-finite mean (a diverging step, which the NaN guard then skips) leaves Ê_i as it was:
        a buffer has no optimizer step to skip, and one NaN would stay in it for good.
        """
        mean = (numer / denom.clamp(min=1e-12).unsqueeze(-1)).to(self.default_outputs.dtype)
        new = self.ema_beta * self.default_outputs + (1.0 - self.ema_beta) * mean
        keep = seen.unsqueeze(-1) & torch.isfinite(new)
        self.default_outputs.copy_(torch.where(keep, new, self.default_outputs))


class DenseFeedForward(nn.Module):
    """SwiGLU FFN; with d_hidden = K·d_expert it has the MoE layer's active parameters."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _rope(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, init_std: float, out_std: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        self.eager = False  # explicit softmax, so hooks on attn_probs see the [B, H, S, S] weights
        self.attn_probs = nn.Identity()  # a hook point, like Hugging Face eager attention's weights

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if self.eager:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            o = self.attn_probs(scores.masked_fill(~causal, float("-inf")).softmax(-1)) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MoEBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, moe: MoEFeedForward, init_std: float, out_std: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, init_std, out_std)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = moe

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h, stats = self.mlp(self.mlp_norm(x))
        return x + h, stats


class MoEOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor  # mean over layers of the load-balancing loss
    z_loss: torch.Tensor  # mean over layers of the router z-loss
    expert_counts: torch.Tensor  # [L, E] tokens per expert in this batch


class MoETransformer(nn.Module):
    """Pre-norm decoder-only transformer (RoPE, SwiGLU) whose every FFN is an MoE layer."""

    model_type = "lantern_moe"  # its entry in lantern.models.adapters

    def __init__(
        self,
        vocab_size: int = 257,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        n_experts: int = 8,
        top_k: int = 2,
        d_expert: int = 256,
        router_mode: RouterMode = "default",
        ema_beta: float = 0.9,
        renormalize: bool = False,
        ema_weighting: EmaWeighting = "mean",
        max_seq_len: int = 256,
        rope_base: float = 10000.0,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
    ):
        """
        Args:
            vocab_size: token ids must lie in [0, vocab_size).
            d_model: residual width.
            n_layers: transformer blocks, each with an MoE feed-forward layer.
            n_heads: attention heads; must divide d_model.
            n_experts: experts per MoE layer (E).
            top_k: experts each token runs through (K ≤ E).
            d_expert: hidden width of each SwiGLU expert.
            router_mode: ``topk`` (baseline) or ``default`` (Default MoE).
            ema_beta: decay β of the default-output EMA.
            renormalize: rescale the selected gates to sum to 1.
            ema_weighting: EMA target per expert: ``mean`` output over its tokens, or ``scored``
                (weighted by the router probability).
            max_seq_len: longest sequence the model accepts.
            rope_base: RoPE frequency base.
            tie_embeddings: share the input embedding with the output head.
            init_std: std of the normal initialisation (output projections scaled by 1/√(2L)).
        """
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_layers", n_layers), ("n_heads", n_heads), ("max_seq_len", max_seq_len)):
            require(value >= 1, self, name, value, "≥ 1")
        require(d_model >= 1 and d_model % n_heads == 0 and (d_model // n_heads) % 2 == 0, self, "d_model", d_model,
                f"a positive multiple of n_heads={n_heads} whose head width d_model/n_heads is even (RoPE)")
        require(rope_base > 0, self, "rope_base", rope_base, "> 0")
        require(init_std > 0, self, "init_std", init_std, "> 0")
        self.vocab_size, self.max_seq_len, self.rope_base = vocab_size, max_seq_len, rope_base
        self.n_layers, self.n_experts = n_layers, n_experts
        out_std = init_std / math.sqrt(2 * n_layers)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.blocks = nn.ModuleList(
            MoEBlock(
                d_model,
                n_heads,
                MoEFeedForward(
                    d_model, d_expert, n_experts, top_k, router_mode, ema_beta, renormalize, ema_weighting, init_std, out_std
                ),
                init_std,
                out_std,
            )
            for _ in range(n_layers)
        )
        self.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=init_std)

    @property
    def attn_implementation(self) -> str:
        return "eager" if self.blocks[0].attn.eager else "sdpa"

    def set_attn_implementation(self, name: str) -> None:
        """``eager`` exposes attention weights at ``blocks.{l}.attn.attn_probs``; ``sdpa`` is faster."""
        require(name in ("eager", "sdpa"), self, "attn_implementation", name, "'eager' or 'sdpa'")
        for block in self.blocks:
            block.attn.eager = name == "eager"

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.mlp for b in self.blocks]

    def forward(self, input_ids: torch.Tensor) -> MoEOutput:
        B, S = input_ids.shape
        if S > self.max_seq_len:
            raise ConfigError(self, "max_seq_len", self.max_seq_len, f"≥ the sequence length {S} it was given")
        cos, sin = _rope(S, self.blocks[0].attn.head_dim, self.rope_base, input_ids.device)
        x = self.embed(input_ids)
        aux, z, counts = [], [], []
        for block in self.blocks:
            x, stats = block(x, cos, sin)
            aux.append(stats.aux_loss)
            z.append(stats.z_loss)
            counts.append(stats.counts)
        logits = self.lm_head(self.norm(x))
        return MoEOutput(logits, torch.stack(aux).mean(), torch.stack(z).mean(), torch.stack(counts))
