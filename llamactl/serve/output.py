"""llama-server's output on serve's stderr, as llama-server would print it there.

A person who runs serve under systemd, Docker or in a terminal, and a test that reads the
server's output, see what llama-server says (slot and prompt-cache lines, warnings), while the
same lines still go to the instance's log file (`llamactl logs`). serve's own lines start with
`llamactl:`; llama-server's are copied unchanged.

The copy is written by a thread from a bounded buffer: a stderr that nobody reads (a pipe
left unread by a parent) must never block the event loop that serves requests. When the
buffer is full, lines are dropped and counted, and a note says so once stderr moves again;
the log file keeps every line."""

from __future__ import annotations

import collections
import os
import re
import threading
from collections.abc import Mapping, Sequence

#: The prefix of serve's own lines on stderr, so that they stand apart from llama-server's.
PREFIX = "llamactl: "

_ANSI = re.compile(rb"\x1b\[[0-9;]*m")


def strip_colors(raw: bytes) -> bytes:
    """A log line without the terminal color codes that `--log-colors on` adds (the log file
    and error messages stay plain text)."""
    return _ANSI.sub(b"", raw) if b"\x1b" in raw else raw


def color_flags(
    passthrough: Sequence[str], environ: Mapping[str, str], stderr_is_tty: bool
) -> tuple[str, ...]:
    """The flag that gives llama-server's output colors when serve's stderr is a terminal.

    llama-server's `--log-colors auto` (its default) colors when its own stdout or stderr is a
    terminal (common.cpp's tty_can_use_colors); behind serve they are a pipe, so serve decides
    as llama-server would have, on serve's stderr, and says `on`. An explicit --log-colors (flag
    or LLAMA_ARG_LOG_COLORS) is llama-server's own business, and NO_COLOR and TERM=dumb win,
    as they do in llama-server."""
    if any(a.split("=", 1)[0] == "--log-colors" for a in passthrough):
        return ()
    if environ.get("LLAMA_ARG_LOG_COLORS") or environ.get("NO_COLOR"):
        return ()
    if environ.get("TERM") == "dumb" or not stderr_is_tty:
        return ()
    return ("--log-colors", "on")


class StderrCopy:
    """Lines written here reach file descriptor `fd` in order, from a thread, never blocking
    the writer: at most `limit` bytes wait; beyond that, lines are dropped and counted."""

    def __init__(self, fd: int = 2, limit: int = 1 << 20, note_path: str | None = None) -> None:
        self.fd = fd
        self.limit = limit
        self.note_path = note_path
        self.dropped = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._broken = False
        self._cond = threading.Condition()
        # Started by the first line, not here: serve makes this before it spawns llama-server,
        # and a fork is safest while the process has one thread.
        self._thread: threading.Thread | None = None

    def write(self, line: bytes) -> None:
        """Queue one line (with its newline) for stderr; dropped when too much waits."""
        with self._cond:
            if self._broken or self._closed:
                return
            if self._bytes + len(line) > self.limit:
                self.dropped += 1
                return
            self._pending.append(line)
            self._bytes += len(line)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="llamactl-stderr", daemon=True
                )
                self._thread.start()

    def close(self, timeout: float = 1.0) -> None:
        """Write what waits (for up to `timeout` s: a stderr nobody reads cannot hold up the
        exit), then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        reported = 0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending and self._closed:
                    return
                chunk = b"".join(self._pending)
                self._pending.clear()
                self._bytes = 0
                dropped = self.dropped
            if dropped > reported:
                where = f" (every line is in {self.note_path})" if self.note_path else ""
                note = (
                    f"{PREFIX}{dropped - reported} lines of llama-server's output were not "
                    f"shown: stderr was not being read{where}\n"
                )
                chunk = note.encode() + chunk
                reported = dropped
            if not self._write_all(chunk):
                with self._cond:
                    self._broken = True  # stderr is gone (closed pipe): stop copying
                    self._pending.clear()
                return

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return False
            view = view[n:]
        return True
