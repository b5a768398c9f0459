"""Zero or mean-replace chosen attention heads of any supported model, under any attention backend.

A forward pre-hook on each layer's ``o_proj`` sees the concatenated head outputs
``[B, S, H·D]``; zeroing slice h removes head h's contribution −W_O[:, h]·o_h exactly,
whether attention ran eager, sdpa or flash. Used by the dormant-heads study (arXiv 2504.03889).
Mean replacement carries a per-layer running (sum, count) across the calls of a KV-cached
``generate``, so each new position gets the same causal mean an uncached forward would give.
"""

from __future__ import annotations

from typing import Callable, Literal

import lightning as L
import torch
from torch import nn

from lantern.callbacks.base import ModelHookCallback
from lantern.errors import DataError, require
from lantern.models.adapters import ArchAdapter

MaskFn = Callable[[L.LightningModule, object], torch.Tensor]


class HeadAblation(ModelHookCallback):
    def __init__(
        self,
        heads: list[tuple[int, int]] | None = None,
        mode: Literal["zero", "mean"] = "zero",
        mask_fn: MaskFn | None = None,
        model_attr: str = "model",
    ):
        """
        Args:
            heads: fixed (layer, head) pairs to ablate.
            mode: ``zero`` the head's output, or replace it at each position t by its ``mean`` over the
                real tokens of the same input up to t (a causal running mean: keeps the head's average
                contribution without letting later tokens reach earlier positions).
            mask_fn: ``(pl_module, batch) → bool [B, L, H]``, a per-input choice of heads computed
                before each evaluation batch (with ablation off), e.g. a dormancy score.
            model_attr: attribute of the LightningModule holding the model (the module itself if absent).
        """
        super().__init__(model_attr)
        require(mode in ("zero", "mean"), self, "mode", mode, "'zero' or 'mean'")
        heads = [list(h) if isinstance(h, (tuple, list)) else h for h in heads or []]
        require(all(isinstance(h, list) and len(h) == 2 and all(isinstance(i, int) for i in h) for h in heads),
                self, "heads", heads, "a list of (layer, head) pairs of integers")
        self.heads = [tuple(h) for h in heads]
        self.mode, self.mask_fn = mode, mask_fn
        self.mask: torch.Tensor | None = None  # [L, H] fixed or [B, L, H] per input
        self.enabled = True
        self._running: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer → sum [B, H, D], count [B, 1, 1]

    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        n_layers, n_heads = adapter.num_layers(model), adapter.num_heads(model)
        self.shape = (n_layers, n_heads)
        head_dim = adapter.head_dim(model)
        require(all(0 <= layer < n_layers and 0 <= head < n_heads for layer, head in self.heads), self, "heads",
                [list(h) for h in self.heads], f"(layer, head) pairs within {n_layers} layers × {n_heads} heads")
        fixed = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in self.heads:
            fixed[layer, head] = True
        self._running.clear()
        if self.heads:
            self.mask = fixed
        for layer in range(n_layers):
            hook = self._make_hook(layer, n_heads, head_dim)
            self._handles.append(adapter.out_proj(model, layer).register_forward_pre_hook(hook))

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Heads to ablate from now on: bool [L, H] for every input, or [B, L, H] per input."""
        if mask is not None and tuple(mask.shape[-2:]) != self.shape:
            raise ValueError(f"head mask of shape {tuple(mask.shape)} must end in (layers, heads) = {self.shape}")
        self.mask = mask

    def _make_hook(self, layer: int, n_heads: int, head_dim: int):
        def ablate(module, args):
            if self.past_len == 0:  # a new sequence: no running mean of an earlier one may carry over
                self._running.pop(layer, None)
            if not self.enabled or self.mask is None:
                return None
            x = args[0]
            drop = self.mask[..., layer, :].to(x.device)  # [H] or [B, H]
            if not drop.any():
                return None
            heads = x.view(*x.shape[:-1], n_heads, head_dim)
            drop = drop.view(-1, 1, n_heads, 1) if drop.dim() == 2 else drop.view(1, 1, n_heads, 1)
            if self.mode == "zero":
                replacement = torch.zeros((), dtype=x.dtype, device=x.device)
            else:
                replacement = self._running_mean(layer, heads)
            return (torch.where(drop, replacement, heads).flatten(-2), *args[1:])

        return ablate

    def _running_mean(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """[B, S, H, D]: each position's mean over the real tokens of its sequence so far, cached ones included."""
        real = self.real_tokens(*heads.shape[:2], heads.device).view(*heads.shape[:2], 1, 1)
        total, count = heads.where(real, 0).cumsum(1), real.to(heads.dtype).cumsum(1)  # where: padding may be NaN
        if self.past_len > 0:  # this call extends a cached sequence: continue its running mean
            state = self._running.get(layer)
            if state is None or state[0].shape[0] != heads.shape[0]:
                tracked = ("was not tracked: run its prompt under this ablation first" if state is None
                           else f"was tracked for a batch of {state[0].shape[0]}")
                raise DataError(f"HeadAblation: a KV-cached call of batch {heads.shape[0]} extends a sequence whose "
                                f"running mean at layer {layer} {tracked}")
            total, count = total + state[0].unsqueeze(1), count + state[1].unsqueeze(1)
        self._running[layer] = (total[:, -1].clone(), count[:, -1].clone())  # not views pinning [B, S, H, D]
        return total / count.clamp(min=1)

    def _per_batch(self, pl_module: L.LightningModule, batch) -> None:
        if self.mask_fn is not None:
            self.enabled = False
            try:
                self.set_mask(self.mask_fn(pl_module, batch))
            finally:
                self.enabled = True

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._per_batch(pl_module, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._per_batch(pl_module, batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._per_batch(pl_module, batch)
