"""Errors a user can act on, and the exit codes the CLI returns."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Process exit codes; scripts rely on them."""

    OK = 0
    ERROR = 1
    USAGE = 2
    INTERRUPTED = 130


class LocalchatError(Exception):
    """A failure with a one-line message and, where possible, a hint saying what to do."""

    exit_status = ExitStatus.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(LocalchatError):
    """A bad flag value or argument: exit code 2."""

    exit_status = ExitStatus.USAGE


class ModelFileError(LocalchatError):
    """A model file that is missing, unreadable, or not a valid GGUF file."""


class ConfigError(LocalchatError):
    """A config or catalog file that cannot be read; the message names the file and line."""


class ContextOverflowError(LocalchatError):
    """A prompt that cannot fit in the context window."""


class EngineError(LocalchatError):
    """llama.cpp failed to load a model or to generate."""
