"""Dormant attention heads: find them per input, zero them, measure what is lost.

Sandoval-Segura et al., "Identifying and Evaluating Dormant Heads in Pretrained LLMs",
arXiv 2504.03889. Two definitions, both computed per input:

- attention-weight: mean attention of a head on the first real token; dormant if > τ;
- output-norm (the paper's): r_h = mean_t ‖o_{h,t}‖ / mean over the layer's heads; dormant if < τ.

Sweeping τ is done as "zero the k most dormant heads of each input" with k = p·L·H for
p in ``fractions`` (τ is then the k-th score, per input), next to a random-heads control.
Zeroing acts on the input of ``o_proj`` (``lantern.callbacks.HeadAblation``), so the study runs
under any attention backend; only scoring switches to eager attention.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import lightning as L
import torch

from lantern import reporting
from lantern.callbacks.head_ablation import HeadAblation
from lantern.callbacks.sinks import SinkMeasurement
from lantern.errors import require
from lantern.models import CompletionLogprobs, get_adapter, load_model, multiple_choice, position_ids

Definition = Literal["output_norm", "attention_weight", "random"]


@torch.no_grad()
def head_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input dormancy scores, [B, L, H]: ``attention_weight`` (high = dormant), ``output_norm`` r_h (low = dormant)."""
    with SinkMeasurement().applied(model) as sinks:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    scores = sinks.last_scores()
    return {"attention_weight": scores["sink_mass"], "output_norm": scores["output_norm_ratio"]}


def most_dormant(scores: torch.Tensor, k: int, higher_is_dormant: bool) -> torch.Tensor:
    """Bool [B, L, H]: the k most dormant heads of each input."""
    flat = scores.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, flat.topk(k, dim=1, largest=higher_is_dormant).indices, True)
    return mask.view_as(scores)


