"""Lantern's command line: ``python cli.py fit|validate|test|predict --config configs/<x>.yaml``.

Configs compose left to right (``--config recipe.yaml --config configs/strategy/ddp.yaml``).
Every run logs to TensorBoard under ``runs/<recipe>/version_N/`` (``runs/<recipe>/latest``
links to the newest run with a checkpoint), keeps the last and the best checkpoint (only
finite ones), stops on non-finite gradients, monitors the learning rate and saves its
resolved ``config.yaml``. ``validate``/``test``/``predict --ckpt_path RUN/checkpoints/x.ckpt``
without ``--config`` rebuild the run from its saved ``config.yaml``.

Every expected error — a bad value, file, checkpoint or setting, found by whichever layer —
ends in one line, ``lantern: error: …``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

import lantern.datamodules  # noqa: F401  (registers the DataModules)
import lantern.lightning_modules  # noqa: F401  (registers the LightningModules)
from lantern.callbacks.nonfinite import FiniteCheckpoint, NonFiniteGuard, link_latest
from lantern.errors import CheckpointError, ConfigError, LanternError
from lantern.models.loading import load_tokenizer, writable_dir

EVAL_COMMANDS = ("validate", "test", "predict")
_NUMBER = re.compile(r"^-\d*\.?\d+(e[-+]?\d+)?$", re.I)


class LanternCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:  # the parsed config lets the error name the field as the user types it
            config, subcommand = getattr(self, "config", None), getattr(self, "subcommand", None)
            err.lantern_config = config.get(subcommand) if config is not None and subcommand else config
            raise

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(FiniteCheckpoint, "checkpoint")
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
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.trainer is None:
            raise ConfigError("config", "trainer", None, "Trainer settings under trainer: (or no trainer: key at all)")
        trainer, monitor = config.trainer, config.checkpoint.monitor
        _check_sharding_has_gpus(config)
        for field, ok, expected in (
            ("max_steps", lambda v: v == -1 or v > 0, "a positive number of steps, or -1 for no limit"),
            ("gradient_clip_val", lambda v: v >= 0, "≥ 0 (or null for no clipping)"),
            ("accumulate_grad_batches", lambda v: v >= 1, "≥ 1"),
            ("val_check_interval", lambda v: v > 0, "> 0 (a fraction of an epoch, or batches), or null"),
            ("limit_train_batches", lambda v: v > 0 or self.subcommand != "fit",
             "> 0 (a fraction, or batches): fit with no batches trains nothing"),
        ):
            value = trainer.get(field)
            if value is not None and not ok(value):
                raise ConfigError("trainer", field, value, expected)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            logger = logger.as_dict() if hasattr(logger, "as_dict") else logger
            save_dir = (logger.get("init_args") or {}).get("save_dir") if isinstance(logger, dict) else None
            if save_dir:
                writable_dir(Path(save_dir), logger["class_path"].rsplit(".", 1)[-1], "save_dir", create=False)
        if trainer.default_root_dir:
            writable_dir(Path(trainer.default_root_dir), "trainer", "default_root_dir", create=False)
        if self.subcommand == "fit" and monitor and trainer.limit_val_batches == 0:
            raise ConfigError(
                "trainer", "limit_val_batches", 0,
                f"> 0 while checkpoint.monitor={monitor!r} (no validation, no best checkpoint); "
                "or set --checkpoint.monitor null",
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # a class rejected its arguments; jsonargparse wraps that
            if _expected_error(err) is not None:
                raise
            while err.__cause__ or err.__context__:  # a plain ValueError: its own message is the deepest
                err = err.__cause__ or err.__context__
            raise LanternError(f"{self.subcommand} config: {err}") from None

    def instantiate_trainer(self, **kwargs):
        _agree_on_tokenizer(self.model, self.datamodule)
        if self.datamodule is not None and hasattr(self.model, "check_datamodule"):
            self.model.check_datamodule(self.datamodule)  # before the Trainer, so the error comes alone
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt:
            check_checkpoint_fits(read_checkpoint(ckpt), self.model, ckpt)
        if ckpt and Path(ckpt).is_dir() and not _model_parallel(self.config[self.subcommand].trainer):
            raise CheckpointError(f"--ckpt_path {ckpt}: a sharded checkpoint, which only the strategy that wrote it reads: "
                                  "add --config configs/strategy/fsdp.yaml")
        if self.subcommand == "predict":
            _check_predict(self.model, self.datamodule)
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        if not config.get("logger"):  # no logger: nothing to monitor the LR with, no run directory to save into
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            self.save_config_callback = None
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        run = _run_dir(self.trainer)
        new = run is not None and not run.exists()  # only a folder this run made may be discarded
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if new and self.trainer.global_step == 0:
                _discard_empty_run(run)
            raise
        run = _run_dir(self.trainer)
        if subcommand != "fit" and not self.config[subcommand].get("ckpt_path") and run:  # fit: at each checkpoint
            link_latest(run)


# ----------------------------------------------------------------------------- checks
def _agree_on_tokenizer(model: LightningModule, data: LightningDataModule | None) -> None:
    """A study's model and its data share one tokenizer: the data takes the model's unless it names one."""
    wanted = getattr(model, "tokenizer_name", None)
    if wanted is None or data is None or not hasattr(data, "tokenizer_name"):
        return
    if data.tokenizer_name is None:
        data.tokenizer_name = wanted
    elif data.tokenizer_name != wanted and load_tokenizer(data.tokenizer_name).fingerprint != load_tokenizer(wanted).fingerprint:
        raise ConfigError(
            data, "tokenizer", data.tokenizer_name,
            f"the model's tokenizer {wanted!r} (or leave it out: the data then uses the model's)",
        )


def _strategy_name(trainer) -> str:
    strategy = trainer.strategy
    return str(strategy.get("class_path") if hasattr(strategy, "get") else strategy)


def _model_parallel(trainer) -> bool:
    """Whether the configured strategy is a ``ModelParallelStrategy`` (FSDP2), the one that reads sharded checkpoints."""
    module, _, name = _strategy_name(trainer).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


def _check_sharding_has_gpus(config) -> None:
    """Sharding on ``accelerator: gpu`` without CUDA: one line naming the strategy, not Lightning's backend error."""
    trainer = config.trainer
    name = _strategy_name(trainer)
    if not (_model_parallel(trainer) or name.rsplit(".", 1)[-1].lower().startswith("fsdp")):
        return
    if str(trainer.accelerator) not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    files = [f for f in config.get("config") or [] if "strategy" in (_yaml_of(f).get("trainer") or {})]
    asks = f"{files[-1].relative} asks for trainer.accelerator=gpu" if files else "trainer.accelerator=gpu"
    raise ConfigError("trainer", "strategy", name, f"CUDA GPUs ({asks}) and this machine has none; leave that "
                      "overlay out, or add --trainer.accelerator cpu to try it on CPU processes")


