"""Hook lifecycle shared by the interpretability callbacks.

Hooks are registered on the raw model (never a replaced module or patched ``forward``) in
``setup`` or inside ``applied(model)``, and removed in ``teardown`` or on leaving the
context. A pre-hook on the model itself captures which tokens are real (from
``attention_mask``), so reductions over positions are padding-aware on either side. Under a
KV cache (cached ``generate``) a call computes only its S new positions while the mask spans
past and new ones; ``real_tokens`` and ``key_mask`` reconcile the two or raise, never guess.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from lantern.errors import DataError, require
from lantern.models.adapters import ArchAdapter, attn_implementation, get_adapter


class ModelHookCallback(L.Callback):
    def __init__(self, model_attr: str = "model"):
        self.model_attr = model_attr
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.token_mask: torch.Tensor | None = None  # [B, past + S] bool, True at real tokens; None: no mask given
        self.past_len = 0  # positions already in the KV cache when the current call started

    # -- to implement
    def _register(self, model: nn.Module, adapter: ArchAdapter) -> None:
        raise NotImplementedError

    # -- masks of the current forward call
    def real_tokens(self, batch: int, seq: int, device) -> torch.Tensor:
        """[B, S] True at the real tokens among the S positions this call computes.

        A KV-cached call feeds only its new positions, and its mask spans past and new ones:
        those are its last S columns. Anything else cannot be lined up, so it raises.
        """
        mask = self.token_mask
        if mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        if mask.shape[0] != batch or mask.shape[1] < seq:
            raise DataError(f"{type(self).__name__}: attention_mask of shape {tuple(mask.shape)} does not cover "
                            f"the {batch} × {seq} positions of this forward call")
        return mask[:, mask.shape[1] - seq:].to(device)

    def key_mask(self, batch: int, keys: int, device) -> torch.Tensor:
        """[B, K] True at the real tokens among all K key positions (past and new) the call attends to."""
        mask = self.token_mask
        if mask is None:
            return torch.ones(batch, keys, dtype=torch.bool, device=device)
        if tuple(mask.shape) != (batch, keys):
            raise DataError(f"{type(self).__name__}: attention_mask of shape {tuple(mask.shape)} does not match "
                            f"the {batch} × {keys} key positions of this forward call")
        return mask.to(device)

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
            bound = {**bound.pop("kwargs", {}), **bound}
            mask, ids = bound.get("attention_mask"), bound.get("input_ids")
            if ids is None:
                ids = bound.get("inputs_embeds")
            cache = bound.get("cache") if bound.get("cache") is not None else bound.get("past_key_values")
            self.token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            if self.token_mask is not None and isinstance(ids, torch.Tensor):
                self.past_len = self.token_mask.shape[1] - ids.shape[1]
            else:  # without a mask only the cache itself knows whether this call extends a sequence
                self.past_len = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0

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


def check_layers(layers, n_layers: int, owner, field: str = "layers") -> list[int]:
    """The layer indices asked for (None: all), each checked against the model's depth."""
    if layers is None:
        return list(range(n_layers))
    require(len(layers) > 0 and all(isinstance(layer, int) and 0 <= layer < n_layers for layer in layers), owner, field,
            list(layers), f"a non-empty list of layer indices in [0, {n_layers}): the model has {n_layers} layers")
    return list(layers)


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


def first_token_mass(probs: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """[B, H]: attention on each row's first real token, averaged over its real query positions.

    probs: [B, H, Q, K] attention weights; key_mask: [B, K] and query_mask: [B, Q], True at real
    tokens. Under a KV cache Q < K: the queries are the last Q positions, the keys all of them.
    Padding rows are selected away, not multiplied by 0: eager attention may leave them NaN.
    """
    first = key_mask.float().argmax(-1)  # index of the first real token (left padding moves it)
    on_first = probs.gather(-1, first.view(-1, 1, 1, 1).expand(*probs.shape[:3], 1)).squeeze(-1)  # [B, H, Q]
    q = query_mask.unsqueeze(1)
    return on_first.where(q, 0).sum(-1) / q.sum(-1).clamp(min=1)


def topk_column_mass(probs: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, H]: mass of the k real key columns that receive the most attention, averaged over real queries."""
    q = query_mask.unsqueeze(1).unsqueeze(-1)  # [B, 1, Q, 1]
    columns = probs.where(q, 0).sum(-2) / q.sum(-2).clamp(min=1)  # [B, H, K]
    return columns.masked_fill(~key_mask.unsqueeze(1), 0).topk(k, dim=-1).values.sum(-1)
