"""Evaluation-awareness probes: does a model tell "I am being tested" apart from "I am deployed"?

Chaudhary et al., "Evaluation Awareness Scales Predictably in Open-Weights Large Language Models",
arXiv 2509.13333, probing with the simple contrastive set and difference-of-means direction of
Nguyen et al., arXiv 2507.01786. For every model of a sweep, loaded one at a time:

1. calibration: each contrastive question is read twice, answered once with its evaluation option
   and once with its deployment option; the residual stream entering every block is read at the answer;
2. a probe per layer: v_L = mean(evaluation) − mean(deployment), used as v̂_L = v_L / ‖v_L‖ (the
   paper's), and beside it an L2-regularised logistic regression on standardised activations;
3. every held-out prompt, rendered as any prompt is (``render_prompt``) with no answer appended,
   scores ⟨mean_t a_t, v̂_L⟩ over its own tokens, which equals the mean of ⟨a_t, v̂_L⟩;
4. AUROC per layer (evaluation prompts positive) with a percentile-bootstrap interval over prompts;
   the effect is |AUROC − 0.5| at the layer where it is largest;
5. d = a·N^b fitted log–log over the real models (at least three), never over the randomly
   initialised controls (``tiny-*``), which show how much a probe gets from wording alone.

The paper reports ≈ 0.15 for Gemma-3-270M and ≈ 0.34 for Llama-3.1-70B. Choices where it is silent:

- layers: the inputs of blocks 0 … n−1 (``hidden_states[L]``, the layer convention of
  ``lantern.models.steering``); the final normed state is not probed;
- "at the answer": the mean over the answer's tokens, so ``(A)`` reads alike whether a tokenizer
  splits it in one piece or three (the shared ``(`` cancels in v_L);
- a held-out score averages the user message's tokens only, not the chat template's;
- the best layer is picked on the held-out set, as in the paper, so its effect is slightly
  optimistic (its interval does not include that choice);
- N counts every parameter, embeddings included (the paper's 0.27B for Gemma-3-270M);
- the logistic probe: mean cross-entropy + ``l2``/2 · ‖w‖², features standardised with the
  calibration set's mean and deviation, fitted with L-BFGS for all layers at once;
- a tokenizer that adds BOS by default (Gemma) gets it before the rendered prompt.

``fit`` is the calibration pass (nothing is trained; ``configure_optimizers`` returns None) and
saves every layer's direction as a ``lantern.models.steering.Direction``, the best one as
``directions/<model>.safetensors``; the validation that ends ``fit`` and ``validate`` write the
tables and plots. ``direction_path`` scores a saved direction (e.g. an ALS steering vector) on
the held-out prompts at its own layer, beside the probes. Runs on one device.
"""

from __future__ import annotations

import gc
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from lantern import reporting
from lantern.datamodules.eval_awareness import ContrastiveItem, HeldoutItem
from lantern.datamodules.eval_tasks import pad
from lantern.errors import ConfigError, DataError, LanternError, ModelLoadError, require
from lantern.metrics import auroc, bootstrap_ci, power_law_fit
from lantern.models import UnsupportedArchitecture, get_adapter, load_model, load_tokenizer, render_prompt
from lantern.models.loading import TINY_CONFIGS
from lantern.models.generation import bos_ids
from lantern.models.steering import Direction, mean_hidden

PAPER_EFFECTS = {"gemma3-270m": 0.15}  # best-layer |AUROC − 0.5| read from arXiv 2509.13333
_SLOT = "\x00lantern-user-message\x00"  # rendered in place of the message to find where the template puts it


# ----------------------------------------------------------------------------- encoding
def _template(tok, chat: bool, system: str | None) -> tuple[str, str]:
    """The rendered text before and after the user message."""
    rendered = render_prompt(tok, _SLOT, system, chat)
    if rendered.count(_SLOT) != 1:
        raise LanternError("the chat template does not keep the user message verbatim; set model.init_args.chat=false")
    before, after = rendered.split(_SLOT)
    return before, after


