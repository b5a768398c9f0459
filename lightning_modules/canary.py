"""Canary fine-tuning and its privacy audit: how much a fine-tuning run leaks, measured.

Panda et al., "Privacy Auditing of Large Language Models", arXiv 2503.06808 (ICLR 2025), with the
one-run audit of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", arXiv
2305.08846. The model fine-tunes on text with the member canaries of ``CanaryDataModule`` mixed
in (full fine-tuning or a peft LoRA adapter; AdamW at a constant rate), optionally under DP-SGD:
per-sample clipping and Gaussian noise from Opacus, whose accountant sets the noise for a target
ε at δ and reports the ε spent. Validation (at the end of ``fit``, or ``validate`` on a checkpoint)
scores every canary: the mean loss on its secret, and the white-box distance its secret tokens'
output rows moved, Σ‖W[t] − W_init[t]‖². The audit writes ``audit.json`` (beside ``audit.md`` and
``audit.csv``) with AUC, TPR at 1% and 0.1% FPR, and the empirical ε lower bound from the
pre-registered ``audit.k`` guesses; the theoretical ε of a DP run stands beside it.

Every example counts once per step: the loss is the mean over the rows of each row's mean token
loss, so a member canary weighs as much as a text block, as in DP-SGD where the example is the
unit of privacy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch

from lantern import reporting
from lantern.datamodules.canaries import Canaries, seeded
from lantern.errors import CheckpointError, ConfigError, require
from lantern.lightning_modules.dpo import AdapterCheckpoint, LoRA
from lantern.lightning_modules.optim import AdamW, total_steps
from lantern.metrics import auroc, epsilon_lower_bound, roc_curve, tpr_at_fpr
from lantern.models import completion_logprobs, load_model
from lantern.models.loading import DEFAULT_MODEL, load_tokenizer


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings (METHODS: ε 4, δ 1/(2n), clip 1.0).

    Args:
        epsilon: the target ε the noise is calibrated to, over the whole run.
        delta: the target δ; None: 1/(2n), n the rows that may enter training.
        max_grad_norm: every example's gradient is clipped to this L2 norm.
        accountant: Opacus's ``rdp`` (Rényi DP) or ``prv`` (tighter, numerical).
    """

    epsilon: float = 4.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self):
        require(self.epsilon > 0 and math.isfinite(self.epsilon), "dp", "epsilon", self.epsilon, "a finite ε > 0")
        require(self.delta is None or 0 < self.delta < 1, "dp", "delta", self.delta, "a δ in (0, 1), or null for 1/(2n)")
        require(self.max_grad_norm > 0, "dp", "max_grad_norm", self.max_grad_norm, "> 0")
        require(self.accountant in ("rdp", "prv"), "dp", "accountant", self.accountant, "'rdp' or 'prv'")


@dataclass(frozen=True)
class Audit:
    """The pre-registered audit: which score, which direction means member, how many guesses.

    Args:
        k: guesses "member" on the k canaries that look most like members; abstains on the rest.
        score: ``loss`` (mean loss on the secret) or ``embedding`` (how far the secret's output rows moved).
        member_when: ``lower`` or ``higher`` score means member; None: the natural one (loss: lower; embedding: higher).
        delta: the δ at which the empirical ε is bounded.
        confidence: the bound holds with probability 1 − confidence.
    """

    k: int = 100
    score: Literal["loss", "embedding"] = "loss"
    member_when: Literal["lower", "higher"] | None = None
    delta: float = 1e-5
    confidence: float = 0.05

    def __post_init__(self):
        require(isinstance(self.k, int) and self.k >= 1, "audit", "k", self.k, "an integer ≥ 1")
        require(self.score in ("loss", "embedding"), "audit", "score", self.score, "'loss' or 'embedding'")
        require(self.member_when in ("lower", "higher", None), "audit", "member_when", self.member_when,
                "'lower', 'higher', or null for the score's natural direction")
        require(0 <= self.delta < 1, "audit", "delta", self.delta, "a δ in [0, 1)")
        require(0 < self.confidence < 1, "audit", "confidence", self.confidence, "a number in (0, 1), e.g. 0.05")

    @property
    def direction(self) -> str:
        return self.member_when or ("lower" if self.score == "loss" else "higher")


