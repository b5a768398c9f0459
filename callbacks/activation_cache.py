"""Cache activations of any supported model under flat, canonical names.

Names: ``blocks.{l}.hook_resid_pre`` (input of block l), ``blocks.{l}.hook_resid_post``
(its output), ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_mlp_out`` and
``blocks.{l}.attn.hook_z`` (per-head outputs before ``o_proj``, ``[.., H, D]``). Only the
sites, layers and names asked for are hooked — caching everything exhausts memory.
Positions: ``all``, ``last`` (each row's last real token, so left and right padding agree)
or ``mean`` over real tokens — of each forward call: under a KV-cached ``generate`` a call
covers only its new positions, and each call is kept as its own entry.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from safetensors.torch import save_file
from torch import nn

from lantern.callbacks.base import ModelHookCallback, check_layers
from lantern.errors import ConfigError, require
from lantern.models.adapters import ArchAdapter

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "head_out"]
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")
_NAME = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head_out": "blocks.{}.attn.hook_z",
}


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class ActivationCache(ModelHookCallback):
    def __init__(
        self,
        sites: list[Site] = ("resid_post",),
        layers: list[int] | None = None,
        positions: Literal["all", "last", "mean"] = "last",
        names: str | None = None,
        save_dir: str | None = None,
        batches_per_shard: int = 64,
        stages: list[str] = ("validate", "test", "predict"),
        model_attr: str = "model",
    ):
        """
        Args:
            sites: which activations (see module docstring).
            layers: which blocks; None: all.
            positions: ``all`` token positions, each row's ``last`` real token, or the ``mean`` over real tokens.
            names: a regular expression; only hook names that match it are cached.
            save_dir: stream to ``activations-{i:05d}.safetensors`` shards there instead of keeping
                everything in memory (relative paths go under the run's log directory).
            batches_per_shard: batches per shard file.
            stages: Trainer stages (fit, validate, test, predict) whose forward passes are cached.
            model_attr: attribute of the LightningModule holding the model (the module itself if absent).
        """
        super().__init__(model_attr)
        require(len(sites) > 0 and all(s in SITES for s in sites), self, "sites", list(sites),
                f"a non-empty list of sites from {', '.join(SITES)}")
        require(positions in ("all", "last", "mean"), self, "positions", positions, "'all', 'last' or 'mean'")
        require(isinstance(batches_per_shard, int) and batches_per_shard >= 1, self, "batches_per_shard",
                batches_per_shard, "an integer ≥ 1")
        try:
            self.pattern = re.compile(names) if names else None
        except re.error as err:
            raise ConfigError(self, "names", names, f"a regular expression ({err})") from None
        self.sites, self.layers, self.positions, self.names = list(sites), layers, positions, names
        self.save_dir = Path(save_dir) if save_dir else None
        self.batches_per_shard, self.stages = batches_per_shard, set(stages)
        self.recording = True
        self._store: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._buffered = 0
        self._shard = 0

    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        layers = check_layers(self.layers, adapter.num_layers(model), self)
        n_heads = adapter.num_heads(model)
        hooked = 0
        for layer in layers:
            block = adapter.blocks(model)[layer]
            for site in self.sites:
                name = _NAME[site].format(layer)
                if self.pattern and not self.pattern.search(name):
                    continue
                if site == "resid_pre":
                    hook = block.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
                elif site == "head_out":
                    hook = adapter.out_proj(model, layer).register_forward_pre_hook(self._heads_hook(name, n_heads))
                else:
                    module = {"resid_post": block, "attn_out": adapter.attention(model, layer),
                              "mlp_out": adapter.feed_forward(model, layer)}[site]
                    hook = module.register_forward_hook(self._out_hook(name))
                self._handles.append(hook)
                hooked += 1
        require(hooked > 0, self, "names", self.names,
                f"a pattern matching at least one hooked name, e.g. {_NAME[self.sites[0]].format(layers[0])}")

    def _pre_hook(self, name):
        def hook(module, args, kwargs):
            self._keep(name, args[0] if args else kwargs["hidden_states"])
        return hook

    def _out_hook(self, name):
        def hook(module, args, output):
            self._keep(name, _first(output))
        return hook

    def _heads_hook(self, name, n_heads):
        def hook(module, args):
            x = args[0]
            self._keep(name, x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads))
        return hook

    def _keep(self, name: str, x: torch.Tensor) -> None:
        if not self.recording:
            return
        x = x.detach()
        mask = self.real_tokens(*x.shape[:2], x.device)
        if self.positions == "last":
            # the last real token: the highest index with mask 1 (right padding) or S-1 (left padding)
            last = (mask.long() * torch.arange(mask.shape[1], device=x.device)).argmax(-1)
            x = x[torch.arange(x.shape[0], device=x.device), last]
        elif self.positions == "mean":
            m = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
            x = x.where(m, 0).sum(1) / m.sum(1).clamp(min=1)  # where: padding may be NaN under eager attention
        self._store[name].append(x.cpu())

    # -- results
    def activations(self) -> dict[str, torch.Tensor]:
        """Everything cached in memory, concatenated over batches."""
        try:
            return {name: torch.cat(parts) for name, parts in self._store.items()}
        except RuntimeError as err:
            raise ValueError(f"cached batches differ in length ({err}); use positions='last' or 'mean'") from None

    def clear(self) -> None:
        self._store.clear()
        self._buffered = 0

    def flush(self) -> Path | None:
        """Write what is buffered as the next safetensors shard (only with ``save_dir``)."""
        if self.save_dir is None or not self._store:
            return None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"activations-{self._shard:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.activations().items()}, str(path))
        self._shard += 1
        self.clear()
        return path

    def _after_batch(self) -> None:
        self._buffered += 1
        if self.save_dir is not None and self._buffered >= self.batches_per_shard:
            self.flush()

    # -- context manager and Trainer
    def detach(self) -> None:
        super().detach()
        self.flush()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.recording = stage in self.stages
        if self.save_dir is not None and not self.save_dir.is_absolute() and trainer.log_dir:
            self.save_dir = Path(trainer.log_dir) / self.save_dir
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._after_batch()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._after_batch()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._after_batch()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._after_batch()
