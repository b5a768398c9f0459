"""Direct Preference Optimization on any supported causal LM, full fine-tuning or LoRA (peft).

Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290; FRIT's trainer (arXiv
2509.13334, whose defaults the recipe carries: β 0.05, lr 2e-6, 5 pairs per batch, 512 tokens).
Loss per pair: −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]), π and ref the summed log-probs of the
reply tokens (the prompt carries no loss), over a ``[chosen; rejected]`` batch in one forward.

The reference is either ``precomputed`` (log-probs stored with the pairs by the model that made
them, e.g. FRIT's pair builder: no second forward, no second model) or ``live``: the same model
with its LoRA adapter switched off, or, for full fine-tuning, a frozen copy loaded beside it.
Logged as TRL names them: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (``val/…`` in validation).

After ``fit`` the policy's last weights are written as a plain Hugging Face model (``model/`` in the
run directory, LoRA folded in) that any recipe loads by path: the next round of FRIT starts from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F

from lantern import reporting
from lantern.datamodules.preference import reference_settings
from lantern.errors import ConfigError, require
from lantern.lightning_modules.optim import AdamW, total_steps
from lantern.models import completion_logprobs, load_model
from lantern.models import lori
from lantern.models.loading import BYTE_MARKER, load_tokenizer


@dataclass(frozen=True)
class LoRA:
    """peft LoRA settings for a run that trains an adapter instead of every weight (DPO, canary fine-tuning)."""

    rank: int = 16
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.0

    def __post_init__(self):
        require(isinstance(self.rank, int) and self.rank >= 1, "lora", "rank", self.rank, "an integer ≥ 1")
        require(self.alpha > 0, "lora", "alpha", self.alpha, "> 0")
        require(0 <= self.dropout < 1, "lora", "dropout", self.dropout, "a probability in [0, 1)")
        require(len(self.target_modules) > 0, "lora", "target_modules", list(self.target_modules),
                "at least one projection name")

    def as_dict(self) -> dict:
        return {**self.__dict__, "target_modules": list(self.target_modules)}

    def apply(self, model, owner, model_name: str):
        """``model`` wrapped by peft with this adapter (the base frozen); unknown projection names fail here."""
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in self.target_modules if t not in present]
        if missing:
            raise ConfigError(owner, "lora.target_modules", list(self.target_modules),
                              f"projection names of {model_name} (it has no {missing[0]!r}; it has {sorted(present)})")
        return get_peft_model(model, LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                                target_modules=list(self.target_modules)))


class AdapterCheckpoint:
    """For a LightningModule with ``self.lora`` and ``self._trainable`` (names of trainable tensors):
    with LoRA, checkpoints hold the adapter only (the frozen base is rebuilt from the model's name)."""

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        if self.lora is None:
            return full
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix):] in self._trainable)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.lora is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        missing = sorted(self._trainable - set(state_dict))
        if strict and missing:
            raise ConfigError(self, "checkpoint", missing[0], "a checkpoint of this adapter (it lacks this tensor)")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


class ExportsModel:
    """For a LightningModule with ``self.model``, ``self.lora``, ``self.tokenizer`` and ``model_name``,
    ``seed`` and ``export`` hyperparameters: after ``fit``, the trained model as a plain Hugging Face
    folder (``model/`` in the run directory, LoRA folded in) that any recipe loads by path."""

    def trained_model(self):
        if self.lora is None:
            return self.model
        return lori.merged_model(load_model(self.hparams.model_name, seed=self.hparams.seed), lori.lora_factors(self.model))

    def on_fit_end(self) -> None:
        out = reporting.run_dir(self.trainer) / "model"
        if not self.hparams.export or not self.trainer.is_global_zero:
            return
        self.trained_model().save_pretrained(out, safe_serialization=True)
        if hasattr(self.tokenizer, "tokenizer"):
            self.tokenizer.tokenizer.save_pretrained(out)
        else:
            (out / BYTE_MARKER).write_text("this model reads the byte-level tokenizer\n")
        reporting.say(self.trainer, f"trained model written to {out}")


