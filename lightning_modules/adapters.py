"""Adapter fine-tuning — peft LoRA, LoRI-D and LoRI-S — and the merge study over trained adapters.

LoRI: Zhang et al., "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation",
arXiv 2504.07448. ΔW = (α/r)·B·A on the seven projections; LoRI freezes A as a seeded random
projection (a buffer, so nothing can move it) and trains B: dense (``lori_d``), or only the entries
of a mask kept by global magnitude from a LoRI-D run's B (``lori_s``: B restarts at zero, and only
the kept entries are parameters, so its optimizer state is really ~(1 − s) of LoRI-D's). ``lora``
is peft's LoRA, the baseline. The authors' settings are the defaults: rank 32, α 64, weight decay
0, constant LR, each gradient tensor clipped to norm 1, loss = summed response log-probs per
sequence averaged over the batch.

Continual learning (``init_from`` a safety adapter): LoRA keeps training the safety adapter; LoRI-D
keeps the safety A and trains its B; LoRI-S starts from the safety B and trains only the entries
of the task's own LoRI-D mask (``mask_from``), so every other entry keeps its safety value.

Validation generates answers to each evaluation task's held-out prompts and scores them exactly.
After ``fit`` the adapter is exported as a standard peft LoRA directory (``adapter/`` in the run
directory, the LoRI-S mask beside it); ``export_merged`` also writes the merged full model.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist

from lantern import reporting
from lantern.datamodules.tasks import Example
from lantern.errors import ConfigError, require
from lantern.lightning_modules.optim import AdamW, total_steps
from lantern.models import completion_logprobs, load_model
from lantern.models.generation import Sampling, generate
from lantern.models.loading import load_tokenizer
from lantern.models import lori

Variant = Literal["lora", "lori_d", "lori_s"]
BASE_SEED = 0  # tiny test models are random: every adapter of a study sits on the same base


class TaskEvaluation:
    """Generate answers to held-out task prompts and score them; shared by fine-tuning and merging."""

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, dict) and "examples" in batch:  # prompts and targets: nothing to move
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _reset_eval(self) -> None:
        self._answers: dict[tuple, list[tuple[Example, str]]] = defaultdict(list)
        self._eval_tokens, self._eval_seconds = 0, 0.0

    def _answer(self, model, batch: dict, key: tuple) -> None:
        dm = self.trainer.datamodule
        task = dm.tasks[batch["task"]]
        examples: list[Example] = batch["examples"]
        out = generate(model, self.tokenizer, [e.prompt for e in examples],
                       Sampling(max_new_tokens=task.max_new_tokens, stop=tuple(task.stop)),
                       chat=dm.chat, system=dm.system, batch_size=len(examples))
        self._eval_seconds += out.seconds
        self._eval_tokens += out.num_tokens
        self._answers[(*key, batch["task"])] += list(zip(examples, out.text))

    def _scores(self) -> list[dict]:
        """One row per (key…, task, metric), scored once over all of a task's answers (every rank's)."""
        answers = dict(self._answers)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, answers)
            answers = defaultdict(list)
            for part in gathered:
                for k, v in part.items():
                    answers[k] += v
        rows = []
        for key, pairs in sorted(answers.items()):
            unique = {e.id: (e, t) for e, t in pairs}  # a distributed sampler pads with repeats
            examples, texts = zip(*unique.values())
            result = self.trainer.datamodule.tasks[key[-1]].score(list(examples), list(texts))
            rows.append({"key": key, "n": len(examples), **result.metrics})
        return rows


class AdapterFineTuning(TaskEvaluation, L.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m-instruct",
        variant: Variant = "lori_d",
        rank: int = 32,
        alpha: float = 64.0,
        target_modules: list[str] = lori.SEVEN,
        a_seed: int = 0,
        sparsity: float = 0.9,
        mask_scope: Literal["global", "layer", "module"] = "global",
        mask_from: str | None = None,
        init_from: str | None = None,
        loss: Literal["sum", "mean"] = "sum",
        clip_per_tensor: float | None = 1.0,
        optim: AdamW = AdamW(lr=5e-5, weight_decay=0.0, min_lr_ratio=1.0),
        export_merged: bool = False,
    ):
        """
        Args:
            model_name: base causal LM (see ``lantern.models.load_model``).
            variant: ``lora`` (peft), ``lori_d`` (frozen random A, dense B) or ``lori_s`` (sparse B).
            rank: r of ΔW = (α/r)·B·A.
            alpha: α.
            target_modules: projections that get an adapter (the authors': all seven).
            a_seed: seed of LoRI's frozen A (drawn per module from this seed and the module's name).
            sparsity: s, the share of B's entries LoRI-S leaves at zero.
            mask_scope: LoRI-S keeps the top (1 − s) of |B| over all modules (``global``, the
                authors'), per layer, or per module.
            mask_from: a LoRI-D adapter directory (``runs/<run>/latest/adapter``) whose B gives
                LoRI-S its mask and whose A it reuses.
            init_from: an adapter directory to continue from (continual learning: the safety adapter).
            loss: ``sum`` of response-token log-probs per sequence (the authors'), or the ``mean``.
            clip_per_tensor: each gradient tensor clipped to this norm separately; null: no clipping.
            optim: AdamW; the authors': weight decay 0, constant LR (min_lr_ratio 1).
            export_merged: after ``fit``, also write the full model with ΔW folded in (``merged/``).
        """
        super().__init__()
        require(rank >= 1, self, "rank", rank, "≥ 1")
        require(alpha > 0, self, "alpha", alpha, "> 0")
        require(len(target_modules) > 0, self, "target_modules", list(target_modules), "at least one projection name")
        require(0 <= sparsity < 1, self, "sparsity", sparsity, "a share in [0, 1)")
        require(clip_per_tensor is None or clip_per_tensor > 0, self, "clip_per_tensor", clip_per_tensor, "> 0, or null")
        require(variant != "lori_s" or mask_from is not None, self, "mask_from", mask_from,
                "the adapter directory of a LoRI-D run of this task (LoRI-S takes its mask from that B)")
        for field, path in (("mask_from", mask_from), ("init_from", init_from)):
            require(path is None or (Path(path) / "adapter_config.json").is_file(), self, field, path,
                    "an adapter directory written by fit (holding adapter_config.json)")
        self.save_hyperparameters(ignore=["optim"])
        self.hparams["optim"] = optim.as_dict()
        self.optim = optim
        self.tokenizer_name = model_name
        self.tokenizer = load_tokenizer(model_name)
        base = load_model(model_name, seed=BASE_SEED)
        present = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in target_modules if t not in present]
        if missing:
            raise ConfigError(self, "target_modules", list(target_modules),
                              f"projection names of {model_name} (it has no {missing[0]!r}; it has {sorted(present)})")
        if variant == "lora":
            self.model = self._peft_lora(base)
        else:
            self.model = self._lori(base)
        self.model.train()  # loaded in eval mode; Lightning keeps each submodule's mode at fit start
        self._adapter_keys = set(self._adapter_state())
        self._reset_eval()

    # ------------------------------------------------------------------ building the adapter
    def _peft_lora(self, base):
        from peft import LoraConfig, PeftModel, get_peft_model

        hp = self.hparams
        if hp.init_from:
            return PeftModel.from_pretrained(base, hp.init_from, is_trainable=True)
        config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, target_modules=list(hp.target_modules), lora_dropout=0.0)
        return get_peft_model(base, config)

    def _lori(self, base):
        hp = self.hparams
        init = masks = None
        if hp.init_from:
            factors = self._adapter("init_from", hp.init_from)
            init = {name: (f.A, f.B) for name, f in factors.items()}
        if hp.variant == "lori_s":
            donor = self._adapter("mask_from", hp.mask_from, "lori-d")
            masks = lori.magnitude_masks({n: f.B for n, f in donor.items()}, hp.sparsity, hp.mask_scope)
            if init is None:  # LoRI-S reuses its LoRI-D run's A; B restarts at zero
                init = {name: (f.A, torch.zeros_like(f.B)) for name, f in donor.items()}
        lori.add_lori(base, rank=hp.rank, alpha=hp.alpha, target_modules=list(hp.target_modules), seed=hp.a_seed,
                      masks=masks, init=init)
        return base

    def _adapter(self, field: str, path: str, variant: str | None = None) -> dict[str, lori.Factors]:
        """An earlier run's adapter, checked to fit this one (same α/r; for a mask, a LoRI-D run)."""
        factors, _, meta = lori.load_factors(path)
        scale = self.hparams.alpha / self.hparams.rank
        if any(abs(f.scale - scale) > 1e-6 * scale for f in factors.values()):
            raise ConfigError(self, field, path, f"an adapter with α/r = {scale:g} like this run's (it has {next(iter(factors.values())).scale:g})")
        found = str(meta.get("variant", "")).replace("_", "-")
        if variant is not None and found != variant:
            raise ConfigError(self, field, path, f"a {variant} adapter (this one is {found or 'unlabelled'})")
        return factors

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint needs: trainable ones and the adapters' buffers (A, mask indices)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        adapter_buffers = {f"{prefix}.{b}" if prefix else b
                           for prefix, m in self.named_modules() if isinstance(m, lori.LoRILinear)
                           for b, _ in m.named_buffers(recurse=False)}
        full = super().state_dict()
        return {k: v for k, v in full.items() if k in trainable or k in adapter_buffers}

    def state_dict(self, *args, **kwargs):
        """Adapter tensors only: the frozen base model is rebuilt from ``model_name``, not stored 135M times."""
        full = super().state_dict(*args, **kwargs)
        keys = getattr(self, "_adapter_keys", None)
        if keys is None:
            return full
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix):] in keys)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = sorted(self._adapter_keys - set(state_dict))
        if strict and missing:
            raise ConfigError(self, "checkpoint", missing[0], "a checkpoint of this adapter (it lacks this tensor)")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ------------------------------------------------------------------ training
    def check_datamodule(self, dm) -> None:
        if getattr(dm, "tokenizer_name", None) is None:
            dm.tokenizer_name = self.tokenizer_name

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        completion = labels != -100
        # labels are the input ids on the response; ids carry the pad token elsewhere
        scored = completion_logprobs(self.model, batch["input_ids"], batch["attention_mask"], completion)
        per_seq = scored.sum if self.hparams.loss == "sum" else scored.mean
        loss = -per_seq.mean()
        tokens = scored.count.sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_per_token", -scored.sum.sum() / tokens.clamp(min=1))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.clip_per_tensor is not None:
            lori.clip_per_tensor_([p for p in self.parameters() if p.grad is not None], self.hparams.clip_per_tensor)

    def configure_optimizers(self):
        return self.optim.configure(self.model, total_steps(self.trainer), decay_all=True)  # every tensor is a B (or A)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._answer(self.model, batch, ())

    def on_validation_epoch_end(self) -> None:
        rows = self._scores()
        for row in rows:
            task = row["key"][-1]
            for metric, value in row.items():
                if metric not in ("key", "n"):
                    self.log(f"val/{task}/{metric}", float(value))
        if rows:  # the checkpoint monitor: mean primary score over the evaluation tasks
            self.log("val/score", sum(r["score"] for r in rows) / len(rows), prog_bar=True)
        if self._eval_seconds > 0:
            self.log("val/gen_tokens_per_s", self._eval_tokens / self._eval_seconds)
        if rows and not self.trainer.sanity_checking:
            table = [{"task": r["key"][-1], "n": r["n"], **{k: v for k, v in r.items() if k not in ("key", "n")}}
                     for r in rows]
            reporting.write_table(self.trainer, table, "adapter_eval", "adapters/eval")

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        out = reporting.run_dir(self.trainer)
        if not self.trainer.is_global_zero:
            return
        self.export(out / "adapter")
        if self.hparams.export_merged:
            self.merged_model().save_pretrained(out / "merged", safe_serialization=True)
            if hasattr(self.tokenizer, "tokenizer"):
                self.tokenizer.tokenizer.save_pretrained(out / "merged")

    def export(self, directory: Path) -> Path:
        """A standard peft LoRA adapter directory (LoRI-S: its mask beside it)."""
        hp = self.hparams
        layers = lori.lori_layers(self.model)
        sparse = any(layer.sparse for layer in layers.values())
        masks = {name: layer.mask for name, layer in layers.items()} if sparse else None  # what was trained, not recomputed
        seeded = hp.variant != "lora" and all(layer.seed is not None for layer in layers.values())
        lori.export_peft(lori.lora_factors(self.model), directory, base_model_name_or_path=hp.model_name,
                         rank=hp.rank, alpha=hp.alpha, target_modules=list(hp.target_modules), masks=masks,
                         variant=hp.variant, seed=hp.a_seed if seeded else None,
                         meta={"mask_scope": hp.mask_scope, "init_from": hp.init_from, "mask_from": hp.mask_from,
                               "base_seed": BASE_SEED})
        return directory

    def merged_model(self):
        """The base model with ΔW folded in (peft's ``merge_and_unload``), a fresh copy."""
        return lori.merged_model(load_model(self.hparams.model_name, seed=BASE_SEED), lori.lora_factors(self.model))


