"""Attention study of a video diffusion transformer (arXiv 2504.10317), as a ``validate`` run.

For every (source, target) prompt pair the module denoises the same fixed-seed latents for a
few DDIM steps with each prompt and, through ``lantern.callbacks.vdit_attention.VDiTAttention``,
measures per layer/head: the sink mass (top key columns), the sparsity profile (mass in the
top-p% keys), the cross-prompt structure similarity (Pearson correlation of sampled query rows),
the output error of zeroing the bottom k% of each row (locally per layer, end to end, and with
one layer sparsified at a time), and the map transfer (the source's own maps reproduce it;
the source's maps in the target's generation). Scalars go to ``vdit/...``, layer × head heatmaps
to TensorBoard, and ``vdit_attention.{json,csv,md}`` to the run directory.

The paper studies Mochi-1, HunyuanVideo and Wan2.1; CogVideoX is the video DiT diffusers ships
with a small test configuration, and the processor design leaves room for the others. The
denoising runs without classifier-free guidance (the conditional branch only), a choice made
to halve the cost: the maps of interest are those of the prompted generation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lantern import reporting
from lantern.callbacks.vdit_attention import VDiTAttention, structure_similarity

# The tiny random CogVideoX of diffusers' own model tests, with 3 layers (so a transfer layer has
# one before and one after it) and rotary embeddings (CogVideoX-5b style) so RoPE is exercised.
TINY_COGVIDEOX = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
    text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
)


def tiny_cogvideox(seed: int = 0, **overrides):
    """A randomly initialised ``CogVideoXTransformer3DModel`` (same weights for the same seed)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CogVideoXTransformer3DModel(**{**TINY_COGVIDEOX, **overrides}).eval()


def cogvideox_rotary_embedding(transformer, num_frames: int, height: int, width: int, device=None):
    """The (cos, sin) RoPE tables ``CogVideoXPipeline`` builds, for latents of this size; None if
    the model uses absolute positions (CogVideoX-2b)."""
    cfg = transformer.config
    if not cfg.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid_h, grid_w = height // p, width // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=num_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=(num_frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


def hashed_prompt_embedding(prompt: str, length: int, dim: int) -> torch.Tensor:
    """``[length, dim]``: one seeded Gaussian vector per word (seeded by the word's SHA-256), then
    a fixed pad vector, so prompts sharing words share embeddings; a stand-in text encoder."""

    def vector(token: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "little")
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    words = prompt.lower().split()[:length]
    return torch.stack([vector(w) for w in words] + [vector("<pad>")] * (length - len(words)))


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


