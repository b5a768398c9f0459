"""Record, sparsify and transfer the self-attention maps of a video diffusion transformer.

The attention study of arXiv 2504.10317 ("analysis of attention in video diffusion
transformers") asks four questions of softmax(q·kᵀ·scale) over the flattened (frame, h, w)
tokens: how similar are the maps across prompts, can a prompt's maps be transplanted into
another generation (editing), how many of the weights can be zeroed per query row, and which
key columns act as sinks. A full map of a real video DiT is tens of GB per layer, so this
module computes *reductions* inside a diffusers attention processor, a chunk of query rows at
a time: per-head column mass (sinks), the mass captured by the top-p% keys (sparsity profile)
and a seeded sample of query rows (cross-prompt structure similarity).

``VDiTAttention`` holds the settings and the results; ``applied(transformer)`` swaps in one
processor per attention layer via ``set_attn_processor`` and restores the originals on exit.
A processor family contributes only the q/k/v preparation and the output projection (CogVideoX
now; Mochi/Hunyuan/Wan add a ``VDiTAttnProcessor`` subclass and a ``FAMILIES`` entry). With no
feature active in a layer the processor calls the same ``F.scaled_dot_product_attention`` as
the stock one, so its output is bit-identical; sparsification and map transfer compute the
softmax explicitly (in float32).

Two choices to know when reading the numbers: CogVideoX attends over its text and video tokens
jointly, and the maps here span that joint sequence (the ⌊k·n⌋ count, the sinks and the
similarity include the text tokens); in a layer whose maps are substituted, the recorded
reductions describe the layer's own map, not the substituted one it used.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lantern.errors import require

LayerSpec = Sequence[int] | Literal["all"]


def n_zeroed(k: float, n: int) -> int:
    """⌊k·n⌋, robust to float error (0.29·100 is 28.999… in binary)."""
    return math.floor(k * n + 1e-9)


def n_top(p: float, n: int) -> int:
    """⌈p·n⌉ keys, at least one: the complement of ``n_zeroed(1 - p, n)``."""
    return max(1, math.ceil(p * n - 1e-9))


def sparsify_rows(probs: torch.Tensor, k: float, renormalize: bool = False) -> torch.Tensor:
    """Zero exactly ⌊k·n⌋ of the smallest weights of every row of ``probs [..., n]``.

    ``topk`` picks exactly that many indices even among ties, so the count is exact.
    """
    m = n_zeroed(k, probs.shape[-1])
    if m == 0:
        return probs
    out = probs.scatter(-1, probs.topk(m, dim=-1, largest=False).indices, 0.0)
    if renormalize:
        out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


@dataclass
class AttentionReduction:
    """What one attention call left behind for one layer (shapes per batch element b, head h).

    Attributes:
        column_mass: ``[B, H, K]`` mass each key column receives, averaged over query rows.
        sink_mass: ``[B, H]`` summed column mass of the ``sink_top_k`` heaviest columns.
        sink_columns: ``[B, H, sink_top_k]`` their key indices.
        top_p: the key fractions of ``sparsity_profile``.
        sparsity_profile: ``[B, H, len(top_p)]`` mean over rows of the mass in the top ⌈p·K⌉ keys.
        sample_rows: ``[S]`` the sampled query rows (the same for every prompt of the same length).
        samples: ``[B, H, S, K]`` those rows of the map.
    """

    column_mass: torch.Tensor
    sink_mass: torch.Tensor
    sink_columns: torch.Tensor
    top_p: tuple[float, ...]
    sparsity_profile: torch.Tensor
    sample_rows: torch.Tensor
    samples: torch.Tensor

    def sinks(self, threshold: float) -> list[tuple[int, int, int, float]]:
        """(batch, head, key, mass) of every key column whose mean mass is ≥ ``threshold``."""
        hits = (self.column_mass >= threshold).nonzero().tolist()
        return [(b, h, j, float(self.column_mass[b, h, j])) for b, h, j in hits]


class MapReducer:
    """Accumulates the reductions of one map ``[B, H, Q, K]`` fed a chunk of query rows at a time."""

    def __init__(self, batch: int, heads: int, queries: int, keys: int, top_p: Sequence[float],
                 sample_rows: torch.Tensor, device: torch.device | str = "cpu"):
        self.queries, self.top_p = queries, tuple(top_p)
        self.sample_rows = sample_rows.cpu()
        self.col_sum = torch.zeros(batch, heads, keys, dtype=torch.float64, device=device)
        self.profile_sum = torch.zeros(batch, heads, len(self.top_p), dtype=torch.float64, device=device)
        self.samples = torch.zeros(batch, heads, len(sample_rows), keys, dtype=torch.float32)
        self._profile_idx = torch.tensor([n_top(p, keys) - 1 for p in self.top_p], device=device)
        self._seen = 0

    def update(self, probs: torch.Tensor, row_start: int) -> None:
        """Add rows ``row_start … row_start + probs.shape[-2]`` of the map (float32 probabilities)."""
        rows = probs.shape[-2]
        self.col_sum += probs.sum(-2, dtype=torch.float64)
        cum = probs.sort(-1, descending=True).values.cumsum(-1)
        self.profile_sum += cum.index_select(-1, self._profile_idx.to(cum.device)).sum(-2, dtype=torch.float64)
        hit = (self.sample_rows >= row_start) & (self.sample_rows < row_start + rows)
        if hit.any():
            local = (self.sample_rows[hit] - row_start).to(probs.device)
            self.samples[:, :, hit] = probs.index_select(-2, local).float().cpu()
        self._seen += rows

    def result(self, sink_top_k: int) -> AttentionReduction:
        if self._seen != self.queries:
            raise RuntimeError(f"MapReducer saw {self._seen} of {self.queries} query rows")
        column_mass = (self.col_sum / self.queries).float().cpu()
        top = column_mass.topk(min(sink_top_k, column_mass.shape[-1]), dim=-1)
        return AttentionReduction(
            column_mass=column_mass, sink_mass=top.values.sum(-1), sink_columns=top.indices,
            top_p=self.top_p, sparsity_profile=(self.profile_sum / self.queries).float().cpu(),
            sample_rows=self.sample_rows, samples=self.samples,
        )


def reduce_attention(probs: torch.Tensor, top_p: Sequence[float] = (0.1,), sample_rows: torch.Tensor | None = None,
                     sink_top_k: int = 1) -> AttentionReduction:
    """The reductions of a full map ``[B, H, Q, K]`` in one go (tests, small maps)."""
    b, h, q, k = probs.shape
    rows = torch.arange(0) if sample_rows is None else sample_rows
    reducer = MapReducer(b, h, q, k, top_p, rows, device=probs.device)
    reducer.update(probs.float(), 0)
    return reducer.result(sink_top_k)


def structure_similarity(a: AttentionReduction, b: AttentionReduction) -> torch.Tensor:
    """Pearson correlation ``[B, H]`` of the sampled rows of two maps (the same rows, two prompts);
    0 where one of them is constant (a uniform map has no structure to correlate)."""
    if not torch.equal(a.sample_rows, b.sample_rows) or a.samples.shape != b.samples.shape:
        raise ValueError("structure_similarity needs maps of the same length sampled at the same query rows")
    x, y = a.samples.flatten(2).double(), b.samples.flatten(2).double()
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-30)).float()


@dataclass
class SparsityError:
    """Relative error ‖O_k − O‖/‖O‖ of a layer's attention output (heads concatenated, before ``to_out``)."""

    relative: float
    per_head: torch.Tensor  # [H], each head's own relative error


