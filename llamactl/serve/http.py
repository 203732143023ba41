"""The HTTP rules of the proxy, apart from its hot path: which headers are hop-by-hop, which
paths are public, the `model` of a request (body or query), CORS on the proxy's own answers,
and the OpenAI-style error responses and SSE error events the proxy writes itself.

Pure functions and constants: no event loop, no socket."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from llamactl.serve.upstream import ProxyError

__all__ = [
    "BODY_METHODS",
    "CONNECTION_WORDS",
    "JSON_ROUTES",
    "REQ_SPECIAL",
    "RESP_SPECIAL",
    "STREAM_PATHS",
    "Cors",
    "cors_headers",
    "cors_of",
    "error_response",
    "is_public",
    "model_of",
    "origin_allowed",
    "query_model",
    "sse_error_event",
    "wants_stream",
]

# Hop-by-hop request headers (RFC 9110 7.6.1) plus the ones the proxy rewrites itself.
REQ_SPECIAL = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"authorization",
        b"x-api-key",
        b"content-type",
        b"host",
        b"origin",
        b"x-conversation-id",  # forwarded, and noted: a fleet routes resumable streams by it
    }
)
#: The routes of resumable streams that name a conversation (its conv_id) and no model.
STREAM_PATHS = frozenset({b"/v1/stream", b"/v1/streams/lookup"})
RESP_SPECIAL = frozenset(
    {
        b"connection",
        b"x-accel-buffering",  # llama-server sends it on SSE too: written once, by us
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"content-type",
    }
)
STATIC_SUFFIXES = (
    b".html", b".js", b".mjs", b".css", b".svg", b".png", b".ico", b".webp", b".jpg", b".jpeg",
    b".gif", b".woff", b".woff2", b".ttf", b".json", b".webmanifest", b".txt", b".map", b".wasm",
)  # fmt: skip
CONNECTION_WORDS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# llama-server's routes that parse their POST body as JSON whatever it is (server.cpp): it
# answers an empty one with 500, a server error that is the client's; the proxy says 400.
# (Others take an empty body: POST /slots/0?action=erase, /health.)
JSON_ROUTES = frozenset(
    {
        b"/completion", b"/completions", b"/v1/completions", b"/chat/completions",
        b"/v1/chat/completions", b"/infill", b"/embedding", b"/embeddings", b"/v1/embeddings",
        b"/rerank", b"/reranking", b"/v1/rerank", b"/v1/reranking", b"/tokenize",
        b"/detokenize", b"/apply-template", b"/v1/messages", b"/v1/messages/count_tokens",
        b"/v1/responses",
    }
)  # fmt: skip


def is_public(method: bytes, path: bytes) -> bool:
    """Whether llama-server serves this request without an API key (tools/server/server-http.cpp:
    /health, /v1/health, every embedded web UI asset, and OPTIONS preflights)."""
    if path == b"/health" or path == b"/v1/health" or method == b"OPTIONS":
        return True
    if method != b"GET" and method != b"HEAD":
        return False
    if path == b"/" or path == b"/index.html":
        return True
    # The UI's assets (index.html, _app/..., sw.js, manifest.webmanifest, build.json) are files;
    # no API route has a file suffix. No dot segments or escapes: the name must be literal.
    if b"/." in path or b"%" in path or b"\\" in path:
        return False
    return path.startswith(b"/_app/") or path.rsplit(b"/", 1)[-1].endswith(STATIC_SUFFIXES)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_decode_json = _DECODER.decode
#: The C scanner under `decode`, called directly: it skips decode's two regex matches for
#: the whitespace around the value, a third of the cost on a small body (docs/performance.md).
_scan_json = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def _parse_json(text: str) -> Any:
    """`json.loads` with NaN and Infinity refused; the scanner first, decode (for its error
    message) when the text has whitespace around the value or is not valid."""
    if text and text[0] not in _JSON_SPACE:
        try:
            obj, end = _scan_json(text, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return obj
    return _decode_json(text)


def model_of(body: bytes) -> str | None:
    """The `model` of a JSON request body; ProxyError 400 unless it is a UTF-8 JSON object
    whose `model`, if any, is a string. Raw llama-server answers malformed JSON with 500."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProxyError(400, f"request body is not UTF-8: {exc}", code="invalid_body") from None
    try:
        obj = _parse_json(text)
    except (ValueError, RecursionError) as exc:
        raise ProxyError(
            400, f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if type(obj) is not dict:
        raise ProxyError(400, "request body must be a JSON object", code="invalid_body")
    model = obj.get("model")
    if model is None or type(model) is str:
        return model
    raise ProxyError(400, "`model` must be a string", code="invalid_model")


def query_model(url: bytes) -> str | None:
    """`?model=` of a GET, as llama-server's router mode reads it (e.g. GET /props?model=X)."""
    from urllib.parse import parse_qs

    query = url.partition(b"?")[2]
    values = parse_qs(query.decode("latin-1")).get("model")
    return values[0] if values else None


def origin_allowed(setting: str, origin: bytes) -> bool:
    """llama-server's CORS rules (--cors-origins) applied to the proxy's own answers."""
    if setting == "*":
        return True
    text = origin.decode("latin-1")
    if setting == "localhost":
        from urllib.parse import urlsplit

        return urlsplit(text).hostname in ("localhost", "127.0.0.1", "::1")
    return text in {o.strip() for o in setting.split(",")}


@dataclass(frozen=True)
class Cors:
    """llama-server's CORS settings (--cors-origins, --cors-methods, --cors-headers,
    --cors-credentials), with its defaults (common/common.h)."""

    origins: str = "*"
    methods: str = "GET, POST, DELETE, OPTIONS"
    headers: str = "*"
    credentials: bool = True


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name == flag:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def cors_of(args: Sequence[str], env: Mapping[str, str]) -> Cors:
    """The CORS settings llama-server would take from these flags and environment: a flag
    wins over LLAMA_ARG_CORS_*; with server tools or MCP servers and no --cors-origins, only
    localhost origins (common/arg.cpp)."""

    def setting(flag: str, var: str) -> str | None:
        value = _flag_value(args, flag)
        return value if value is not None else env.get(var)

    origins = setting("--cors-origins", "LLAMA_ARG_CORS_ORIGINS")
    if origins is None and any(
        _flag_value(args, f) or env.get(v)
        for f, v in (
            ("--tools", "LLAMA_ARG_TOOLS"),
            ("--mcp-servers-config", "LLAMA_ARG_MCP_SERVERS_CONFIG"),
            ("--mcp-servers-json", "LLAMA_ARG_MCP_SERVERS_JSON"),
        )
    ):
        origins = "localhost"
    credentials = Cors.credentials
    for arg in args:
        if arg in ("--cors-credentials", "--no-cors-credentials"):
            credentials = arg == "--cors-credentials"
    if not any(a in ("--cors-credentials", "--no-cors-credentials") for a in args):
        raw = env.get("LLAMA_ARG_CORS_CREDENTIALS")
        if raw is not None:
            credentials = raw.lower() in ("1", "true", "on", "yes", "enabled")
    return Cors(
        origins=origins if origins is not None else Cors.origins,
        methods=setting("--cors-methods", "LLAMA_ARG_CORS_METHODS") or Cors.methods,
        headers=setting("--cors-headers", "LLAMA_ARG_CORS_HEADERS") or Cors.headers,
        credentials=credentials,
    )


def cors_headers(cors: Cors, origin: str, *, preflight: bool) -> list[tuple[str, str]]:
    """The CORS headers llama-server puts on an answer (server-http.cpp's pre-routing
    handler): the allowed origin, and for a preflight (OPTIONS) the credentials, methods and
    headers allowed."""
    out: list[tuple[str, str]] = []
    if cors.credentials and cors.origins == "*":
        if origin:
            out.append(("Access-Control-Allow-Origin", origin))  # echoed: credentials allowed
    elif cors.origins == "localhost":
        if origin and origin_allowed("localhost", origin.encode("latin-1")):
            out.append(("Access-Control-Allow-Origin", origin))
    else:
        out.append(("Access-Control-Allow-Origin", cors.origins))
    if preflight:
        out += [
            ("Access-Control-Allow-Credentials", "true" if cors.credentials else "false"),
            ("Access-Control-Allow-Methods", cors.methods),
            ("Access-Control-Allow-Headers", cors.headers),
        ]
    return out


def error_response(
    err: ProxyError,
    *,
    keep_alive: bool = True,
    http10: bool = False,
    head_only: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete HTTP response for an error the proxy answers itself."""
    body = json.dumps(
        {"error": {"message": err.message, "type": err.type, "code": err.code}}
    ).encode()
    try:
        reason = HTTPStatus(err.status).phrase.encode()
    except ValueError:
        reason = b"Error"
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (err.status, reason),
        b"Date: %s\r\n" % formatdate(usegmt=True).encode(),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if err.retry_after is not None:
        parts.append(b"Retry-After: %d\r\n" % err.retry_after)
    if err.status == 401:
        parts.append(b"WWW-Authenticate: Bearer\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(extra)
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def sse_error_event(message: str, type: str = "server_error", code: int = 502) -> bytes:
    """The event llama-server itself sends when a stream fails (server-context.cpp format_error):
    `data: {"error": {...}}` and no [DONE]."""
    payload = {"error": {"message": message, "type": type, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def wants_stream(body: bytes) -> bool:
    """Whether a JSON request body asks for a stream (`"stream": true`). Only asked of requests
    that wait for their model, never on the per-request path."""
    if b'"stream"' not in body:
        return False
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("stream") is True
