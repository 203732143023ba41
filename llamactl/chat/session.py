"""`llamactl chat`: an OpenAI-compatible chat client, interactive (Markdown, history, slash
commands) or one-shot (plain answer on stdout), optionally with a server for the session."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TextIO

import httpx

from llamactl import paths, proc
from llamactl.errors import LlamactlError, ServerError, ServerStartError, UsageError
from llamactl.net import free_port

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

DEFAULT_URL = "http://127.0.0.1:8080"
#: Time to first token includes prompt processing, minutes for a long context on a CPU.
READ_TIMEOUT_S = 600.0
#: A 7B model from a cold disk can take a minute or two to load before /health says ok.
START_DEADLINE_S = 300.0
#: Sent when --system is not given. Small instruct models answer far worse with the chat
#: template's own default (SmolLM2-135M: "What is the capital of France?" gets no "Paris"
#: without it); llama-cli's conversation mode used the same default.
DEFAULT_SYSTEM = "You are a helpful assistant."
PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
ROLES = ("system", "user", "assistant")


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSpec:
    """What the command line asked for."""

    url: str | None = None
    api_key: str | None = None
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    model: str | None = None
    stream: bool = True
    json_output: bool = False
    prompt: str | None = None
    model_file: str | None = None


@dataclass(frozen=True)
class Settings:
    """The request parameters a session can change with /model and /set."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class Timings:
    """The `timings` object llama-server adds to its last chunk (absent on other servers)."""

    predicted_n: int
    predicted_per_second: float
    prompt_n: int = 0
    prompt_ms: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Timings | None:
        """Read llama-server's timings; None when the fields are missing."""
        try:
            return cls(
                predicted_n=int(data["predicted_n"]),
                predicted_per_second=float(data["predicted_per_second"]),
                prompt_n=int(data.get("prompt_n", 0)),
                prompt_ms=float(data.get("prompt_ms", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Reply:
    """A finished (or interrupted) assistant reply and how it went."""

    text: str
    finish_reason: str | None = None
    timings: Timings | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    elapsed_s: float | None = None


@dataclass(frozen=True)
class Terminal:
    """The streams a chat talks through, and whether each is a terminal."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    stdin_tty: bool
    stdout_tty: bool

    @classmethod
    def from_streams(cls, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> Terminal:
        """Describe these streams."""
        return cls(stdin, stdout, stderr, _isatty(stdin), _isatty(stdout))


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stats_line(reply: Reply) -> str:
    """`42 tokens · 120.3 tokens/s · first token 0.08 s`, from what the server reported."""
    parts = []
    if reply.timings is not None:
        parts.append(f"{reply.timings.predicted_n} tokens")
        parts.append(f"{reply.timings.predicted_per_second:.1f} tokens/s")
    elif reply.completion_tokens is not None:
        # Servers other than llama-server send no timings; usage plus our clock is the best guess.
        parts.append(f"{reply.completion_tokens} tokens")
        if reply.elapsed_s and reply.first_token_s is not None:
            gen_s = reply.elapsed_s - reply.first_token_s
            if gen_s > 0 and reply.completion_tokens > 1:
                parts.append(f"{(reply.completion_tokens - 1) / gen_s:.1f} tokens/s")
    if reply.first_token_s is not None:
        parts.append(f"first token {reply.first_token_s:.2f} s")
    return " · ".join(parts)


# --- server-sent events ---------------------------------------------------------------------


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


# --- errors from the server -----------------------------------------------------------------


def _error_fields(body: Any) -> tuple[str, str, dict[str, Any]]:
    """(message, type, the whole error object) from an OpenAI-style error body."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or ""), str(err.get("type") or ""), err
    if isinstance(err, str):
        return err, "", {}
    if isinstance(body, dict) and "message" in body:
        return str(body["message"]), str(body.get("type") or ""), body
    if isinstance(body, str):
        return body.strip()[:300], "", {}
    return "", "", {}


def error_from_body(status: int | None, body: Any, *, url: str, model: str | None) -> ServerError:
    """Turn an HTTP status and error body (or an in-stream error event) into one clear error."""
    message, kind, err = _error_fields(body)
    if status is None:
        code = err.get("code")
        status = code if isinstance(code, int) else None
    low = f"{kind} {message}".lower()
    if kind == "exceed_context_size_error" or (
        "context" in low and any(w in low for w in ("exceed", "too long", "larger than", "length"))
    ):
        n_prompt, n_ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
        size = f" ({n_prompt} tokens, context size {n_ctx})" if n_prompt and n_ctx else ""
        return ServerError(
            f"the conversation no longer fits in the model's context{size}",
            hint="send less (in a chat, /clear starts over), or serve with a larger --ctx-size",
        )
    if status in (401, 403) or kind == "authentication_error":
        return ServerError(
            f"the server at {url} refused the request: {message or 'HTTP ' + str(status)}",
            hint="pass the right key with --api-key or set LLAMACTL_API_KEY",
        )
    if status == 404 or kind == "not_found_error" or ("model" in low and "not found" in low):
        if "model" in low or (model and kind == "not_found_error"):
            name = repr(model) if model else "the requested model"
            return ServerError(
                f"the server at {url} has no model {name}: {message or 'HTTP 404'}",
                hint="/model (or GET /v1/models) lists the models it has",
            )
        return ServerError(
            f"{url} has no OpenAI chat endpoint (HTTP 404): is it an OpenAI-compatible server?",
            hint="--url takes the server's base address, e.g. http://127.0.0.1:8080",
        )
    label = f"HTTP {status}" if status else "error"
    return ServerError(f"the server at {url} answered {label}: {message or 'no details'}")


def _transport_error(url: str, exc: httpx.TransportError) -> ServerError:
    if isinstance(exc, httpx.ConnectError):
        reason = "connection refused" if "refused" in str(exc).lower() else str(exc)
        return ServerError(
            f"cannot reach a server at {url}: {reason}",
            hint="start one with `llamactl serve`, or pass --url URL or -m MODEL",
        )
    if isinstance(exc, httpx.TimeoutException):
        return ServerError(f"the server at {url} did not answer in time ({type(exc).__name__})")
    return ServerError(f"the connection to {url} failed: {exc}")


def _stream_cut(url: str, received: int, detail: str = "") -> ServerError:
    why = f" ({detail})" if detail else ""
    return ServerError(
        f"the server at {url} closed the stream mid-reply after {received} characters{why}",
        hint="the server may have crashed or restarted; `llamactl logs` shows why",
    )


# --- the HTTP client ------------------------------------------------------------------------


def api_base(url: str) -> str:
    """The `/v1` base for a server address given with or without `/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url needs http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else f"{url}/v1"


def resolve_api_key(given: str | None, env: Mapping[str, str]) -> str | None:
    """--api-key, else LLAMACTL_API_KEY, else OPENAI_API_KEY."""
    return given or env.get("LLAMACTL_API_KEY") or env.get("OPENAI_API_KEY") or None


def build_request(
    messages: Sequence[Message], settings: Settings, *, stream: bool
) -> dict[str, Any]:
    """The /v1/chat/completions body; unset options are left to the server's defaults."""
    body: dict[str, Any] = {
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "stream": stream,
    }
    if settings.model is not None:
        body["model"] = settings.model
    for name in ("temperature", "top_p", "max_tokens"):
        value = getattr(settings, name)
        if value is not None:
            body[name] = value
    return body


class ReplyStream:
    """One streamed reply: iterate for text pieces, then `result()`; `close()` stops it."""

    def __init__(
        self,
        http: httpx.Client,
        request: httpx.Request,
        *,
        url: str,
        model: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http, self._request, self._url, self._model = http, request, url, model
        self._clock = clock
        self._response: httpx.Response | None = None
        self._pieces: list[str] = []
        self._finish: str | None = None
        self._timings: Timings | None = None
        self._tokens: int | None = None
        self._first: float | None = None
        self._elapsed: float | None = None

    @property
    def text(self) -> str:
        """What arrived so far."""
        return "".join(self._pieces)

    def __iter__(self) -> Iterator[str]:
        started = self._clock()
        try:
            self._response = self._http.send(self._request, stream=True)
        except httpx.TransportError as exc:
            raise _transport_error(self._url, exc) from None
        response = self._response
        if response.status_code >= 400:
            response.read()
            raise error_from_body(
                response.status_code, _body(response), url=self._url, model=self._model
            )
        if "text/event-stream" not in response.headers.get("content-type", "text/event-stream"):
            # A server that ignores "stream": true answers with one JSON document.
            response.read()
            reply = _reply_from_body(_body(response), url=self._url, model=self._model)
            self._pieces.append(reply.text)
            self._finish, self._timings = reply.finish_reason, reply.timings
            self._tokens = reply.completion_tokens
            if reply.text:
                yield reply.text
            return
        decoder = SSEDecoder()
        done = False
        try:
            for chunk in response.iter_bytes():
                for event in decoder.feed(chunk):
                    done = yield from self._event(event, started)
                    if done:
                        break
                if done:
                    break
            if not done:
                for event in decoder.close():
                    done = yield from self._event(event, started)
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ReadTimeout):
                raise _transport_error(self._url, exc) from None
            raise _stream_cut(self._url, len(self.text), type(exc).__name__) from None
        finally:
            self._elapsed = self._clock() - started
            self.close()
        # A stream that ends without [DONE] and without a finish_reason was cut off.
        if not done and self._finish is None:
            raise _stream_cut(self._url, len(self.text))

    def _event(self, event: SSEEvent, started: float) -> Generator[str, None, bool]:
        """Handle one event, yielding its text; the generator returns True at [DONE]."""
        if event.data.strip() == "[DONE]":
            return True
        try:
            obj = json.loads(event.data)
        except json.JSONDecodeError:
            raise ServerError(
                f"the server at {self._url} sent an event that is not JSON: {event.data[:80]!r}"
            ) from None
        if event.event == "error" or (isinstance(obj, dict) and "error" in obj):
            body = obj if isinstance(obj, dict) and "error" in obj else {"error": obj}
            raise error_from_body(None, body, url=self._url, model=self._model)
        if not isinstance(obj, dict):
            return False
        if isinstance(obj.get("timings"), dict):
            self._timings = Timings.from_json(obj["timings"])
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self._tokens = usage["completion_tokens"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self._finish = str(choice["finish_reason"])
            delta = choice.get("delta") or {}
            piece = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(piece, str) and piece:
                if self._first is None:
                    self._first = self._clock() - started
                self._pieces.append(piece)
                yield piece
        return False

    def close(self) -> None:
        """Close the connection: llama-server stops generating when its client goes away."""
        if self._response is not None:
            self._response.close()

    def result(self) -> Reply:
        """The reply as received so far."""
        return Reply(
            text=self.text,
            finish_reason=self._finish,
            timings=self._timings,
            completion_tokens=self._tokens,
            first_token_s=self._first,
            elapsed_s=self._elapsed,
        )


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _reply_from_body(body: Any, *, url: str, model: str | None) -> Reply:
    if isinstance(body, dict) and "error" in body:
        raise error_from_body(None, body, url=url, model=model)
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ServerError(f"the server at {url} answered without a chat completion") from None
    usage = body.get("usage") or {}
    timings = body.get("timings")
    return Reply(
        text=text,
        finish_reason=choice.get("finish_reason"),
        timings=Timings.from_json(timings) if isinstance(timings, dict) else None,
        completion_tokens=usage.get("completion_tokens"),
    )


class ChatClient:
    """An OpenAI-compatible /v1 client: models, one completion, one streamed completion."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.base = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(10.0, read=READ_TIMEOUT_S),
            transport=transport,
        )

    def close(self) -> None:
        """Release the connection pool."""
        self.http.close()

    def models(self) -> list[str]:
        """The model ids the server lists at /v1/models."""
        try:
            response = self.http.get(f"{self.base}/models")
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from None
        body = _body(response)
        if response.status_code >= 400:
            raise error_from_body(response.status_code, body, url=self.url, model=None)
        data = body.get("data") if isinstance(body, dict) else None
        return [str(m["id"]) for m in data or [] if isinstance(m, dict) and "id" in m]

    def default_model(self) -> str | None:
        """The first listed model, or None when the server lists none or has no /models
        (llama-server ignores the name; other OpenAI servers need one)."""
        try:
            response = self.http.get(f"{self.base}/models")
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from None
        if response.status_code in (401, 403):
            raise error_from_body(response.status_code, _body(response), url=self.url, model=None)
        body = _body(response) if response.status_code < 400 else None
        data = body.get("data") if isinstance(body, dict) else None
        names = [str(m["id"]) for m in data or [] if isinstance(m, dict) and "id" in m]
        return names[0] if names else None

    def complete(self, messages: Sequence[Message], settings: Settings) -> dict[str, Any]:
        """One non-streamed completion: the server's whole JSON answer."""
        body = build_request(messages, settings, stream=False)
        try:
            response = self.http.post(f"{self.base}/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise _transport_error(self.url, exc) from None
        data = _body(response)
        if response.status_code >= 400:
            raise error_from_body(response.status_code, data, url=self.url, model=settings.model)
        _reply_from_body(data, url=self.url, model=settings.model)  # raises on an error body
        assert isinstance(data, dict)
        return data

    def stream(self, messages: Sequence[Message], settings: Settings) -> ReplyStream:
        """A streamed completion, not yet started (iterate the result to start it)."""
        body = build_request(messages, settings, stream=True)
        request = self.http.build_request(
            "POST",
            f"{self.base}/chat/completions",
            json=body,
            headers={"Accept": "text/event-stream"},
        )
        return ReplyStream(self.http, request, url=self.url, model=settings.model)


# --- conversation and slash commands --------------------------------------------------------


@dataclass
class Conversation:
    """The system prompt and the turns so far."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        """What is sent: the system prompt first, then the turns."""
        head = [Message("system", self.system)] if self.system else []
        return head + list(self.turns)

    def to_json(self, settings: Settings) -> dict[str, Any]:
        """The conversation as a JSON document for /save."""
        return {
            "model": settings.model,
            "messages": [dataclasses.asdict(m) for m in self.messages()],
        }

    @classmethod
    def from_json(cls, data: Any) -> Conversation:
        """Read a /save document, or a bare OpenAI `messages` list."""
        items = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise UsageError("not a saved conversation: expected {'messages': [...]} or a list")
        conv = cls()
        for i, item in enumerate(items):
            role = item.get("role") if isinstance(item, dict) else None
            content = item.get("content") if isinstance(item, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise UsageError(f"message {i + 1} needs a role ({', '.join(ROLES)}) and text")
            if role == "system":
                conv.system = content
            else:
                conv.turns.append(Message(role, content))
        return conv


COMMANDS: dict[str, str] = {
    "/help": "show this list",
    "/system TEXT": "set the system prompt (no TEXT: show it)",
    "/model [NAME]": "use model NAME (no NAME: list the server's models)",
    "/clear": "forget the conversation (the system prompt stays)",
    "/retry": "ask for the last reply again",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a conversation saved with /save",
    "/set NAME VALUE": "set temperature, top_p or max_tokens (no VALUE: server default)",
    "/bye": "leave (Ctrl-D does too)",
}
_SETTABLE: dict[str, Callable[[str], float | int]] = {
    "temperature": float,
    "top_p": float,
    "max_tokens": int,
}


def help_text() -> str:
    """The slash commands, one a line."""
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {cmd.ljust(width)}  {what}" for cmd, what in COMMANDS.items()]
    lines.append(f"  {FENCE} … {FENCE}".ljust(width + 2) + "  write a message over several lines")
    return "\n".join(lines)


def parse_setting(name: str, value: str) -> float | int | None:
    """Check a /set value: temperature ≥ 0, 0 < top_p ≤ 1, max_tokens a positive integer."""
    if name not in _SETTABLE:
        raise UsageError(f"/set knows {', '.join(_SETTABLE)}, not {name!r}")
    if not value:
        return None
    try:
        parsed = _SETTABLE[name](value)
    except ValueError:
        raise UsageError(f"{name} needs a number, got {value!r}") from None
    if name == "temperature" and not parsed >= 0:
        raise UsageError("temperature must be 0 or more")
    if name == "top_p" and not 0 < parsed <= 1:
        raise UsageError("top_p must be above 0 and at most 1")
    if name == "max_tokens" and parsed <= 0:
        raise UsageError("max_tokens must be a positive integer")
    return parsed


class Output(Protocol):
    """Where a chat writes: replies, notes, errors, stats."""

    def reply(self, stream: ReplyStream) -> Reply:
        """Show a reply as it streams; return it."""
        ...

    def info(self, text: str) -> None:
        """A note for the person."""
        ...

    def error(self, text: str) -> None:
        """One error line."""
        ...

    def stats(self, reply: Reply) -> None:
        """The stats line after a reply."""
        ...


class PlainOutput:
    """Plain text, flushed as it arrives: no terminal codes (pipes, files, tests)."""

    def __init__(self, out: TextIO, err: TextIO, *, show_stats: bool = True) -> None:
        self.out, self.err, self.show_stats = out, err, show_stats

    def reply(self, stream: ReplyStream) -> Reply:
        last = ""
        try:
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
                last = piece
        finally:
            if last and not last.endswith("\n"):
                self.out.write("\n")
                self.out.flush()
        return stream.result()

    def info(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.err.write(f"error: {text}\n")
        self.err.flush()

    def stats(self, reply: Reply) -> None:
        line = stats_line(reply)
        if self.show_stats and line:
            self.err.write(line + "\n")
            self.err.flush()


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


class ChatSession:
    """A conversation with one server: sends turns, runs slash commands."""

    def __init__(
        self,
        client: ChatClient,
        output: Output,
        settings: Settings,
        conversation: Conversation | None = None,
    ) -> None:
        self.client, self.output, self.settings = client, output, settings
        self.conversation = conversation or Conversation()

    def handle(self, line: str) -> bool:
        """Run one input line (a message or a slash command); False means leave."""
        if not line.strip():
            return True
        if line.startswith("/"):
            return self.command(line)
        self.ask(line)
        return True

    def ask(self, text: str) -> Reply | None:
        """Send a user message and show the reply; errors become one line, the chat goes on."""
        turns = self.conversation.turns
        if turns and turns[-1].role == "user":
            turns.pop()  # the unanswered message of a failed turn: this one replaces it
        turns.append(Message("user", text))
        return self._answer()

    def _answer(self) -> Reply | None:
        stream = self.client.stream(self.conversation.messages(), self.settings)
        try:
            reply = self.output.reply(stream)
        except KeyboardInterrupt:
            stream.close()
            partial = stream.text
            if partial:
                # Keep what was shown, so roles still alternate (some chat templates insist).
                self.conversation.turns.append(Message("assistant", partial))
            self.output.info("[interrupted]")
            return None
        except LlamactlError as exc:
            stream.close()
            self.output.error(exc.format_message())
            return None
        self.conversation.turns.append(Message("assistant", reply.text))
        self.output.stats(reply)
        return reply

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            return self._command(name.lower(), arg)
        except LlamactlError as exc:
            self.output.error(exc.format_message())
            return True

    def _command(self, name: str, arg: str) -> bool:
        out = self.output
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            out.info(help_text())
        elif name == "/system":
            if arg:
                self.conversation.system = arg
                out.info("system prompt set")
            else:
                out.info(f"system prompt: {self.conversation.system or '(none)'}")
        elif name == "/model":
            self._model(arg)
        elif name == "/clear":
            self.conversation.turns.clear()
            out.info("conversation cleared")
        elif name == "/retry":
            self._retry()
        elif name == "/save":
            self._save(arg)
        elif name == "/load":
            self._load(arg)
        elif name == "/set":
            self._set(arg)
        else:
            out.error(f"unknown command {name}; the commands are:\n{help_text()}")
        return True

    def _model(self, arg: str) -> None:
        if arg:
            self.settings = dataclasses.replace(self.settings, model=arg)
            self.output.info(f"model: {arg}")
            return
        names = self.client.models()
        if not names:
            self.output.info("the server lists no models")
        for name in names:
            mark = "*" if name == self.settings.model else " "
            self.output.info(f"{mark} {name}")

    def _retry(self) -> None:
        turns = self.conversation.turns
        while turns and turns[-1].role == "assistant":
            turns.pop()
        if not turns:
            self.output.error("nothing to retry yet")
            return
        self._answer()

    def _save(self, arg: str) -> None:
        if not arg:
            raise UsageError("/save needs a file name")
        target = Path(arg).expanduser()
        document = self.conversation.to_json(self.settings)
        try:
            target.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None
        self.output.info(f"saved {len(document['messages'])} messages to {target}")

    def _load(self, arg: str) -> None:
        if not arg:
            raise UsageError("/load needs a file name")
        source = Path(arg).expanduser()
        try:
            data = json.loads(source.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"{source} is not JSON: {exc}") from None
        self.conversation = Conversation.from_json(data)
        n = len(self.conversation.messages())
        self.output.info(f"loaded {n} messages from {source}")

    def _set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            shown = ", ".join(f"{k}={getattr(self.settings, k)}" for k in _SETTABLE)
            self.output.info(f"{shown} (None: the server's default)")
            return
        parsed = parse_setting(name, value.strip())
        changes: dict[str, Any] = {name: parsed}
        self.settings = dataclasses.replace(self.settings, **changes)
        self.output.info(f"{name} = {parsed if parsed is not None else '(server default)'}")


# --- input ----------------------------------------------------------------------------------


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, or the lines between two `\"\"\"` lines (EOFError at the end)."""
    line = read_line(PROMPT)
    if not line.lstrip().startswith(FENCE):
        return line
    first = line.lstrip()[len(FENCE) :]
    if first.rstrip().endswith(FENCE):  # """all on one line"""
        return first.rstrip()[: -len(FENCE)]
    parts = [first] if first.strip() else []
    while True:
        line = read_line(CONTINUATION)
        if line.rstrip().endswith(FENCE):
            tail = line.rstrip()[: -len(FENCE)]
            if tail:
                parts.append(tail)
            return "\n".join(parts)
        parts.append(line)


@contextlib.contextmanager
def line_history(path: Path) -> Iterator[None]:
    """readline editing with history kept in `path` across sessions."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows has no readline; plain input() still works
        yield
        return
    paths.ensure_private_dir(path.parent)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(2000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(path)
            path.chmod(0o600)  # the history holds prompts


def history_path() -> Path:
    """Where interactive input history lives."""
    return paths.state_dir() / "chat_history"


def run_interactive(session: ChatSession, read_line: Callable[[str], str]) -> None:
    """The chat loop: until /bye or Ctrl-D; Ctrl-C at the prompt drops the line."""
    while True:
        try:
            text = read_message(read_line)
        except EOFError:
            session.output.info("")
            return
        except KeyboardInterrupt:
            session.output.info("\n(Ctrl-D or /bye leaves)")
            continue
        try:
            if not session.handle(text):
                return
        except KeyboardInterrupt:  # during a slash command's request (replies handle their own)
            session.output.info("[interrupted]")


# --- which server ---------------------------------------------------------------------------


def running_serve_url() -> str | None:
    """The newest running `llamactl serve`, from its state records."""
    try:
        from llamactl.serve.records import live_records
    except ImportError:  # records arrive with `serve`; until then only --url and the default
        return None
    for record in live_records():
        url = getattr(record, "url", None)
        if url:
            return str(url)
    return None


def default_model_path() -> Path | None:
    """The default model when it is in the cache (so a chat can start a server for it)."""
    try:
        from llamactl.models.catalog import DEFAULT_MODEL
    except ImportError:  # the models module may not be there yet
        return None
    path = paths.models_dir() / DEFAULT_MODEL.filename
    return path if path.is_file() else None


def reachable(url: str, *, timeout: float = 1.0) -> bool:
    """True when anything answers HTTP at `url`."""
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError:
        return False
    return True


@dataclass(frozen=True)
class ServerPlan:
    """Talk to `url`, or start a server for `model` first."""

    url: str | None = None
    model: str | None = None
    start: bool = False


def plan_server(
    spec: ChatSpec,
    *,
    serve_url: Callable[[], str | None] = running_serve_url,
    is_reachable: Callable[[str], bool] = reachable,
    default_model: Callable[[], Path | None] = default_model_path,
) -> ServerPlan:
    """Decide which server this chat uses: -m starts one, --url wins, then a running serve,
    then the default address, then (with nothing there) a server for the default model."""
    if spec.model_file:
        return ServerPlan(model=spec.model_file, start=True)
    if spec.url:
        return ServerPlan(url=spec.url)
    url = serve_url()
    if url:
        return ServerPlan(url=url)
    if not is_reachable(DEFAULT_URL):
        model = default_model()
        if model is not None:
            return ServerPlan(model=str(model), start=True)
    return ServerPlan(url=DEFAULT_URL)


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(
    url: str,
    popen: subprocess.Popen[bytes],
    log_path: Path,
    *,
    deadline_s: float = START_DEADLINE_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll /health until 200, the process dies, or the deadline passes."""
    deadline = clock() + deadline_s
    while True:
        code = popen.poll()
        if code is not None:
            raise ServerStartError(
                f"the server for this chat exited with code {code}:\n{_log_tail(log_path)}",
                hint=f"full log: {log_path}",
            )
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if clock() > deadline:
            raise ServerStartError(
                f"the server for this chat was not healthy after {deadline_s:g} s:\n"
                f"{_log_tail(log_path)}",
                hint=f"full log: {log_path}",
            )
        time.sleep(0.1)


@contextlib.contextmanager
def session_server(model: str, say: TextIO) -> Iterator[str]:
    """Start `llamactl serve -m MODEL` on a free port for this chat; stop it at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = paths.ensure_private_dir(paths.logs_dir()) / f"chat-serve-{port}.log"
    argv = [sys.executable, "-m", "llamactl", "serve", "-m", model, "--port", str(port)]
    say.write(f"starting a server for this chat: {model} at {url} (log: {log_path})\n")
    say.flush()
    with _exit_on_term():
        with open(log_path, "ab") as log:
            popen = proc.spawn(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, popen, log_path)
            yield url
        finally:
            say.write("stopping the server started for this chat\n")
            say.flush()
            proc.stop_group(popen.pid, popen=popen)


@contextlib.contextmanager
def _exit_on_term() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while a session server runs, so that `finally`
    stops it gracefully: the parent-death SIGKILL alone would leave what serve itself started
    (a first build's compilers, for one) running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    saved = {sig: signal.signal(sig, _exit) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# --- the command ----------------------------------------------------------------------------


def system_prompt(spec: ChatSpec) -> str | None:
    """--system, else the default; `--system ""` sends none."""
    return DEFAULT_SYSTEM if spec.system is None else (spec.system or None)


def _one_shot_question(spec: ChatSpec, term: Terminal) -> str:
    # -p never reads stdin: a script's inherited stdin may be a pipe that never closes.
    if spec.prompt is not None:
        question = spec.prompt
    else:
        # sys.stdin is None when the shell closed it (`<&-`): that is an empty question.
        question = term.stdin.read() if term.stdin is not None else ""
    if not question.strip():
        raise UsageError("nothing to ask: pass -p TEXT or pipe a question on stdin")
    return question.strip()


def _console(term: Terminal) -> Console:
    from rich.console import Console

    return Console(file=term.stdout, highlight=False)


def one_shot(
    client: ChatClient, spec: ChatSpec, settings: Settings, term: Terminal, question: str
) -> None:
    """Answer one question on stdout: plain when piped, Markdown on a terminal, or --json."""
    conversation = Conversation(system=system_prompt(spec), turns=[Message("user", question)])
    messages = conversation.messages()
    if spec.json_output or not spec.stream:
        body = client.complete(messages, settings)
        if spec.json_output:
            text = json.dumps(body, indent=2, ensure_ascii=False)
        else:
            text = _reply_from_body(body, url=client.url, model=settings.model).text
        term.stdout.write(text if text.endswith("\n") else text + "\n")
        term.stdout.flush()
        return
    output: Output
    if term.stdout_tty:
        output = RichOutput(_console(term), show_stats=False)
    else:
        output = PlainOutput(term.stdout, term.stderr, show_stats=False)
    stream = client.stream(messages, settings)
    try:
        output.reply(stream)
    finally:
        stream.close()


def interactive(client: ChatClient, spec: ChatSpec, settings: Settings, term: Terminal) -> None:
    """The terminal chat."""
    console = _console(term)
    output = RichOutput(console, input_fd=term.stdin.fileno())
    session = ChatSession(client, output, settings, Conversation(system=system_prompt(spec)))
    model = settings.model or "the server's model"
    console.print(
        f"chatting with {model} at {client.url} · /help for commands · Ctrl-D or /bye to leave",
        style="dim",
        markup=False,
        highlight=False,
    )
    with line_history(history_path()):
        run_interactive(session, input)


def run(spec: ChatSpec, term: Terminal, *, env: Mapping[str, str] | None = None) -> None:
    """Run `llamactl chat`: pick or start the server, then chat or answer once."""
    env = os.environ if env is None else env
    if spec.url and spec.model_file:
        raise UsageError("--url and -m contradict: -m starts a server of its own")
    if spec.url:
        api_base(spec.url)  # a malformed --url is a usage error before anything starts
    for name in ("temperature", "top_p", "max_tokens"):
        value = getattr(spec, name)
        if value is not None:
            parse_setting(name, str(value))
    is_interactive = spec.prompt is None and term.stdin_tty and term.stdout_tty
    if is_interactive and spec.json_output:
        raise UsageError("--json needs a question: pass -p TEXT or pipe it on stdin")
    # The question first: an empty one is a usage error before any server is reached or started.
    question = None if is_interactive else _one_shot_question(spec, term)
    plan = plan_server(spec)
    with contextlib.ExitStack() as stack:
        url = plan.url
        if plan.start:
            assert plan.model is not None
            url = stack.enter_context(session_server(plan.model, term.stderr))
        assert url is not None
        client = ChatClient(url, api_key=resolve_api_key(spec.api_key, env))
        stack.callback(client.close)
        model = spec.model or client.default_model()
        settings = Settings(
            model=model,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_tokens,
        )
        if question is None:
            interactive(client, spec, settings, term)
        else:
            one_shot(client, spec, settings, term, question)
