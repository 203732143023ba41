"""llamactl's own HTTP answers when it serves several models: /health, router mode's
`GET /models`, `POST /models/load`, `POST /models/unload`, `/v1/models`, router-level `/props`
and `/metrics`. A tiny keep-alive HTTP/1.1 server on a private loopback port with a private
key: the proxy reaches it as one more upstream (serve/fleet.py routes these paths to it), so
the hot path stays the same for every request.

Its only client is llamactl's proxy, which always sends a Content-Length and the private key.
`http_get` is the other way: the fleet's GET to its instances (/props, /metrics)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from llamactl.serve.http import Cors, cors_headers
from llamactl.serve.upstream import ProxyError, Upstream

log = logging.getLogger(__name__)

__all__ = ["CONTROL", "ControlServer", "Reply", "http_get", "http_post", "http_request"]

#: The upstream name of the control server (no model is called this: it has a NUL).
CONTROL = "\0control"


@dataclass(frozen=True)
class Reply:
    """An answer: status, body, content type."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"

    @classmethod
    def json(cls, status: int, value: Any) -> Reply:
        return cls(status, json.dumps(value).encode())

    @classmethod
    def error(cls, err: ProxyError) -> Reply:
        body = {"error": {"message": err.message, "type": err.type, "code": err.code}}
        return cls.json(err.status, body)


#: method, path (no query), query string, body -> reply
Handler = Callable[[str, str, str, bytes], Awaitable[Reply]]


class ControlServer:
    """Serves `handler` on 127.0.0.1 (a free port) until closed."""

    def __init__(
        self, handler: Handler, *, max_body: int = 1 << 20, cors: Cors | None = None
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        #: With CORS settings, it answers preflights (OPTIONS, any path, no key: browsers send
        #: none) and puts the allowed origin on every answer, as llama-server does.
        self.cors = cors
        self.key = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def upstream(self) -> Upstream:
        return Upstream(CONTROL, "127.0.0.1", self.port, f"Bearer {self.key}".encode(), 1)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    return
                method, target, _ = parts
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > self.max_body:
                    return
                body = await reader.readexactly(length) if length else b""
                close = headers.get("connection", "").lower() == "close"
                path, _, query = target.partition("?")
                auth = headers.get("authorization", "").encode()
                if method == "OPTIONS" and self.cors is not None:
                    reply = Reply(200, b"", "text/html")
                elif not hmac.compare_digest(auth, f"Bearer {self.key}".encode()):
                    reply = Reply.error(ProxyError(401, "Invalid API Key", code="invalid_api_key"))
                else:
                    try:
                        reply = await self.handler(method, path, query, body)
                    except ProxyError as err:
                        reply = Reply.error(err)
                    except Exception as exc:  # a bug: answered, logged, never a dead socket
                        log.exception("control request %s %s failed", method, path)
                        reply = Reply.error(ProxyError(500, f"internal error: {exc!r}"))
                phrase = HTTPStatus(reply.status).phrase
                extra = ""
                if self.cors is not None:
                    origin = headers.get("origin", "")
                    pairs = cors_headers(self.cors, origin, preflight=method == "OPTIONS")
                    extra = "".join(f"{name}: {value}\r\n" for name, value in pairs)
                writer.write(
                    f"HTTP/1.1 {reply.status} {phrase}\r\nContent-Type: {reply.content_type}\r\n"
                    f"Content-Length: {len(reply.body)}\r\n{extra}"
                    f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()
                    + (b"" if method == "HEAD" else reply.body)
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


# -- llamactl's own GET of an instance (its /props, its /metrics) -------------------------


async def http_get(
    host: str, port: int, path: str, auth: bytes | None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """GET on a fresh connection: (status, body); (0, b"") when nothing answers."""
    return await http_request("GET", host, port, path, auth, b"", timeout)


async def http_post(
    host: str, port: int, path: str, auth: bytes | None, body: bytes, timeout: float = 5.0
) -> tuple[int, bytes]:
    """POST of a JSON body on a fresh connection: (status, body); (0, b"") when nothing
    answers in time."""
    return await http_request("POST", host, port, path, auth, body, timeout)


async def http_request(
    method: str, host: str, port: int, path: str, auth: bytes | None, body: bytes, timeout: float
) -> tuple[int, bytes]:
    """One request on a fresh connection, closed after the answer: (status, body, de-chunked);
    (0, b"") when nothing answers in `timeout`. A body other than a GET's goes as JSON."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        if auth:
            head += f"Authorization: {auth.decode()}\r\n"
        if method != "GET":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write((head + "\r\n").encode() + body)
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, asyncio.TimeoutError):
        return 0, b""
    finally:
        if writer is not None:
            writer.close()
    head_raw, _, payload = data.partition(b"\r\n\r\n")
    parts = head_raw.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0, b""
    if b"transfer-encoding: chunked" in head_raw.lower():
        payload = _unchunk(payload)
    return int(parts[1]), payload


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2 :]
    return b"".join(out)
