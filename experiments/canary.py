"""Every canary design audited on the embedded model with one seed and one fine-tuning set
(arXiv 2503.06808), from the recipes in configs/canary/:

    python experiments/canary.py [--designs random unigram bigram rare new] [--dp] [--seed 0]

Each design fine-tunes its own copy of the model on the same text with the same member
assignment (membership depends on the seed and the number of canaries only), then audits it.
``--dp`` adds the DP-SGD run of ``dp_eps4.yaml``. Runs are named ``canary_<design>`` (with
``_seed<N>`` for a seed other than 0). The comparison (TPR at 1% FPR, AUC and the
one-run ε lower bound per design) goes to ``runs/canary/canary.{md,json}``. A design whose audit
exists is not run again unless ``--force``. Extra arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import ROOT, latest, read_json, run_cli, write_report

from lantern.datamodules.canaries import DESIGNS
from lantern.reporting import markdown_table

CONFIGS = ROOT / "configs" / "canary"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder the runs are written to (the CLI's default)")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--dp", action="store_true", help="also audit the DP-SGD run (dp_eps4.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="canaries, membership and data order of every run")
    parser.add_argument("--force", action="store_true", help="rerun designs whose audit exists")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then arguments for every run")
    opts = parser.parse_args(argv)
    extra = [a for a in opts.extra if a != "--"]
    runs = Path(opts.runs)
    seconds: dict[str, float] = {}
    rows = []
    for config in [*opts.designs, *(["dp_eps4"] if opts.dp else [])]:
        name = f"canary_{config}" if opts.seed == 0 else f"canary_{config}_seed{opts.seed}"
        done = latest(runs, name) / "audit.json"
        if opts.force or not done.exists():
            seconds[config] = run_cli(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--seed_everything", str(opts.seed),
                                       "--data.init_args.seed", str(opts.seed), "--model.init_args.seed", str(opts.seed), "--trainer.logger.init_args.name", name,
                                       "--trainer.logger.init_args.save_dir", str(runs), *extra],
                                      runs / "canary" / "logs" / f"{name}.log")
        rows.append(row(config, read_json(done)))
    return report(runs, rows, seconds)


def row(config: str, audit: dict) -> dict:
    loss, pre = audit["loss"], audit["audit"]
    out = {"run": config, "design": audit["design"], "fine-tuning": audit["fine_tuning"],
           "TPR@1%FPR (%)": 100 * loss["tpr_at_1pct_fpr"], "TPR@0.1%FPR (%)": 100 * loss["tpr_at_0.1pct_fpr"],
           "AUC": loss["auc"], "embedding AUC": audit["embedding"]["auc"],
           "right of k": f"{pre['correct']}/{pre['k']}", "ε_lb": pre["epsilon_lb"]}
    out["ε (DP-SGD, at the audit's δ)"] = audit["dp"]["epsilon_at_audit_delta"] if audit.get("dp") else ""
    return out


def report(runs: Path, rows: list[dict], seconds: dict) -> dict:
    lines = ["# Canary designs audited on the embedded model", "",
             "Membership by the loss on the secret; ε_lb: the one-run lower bound from the k lowest losses "
             "(pre-registered; δ and confidence as in each run's audit.json).", "", markdown_table(rows)]
    if seconds:
        lines += ["Wall-clock seconds of the runs made this time: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    return write_report(runs / "canary", "canary", lines, {"table": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
