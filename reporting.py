"""Results written in one place: tables and figures to the run directory and every TensorBoard logger.

Call the writers on every rank: the run directory (``trainer.log_dir``) is agreed on by a
collective broadcast, and only rank zero then writes. Without a TensorBoard logger the
TensorBoard half is skipped; without any logger files go to ``default_root_dir``.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (runs are headless; startup stays fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def say(trainer: L.Trainer | None, message: str) -> None:
    """One ``lantern:`` line on stderr, from rank zero only (or always, outside a Trainer)."""
    if trainer is None or trainer.is_global_zero:
        print(f"lantern: {message}", file=sys.stderr)


def gather_objects(items: list) -> list:
    """Every rank's items, on every rank (one process: the items)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory; call on every rank (``log_dir`` broadcasts)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _tensorboards(trainer: L.Trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per row under a header of every row's keys; floats to 4 significant digits."""
    head = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(_cell(r.get(h, "")) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pivot(rows: Sequence[dict], index: Sequence[str], column: str, value: str, label: str = "{}") -> list[dict]:
    """Long rows to wide ones: a row per ``index`` combination, a column per ``column`` value (``label``-formatted)."""
    columns = sorted({r[column] for r in rows})
    wide: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[i] for i in index)
        wide.setdefault(key, {**dict(zip(index, key)), **{label.format(c): "" for c in columns}})
        wide[key][label.format(r[column])] = r[value]
    return [wide[k] for k in sorted(wide)]


def write_table(trainer: L.Trainer, rows: Sequence[dict], name: str, tag: str, *, payload: Any = None,
                markdown: str | None = None, step: int | None = None) -> None:
    """``{name}.md``, ``{name}.csv`` and ``{name}.json`` in the run directory, the markdown as TensorBoard text ``tag``.

    ``payload`` replaces the rows as the JSON content (to carry settings or per-head arrays beside
    them); ``markdown`` replaces the one-line-per-row rendering (e.g. a pivot) in the ``.md`` and TensorBoard.
    """
    out = run_dir(trainer)
    if not trainer.is_global_zero:
        return
    text = markdown if markdown is not None else markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.csv").open("w", newline="") as fh:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (a task's own metrics)
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(list(rows) if payload is None else payload, indent=1))
    for experiment in _tensorboards(trainer):
        experiment.add_text(tag, text, trainer.global_step if step is None else step)


def write_figure(trainer: L.Trainer, figure, tag: str, name: str | None = None, *, step: int | None = None) -> None:
    """The figure to TensorBoard as ``tag`` and, given a ``name``, as ``{name}.png`` in the run directory; then closed.

    Without a ``name`` the run directory is not consulted, so this may be called on rank zero alone.
    """
    try:
        out = run_dir(trainer) if name is not None else None
        if not trainer.is_global_zero:
            return
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        for experiment in _tensorboards(trainer):
            experiment.add_figure(tag, figure, trainer.global_step if step is None else step, close=False)
    finally:
        pyplot().close(figure)


def line_plot(rows: Sequence[dict], x: str, y: str, *, line: str | None = None, panel: str | None = None,
              xlabel: str | None = None, ylabel: str | None = None):
    """``y`` against ``x`` from table rows: one line per value of ``line``, one panel per value of ``panel``."""
    plt = pyplot()
    panels = sorted({r[panel] for r in rows}) if panel else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, p in zip(axes[0], panels):
        mine = [r for r in rows if panel is None or r[panel] == p]
        for label in sorted({r[line] for r in mine}) if line else [None]:
            pts = sorted((r[x], r[y]) for r in mine if line is None or r[line] == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        if p is not None:
            ax.set_title(p)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        ax.grid(alpha=0.3)
        if line:
            ax.legend()
    fig.tight_layout()
    return fig


def heatmap(values, title: str, *, xlabel: str = "head", ylabel: str = "layer", vmin: float | None = None,
            vmax: float | None = None, xticks: Sequence | None = None):
    """A rows × columns grid (layer × head by default) as a colour map with a colour bar."""
    grid = torch.as_tensor(values).detach().float().cpu()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * grid.shape[1], 1 + 0.3 * grid.shape[0]), dpi=100)
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), [str(t) for t in xticks])
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
