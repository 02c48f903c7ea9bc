"""Exceptions that the CLI turns into one-line messages and a nonzero exit code."""

from __future__ import annotations

from pathlib import Path


class CTPassportError(Exception):
    """Base class for expected, user-facing failures (bad input, missing model, ...).

    ``str(error)`` is a single line naming the offending file (when there is one) and the problem,
    optionally followed by how to fix it. The CLI prints it and exits with :attr:`exit_code`.
    """

    exit_code: int = 1

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = message
        self.hint = hint
        text = f"{self.path}: {message}" if self.path is not None else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(" ".join(text.split()))


class InputError(CTPassportError):
    """An input file (image, label map, passport, point list) is missing or unusable."""

    exit_code = 2


class ModelError(CTPassportError):
    """A model folder, checkpoint or ONNX file is missing or inconsistent."""

    exit_code = 3


class OutputError(CTPassportError):
    """An output cannot be written where it was asked for (exists, wrong kind, not writable)."""

    exit_code = 4


class OutputExistsError(OutputError):
    """An output exists and ``--force`` was not given."""

    def __init__(self, path: str | Path) -> None:
        super().__init__("output exists", path, "pass --force to overwrite it")


class ConfigError(CTPassportError):
    """A setting (environment variable or option) has an invalid value."""

    exit_code = 5


class RegistrationError(CTPassportError):
    """Registration cannot be computed from the given passports or points."""

    exit_code = 6
