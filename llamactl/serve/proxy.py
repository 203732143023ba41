"""The HTTP front of llamactl: a byte-level asyncio proxy in front of llama-server.

Only request and response heads are parsed (httptools, llhttp in C); bodies travel as bytes
over keep-alive connections pooled per upstream and are never re-encoded. See docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, cast

import httptools

from llamactl.serve import express, listen
from llamactl.serve.http import BODY_METHODS as _BODY_METHODS
from llamactl.serve.http import CONNECTION_WORDS as _CONNECTION_WORDS
from llamactl.serve.http import JSON_ROUTES as _JSON_ROUTES
from llamactl.serve.http import REQ_SPECIAL as _REQ_SPECIAL
from llamactl.serve.http import RESP_SPECIAL as _RESP_SPECIAL
from llamactl.serve.http import STREAM_PATHS as _STREAM_PATHS
from llamactl.serve.http import error_response, is_public, model_of
from llamactl.serve.http import origin_allowed as _origin_allowed
from llamactl.serve.http import query_model as _query_model
from llamactl.serve.http import sse_error_event as _sse_error_event
from llamactl.serve.http import wants_stream as _wants_stream
from llamactl.serve.listen import ProxyBindError
from llamactl.serve.runner import run
from llamactl.serve.upstream import ProxyError, Upstream, UpstreamProvider

if TYPE_CHECKING:
    from ssl import SSLContext

log = logging.getLogger(__name__)

__all__ = [
    "Proxy",
    "ProxyBindError",
    "ProxyConfig",
    "ProxyError",
    "ProxyStats",
    "Upstream",
    "UpstreamProvider",
    "run",
]


@dataclass(frozen=True)
class ProxyConfig:
    """Where the proxy listens and the bounds it enforces."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: When set, every request but /health and the web UI's files needs this key; several keys
    #: may be given comma-separated, as llama-server's --api-key takes them.
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    #: Longest silence from llama-server while a request is in flight; 600 s is llama-server's
    #: own default read/write timeout (`--timeout`), so the proxy never gives up before it does.
    #: Also how long a client may leave its answer unread (no byte taken) before it is dropped.
    upstream_timeout: float = 600.0
    connect_timeout: float = 10.0
    #: A request head must arrive within this, and a body may not stall longer (slow clients).
    request_timeout: float = 30.0
    #: A body must also arrive at this average rate (bytes/s) after the first request_timeout
    #: seconds, so that one trickling a byte now and then cannot hold a connection for hours
    #: (Apache's mod_reqtimeout does the same: body=20,MinRate=500).
    min_body_rate: int = 1024
    keepalive_timeout: float = 75.0
    #: CORS on the proxy's own error answers (llama-server's answers carry its own headers):
    #: None = no CORS headers, "*" = echo any Origin, "localhost" = echo loopback origins only,
    #: else a comma-separated list of allowed origins.
    cors_origins: str | None = None
    #: Idle pooled connections kept per upstream.
    max_idle_per_upstream: int = 64
    backlog: int = 1024
    #: DNS-rebinding guard: when set and no API key is required, a request whose Host header
    #: names none of these (nor an IP address, nor *.localhost: listen.host_allowed) gets 403.
    #: serve sets it to listen.local_names(--host) plus --allowed-hosts.
    host_names: frozenset[bytes] | None = None
    #: Client connections served at once; more get a 503 and are closed, so that descriptors
    #: never run out (serve sizes it from RLIMIT_NOFILE: listen.connection_bound). 0: no bound.
    max_connections: int = 0
    #: A streamed request that waits this long for its model (loading) gets its 200 head and
    #: an SSE comment, then one more every as many seconds, so that clients and proxies in
    #: between do not time out (0: never).
    sse_wait_comment_s: float = 2.0
    #: Serve plain POST /tokenize, /detokenize and /apply-template in the express lane (C, a
    #: thread of its own: serve/express.py) where the provider supports it; off, or where the
    #: lane cannot be built, everything goes through Python.
    express: bool = True


def proxy_config(spec: Any) -> ProxyConfig:
    """The proxy's settings from serve's command line (serve/args.py's ServeSpec): the one
    mapping for serve with one model, several, or remote servers only."""
    return ProxyConfig(
        host=spec.host,
        port=spec.port,
        api_key=",".join(spec.api_keys) or None,
        max_body_bytes=spec.max_body_bytes,
        host_names=listen.guarded_names(spec.host, spec.allowed_hosts),
        max_connections=spec.max_connections or listen.connection_bound(),
    )


@dataclass(frozen=True)
class ProxyStats:
    """Counters for `ps` and tests."""

    requests: int
    in_flight: int
    connections: int
    upstream_idle: int


# Response framings towards the client.
_NONE, _LENGTH, _CHUNKED, _CLOSE = 0, 1, 2, 3
#: An upstream error answer to a stream whose 200 head the client already has (it waited for
#: its model with SSE comments): its body becomes one SSE error event.
_WRAP = 4
_WAIT_COMMENT = b": waiting for the model to load\n\n"
_WAIT_CHUNK = b"%x\r\n%s\r\n" % (len(_WAIT_COMMENT), _WAIT_COMMENT)


#: How long a request whose upstream refuses connections keeps asking for the upstream again
#: (a dead llama-server the supervisor has not noticed yet), and the pause between tries.
REQUEUE_S = 5.0
REQUEUE_PAUSE_S = 0.05

_EAGER_TASKS = sys.version_info >= (3, 12)
_NEEDS_TASK = object()