def _yaml_of(path) -> dict:
    try:
        content = yaml.safe_load(Path(getattr(path, "absolute", path)).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def _check_predict(model: LightningModule, data: LightningDataModule | None) -> None:
    if type(model).predict_step is LightningModule.predict_step:
        raise LanternError(f"{type(model).__name__} has no predict step: use validate or test")
    if data is not None and type(data).predict_dataloader is LightningDataModule.predict_dataloader:
        raise LanternError(f"{type(data).__name__} has no predict data: use validate or test")


def read_checkpoint(path: str) -> dict:
    """The checkpoint's state, with a clear error for a missing, empty, truncated or foreign file.

    A sharded checkpoint (a folder) gives its metadata and, as meta tensors, its weights' names
    and shapes: the shards themselves only the strategy reads.
    """
    file = Path(path)
    if file.is_dir():
        return _read_sharded(file, path)
    if not file.is_file():
        raise CheckpointError(f"--ckpt_path {path}: no such checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"--ckpt_path {path}: the file is empty")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a damaged file; all mean "not loadable"
        raise CheckpointError(f"--ckpt_path {path}: not a readable checkpoint (truncated, damaged, or not written by torch.save)") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)")
    return state


def _read_sharded(folder: Path, path: str) -> dict:
    """A folder of torch.distributed.checkpoint shards and Lightning's ``meta.pt``, checked without loading a shard."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (folder / "meta.pt").is_file():
        raise CheckpointError(f"--ckpt_path {path}: a folder, but not a sharded checkpoint (no meta.pt in it)")
    try:
        state = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
        index = FileSystemReader(str(folder)).read_metadata()
    except Exception:  # as for a file: every failure here means "not loadable"
        raise CheckpointError(f"--ckpt_path {path}: not a readable sharded checkpoint (its meta.pt or .metadata is "
                              "missing, truncated or damaged)") from None
    for item in index.storage_data.values():
        shard = folder / item.relative_path
        if not shard.is_file() or shard.stat().st_size < item.offset + item.length:
            raise CheckpointError(f"--ckpt_path {path}: the shard {item.relative_path} is missing or truncated")
    weights = {
        name.removeprefix("state_dict."): torch.empty(item.size, dtype=item.properties.dtype, device="meta")
        for name, item in index.state_dict_metadata.items()
        if name.startswith("state_dict.") and isinstance(item, TensorStorageMetadata)
    }
    if not isinstance(state, dict) or not weights:
        raise CheckpointError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)")
    return {**state, "state_dict": weights}


def check_checkpoint_fits(state: dict | None, model: torch.nn.Module, path: str) -> None:
    """Compare names and shapes before a run starts, so a checkpoint of another model fails in one line."""
    if state is None:
        return
    saved = state["state_dict"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model lacks"
        raise CheckpointError(
            f"--ckpt_path {path}: does not fit {type(model).__name__}: the checkpoint {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors; was it written by another recipe?)"
        )
    for name, tensor in own.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"--ckpt_path {path}: does not fit {type(model).__name__}: {name} is {list(saved[name].shape)} "
                f"in the checkpoint and {list(tensor.shape)} in the model (a model of another size?)"
            )
    # A sharded checkpoint's weights are shapes only here; FiniteCheckpoint never writes a non-finite one.
    poisoned = [name for name, t in saved.items() if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if poisoned:
        raise CheckpointError(f"--ckpt_path {path}: NaN or inf in {len(poisoned)} of {len(saved)} tensors "
                              f"(first: {poisoned[0]}); use an earlier checkpoint")


def _run_dir(trainer) -> Path | None:
    """This run's folder, on rank zero (the logger's own, not ``trainer.log_dir``: that one is a collective)."""
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer is not None and trainer.is_global_zero else None
    return Path(log_dir) if log_dir else None


def _discard_empty_run(run: Path) -> None:
    """A run that failed before its first step leaves no folder behind (nor the empty ones above it)."""
    if not run.name.startswith("version_") or any(run.rglob("*.ckpt")):
        return
    shutil.rmtree(run, ignore_errors=True)
    for parent in (run.parent, run.parent.parent):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


# ----------------------------------------------------------------------------- arguments
class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML mapping with a key twice is a mistake, not a silent 'last one wins'."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_config_file(path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise LanternError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LanternError(f"--config {path}: not a text YAML file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise LanternError(f"--config {path}: cannot be read ({err.strerror})") from None
    try:
        content = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LanternError(f"--config {path}:{where}: invalid YAML ({problem})") from None
    if content is None:
        raise LanternError(f"--config {path}: the file is empty")
    if not isinstance(content, dict):
        raise LanternError(f"--config {path}: expected a mapping of settings (trainer:, model:, data:), got a {type(content).__name__}")


_SHORT = {"--config": "-c"}


def _option_values(args: list[str], option: str) -> list[tuple[int, str]]:
    """(index, value) of every ``--option value`` and ``--option=value`` (and the short form, ``-c``)."""
    names = {option, _SHORT.get(option, option)}
    found = []
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            found.append((i + 1, args[i + 1]))
        elif arg.startswith(tuple(n + "=" for n in names)):
            found.append((i, arg.split("=", 1)[1]))
    return found


def _run_config(ckpt_path: str) -> Path | None:
    """The ``config.yaml`` a run saved beside its logs, found from one of its checkpoints."""
    for parent in Path(ckpt_path).resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def prepare_args(args: list[str]) -> list[str]:
    """Check config files and the checkpoint before parsing; add the run's config for evaluation."""
    args = list(args)
    for i in range(len(args) - 1):  # `--lr -1e-3`: argparse would take -1e-3 for an option
        if args[i] and args[i].startswith("--") and "=" not in args[i] and _NUMBER.match(args[i + 1]):
            args[i], args[i + 1] = f"{args[i]}={args[i + 1]}", None
    args = [a for a in args if a is not None]
    configs = _option_values(args, "--config")
    for _, path in configs:
        check_config_file(path)
    ckpts = [(i, c) for i, c in _option_values(args, "--ckpt_path") if c.lower() not in ("", "null", "none")]
    if ckpts:
        index, ckpt = ckpts[-1]
        read_checkpoint(ckpt)
        real = str(Path(ckpt).resolve())  # runs/x/latest may move once this run starts
        args[index] = real if args[index] == ckpt else f"--ckpt_path={real}"
        if args and args[0] in EVAL_COMMANDS and not configs:
            config = _run_config(real)
            if config is None:
                raise CheckpointError(f"no config.yaml found above {ckpt}; pass the run's recipe with --config")
            args = [args[0], "--config", str(config), *args[1:]]
    return args


