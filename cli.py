"""Lantern's command line: ``python cli.py fit|validate|test|predict --config configs/<x>.yaml``.

Configs compose left to right (``--config recipe.yaml --config configs/strategy/ddp.yaml``).
Every run logs to TensorBoard under ``runs/<experiment>/``, keeps the last and the best
checkpoint, monitors the learning rate and saves its resolved ``config.yaml`` beside the logs.
``validate``/``test``/``predict --ckpt_path RUN/checkpoints/x.ckpt`` without ``--config``
rebuild the run from its saved ``config.yaml``.
"""

from __future__ import annotations

import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import lantern.datamodules  # noqa: F401  (registers the DataModules)
import lantern.lightning_modules  # noqa: F401  (registers the LightningModules)
from lantern.datamodules import DataError
from lantern.lightning_modules import NonFiniteLossError
from lantern.models import ModelLoadError, UnsupportedArchitecture

EVAL_COMMANDS = ("validate", "test", "predict")


class LanternCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # a config value the classes reject
            while err.__cause__ or err.__context__:  # jsonargparse wraps the class's own message
                err = err.__cause__ or err.__context__
            raise SystemExit(f"lantern: error: {self.subcommand} config: {err}") from None


def _run_config(ckpt_path: str) -> Path | None:
    """The ``config.yaml`` a run saved beside its logs, found from one of its checkpoints."""
    for parent in Path(ckpt_path).resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def _with_run_config(args: list[str]) -> list[str]:
    if not args or args[0] not in EVAL_COMMANDS or any(a == "--config" or a.startswith("--config=") for a in args):
        return args
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
    if ckpt is None and "--ckpt_path" in args[:-1]:
        ckpt = args[args.index("--ckpt_path") + 1]
    if ckpt is None:
        return args
    if not Path(ckpt).is_file():
        raise SystemExit(f"lantern: error: --ckpt_path {ckpt}: no such checkpoint file")
    config = _run_config(ckpt)
    if config is None:
        raise SystemExit(f"lantern: error: no config.yaml found above {ckpt}; pass the run's recipe with --config")
    return [args[0], "--config", str(config), *args[1:]]


_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")


def _one_line(message: str) -> str:
    """jsonargparse explains a bad value over many lines; keep the path to the culprit."""
    lines = [ln.strip().lstrip("- ") for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    return " ".join(lines)


def cli_main(args: list[str] | None = None) -> LanternCLI | None:
    args = list(sys.argv[1:] if args is None else args)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        return LanternCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=1234,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                }
            },
            parser_kwargs={"exit_on_error": False},
            args=_with_run_config(args),
        )
    except ArgumentError as err:
        raise SystemExit(f"lantern: error: {_one_line(str(err))}") from None
    except (DataError, ModelLoadError, NonFiniteLossError, UnsupportedArchitecture) as err:
        raise SystemExit(f"lantern: error: {err}") from None


if __name__ == "__main__":
    cli_main()