async def _resume(coro: Coroutine[Any, Any, Upstream], yielded: Any) -> Upstream:
    """Finish a coroutine whose first step already ran outside a task, as a Task would."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # Task.__step clears this flag when it takes a yielded future; so do we.
                yielded._asyncio_future_blocking = False
                await yielded
        except BaseException as exc:  # cancellation or the awaited future's error: pass it in
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


# -- one exchange: a request and its response ---------------------------------------------------


class _Exchange:
    """One request from a client and what became of it.

    Its fields start as the class's defaults: a new exchange per request sets only what is
    mutable (docs/performance.md: a few dozen attribute stores per request saved)."""

    client: _ClientConn
    url: bytes = b""
    method: bytes = b"GET"
    body_len: int = 0
    head_size: int = 0
    has_body: bool = False
    declared: int = 0
    hop: set[bytes] | None = None
    authz: bytes | None = None
    xkey: bytes | None = None
    has_host: bool = False
    host: bytes | None = None
    moved: bool = False  # sent again to another replica once already
    json_body: bool = True
    expect: bool = False
    auth_ok: bool = False
    origin: bytes | None = None
    http10: bool = False
    keep_alive: bool = True
    complete: bool = False
    started: bool = False
    finished: bool = False
    error: ProxyError | None = None
    upstream: Upstream | None = None
    conn: _UpstreamConn | None = None
    attempts: int = 0
    released: bool = False
    replayed: bool = False
    model: str | None = None
    #: X-Conversation-Id: a resumable stream's id (the provider may route by it).
    conv: bytes | None = None
    #: Its client left while it waited for its model: sent anyway, the answer dropped.
    detached: bool = False
    requeue_until: float = 0.0  # loop time until which a refused connect waits for a restart
    status: int = 0
    t0: float = 0.0
    early: bool = False  # a 200 SSE head went out while the model loaded
    keepalive: asyncio.TimerHandle | None = None
    timed_out: bool = False
    acquire_task: asyncio.Task[Upstream] | None = None
    connect_task: asyncio.Future[Any] | None = None

    def __init__(self, client: _ClientConn) -> None:
        self.client = client
        self.lines: list[bytes] = []
        self.cred: list[bytes] = []
        self.body: list[bytes] = []
        self.payload: list[bytes] = []


# -- the client side -------------------------------------------------------------------------


class _ClientConn(asyncio.Protocol):
    """One client connection: parses request heads, keeps responses in request order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Exchange] = deque()
        self.cur: _Exchange | None = None
        self.in_head = False
        self.raw_head = 0
        self.head_started = 0.0
        self.closed = False
        self.ignore_input = False
        self.in_trailer = False
        self.write_paused = False
        self.read_paused = False
        self.pumping = False
        #: Last sign of life of the request being received, or the end of the last answer.
        self.stamp = proxy.now
        #: Bytes waiting for the client at the last sweep, and since when none were taken.
        self.unsent = 0
        self.unsent_at = proxy.now
        self.linger: asyncio.TimerHandle | None = None
        #: The Host names this connection's requests must use (None: any); see connection_made.
        self.hosts = proxy._hosts
        #: Bytes the express lane read before it handed the connection over.
        self.preload = b""
        #: Handed over by the lane for a request it could serve but had no route for (or whose
        #: llama-server failed it): the route is taught to the lane, then the connection goes
        #: back to it once idle.
        self.from_lane = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Bounded buffering towards a slow reader; past it the upstream is paused instead.
        self.transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)
        proxy = self.proxy
        proxy._clients.add(self)
        proxy._tell_lane()
        if self.hosts is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                # No browser reaches a Unix socket: no rebinding, whatever Host it sends
                # (`curl --unix-socket S http://x/` sends "Host: x").
                self.hosts = None
        if self.preload:
            data, self.preload = self.preload, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.ignore_input:
            return
        # Raw bytes count while llhttp may be buffering a field: in a head or in trailers.
        if self.in_head or self.in_trailer:
            self.raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llama-server speaks no upgraded protocol: answer the request, then close.
            self.ignore_input = True
            if self.queue:
                self.queue[-1].keep_alive = False
        except httptools.HttpParserError as exc:
            self._fatal(ProxyError(400, f"malformed HTTP request: {exc}", code="bad_request"))
            return
        if (self.in_head or self.in_trailer) and self.raw_head > self.proxy.config.max_header_bytes:
            self._fatal(ProxyError(431, "request header fields too large"))
            return
        self._pump()

    def eof_received(self) -> bool | None:
        # A client that half-closes has gone away (llama-server's httplib reads it the same
        # way): drop its requests so llama-server stops generating.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        proxy = self.proxy
        proxy._clients.discard(self)
        proxy._tell_lane()
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        for ex in self.queue:
            self._abandon(ex)
        self.queue.clear()

    def pause_writing(self) -> None:
        # The client reads slower than its answer comes: stop reading llama-server until it
        # catches up; _pump starts no further request meanwhile (answers the proxy writes
        # itself included), and pipelining stops reading the client (see on_message_complete).
        self.write_paused = True
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None and conn.transport is not None:
                conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            ex = self.queue[0]
            conn = ex.conn
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()
            elif not ex.started:
                self._pump()

    # httptools callbacks (called from feed_data)

    def on_message_begin(self) -> None:
        ex = _Exchange(self)
        self.cur = ex
        self.queue.append(ex)
        self.in_head = True
        self.raw_head = 0
        self.head_started = self.stamp = self.proxy.now

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        assert ex is not None
        ex.url += url
        ex.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A trailer field after a chunked body: dropped (RFC 9110 6.5.1 allows it; the body
            # goes upstream with a Content-Length, where no trailer has a place), its bytes
            # bounded in data_received.
            return
        ex = self.cur
        assert ex is not None
        ex.head_size += len(name) + len(value) + 4
        lname = name.lower()
        if lname not in _REQ_SPECIAL:
            ex.lines += (name, b": ", value, b"\r\n")
        elif lname == b"host":
            ex.has_host = True
            ex.host = value  # kept apart from ex.lines: a remote upstream replaces it
        elif lname == b"content-length":
            ex.has_body = True
            # llhttp has checked that it is a number and that there is only one.
            ex.declared = int(value)
        elif lname == b"content-type":
            ex.lines += (name, b": ", value, b"\r\n")
            ctype = value.lower()
            # Multipart uploads (/v1/audio/transcriptions) are not JSON; everything else that
            # llama-server accepts by POST is parsed as JSON whatever its Content-Type says.
            if ctype.startswith((b"multipart/", b"application/octet-stream")):
                ex.json_body = False
        elif lname == b"authorization":
            ex.cred += (name, b": ", value, b"\r\n")
            ex.authz = value
        elif lname == b"x-api-key":
            ex.cred += (name, b": ", value, b"\r\n")
            ex.xkey = value
        elif lname == b"transfer-encoding":
            ex.has_body = True
        elif lname == b"expect":
            ex.expect = value.lower() == b"100-continue"
        elif lname == b"origin":
            ex.origin = value
            ex.lines += (name, b": ", value, b"\r\n")
        elif lname == b"connection":
            extra = {t.strip() for t in value.lower().split(b",")} - _CONNECTION_WORDS
            if extra:
                ex.hop = (ex.hop or set()) | extra
        elif lname == b"x-conversation-id":
            ex.conv = value
            ex.lines += (name, b": ", value, b"\r\n")
        # Other hop-by-hop headers (Connection, Keep-Alive, TE, Upgrade, ...) end here.

    def on_headers_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        self.in_head = False
        parser = self.parser
        ex.method = parser.get_method()
        ex.http10 = parser.get_http_version() == "1.0"
        ex.keep_alive = parser.should_keep_alive()
        proxy = self.proxy
        config = proxy.config
        if ex.head_size > config.max_header_bytes:
            self._fatal(ProxyError(431, "request header fields too large"))
            return
        if ex.hop:
            # Headers named by Connection are hop-by-hop too (RFC 9110 7.6.1).
            lines = ex.lines
            ex.lines = [
                part
                for i in range(0, len(lines), 4)
                if lines[i].lower() not in ex.hop
                for part in lines[i : i + 4]
            ]
        if proxy._key is not None:
            ex.auth_ok = proxy._check_key(ex.authz, ex.xkey)
        elif (
            self.hosts is not None
            and ex.host is not None
            and not (proxy._hosts_seen.get(ex.host) or proxy._host_ok(ex.host))
        ):
            # No key: only the key would stop a page whose name was rebound to this address.
            ex.error = ProxyError(
                403,
                "the Host header does not name this server (a guard against DNS rebinding): "
                "use the address it listens on, add the name with --allowed-hosts, or set an "
                "API key",
                code="host_not_allowed",
            )
        if proxy._key is not None and not ex.auth_ok:
            path = ex.url.partition(b"?")[0]
            if not is_public(ex.method, path):
                ex.error = ProxyError(401, "Invalid API Key", code="invalid_api_key")
            # A public request without a valid key reaches llama-server without the private
            # key too, so llama-server's own list of public paths has the last word.
            ex.cred = []
        elif proxy._key is not None:
            ex.cred = []
        if ex.has_body and ex.declared > config.max_body_bytes:
            self._fatal(ProxyError(413, f"request body larger than {config.max_body_bytes} bytes"))
            return
        if ex.error is not None:
            if ex.expect:
                # The client waits for 100 before sending its body: answer now and close.
                self._fatal(ex.error)
            return
        if ex.expect and self.queue[0] is ex:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            ex.expect = False

    def on_chunk_header(self) -> None:
        # Either a chunk of data follows (on_body ends this) or, after the last chunk, trailers.
        self.in_trailer = True
        self.raw_head = 0

    def on_chunk_complete(self) -> None:
        self.in_trailer = False

    def on_body(self, data: bytes) -> None:
        self.in_trailer = False
        self.stamp = self.proxy.now
        ex = self.cur
        assert ex is not None
        if ex.error is not None:
            return  # discarded: the answer is already decided
        ex.body_len += len(data)
        if ex.body_len > self.proxy.config.max_body_bytes:
            # Chunked bodies have no length up front: stop at the limit.
            self._fatal(
                ProxyError(
                    413, f"request body larger than {self.proxy.config.max_body_bytes} bytes"
                )
            )
            return
        ex.body.append(data)

    def on_message_complete(self) -> None:
        ex = self.cur
        if ex is None:
            return
        ex.complete = True
        self.cur = None
        if len(self.queue) > 1 and not self.read_paused:
            # Pipelined requests wait their turn; stop reading more of them meanwhile.
            self.read_paused = True
            self.transport.pause_reading()

    # the exchange queue

    def _fatal(self, err: ProxyError) -> None:
        """Answer an unrecoverable request error after the responses ahead of it, then close."""
        self.ignore_input = True
        ex = self.cur
        if ex is None or ex.complete:
            ex = _Exchange(self)
            self.queue.append(ex)
        self.cur = None
        self.in_head = False
        ex.error = err
        ex.complete = True
        ex.keep_alive = False
        ex.expect = False
        self._pump()

    def _pump(self) -> None:
        """Start the exchange at the head of the queue when its request is complete."""
        if self.pumping:
            return
        self.pumping = True
        try:
            queue = self.queue
            while queue and not self.closed:
                ex = queue[0]
                if ex.started:
                    return
                if not ex.complete:
                    if ex.expect and ex.error is None and self.cur is ex and not self.in_head:
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        ex.expect = False
                        # The client waited for this to send its body: the body's clock starts.
                        self.head_started = self.stamp = self.proxy.now
                    return
                if self.write_paused:
                    # The client is not reading its answers: resume_writing goes on.
                    return
                ex.started = True
                self.proxy.requests += 1
                self.proxy.in_flight += 1
                if ex.error is not None:
                    self._reply_error(ex, ex.error)
                else:
                    self._dispatch(ex)
                if not ex.finished:
                    return
        finally:
            self.pumping = False

    def _dispatch(self, ex: _Exchange) -> None:
        """Find the model, acquire its upstream, send."""
        model = None
        if ex.json_body and ex.body_len and ex.method in _BODY_METHODS:
            body = ex.body[0] if len(ex.body) == 1 else b"".join(ex.body)
            ex.body = [body]
            try:
                model = model_of(body)
            except ProxyError as err:
                self._reply_error(ex, err)
                return
        elif ex.method == b"POST" and ex.json_body and ex.url.partition(b"?")[0] in _JSON_ROUTES:
            self._reply_error(
                ex,
                ProxyError(
                    400, "request body is empty: a JSON object is expected", code="invalid_json"
                ),
            )
            return
        elif b"model=" in ex.url:
            model = _query_model(ex.url)
        ex.model = model
        self._acquire(ex)

    def _acquire(self, ex: _Exchange) -> None:
        """Ask the provider for the upstream of ex.model, then send."""
        model = ex.model
        path = ex.url.partition(b"?")[0]
        ex.t0 = _monotonic()
        proxy = self.proxy
        # (A stream route that names a model goes to that model: no set lookup per request.)
        by_conv = proxy._acquire_conv is not None and (
            ex.conv is not None or (model is None and path in _STREAM_PATHS)
        )
        if proxy._acquire_now is not None and not by_conv:
            upstream = proxy._acquire_now(model, ex.method, path)
            if upstream is not None:
                self._acquired(ex, upstream)
                return
        # (Python 3.11's get_running_loop costs a getpid system call: not on the path above.)
        loop = asyncio.get_running_loop()
        coro = self._acquiring(ex, model, path, by_conv)
        if _EAGER_TASKS:
            # A ready instance answers in the first step, run right here (no scheduling).
            task: asyncio.Task[Upstream] = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            if task.done():
                self._acquire_done(ex, task)
                return
        else:
            # Python < 3.12: run the first step by hand, which saves a Task per request
            # (about 7% of the proxy's CPU per request, measured: docs/performance.md).
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                self._acquired(ex, stop.value)
                return
            except ProxyError as err:
                self._reply_error(ex, err)
                return
            except RuntimeError:
                # Something in acquire needed a current task (asyncio.timeout): run it again
                # inside a real one.
                yielded = _NEEDS_TASK
            if yielded is _NEEDS_TASK:
                task = loop.create_task(self._acquiring(ex, model, path, by_conv))
            else:
                task = loop.create_task(_resume(coro, yielded))
        ex.acquire_task = task
        task.add_done_callback(partial(self._acquire_done, ex))
        wait = self.proxy.config.sse_wait_comment_s
        if (
            wait > 0
            and ex.keepalive is None
            and ex.method == b"POST"
            and not ex.http10
            # A resumable stream's status waits for its model, as in router mode: a stop
            # meanwhile is answered 400 (conversations.py), and a reload resumes it.
            and ex.conv is None
            and _wants_stream(ex.body[0] if len(ex.body) == 1 else b"".join(ex.body))
        ):
            ex.keepalive = loop.call_later(wait, self._wait_comment, ex)

    def _acquiring(
        self, ex: _Exchange, model: str | None, path: bytes, by_conv: bool
    ) -> Coroutine[Any, Any, Upstream]:
        """The provider's acquire coroutine for `ex`: by conversation where the provider routes
        resumable streams itself (a fleet of models), else by model."""
        proxy = self.proxy
        if by_conv:
            assert proxy._acquire_conv is not None
            return proxy._acquire_conv(model, ex.method, path, ex.url, ex.conv)
        return proxy.provider.acquire(model, ex.method, path)

    def _wait_comment(self, ex: _Exchange) -> None:
        """A stream still waits for its model: its 200 SSE head first, then a comment."""
        ex.keepalive = None
        if self.closed or ex.finished or ex.acquire_task is None:
            return
        if not ex.early:
            ex.early = True
            head = [
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n",
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
                b"X-Accel-Buffering: no\r\n",
            ]
            cors = self.proxy.config.cors_origins
            if cors is not None and ex.origin is not None and _origin_allowed(cors, ex.origin):
                head.append(b"Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n" % ex.origin)
            if not ex.keep_alive:
                head.append(b"Connection: close\r\n")
            head.append(b"\r\n")
            self.transport.write(b"".join(head))
        self.transport.write(_WAIT_CHUNK)
        ex.keepalive = asyncio.get_running_loop().call_later(
            self.proxy.config.sse_wait_comment_s, self._wait_comment, ex
        )

    def _acquire_done(self, ex: _Exchange, task: asyncio.Task[Upstream]) -> None:
        ex.acquire_task = None
        if ex.keepalive is not None:
            ex.keepalive.cancel()
            ex.keepalive = None
        if task.cancelled() or self.closed or ex.finished:
            if not task.cancelled() and task.exception() is None:
                if ex.detached:
                    self.proxy._send_detached(self._request(ex, task.result()), task.result())
                else:
                    self.proxy.provider.release(task.result(), 499)
            return
        exc = task.exception()
        if exc is None:
            self._acquired(ex, task.result())
        elif isinstance(exc, ProxyError):
            self._reply_error(ex, exc)
        else:
            log.error("acquire failed", exc_info=exc)
            self._reply_error(ex, ProxyError(500, f"internal error: {exc!r}"))

    def _acquired(self, ex: _Exchange, upstream: Upstream) -> None:
        ex.upstream = upstream
        # The parts stay until the exchange ends: a request refused by a llama-server that has
        # just died is built again for its successor, whose private key differs (_requeue).
        ex.payload = self._request(ex, upstream)
        self._send(ex, fresh=False)

    def _request(self, ex: _Exchange, upstream: Upstream) -> list[bytes]:
        """The request as it goes to `upstream`: its head (the upstream's own credentials and
        Host) and its body, in one piece unless the body is large."""
        body = ex.body[0] if len(ex.body) == 1 else b"".join(ex.body)
        auth = b""
        if upstream.auth is not None:
            if ex.auth_ok or self.proxy._key is None:
                auth = b"Authorization: " + upstream.auth + b"\r\n"
        elif ex.cred:
            auth = b"".join(ex.cred)
        if upstream.host_header is not None:
            host = b"Host: %s\r\n" % upstream.host_header
        elif ex.has_host:
            host = b"Host: %s\r\n" % ex.host
        else:
            host = b"Host: %s:%d\r\n" % (upstream.host.encode(), upstream.port)
        # The body was read whole (bounded), so it always goes out with a Content-Length.
        length = b"Content-Length: %d\r\n" % len(body) if ex.has_body or body else b""
        head = b"%s %s HTTP/1.1\r\n%s%s%s%s\r\n" % (
            ex.method,
            ex.url,
            b"".join(ex.lines),
            host,
            auth,
            length,
        )
        return [head + body] if len(body) < 65536 else [head, body]

    def _send(self, ex: _Exchange, fresh: bool) -> None:
        """Send on a pooled connection, or open one."""
        ex.attempts += 1
        upstream = ex.upstream
        assert upstream is not None
        conn = None if fresh else self.proxy._pool_get(upstream)
        if conn is not None:
            conn.send(ex)
            return
        fut = asyncio.ensure_future(self.proxy._connect(upstream))
        ex.connect_task = fut
        fut.add_done_callback(partial(self._connected, ex))

    def _connected(self, ex: _Exchange, fut: asyncio.Future[Any]) -> None:
        ex.connect_task = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            conn: _UpstreamConn = fut.result()
            if self.closed or ex.finished:
                self.proxy._pool_put(conn)
                return
            conn.send(ex)
            return
        if self.closed or ex.finished:
            return
        if self._replay(ex):
            return
        if ex.attempts < 2 and not isinstance(exc, asyncio.TimeoutError):
            self._send(ex, fresh=True)
            return
        if isinstance(exc, ConnectionRefusedError) and self._requeue(ex):
            return
        if self._move(ex):
            return
        upstream = ex.upstream
        assert upstream is not None
        log.warning(
            "cannot connect to %s at %s:%d: %r", upstream.name, upstream.host, upstream.port, exc
        )
        self._release(ex, 0)
        if isinstance(exc, asyncio.TimeoutError):
            err = ProxyError(504, f"timed out connecting to the model server {upstream.name}")
        else:
            err = ProxyError(502, f"cannot reach the model server {upstream.name}: {exc}")
        self._reply_error(ex, err)

    def _replay(self, ex: _Exchange) -> bool:
        """Send a request that got no byte of an answer to the successor of a llama-server that
        was killed as hung (acquire waits for the restart), once; False when that is not the
        case (see UpstreamProvider.replayable)."""
        upstream = ex.upstream
        if ex.replayed or upstream is None or not self.proxy.provider.replayable(upstream):
            return False
        ex.replayed = True
        self._detach(ex, 503)  # neither a failure nor a success of that server
        self._acquire(ex)
        return True

    def _requeue(self, ex: _Exchange) -> bool:
        """Nothing listens on the upstream's port: its llama-server has died, and the
        supervisor may not have noticed yet. No byte of the request was taken, so ask for
        the upstream again shortly (acquire waits for the restart), for up to REQUEUE_S."""
        now = asyncio.get_running_loop().time()
        if ex.requeue_until == 0.0:
            ex.requeue_until = now + REQUEUE_S
        elif now >= ex.requeue_until:
            return False
        self._detach(ex, 0)
        asyncio.get_running_loop().call_later(REQUEUE_PAUSE_S, self._reacquire, ex)
        return True

    def _move(self, ex: _Exchange) -> bool:
        """A replicated upstream (a remote server) dropped the request before any byte of its
        answer: ask for an upstream again, once; the provider has counted the failure and
        picks another replica."""
        upstream = ex.upstream
        if upstream is None or not upstream.replicated or ex.moved:
            return False
        ex.moved = True
        log.warning("%s dropped a request before answering: sent to another", upstream.name)
        self._detach(ex, 0)
        self._acquire(ex)
        return True

    def _detach(self, ex: _Exchange, outcome: int) -> None:
        """Release the exchange's upstream with `outcome` and forget it, so that the request
        can be acquired and built again (its private key may differ) for another upstream."""
        self._release(ex, outcome)
        ex.released = False
        ex.upstream = None
        ex.attempts = 0
        ex.payload = []

    def _reacquire(self, ex: _Exchange) -> None:
        if not (self.closed or ex.finished):
            self._acquire(ex)

    def _release(self, ex: _Exchange, outcome: int) -> None:
        if not ex.released and ex.upstream is not None:
            ex.released = True
            self.proxy.provider.release(ex.upstream, outcome, _monotonic() - ex.t0)

    def _reply_error(self, ex: _Exchange, err: ProxyError) -> None:
        if ex.early:
            # The client has a 200 SSE head already: the error goes in-band, as llama-server
            # reports a failed stream, then the end of the stream.
            if not self.closed:
                event = _sse_error_event(err.message, err.type, err.status)
                self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            self._done(ex)
            return
        extra = b""
        cors = self.proxy.config.cors_origins
        if cors is not None and ex.origin is not None and _origin_allowed(cors, ex.origin):
            extra = b"Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n" % ex.origin
        if not self.closed:
            self.transport.write(
                error_response(
                    err,
                    keep_alive=ex.keep_alive,
                    http10=ex.http10,
                    head_only=ex.method == b"HEAD",
                    extra=extra,
                )
            )
        self._done(ex)

    def _done(self, ex: _Exchange) -> None:
        """The response to `ex` is fully written: go on with the next request, or close."""
        if ex.finished:
            return
        ex.finished = True
        self.proxy.in_flight -= 1
        ex.conn = None
        self.stamp = self.proxy.now  # an idle keep-alive connection is idle from here
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if self.closed:
            return
        if not ex.keep_alive:
            self._close_after_write()
            return
        if self.read_paused and len(self.queue) <= 1:
            self.read_paused = False
            self.transport.resume_reading()
        if self.queue:
            self._pump()
        elif self.from_lane and self.cur is None:
            self.proxy._give_back(self, ex)

    def _close_after_write(self) -> None:
        """Close once the answer is out, without a reset that could eat it: stop sending, read
        and drop what the client still sends for a moment, then close (a lingering close)."""
        self.ignore_input = True
        self.closed = True
        for ex in self.queue:
            self._abandon(ex)
        self.queue.clear()
        transport = self.transport
        if self.read_paused:
            transport.resume_reading()
        # It stays in proxy._clients until connection_lost: the sweep drops it if its answer
        # is never read (close() waits for the buffer to drain, for ever if nobody reads).
        if transport.can_write_eof():
            transport.write_eof()
            self.linger = asyncio.get_running_loop().call_later(2.0, transport.close)
        else:
            transport.close()

    def _abandon(self, ex: _Exchange) -> None:
        """The client is gone: stop the upstream request so llama-server stops generating."""
        if ex.keepalive is not None:
            ex.keepalive.cancel()
            ex.keepalive = None
        if ex.acquire_task is not None:
            if ex.conv is not None and self.proxy._acquire_conv is not None:
                # A resumable stream waiting for its model (a page reloaded meanwhile): the
                # request still goes, so that its stream session fills for a later resume,
                # as router mode's detached requests do.
                ex.detached = True
            else:
                ex.acquire_task.cancel()
        if ex.connect_task is not None:
            ex.connect_task.cancel()
        conn = ex.conn
        if conn is not None:
            conn.abort()
        self._release(ex, ex.status or 499)
        if ex.started and not ex.finished:
            ex.finished = True
            self.proxy.in_flight -= 1

    # called by the upstream side

    def upstream_failed(self, ex: _Exchange, retry: bool) -> None:
        """The upstream connection failed before any byte of a response."""
        if self.closed or ex.finished:
            self._release(ex, 0)
            return
        ex.conn = None
        upstream = ex.upstream
        assert upstream is not None
        if self._replay(ex):
            return
        if retry and ex.attempts < 2:
            # A pooled keep-alive connection that llama-server closed meanwhile is normal.
            self._send(ex, fresh=True)
            return
        if not ex.timed_out and self._move(ex):
            return
        if retry and self._requeue(ex):
            # A fresh connection closed before any byte of an answer, after a pooled one was:
            # the llama-server was dying as it accepted (a SIGKILLed server's socket lingers
            # for an instant). Wait for its successor as for a refused connect (REQUEUE_S).
            return
        self._release(ex, 0)
        if ex.timed_out:
            err = ProxyError(504, f"the model server {upstream.name} did not answer in time")
        else:
            err = ProxyError(502, f"the model server {upstream.name} closed the connection")
        self._reply_error(ex, err)

    def check_timeouts(self, now: float) -> None:
        """Called about once a second: close connections that stalled past their bound."""
        config = self.proxy.config
        if self._unread_for(now) > config.upstream_timeout:
            # The client stopped reading its answer altogether.
            self.transport.abort()
            return
        if self.closed:
            return
        cur = self.cur
        if self.in_head:
            if now - self.head_started > config.request_timeout:
                self._fatal(ProxyError(408, "request head not received in time"))
                return
        elif cur is not None and not cur.expect:
            # A body on its way: no stall longer than request_timeout, and on average at least
            # min_body_rate after the first request_timeout seconds.
            if now - self.stamp > config.request_timeout:
                self._fatal(ProxyError(408, "request body not received in time"))
                return
            allowed = config.request_timeout + cur.body_len / config.min_body_rate
            if now - self.head_started > allowed:
                self._fatal(ProxyError(408, "request body arriving too slowly"))
                return
        if not self.queue:
            if now - self.stamp > config.keepalive_timeout:
                self.transport.close()
            return
        ex = self.queue[0]
        if not ex.complete:
            return
        conn = ex.conn
        if conn is not None and now - conn.stamp > config.upstream_timeout:
            ex.timed_out = True
            conn.abort_with_failure()

    def _unread_for(self, now: float) -> float:
        """Seconds that bytes for the client have waited with none taken, 0 when none wait or
        more may still be added (an answer under way that has not filled the buffer)."""
        size = self.transport.get_write_buffer_size()
        if size == 0 or size < self.unsent or (self.queue and not self.write_paused):
            self.unsent_at = now
        self.unsent = size
        return now - self.unsent_at


class _Refused(asyncio.Protocol):
    """A connection over ProxyConfig.max_connections: a 503 with Retry-After, then closed.

    Its descriptor is held for at most a second (the answer, then a lingering close so that a
    request still arriving does not turn it into a reset); past a further bound of such
    connections, new ones are closed at once, so a flood cannot exhaust descriptors either."""

    _ERROR = ProxyError(
        503,
        "too many connections to this server; retry shortly",
        code="too_many_connections",
        retry_after=1,
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.timer: asyncio.TimerHandle | None = None
        # Counted from here (the factory's call, just before connection_made): a connection
        # the express lane hands over is counted before it is adopted.
        proxy.refused += 1
        proxy.refusing += 1
        proxy._tell_lane()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proxy = self.proxy
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if proxy.refusing > 64:
            transport.abort()
            return
        transport.write(error_response(self._ERROR, keep_alive=False))
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(1.0, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: the answer is already decided

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.refusing -= 1
        self.proxy._tell_lane()
        if self.timer is not None:
            self.timer.cancel()


# -- the upstream side -----------------------------------------------------------------------


class _UpstreamConn(asyncio.Protocol):
    """One pooled keep-alive connection to a llama-server; one request at a time."""

    def __init__(self, proxy: Proxy, key: tuple[str, str, int], generation: int) -> None:
        self.proxy = proxy
        self.key = key
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: _Exchange | None = None
        self.client: _ClientConn | None = None
        self.out: list[bytes] = []
        self.closed = False
        self.stamp = proxy.now
        self.wrapped: list[bytes] = []  # the body of a _WRAP answer, until it ends
        self._reset()

    def _reset(self) -> None:
        self.reason = b""
        #: The answer's fields as the client's head will have them (name, ": ", value, CRLF).
        self.hdrs: list[bytes] = []
        self.length = False  # it has a Content-Length
        self.status = 0
        self.framing = _NONE
        self.sse = False
        self.got_data = False
        self.head_sent = False
        self.done = False
        self.interim = False
        self.upstream_close = False
        self.renew_parser = False

    def send(self, ex: _Exchange) -> None:
        """Send the request of `ex` and route the response to its client."""
        assert self.transport is not None
        self._reset()
        self.ex = ex
        ex.conn = self
        client = ex.client
        self.client = client
        self.stamp = self.proxy.now
        if client.write_paused:
            self.transport.pause_reading()
        if len(ex.payload) == 1:
            self.transport.write(ex.payload[0])
        else:
            self.transport.writelines(ex.payload)

    def abort(self) -> None:
        """Drop the connection at once (the client left): llama-server notices and stops."""
        self.ex = None
        self.client = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def abort_with_failure(self) -> None:
        """Drop the connection and report it to the exchange as a transport failure."""
        if self.transport is not None:
            self.transport.abort()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes on an idle connection: nothing may be trusted on it any more.
            self.closed = True
            self.transport.abort()  # type: ignore[union-attr]
            return
        self.got_data = True
        self.stamp = self.proxy.now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(f"invalid response from the model server: {exc}")
            return
        out = self.out
        if out:
            if len(out) == 1:
                client.transport.write(out[0])
            else:
                client.transport.writelines(out)
            out.clear()
        if self.done:
            self._finish()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.ex
        if ex is None:
            self.proxy._pool_discard(self)
            return
        client = self.client
        assert client is not None
        if self.framing == _CLOSE and self.head_sent and not self.done:
            # A body delimited by the end of the connection ends here, normally.
            self.done = True
            self.upstream_close = True
            self._finish()
            return
        self.ex = None
        self.client = None
        if not self.got_data:
            client.upstream_failed(ex, retry=not ex.timed_out)
        elif not self.head_sent:
            ex.conn = None
            client.upstream_failed(ex, retry=False)
        else:
            self._died_mid_response(ex, client)

    # httptools callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        """Each field as it comes, already as the client's head will have it: one pass."""
        if self.head_sent:
            return  # a trailer field
        lname = name.lower()
        if lname in _RESP_SPECIAL:
            if lname == b"content-length":
                self.length = True
            elif lname == b"content-type":
                if value[:17].lower() == b"text/event-stream":
                    self.sse = True
            elif lname == b"connection":
                if b"close" in value.lower():
                    self.upstream_close = True
                return
            else:
                return
        self.hdrs += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            # Interim answers (1xx) are not forwarded: the proxy sends no Expect upstream.
            self.interim = True
            self.hdrs = []
            self.reason = b""
            self.length = self.sse = self.upstream_close = False
            return
        ex = self.ex
        assert ex is not None
        self.status = status
        ex.status = status
        if ex.early:
            # The client has its 200 SSE head (it waited for the model): only the body goes
            # on, in chunks; an error answer becomes an SSE error event.
            self.hdrs = []
            self.sse = True
            self.framing = _CHUNKED if status == 200 else _WRAP
            self.head_sent = True
            return
        parts = self.hdrs
        self.hdrs = []
        if ex.method == b"HEAD" or status == 204 or status == 304:
            self.framing = _NONE
            if ex.method == b"HEAD":
                # llhttp would wait for the announced body: end the message here, then start
                # the parser afresh for the next response on this connection.
                self.done = True
                self.renew_parser = True
                if not self.parser.should_keep_alive():
                    self.upstream_close = True
        elif self.length:
            self.framing = _LENGTH
        elif ex.http10:
            self.framing = _CLOSE
            ex.keep_alive = False
        else:
            self.framing = _CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not ex.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif ex.http10:
            parts.append(b"Connection: keep-alive\r\n")
        if self.sse:
            # SSE must reach the client as it is produced; tell an nginx in front as well.
            parts.append(b"X-Accel-Buffering: no\r\n")
        self.out.append(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, self.reason, b"".join(parts)))
        self.head_sent = True

    def on_body(self, data: bytes) -> None:
        if self.framing == _CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif self.framing == _WRAP:
            self.wrapped.append(data)
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.framing == _CHUNKED:
            self.out.append(b"0\r\n\r\n")
        elif self.framing == _WRAP:
            event = b"data: " + b"".join(self.wrapped).strip() + b"\n\n"
            self.wrapped = []
            self.out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        # llhttp answers this only inside the callback; after feed_data it says False.
        if not self.parser.should_keep_alive():
            self.upstream_close = True
        self.done = True

    # endings

    def _finish(self) -> None:
        """The whole response went to the client: pool the connection, go on."""
        ex = self.ex
        client = self.client
        assert ex is not None and client is not None
        self.ex = None
        self.client = None
        ex.conn = None
        if self.renew_parser:
            self.parser = httptools.HttpResponseParser(self)
        if self.upstream_close or self.framing == _CLOSE:
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        else:
            if client.write_paused:
                assert self.transport is not None
                self.transport.resume_reading()
            self.proxy._pool_put(self)
        client._release(ex, self.status)
        if self.framing == _CLOSE:
            ex.keep_alive = False
        client._done(ex)

    def _broken(self, message: str) -> None:
        """The upstream sent something that is not HTTP."""
        ex = self.ex
        client = self.client
        self.ex = None
        self.client = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if ex is None or client is None:
            return
        log.warning("%s", message)
        if not self.head_sent:
            ex.conn = None
            client._release(ex, 0)
            client._reply_error(ex, ProxyError(502, message))
        else:
            self._died_mid_response(ex, client)

    def _died_mid_response(self, ex: _Exchange, client: _ClientConn) -> None:
        """The upstream went away after the response head reached the client."""
        ex.conn = None
        client._release(ex, 0)
        if client.closed:
            return
        message = "the model server closed the connection in the middle of the response"
        if ex.timed_out:
            message = "the model server stopped sending in the middle of the response"
        if self.out:
            client.transport.writelines(self.out)
            self.out.clear()
        if self.sse and self.framing in (_CHUNKED, _CLOSE, _WRAP):
            # A stream that already started can only report the failure in-band, as
            # llama-server does: an error event, then a proper end of the stream.
            event = _sse_error_event(message)
            if self.framing != _CLOSE:
                client.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
                client._done(ex)
            else:
                client.transport.write(event)
                ex.keep_alive = False
                client._done(ex)
            return
        # Any other body: the client must see it cut short, so close its connection.
        ex.keep_alive = False
        client._done(ex)


# -- the proxy ---------------------------------------------------------------------------------


class Proxy:
    """The listening proxy: clients in, pooled connections to upstreams out."""

    def __init__(self, config: ProxyConfig, provider: UpstreamProvider) -> None:
        self.config = config
        self.provider = provider
        #: The provider's acquire without a coroutine, when it has one (UpstreamProvider).
        self._acquire_now = getattr(provider, "acquire_nowait", None)
        #: The provider's acquire by conversation, when it routes resumable streams itself
        #: (a fleet: `acquire_conversation(model, method, path, url, conv)`).
        self._acquire_conv = getattr(provider, "acquire_conversation", None)
        #: Requests sent on behalf of clients that left (_ClientConn._abandon).
        self._detached: set[asyncio.Task[None]] = set()
        self._closing = False
        keys = tuple(k.strip().encode() for k in (config.api_key or "").split(",") if k.strip())
        self._keys = keys
        #: Set when a key is required (the first key; the check compares with every one).
        self._key = keys[0] if keys else None
        self._servers: list[asyncio.AbstractServer] = []
        self._clients: set[_ClientConn] = set()
        #: Connections being turned away with a 503 (over max_connections).
        self.refusing = 0
        self.refused = 0
        self._hosts = config.host_names if not keys else None
        #: Host header values already judged: a dict lookup per request, bounded in size.
        self._hosts_seen: dict[bytes, bool] = {}
        self._idle: dict[tuple[str, str, int], list[_UpstreamConn]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._address: tuple[str, int] | None = None
        #: A coarse clock (updated every second) for idle and stall bounds: stamping activity
        #: costs an attribute copy rather than a clock read per read.
        self.now = 0.0
        self.requests = 0
        self.in_flight = 0
        #: The express lane (serve/express.py), while it runs.
        self._lane: express.Lane | None = None
        self._lane_ticker: asyncio.Task[None] | None = None
        self._adopting: set[asyncio.Task[None]] = set()

    def _host_ok(self, value: bytes) -> bool:
        ok = self._hosts_seen.get(value)
        if ok is None:
            assert self._hosts is not None
            ok = listen.host_allowed(value, self._hosts)
            if len(self._hosts_seen) < 1024:  # a client inventing names cannot grow it
                self._hosts_seen[value] = ok
        return ok

    def _new_connection(self) -> asyncio.Protocol:
        """The protocol for a connection just accepted: served, or over the bound refused."""
        bound = self.config.max_connections
        if bound:
            held = len(self._clients)
            if self._lane is not None:
                held += self._lane.stats()["connections"]
            if held >= bound:
                return _Refused(self)
        return _ClientConn(self)

    def _check_key(self, authz: bytes | None, xkey: bytes | None) -> bool:
        """Constant-time check of the key, read as llama-server reads it: `Authorization`
        (with or without "Bearer "), or `X-Api-Key` when Authorization is absent."""
        value = authz or xkey
        if value is None:
            return False
        if value[:7] == b"Bearer ":
            value = value[7:]
        ok = False
        for key in self._keys:  # every key, whichever matches: no early exit to time
            ok |= hmac.compare_digest(value, key)
        return ok

    async def start(
        self, sockets: list[socket.socket] | None = None, *, ssl: SSLContext | None = None
    ) -> None:
        """Listen on `sockets` (see listen.bind), else bind the configured address;
        ProxyBindError when the address is taken or cannot be used. With `ssl`, clients
        speak TLS (terminated here: upstreams stay plain HTTP on loopback)."""
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        config = self.config
        if sockets is None:
            sockets = listen.bind(config.host, config.port, config.backlog)
        tcp = [s.getsockname() for s in sockets if s.family != socket.AF_UNIX]
        name = tcp[0] if tcp else (sockets[0].getsockname(), 0)
        if ssl is None:
            sockets = self._start_lane(sockets)
        try:
            for sock in sockets:
                server: asyncio.AbstractServer
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(self._new_connection, sock=sock, ssl=ssl)
                else:
                    server = await loop.create_server(self._new_connection, sock=sock, ssl=ssl)
                self._servers.append(server)
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            self._close_lane()
            raise
        self._address = (str(name[0]), int(name[1]))
        self._ticker = loop.create_task(self._tick())

    # the express lane

    def _start_lane(self, sockets: list[socket.socket]) -> list[socket.socket]:
        """Give the TCP sockets to the express lane when it may run (a provider that can keep
        its routes: `attach_lane`); the sockets left for asyncio to serve."""
        attach = getattr(self.provider, "attach_lane", None)
        tcp = [s for s in sockets if s.family != socket.AF_UNIX]
        if not self.config.express or attach is None or not tcp:
            return sockets
        lib = express.library()
        if lib is None:
            return sockets
        config = self.config
        lane = express.Lane(
            lib,
            max_connections=config.max_connections,
            keepalive_timeout=config.keepalive_timeout,
            upstream_timeout=config.upstream_timeout,
            connect_timeout=config.connect_timeout,
            keys=self._keys,
            hosts_any=self._hosts is None,
        )
        for sock in tcp:
            lane.listen(sock.detach())
        lane.fold = self._fold
        lane.start()
        self._lane = lane
        loop = asyncio.get_running_loop()
        loop.add_reader(lane.notify_fd, self._lane_ready)
        self._lane_ticker = loop.create_task(self._lane_tick())
        attach(lane)
        log.info("%s", express.describe())
        return [s for s in sockets if s.family == socket.AF_UNIX]

    def _tell_lane(self) -> None:
        """The connections held here, for the lane's share of the bound."""
        if self._lane is not None:
            self._lane.python_connections(len(self._clients), self.refusing)

    def _fold(self, upstream: Upstream, status: int, elapsed: float) -> None:
        """One exchange the lane served, counted as if the Python proxy had."""
        self.requests += 1
        self.provider.note(upstream, status, elapsed)  # type: ignore[attr-defined]

    async def _lane_tick(self) -> None:
        lane = self._lane
        while lane is not None:
            await asyncio.sleep(0.1)
            lane.sync()

    def _lane_ready(self) -> None:
        """The lane handed connections over: adopt each with the bytes it read."""
        lane = self._lane
        if lane is None:
            return
        try:
            os.read(lane.notify_fd, 8)
        except BlockingIOError:
            pass
        loop = asyncio.get_running_loop()
        while True:
            taken = lane.take()
            if taken is None:
                return
            fd, reason, data = taken
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            if self._closing:
                sock.close()
                continue
            proto = self._new_connection()
            if isinstance(proto, _ClientConn):
                proto.preload = data
                proto.from_lane = reason != express.OTHER
            elif isinstance(proto, _Refused) and self.refusing > 64:
                proto.connection_lost(None)  # past the bound of refusals: closed at once
                sock.close()
                continue
            task = loop.create_task(self._adopt(proto, sock))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, proto: asyncio.Protocol, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: proto, sock)
        except (OSError, asyncio.CancelledError) as exc:
            sock.close()
            if isinstance(proto, _Refused):
                proto.connection_lost(None)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _give_back(self, client: _ClientConn, ex: _Exchange) -> None:
        """After the answer to a request the lane handed over because it had no route for it
        (or its llama-server failed it): teach the lane the route the provider now has for its
        model, when there is one, and hand the idle connection back. Otherwise the connection
        stays here (an unknown model, a model still loading: no ping-pong per request)."""
        lane = self._lane
        transport = client.transport
        if lane is None or self._closing or transport.get_write_buffer_size():
            return
        path = ex.url.partition(b"?")[0]
        if ex.method != b"POST" or path not in express.EXPRESS_PATHS or ex.conv is not None:
            return
        route = getattr(self.provider, "express_route", None)
        upstream = route(ex.model) if route is not None else None
        if (
            upstream is None
            or upstream.tls is not None
            or upstream.replicated
            or upstream.host_header is not None
        ):
            return
        if ex.host is not None and client.hosts is not None:
            if not self._host_ok(ex.host):
                return
            lane.allow_host(ex.host)
        if not lane.learn(ex.model, upstream):
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return
        if not lane.give(fd):
            os.close(fd)
            return
        client.closed = True
        client.ignore_input = True
        transport.abort()  # closes this side's descriptor only: the lane's copy lives on

    def _close_lane(self) -> None:
        lane, self._lane = self._lane, None
        if lane is None:
            return
        if self._lane_ticker is not None:
            self._lane_ticker.cancel()
            self._lane_ticker = None
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(lane.notify_fd)
        lane.sync()
        detach = getattr(self.provider, "attach_lane", None)
        if detach is not None:
            detach(None)
        lane.close()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is real even when 0 was asked for."""
        if self._address is None:
            raise RuntimeError("the proxy is not started")
        return self._address

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters (the express lane's included)."""
        lane = self._lane.stats() if self._lane is not None else {}
        if self._lane is not None:
            self._lane.sync()
        return ProxyStats(
            requests=self.requests,
            in_flight=self.in_flight + lane.get("in_flight", 0),
            connections=len(self._clients) + lane.get("connections", 0),
            upstream_idle=sum(len(v) for v in self._idle.values()),
        )

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, let requests in flight finish (up to `grace` s), close everything."""
        self._closing = True
        for server in self._servers:
            server.close()
        lane = self._lane
        if lane is not None:
            lane.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and (
            self.in_flight > 0 or (lane is not None and lane.stats()["in_flight"] > 0)
        ):
            await asyncio.sleep(0.05)
        self._close_lane()
        for task in list(self._adopting):
            task.cancel()
        for client in list(self._clients):
            client.transport.abort()
        for conns in self._idle.values():
            for conn in conns:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
        for task in list(self._detached):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            self.now = now = loop.time()
            for client in list(self._clients):
                client.check_timeouts(now)

    def _send_detached(self, payload: list[bytes], upstream: Upstream) -> None:
        """Send a request whose client has gone, on a connection of its own, and drop the
        answer once its status line is in: the llama-server keeps generating into the
        conversation's stream session, which a resume reads."""
        if self._closing:
            self.provider.release(upstream, 499)
            return
        task = asyncio.get_running_loop().create_task(self._deliver(payload, upstream))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _deliver(self, payload: list[bytes], upstream: Upstream) -> None:
        status = 0
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(upstream.host, upstream.port, ssl=upstream.tls),
                self.config.connect_timeout,
            )
            writer.writelines(payload)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.config.upstream_timeout)
            parts = line.split(b" ", 2)
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
        except (OSError, ValueError, asyncio.TimeoutError):
            pass  # nobody waits for this answer: the outcome is all that is kept
        finally:
            if writer is not None:
                writer.close()
            self.provider.release(upstream, status)

    # the pool

    async def _connect(self, upstream: Upstream) -> _UpstreamConn:
        loop = asyncio.get_running_loop()
        key = (upstream.name, upstream.host, upstream.port)
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: _UpstreamConn(self, key, upstream.generation),
                upstream.host,
                upstream.port,
                ssl=upstream.tls,
                server_hostname=upstream.host if upstream.tls is not None else None,
            ),
            self.config.connect_timeout,
        )
        return conn

    def _pool_get(self, upstream: Upstream) -> _UpstreamConn | None:
        conns = self._idle.get((upstream.name, upstream.host, upstream.port))
        while conns:
            conn = conns.pop()
            if conn.generation == upstream.generation and not conn.closed:
                return conn
            # An older generation belongs to a server that was restarted.
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        return None

    def _pool_put(self, conn: _UpstreamConn) -> None:
        if conn.closed:
            return
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self.config.max_idle_per_upstream:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            return
        conns.append(conn)

    def _pool_discard(self, conn: _UpstreamConn) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