def run_name(args: list[str]) -> str:
    """``configs/default_moe/tiny.yaml`` → ``default_moe_tiny``; overlays from the same folder add their name."""
    paths = [Path(p) for _, p in _option_values(args, "--config")]
    if not paths:
        return "default"
    first = paths[0]
    parts = [first.parent.name, first.stem] if first.parent.name not in ("", ".", "configs") else [first.stem]
    parts += [p.stem for p in paths[1:] if p.parent.resolve() == first.parent.resolve()]
    return "_".join(parts)


# ----------------------------------------------------------------------------- errors
_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")


def _one_line(message: str) -> str:
    """jsonargparse explains a bad value over many lines; keep the path to the culprit."""
    lines = [ln.strip().lstrip("- ") for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    return " ".join(lines)


def _expected_error(err: BaseException) -> BaseException | None:
    """The most informative expected error in the chain: the outermost LanternError, else a known library one."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for kind in (LanternError, MisconfigurationException, ArgumentError):
        for e in chain:
            if isinstance(e, kind):
                return e
    return None


def _config_path(config: Any, owner: str, field: str, path: str = "") -> str | None:
    """Where ``owner(field=…)`` sits in the parsed config, as the user would type it."""
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    if isinstance(config, dict):
        if str(config.get("class_path", "")).rsplit(".", 1)[-1] == owner and isinstance(config.get("init_args"), dict):
            return f"{path}.init_args.{field}".lstrip(".")
        if isinstance(config.get(owner), dict) and "class_path" not in config[owner]:  # a group such as optim
            return f"{path}.{owner}.{field}".lstrip(".")
        for key, value in config.items():
            found = _config_path(value, owner, field, f"{path}.{key}")
            if found:
                return found
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found = _config_path(value, owner, field, f"{path}[{i}]")
            if found:
                return found
    return None


_CALLBACK_GROUPS = {"FiniteCheckpoint": "checkpoint", "NonFiniteGuard": "nonfinite", "LearningRateMonitor": "lr_monitor"}


def describe(err: BaseException, config: Any = None) -> str:
    if isinstance(err, ConfigError):
        path = f"trainer.{err.field}" if err.owner == "trainer" else _config_path(config, err.owner, err.field)
        if path is None and err.owner in _CALLBACK_GROUPS:  # the callbacks this CLI adds under their own keys
            path = f"{_CALLBACK_GROUPS[err.owner]}.{err.field}"
        message = err.render(path) if path else str(err)
    elif isinstance(err, ArgumentError):
        message = _one_line(str(err))
    else:
        message = str(err)
    return " ".join(message.split())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


_NO_TIPS = _NoTips()  # one instance: addFilter ignores a filter it already holds, so repeated calls add nothing


def _quiet() -> None:
    """Keep stderr for what matters: no seed notice (config.yaml has it), adverts or upstream deprecations."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in")  # a sharded last.ckpt, rewritten
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NO_TIPS)


def cli_main(args: list[str] | None = None) -> LanternCLI | None:
    args = list(sys.argv[1:] if args is None else args)
    _quiet()
    try:
        args = prepare_args(args)
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
                    "init_args": {"save_dir": "runs", "name": run_name(args)},
                }
            },
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except Exception as err:
        expected = _expected_error(err)
        if expected is None:
            raise
        raise SystemExit(f"lantern: error: {describe(expected, getattr(err, 'lantern_config', None))}") from None


if __name__ == "__main__":
    cli_main()
