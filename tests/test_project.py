"""The project's promises about itself: the README's commands are what CI runs; benchmarks run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    setup, main_job, tests = (b.strip() for b in blocks[:3])
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci and tests in ci
    assert main_job == "python cli.py fit --config configs/default_moe/tiny.yaml"
    assert (ROOT / "configs/default_moe/tiny.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, extra, names",
    [
        ("moe_overhead.py", ["--repeats", "1"],
         ["default_vs_topk_step", "moe_vs_dense_layer", "moe_layer_vs_mixtral_eager", "moe_layer_vs_mixtral_grouped_mm"]),
        ("moe_memory.py", ["--activation-checkpointing"], ["saved_bytes_per_token", "saved_bytes_per_token_checkpointed"]),
        ("hook_overhead.py", ["--repeats", "1", "--model", "tiny-llama"], ["activation_cache_forward", "head_ablation_forward"]),
        ("lori_efficiency.py", ["--warmup", "1", "--model", "tiny-llama"], ["lori_params", "lori_optimizer_state", "lori_step_time"]),
        ("als_speed.py", ["--model", "tiny-llama", "--problems", "4", "--max-new-tokens", "8", "--latent-steps", "1"],
         ["als_time_per_token", "latent_seek_time_per_problem"]),
        ("dpo_step.py", ["--model", "tiny-llama", "--prompt", "32", "--reply", "8"], ["dpo_step"]),
        ("canary_scoring.py", ["--model", "tiny-llama", "--canaries", "20", "--batch", "10"], ["canary_scoring"]),
        ("judge_throughput.py", ["--prompts", "8", "--latency", "0.01"], ["judge_throughput"]),
    ],
)
def test_benchmarks_print_their_ratios(script, extra, names):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--steps", "1", *extra],
                          capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["benchmark"] for r in rows] == names
    ratios = [v for r in rows for k, v in r.items() if k == "ratio" or (k.endswith("_ratio") and "formula" not in k)]
    assert ratios and all(v > 0 for v in ratios)


@pytest.mark.slow
def test_the_wheel_installs_only_the_lantern_namespace(tmp_path):
    import shutil
    import zipfile

    src = tmp_path / "src"  # build from a copy: setuptools leaves build/ behind and would reuse it
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lantern-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/", 1)[0] for n in names} == {"lantern", wheel.name.split("-py3")[0] + ".dist-info"}
    assert {"lantern/cli.py", "lantern/errors.py", "lantern/reporting.py", "lantern/models/scoring.py",
            "lantern/datamodules/tasks/commonsense_mc.jsonl"} <= set(names)
    assert not any(n.startswith(("lantern/tests/", "lantern/bench/", "lantern/configs/")) for n in names)
