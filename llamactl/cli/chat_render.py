"""The chat's terminal rendering with rich: replies drawn as Markdown while they stream, a
dim stats line. It implements llamactl.chat.session's Renderer and Output protocols, so that
the chat core stays free of terminal libraries."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llamactl.chat.client import Reply, ReplyStream
from llamactl.chat.session import Output, Terminal, stats_line

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult


class _MarkdownTail:
    """The reply as Markdown; while streaming only its last screenful, so that Live never has
    to redraw lines that scrolled away (which is what makes long replies flicker and repeat)."""

    def __init__(self) -> None:
        self.text = ""
        self.full = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.markdown import Markdown
        from rich.segment import Segment
        from rich.text import Text

        if not self.text:
            if not self.full:
                yield Text("…", style="dim")
            return
        markdown = Markdown(self.text)
        if self.full:
            yield markdown
            return
        lines = console.render_lines(markdown, options.update(height=None), pad=False)
        for line in lines[-max(1, console.size.height - 2) :]:
            yield from line
            yield Segment.line()


@contextlib.contextmanager
def _echo_off(fd: int | None) -> Iterator[None]:
    """Keys typed while a reply streams would be echoed into Live's region and garble it;
    with echo off they wait, unseen, for the next prompt. Ctrl-C still works (ISIG stays)."""
    try:
        import termios
    except ImportError:  # pragma: no cover - not on Windows
        termios = None  # type: ignore[assignment]
    if fd is None or termios is None:
        yield
        return
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    # TCSANOW, not TCSAFLUSH: flushing would drop what the person already typed.
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class RichOutput:
    """A terminal: replies rendered as Markdown while they stream, a dim stats line."""

    #: Often enough to look live, rarely enough that re-rendering Markdown costs nothing.
    REFRESH_PER_SECOND = 10

    def __init__(
        self, console: Console, *, show_stats: bool = True, input_fd: int | None = None
    ) -> None:
        self.console, self.show_stats, self.input_fd = console, show_stats, input_fd

    def reply(self, stream: ReplyStream) -> Reply:
        from rich.live import Live

        view = _MarkdownTail()
        with (
            _echo_off(self.input_fd),
            Live(
                view,
                console=self.console,
                refresh_per_second=self.REFRESH_PER_SECOND,
                vertical_overflow="visible",
            ),
        ):
            try:
                for piece in stream:
                    view.text += piece
            finally:
                # Live's last refresh (on exit, also after Ctrl-C) prints the whole reply.
                view.full = True
        return stream.result()

    def info(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def error(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text.assemble(("error: ", "bold red"), text))

    def stats(self, reply: Reply) -> None:
        line = stats_line(reply)
        if self.show_stats and line:
            self.console.print(line, style="dim", markup=False, highlight=False)

    def aside(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)


class RichRenderer:
    """Draws on a terminal with rich (llamactl.chat.session.Renderer)."""

    def terminal_output(self, term: Terminal, *, show_stats: bool, input_fd: int | None) -> Output:
        from rich.console import Console

        console = Console(file=term.stdout, highlight=False)
        return RichOutput(console, show_stats=show_stats, input_fd=input_fd)
