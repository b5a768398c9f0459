"""FRIT's rounds (arXiv 2509.13334) on the embedded model, from the recipes in configs/frit/:

1. round k: preference pairs by intervention from the current model (``pairs_smollm2.yaml``,
   ``predict``), then DPO on them (``dpo_smollm2.yaml``, ``fit``), which writes the next model;
2. the next round builds its pairs with that model (the paper: 3 rounds);
3. one evaluation (``eval_smollm2.yaml``, ``validate``) of the starting model and every round's
   model on the same held-out problems: ``runs/frit/frit.{md,json}``.

    python experiments/frit.py [--rounds 3] [--problems 96] [--source facts]

A stage whose result already exists is not run again, and an interrupted pair-building stage
continues its own file, so a stopped experiment continues where it stopped. ``--force`` reruns
every stage, but pair building still continues a finished file of the same settings: delete
``runs/frit_r*_pairs`` to draw new pairs. The evaluation reruns whenever its models change.
Extra arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages import ROOT, latest, read_json, run_cli, write_report

from lantern.reporting import markdown_table

CONFIGS = ROOT / "configs" / "frit"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder the runs are written to (the CLI's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the starting model")
    parser.add_argument("--source", default=None, help="problems (math:D, facts, a .jsonl, hf:...); default: the recipes'")
    parser.add_argument("--problems", type=int, default=None, help="problems per round's pairs; default: the recipe's")
    parser.add_argument("--eval-problems", type=int, default=None, help="held-out problems; default: the recipe's")
    parser.add_argument("--force", action="store_true", help="rerun stages whose results exist")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for every run")
    opts = parser.parse_args(argv)
    if opts.rounds < 1:
        parser.error("--rounds must be ≥ 1")
    extra = [a for a in opts.extra if a != "--"]
    runs = Path(opts.runs)
    logs = runs / "frit" / "logs"
    data = ["--data.init_args.calibration", opts.source] if opts.source else []
    seconds: dict[str, float] = {}

    def stage(command: str, name: str, config: str, done: Path, *more: str) -> Path:
        if opts.force or not done.exists():
            seconds[name] = run_cli([command, "--config", str(CONFIGS / config), "--trainer.logger.init_args.name", name,
                                     "--trainer.logger.init_args.save_dir", str(runs), *data, *more, *extra],
                                    logs / f"{name}.log")
        return latest(runs, name).resolve()

    model, models, rounds = opts.model, [], []
    for k in range(1, opts.rounds + 1):
        n = ["--data.init_args.n_calibration", str(opts.problems)] if opts.problems else []
        pairs = stage("predict", f"frit_r{k}_pairs", "pairs_smollm2.yaml", latest(runs, f"frit_r{k}_pairs") / "pairs.jsonl",
                      "--model.init_args.model_name", model, *n) / "pairs.jsonl"
        trained = stage("fit", f"frit_r{k}_dpo", "dpo_smollm2.yaml", latest(runs, f"frit_r{k}_dpo") / "model" / "config.json",
                        "--model.init_args.model_name", model, "--data.init_args.train", str(pairs)) / "model"
        rounds.append({"round": k, "model": model, "pairs": sum(1 for line in pairs.open() if line.strip()),
                       "trained": str(trained)})
        model = str(trained)
        models.append(model)

    n = ["--data.init_args.n_eval", str(opts.eval_problems)] if opts.eval_problems else []
    done = latest(runs, "frit_eval") / "frit.json"
    if [r["model"] for r in read_json(done)] != [opts.model, *models]:  # other rounds: evaluate again
        done = done.with_name("missing")
    evaluation = stage("validate", "frit_eval", "eval_smollm2.yaml", done,
                       "--model.init_args.model_name", opts.model, "--model.init_args.compare", json.dumps(models), *n)
    return report(runs, rounds, read_json(evaluation / "frit.json"), seconds)


def report(runs: Path, rounds: list[dict], table: list[dict], seconds: dict) -> dict:
    label = {r["trained"]: f"after round {r['round']} ({r['pairs']} pairs)" for r in rounds}
    rows = [{"model": "before FRIT" if i == 0 else label.get(r["model"], r["model"]),
             **{k: v for k, v in r.items() if k != "model"}} for i, r in enumerate(table)]
    lines = ["# FRIT on the embedded model", "",
             "Held-out problems: accuracy (%), faithfulness (% of a trace's steps whose intervention changes the "
             "answer, averaged over parsed traces) and fully faithful traces (%), 95% bootstrap intervals.", "",
             markdown_table(rows)]
    if seconds:
        lines += ["Wall-clock seconds of the runs made this time: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    result = {"rounds": rounds, "table": rows, "seconds": seconds}
    return write_report(runs / "frit", "frit", lines, result)


if __name__ == "__main__":
    main()
