"""Attention-sink measurement for any supported model.

Per layer and head: the attention mass on each sequence's first real token, and the mass on
the top-k key columns, both averaged over real query positions (causal rows of padded
inputs excluded). Attention runs eager only while measuring; a hook keeps the two [B, H]
reductions per layer, never the L×H×S² maps. During ``fit`` it measures on every
validation pass, so a pretraining run shows sinks emerging; it logs ``attn/sink_mass/L{l}``
scalars, a layer×head heatmap, and appends to ``sinks.json`` in the run directory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch import nn

from callbacks.base import ModelHookCallback, eager_attention, first_token_mass, topk_column_mass
from models.adapters import ArchAdapter


class SinkMeasurement(ModelHookCallback):
    def __init__(self, top_k: int = 1, json_name: str = "sinks.json", model_attr: str = "model"):
        """
        Args:
            top_k: how many of the most-attended key columns the top-k mass sums.
            json_name: summary file in the run directory (one record per measurement).
            model_attr: attribute of the LightningModule holding the model (the module itself if absent).
        """
        super().__init__(model_attr)
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be ≥ 1")
        self.top_k, self.json_name = top_k, json_name
        self.recording = False
        self.reset()

    def reset(self) -> None:
        self._sink: dict[int, torch.Tensor] = {}
        self._topk: dict[int, torch.Tensor] = {}
        self._count = 0

    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        self._model = model
        for layer in range(adapter.num_layers(model)):
            module, second = adapter.probs_site(model, layer)
            self._handles.append(module.register_forward_hook(self._hook(layer, second)))

    def _hook(self, layer: int, second: bool):
        def hook(module, args, output):
            if not self.recording:
                return
            probs = output[1] if second else output
            if probs is None:
                raise RuntimeError("attention weights are not exposed; SinkMeasurement needs eager attention")
            probs = probs.detach().float()
            mask = self.token_mask
            if mask is None or mask.shape != (probs.shape[0], probs.shape[-1]):
                mask = torch.ones(probs.shape[0], probs.shape[-1], dtype=torch.bool, device=probs.device)
            mask = mask.to(probs.device)
            sink = first_token_mass(probs, mask).sum(0).cpu()
            top = topk_column_mass(probs, mask, self.top_k).sum(0).cpu()
            self._sink[layer] = self._sink.get(layer, 0) + sink
            self._topk[layer] = self._topk.get(layer, 0) + top
            if layer == 0:
                self._count += probs.shape[0]
        return hook

    def results(self) -> dict[str, torch.Tensor]:
        """``sink_mass`` and ``topk_mass``: [L, H], averaged over every sequence seen since reset()."""
        if not self._count:
            raise RuntimeError("no forward pass was measured")
        layers = sorted(self._sink)
        return {
            "sink_mass": torch.stack([self._sink[l] for l in layers]) / self._count,
            "topk_mass": torch.stack([self._topk[l] for l in layers]) / self._count,
        }

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
        if not trainer.is_global_zero:
            return
        log_heatmap(trainer, "attn/sink_mass", res["sink_mass"], step, "attention on the first token")
        if trainer.log_dir:
            path = Path(trainer.log_dir) / self.json_name
            records = json.loads(path.read_text()) if path.exists() else []
            records.append({"step": step, "sequences": self._count, "top_k": self.top_k,
                            "sink_mass": res["sink_mass"].tolist(), "topk_mass": res["topk_mass"].tolist()})
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


def log_heatmap(trainer: L.Trainer, tag: str, values: torch.Tensor, step: int, title: str) -> None:
    """A layer × head heatmap in TensorBoard (where a person would rather look than at numbers)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.35 * values.shape[1], 1 + 0.25 * values.shape[0]))
    im = ax.imshow(values.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    for lg in loggers:
        lg.experiment.add_figure(tag, fig, global_step=step)
    plt.close(fig)