class DormantHeadsStudy(L.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m-instruct",
        fractions: list[float] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30),
        definitions: list[Definition] = ("output_norm", "attention_weight", "random"),
        attention_tau: float = 0.8,
        norm_tau: float = 0.1,
        seed: int = 0,
    ):
        """
        Args:
            model_name: model to study (see ``lantern.models.load_model``).
            fractions: shares of all heads zeroed per input.
            definitions: how heads are ranked: ``output_norm`` (lowest r_h first), ``attention_weight``
                (highest first-token attention first), ``random`` (control).
            attention_tau: τ for reporting how many heads are dormant by the attention-weight definition.
            norm_tau: τ for reporting how many heads are dormant by the output-norm definition.
            seed: seed of the random-heads control.
        """
        super().__init__()
        require(all(0 <= f < 1 for f in fractions), self, "fractions", list(fractions), "shares in [0, 1)")
        require(set(definitions) <= {"output_norm", "attention_weight", "random"}, self, "definitions", list(definitions),
                "a list of output_norm, attention_weight, random")
        self.save_hyperparameters()
        self.tokenizer_name = model_name  # the evaluation data encodes with the model's own tokenizer
        self.model = load_model(model_name, seed=seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        adapter = get_adapter(self.model)
        self.n_layers, self.n_heads = adapter.num_layers(self.model), adapter.num_heads(self.model)
        self.ablation = HeadAblation()  # hooked only while a validation step sweeps, so the model stays plain
        self._reset()

    def _reset(self) -> None:
        self.tally: dict[tuple[str, str, float], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # correct, count, loss
        self.dormant_share = defaultdict(lambda: [0.0, 0])
        self.score_sums = defaultdict(lambda: 0)
        self.generator = torch.Generator().manual_seed(self.hparams.seed)

    def _configs(self):
        """(definition, fraction) pairs to run; fraction 0 once, as the unablated baseline."""
        yield "none", 0.0
        for d in self.hparams.definitions:
            for f in self.hparams.fractions:
                if f > 0:
                    yield d, f

    def on_validation_epoch_start(self) -> None:
        self._reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        scores = head_scores(self.model, ids, attn)
        group = torch.arange(ids.shape[0], device=ids.device)
        if batch["kind"] == "mc":  # one choice of heads per question, shared by its choices
            group = batch["item_index"]
            scores = {k: _per_item(v, group) for k, v in scores.items()}
        draw = torch.rand(int(group.max()) + 1, self.n_layers, self.n_heads, generator=self.generator)
        scores["random"] = draw.to(ids.device)[group]
        self._record_dormancy(scores)
        total = self.n_layers * self.n_heads
        with self.ablation.applied(self.model):
            try:
                for definition, fraction in self._configs():
                    k = round(fraction * total)
                    higher = definition == "attention_weight"
                    self.ablation.set_mask(None if definition == "none" else most_dormant(scores[definition], k, higher))
                    with torch.no_grad():
                        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
                    self._score(batch, logits, [definition] if definition != "none" else self.hparams.definitions, fraction)
            finally:
                self.ablation.set_mask(None)  # a per-batch mask must not outlive its batch

    def _record_dormancy(self, scores: dict[str, torch.Tensor]) -> None:
        hp = self.hparams
        for name, dormant in (("attention_weight", scores["attention_weight"] > hp.attention_tau),
                              ("output_norm", scores["output_norm"] < hp.norm_tau)):
            self.dormant_share[name][0] += dormant.float().mean(dim=(1, 2)).sum().item()
            self.dormant_share[name][1] += dormant.shape[0]
            self.score_sums[name] = self.score_sums[name] + scores[name].sum(0).cpu()

    def _score(self, batch: dict, logits: torch.Tensor, definitions: list[str], fraction: float) -> None:
        scored = CompletionLogprobs.from_logits(logits, batch["input_ids"], batch["target_mask"])
        if batch["kind"] == "lm":
            hits = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]) & scored.mask
            correct, count, loss = hits.sum().item(), scored.count.sum().item(), -scored.sum.sum().item()
        else:
            mc = multiple_choice(scored.sum, batch["item_index"], batch["answer"])
            correct, count, loss = (mc.prediction == batch["answer"]).sum().item(), batch["answer"].numel(), mc.loss.sum().item()
        for definition in definitions:
            t = self.tally[(batch["task"], definition, fraction)]
            t[0] += correct
            t[1] += count
            t[2] += loss

    def on_validation_epoch_end(self) -> None:
        rows = []
        for (task, definition, fraction), (correct, count, loss) in sorted(self.tally.items()):
            acc = correct / max(count, 1)
            rows.append({"task": task, "definition": definition, "percent_zeroed": round(100 * fraction),
                         "accuracy": acc, "loss": loss / max(count, 1), "count": int(count)})
            self.log(f"dormant/{task}/{definition}/acc_p{round(100 * fraction):02d}", acc)
        self.results = rows
        share = {k: v[0] / max(v[1], 1) for k, v in self.dormant_share.items()}
        for k, v in share.items():
            self.log(f"dormant/share_dormant/{k}", v)
        if not self.trainer.sanity_checking:
            self._write(rows, share)

    def _write(self, rows: list[dict], share: dict[str, float]) -> None:
        trainer = self.trainer
        wide = reporting.pivot(rows, ["task", "definition"], "percent_zeroed", "accuracy", label="{}%")
        reporting.write_table(trainer, rows, "dormant_heads", "dormant/table", markdown=reporting.markdown_table(wide),
                              payload={"sweep": rows, "share_dormant_at_tau": share})
        sweep = reporting.line_plot(rows, "percent_zeroed", "accuracy", line="definition", panel="task",
                                    xlabel="% heads zeroed")
        reporting.write_figure(trainer, sweep, "dormant/accuracy_vs_heads_zeroed", "dormant_heads")
        n = max(v[1] for v in self.dormant_share.values())
        # r_h averages 1 over a layer's heads, so its scale reaches 2 where attention mass stops at 1
        for name, vmax in (("attention_weight", 1.0), ("output_norm", 2.0)):
            figure = reporting.heatmap(self.score_sums[name] / n, f"mean {name} score", vmin=0, vmax=vmax)
            reporting.write_figure(trainer, figure, f"dormant/mean_score/{name}")


def _per_item(scores: torch.Tensor, item_index: torch.Tensor) -> torch.Tensor:
    """Average the scores of each question's choices and give every choice that average."""
    n_items = int(item_index.max()) + 1
    sums = torch.zeros(n_items, *scores.shape[1:], device=scores.device).index_add_(0, item_index, scores)
    counts = torch.bincount(item_index, minlength=n_items).view(-1, *([1] * (scores.dim() - 1)))
    return (sums / counts)[item_index]
