"""The optimiser and schedule every method shares: AdamW, linear warm-up, cosine decay.

A method takes ``optim: AdamW = AdamW(<its paper's defaults>)``; a recipe overrides single
fields (``model.init_args.optim.lr: 3e-4``). ``min_lr_ratio: 1`` gives a constant rate after
warm-up. Weight decay applies to matrices only, never to vectors (norm scales, biases).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lantern.errors import require


@dataclass(frozen=True)
class AdamW:
    """AdamW with warm-up and cosine decay.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay on parameters with ≥ 2 dimensions (all, with ``configure(decay_all=True)``).
        betas: Adam's (β1, β2).
        eps: Adam's ε.
        warmup_steps: linear warm-up from lr/warmup_steps to lr.
        min_lr_ratio: the cosine ends at lr·min_lr_ratio at the last step (1 keeps lr constant).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        require(math.isfinite(self.lr) and self.lr > 0, "optim", "lr", self.lr, "a finite learning rate > 0")
        require(self.weight_decay >= 0, "optim", "weight_decay", self.weight_decay, "≥ 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim", "betas", list(self.betas),
                "two numbers in [0, 1), e.g. [0.9, 0.95]")
        require(self.eps > 0, "optim", "eps", self.eps, "> 0")
        require(self.warmup_steps >= 0, "optim", "warmup_steps", self.warmup_steps, "≥ 0")
        require(0 <= self.min_lr_ratio <= 1, "optim", "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")

    def as_dict(self) -> dict:
        """Plain values for hyperparameters (checkpoints stay loadable with ``weights_only=True``)."""
        return {**asdict(self), "betas": list(self.betas)}

    def configure(self, module: nn.Module, total_steps: int, decay_all: bool = False) -> dict:
        """What ``configure_optimizers`` returns: the optimizer and a per-step schedule.

        ``decay_all`` decays every trainable tensor (adapters: LoRI-S keeps its sparse B as a vector).
        """
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [decay_all or p.ndim >= 2 for p in params]
        groups = [
            {"params": [p for p, d in zip(params, decay) if d], "weight_decay": self.weight_decay},
            {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=tuple(self.betas), eps=self.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def total_steps(trainer) -> int:
    return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
