"""Rich rendering for the core's progress protocols: the CLI is the only package that draws
on a terminal, and the core reports through small protocols (llamactl.models.pull's
PullProgress) that these classes implement."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from llamactl.models.pull import LineProgress, PullProgress

if TYPE_CHECKING:
    from rich.console import Console


class RichPullProgress:
    """A pull's notes as console lines and its downloads as a rich progress bar."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Any = None
        self._task: Any = None

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def start(self, description: str, total: int | None, completed: int) -> None:
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, completed=completed)
        else:
            self._progress.update(self._task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def stop(self) -> None:
        # One object serves a whole pull (several files): the next start draws a fresh bar.
        if self._progress is not None and self._task is not None:
            self._progress.stop()
            self._progress, self._task = None, None


def pull_progress(console: Console | None = None) -> PullProgress:
    """A bar on a terminal; plain lines on stderr otherwise (CI logs, pipes)."""
    if console is None:
        if not sys.stderr.isatty():
            return LineProgress(sys.stderr)
        from rich.console import Console

        console = Console(stderr=True)
    if not console.is_terminal:
        return LineProgress(console.file)
    return RichPullProgress(console)
