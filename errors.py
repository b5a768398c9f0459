"""Expected errors: mistakes a user can fix, which the CLI reports as one line, ``lantern: error: …``.

Anything that is not a ``LanternError`` (or one of the few library exceptions the CLI knows to
mean a bad setting) is a bug and keeps its traceback. A class checks its own arguments with
``require``, naming itself and the argument; the CLI turns that into the argument's path in
the run's config (``model.init_args.model.init_args.d_model``), the path a user types.
"""

from __future__ import annotations

from typing import Any


class LanternError(Exception):
    """Base of every expected error: the message alone tells the user what to change."""


class ConfigError(LanternError, ValueError):
    """An argument value a class rejects.

    ``owner`` is the class (or its name) whose argument ``field`` got ``value``; ``expected``
    says what would be accepted.
    """

    def __init__(self, owner: Any, field: str, value: Any, expected: str):
        self.owner = owner if isinstance(owner, str) else type(owner).__name__
        self.field, self.value, self.expected = field, value, expected
        super().__init__(self.render(f"{self.owner}.{field}"))

    def render(self, path: str) -> str:
        value = self.value if isinstance(self.value, (int, float, bool, type(None))) else repr(self.value)
        return f"{path}={value}: expected {self.expected}"


class DataError(LanternError, ValueError):
    """Malformed or missing input data; the message names the file, line or field."""


class ModelLoadError(LanternError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to do."""


class CheckpointError(LanternError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class NonFiniteError(LanternError, RuntimeError):
    """Training produced NaN or inf; the message names the last checkpoint that is finite."""


def require(ok: bool, owner: Any, field: str, value: Any, expected: str) -> None:
    """Raise ``ConfigError(owner, field, value, expected)`` unless ``ok``."""
    if not ok:
        raise ConfigError(owner, field, value, expected)