class DPOTerms(NamedTuple):
    loss: torch.Tensor  # [B] per pair
    chosen_rewards: torch.Tensor  # [B] β·(π_c − ref_c), detached
    rejected_rewards: torch.Tensor  # [B] β·(π_r − ref_r), detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOTerms:
    """The sigmoid DPO loss per pair from summed reply log-probs (all [B])."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return DPOTerms(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())


class DPO(AdapterCheckpoint, ExportsModel, L.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m-instruct",
        beta: float = 0.05,
        reference: Literal["precomputed", "live"] = "precomputed",
        lora: LoRA | None = None,
        optim: AdamW = AdamW(lr=2e-6, min_lr_ratio=1.0),
        export: bool = True,
        seed: int = 0,
    ):
        """
        Args:
            model_name: the policy's starting point and, with ``live``, the reference (see
                ``lantern.models.load_model``; a ``model/`` folder of an earlier round loads by path).
            beta: β, the strength of the pull towards the reference.
            reference: ``precomputed`` (``ref_chosen``/``ref_rejected`` in every pair, written by the
                same model under the same data settings) or ``live`` (computed each step).
            lora: train a peft LoRA adapter instead of every weight; null: full fine-tuning.
            optim: AdamW; FRIT's lr 2e-6, constant.
            export: after ``fit``, write the trained model to ``model/`` in the run directory.
            seed: initialisation seed of tiny test models.
        """
        super().__init__()
        require(isinstance(beta, (int, float)) and beta > 0, self, "beta", beta, "a number > 0")
        require(reference in ("precomputed", "live"), self, "reference", reference, "'precomputed' or 'live'")
        self.save_hyperparameters(ignore=["optim", "lora"])
        self.hparams["optim"] = optim.as_dict()
        self.hparams["lora"] = None if lora is None else lora.as_dict()
        self.optim, self.lora = optim, lora
        self.tokenizer_name = model_name
        self.tokenizer = load_tokenizer(model_name)
        base = load_model(model_name, seed=seed)
        self.model = (base if lora is None else lora.apply(base, self, model_name)).train()
        # full fine-tuning with a live reference: a frozen copy, kept out of the module tree (and checkpoints)
        self._frozen = ()
        if reference == "live" and lora is None:
            frozen = load_model(model_name, seed=seed)
            frozen.requires_grad_(False)
            self._frozen = (frozen,)
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ data
    def check_datamodule(self, dm) -> None:
        if getattr(dm, "tokenizer_name", None) is None:
            dm.tokenizer_name = self.tokenizer_name
        if self.hparams.reference != "precomputed":
            return
        if not dm.has_reference:
            raise ConfigError(self, "reference", "precomputed", "pairs that carry ref_chosen and ref_rejected (FRIT's "
                              "pair builder writes them), or reference: live")
        want = reference_settings(self.hparams.model_name, dm.hparams.max_length, dm.hparams.system, dm.hparams.chat)
        for stored in dm.ref_settings:
            if stored is not None and stored != want:
                differ = sorted(k for k in want if stored.get(k) != want[k])
                raise ConfigError(self, "reference", "precomputed",
                                  f"reference log-probs computed as this run would compute them; the pairs' differ in "
                                  f"{', '.join(differ)} ({', '.join(f'{k}={stored.get(k)!r}' for k in differ)} vs "
                                  f"{', '.join(f'{k}={want[k]!r}' for k in differ)}): rebuild the pairs or use reference: live")

    # ------------------------------------------------------------------ the loss
    def _reference(self, batch: dict) -> torch.Tensor:
        if self.hparams.reference == "precomputed":
            return batch["ref"]
        with torch.no_grad():
            args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            if self.lora is not None:
                with self.model.disable_adapter():
                    return completion_logprobs(self.model, *args).sum
            frozen = self._frozen[0]
            if frozen.device != self.device:
                frozen.to(self.device)
            return completion_logprobs(frozen.eval(), *args).sum

    def terms(self, batch: dict) -> tuple[DPOTerms, torch.Tensor]:
        """The DPO terms of a ``[chosen; rejected]`` batch and the policy's summed log-probs [2B]."""
        policy = completion_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum
        ref = self._reference(batch).to(policy.dtype)
        n = policy.shape[0] // 2
        return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.hparams.beta), policy.detach()

    def _log(self, terms: DPOTerms, policy: torch.Tensor, prefix: str) -> torch.Tensor:
        loss, n = terms.loss.mean(), policy.shape[0] // 2
        margins = terms.chosen_rewards - terms.rejected_rewards
        stage = "train" if not prefix else "val"
        kwargs = dict(batch_size=n, on_step=stage == "train", on_epoch=stage != "train")
        self.log(f"{stage}/loss", loss, prog_bar=True, **kwargs)
        for name, value in (("rewards/chosen", terms.chosen_rewards), ("rewards/rejected", terms.rejected_rewards),
                            ("rewards/margins", margins), ("rewards/accuracies", (margins > 0).float()),
                            ("logps/chosen", policy[:n]), ("logps/rejected", policy[n:])):
            self.log(prefix + name, value.mean(), **kwargs)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._log(*self.terms(batch), "")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._log(*self.terms(batch), "val/")

    def configure_optimizers(self):
        return self.optim.configure(self.model, total_steps(self.trainer))
