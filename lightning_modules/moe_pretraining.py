"""Language-model pretraining of an MoE transformer: TopK vs Default MoE routing.

Default MoE: Panda et al., "Dense Backpropagation Improves Training for Sparse
Mixture-of-Experts", arXiv 2504.12463. The routing itself lives in ``lantern.models.moe``; this
module adds the objective (next-token cross-entropy + α·load-balancing + optional z-loss),
AdamW with linear warm-up and cosine decay (``lightning_modules.optim``), and the logs a researcher compares the two
routers by: losses, perplexity, tokens/s, per-expert load and router gradient density.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MeanMetric

from lantern.errors import ConfigError, require
from lantern.lightning_modules.optim import AdamW, total_steps
from lantern.models.moe import MoEFeedForward, MoETransformer


class MoEPretraining(L.LightningModule):
    def __init__(
        self,
        model: MoETransformer,
        optim: AdamW = AdamW(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=100, min_lr_ratio=0.1),
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        log_expert_load_every_n_steps: int = 50,
    ):
        """
        Args:
            model: the MoE transformer to train.
            optim: AdamW, warm-up and cosine decay to ``lr·min_lr_ratio`` at ``trainer.max_steps``
                (the paper's: (0.9, 0.95), weight decay 0.1, 1% warm-up, decay to lr/10).
            aux_loss_coef: α of the load-balancing loss α·E·Σ f_i·P_i, per MoE layer and summed over
                layers, as the paper's code does.
            z_loss_coef: weight of the router z-loss (0 disables it, the paper's setting).
            log_expert_load_every_n_steps: how often the per-expert load histogram is written.
        """
        super().__init__()
        require(aux_loss_coef >= 0, self, "aux_loss_coef", aux_loss_coef, "≥ 0")
        require(z_loss_coef >= 0, self, "z_loss_coef", z_loss_coef, "≥ 0")
        require(log_expert_load_every_n_steps >= 0, self, "log_expert_load_every_n_steps", log_expert_load_every_n_steps, "≥ 0 (0: never)")
        self.save_hyperparameters(ignore=["model", "optim"])
        self.hparams["optim"] = optim.as_dict()
        self.optim = optim
        self.model = model
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self._load = torch.zeros(len(model.moe_layers), model.n_experts, dtype=torch.long)
        self._moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEFeedForward)]  # histogram names
        self._last_step_time: float | None = None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self.check_datamodule(dm)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (configs/strategy/fsdp.yaml): FSDP2, one unit per block."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self._trainer.strategy, ModelParallelStrategy):
            return
        from lantern.parallel import data_parallel_mesh, shard_blocks

        # The MoE layers, not their routers, are the fp32 units should a policy gather the rest in
        # bf16: a layer reads router.weight itself, and FSDP2 gathers a unit only in its own forward.
        shard_blocks(self.model, data_parallel_mesh(self.device_mesh), self.model.blocks, fp32_modules=self.model.moe_layers)

    def check_datamodule(self, dm) -> None:
        """The data must fit the model: its vocabulary and its block length."""
        data_vocab = getattr(dm, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.model.vocab_size:
            raise ConfigError(self.model, "vocab_size", self.model.vocab_size,
                              f"≥ {data_vocab}, the vocabulary of data.tokenizer={dm.tokenizer_name!r}")
        block = getattr(dm, "block_size", None)
        if block is not None and block > self.model.max_seq_len:
            raise ConfigError(dm, "block_size", block, f"≤ the model's max_seq_len={self.model.max_seq_len}")

    def _lm_loss(self, batch: dict[str, torch.Tensor]):
        out = self.model(batch["input_ids"], labels=batch["labels"])  # chunked: no [B, S, V] fp32 logits
        return out.loss, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm, out = self._lm_loss(batch)
        hp = self.hparams
        loss = lm + hp.aux_loss_coef * out.aux_loss + hp.z_loss_coef * out.z_loss
        # Everything below stays on the device: no host sync inside the step.
        self.log("train/loss", lm, prog_bar=True)
        self.log_dict({"train/aux_loss": out.aux_loss, "train/z_loss": out.z_loss, "train/total_loss": loss})
        counts = out.expert_counts.detach()
        if self._load.device != counts.device:
            self._load = self._load.to(counts.device)
        self._load += counts
        imbalance = (counts.max(-1).values.float() * self.model.n_experts / counts.sum(-1).clamp(min=1)).mean()
        self.log("moe/load_imbalance", imbalance)  # max_i f_i · E, 1 = perfectly balanced
        for name in ("default_share", "selected_mass"):  # the default term's share of |y|; Σ_{TopK} π
            values = [getattr(m, name) for m in self.model.moe_layers if getattr(m, name) is not None]
            if values:
                self.log(f"moe/{name}", torch.stack(values).mean())

        now = time.perf_counter()
        if self._last_step_time is not None:
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._last_step_time))
        self._last_step_time = now
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.commit_defaults()  # Ê moves once per optimizer step, whatever the accumulation

    def on_after_backward(self) -> None:
        masks = [m.router_grad_nonzero for m in self.model.moe_layers if m.router_grad_nonzero is not None]
        if masks:
            # Share of (token, expert) pairs whose router probability got a gradient from the
            # mixture: K/E under TopK routing, 1 under Default MoE.
            self.log("moe/router_grad_density", torch.stack([m.float().mean() for m in masks]).mean())
            for m in self.model.moe_layers:
                m.router_grad_nonzero = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.hparams.log_expert_load_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    _log_expert_load(logger, self._load, self.global_step, self._moe_blocks)
            self._load.zero_()

    def on_validation_start(self) -> None:
        self._last_step_time = None  # keep evaluation time out of train/tokens_per_s

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_eval(self.val_loss, "val")

    def on_test_epoch_end(self) -> None:
        self._log_eval(self.test_loss, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], metric: MeanMetric) -> None:
        lm, _ = self._lm_loss(batch)
        metric.update(lm, weight=batch["labels"].numel())  # token-weighted: a short last batch counts less

    def _log_eval(self, metric: MeanMetric, split: str) -> None:
        loss = metric.compute()  # already reduced over processes; sync_dist only silences a warning
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss)}, prog_bar=True, sync_dist=True)
        metric.reset()

    def configure_optimizers(self):
        return self.optim.configure(self.model, total_steps(self.trainer))


def _log_expert_load(logger: TensorBoardLogger, load: torch.Tensor, step: int, blocks: list[int]) -> None:
    """One histogram per MoE layer with the expert index on the x axis and its token count as height."""
    for layer, counts in zip(blocks, load.tolist()):  # one sync per logging interval
        n = sum(counts)
        if n == 0:
            continue
        idx = range(len(counts))
        logger.experiment.add_histogram_raw(
            f"moe/expert_load/L{layer}", min=0, max=len(counts) - 1, num=n,
            sum=float(sum(i * c for i, c in zip(idx, counts))),
            sum_squares=float(sum(i * i * c for i, c in zip(idx, counts))),
            bucket_limits=[i + 0.5 for i in idx], bucket_counts=counts, global_step=step,
        )
