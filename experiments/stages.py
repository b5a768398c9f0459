"""What every multi-stage experiment shares: one CLI run per stage, in its own process, logged to a file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: configs/ and cli.py live here


def run_cli(args: list[str], log: Path) -> float:
    """One CLI run in its own process (fresh memory, its own seed); its output goes to ``log``. Seconds taken."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"lantern: error: `cli.py {' '.join(args)}` failed: {tail[0]} (log: {log})")
    return time.perf_counter() - start


def latest(runs: Path, name: str) -> Path:
    """The newest run of ``name`` (``runs/<name>/latest``)."""
    return runs / name / "latest"


def read_json(path: Path) -> list | dict:
    return json.loads(path.read_text()) if path.is_file() else []


def write_report(out: Path, name: str, lines: list[str], result: dict) -> dict:
    """``{name}.md`` and ``{name}.json`` in ``out``; the markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return result
