import subprocess
import sys
from pathlib import Path

import pytest

from lantern.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
RECIPES = [c for c in CONFIGS if "model:" in (ROOT / c).read_text()]
OVERLAYS = [c for c in CONFIGS if c not in RECIPES]
TINY = [c for c in RECIPES if "tiny" in Path(c).stem]
MAIN = str(ROOT / "configs/default_moe/tiny.yaml")
DEBUG = str(ROOT / "configs/debug/tiny.yaml")


def test_every_config_is_covered():
    assert RECIPES and OVERLAYS and TINY


@pytest.mark.parametrize("config", RECIPES)
def test_recipe_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_stacks_on_the_main_recipe(overlay, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", MAIN, "--config", str(ROOT / overlay), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "MoEPretraining" in capsys.readouterr().out


def _subcommand(config: str) -> str:
    """``fit`` for trainable recipes, ``validate`` for studies (modules without a training_step)."""
    import importlib

    import yaml
    from lightning.pytorch import LightningModule

    path = yaml.safe_load((ROOT / config).read_text())["model"]["class_path"]
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return "fit" if cls.training_step is not LightningModule.training_step else "validate"


@pytest.mark.parametrize("config", TINY)
def test_tiny_recipe_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = _subcommand(config)
    cli = cli_main([command, "--config", str(ROOT / config), "--trainer.fast_dev_run", "true"])
    assert cli.trainer.state.finished
    if command == "fit":
        assert cli.trainer.callback_metrics["train/loss"] > 0


def test_topk_recipe_differs_from_main_only_in_router_and_name():
    main = (ROOT / "configs/default_moe/tiny.yaml").read_text().splitlines()
    topk = (ROOT / "configs/default_moe/topk_tiny.yaml").read_text().splitlines()
    diff = {(a.strip(), b.strip()) for a, b in zip(main, topk) if a != b and not a.startswith("#")}
    assert len(main) == len(topk)
    assert diff == {("router_mode: default", "router_mode: topk"), ("name: default_moe_tiny", "name: topk_moe_tiny")}


def test_fit_then_validate_from_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = cli_main(["fit", "--config", MAIN, "--config", DEBUG])
    run = Path(fit.trainer.log_dir).resolve()
    assert run.parent == tmp_path / "runs" / "default_moe_tiny"
    assert (run / "config.yaml").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt", "best-4.ckpt"}
    assert list(run.glob("events.out.tfevents.*"))
    val = cli_main(["validate", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert type(val.model).__name__ == "MoEPretraining" and val.model.model.blocks[0].mlp.router_mode == "default"
    assert float(val.trainer.callback_metrics["val/loss"]) == pytest.approx(float(fit.trainer.callback_metrics["val/loss"]), abs=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.lr", "-0.1"], "model.lr=-0.1 must be > 0"),
        (["--model.init_args.model.init_args.top_k", "9"], "top_k=9 must be between 1 and n_experts=8"),
        (["--model.init_args.model.init_args.router_mode", "soft"], "router_mode"),
        (["--model.init_args.lrr", "0.1"], "lrr"),
        (["--model.init_args.lr", "fast"], "lr"),
        (["--data.init_args.source", "/no/such/corpus.txt"], "no such file or directory"),
    ],
)
def test_bad_config_fails_before_training_with_one_message(override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", MAIN, *override])
    assert exit_.value.code not in (0, None)
    said = f"{exit_.value.code}\n{capsys.readouterr().err}"
    assert message in said
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_console_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config", MAIN, "--model.init_args.model.init_args.top_k", "9"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lantern: error: fit config:")
