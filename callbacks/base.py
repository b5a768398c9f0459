"""Hook lifecycle shared by the interpretability callbacks.

Hooks are registered on the raw model (never a replaced module or patched ``forward``) in
``setup`` or inside ``applied(model)``, and removed in ``teardown`` or on leaving the
context. A pre-hook on the model itself captures which tokens are real (from
``attention_mask``), so reductions over positions are padding-aware on either side.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from lantern.models.adapters import ArchAdapter, attn_implementation, get_adapter


class ModelHookCallback(L.Callback):
    def __init__(self, model_attr: str = "model"):
        self.model_attr = model_attr
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.token_mask: torch.Tensor | None = None  # [B, S] bool, True at real tokens

    # -- to implement
    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        raise NotImplementedError

    # -- lifecycle
    def target(self, pl_module: L.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attr, None)
        return model if isinstance(model, nn.Module) else pl_module

    def attach(self, model: nn.Module) -> None:
        self.detach()
        adapter = get_adapter(model)
        signature = inspect.signature(model.forward)

        def capture_mask(module, args, kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            mask, ids = bound.get("attention_mask"), bound.get("input_ids")
            if ids is None:
                ids = bound.get("inputs_embeds")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.token_mask = mask.bool()
            elif isinstance(ids, torch.Tensor):
                self.token_mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)

        self._handles.append(model.register_forward_pre_hook(capture_mask, with_kwargs=True))
        try:
            self._register(model, adapter)
        except BaseException:
            self.detach()  # a rejected argument must leave no hook behind
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def applied(self, model: nn.Module):
        """``with Callback(...).applied(model) as cb: model(...)`` — hooks removed on exit."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.attach(self.target(pl_module))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()


def check_layers(layers, n_layers: int, what: str = "layer") -> list[int]:
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"{what} {bad[0]} out of range: the model has {n_layers} layers")
    return layers


@contextmanager
def eager_attention(model: nn.Module):
    """Switch to eager attention (weights visible) for the duration, then back."""
    before = attn_implementation(model)
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)


def first_token_mass(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H]: attention on each row's first real token, averaged over its real query positions.

    probs: [B, H, S, S] attention weights; mask: [B, S] True at real tokens.
    """
    first = mask.float().argmax(-1)  # index of the first real token (left padding moves it)
    on_first = probs.gather(-1, first.view(-1, 1, 1, 1).expand(*probs.shape[:3], 1)).squeeze(-1)  # [B, H, S]
    q = mask.unsqueeze(1).to(probs.dtype)
    return (on_first * q).sum(-1) / q.sum(-1).clamp(min=1)


def topk_column_mass(probs: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, H]: mass of the k key columns that receive the most attention, averaged over real queries."""
    q = mask.unsqueeze(1).unsqueeze(-1).to(probs.dtype)  # [B, 1, S, 1]
    columns = (probs * q).sum(-2) / q.sum(-2).clamp(min=1)  # [B, H, S]
    return columns.topk(min(k, columns.shape[-1]), dim=-1).values.sum(-1)