def encode(tok, messages: list[str], answers: list[str] | None = None, *, chat: bool = True,
           system: str | None = None) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of each rendered message (plus its answer), and which tokens to average.

    Without ``answers`` the message's own tokens are selected; with them, the answer's tokens.
    """
    before, after = _template(tok, chat, system)
    prefix, suffix = tok.encode_batch([before, after])
    prefix = bos_ids(tok, before) + prefix
    bodies = tok.encode_batch([m.strip() for m in messages])
    tails = tok.encode_batch(answers) if answers is not None else [[] for _ in messages]
    seqs, selects = [], []
    for body, tail in zip(bodies, tails):
        seqs.append(prefix + body + suffix + tail)
        mark = [False] * (len(prefix) + len(body) + len(suffix))
        if answers is None:
            mark[len(prefix): len(prefix) + len(body)] = [True] * len(body)
        selects.append(mark + [True] * len(tail))
    return seqs, selects


@torch.no_grad()
def residual_means(model, seqs: list[list[int]], selects: list[list[bool]], *, batch_size: int = 16,
                   pad_id: int = 0) -> torch.Tensor:
    """[len(seqs), n_blocks + 1, d] float32 on the CPU: ``mean_hidden`` in right-padded batches of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = None
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        batch = pad([(seqs[i], selects[i]) for i in rows], pad_id)
        ids, mask, select = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        h = mean_hidden(model, ids.to(device), mask.to(device), select.to(device)).cpu()
        if out is None:
            out = torch.empty(len(seqs), *h.shape[1:])
        out[torch.tensor(rows)] = h
    return out


# ----------------------------------------------------------------------------- probes
def difference_of_means(acts: torch.Tensor, is_eval: torch.Tensor) -> torch.Tensor:
    """v_L = mean(evaluation) − mean(deployment) for every layer: [n, L, d] → [L, d], float32.

    Summed in float64; a v_L below 1e-6 of the layer's mean activation norm is rounding residue
    (two sets of the same vectors, added in another order) and is returned as exactly 0.
    """
    is_eval = is_eval.bool()
    v = acts[is_eval].sum(0, dtype=torch.float64) / is_eval.sum() - acts[~is_eval].sum(0, dtype=torch.float64) / (~is_eval).sum()
    residue = v.norm(dim=-1) <= 1e-6 * acts.float().norm(dim=-1).mean(0)
    return v.masked_fill(residue[:, None], 0).float()


def project(acts: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """⟨a, v_L⟩ per item and layer: [n, L, d] · [L, d] → [n, L]."""
    return torch.einsum("nld,ld->nl", acts.float(), directions.float())


@dataclass
class LogisticProbes:
    """One L2-regularised logistic regression per layer on standardised activations."""

    mean: torch.Tensor  # [L, d]
    scale: torch.Tensor  # [L, d]
    weight: torch.Tensor  # [L, d]
    bias: torch.Tensor  # [L]

    @classmethod
    def fit(cls, acts: torch.Tensor, is_eval: torch.Tensor, l2: float = 1e-2, max_iter: int = 300) -> "LogisticProbes":
        with torch.inference_mode(False), torch.enable_grad():  # validation hooks run under inference mode
            x = acts.float().clone()
            mean = x.mean(0)
            std = x.std(0, unbiased=False)
            scale = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature stays 0, not NaN
            x = (x - mean) / scale
            y = is_eval.float().clone()[:, None].expand(-1, x.shape[1])
            weight = torch.zeros(x.shape[1:], requires_grad=True)
            bias = torch.zeros(x.shape[1], requires_grad=True)
            optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-6,
                                          tolerance_change=1e-9, line_search_fn="strong_wolfe")

            def closure():
                optimizer.zero_grad()
                logits = torch.einsum("nld,ld->nl", x, weight) + bias
                # Layers are independent problems: summing their losses fits them all in one run.
                loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0).sum()
                loss = loss + l2 / 2 * (weight**2).sum()
                loss.backward()
                return loss

            optimizer.step(closure)
        return cls(mean, scale, weight.detach(), bias.detach())

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        """The logit of "evaluation" per item and layer, [n, L]."""
        return project((acts.float() - self.mean) / self.scale, self.weight) + self.bias


