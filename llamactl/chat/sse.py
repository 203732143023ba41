"""An incremental text/event-stream (server-sent events) parser: bytes in, in any chunking,
events out. Used by the chat client for llama-server's streamed replies."""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched server-sent event."""

    event: str
    data: str


class SSEDecoder:
    """Incremental text/event-stream parser: bytes in any chunking, events out."""

    def __init__(self) -> None:
        # An incremental decoder, because a network chunk can end inside a UTF-8 character.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse a chunk; return the events it completed."""
        return self._lines(self._utf8.decode(chunk), final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: parse what is left, including a last event with no blank line."""
        events = self._lines(self._utf8.decode(b"", final=True), final=True)
        if self._data:
            events.append(self._dispatch())
        return events

    def _lines(self, text: str, *, final: bool) -> list[SSEEvent]:
        self._buffer += text
        events: list[SSEEvent] = []
        while True:
            cut = _line_end(self._buffer, final=final)
            if cut is None:
                return events
            end, width = cut
            line = self._buffer[:end]
            self._buffer = self._buffer[end + width :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch() if self._data else None
        if line.startswith(":"):  # a comment; llama-server sends ":" as a keep-alive ping
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "error":
            # Older llama-server wrote `error: {...}` lines instead of `data: {"error": ...}`.
            self._event = "error"
            self._data.append(value)
        return None

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent(self._event or "message", "\n".join(self._data))
        self._event, self._data = "", []
        return event


def _line_end(buffer: str, *, final: bool) -> tuple[int, int] | None:
    """Where the first line ends and how wide its terminator is (\\r\\n, \\n or \\r)."""
    for i, ch in enumerate(buffer):
        if ch == "\n":
            return i, 1
        if ch == "\r":
            if i + 1 < len(buffer):
                return i, 2 if buffer[i + 1] == "\n" else 1
            # A lone \r at the end of a chunk may be the first half of \r\n: wait for more.
            return (i, 1) if final else None
    if final and buffer:
        return len(buffer), 0
    return None
