"""Zero chosen attention heads of any supported model, under any attention backend.

A forward pre-hook on each layer's ``o_proj`` sees the concatenated head outputs
``[B, S, H·D]``; zeroing slice h removes head h's contribution −W_O[:, h]·o_h exactly,
whether attention ran eager, sdpa or flash. Used by the dormant-heads study (arXiv 2504.03889).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from models.adapters import get_adapter


class HeadAblation(L.Callback):
    def __init__(self, heads: list[tuple[int, int]], model_attr: str = "model"):
        """
        Args:
            heads: (layer, head) pairs to zero.
            model_attr: attribute of the LightningModule holding the model (the module itself if absent).
        """
        self.heads = [tuple(h) for h in heads]
        self.model_attr = model_attr
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        n_layers, n_heads, head_dim = adapter.num_layers(model), adapter.num_heads(model), adapter.head_dim(model)
        by_layer: dict[int, list[int]] = defaultdict(list)
        for layer, head in self.heads:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ValueError(f"head ({layer}, {head}) out of range: the model has {n_layers} layers × {n_heads} heads")
            by_layer[layer].append(head)
        self.detach()
        for layer, heads in by_layer.items():
            index = torch.tensor(sorted(set(heads)))

            def zero_heads(module, args, index=index):
                x = args[0]
                x = x.view(*x.shape[:-1], n_heads, head_dim).index_fill(-2, index.to(x.device), 0.0)
                return (x.flatten(-2), *args[1:])

            self._handles.append(adapter.out_proj(model, layer).register_forward_pre_hook(zero_heads))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def applied(self, model: nn.Module):
        """``with HeadAblation([(3, 1)]).applied(model): model(...)`` — hooks removed on exit."""
        self.attach(model)
        try:
            yield model
        finally:
            self.detach()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.attach(getattr(pl_module, self.model_attr, pl_module))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()