@dataclass
class LayerAUROC:
    """AUROC per layer with bootstrap intervals on it and on the effect |AUROC − 0.5|."""

    auroc: torch.Tensor  # [L]
    low: torch.Tensor
    high: torch.Tensor
    effect_low: torch.Tensor
    effect_high: torch.Tensor

    @property
    def effect(self) -> torch.Tensor:
        return (self.auroc - 0.5).abs()

    @classmethod
    def of(cls, scores: torch.Tensor, is_eval: torch.Tensor, draws: int = 1000, level: float = 0.95,
           seed: int = 0) -> "LayerAUROC":
        """``scores`` [n, L] of the held-out items, ``is_eval`` [n]."""
        labels = is_eval.long()
        value = auroc(scores, labels[:, None], dim=0)

        def both(s, y):  # s [draws, n, L], y [draws, n]
            a = auroc(s, y[..., None], dim=-2)
            return torch.stack([a, (a - 0.5).abs()], dim=1)

        low, high = bootstrap_ci(both, scores, labels, draws=draws, level=level, seed=seed)
        return cls(value, low[0], high[0], low[1], high[1])


# ----------------------------------------------------------------------------- results
@dataclass
class ModelResult:
    name: str
    control: bool
    params: int = 0
    skipped: str = ""
    layers: list[int] = field(default_factory=list)
    vectors: torch.Tensor | None = None  # [L, d], difference of means
    diff_means: LayerAUROC | None = None
    logistic: LayerAUROC | None = None
    external: dict | None = None  # the direction_path's score, when it was scored on this model

    @property
    def best(self) -> int:
        """Index (into ``layers``) of the layer with the largest difference-of-means effect."""
        return int(self.diff_means.effect.argmax())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", name).strip("-") or "model"


