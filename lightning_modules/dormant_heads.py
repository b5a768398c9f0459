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

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from lantern.callbacks.head_ablation import HeadAblation
from lantern.callbacks.sinks import SinkMeasurement, log_heatmap
from lantern.models import get_adapter, load_model

Definition = Literal["output_norm", "attention_weight", "random"]


@torch.no_grad()
def head_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input dormancy scores, [B, L, H]: ``attention_weight`` (high = dormant), ``output_norm`` r_h (low = dormant)."""
    with SinkMeasurement().applied(model) as sinks:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
    scores = sinks.last_scores()
    return {"attention_weight": scores["sink_mass"], "output_norm": scores["output_norm_ratio"]}


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
        bad = [f for f in fractions if not 0 <= f < 1]
        if bad:
            raise ValueError(f"model.fractions: {bad[0]} must lie in [0, 1)")
        unknown = [d for d in definitions if d not in ("output_norm", "attention_weight", "random")]
        if unknown:
            raise ValueError(f"model.definitions: unknown definition {unknown[0]!r}")
        self.save_hyperparameters()
        self.model = load_model(model_name, seed=seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        adapter = get_adapter(self.model)
        self.n_layers, self.n_heads = adapter.num_layers(self.model), adapter.num_heads(self.model)
        self.ablation = HeadAblation()
        self.ablation.attach(self.model)
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
        for definition, fraction in self._configs():
            k = round(fraction * total)
            mask = None if definition == "none" else most_dormant(scores[definition], k, definition == "attention_weight")
            self.ablation.set_mask(mask)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits.float()
            self.ablation.set_mask(None)
            for d in ([definition] if definition != "none" else self.hparams.definitions):
                self._score(batch, logits, d, fraction)

    def _record_dormancy(self, scores: dict[str, torch.Tensor]) -> None:
        hp = self.hparams
        for name, dormant in (("attention_weight", scores["attention_weight"] > hp.attention_tau),
                              ("output_norm", scores["output_norm"] < hp.norm_tau)):
            self.dormant_share[name][0] += dormant.float().mean(dim=(1, 2)).sum().item()
            self.dormant_share[name][1] += dormant.shape[0]
            self.score_sums[name] = self.score_sums[name] + scores[name].sum(0).cpu()

    def _score(self, batch: dict, logits: torch.Tensor, definition: str, fraction: float) -> None:
        logp = logits[:, :-1].log_softmax(-1)
        targets = batch["input_ids"][:, 1:]
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, S-1]
        tmask = batch["target_mask"][:, 1:].float()
        t = self.tally[(batch["task"], definition, fraction)]
        if batch["kind"] == "lm":
            hits = (logp.argmax(-1) == targets).float() * tmask
            t[0] += hits.sum().item()
            t[1] += tmask.sum().item()
            t[2] += -(token_logp * tmask).sum().item()
        else:
            per_choice = (token_logp * tmask).sum(-1)
            n_items = batch["answer"].numel()
            pred = per_choice.view(n_items, -1).argmax(-1)
            t[0] += (pred == batch["answer"]).sum().item()
            t[1] += n_items
            t[2] += F.cross_entropy(per_choice.view(n_items, -1), batch["answer"], reduction="sum").item()

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
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        self._write(rows, share)

    def _write(self, rows: list[dict], share: dict[str, float]) -> None:
        figure = plot_sweep(rows)
        out = Path(self.trainer.log_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        with (out / "dormant_heads.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "dormant_heads.md").write_text(markdown_table(rows))
        (out / "dormant_heads.json").write_text(json.dumps({"sweep": rows, "share_dormant_at_tau": share}, indent=1))
        figure.savefig(out / "dormant_heads.png", dpi=120, bbox_inches="tight")
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("dormant/accuracy_vs_heads_zeroed", figure, self.global_step)
                logger.experiment.add_text("dormant/table", markdown_table(rows), self.global_step)
        n = max(v[1] for v in self.dormant_share.values())
        for name in ("attention_weight", "output_norm"):
            log_heatmap(self.trainer, f"dormant/mean_score/{name}", self.score_sums[name] / n, self.global_step,
                        f"mean {name} score")
        import matplotlib.pyplot as plt

        plt.close(figure)


def _per_item(scores: torch.Tensor, item_index: torch.Tensor) -> torch.Tensor:
    """Average the scores of each question's choices and give every choice that average."""
    n_items = int(item_index.max()) + 1
    sums = torch.zeros(n_items, *scores.shape[1:], device=scores.device).index_add_(0, item_index, scores)
    counts = torch.bincount(item_index, minlength=n_items).view(-1, *([1] * (scores.dim() - 1)))
    return (sums / counts)[item_index]


def markdown_table(rows: list[dict]) -> str:
    tasks = sorted({r["task"] for r in rows})
    defs = sorted({r["definition"] for r in rows})
    pcts = sorted({r["percent_zeroed"] for r in rows})
    lookup = {(r["task"], r["definition"], r["percent_zeroed"]): r["accuracy"] for r in rows}
    lines = ["| task | definition | " + " | ".join(f"{p}%" for p in pcts) + " |", "|---|---|" + "---|" * len(pcts)]
    for task in tasks:
        for d in defs:
            cells = [f"{lookup[(task, d, p)]:.3f}" if (task, d, p) in lookup else "" for p in pcts]
            lines.append(f"| {task} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for d in sorted({r["definition"] for r in rows if r["task"] == task}):
            pts = sorted((r["percent_zeroed"], r["accuracy"]) for r in rows if r["task"] == task and r["definition"] == d)
            ax.plot(*zip(*pts), marker="o", label=d)
        ax.set_title(task)
        ax.set_xlabel("% heads zeroed")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