class AdapterMerge(TaskEvaluation, L.LightningModule):
    def __init__(
        self,
        adapters: dict[str, dict[str, str]],
        model_name: str = "smollm2-135m-instruct",
        methods: list[Literal["concat", "linear"]] = ("concat", "linear"),
        weights: dict[str, float] | None = None,
        single: bool = True,
        base: bool = True,
    ):
        """Evaluate each adapter alone on its own task and one merged model per variant on every task.

        Args:
            adapters: variant → task → adapter directory, e.g. ``{lori_d: {math: runs/lori_lori_d_math/latest/adapter}}``.
            model_name: the base model the adapters were trained on.
            methods: merging formulas (METHODS: peft ``add_weighted_adapter`` semantics, s_t = α_t/r_t):
                ``concat``: ΔW = Σ_t w_t·s_t·B_t·A_t; ``linear``: ΔW = (Σ_t √(w_t s_t) B_t)(Σ_t √(w_t s_t) A_t).
            weights: w_t per variant; default the authors' for 4 adapters (0.4 LoRI-D and LoRA, 0.3
                LoRI-S) and 3 adapters (0.5 / 0.4).
            single: also evaluate each adapter alone on its own task.
            base: also evaluate the base model on every task.
        """
        super().__init__()
        require(len(adapters) > 0, self, "adapters", adapters, "variant → task → adapter directory")
        for variant, per_task in adapters.items():
            for task, path in per_task.items():
                require((Path(path) / "adapter_config.json").is_file(), self, "adapters", f"{variant}.{task}={path}",
                        "an adapter directory written by fit (holding adapter_config.json)")
        require(set(methods) <= {"concat", "linear"}, self, "methods", list(methods), "concat and/or linear")
        self.save_hyperparameters()
        self.tokenizer_name = model_name
        self.tokenizer = load_tokenizer(model_name)
        self.model = load_model(model_name, seed=BASE_SEED)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.factors = {v: {t: lori.load_factors(p)[0] for t, p in per_task.items()} for v, per_task in adapters.items()}
        self.configs = self._configs()
        self._reset_eval()

    def _weight(self, variant: str) -> float:
        given = (self.hparams.weights or {}).get(variant)
        if given is not None:
            return given
        n = len(self.factors[variant])
        return {("lori_s", 3): 0.4, ("lori_s", 4): 0.3}.get((variant, n), 0.5 if n == 3 else 0.4 if n == 4 else 1 / n)

    def _configs(self) -> list[tuple[tuple, str, list, list[float], set[str] | None]]:
        """(key, merge method, adapters, weights, tasks it is evaluated on or None for all); ΔW is built when applied."""
        out = []
        if self.hparams.base:
            out.append((("base", "base"), "none", [], [], None))
        for variant, per_task in self.factors.items():
            if self.hparams.single:
                out += [((variant, "single"), "concat", [f], [1.0], {task}) for task, f in per_task.items()]
            w = self._weight(variant)
            out += [((variant, f"merged_{m}"), m, list(per_task.values()), [w] * len(per_task), None)
                    for m in self.hparams.methods]
        return out

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.trainer.datamodule.tasks[batch["task"]].name
        for key, method, adapters, weights, tasks in self.configs:
            if tasks is not None and task not in tasks:
                continue
            if not adapters:
                self._answer(self.model, batch, key)
                continue
            merge = lori.merge_concat if method == "concat" else lori.merge_linear
            with deltas_applied(self.model, merge(adapters, weights)):
                self._answer(self.model, batch, key)

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def on_validation_epoch_end(self) -> None:
        rows = []
        for r in self._scores():
            variant, config, task = r["key"]
            rows.append({"variant": variant, "config": config, "task": task, "score": r["score"], "n": r["n"],
                         **{k: v for k, v in r.items() if k not in ("key", "n", "score")}})
            self.log(f"merge/{variant}/{config}/{task}", float(r["score"]))
        if not rows or self.trainer.sanity_checking:
            return
        wide = reporting.pivot(rows, ["variant", "config"], "task", "score")
        overlap = []
        for variant, per_task in self.factors.items():
            tasks = sorted(per_task)
            for i, a in enumerate(tasks):
                for b in tasks[i + 1:]:
                    overlap.append({"variant": variant, "pair": f"{a}+{b}",
                                    "subspace_overlap": float(lori.adapter_overlap(per_task[a], per_task[b]))})
        text = reporting.markdown_table(wide)
        if overlap:
            text += "\nUpdate-subspace overlap (mean cos² of principal angles between ΔW column spaces; 1 = same):\n\n"
            text += reporting.markdown_table(reporting.pivot(overlap, ["variant"], "pair", "subspace_overlap"))
        reporting.write_table(self.trainer, rows, "lori_merge", "merge/table", markdown=text,
                              payload={"scores": rows, "overlap": overlap, "weights": {v: self._weight(v) for v in self.factors}})


@contextmanager
def deltas_applied(model: torch.nn.Module, deltas: dict[str, torch.Tensor]):
    """ΔW folded into the named Linear weights for the duration; the originals come back bit-exact."""
    saved = {name: model.get_submodule(name).weight.detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            lori.apply_deltas(model, deltas)
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)
