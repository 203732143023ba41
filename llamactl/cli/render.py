"""Rich rendering for the core's progress protocols: the CLI is the only package that draws
on a terminal, and the core reports through small protocols (llamactl.models.pull's
PullProgress, llamactl.build.progress's Step callback) that these classes implement: a bar
on a terminal, plain throttled lines when the output goes to a file or a pipe."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from llamactl.build.progress import LineReporter, Step
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


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def plain_stream(stdout: TextIO | None = None, stderr: TextIO | None = None) -> TextIO | None:
    """Where plain progress lines go, or None when both streams are terminals (draw a bar).

    A redirected stream is what a log keeps: `llamactl build > log` gets its lines on stdout,
    `2> log` or `> log 2>&1` on stderr."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if not _isatty(err):
        return err
    if not _isatty(out):
        return out
    return None


class BuildProgress:
    """A Reporter for build Steps; a context manager that stops the bar on exit.

    rich is imported only when a step arrives on a terminal, so the no-op build stays light."""

    def __init__(
        self,
        console: Callable[[], Console],
        *,
        lines: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self._console = console
        # Lines to `lines` when given, else to a redirected stdout/stderr, else a bar (`bar`
        # True forces the bar).
        target = lines if lines is not None else (None if bar else plain_stream())
        self._lines = LineReporter(target) if target is not None else None
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> BuildProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, step: Step) -> None:
        if self._lines is not None:
            self._lines(step)
            return
        if step.phase == "message":
            self._console().print(step.description, highlight=False)
            return
        progress = self._bar()
        task = self._tasks.get(step.phase)
        if task is None:
            task = progress.add_task(step.description[:48], total=None)
            self._tasks[step.phase] = task
        total = step.total or None
        progress.update(task, completed=step.done, total=total, description=step.description[:48])

    def _bar(self) -> Any:
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", style="cyan"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console(),
                transient=False,
            )
            self._progress.start()
        return self._progress
