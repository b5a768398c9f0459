"""Attention-sink and dormant-head measurement for any supported model.

Per layer and head: the attention mass on each sequence's first real token, and the mass on
the top-k key columns, both averaged over real query positions (padding excluded on either
side); and the output-norm ratio r_h = mean_t ‖o_{h,t}‖ / its layer's mean over heads, whose
small values mark dormant heads (arXiv 2504.03889). Attention runs eager only while
measuring; hooks keep [B, H] reductions per layer, never the L×H×S² maps. During ``fit`` it
measures on every validation pass, so a pretraining run shows sinks and dormant heads
emerging: it logs ``attn/sink_mass/L{l}`` and ``attn/dormant_share/L{l}``, layer×head
heatmaps, and appends to ``sinks.json`` in the run directory. Under a KV-cached ``generate``
each call's new query rows are measured against all keys, cached ones included, and every
call counts as one more measurement per sequence.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from lantern.callbacks.base import ModelHookCallback, eager_attention, first_token_mass, topk_column_mass
from lantern.errors import require
from lantern.models.adapters import ArchAdapter
from lantern.reporting import heatmap, run_dir, write_figure


_KEYS = ("sink_mass", "topk_mass", "output_norm_ratio", "dormant_share")


class SinkMeasurement(ModelHookCallback):
    def __init__(self, top_k: int = 1, norm_tau: float = 0.1, json_name: str = "sinks.json", model_attr: str = "model"):
        """
        Args:
            top_k: how many of the most-attended key columns the top-k mass sums.
            norm_tau: a head is dormant on an input when its output-norm ratio r_h < norm_tau.
            json_name: summary file in the run directory (one record per measurement).
            model_attr: attribute of the LightningModule holding the model (the module itself if absent).
        """
        super().__init__(model_attr)
        require(isinstance(top_k, int) and top_k >= 1, self, "top_k", top_k, "an integer ≥ 1")
        self.top_k, self.norm_tau, self.json_name = top_k, norm_tau, json_name
        self.recording = False
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, dict[int, torch.Tensor]] = {k: {} for k in _KEYS}
        self._count = 0
        self.last: dict[str, dict[int, torch.Tensor]] = {"sink_mass": {}, "output_norm_ratio": {}}

    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        self._model = model
        n_heads = adapter.num_heads(model)
        for layer in range(adapter.num_layers(model)):
            module, second = adapter.probs_site(model, layer)
            self._handles.append(module.register_forward_hook(self._probs_hook(layer, second)))
            self._handles.append(adapter.out_proj(model, layer).register_forward_pre_hook(self._norm_hook(layer, n_heads)))

    def _add(self, key: str, layer: int, per_input: torch.Tensor) -> None:
        self._sums[key][layer] = self._sums[key].get(layer, 0) + per_input.sum(0).cpu()

    def _probs_hook(self, layer: int, second: bool):
        def hook(module, args, output):
            if not self.recording:
                return
            probs = output[1] if second else output
            if probs is None:
                raise RuntimeError("attention weights are not exposed; SinkMeasurement needs eager attention")
            probs = probs.detach().float()
            batch, _, n_queries, n_keys = probs.shape
            require(self.top_k <= n_keys, self, "top_k", self.top_k,
                    f"at most the {n_keys} key positions of the measured input")
            keys = self.key_mask(batch, n_keys, probs.device)
            queries = self.real_tokens(batch, n_queries, probs.device)
            sink = first_token_mass(probs, keys, queries)
            self.last["sink_mass"][layer] = sink
            self._add("sink_mass", layer, sink)
            self._add("topk_mass", layer, topk_column_mass(probs, keys, queries, self.top_k))
            if layer == 0:
                self._count += probs.shape[0]
        return hook

    def _norm_hook(self, layer: int, n_heads: int):
        def hook(module, args):
            if not self.recording:
                return
            x = args[0].detach()
            norms = x.view(*x.shape[:-1], n_heads, -1).float().norm(dim=-1)  # [B, S, H]
            real = self.real_tokens(*x.shape[:2], x.device).unsqueeze(-1)
            n = norms.where(real, 0).sum(1) / real.sum(1).clamp(min=1)  # [B, H]; padding may be NaN in eager
            ratio = n / n.mean(-1, keepdim=True).clamp(min=1e-12)
            self.last["output_norm_ratio"][layer] = ratio
            self._add("output_norm_ratio", layer, ratio)
            self._add("dormant_share", layer, (ratio < self.norm_tau).float().mean(-1, keepdim=True))
        return hook

    def results(self) -> dict[str, torch.Tensor]:
        """Averages over every sequence seen since reset(): ``sink_mass``, ``topk_mass`` and
        ``output_norm_ratio`` [L, H]; ``dormant_share`` [L], the share of a layer's heads with r_h < τ."""
        if not self._count:
            raise RuntimeError("no forward pass was measured")
        out = {k: torch.stack([v[l] for l in sorted(v)]) / self._count for k, v in self._sums.items()}
        out["dormant_share"] = out["dormant_share"].squeeze(-1)
        return out

    def last_scores(self) -> dict[str, torch.Tensor]:
        """Per-input scores of the last forward pass, [B, L, H]: ``sink_mass`` and ``output_norm_ratio``."""
        return {k: torch.stack([v[l] for l in sorted(v)], 1) for k, v in self.last.items()}

    @contextmanager
    def applied(self, model: nn.Module):
        """Hooks on, eager attention on, a fresh tally; all undone on exit."""
        with super().applied(model), eager_attention(model):
            self.reset()
            self.recording = True
            try:
                yield self
            finally:
                self.recording = False

    # -- Trainer: measure on evaluation passes only
    def _start(self) -> None:
        self.reset()
        self._eager = eager_attention(self._model)
        self._eager.__enter__()
        self.recording = True

    def _stop(self) -> None:
        if self.recording:
            self.recording = False
            self._eager.__exit__(None, None, None)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._count:
            return
        res = self.results()
        step = trainer.global_step
        for layer, value in enumerate(res["sink_mass"].mean(-1).tolist()):
            pl_module.log(f"attn/sink_mass/L{layer}", value, sync_dist=True)
        for layer, value in enumerate(res["topk_mass"].mean(-1).tolist()):
            pl_module.log(f"attn/topk_mass/L{layer}", value, sync_dist=True)
        for layer, value in enumerate(res["dormant_share"].tolist()):
            pl_module.log(f"attn/dormant_share/L{layer}", value, sync_dist=True)
        out = run_dir(trainer)  # a collective: every rank asks, rank zero writes
        if not trainer.is_global_zero:
            return
        write_figure(trainer, heatmap(res["sink_mass"], "attention on the first token", vmin=0, vmax=1),
                     "attn/sink_mass", step=step)
        write_figure(trainer, heatmap(res["output_norm_ratio"].clamp(max=2) / 2, "output-norm ratio r_h / 2 (dark: dormant)",
                                      vmin=0, vmax=1), "attn/output_norm_ratio", step=step)
        if out:
            path = out / self.json_name
            records = json.loads(path.read_text()) if path.exists() else []
            records.append({"step": step, "sequences": self._count, "top_k": self.top_k, "norm_tau": self.norm_tau,
                            **{k: v.tolist() for k, v in res.items()}})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records))

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start()

    def on_validation_epoch_end(self, trainer, pl_module):
        self._stop()
        self._report(trainer, pl_module)

    def on_test_epoch_start(self, trainer, pl_module):
        self._start()

    def on_test_epoch_end(self, trainer, pl_module):
        self._stop()
        self._report(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage):
        self._stop()
        super().teardown(trainer, pl_module, stage)
