"""The OpenAI-compatible HTTP client of `llamactl chat` (httpx): one completion, a streamed
one, the model list, and server errors turned into one clear message each."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from llamactl.chat.sse import SSEDecoder, SSEEvent
from llamactl.errors import ServerError, UsageError

#: Time to first token includes prompt processing, minutes for a long context on a CPU.
READ_TIMEOUT_S = 600.0


# --- values ---------------------------------------------------------------------------------


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
            reply = reply_from_body(_body(response), url=self._url, model=self._model)
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


def reply_from_body(body: Any, *, url: str, model: str | None) -> Reply:
    """A non-streamed chat completion as a Reply; ServerError for an error body."""
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
        reply_from_body(data, url=self.url, model=settings.model)  # raises on an error body
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
