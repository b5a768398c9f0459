"""Run untrusted Python programs (model-written code plus tests) in isolated subprocesses.

Each program runs as ``python -I`` in its own temporary folder and session, under a wall-clock
limit (the whole process group is killed) and, where ``resource`` exists, memory and CPU
limits set by a prologue inside the child, which keeps launching safe from many threads
(``preexec_fn`` is not). A thread pool launches the subprocesses in parallel. This is a guard
against accidents (loops, runaway memory), not a security boundary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

_PROLOGUE = """\
try:
    import resource as _r
    _r.setrlimit(_r.RLIMIT_AS, ({mem}, {mem}))
    _r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu}))
    del _r
except Exception:
    pass
"""


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str  # the last line of stderr, for reports
    seconds: float


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> RunResult:
    """Run one program; it passes when it exits with status 0 within ``timeout`` seconds."""
    prologue = _PROLOGUE.format(mem=memory_mb * 2**20, cpu=max(1, int(timeout) + 1))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lantern-run-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(prologue + program)
        proc = subprocess.Popen(
            [sys.executable, "-I", path], cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return RunResult(False, "timeout", f"timed out after {timeout:g} s", time.monotonic() - start)
        finally:
            _kill(proc)  # children it left behind in its session
    text = err.decode("utf-8", "replace").strip().splitlines()
    ok = proc.returncode == 0
    return RunResult(ok, "passed" if ok else "failed", text[-1][:300] if text else f"exit status {proc.returncode}",
                     time.monotonic() - start)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_programs(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024, workers: int | None = None) -> list[RunResult]:
    """``run_program`` for each, in parallel; results in input order."""
    if not programs:
        return []
    workers = workers or min(len(programs), max(2, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))
