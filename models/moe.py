"""Decoder-only Mixture-of-Experts transformer with TopK and Default MoE routing.

Default MoE (Panda et al., "Dense Backpropagation Improves Training for Sparse
Mixture-of-Experts", arXiv 2504.12463): every non-selected expert contributes its
router probability times a default output Ê_i, an exponential moving average of that
expert's outputs, so ∂L/∂π_i is non-zero for all E experts while only K experts run.

    y = Σ_{i∈TopK} π_i·E_i(x) + Σ_{i∉TopK} π_i·stopgrad(Ê_i)
    Ê_i ← β·Ê_i + (1−β)·mean_{x routed to i} E_i(x)      (once per optimizer step)

As in the paper: the gates are π_i themselves (``renormalize`` rescales the selected ones to
sum to 1, an option); Ê starts at 0; β = 0.9 for 8 experts; the first ``n_dense_layers``
layers are ordinary FFNs; the balancing loss is summed over MoE layers. Ê moves once per
optimizer step on the whole step's tokens: each training forward adds its expert sums to a
pending total and uses β·Ê + (1−β)·(pending mean) — with one micro-batch per step exactly the
paper's "update, then use" — and ``commit_defaults()`` makes that the new Ê after the
optimizer step, so k micro-batches of b give the Ê of one batch of k·b. ``ema_weighting=
"scored"`` weights each token by π_i (the paper's final variant; its normalisation is not
given, we use Σπ·E(x)/Σπ). An expert that received no token keeps its default. Under data
parallelism the sums and counts are all-reduced, so every rank holds the same defaults and
the balancing loss sees the global load.

Dispatch sorts the T·K assignments by expert and runs all experts as one grouped matmul
(``torch.nn.functional.grouped_mm``) on GPUs: no device→host sync, and padding of at most 16
bytes' worth of rows per expert, whatever the load imbalance. On CPU (faster there) and where the
build has no grouped matmul for the dtype, a loop over experts runs contiguous slices instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lantern.errors import ConfigError, require

RouterMode = Literal["topk", "default"]
EmaWeighting = Literal["mean", "scored"]
NormKind = Literal["rmsnorm", "layernorm"]

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class RouterStats(NamedTuple):
    aux_loss: torch.Tensor  # load-balancing loss E·Σ f_i·P_i (α applied by the caller)
    z_loss: torch.Tensor  # mean (logsumexp z)²
    counts: torch.Tensor  # [E] tokens dispatched to each expert (this rank)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul here (grouped matmuls are not autocast ops)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether this build runs a grouped matmul for these operands (rows must be 16-byte aligned)."""
    if _grouped_mm is None or any(d * torch.finfo(dtype).bits // 8 % 16 for d in dims):
        return False
    if device.type == "cuda":
        need = (8, 0) if hasattr(F, "grouped_mm") else (9, 0)
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= need
    return device.type == "cpu" and dtype == torch.float32


def use_grouped_mm(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Grouped matmul on GPUs; on CPU the per-expert loop is faster, and its host sync is free."""
    return device.type == "cuda" and grouped_mm_supported(device, dtype, *dims)


class SwiGLUExperts(nn.Module):
    """E SwiGLU feed-forward networks stored as stacked weights."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, init_std: float, out_std: float):
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) * init_std)
        self.w_up = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) * init_std)
        self.w_down = nn.Parameter(torch.randn(n_experts, d_hidden, d_model) * out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, d], rows sorted by expert, ``counts[e]`` rows for expert e → [N, d]."""
        dtype = _compute_dtype(x)
        w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
        x = x.to(dtype)
        E, d, f = self.w_gate.shape
        if use_grouped_mm(x.device, dtype, d, f):
            # Each expert's rows start 16-byte aligned (the weight gradient's grouped matmul reads
            # them along its contraction dimension), so groups are padded to a multiple of
            # `align` rows, in a buffer of static size: no host sync to size it.
            align = 16 // x.element_size()
            padded = (counts + align - 1) // align * align
            ends = padded.cumsum(0)
            starts_sorted = counts.cumsum(0) - counts
            rows = torch.arange(x.shape[0], device=x.device)
            expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])
            dest = (ends - padded)[expert] + rows - starts_sorted[expert]
            buf = x.new_zeros(x.shape[0] + E * (align - 1), d).index_copy(0, dest, x)
            offs = ends.to(torch.int32)
            h = F.silu(_grouped_mm(buf, w_gate, offs=offs)) * _grouped_mm(buf, w_up, offs=offs)
            return _grouped_mm(h, w_down, offs=offs)[dest]
        parts = []  # contiguous slices, one matmul each per expert (their sizes cost one host sync)
        for e, rows in enumerate(x.split(counts.tolist())):
            parts.append((F.silu(rows @ w_gate[e]) * (rows @ w_up[e])) @ w_down[e])
        return torch.cat(parts)


class MoEFeedForward(nn.Module):
    """Top-K routed SwiGLU experts with dropless, sorted dispatch (no loop over tokens)."""

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
        # This optimizer step's expert sums [:, :d] and weights [:, d] so far (empty between steps).
        self.register_buffer("pending", torch.zeros(n_experts, d_model + 1), persistent=False)
        # Per (token, expert): did the mixture path give ∂L/∂π a non-zero value? Set by a hook.
        self.router_grad_nonzero: torch.Tensor | None = None
        # Detached: |default term| / |layer output|, averaged over tokens (training passes).
        self.default_share: torch.Tensor | None = None
        self.selected_mass: torch.Tensor | None = None
        self._recomputing = False  # inside activation checkpointing's recompute
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None  # (global counts, Ê used)

    def _record_mix_grad(self, grad: torch.Tensor) -> None:
        self.router_grad_nonzero = grad.detach() != 0

    @contextlib.contextmanager
    def recomputing(self):
        """Activation checkpointing reruns the forward: it must see the same statistics, not add them twice."""
        self._recomputing = True
        try:
            yield
        finally:
            self._recomputing = False

    def defaults_in_use(self) -> torch.Tensor:
        """β·Ê + (1−β)·(this step's mean so far) where an expert saw tokens, else Ê."""
        d = self.default_outputs.shape[-1]
        numer, denom = self.pending[:, :d], self.pending[:, d]
        new = self.ema_beta * self.default_outputs + (1.0 - self.ema_beta) * numer / denom.clamp(min=1e-12).unsqueeze(-1)
        # A non-finite mean (a diverging step) leaves Ê_i as it was: one NaN would stay for good.
        keep = (denom > 0).unsqueeze(-1) & torch.isfinite(new)
        return torch.where(keep, new, self.default_outputs)

    @torch.no_grad()
    def commit_defaults(self) -> None:
        """End of an optimizer step: the step's defaults become Ê; no-op without pending tokens."""
        self.default_outputs.copy_(self.defaults_in_use())
        self.pending.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, E, K = x.shape[0], self.n_experts, self.top_k

        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(K, dim=-1)  # [T, K]

        # Dropless dispatch: the T·K assignments sorted by expert, run as one grouped matmul.
        flat_e = top_i.reshape(-1)
        order = flat_e.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        out = self.experts(x[order // K], counts)  # [T·K, d], sorted
        per_assign = torch.empty_like(out)
        per_assign[order] = out
        per_assign = per_assign.view(n_tokens, K, -1)

        global_counts, defaults = counts, self.default_outputs
        if self.training and self._recomputing:
            global_counts, defaults = self._saved
        elif self.training:
            # This batch's statistics, global under data parallelism: the load f_i for the
            # balancing loss and, in default mode, the expert sums for Ê, used at once.
            if self.router_mode == "default":
                w = torch.ones_like(top_p) if self.ema_weighting == "mean" else top_p.detach()
                experts = torch.arange(E, device=x.device).unsqueeze(1)
                assign = (flat_e == experts).to(torch.float32) * w.reshape(-1)  # [E, T·K], token order
                with torch.autocast(device_type=x.device.type, enabled=False):  # sums in fp32
                    sums = assign @ per_assign.detach().reshape(n_tokens * K, -1).float()
                stats = torch.cat([sums, assign.sum(1, keepdim=True), counts.unsqueeze(1).float()], dim=1)
            else:
                stats = counts.unsqueeze(1).float()
            if _distributed():
                dist.all_reduce(stats)
            global_counts = stats[:, -1]
            if self.router_mode == "default":
                self.pending += stats[:, :-1]
                defaults = self.defaults_in_use()
            self._saved = (global_counts, defaults)

        # The mixture reads π through its own node so the hook sees only the mixture's gradient
        # (the load-balancing loss below gives every π a gradient in either mode).
        mix_probs = probs.clone()
        if mix_probs.requires_grad and not self._recomputing:
            mix_probs.register_hook(self._record_mix_grad)
        gates = mix_probs.gather(-1, top_i)
        if self.training and not self._recomputing:
            self.selected_mass = top_p.detach().sum(-1).mean()  # Σ_{i∈TopK} π_i: how sure the router is
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        y = (gates.to(per_assign.dtype).unsqueeze(-1) * per_assign).sum(1)  # not a bmm: [T] tiny matmuls are slow
        if self.router_mode == "default":
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_i, True)
            rest = mix_probs.masked_fill(selected, 0.0)
            # A snapshot: the commit's in-place update must not touch a tensor autograd saved.
            default_term = rest @ defaults.float().clone()
            if self.training and not self._recomputing:
                with torch.no_grad():
                    total = y.float() + default_term
                    self.default_share = (default_term.norm(dim=-1) / total.norm(dim=-1).clamp(min=1e-12)).mean()
            y = y + default_term.to(y.dtype)

        load = global_counts.float() / global_counts.sum().clamp(min=1)  # f_i, sums to 1
        aux = E * (load * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y.view(shape).to(x.dtype), RouterStats(aux, z_loss, counts)


class DenseFeedForward(nn.Module):
    """SwiGLU FFN: the paper's dense first layer, and the dense reference in benchmarks."""

    def __init__(self, d_model: int, d_hidden: int, init_std: float | None = None, out_std: float | None = None):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        if init_std is not None:
            nn.init.normal_(self.gate.weight, std=init_std)
            nn.init.normal_(self.up.weight, std=init_std)
            nn.init.normal_(self.down.weight, std=out_std if out_std is not None else init_std)

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


def _norm(kind: NormKind, d_model: int) -> nn.Module:
    return nn.LayerNorm(d_model) if kind == "layernorm" else nn.RMSNorm(d_model)


class MoEBlock(nn.Module):
    """Pre-norm block; ``mlp`` is an MoE layer (returns its router stats) or a dense FFN."""

    def __init__(self, d_model: int, n_heads: int, mlp: nn.Module, init_std: float, out_std: float, norm: NormKind = "rmsnorm"):
        super().__init__()
        self.attn_norm = _norm(norm, d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, init_std, out_std)
        self.mlp_norm = _norm(norm, d_model)
        self.mlp = mlp

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        out = self.mlp(self.mlp_norm(x))
        h, stats = out if isinstance(self.mlp, MoEFeedForward) else (out, None)
        return x + h, stats

    def recompute_contexts(self):
        """``context_fn`` for non-reentrant checkpointing: flag the rerun to the MoE layer."""
        rerun = self.mlp.recomputing() if isinstance(self.mlp, MoEFeedForward) else contextlib.nullcontext()
        return contextlib.nullcontext(), rerun


class MoEOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, S, V]; None when the loss was computed from labels
    aux_loss: torch.Tensor  # load-balancing loss summed over MoE layers
    z_loss: torch.Tensor  # router z-loss summed over MoE layers
    expert_counts: torch.Tensor  # [L_moe, E] tokens per expert in this batch
    loss: torch.Tensor | None = None  # mean next-token cross-entropy, when labels were given


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``labels`` (−100 ignored).

    Chunks of ``chunk`` tokens, each recomputed in backward: at vocabulary 128k the fp32 logits
    of a 16×2048 micro-batch alone would take 17 GB.
    """
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, h, weight, y, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _ce_sum(h, weight, y)
    return total / (labels != -100).sum().clamp(min=1)


def _ce_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), labels, reduction="sum", ignore_index=-100)


class MoETransformer(nn.Module):
    """Pre-norm decoder-only transformer (RoPE, SwiGLU) with MoE feed-forward layers."""

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
        n_dense_layers: int = 0,
        d_dense: int | None = None,
        norm: NormKind = "rmsnorm",
        activation_checkpointing: bool = False,
        loss_chunk_tokens: int | None = None,
    ):
        """
        Args:
            vocab_size: token ids must lie in [0, vocab_size).
            d_model: residual width.
            n_layers: transformer blocks.
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
            n_dense_layers: the first layers use a dense SwiGLU FFN instead of MoE (the paper: 1).
            d_dense: hidden width of those dense FFNs (default d_expert, which reproduces the
                paper's 1.96B total / 565M active parameters for 8c1).
            norm: ``rmsnorm`` or ``layernorm`` (the paper's).
            activation_checkpointing: recompute each block in backward instead of keeping its
                activations (the paper-size micro-batch of 16×2048 needs it in 80 GiB).
            loss_chunk_tokens: tokens per chunk of the cross-entropy given ``labels`` (default:
                about 1 GiB of fp32 logits per chunk).
        """
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_layers", n_layers), ("n_heads", n_heads), ("max_seq_len", max_seq_len)):
            require(value >= 1, self, name, value, "≥ 1")
        require(d_model >= 1 and d_model % n_heads == 0 and (d_model // n_heads) % 2 == 0, self, "d_model", d_model,
                f"a positive multiple of n_heads={n_heads} whose head width d_model/n_heads is even (RoPE)")
        require(rope_base > 0, self, "rope_base", rope_base, "> 0")
        require(init_std > 0, self, "init_std", init_std, "> 0")
        require(0 <= n_dense_layers <= n_layers, self, "n_dense_layers", n_dense_layers, f"between 0 and n_layers={n_layers}")
        require(d_dense is None or d_dense >= 1, self, "d_dense", d_dense, "≥ 1, or null for d_expert")
        require(norm in ("rmsnorm", "layernorm"), self, "norm", norm, "'rmsnorm' or 'layernorm'")
        require(loss_chunk_tokens is None or loss_chunk_tokens >= 1, self, "loss_chunk_tokens", loss_chunk_tokens, "≥ 1, or null")
        self.vocab_size, self.max_seq_len, self.rope_base = vocab_size, max_seq_len, rope_base
        self.n_layers, self.n_experts = n_layers, n_experts
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens or max(1, (1 << 28) // vocab_size)
        out_std = init_std / math.sqrt(2 * n_layers)

        def mlp(layer: int) -> nn.Module:
            if layer < n_dense_layers:
                return DenseFeedForward(d_model, d_dense or d_expert, init_std, out_std)
            return MoEFeedForward(d_model, d_expert, n_experts, top_k, router_mode, ema_beta, renormalize, ema_weighting, init_std, out_std)

        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.blocks = nn.ModuleList(MoEBlock(d_model, n_heads, mlp(i), init_std, out_std, norm) for i in range(n_layers))
        self.norm = _norm(norm, d_model)
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
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoEFeedForward)]

    def commit_defaults(self) -> None:
        """Call once after each optimizer step: moves every MoE layer's Ê to this step's value."""
        for layer in self.moe_layers:
            layer.commit_defaults()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> MoEOutput:
        B, S = input_ids.shape
        if S > self.max_seq_len:
            raise ConfigError(self, "max_seq_len", self.max_seq_len, f"≥ the sequence length {S} it was given")
        cos, sin = _rope(S, self.blocks[0].attn.head_dim, self.rope_base, input_ids.device)
        x = self.embed(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        aux, z, counts = [], [], []
        for block in self.blocks:
            if recompute:
                x, stats = checkpoint(block, x, cos, sin, use_reentrant=False, preserve_rng_state=False,  # no dropout
                                      context_fn=block.recompute_contexts)
            else:
                x, stats = block(x, cos, sin)
            if stats is not None:
                aux.append(stats.aux_loss)
                z.append(stats.z_loss)
                counts.append(stats.counts)
        zero = x.new_zeros((), dtype=torch.float32)
        aux_loss, z_loss = (torch.stack(aux).sum(), torch.stack(z).sum()) if aux else (zero, zero)
        expert_counts = torch.stack(counts) if counts else torch.zeros(0, self.n_experts, dtype=torch.long, device=x.device)
        hidden = self.norm(x)
        if labels is None:
            return MoEOutput(self.lm_head(hidden), aux_loss, z_loss, expert_counts)
        loss = lm_loss(hidden, self.lm_head.weight, labels, self.loss_chunk_tokens)
        return MoEOutput(None, aux_loss, z_loss, expert_counts, loss)
