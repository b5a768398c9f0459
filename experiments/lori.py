"""The whole LoRI experiment (arXiv 2504.07448) on the embedded model, from the recipes in configs/lori/:

1. a single-task adapter per variant (LoRA, LoRI-D, then LoRI-S from LoRI-D's mask) and task;
2. ``configs/lori/merge.yaml``: the base model, each adapter on its own task, and per variant one
   merged model (concatenated and linear) on every task, with the adapters' update-subspace overlap;
3. ``configs/lori/continual.yaml``: safety first, then a task on top, per variant;
4. ``lori.md`` / ``lori.json`` in ``runs/lori/``.

    python experiments/lori.py

A stage whose result already exists is not run again, so an interrupted experiment continues
where it stopped (``--force`` reruns everything). Extra arguments after ``--`` go to every run
(e.g. ``-- --trainer.max_steps 4`` for a smoke test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages import ROOT, latest as _latest, read_json as _read, run_cli as _run, write_report

from lantern.reporting import markdown_table

TASKS = ("math", "code", "nlu", "safety")
VARIANTS = ("lora", "lori_d", "lori_s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder the runs are written to (the CLI's default)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--continual-task", default="math", choices=[t for t in TASKS if t != "safety"])
    parser.add_argument("--merge-methods", nargs="+", default=["concat", "linear"], choices=["concat", "linear"])
    parser.add_argument("--force", action="store_true", help="rerun stages whose results exist")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for every run")
    opts = parser.parse_args(argv)
    extra = [a for a in opts.extra if a != "--"]
    runs = Path(opts.runs)
    logs = runs / "lori" / "logs"
    seconds: dict[str, float] = {}

    def fit(name: str, config: str, *more: str) -> Path:
        adapter = _latest(runs, name) / "adapter"
        if opts.force or not (adapter / "adapter_config.json").is_file():
            seconds[name] = _run(["fit", "--config", config, "--trainer.logger.init_args.name", name,
                                  "--trainer.logger.init_args.save_dir", str(runs), *more, *extra], logs / f"{name}.log")
        return adapter

    adapters: dict[str, dict[str, str]] = {v: {} for v in VARIANTS}
    for task in opts.tasks:
        for variant in VARIANTS:
            mask = ["--model.init_args.mask_from", adapters["lori_d"][task]] if variant == "lori_s" else []
            adapters[variant][task] = str(fit(f"lori_{variant}_{task}", f"{ROOT}/configs/lori/{variant}_{task}.yaml", *mask))

    merge_dir = _latest(runs, "lori_merge")
    if opts.force or not (merge_dir / "lori_merge.json").is_file():
        seconds["lori_merge"] = _run(
            ["validate", "--config", f"{ROOT}/configs/lori/merge.yaml", "--model.init_args.adapters", json.dumps(adapters),
             "--model.init_args.single", "false",  # each fit already scored its adapter on the same held-out split
             "--model.init_args.methods", json.dumps(opts.merge_methods),
             "--data.init_args.eval_tasks", json.dumps(list(opts.tasks)),
             "--trainer.logger.init_args.name", "lori_merge", "--trainer.logger.init_args.save_dir", str(runs), *extra],
            logs / "lori_merge.log")

    continual = {}
    if "safety" in opts.tasks and opts.continual_task in opts.tasks:
        task = opts.continual_task
        for variant in VARIANTS:
            more = ["--model.init_args.variant", variant, "--model.init_args.init_from", adapters[variant]["safety"],
                    "--data.init_args.train", f"task:{task}", "--data.init_args.eval_tasks", json.dumps(["safety", task])]
            more += ["--model.init_args.mask_from", adapters["lori_d"][task] if variant == "lori_s" else "null"]
            name = f"lori_continual_{variant}_{task}"
            fit(name, f"{ROOT}/configs/lori/continual.yaml", *more)
            continual[variant] = {r["task"]: r for r in _read(_latest(runs, name) / "adapter_eval.json")}

    return report(runs, adapters, continual, opts.continual_task, seconds)


def report(runs: Path, adapters: dict, continual: dict, continual_task: str, seconds: dict) -> dict:
    merge = json.loads((_latest(runs, "lori_merge") / "lori_merge.json").read_text())
    scores = {(r["variant"], r["config"], r["task"]): r for r in merge["scores"]}
    for variant, per_task in adapters.items():  # single-task scores: each fit's own validation
        for task, adapter in per_task.items():
            for r in _read(Path(adapter).parent / "adapter_eval.json"):
                if r["task"] == task:
                    scores.setdefault((variant, "single", task), r)
    tasks = sorted({r["task"] for r in merge["scores"]})

    def cell(r: dict | None) -> str:
        if not r:
            return ""
        return f"{r['score']:.1f}" + (f" ({r['over_refusal']:.1f})" if "over_refusal" in r else "")

    keys = [("base", "base")] + [(v, c) for v in adapters for c in ("single", "merged_concat", "merged_linear")]
    table = [{"variant": v, "model": c, **{t: cell(scores.get((v, c, t))) for t in tasks}}
             for v, c in keys if any((v, c, t) in scores for t in tasks)]
    lines = ["# LoRI on the embedded model", "",
             "Scores in % on each task's held-out split (math, code, NLU: exact-match accuracy; safety: refusal rate "
             "on harmful prompts, with over-refusal on benign prompts in brackets).", "",
             "## Single-task adapters and merged models", "", markdown_table(table)]
    if merge.get("overlap"):
        lines += ["## Interference: overlap of the adapters' update subspaces", "",
                  "Mean cos² of the principal angles between the column spaces of two tasks' ΔW (1 = the same "
                  "subspace), averaged over modules.", "",
                  markdown_table([{"variant": o["variant"], "pair": o["pair"], "overlap": f"{o['subspace_overlap']:.4f}"}
                                  for o in merge["overlap"]])]
    if continual:
        lines += [f"## Continual learning: safety, then {continual_task}", "",
                  markdown_table([{"variant": v, "safety refusal % (over-refusal)": cell(rows.get("safety")),
                                   f"{continual_task} %": cell(rows.get(continual_task))} for v, rows in continual.items()])]
    if seconds:
        lines += ["Wall-clock seconds of the runs made this time: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    result = {"adapters": adapters, "merge": merge, "continual": continual, "continual_task": continual_task,
              "seconds": seconds}
    return write_report(runs / "lori", "lori", lines, result)


if __name__ == "__main__":
    main()
