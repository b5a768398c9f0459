"""Keep NaN and inf out of the weights and out of every checkpoint.

A diverging run shows it first in the gradients: the update that writes NaN into the weights
comes one step before the loss turns NaN. ``NonFiniteGuard`` therefore checks the gradients
(and so the loss they came from) before each optimizer step, and stops — or skips that update —
before anything non-finite reaches the weights. ``FiniteCheckpoint`` refuses to write a
checkpoint whose weights or optimizer state are not finite, and remembers the last one it
wrote, so an error can name a checkpoint that really is good.

The check costs one device→host sync per optimizer step. Runs under fp16 with a gradient
scaler are left to the scaler, which already skips overflowing steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lantern.errors import NonFiniteError, require


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2): the callers reduce the verdict over ranks."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _all_finite(tensors) -> torch.Tensor:
    """One flag for all, gathered per device (AdamW keeps its step counts on the CPU)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            t = _local(t)
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return torch.stack([torch.stack(f).all().cpu() for f in flags.values()]).all() if flags else torch.tensor(True)


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """'the last finite checkpoint is …', or that there is none."""
    paths = [getattr(cb, "last_good_path", None) for cb in trainer.checkpoint_callbacks]
    paths = [p for p in paths if p and Path(p).exists()]  # a sharded (FSDP) checkpoint is a folder
    return f"the last finite checkpoint is {paths[-1]}" if paths else "no checkpoint was written"


class NonFiniteGuard(L.Callback):
    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10):
        """
        Args:
            action: on non-finite gradients, ``stop`` training with an error, or ``skip`` the update.
            max_skips: under ``skip``, stop after this many consecutive skipped updates.
        """
        require(action in ("stop", "skip"), self, "action", action, "'stop' or 'skip'")
        require(max_skips >= 1, self, "max_skips", max_skips, "≥ 1")
        self.action, self.max_skips = action, max_skips
        self.skipped = 0  # consecutive
        self.skipped_total = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Every rank decides the same: under FSDP each holds only its shard of the gradients.
        if trainer.strategy.reduce_boolean_decision(bool(_all_finite(p.grad for p in params)), all=True):
            self.skipped = 0
            return
        loss = trainer.callback_metrics.get("train/loss")
        what = f"non-finite gradients at step {trainer.global_step}" + (f" (train/loss {float(loss):.4g})" if loss is not None else "")
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            self.skipped_total += 1
            for p in params:  # AdamW and SGD leave a parameter without a gradient untouched
                p.grad = None
            pl_module.log("train/skipped_updates", float(self.skipped_total))
            return
        stop = f"{self.max_skips} updates in a row were skipped, " if self.action == "skip" else ""
        raise NonFiniteError(
            f"{what}: {stop}training stopped before the update reached the weights; {last_good_checkpoint(trainer)}"
        )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "skipped_total": self.skipped_total}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.skipped_total = state_dict["skipped"], state_dict["skipped_total"]


class FiniteCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes only finite states and links ``<experiment>/latest`` to the run."""

    last_good_path: str | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module  # local shards under FSDP: the decision is reduced over ranks
        tensors = [*module.parameters(), *module.buffers()]
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():  # the live state: no state_dict copy per save
                tensors += list(state.values())
        finite = trainer.strategy.reduce_boolean_decision(bool(_all_finite(tensors)), all=True)
        if not finite:
            raise NonFiniteError(
                f"step {trainer.global_step}: the weights or optimizer state are not finite, so {Path(filepath).name} "
                f"was not written; training stopped; {last_good_checkpoint(trainer)}"
            )
        super()._save_checkpoint(trainer, filepath)
        self.last_good_path = filepath
        if trainer.is_global_zero:
            link_latest(Path(filepath).parent.parent)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_good_path": self.last_good_path}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.last_good_path = state_dict.get("last_good_path")


def link_latest(run: Path) -> None:
    """``runs/<name>/latest`` → this run's ``version_N``, so commands need no version number."""
    if not run.name.startswith("version_") or not run.is_dir():
        return
    link, tmp = run.parent / "latest", run.parent / f".latest-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a filesystem without symlinks: the version folders still say it all
        pass