def audit_report(loss: torch.Tensor, embedding: torch.Tensor, member: torch.Tensor, audit: Audit) -> dict:
    """ROC summaries of both scores and the one-run ε lower bound of the pre-registered one."""
    m = member.numel()
    require(audit.k <= m, "audit", "k", audit.k, f"at most the {m} canaries")
    member = member.bool().cpu()
    scores = {"loss": loss.double().cpu(), "embedding": embedding.double().cpu()}
    report = {"canaries": m, "members": int(member.sum())}
    for name, raw in scores.items():
        s = -raw if name == "loss" else raw  # higher = member
        fpr, tpr = roc_curve(s, member)
        report[name] = {"auc": float(auroc(s, member)), "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
                        "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001)}
    raw = scores[audit.score]
    guesses = torch.argsort(raw if audit.direction == "lower" else -raw, stable=True)[: audit.k]
    correct = int(member[guesses].sum())
    report["audit"] = {**asdict(audit), "member_when": audit.direction, "correct": correct,
                       "epsilon_lb": epsilon_lower_bound(m, audit.k, correct, audit.delta, audit.confidence)}
    return report


def roc_figure(loss: torch.Tensor, embedding: torch.Tensor, member: torch.Tensor, title: str):
    """Both scores' ROC on log–log axes, where the low-FPR region an audit lives in is visible."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    floor = 0.5 / max(1, int((~member.bool()).sum()))
    for name, s in (("loss", -loss.double()), ("embedding", embedding.double())):
        fpr, tpr = roc_curve(s.cpu(), member.cpu())
        ax.plot(fpr.clamp(min=floor).numpy(), tpr.clamp(min=floor).numpy(), label=f"{name} (AUC {float(auroc(s.cpu(), member.cpu())):.3f})")
    ax.plot([floor, 1], [floor, 1], "k:", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def dp_epsilon(noise: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε spent after ``steps`` Poisson-sampled Gaussian steps (Opacus's accountant)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise, rate, steps)] if steps > 0 else []
    return float(acc.get_epsilon(delta)) if steps > 0 else 0.0


def add_new_tokens(model, first: int, count: int) -> None:
    """Rows ``first`` … ``first + count − 1`` for fresh tokens: output rows zero (logit exactly 0), input rows
    the mean embedding (zero too when the two are tied)."""
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < first + count:
        model.resize_token_embeddings(first + count, mean_resizing=False)
        emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    with torch.no_grad():
        if out.weight.data_ptr() != emb.weight.data_ptr():
            emb.weight[first: first + count] = emb.weight[:first].mean(0)
        out.weight[first: first + count] = 0
        if getattr(out, "bias", None) is not None:
            out.bias[first: first + count] = 0


class CanaryFineTuning(AdapterCheckpoint, L.LightningModule):
    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        lora: LoRA | None = None,
        optim: AdamW = AdamW(lr=5e-5, min_lr_ratio=1.0),
        dp: DPSGD | None = None,
        audit: Audit = Audit(),
        seed: int = 0,
    ):
        """
        Args:
            model_name: the model fine-tuned and audited (see ``lantern.models.load_model``).
            lora: train a peft LoRA adapter instead of every weight (METHODS: r 8, α 32); null: full fine-tuning.
            optim: AdamW; the paper's lr 5e-5, constant.
            dp: train with DP-SGD (per-sample clipping and noise, Poisson sampling); null: plain fine-tuning.
            audit: the pre-registered audit.
            seed: initialisation seed of tiny test models; DP noise seed.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optim", "lora", "dp", "audit"])
        self.hparams.update(optim=optim.as_dict(), lora=None if lora is None else lora.as_dict(),
                            dp=None if dp is None else asdict(dp), audit=asdict(audit))
        self.optim, self.lora, self.dp, self.audit = optim, lora, dp, audit
        self.tokenizer_name = model_name
        base = load_model(model_name, seed=seed)
        self.model = (base if lora is None else lora.apply(base, self, model_name)).train()
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self.canaries: Canaries | None = None
        self._initial = None  # [m, s, D] the secret tokens' output rows before fine-tuning
        self._dp = ()  # (GradSampleModule, noise multiplier, sampling rate, δ), outside the module tree
        self._trained: dict = {}  # what a checkpoint says of the run that wrote it (its step, its DP noise)
        self._scores: list[tuple[torch.Tensor, ...]] = []

    # ------------------------------------------------------------------ data and model set-up
    def check_datamodule(self, dm) -> None:
        """Mistakes found before the trainer starts."""
        if not hasattr(dm, "build_canaries"):
            raise ConfigError(self, "data", type(dm).__name__, "a CanaryDataModule (canaries mixed into the fine-tuning text)")
        if getattr(dm, "tokenizer_name", None) is None:
            dm.tokenizer_name = self.tokenizer_name
        require(self.audit.k <= dm.m, self, "audit.k", self.audit.k, f"at most the {dm.m} canaries (data.canaries)")
        if dm.tokenizer_name != self.tokenizer_name and dm.tokenizer.fingerprint != load_tokenizer(self.tokenizer_name).fingerprint:
            raise ConfigError(dm, "tokenizer", dm.tokenizer_name, f"the model's tokenizer {self.tokenizer_name!r} (or null)")
        if self.dp is not None and dm.canary_rate is not None:
            raise ConfigError(dm, "canary_rate", dm.canary_rate, "null with DP-SGD: every row is Poisson-sampled at "
                              "batch_size/n")
        if dm.design == "new" and self.lora is not None:
            raise ConfigError(self, "lora", self.hparams.lora, "null with design 'new': a new token's output row "
                              "starts at zero and only full fine-tuning trains it")

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.check_datamodule(dm)
        dm.setup(stage)
        if self.canaries is None:
            self.canaries = dm.canaries
            if self.canaries.new_tokens:
                add_new_tokens(self._base(), dm.tokenizer.vocab_size, self.canaries.new_tokens)
            self._initial = self._secret_rows().clone()
        if self.dp is not None:
            trainer = self.trainer
            if trainer.world_size > 1 or trainer.accumulate_grad_batches > 1:
                raise ConfigError(self, "dp", self.hparams.dp, "one device and accumulate_grad_batches: 1 (DP-SGD here "
                                  "clips and noises each step's batch on its own)")
            if trainer.gradient_clip_val:
                raise ConfigError("trainer", "gradient_clip_val", trainer.gradient_clip_val,
                                  "null with DP-SGD: each example is clipped to model.dp.max_grad_norm instead")
            dm.poisson = min(1.0, dm.batch_size / dm.train_rows)

    def _base(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _secret_rows(self) -> torch.Tensor:
        weight = self._base().get_output_embeddings().weight
        return weight.detach()[self.canaries.secret_ids.to(weight.device)].float()

    def on_fit_start(self) -> None:
        self._save_canaries()

    def on_validation_start(self) -> None:
        self._save_canaries()

    def _save_canaries(self) -> None:
        out = reporting.run_dir(self.trainer) / "canaries.json"
        if self.trainer.is_global_zero and not out.exists():
            import json

            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.canaries.as_dict()))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["canaries"] = self.canaries.digest
        checkpoint["canary_run"] = {"step": self.global_step, "dp": list(self._dp[1:]) if self._dp else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._trained = checkpoint.get("canary_run") or {}
        stored = checkpoint.get("canaries")
        if stored is not None and self.canaries is not None and stored != self.canaries.digest:
            raise CheckpointError(f"this checkpoint was trained with other canaries (digest {stored}, the data now gives "
                                  f"{self.canaries.digest}): use the run's data settings and seed")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scored = completion_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                     per_sample=self.dp is not None)
        loss = -scored.mean.mean()
        if self._dp:  # the noise of step t depends on (seed, t) only: a resumed run adds the same noise
            self.optimizers().optimizer.generator = seeded(self.hparams.seed, 6, self.global_step, device=self.device)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        config = self.optim.configure(self.model, total_steps(self.trainer))
        if self.dp is None:
            return config
        from opacus import GradSampleModule
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        dm = self.trainer.datamodule
        steps, rate = total_steps(self.trainer), dm.poisson
        delta = self.dp.delta if self.dp.delta is not None else 1 / (2 * dm.train_rows)
        try:
            noise = get_noise_multiplier(target_epsilon=self.dp.epsilon, target_delta=delta, sample_rate=rate, steps=steps,
                                         accountant=self.dp.accountant)
        except ValueError as err:
            raise ConfigError(self, "dp.epsilon", self.dp.epsilon, f"an ε the accountant can reach at δ={delta:.3g}, "
                              f"sampling rate {rate:.3g} and {steps} steps ({err})") from None
        if not self._dp:
            self._dp = (GradSampleModule(self.model, batch_first=True, loss_reduction="mean"), noise, rate, delta)
        reporting.say(self.trainer, f"DP-SGD: noise multiplier {noise:.3f} for ε={self.dp.epsilon} at δ={delta:.3g} "
                                    f"over {steps} steps at sampling rate {rate:.4g}")
        optimizer = DPOptimizer(config["optimizer"], noise_multiplier=noise, max_grad_norm=self.dp.max_grad_norm,
                                expected_batch_size=max(1, round(rate * dm.train_rows)), loss_reduction="mean")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, list(config["lr_scheduler"]["scheduler"].lr_lambdas))
        return {"optimizer": optimizer, "lr_scheduler": {**config["lr_scheduler"], "scheduler": schedule}}

    # ------------------------------------------------------------------ scoring and the audit
    def on_validation_epoch_start(self) -> None:
        self._scores = []

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids = batch["input_ids"]
        loss = -completion_logprobs(self.model, ids, torch.ones_like(ids), batch["secret_mask"]).mean
        index, rows = batch["index"], self._secret_rows()
        self._initial = self._initial.to(rows.device)
        moved = ((rows[index] - self._initial[index]) ** 2).sum((-1, -2))
        self._scores.append((index, loss.float(), moved))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._scores:
            return
        index, loss, moved = (torch.cat(t) for t in zip(*self._scores))
        if self.trainer.world_size > 1:  # every rank scored its share (padded by repeats): gather, place by index
            index, loss, moved = (self.all_gather(t).flatten() for t in (index, loss, moved))
        m = len(self.canaries)
        scores = torch.zeros(2, m, dtype=torch.float64)
        scores[:, index.cpu()] = torch.stack([loss.cpu(), moved.cpu()]).double()
        self._scores = []
        report = audit_report(scores[0], scores[1], self.canaries.member, self.audit)
        trained = self.trainer.state.fn == "fit"  # else: a checkpoint's weights, scored by validate or test
        step = self.global_step if trained else self._trained.get("step", self.global_step)
        report.update(design=self.canaries.design, canaries_digest=self.canaries.digest, step=step,
                      fine_tuning="full" if self.lora is None else "lora", dp=None)
        noised = self._dp[1:] if self._dp else self._trained.get("dp")
        if self.dp is not None and noised:
            noise, rate, delta = noised
            at = self.audit.delta if self.audit.delta > 0 else delta
            report["dp"] = {**asdict(self.dp), "delta": delta, "noise_multiplier": noise, "sampling_rate": rate,
                            "epsilon": dp_epsilon(noise, rate, step, delta, self.dp.accountant),
                            "audit_delta": at, "epsilon_at_audit_delta": dp_epsilon(noise, rate, step, at, self.dp.accountant)}
        for name in ("loss", "embedding"):
            for key, value in report[name].items():
                self.log(f"audit/{name}_{key}", value, rank_zero_only=True)
        self.log("audit/epsilon_lb", report["audit"]["epsilon_lb"], rank_zero_only=True)
        rows = [{"score": name, **report[name]} for name in ("loss", "embedding")]
        head = (f"{self.canaries.design} canaries, step {step}: ε_lb = {report['audit']['epsilon_lb']:.3f} "
                f"({report['audit']['correct']} of k={self.audit.k} guesses right, {self.audit.score} "
                f"{self.audit.direction}, δ={self.audit.delta}, confidence {self.audit.confidence})")
        if report["dp"]:
            dp = report["dp"]
            head += (f"; DP-SGD ε = {dp['epsilon_at_audit_delta']:.3f} at the audit's δ={dp['audit_delta']:.3g} "
                     f"({dp['epsilon']:.3f} at the training δ={dp['delta']:.3g})")
        reporting.write_table(self.trainer, rows, "audit", "audit/report", payload=report,
                              markdown=head + "\n\n" + reporting.markdown_table(rows))
        reporting.write_figure(self.trainer, roc_figure(scores[0], scores[1], self.canaries.member,
                                                        f"{self.canaries.design} canaries"), "audit/roc", "roc")
        reporting.say(self.trainer, head)
