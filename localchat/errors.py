"""Errors a user can act on, and the exit codes the CLI returns."""

from __future__ import annotations

import errno
from enum import IntEnum
from pathlib import Path


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


class DiskFullError(LocalchatError):
    """A write that found no room: the disk or quota is full, or a file size limit is reached."""


def disk_full_error(exc: OSError, path: Path | str | None, hint: str) -> DiskFullError | None:
    """The one-line error for a write that failed for want of room, or None for other failures.

    A full disk (ENOSPC) or quota (EDQUOT) is named as such; a file that may grow no further
    (EFBIG: `ulimit -f`, or a file system such as FAT32 with its 4 GB cap) says so instead.
    """
    where = f" holding {path}" if path else ""
    if exc.errno == errno.ENOSPC:
        return DiskFullError(f"no space left on the disk{where}", hint)
    if exc.errno == errno.EDQUOT:
        return DiskFullError(f"disk quota exceeded on the disk{where}", hint)
    if exc.errno == errno.EFBIG:
        return DiskFullError(f"file too large: {path or 'a file'} reached the largest size this "
                             "file system or the file size limit (`ulimit -f`) allows", hint)
    return None