class VDiTAttnProcessor:
    """Base processor: a family prepares q/k/v and projects the output; the attention goes through
    ``VDiTAttention._attend`` (maps, reductions, sparsity, transfer)."""

    def __init__(self, control: VDiTAttention, layer: int):
        self.control, self.layer = control, layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.control._attend(self.layer, q, k, v, mask)


class CogVideoXStudyProcessor(VDiTAttnProcessor):
    """``CogVideoXAttnProcessor2_0`` with the attention routed through the study (same math)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only, as the stock processor
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = self.attend(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


# transformer class name -> (processor, pattern of the processor names studied; group 1 = layer index)
FAMILIES: dict[str, tuple[type[VDiTAttnProcessor], str]] = {
    "CogVideoXTransformer3DModel": (CogVideoXStudyProcessor, r"^transformer_blocks\.(\d+)\.attn1\.processor$"),
}


class VDiTAttention(L.Callback):
    def __init__(
        self,
        record_layers: LayerSpec = (),
        sparsity: float = 0.0,
        sparsity_layers: LayerSpec = "all",
        renormalize: bool = False,
        transfer: Literal["off", "record", "substitute"] = "off",
        transfer_layers: LayerSpec = "all",
        maps: dict[tuple[int, int], torch.Tensor] | None = None,
        map_dtype: str | None = None,
        sink_top_k: int = 1,
        top_p: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
        n_query_samples: int = 16,
        seed: int = 0,
        chunk_size: int = 256,
        model_attr: str = "transformer",
    ):
        """
        Args:
            record_layers: layers whose reductions (column mass, sparsity profile, sampled rows) are
                recorded each call; ``"all"`` for every layer. Recording never changes the output.
            sparsity: k; each query row of the map loses its ⌊k·n⌋ smallest weights (0 disables).
            sparsity_layers: layers sparsified when ``sparsity > 0``.
            renormalize: rescale each sparsified row to sum to 1 (off: the dropped mass is lost).
            transfer: ``"record"`` caches the maps of ``transfer_layers`` per (layer, call) in
                ``maps``; ``"substitute"`` uses the cached maps there instead of the computed ones
                (values come from the current run).
            transfer_layers: layers that record or substitute maps.
            maps: the cache to substitute from (another ``VDiTAttention``'s ``maps``).
            map_dtype: dtype the maps are cached in (e.g. ``bfloat16`` halves the memory); a recording
                run uses the rounded maps itself, so substituting its own maps stays exact.
            sink_top_k: key columns whose summed mass is a head's sink mass.
            top_p: key fractions p of the sparsity profile (mass in the top ⌈p·n⌉ keys of a row).
            n_query_samples: query rows kept per map for cross-prompt similarity (seeded by ``seed``).
            seed: seed of the query-row sample; the same seed picks the same rows for every prompt.
            chunk_size: query rows per softmax chunk; bounds memory at chunk·n·heads floats.
            model_attr: as a Lightning callback, the LightningModule attribute holding the transformer.
        """
        require(0 <= sparsity < 1, self, "sparsity", sparsity, "a value in [0, 1)")
        require(transfer in ("off", "record", "substitute"), self, "transfer", transfer, "'off', 'record' or 'substitute'")
        require(not (transfer == "substitute" and maps is None), self, "maps", maps,
                "the maps of a run with transfer='record' when transfer='substitute'")
        require(len(top_p) > 0 and all(0 < p <= 1 for p in top_p), self, "top_p", list(top_p), "fractions in (0, 1]")
        require(sink_top_k >= 1, self, "sink_top_k", sink_top_k, "≥ 1")
        require(chunk_size >= 1, self, "chunk_size", chunk_size, "≥ 1")
        require(n_query_samples >= 0, self, "n_query_samples", n_query_samples, "≥ 0")
        require(map_dtype is None or isinstance(getattr(torch, map_dtype, None), torch.dtype), self, "map_dtype",
                map_dtype, "a torch dtype name such as 'bfloat16', or None")
        for name, spec in (("record_layers", record_layers), ("sparsity_layers", sparsity_layers), ("transfer_layers", transfer_layers)):
            require(spec == "all" or (not isinstance(spec, str) and all(isinstance(i, int) for i in spec)), self, name,
                    spec, "a list of layer indices or 'all'")
        self.record_layers, self.sparsity, self.sparsity_layers = record_layers, sparsity, sparsity_layers
        self.renormalize, self.transfer, self.transfer_layers = renormalize, transfer, transfer_layers
        self.maps: dict[tuple[int, int], torch.Tensor] = {} if maps is None else maps
        self.map_dtype = getattr(torch, map_dtype) if map_dtype else None
        self.sink_top_k, self.top_p, self.n_query_samples = sink_top_k, tuple(top_p), n_query_samples
        self.seed, self.chunk_size, self.model_attr = seed, chunk_size, model_attr
        self.reductions: dict[int, list[AttentionReduction]] = defaultdict(list)
        self.sparsity_errors: dict[int, list[SparsityError]] = defaultdict(list)
        self.n_layers = 0
        self._calls: dict[int, int] = defaultdict(int)
        self._rows: dict[int, torch.Tensor] = {}
        self._transformer: nn.Module | None = None
        self._originals: dict | None = None

    # ---------------------------------------------------------------- installation
    def attach(self, transformer: nn.Module) -> None:
        """Install one study processor per attention layer (checks the layer indices first) and
        reset the records and step counters."""
        name = type(transformer).__name__
        if name not in FAMILIES:
            raise ValueError(f"VDiTAttention supports {sorted(FAMILIES)}, not {name}")
        processor_cls, pattern = FAMILIES[name]
        self.detach()  # a second attach must not take our own processors for the originals
        originals = dict(transformer.attn_processors)
        layers = {key: int(m.group(1)) for key in originals if (m := re.match(pattern, key))}
        self.n_layers = len(set(layers.values()))
        for spec_name in ("record_layers", "sparsity_layers", "transfer_layers"):
            spec = getattr(self, spec_name)
            require(spec == "all" or all(0 <= i < self.n_layers for i in spec), self, spec_name, list(spec),
                    f"layer indices in [0, {self.n_layers}): the transformer has {self.n_layers} attention layers")
        transformer.set_attn_processor(
            {key: processor_cls(self, layers[key]) if key in layers else proc for key, proc in originals.items()}
        )
        self._transformer, self._originals = transformer, originals
        self.reset()

    def detach(self) -> None:
        """Put the original processors back."""
        if self._transformer is not None:
            self._transformer.set_attn_processor(dict(self._originals))  # a copy: diffusers pops the keys
            self._transformer, self._originals = None, None

    @contextmanager
    def applied(self, transformer: nn.Module):
        """``with VDiTAttention(sparsity=0.5).applied(transformer): transformer(...)``."""
        self.attach(transformer)
        try:
            yield self
        finally:
            self.detach()

    def reset(self) -> None:
        """Forget the recorded reductions and errors and restart the per-layer call (step) counters;
        the cached maps stay."""
        self.reductions.clear()
        self.sparsity_errors.clear()
        self._calls.clear()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.attach(getattr(pl_module, self.model_attr, pl_module))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    # ---------------------------------------------------------------- attention
    def _in(self, layer: int, spec: LayerSpec) -> bool:
        return spec == "all" or layer in spec

    def _sample_rows(self, n: int) -> torch.Tensor:
        if n not in self._rows:
            gen = torch.Generator().manual_seed(self.seed)
            self._rows[n] = torch.randperm(n, generator=gen)[: min(self.n_query_samples, n)].sort().values
        return self._rows[n]

    def _probs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """softmax(q·kᵀ/√d) for query rows start…stop, in float32 (sdpa's default scale)."""
        logits = (q[..., start:stop, :].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            m = mask[..., start:stop, :] if mask.shape[-2] == q.shape[-2] else mask
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        return logits.softmax(-1)

    def _reducer(self, q: torch.Tensor, k: torch.Tensor) -> MapReducer:
        b, h, n, _ = q.shape
        return MapReducer(b, h, n, k.shape[-2], self.top_p, self._sample_rows(n), device=q.device)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        step = self._calls[layer]
        self._calls[layer] += 1
        record = self._in(layer, self.record_layers)
        sparse = self.sparsity > 0 and self._in(layer, self.sparsity_layers)
        transfer = self.transfer if self.transfer != "off" and self._in(layer, self.transfer_layers) else None
        n = q.shape[-2]

        if not (sparse or transfer):  # the stock path: bit-identical output
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
            if record:
                reducer = self._reducer(q, k)
                for s in range(0, n, self.chunk_size):
                    reducer.update(self._probs(q, k, mask, s, s + self.chunk_size), s)
                self.reductions[layer].append(reducer.result(self.sink_top_k))
            return out

        if transfer == "substitute":
            cached = self.maps.get((layer, step))
            if cached is None:
                raise ValueError(f"no cached map for layer {layer} call {step}; record one with transfer='record'")
            if cached.shape != (*q.shape[:-1], k.shape[-2]):
                raise ValueError(f"cached map of layer {layer} has shape {tuple(cached.shape)}, this call needs {(*q.shape[:-1], k.shape[-2])}")
        store_dtype = self.map_dtype or q.dtype
        if transfer == "record":
            stored = torch.empty(*q.shape[:-1], k.shape[-2], dtype=store_dtype, device="cpu")
        reducer = self._reducer(q, k) if record else None
        vf = v.float()
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        err = torch.zeros(q.shape[0], q.shape[1], 2, dtype=torch.float64, device=q.device)  # ‖ΔO‖², ‖O‖² per head
        for s in range(0, n, self.chunk_size):
            e = min(s + self.chunk_size, n)
            if transfer == "substitute":
                probs = cached[..., s:e, :].to(q.device, torch.float32)
                if record:
                    reducer.update(self._probs(q, k, mask, s, e), s)
            else:
                probs = self._probs(q, k, mask, s, e)
                if record:
                    reducer.update(probs, s)
            if sparse:
                dense = probs @ vf
                probs = sparsify_rows(probs, self.sparsity, self.renormalize)
            if transfer == "record":  # use the cached (rounded) map, so substituting it reproduces this run
                probs = probs.to(store_dtype)
                stored[..., s:e, :] = probs.cpu()
                probs = probs.float()
            chunk = probs @ vf
            if sparse:
                err[..., 0] += (chunk - dense).square().sum((-1, -2), dtype=torch.float64)
                err[..., 1] += dense.square().sum((-1, -2), dtype=torch.float64)
            out[..., s:e, :] = chunk.to(out.dtype)
        if record:
            self.reductions[layer].append(reducer.result(self.sink_top_k))
        if transfer == "record":
            self.maps[(layer, step)] = stored
        if sparse:
            tot = err.sum(0)
            self.sparsity_errors[layer].append(SparsityError(
                relative=float((tot[:, 0].sum() / tot[:, 1].sum().clamp_min(1e-30)).sqrt()),
                per_head=(tot[:, 0] / tot[:, 1].clamp_min(1e-30)).sqrt().float().cpu(),
            ))
        return out
