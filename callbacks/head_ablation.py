"""Zero or mean-replace chosen attention heads of any supported model, under any attention backend.

A forward pre-hook on each layer's ``o_proj`` sees the concatenated head outputs
``[B, S, H·D]``; zeroing slice h removes head h's contribution −W_O[:, h]·o_h exactly,
whether attention ran eager, sdpa or flash. Used by the dormant-heads study (arXiv 2504.03889).
"""

from __future__ import annotations

from typing import Callable, Literal

import lightning as L
import torch
from torch import nn

from lantern.callbacks.base import ModelHookCallback
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
        if mode not in ("zero", "mean"):
            raise ValueError(f"mode={mode!r} must be 'zero' or 'mean'")
        self.heads = [tuple(h) for h in heads or []]
        self.mode, self.mask_fn = mode, mask_fn
        self.mask: torch.Tensor | None = None  # [L, H] fixed or [B, L, H] per input
        self.enabled = True

    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        n_layers, n_heads = adapter.num_layers(model), adapter.num_heads(model)
        self.shape = (n_layers, n_heads)
        head_dim = adapter.head_dim(model)
        fixed = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in self.heads:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ValueError(f"head ({layer}, {head}) out of range: the model has {n_layers} layers × {n_heads} heads")
            fixed[layer, head] = True
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
                real = self._real_tokens(heads).to(x.dtype)
                replacement = (heads * real).cumsum(1) / real.cumsum(1).clamp(min=1)
            return (torch.where(drop, replacement, heads).flatten(-2), *args[1:])

        return ablate

    def _real_tokens(self, heads: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask
        if mask is None or mask.shape != heads.shape[:2]:
            mask = torch.ones(heads.shape[:2], dtype=torch.bool, device=heads.device)
        return mask.to(heads.device).view(*heads.shape[:2], 1, 1)

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
