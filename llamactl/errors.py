"""One exception hierarchy: each error carries a message a user can act on and an exit code.

Free of click on purpose: `llamactl serve` starts without importing click (time to ready);
the CLI turns these into click's errors (llamactl.cli.LazyGroup)."""

from __future__ import annotations

import sys
from typing import IO


class LlamactlError(Exception):
    """Root of every error meant for a user; printed once, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def format_message(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message

    def show(self, file: IO[str] | None = None) -> None:
        """Print as click prints its own errors."""
        print(f"Error: {self.format_message()}", file=file or sys.stderr)


class UsageError(LlamactlError):
    """The command line or a config value is wrong."""

    exit_code = 2


class SourceError(LlamactlError):
    """The llama.cpp source cannot be fetched, verified or found."""

    exit_code = 3


class BuildError(LlamactlError):
    """Configuring or compiling llama.cpp failed."""

    exit_code = 4


class ModelError(LlamactlError):
    """A model file is missing, unreadable or not GGUF, or a pull failed."""

    exit_code = 5


class ServerStartError(LlamactlError):
    """llama-server exited or never became healthy while starting."""

    exit_code = 6


class ServerError(LlamactlError):
    """A running server cannot be reached or answered with an error."""

    exit_code = 7
