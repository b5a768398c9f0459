from pathlib import Path

import pytest
import yaml

from lantern.cli import cli_main, run_name

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
RECIPES = [c for c in CONFIGS if "class_path" in str((yaml.safe_load((ROOT / c).read_text()) or {}).get("model", ""))]
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


@pytest.mark.slow
@pytest.mark.parametrize("config", TINY)
def test_tiny_recipe_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = _subcommand(config)
    cli = cli_main([command, "--config", str(ROOT / config), "--trainer.fast_dev_run", "true"])
    assert cli.trainer.state.finished
    if command == "fit":
        assert cli.trainer.callback_metrics["train/loss"] > 0


def test_the_topk_baseline_is_an_overlay_that_changes_only_the_router(capsys):
    def resolved(*configs):
        with pytest.raises(SystemExit):
            cli_main(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    main, topk = resolved(MAIN), resolved(MAIN, str(ROOT / "configs/default_moe/topk.yaml"))
    assert topk["model"]["init_args"]["model"]["init_args"].pop("router_mode") == "topk"
    assert main["model"]["init_args"]["model"]["init_args"].pop("router_mode") == "default"
    assert main["trainer"].pop("logger")["init_args"]["name"] == "default_moe_tiny"
    assert topk["trainer"].pop("logger")["init_args"]["name"] == "default_moe_tiny_topk"
    assert main == topk


def test_run_names_come_from_the_recipe():
    assert run_name(["fit", "--config", "configs/dormant_heads/smollm2.yaml", "--config", "configs/debug/tiny.yaml"]) == "dormant_heads_smollm2"
    assert run_name(["fit", "--config=configs/default_moe/tiny.yaml", "--config", "configs/default_moe/topk.yaml"]) == "default_moe_tiny_topk"
    assert run_name(["fit"]) == "default"


@pytest.mark.slow
def test_fit_then_validate_from_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = cli_main(["fit", "--config", MAIN, "--config", DEBUG])
    run = Path(fit.trainer.log_dir).resolve()
    assert run.parent == tmp_path / "runs" / "default_moe_tiny"
    assert (run / "config.yaml").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt", "best-4.ckpt"}
    assert list(run.glob("events.out.tfevents.*"))
    assert (tmp_path / "runs/default_moe_tiny/latest").resolve() == run
    val = cli_main(["validate", "--ckpt_path", "runs/default_moe_tiny/latest/checkpoints/last.ckpt"])
    assert (tmp_path / "runs/default_moe_tiny/latest").resolve() == run  # evaluating a checkpoint does not move it
    assert type(val.model).__name__ == "MoEPretraining" and val.model.model.moe_layers[0].router_mode == "default"
    assert float(val.trainer.callback_metrics["val/loss"]) == pytest.approx(float(fit.trainer.callback_metrics["val/loss"]), abs=1e-6)