class EvalAwarenessProbes(L.LightningModule):
    def __init__(
        self,
        models: list[str] = ("smollm2-135m-instruct",),
        chat: bool = True,
        system: str | None = None,
        logistic: bool = True,
        l2: float = 1e-2,
        bootstrap: int = 1000,
        level: float = 0.95,
        batch_size: int = 16,
        max_length: int = 2048,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        direction_path: str | None = None,
        paper_effects: dict[str, float] | None = None,
        seed: int = 0,
    ):
        """
        Args:
            models: the sweep, one model in memory at a time: embedded names, local paths, hub ids;
                ``tiny-*`` models are randomly initialised controls and stay out of the scaling fit.
            chat: render prompts with each tokenizer's chat template (``render_prompt``).
            system: system message for every prompt; None keeps the template's default.
            logistic: fit the logistic-regression probe beside the difference of means.
            l2: the logistic probe's L2 penalty (on the mean cross-entropy, standardised features).
            bootstrap: resamples of the held-out prompts for the AUROC intervals.
            level: coverage of the intervals.
            batch_size: sequences per forward pass.
            max_length: most tokens of a rendered prompt and answer; a longer one is an error.
            dtype: parameter dtype of the swept models (activations are read in float32).
            direction_path: a saved ``Direction`` (from this study or ALS) to score at its layer.
            paper_effects: the paper's best-layer |AUROC − 0.5| by model name, reported beside ours;
                None: Gemma-3-270M's 0.15.
            seed: bootstrap seed, and the initialisation seed of the tiny controls.
        """
        super().__init__()
        models = [models] if isinstance(models, str) else list(models)
        require(bool(models) and all(isinstance(m, str) and m.strip() for m in models) and len(set(models)) == len(models),
                self, "models", models, "a non-empty list of different model names or paths")
        require(l2 > 0, self, "l2", l2, "> 0 (the calibration set is separable without a penalty)")
        require(bootstrap >= 1, self, "bootstrap", bootstrap, "≥ 1")
        require(0 < level < 1, self, "level", level, "a coverage in (0, 1), e.g. 0.95")
        require(batch_size >= 1, self, "batch_size", batch_size, "≥ 1")
        require(max_length >= 8, self, "max_length", max_length, "≥ 8")
        paper_effects = dict(PAPER_EFFECTS if paper_effects is None else paper_effects)
        require(all(0 <= v <= 0.5 for v in paper_effects.values()), self, "paper_effects", paper_effects,
                "|AUROC − 0.5| values in [0, 0.5]")
        self.save_hyperparameters()
        self.models, self.paper_effects = models, paper_effects
        self.direction = None
        if direction_path is not None:
            self.direction = Direction.load(direction_path, self, "direction_path")
            source = self.direction.metadata.get("model")
            require(source is None or source in models, self, "direction_path", direction_path,
                    f"a direction from one of the models {models} (this one is from {source!r})")
        self.items: dict[str, list] = {"contrastive": [], "heldout": []}
        self.results: list[ModelResult] = []
        self.fit_result: dict = {}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        require(self.trainer.world_size == 1, "trainer", "devices", self.trainer.world_size,
                "1 device (the sweep holds one model at a time and reads every prompt itself)")

    def configure_optimizers(self):
        return None  # nothing is trained: fit is the calibration pass

    def _fitting(self) -> bool:
        return self.trainer.state.fn == "fit"

    def _collect(self, batch: list) -> None:
        for item in batch:
            self.items["contrastive" if isinstance(item, ContrastiveItem) else "heldout"].append(item)

    def on_train_epoch_start(self) -> None:
        self.items["contrastive"] = []

    def training_step(self, batch: list, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self.items["heldout"] = []
        if not self._fitting():
            self.items["contrastive"] = []

    def validation_step(self, batch: list, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        contrastive, heldout = self.items["contrastive"], self.items["heldout"]
        if not contrastive or not heldout:
            raise DataError("the evaluation-awareness study needs the contrastive set and the held-out prompts "
                            "(data: lantern.datamodules.EvalAwarenessData)")
        self.results = [self._study(name, contrastive, heldout) for name in self.models]
        done = [r for r in self.results if not r.skipped]
        if not done:
            raise ModelLoadError("no model of the sweep could be loaded: " + "; ".join(f"{r.name}: {r.skipped}" for r in self.results))
        if self.direction is not None and not any(r.external for r in done):
            raise ConfigError(self, "direction_path", self.hparams.direction_path,
                              f"a direction that fits one of the models {self.models}")
        self.fit_result = self._scaling_fit(done)
        for r in done:
            self.log(f"eval_awareness/{r.name}/effect", float(r.diff_means.effect[r.best]))
            self.log(f"eval_awareness/{r.name}/best_layer", float(r.layers[r.best]))
        if self._fitting():
            self._save_directions(done, contrastive, heldout)
        self._write()

    # ------------------------------------------------------------------ the study of one model
    def _study(self, name: str, contrastive: list[ContrastiveItem], heldout: list[HeldoutItem]) -> ModelResult:
        hp = self.hparams
        result = ModelResult(name, control=name in TINY_CONFIGS)
        try:
            model = load_model(name, dtype=hp.dtype, seed=hp.seed)
            tok = load_tokenizer(name)
            n_blocks = get_adapter(model).num_layers(model)
        except (ModelLoadError, UnsupportedArchitecture) as err:
            result.skipped = " ".join(str(err).split())
            reporting.say(self._trainer, f"skipped {name}: {result.skipped}")
            return result
        try:
            model.to(self.device)
            result.params = sum(p.numel() for p in model.parameters())
            result.layers = list(range(n_blocks))
            questions = [c.question for c in contrastive]
            seqs, selects = encode(tok, questions + questions, [c.evaluation_answer for c in contrastive]
                                   + [c.deployment_answer for c in contrastive], chat=hp.chat, system=hp.system)
            is_eval_cal = torch.tensor([True] * len(contrastive) + [False] * len(contrastive))
            held_seqs, held_selects = encode(tok, [h.prompt for h in heldout], chat=hp.chat, system=hp.system)
            where = [c.where for c in contrastive] * 2 + [h.where for h in heldout]
            for w, s in zip(where, seqs + held_seqs):
                if len(s) > hp.max_length:
                    raise DataError(f"{w}: {len(s)} tokens with {name}'s template > model.init_args.max_length={hp.max_length}")
            run = dict(batch_size=hp.batch_size, pad_id=tok.eos_token_id)
            cal = residual_means(model, seqs, selects, **run)
            held = residual_means(model, held_seqs, held_selects, **run)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        is_eval = torch.tensor([h.evaluation for h in heldout])
        stats = dict(draws=hp.bootstrap, level=hp.level, seed=hp.seed)
        probed = cal[:, :n_blocks]
        result.vectors = difference_of_means(probed, is_eval_cal)
        units = torch.stack([Direction(v, i).unit for i, v in enumerate(result.vectors)])
        result.diff_means = LayerAUROC.of(project(held[:, :n_blocks], units), is_eval, **stats)
        if hp.logistic:
            probes = LogisticProbes.fit(probed, is_eval_cal, hp.l2)
            result.logistic = LayerAUROC.of(probes.scores(held[:, :n_blocks]), is_eval, **stats)
        result.external = self._score_direction(name, cal.shape[-1], n_blocks, held, is_eval, stats)
        return result

    def _score_direction(self, name: str, width: int, n_blocks: int, held: torch.Tensor, is_eval: torch.Tensor,
                         stats: dict) -> dict | None:
        d = self.direction
        if d is None or d.metadata.get("model") not in (None, name):
            return None
        if d.metadata.get("model") is None and d.vector.numel() != width:
            return None  # a direction of unknown origin is scored on the models it fits
        fits = d.vector.numel() == width and 0 <= d.layer <= n_blocks
        require(fits, self, "direction_path", self.hparams.direction_path,
                f"a direction of width {width} at a layer in 0..{n_blocks} for {name} "
                f"(this one is width {d.vector.numel()} at layer {d.layer})")
        score = LayerAUROC.of(project(held[:, d.layer: d.layer + 1], d.unit[None]), is_eval, **stats)
        return {"model": name, "layer": d.layer, "auroc": float(score.auroc[0]), "ci_low": float(score.low[0]),
                "ci_high": float(score.high[0]), "effect": float(score.effect[0]),
                "effect_low": float(score.effect_low[0]), "effect_high": float(score.effect_high[0]),
                "source": str(self.hparams.direction_path), "method": d.metadata.get("method", "")}

    # ------------------------------------------------------------------ scaling and reports
    def _scaling_fit(self, done: list[ModelResult]) -> dict:
        real = [r for r in done if not r.control]
        if len(real) < 3:
            return {"made": False, "reason": f"the fit needs ≥ 3 real models; this sweep has {len(real)}",
                    "n_models": len(real)}
        n = [r.params for r in real]
        d = [float(r.diff_means.effect[r.best]) for r in real]
        if min(d) <= 0:
            return {"made": False, "reason": "a best-layer effect of 0 has no logarithm", "n_models": len(real)}
        a, b, r2, (b_low, b_high) = power_law_fit(n, d, level=self.hparams.level)
        return {"made": True, "a": a, "b": b, "r2": r2, "b_low": b_low, "b_high": b_high, "n_models": len(real)}

    def summary_rows(self) -> list[dict]:
        """One row per model of the sweep: best layer, effect and interval, logistic probe, paper's value."""
        rows = []
        for r in self.results:
            row = {"model": r.name, "kind": "control" if r.control else "real", "params": r.params}
            if r.skipped:
                rows.append({**row, "status": f"skipped: {r.skipped}"})
                continue
            i, dm = r.best, r.diff_means
            row.update(best_layer=r.layers[i], auroc=float(dm.auroc[i]), auroc_low=float(dm.low[i]),
                       auroc_high=float(dm.high[i]), effect=float(dm.effect[i]), effect_low=float(dm.effect_low[i]),
                       effect_high=float(dm.effect_high[i]))
            if r.logistic is not None:
                j = int(r.logistic.effect.argmax())
                row.update(logistic_best_layer=r.layers[j], logistic_auroc=float(r.logistic.auroc[j]),
                           logistic_effect=float(r.logistic.effect[j]))
            row.update(paper_effect=self.paper_effects.get(r.name, ""), in_fit=bool(self.fit_result.get("made")) and not r.control,
                       status="ok")
            rows.append(row)
        return rows

    def layer_rows(self) -> list[dict]:
        """One row per model and layer: both probes' AUROC, the interval, the effect and ‖v_L‖."""
        rows = []
        for r in self.results:
            if r.skipped:
                continue
            norms = r.vectors.norm(dim=-1)
            for i, layer in enumerate(r.layers):
                dm = r.diff_means
                row = {"model": r.name, "layer": layer, "auroc": float(dm.auroc[i]), "ci_low": float(dm.low[i]),
                       "ci_high": float(dm.high[i]), "effect": float(dm.effect[i]), "norm": float(norms[i])}
                if r.logistic is not None:
                    row.update(auroc_logistic=float(r.logistic.auroc[i]), logistic_ci_low=float(r.logistic.low[i]),
                               logistic_ci_high=float(r.logistic.high[i]))
                rows.append(row)
        return rows

    def _fit_line(self) -> str:
        f = self.fit_result
        if not f.get("made"):
            return f"Scaling fit not made: {f.get('reason', 'no models')}."
        return (f"Scaling fit over {f['n_models']} real models: d = {f['a']:.4g} · N^{f['b']:.4g} "
                f"(R² = {f['r2']:.3f}; {100 * self.hparams.level:g}% CI on b: [{f['b_low']:.4g}, {f['b_high']:.4g}]).")

    def _write(self) -> None:
        trainer = self.trainer
        summary, layers = self.summary_rows(), self.layer_rows()
        external = [r.external for r in self.results if r.external]
        text = "## Best layer per model\n\n" + reporting.markdown_table(summary) + "\n" + self._fit_line() + "\n"
        if external:
            text += "\n## Saved direction scored on the held-out prompts\n\n" + reporting.markdown_table(external)
        text += "\n## Every layer\n\n" + reporting.markdown_table(layers)
        settings = {k: v for k, v in self.hparams.items()}
        payload = {"models": summary, "layers": layers, "fit": self.fit_result, "direction": external,
                   "counts": {"contrastive": len(self.items["contrastive"]), "heldout": len(self.items["heldout"])},
                   "settings": settings}
        reporting.write_table(trainer, layers, "eval_awareness", "eval_awareness/table", markdown=text, payload=payload)
        reporting.write_table(trainer, summary, "eval_awareness_scaling", "eval_awareness/scaling",
                              markdown=reporting.markdown_table(summary) + "\n" + self._fit_line() + "\n",
                              payload={"models": summary, "fit": self.fit_result})
        reporting.write_figure(trainer, self._layer_figure(layers, external), "eval_awareness/auroc_by_layer", "eval_awareness")
        reporting.write_figure(trainer, self._scaling_figure(summary), "eval_awareness/effect_vs_params", "eval_awareness_scaling")
        for row in summary:
            if row["status"] == "ok":
                paper = f" (paper {row['paper_effect']:.2f})" if row["paper_effect"] != "" else ""
                reporting.say(self._trainer, f"eval awareness of {row['model']}: best layer {row['best_layer']}, |AUROC − 0.5| = "
                          f"{row['effect']:.3f} [{row['effect_low']:.3f}, {row['effect_high']:.3f}]{paper}")
        reporting.say(self._trainer, self._fit_line())

    def _layer_figure(self, layers: list[dict], external: list[dict]):
        long = [{"model": r["model"], "layer": r["layer"], "probe": "difference of means", "auroc": r["auroc"]} for r in layers]
        long += [{"model": r["model"], "layer": r["layer"], "probe": "logistic", "auroc": r["auroc_logistic"]}
                 for r in layers if "auroc_logistic" in r]
        long += [{"model": e["model"], "layer": e["layer"], "probe": "direction_path", "auroc": e["auroc"]} for e in external]
        fig = reporting.line_plot(long, "layer", "auroc", line="probe", panel="model", ylabel="held-out AUROC")
        for ax in fig.axes:
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        return fig

    def _scaling_figure(self, summary: list[dict]):
        plt = reporting.pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for kind, marker in (("real", "o"), ("control", "s")):
            rows = [r for r in summary if r["status"] == "ok" and r["kind"] == kind]
            if rows:
                x = [r["params"] for r in rows]
                y = [r["effect"] for r in rows]
                err = [[r["effect"] - r["effect_low"] for r in rows], [r["effect_high"] - r["effect"] for r in rows]]
                ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=f"{kind} models (ours)",
                            mfc="none" if kind == "control" else None)
                for k, r in enumerate(sorted(rows, key=lambda r: r["params"])):  # alternate sides: neighbours stay legible
                    ax.annotate(r["model"], (r["params"], r["effect"]), fontsize=7, xytext=(5, 5 if k % 2 else -11),
                                textcoords="offset points")
        paper = [r for r in summary if r["status"] == "ok" and r.get("paper_effect") != ""]
        if paper:
            ax.scatter([r["params"] for r in paper], [r["paper_effect"] for r in paper], marker="x", color="k", label="paper")
        f = self.fit_result
        if f.get("made"):
            fitted = [r["params"] for r in summary if r.get("in_fit")]
            xs = torch.logspace(math.log10(min(fitted)), math.log10(max(fitted)), 50)
            ax.plot(xs, f["a"] * xs ** f["b"], color="C3", label=f"fit: d = {f['a']:.3g}·N^{f['b']:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("best-layer |AUROC − 0.5|")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def _save_directions(self, done: list[ModelResult], contrastive: list, heldout: list) -> None:
        out = reporting.run_dir(self.trainer) / "directions"
        if not self.trainer.is_global_zero:
            return
        data = getattr(self.trainer, "datamodule", None)
        describe = getattr(data, "describe", None)
        base = {"method": "eval_awareness_probe", "probe": "difference of means: evaluation − deployment answers",
                "data": describe("contrastive") if describe else "", "heldout": describe("heldout") if describe else "",
                "n_evaluation": len(contrastive), "n_deployment": len(contrastive), "n_heldout": len(heldout),
                "seed": self.hparams.seed, "chat": self.hparams.chat, "system": self.hparams.system}
        for r in done:
            for i, layer in enumerate(r.layers):
                meta = {**base, "model": r.name, "layer": layer, "heldout_auroc": float(r.diff_means.auroc[i]),
                        "norm": float(r.vectors[i].norm()), "best_layer": r.layers[r.best]}
                direction = Direction(r.vectors[i], layer, meta)
                direction.save(out / _slug(r.name) / f"layer_{layer:02d}.safetensors")
                if i == r.best:
                    direction.save(out / f"{_slug(r.name)}.safetensors")