class VDiTAttentionStudy(L.LightningModule):
    def __init__(
        self,
        transformer: str = "tiny-cogvideox",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        num_frames: int = 3,
        height: int = 8,
        width: int = 8,
        num_inference_steps: int = 2,
        text_length: int | None = None,
        use_text_encoder: bool = True,
        sparsity: list[float] = [0.1, 0.5, 0.9],
        renormalize: bool = False,
        isolate_layers: bool = True,
        transfer_layers: list[int] | None = None,
        map_dtype: str | None = None,
        sink_top_k: int = 1,
        sink_threshold: float = 0.3,
        top_p: list[float] = [0.01, 0.05, 0.1, 0.2, 0.5],
        n_query_samples: int = 16,
        chunk_size: int = 256,
        seed: int = 0,
    ):
        """
        Args:
            transformer: ``tiny-cogvideox`` (random, for tests) or a local diffusers CogVideoX
                directory: the pipeline root (``transformer/``, optional ``text_encoder/``,
                ``tokenizer/``, ``scheduler/``) or a transformer folder. Nothing is downloaded.
            dtype: dtype the transformer and text encoder are loaded in.
            num_frames: latent frames (CogVideoX: (video frames − 1)/4 + 1, 13 for 49 frames).
            height: latent height (video height / 8); a multiple of the patch size.
            width: latent width (video width / 8); a multiple of the patch size.
            num_inference_steps: DDIM steps of the fixed-seed denoising; every step is studied.
            text_length: prompt tokens; the model's ``max_text_seq_length`` if None.
            use_text_encoder: encode prompts with the local T5 (``text_encoder/``, ``tokenizer/``)
                when present; otherwise, and for the tiny model, hashed per-word random embeddings.
            sparsity: the k values: fraction of each attention row zeroed (bottom weights).
            renormalize: rescale each sparsified row to sum to 1.
            isolate_layers: also sparsify one layer at a time and record the end-to-end error
                (num_layers generations per k).
            transfer_layers: layers whose maps are transferred from source to target; all if None.
                Maps cost heads·n² floats per layer and step: pick a few on real models.
            map_dtype: dtype of the cached maps (``bfloat16`` halves them); the model's if None.
            sink_top_k: key columns summed into a head's sink mass.
            sink_threshold: a key column whose mean attention mass is ≥ this is counted as a sink
                (0.3 is the ε of Gu et al., arXiv 2410.10781, for LLM sinks).
            top_p: key fractions of the sparsity profile.
            n_query_samples: query rows sampled per map for the cross-prompt similarity.
            chunk_size: query rows per softmax chunk (memory: chunk·n·heads floats).
            seed: seed of the initial latents and of the sampled query rows.
        """
        super().__init__()
        if not sparsity or not all(0 < k < 1 for k in sparsity):
            raise ValueError(f"model.sparsity={sparsity} values must be in (0, 1); k = 0 is the dense baseline itself")
        if not 0 < sink_threshold <= 1:
            raise ValueError(f"model.sink_threshold={sink_threshold} must be in (0, 1]")
        if min(num_frames, height, width, num_inference_steps) < 1:
            raise ValueError("model.num_frames, model.height, model.width and model.num_inference_steps must be ≥ 1")
        self.save_hyperparameters()
        torch_dtype = getattr(torch, dtype)
        self.text_encoder = self.tokenizer = None
        self._scheduler_config = None
        if transformer == "tiny-cogvideox":
            self.transformer = tiny_cogvideox(seed)
            if torch_dtype != torch.float32:
                self.transformer.to(torch_dtype)
        else:
            self._load_local(Path(transformer), torch_dtype, use_text_encoder)
        self.transformer.requires_grad_(False).eval()
        cfg = self.transformer.config
        n_layers = cfg.num_layers
        bad = [i for i in (transfer_layers or []) if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"model.transfer_layers: layer {bad[0]} out of range: the transformer has {n_layers} layers")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"model.height={height} and model.width={width} must be multiples of the patch size {cfg.patch_size}")
        self.text_length = text_length or cfg.max_text_seq_length
        self._pairs: list[dict] = []

    def _load_local(self, root: Path, torch_dtype: torch.dtype, use_text_encoder: bool) -> None:
        """Weights from a local diffusers CogVideoX directory; ``local_files_only`` so nothing downloads."""
        from diffusers import CogVideoXTransformer3DModel

        if not root.is_dir():
            raise ValueError(f"model.transformer={str(root)!r} is neither 'tiny-cogvideox' nor a local diffusers CogVideoX directory")
        sub = "transformer" if (root / "transformer").is_dir() else None
        self.transformer = CogVideoXTransformer3DModel.from_pretrained(
            root, subfolder=sub, torch_dtype=torch_dtype, local_files_only=True
        )
        if (root / "scheduler").is_dir():
            from diffusers import CogVideoXDDIMScheduler

            self._scheduler_config = CogVideoXDDIMScheduler.load_config(root, subfolder="scheduler", local_files_only=True)
        if use_text_encoder and (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
            from transformers import AutoTokenizer, T5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
            self.text_encoder = T5EncoderModel.from_pretrained(
                root / "text_encoder", torch_dtype=torch_dtype, local_files_only=True
            ).requires_grad_(False).eval()
        elif use_text_encoder:
            rank_zero_warn(f"{root} has no text_encoder/ and tokenizer/: using hashed random prompt embeddings")

    # ---------------------------------------------------------------- generation
    def _scheduler(self):
        from diffusers import CogVideoXDDIMScheduler

        if self._scheduler_config is not None:
            return CogVideoXDDIMScheduler.from_config(self._scheduler_config)
        # CogVideoX-2b's scheduler settings
        return CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing", clip_sample=False, snr_shift_scale=3.0)

    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        """``[1, text_length, text_embed_dim]`` prompt embedding."""
        dtype = self.transformer.dtype
        if self.text_encoder is not None:  # as CogVideoXPipeline._get_t5_prompt_embeds
            ids = self.tokenizer([prompt], padding="max_length", max_length=self.text_length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
            return self.text_encoder(ids.to(self.device))[0].to(dtype)
        emb = hashed_prompt_embedding(prompt, self.text_length, self.transformer.config.text_embed_dim)
        return emb[None].to(self.device, dtype)

    @torch.no_grad()
    def generate(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The denoised latents after ``num_inference_steps`` DDIM steps from the fixed-seed noise."""
        hp, cfg = self.hparams, self.transformer.config
        shape = (prompt_embeds.shape[0], hp.num_frames, cfg.in_channels, hp.height, hp.width)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(hp.seed)).to(self.device, self.transformer.dtype)
        rope = cogvideox_rotary_embedding(self.transformer, hp.num_frames, hp.height, hp.width, self.device)
        scheduler = self._scheduler()
        scheduler.set_timesteps(hp.num_inference_steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = self.transformer(hidden_states=latents, encoder_hidden_states=prompt_embeds,
                                   timestep=t.expand(latents.shape[0]), image_rotary_emb=rope, return_dict=False)[0]
            latents = scheduler.step(out, t, latents, return_dict=False)[0]
        return latents

    def _control(self, **kwargs) -> VDiTAttention:
        hp = self.hparams
        return VDiTAttention(sink_top_k=hp.sink_top_k, top_p=hp.top_p, n_query_samples=hp.n_query_samples,
                             seed=hp.seed, chunk_size=hp.chunk_size, map_dtype=hp.map_dtype, **kwargs)

    def _run(self, embeds: torch.Tensor, control: VDiTAttention) -> torch.Tensor:
        with control.applied(self.transformer):
            return self.generate(embeds)

    # ---------------------------------------------------------------- the study
    def validation_step(self, batch: list[dict[str, str]], batch_idx: int) -> None:
        for pair in batch:
            self._pairs.append(self.study_pair(pair["source"], pair["target"]))

    def test_step(self, batch: list[dict[str, str]], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def study_pair(self, source: str, target: str) -> dict:
        """All measurements for one prompt pair, as nested lists (layer-major)."""
        hp = self.hparams
        n_layers = self.transformer.config.num_layers
        src_emb, tgt_emb = self.embed(source), self.embed(target)
        src, tgt = self._control(record_layers="all"), self._control(record_layers="all")
        lat_src, lat_tgt = self._run(src_emb, src), self._run(tgt_emb, tgt)

        def per_head(control: VDiTAttention, attr: str) -> torch.Tensor:  # [L, H(, P)], mean over steps and batch
            return torch.stack([torch.stack([getattr(r, attr).mean(0) for r in control.reductions[l]]).mean(0)
                                for l in range(n_layers)])

        sink = (per_head(src, "sink_mass") + per_head(tgt, "sink_mass")) / 2
        profile = (per_head(src, "sparsity_profile") + per_head(tgt, "sparsity_profile")) / 2
        similarity = torch.stack([torch.stack([structure_similarity(a, b).mean(0) for a, b in
                                               zip(src.reductions[l], tgt.reductions[l])]).mean(0) for l in range(n_layers)])
        sinks = [(l, h, j) for c in (src, tgt) for l in range(n_layers) for r in c.reductions[l]
                 for _, h, j, _ in r.sinks(hp.sink_threshold)]
        text_len = src_emb.shape[1]
        sink_columns = torch.stack([torch.stack([r.column_mass.mean(0) for r in src.reductions[l]]).mean(0).argmax(-1)
                                    for l in range(n_layers)])  # [L, H] heaviest key of the source run

        local, isolated, output = {}, {}, {}
        for k in hp.sparsity:
            c = self._control(sparsity=k, renormalize=hp.renormalize)
            output[k] = _relative(self._run(src_emb, c), lat_src)
            local[k] = [sum(e.relative for e in c.sparsity_errors[l]) / len(c.sparsity_errors[l]) for l in range(n_layers)]
            if hp.isolate_layers:
                isolated[k] = [_relative(self._run(src_emb, self._control(sparsity=k, sparsity_layers=[l],
                                                                          renormalize=hp.renormalize)), lat_src)
                               for l in range(n_layers)]

        layers = "all" if hp.transfer_layers is None else list(hp.transfer_layers)
        record = self._control(transfer="record", transfer_layers=layers)
        lat_rec = self._run(src_emb, record)
        lat_self = self._run(src_emb, self._control(transfer="substitute", transfer_layers=layers, maps=record.maps))
        lat_edit = self._run(tgt_emb, self._control(transfer="substitute", transfer_layers=layers, maps=record.maps))
        record.maps.clear()
        return {
            "source": source, "target": target,
            "sink_mass": sink.tolist(), "sparsity_profile": profile.tolist(), "similarity": similarity.tolist(),
            "sink_columns": sink_columns.tolist(), "text_tokens": text_len,
            "n_sinks": len(sinks), "n_sinks_text": sum(j < text_len for _, _, j in sinks),
            "sparsify_local_error": local, "sparsify_isolated_error": isolated, "sparsify_output_error": output,
            "transfer_self_error": _relative(lat_self, lat_rec),
            "transfer_target_change": _relative(lat_edit, lat_tgt),
            "transfer_source_distance_before": _relative(lat_tgt, lat_src),
            "transfer_source_distance_after": _relative(lat_edit, lat_src),
        }

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        if not self._pairs:
            return
        summary = summarize(self._pairs, self.hparams)
        self._pairs = []
        self.log_dict({k: v for k, v in summary["scalars"].items()}, sync_dist=False, rank_zero_only=True)
        reporting.write_table(self.trainer, summary["table"], "vdit_attention", "vdit/table", payload=summary)
        _write_figures(self.trainer, summary)


def summarize(pairs: list[dict], hp) -> dict:
    """Means over prompt pairs: per layer/head arrays, per layer table rows and ``vdit/`` scalars."""

    def mean(key: str) -> torch.Tensor:
        return torch.tensor([p[key] for p in pairs]).mean(0)

    sink, profile, similarity = mean("sink_mass"), mean("sparsity_profile"), mean("similarity")
    n_layers = sink.shape[0]
    ks = list(hp["sparsity"])
    local = {k: torch.tensor([p["sparsify_local_error"][k] for p in pairs]).mean(0) for k in ks}
    output = {k: sum(p["sparsify_output_error"][k] for p in pairs) / len(pairs) for k in ks}
    isolated = ({k: torch.tensor([p["sparsify_isolated_error"][k] for p in pairs]).mean(0) for k in ks}
                if hp["isolate_layers"] else {})
    transfer = {key: sum(p[f"transfer_{key}"] for p in pairs) / len(pairs)
                for key in ("self_error", "target_change", "source_distance_before", "source_distance_after")}

    scalars = {f"vdit/transfer/{k}": v for k, v in transfer.items()}
    scalars["vdit/n_sinks"] = sum(p["n_sinks"] for p in pairs) / len(pairs)
    table = []
    for l in range(n_layers):
        row = {"layer": l, "sink_mass": float(sink[l].mean()), "similarity": float(similarity[l].mean())}
        for i, p in enumerate(hp["top_p"]):
            row[f"top{p * 100:g}%_mass"] = float(profile[l, :, i].mean())
        for k in ks:
            row[f"err_k{k:g}"] = float(local[k][l])
            if isolated:
                row[f"out_err_k{k:g}_this_layer_only"] = float(isolated[k][l])
        table.append(row)
        # The same per-layer numbers as TensorBoard scalars: table column → scalar name.
        names = {"sink_mass": "vdit/sink_mass", "similarity": "vdit/similarity"}
        names |= {f"top{p * 100:g}%_mass": f"vdit/top_mass/p{p * 100:g}" for p in hp["top_p"]}
        names |= {f"err_k{k:g}": f"vdit/sparsify_error/k{k:g}" for k in ks}
        names |= {f"out_err_k{k:g}_this_layer_only": f"vdit/sparsify_isolated_output_error/k{k:g}" for k in ks}
        scalars |= {f"{names[col]}/L{l}": value for col, value in row.items() if col in names}
    for k in ks:
        scalars[f"vdit/sparsify_output_error/k{k:g}"] = output[k]
    return {
        "paper": "arXiv 2504.10317",
        "settings": {k: v for k, v in dict(hp).items() if not k.startswith("_")},
        "pairs": [[p["source"], p["target"]] for p in pairs],
        "per_head": {"sink_mass": sink.tolist(), "similarity": similarity.tolist(),
                     "sparsity_profile": profile.tolist(), "top_p": list(hp["top_p"]),
                     "sink_columns_first_pair": pairs[0]["sink_columns"], "text_tokens": pairs[0]["text_tokens"]},
        "per_k": {f"{k:g}": {"local_error": local[k].tolist(), "output_error": output[k],
                             **({"isolated_output_error": isolated[k].tolist()} if isolated else {})} for k in ks},
        "sinks": {"threshold": hp["sink_threshold"], "per_pair": [p["n_sinks"] for p in pairs],
                  "in_text_tokens": [p["n_sinks_text"] for p in pairs]},
        "transfer": transfer,
        "table": table,
        "scalars": scalars,
    }


def _write_figures(trainer: L.Trainer, summary: dict) -> None:
    """Layer × head heatmaps (sink mass, similarity, top-10%-key mass) and a layer × k error map."""
    per_head = summary["per_head"]
    profile = torch.tensor(per_head["sparsity_profile"])
    top_p = per_head["top_p"]
    i10 = min(range(len(top_p)), key=lambda i: abs(top_p[i] - 0.1))
    maps = {"vdit/heatmap/sink_mass": torch.tensor(per_head["sink_mass"]),
            "vdit/heatmap/similarity": torch.tensor(per_head["similarity"]),
            f"vdit/heatmap/top{top_p[i10] * 100:g}pct_mass": profile[..., i10]}
    for tag, grid in maps.items():
        reporting.write_figure(trainer, reporting.heatmap(grid, tag.rsplit("/", 1)[-1]), tag)
    ks = list(summary["per_k"])
    grid = torch.tensor([summary["per_k"][k]["local_error"] for k in ks]).T  # [L, K]
    reporting.write_figure(trainer, reporting.heatmap(grid, "relative output error", xlabel="k", xticks=ks),
                           "vdit/heatmap/sparsify_error")
