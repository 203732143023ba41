"""The proxy's express lane (serve/express.c): what it serves itself, what it hands to the
Python proxy, and that both answer alike; against the fake llama-server and a raw HTTP upstream
that echoes what it got, framed as each request asks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.proxyharness import ProxyThread, StaticProvider, error_of, fake_server, request

from llamactl.serve import express, listen
from llamactl.serve.proxy import ProxyConfig, Upstream

pytestmark = [pytest.mark.fake, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def _lane_library(llamactl_home: Path) -> None:
    # Built into the test's temporary cache (the conftest's home), once per process.
    if express.library() is None:
        pytest.skip("the express lane cannot be built here (no C compiler, or not Linux)")


# -- a provider that teaches the lane, a raw upstream, helpers -----------------------------------


class LaneProvider(StaticProvider):
    """Upstreams by model name, handed out without waiting; records what the proxy asks."""

    def __init__(self, routes: dict[str | None, Upstream]) -> None:
        super().__init__(next(iter(routes.values())))
        self.routes = routes
        #: The model of every acquire_nowait: one per request the Python proxy routed.
        self.nowait: list[str | None] = []
        self.notes: list[tuple[Upstream, int, float]] = []
        self.lane: express.Lane | None = None

    def acquire_nowait(self, model: str | None, method: bytes, path: bytes) -> Upstream:
        self.nowait.append(model)
        return self.routes.get(model, self.upstream)

    def express_route(self, model: str | None) -> Upstream | None:
        """The route the proxy teaches the lane after a handed-over request (no lease)."""
        return self.routes.get(model, self.upstream)

    def attach_lane(self, lane: express.Lane | None) -> None:
        self.lane = lane

    def note(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        self.notes.append((upstream, outcome, elapsed))


class Rig:
    """A proxy with its lane and its provider; the lane is called on the proxy's loop."""

    def __init__(self, pt: ProxyThread, provider: LaneProvider) -> None:
        self.pt, self.provider, self.port = pt, provider, pt.port

    def on_lane(self, method: str) -> Any:
        return self.pt.call(getattr(self.provider.lane, method))

    def stats(self) -> dict[str, int]:
        return self.on_lane("stats")  # type: ignore[no-any-return]

    def counts(self) -> tuple[int, int]:
        """(requests the lane served, requests the Python proxy routed)."""
        return self.stats()["requests"], len(self.provider.nowait)

    def teach(
        self, body: bytes | dict[str, Any] = b"{}", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """A request through Python, which teaches the lane after the answer (the client may
        be quicker: ctypes calls let go of the GIL), then hands the connection back; waits
        for that, and for the lane to close it, so that counts are settled."""
        taken_back = self.stats()["taken_back"]
        answer = post(self.port, body, headers)
        self.settle(taken_back + 1)
        return answer

    def settle(self, taken_back: int) -> None:
        def settled() -> bool:
            stats = self.stats()
            return stats["taken_back"] == taken_back and stats["connections"] == 0

        wait_for(settled, f"{taken_back} connections back in the lane, then closed")

    def noted(self, n: int) -> list[int]:
        """The outcomes the provider was told of, once there are `n` (the lane journals an
        exchange just after the client has its last byte)."""

        def done() -> bool:
            self.on_lane("sync")
            return len(self.provider.notes) >= n

        wait_for(done, f"{n} exchanges noted")
        return [outcome for _, outcome, _ in self.provider.notes]


@contextlib.contextmanager
def lane_proxy(routes: dict[str | None, Upstream], **config: Any) -> Iterator[Rig]:
    provider = LaneProvider(routes)
    pt = ProxyThread(ProxyConfig(host="127.0.0.1", port=0, **config), provider)
    try:
        assert (provider.lane is not None) == config.get("express", True)
        yield Rig(pt, provider)
    finally:
        pt.close()


class RawUpstream:
    """A small HTTP/1.1 server on its own loop in a thread: answers any request with a JSON echo
    of what it got (its name, method, target, header fields in order, body), framed as the
    request's X-Respond asks (see `answer`)."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}
        coro = asyncio.start_server(self._serve, "127.0.0.1", port)
        self.server = asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)
        self.upstream = Upstream(name, "127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers[writer] = asyncio.current_task()  # type: ignore[assignment]
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")[:-2]
                method, target, _ = lines[0].split(" ", 2)
                fields = [[p.strip() for p in line.split(":", 1)] for line in lines[1:]]
                field = {k.lower(): v for k, v in fields}
                body = await reader.readexactly(int(field.get("content-length", "0")))
                text = body.decode("latin-1")
                seen = dict(
                    server=self.name, method=method, target=target, headers=fields, body=text
                )
                self.seen.append(seen)
                mode = field.get("x-respond", "length")
                if not await answer(writer, mode, json.dumps(seen).encode()):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self.writers.pop(writer, None)
            writer.close()

    def stop(self) -> None:
        async def down() -> None:
            self.server.close()
            tasks = list(self.writers.values())
            for writer in list(self.writers):
                writer.close()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def chunked(payload: bytes, trailer: bytes = b"X-Trailer: t\r\n") -> bytes:
    parts = [payload[i : i + 10] for i in range(0, len(payload), 10)]
    first = b"%x;ext=1\r\n%s\r\n" % (len(parts[0]), parts[0])
    rest = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts[1:])
    return first + rest + b"0\r\n" + trailer + b"\r\n"


def sse_events(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\ndata: [DONE]\n\n"


async def answer(writer: asyncio.StreamWriter, mode: str, payload: bytes) -> bool:
    """Write the answer framed as `mode` says; False when the connection is to end after it."""
    ok, n = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", len(payload)
    data = {
        "chunked": ok + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(payload),
        "sse": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"X-Accel-Buffering: yes\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(sse_events(payload), b""),
        "close": ok + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (n, payload),
        "eof": ok + b"\r\n" + payload,  # no framing: the end of the connection ends it
        "die": ok + b"Content-Length: %d\r\n\r\n%s" % (n + 100, payload),
        "empty": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    }.get(mode, ok + b"Content-Length: %d\r\n\r\n%s" % (n, payload))
    if mode == "split":  # the head, then the body a moment later (in a read of its own)
        writer.write(data[:-n])
        await writer.drain()
        await asyncio.sleep(0.05)
        data = payload
    writer.write(data)
    await writer.drain()
    return mode not in ("close", "eof", "die")


@pytest.fixture
def raw() -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(name: str, port: int = 0) -> RawUpstream:
        made.append(RawUpstream(name, port))
        return made[-1]

    yield make
    for server in made:
        if not server.loop.is_closed():
            server.stop()


@pytest.fixture(scope="module")
def fake_port() -> Iterator[int]:
    with fake_server() as port:
        yield port


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def post(
    port: int, body: Any, headers: dict[str, str] | None = None, path: str = "/tokenize"
) -> Any:
    """(status, fields, body) of a POST with a JSON body (bytes as they are)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(port, "POST", path, data, headers)


def echoed(port: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    status, _, data = post(port, body, headers)
    assert status == 200, data
    return json.loads(data)


def http_request(path: str, body: bytes, fields: bytes = b"Host: x\r\n") -> bytes:
    head = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (path.encode(), fields, len(body))
    return head + body


def read_head(f: BinaryIO) -> tuple[int, list[tuple[str, str]]]:
    """A response's status and fields (lower-case names), interim answers skipped."""
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed before an answer")
        fields = []
        while (field := f.readline()) not in (b"\r\n", b""):
            name, _, value = field.decode("latin-1").partition(":")
            fields.append((name.strip().lower(), value.strip()))
        if int(line.split()[1]) >= 200:
            return int(line.split()[1]), fields


def read_response(f: BinaryIO) -> tuple[int, list[tuple[str, str]], bytes]:
    """One response from a buffered socket file: status, fields, body (unchunked)."""
    status, fields = read_head(f)
    field = dict(fields)
    if "content-length" in field:
        return status, fields, f.read(int(field["content-length"]))
    if field.get("transfer-encoding") != "chunked":
        return status, fields, f.read()
    parts = []
    while size := int(f.readline().split(b";")[0], 16):
        parts.append(f.read(size))
        f.readline()
    while f.readline() not in (b"\r\n", b""):
        pass
    return status, fields, b"".join(parts)


@contextlib.contextmanager
def client(port: int) -> Iterator[tuple[socket.socket, BinaryIO]]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        sock.makefile("rb") as f,
    ):
        yield sock, f


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


# -- the first request teaches the lane, the rest take it ----------------------------------------


def test_the_first_request_teaches_the_lane_until_cleared(fake_port: int) -> None:
    up = Upstream("a", "127.0.0.1", fake_port, None, 1)
    body = json.dumps({"model": "m", "content": "hello wide world"}).encode()
    direct = post(fake_port, body)
    assert direct[0] == 200
    with lane_proxy({"m": up}) as rig:
        conn = http.client.HTTPConnection("127.0.0.1", rig.port, timeout=10)
        answers, socks = [], []
        for _ in range(3):
            conn.request("POST", "/tokenize", body)
            resp = conn.getresponse()
            answers.append((resp.status, resp.read()))
            socks.append(conn.sock)
        conn.close()
        assert socks[0] is socks[1] is socks[2]  # one connection throughout
        assert answers == [(200, direct[2])] * 3  # the Python path's body, then the lane's
        assert rig.provider.nowait == ["m"]  # only the first went through Python
        stats = rig.stats()
        assert (stats["handed"], stats["taken_back"], stats["requests"]) == (1, 1, 2)
        for _ in range(3):  # new connections: the lane from the start
            assert post(rig.port, body)[::2] == (200, direct[2])
        assert rig.counts() == (5, 1)
        assert rig.noted(5) == [200] * 5
        assert all(u == up and elapsed > 0 for u, _, elapsed in rig.provider.notes)
        assert rig.provider.releases == [200]  # the Python path's one lease
        assert rig.pt.call(lambda: rig.pt.proxy.stats).requests == 6
        rig.on_lane("clear")  # the provider's state changed: Python routes again, and teaches
        assert rig.teach(body)[::2] == (200, direct[2])
        for _ in range(2):
            assert post(rig.port, body)[::2] == (200, direct[2])
        assert rig.counts() == (7, 2)


def test_requests_the_lane_does_not_take_go_to_python_and_stay_there(
    raw: Callable[..., RawUpstream],
) -> None:
    srv = raw("a")
    big = b'{"content": "%s"}' % (b"x" * (256 * 1024))
    plain = http_request("/tokenize", b"{}")  # one the lane serves, on its own connection
    with lane_proxy({None: srv.upstream}) as rig:
        rig.teach()
        taken_back = rig.stats()["taken_back"]
        for data in (
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            http_request("/tokenize", b"{}", b"Host: x\r\nX-Conversation-Id: c1\r\n"),
            http_request("/tokenize", b"{}", b"Host: x\r\nExpect: 100-continue\r\n"),
            http_request("/tokenize", b"{}", b"Host: x\r\nConnection: keep-alive, X-Hop\r\n"),
            http_request("/tokenize", b"{}", b"Host: x\r\nX-Long: %s\r\n" % (b"y" * 17000)),
            http_request("/tokenize", big),
            http_request("/tokenize?x=1", b"{}"),
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n",
            http_request("/tokenize", b"{}", b"Host: x\r\nConnection: close\r\n"),
            http_request("/tokenize", b"{}", b"").replace(b"HTTP/1.1", b"HTTP/1.0"),
        ):
            lane, python = rig.counts()
            with client(rig.port) as (sock, f):
                sock.sendall(data)
                status, fields, body = read_response(f)
                assert status == 200 and rig.counts() == (lane, python + 1), data[:80]
                assert json.loads(body)["body"] in ("{}", "", big.decode())
                if ("connection", "close") not in fields:  # the connection stays with Python
                    for _ in range(2):
                        sock.sendall(plain)
                        assert read_response(f)[0] == 200
                    assert rig.counts() == (lane, python + 3), data[:80]
        assert rig.stats()["taken_back"] == taken_back
        assert rig.stats()["handed"] == 11 and rig.counts()[0] == 0


# -- the request llama-server sees ---------------------------------------------------------------


def test_the_lane_sends_upstream_what_python_sends(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    up = Upstream("a", "127.0.0.1", srv.upstream.port, b"Bearer private", 1)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "h\xc3\xa9"}]}'
    fields = (
        b"X-First: 1\r\nAuthorization: Bearer client\r\nHost: localhost:1234\r\n"
        b"X-Api-Key: client-key\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"X-Dup: a\r\nContent-Type: application/json\r\nX-Dup:   b  \r\n"
    )
    with lane_proxy({"m": up}) as rig, client(rig.port) as (sock, f):
        got = []
        for _ in range(2):  # through Python (it teaches the lane), then through the lane
            sock.sendall(http_request("/apply-template", body, fields))
            status, _, data = read_response(f)
            assert status == 200
            got.append(json.loads(data))
        assert rig.counts() == (1, 1)
    python, lane = got
    assert lane == python
    assert lane["method"] == "POST" and lane["target"] == "/apply-template"
    assert lane["body"].encode("latin-1") == body
    assert [": ".join(field) for field in lane["headers"]] == [
        *("X-First: 1", "X-Dup: a", "Content-Type: application/json", "X-Dup: b"),
        *("Host: localhost:1234", "Authorization: Bearer private", f"Content-Length: {len(body)}"),
    ]


# -- the answer's framings -----------------------------------------------------------------------


def test_response_framings_reach_the_client_whole(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}) as rig:
        rig.teach()

        def ask(sock: socket.socket, mode: bytes) -> None:
            sock.sendall(http_request("/tokenize", b"{}", b"Host: x\r\nX-Respond: %s\r\n" % mode))

        def echo() -> bytes:
            return json.dumps(srv.seen[-1]).encode()

        with client(rig.port) as (sock, f):
            # Chunked: relayed verbatim (extension, trailer), with the lane's own framing field.
            ask(sock, b"chunked")
            status, fields = read_head(f)
            assert status == 200 and ("transfer-encoding", "chunked") in fields
            assert f.read(len(chunked(echo()))) == chunked(echo())
            # SSE: one X-Accel-Buffering, the lane's own.
            ask(sock, b"sse")
            status, fields, data = read_response(f)
            assert [v for k, v in fields if k == "x-accel-buffering"] == ["no"]
            assert data == sse_events(echo())
            # llama-server closes after its answer: the client's connection goes on.
            for mode in (b"close", b"length", b"close"):
                ask(sock, mode)
                status, fields, data = read_response(f)
                assert (status, data) == (200, echo()) and "connection" not in dict(fields)
            # No framing at all: the whole body, then the client's connection ends too.
            ask(sock, b"eof")
            status, fields, data = read_response(f)
            assert (status, data) == (200, echo())
            assert ("connection", "close") in fields and "transfer-encoding" not in dict(fields)
        assert rig.counts() == (6, 1)
        # llama-server dies in the middle of the body: the client sees it cut short.
        conn = http.client.HTTPConnection("127.0.0.1", rig.port, timeout=10)
        conn.request("POST", "/tokenize", b"{}", {"X-Respond": "die"})
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        assert post(rig.port, b"{}")[0] == 200  # and the others are served
        assert rig.counts() == (8, 1)
        assert sorted(rig.noted(8)) == [0] + [200] * 7


def test_an_empty_answer_ends_its_exchange(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}, upstream_timeout=5.0) as rig:
        rig.teach()
        with client(rig.port) as (sock, f):
            sock.settimeout(2.0)  # the answers are at hand: a working lane answers at once
            for _ in range(2):
                sock.sendall(http_request("/tokenize", b"{}", b"Host: x\r\nX-Respond: empty\r\n"))
                assert read_response(f) == (200, [("content-length", "0")], b"")
        assert rig.counts() == (2, 1) and rig.stats()["in_flight"] == 0


# -- an upstream that is gone --------------------------------------------------------------------


def test_an_unreachable_upstream_hands_the_request_to_python(
    raw: Callable[..., RawUpstream],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("llamactl.serve.proxy.REQUEUE_S", 0.3)
    srv = raw("a")
    with lane_proxy({None: srv.upstream}) as rig:
        assert rig.teach()[0] == 200
        assert post(rig.port, b"{}")[0] == 200  # served by the lane: a pooled connection stays
        assert rig.counts() == (1, 1)
        srv.stop()
        handed = rig.stats()["handed"]
        for _ in range(2):
            status, _, data = post(rig.port, {"content": "a"})
            assert status == 502 and error_of(data)["type"] == "server_error"
        assert rig.stats()["handed"] == handed + 2
        assert len(rig.provider.nowait) > 2 and set(rig.provider.releases) == {200, 0}
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]


def test_a_failed_upstream_never_routes_another_name_to_a_new_upstream(
    raw: Callable[..., RawUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llamactl.serve.proxy.REQUEUE_S", 0.3)
    a, b = raw("a"), raw("b")
    with lane_proxy({"a": a.upstream, "a2": a.upstream, "b": b.upstream}) as rig:
        assert rig.teach({"model": "a"})[0] == 200
        assert echoed(rig.port, {"model": "a"})["server"] == "a"  # in the lane
        a.stop()
        assert rig.teach({"model": "a"})[0] == 502  # the lane's FAILED, then Python's 502
        rig.noted(1)  # the dead slot's records drained: xl_upstream may take it again
        wait_for(lambda: rig.stats()["in_flight"] == 0, "no exchange in flight")
        assert rig.teach({"model": "b"})[0] == 200  # b: a new upstream, a slot for it
        for _ in range(5):  # a2 is a's: Python answers 502, and the lane must not answer 200
            status, _, data = post(rig.port, {"model": "a2"})
            assert status == 502, data


def test_a_route_dropped_by_the_lane_is_taught_again(
    raw: Callable[..., RawUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llamactl.serve.proxy.REQUEUE_S", 0.3)
    srv = raw("a")
    with lane_proxy({None: srv.upstream}) as rig:
        assert rig.teach()[0] == 200
        srv.stop()
        assert rig.teach()[0] == 502  # the lane's FAILED, Python's 502; the connection back
        raw("a", srv.upstream.port)  # the same llama-server again, no change of state seen
        handed, served = rig.stats()["handed"], rig.stats()["requests"]
        with client(rig.port) as (sock, f):
            for _ in range(4):
                sock.sendall(http_request("/tokenize", b"{}"))
                assert read_response(f)[0] == 200
        # Taught again (after the 502 already, or after one more handoff), then the lane's:
        # never a handoff per request.
        assert rig.stats()["handed"] <= handed + 1
        assert rig.stats()["requests"] >= served + 3


# -- the key and the Host guard ------------------------------------------------------------------


def test_api_key_checked_by_the_lane_as_by_python(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}, api_key="k1") as rig:
        status, hdrs, data = post(rig.port, {"content": "a"})
        assert status == 401 and hdrs["www-authenticate"] == "Bearer"
        assert error_of(data)["type"] == "authentication_error"
        assert rig.counts() == (0, 0) and rig.stats()["handed"] == 1
        good = ({"Authorization": "Bearer k1"}, {"X-Api-Key": "k1"}, {"Authorization": "k1"})
        assert rig.teach(b"{}", good[0])[0] == 200
        for headers in good * 2:
            assert post(rig.port, {"content": "a"}, headers)[0] == 200
        assert rig.counts() == (6, 1)  # taught by the first, the rest in the lane
        for headers in (
            {},
            {"Authorization": "Bearer k2"},
            {"X-Api-Key": "k1k1"},
            {"Authorization": "bearer k1"},
            {"Authorization": "Bearer wrong", "X-Api-Key": "k1"},  # Authorization wins
        ):
            assert post(rig.port, {"content": "a"}, headers)[0] == 401, headers
        assert rig.counts() == (6, 1) and len(srv.seen) == 7
        for seen in srv.seen:
            assert not {k.lower() for k, _ in seen["headers"]} & {"authorization", "x-api-key"}


def test_the_lane_serves_only_hosts_python_approved(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    names = listen.guarded_names("127.0.0.1", ())
    assert names is not None and not listen.host_allowed(b"evil.example", names)
    with lane_proxy({None: srv.upstream}, host_names=names) as rig:
        evil = {"Host": "evil.example"}
        for _ in range(2):
            status, _, data = post(rig.port, {"content": "a"}, evil)
            assert status == 403 and error_of(data)["code"] == "host_not_allowed"
        assert rig.counts() == (0, 0) and srv.seen == []
        local = {"Host": f"localhost:{rig.port}"}
        assert rig.teach(b"{}", local)[0] == 200
        for _ in range(2):
            assert post(rig.port, {"content": "a"}, local)[0] == 200
        assert rig.counts() == (2, 1)
        assert post(rig.port, {"content": "a"}, evil)[0] == 403
        assert rig.counts() == (2, 1) and len(srv.seen) == 3
        ip = {"Host": "127.0.0.1"}  # another good name: approved by Python first
        assert rig.teach(b"{}", ip)[0] == 200 and post(rig.port, b"{}", ip)[0] == 200
        assert rig.counts() == (3, 2)


# -- bodies and routes ---------------------------------------------------------------------------


def test_bodies_the_lane_may_not_judge_go_to_python(raw: Callable[..., RawUpstream]) -> None:
    a, b = raw("a"), raw("b")
    with lane_proxy({None: a.upstream, "a": a.upstream, "b": b.upstream}) as rig:
        for model in (None, "a", "b"):
            assert json.loads(rig.teach({"model": model})[2])["server"] == (model or "a")
        assert rig.counts() == (0, 3)
        # Two names, two upstreams; "model": null is no model.
        assert echoed(rig.port, {"model": "b", "x": [1, {"model": 5}]})["server"] == "b"
        assert echoed(rig.port, {"model": "a"})["server"] == "a"
        assert echoed(rig.port, {"content": "x", "model": None})["server"] == "a"
        assert rig.counts() == (3, 3)
        seen = len(a.seen) + len(b.seen)
        for body, code in (
            (b'{"model": "a",', "invalid_json"),
            (b'{"model": "a"} {}', "invalid_json"),
            (b'{"model": NaN}', "invalid_json"),
            (b"[1, 2]", "invalid_body"),
            (b'"text"', "invalid_body"),
            (b'{"model": "\xff"}', "invalid_body"),
            (b'{"model": 5}', "invalid_model"),
            (b'{"model": ["a"]}', "invalid_model"),
        ):
            status, _, data = post(rig.port, body)
            assert status == 400 and error_of(data)["code"] == code, body
        assert rig.counts() == (3, 3) and len(a.seen) + len(b.seen) == seen
        # Escapes the lane does not decode: Python reads them, as llama-server would.
        for body in (b'{"mod\\u0065l": "b"}', b'{"model": "\\u0062"}'):
            assert echoed(rig.port, body)["server"] == "b", body
        assert rig.counts() == (3, 5) and rig.provider.nowait[-2:] == ["b", "b"]
        # A repeated key: the last one counts, in the lane as in Python's json.
        assert echoed(rig.port, b'{"model": "a", "model": "b"}')["server"] == "b"
        assert echoed(rig.port, b'{"model": "b", "model": null}')["server"] == "a"
        assert rig.counts() == (5, 5)


# -- pipelining and slow clients -----------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}) as rig:
        split = b"Host: x\r\nX-Respond: split\r\n"
        burst = http_request("/tokenize", b'{"n": 1}', split) + http_request("/detokenize", b"{}")
        for expected in ((0, 2), (2, 2)):  # both through Python (nothing taught), then the lane
            with client(rig.port) as (sock, f):
                sock.sendall(burst)
                first, second = read_response(f), read_response(f)
            assert (first[0], second[0]) == (200, 200)
            assert json.loads(first[2])["body"] == '{"n": 1}'
            assert json.loads(second[2])["target"] == "/detokenize"  # after the first's body
            assert rig.counts() == expected
            rig.settle(1)  # the first connection back in the lane once Python has answered
        # The lane serves the first, then hands the rest to Python, bytes and all.
        with client(rig.port) as (sock, f):
            sock.sendall(
                http_request("/tokenize", b'{"n": 3}')
                + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                + http_request("/tokenize", b'{"n": 4}')
            )
            answers = [json.loads(read_response(f)[2]) for _ in range(3)]
        assert [a["body"] for a in answers] == ['{"n": 3}', "", '{"n": 4}']
        assert answers[1]["target"] == "/health"
        assert rig.counts() == (3, 4)


def test_a_request_trickling_in_is_answered_through_python(
    raw: Callable[..., RawUpstream],
) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}) as rig:
        rig.teach()
        handed = rig.stats()["handed"]
        data = http_request("/tokenize", b'{"content": "slow"}')
        with client(rig.port) as (sock, f):
            sock.sendall(data[:20])
            # The lane gives a request still arriving after a second to Python.
            wait_for(lambda: rig.stats()["handed"] == handed + 1, "the slow request's handoff")
            for i in range(20, len(data), 10):
                sock.sendall(data[i : i + 10])
            status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["body"] == '{"content": "slow"}'
        assert rig.counts() == (0, 2)


# -- the bound on connections --------------------------------------------------------------------


def test_connections_over_the_bound_get_503(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}, max_connections=2) as rig:
        rig.teach()
        with client(rig.port) as (s1, f1), client(rig.port):
            wait_for(lambda: rig.stats()["connections"] == 2, "two connections in the lane")
            status, hdrs, data = post(rig.port, {"content": "a"})
            assert status == 503 and hdrs["retry-after"] == "1"
            assert error_of(data)["code"] == "too_many_connections"
            s1.sendall(http_request("/tokenize", b"{}"))
            assert read_response(f1)[0] == 200  # the held ones are served
        wait_for(lambda: rig.stats()["connections"] == 0, "the held connections closed")
        assert post(rig.port, {"content": "a"})[0] == 200
        assert rig.counts() == (2, 1)


def test_the_bound_counts_connections_held_by_python(raw: Callable[..., RawUpstream]) -> None:
    srv = raw("a")
    with lane_proxy({None: srv.upstream}, max_connections=2) as rig:
        rig.teach()
        with client(rig.port) as (s1, f1), client(rig.port) as (s2, f2):
            for sock, f in ((s1, f1), (s2, f2)):  # two connections the Python proxy serves
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(f)[0] == 200
            assert rig.pt.call(lambda: len(rig.pt.proxy._clients)) == 2
            assert post(rig.port, {"content": "a"})[0] == 503


# -- closing -------------------------------------------------------------------------------------


def tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))  # this process's threads, the lane's included


def descriptors() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_close_ends_the_lane_thread_and_leaks_no_descriptor(fake_port: int) -> None:
    up = Upstream("a", "127.0.0.1", fake_port, None, 1)
    with lane_proxy({None: up}) as rig:  # warm-up: whatever a first proxy starts for good
        assert rig.teach()[0] == 200
    # (A thread joined by Python may still be listed for a moment: threads are told by id.)
    threads, fds = tasks(), descriptors()
    pt = ProxyThread(ProxyConfig(host="127.0.0.1", port=0), LaneProvider({None: up}))
    started = tasks() - threads
    with client(pt.port) as (s1, f1), client(pt.port) as (s2, f2):
        try:
            for _ in range(2):
                assert post(pt.port, {"content": "a"})[0] == 200
            s1.sendall(http_request("/tokenize", b"{}"))  # then idle, in the lane
            assert read_response(f1)[0] == 200
            s2.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # then idle, in Python
            assert read_response(f2)[0] == 200
            assert len(started) == 2  # the proxy's loop and the lane
        finally:
            pt.close()
        assert closed(s1) and closed(s2)
    # Exact: every descriptor the proxy and its lane opened is theirs to close (this test's
    # client sockets are closed by now; the fake server is another process).
    wait_for(lambda: not started & tasks(), "the lane's thread to end")
    assert descriptors() == fds


# -- the lane answers as the Python proxy does ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def test_random_bodies_get_the_same_answer_with_and_without_the_lane(
    raw: Callable[..., RawUpstream],
) -> None:
    a, b = raw("a"), raw("b")
    routes = {None: a.upstream, "a": a.upstream, "b": b.upstream}
    with lane_proxy(routes) as lane, lane_proxy(routes, express=False) as plain:

        @settings(max_examples=100, deadline=None, database=None)
        @given(
            st.dictionaries(st.text(max_size=8), json_values, max_size=5),
            st.sampled_from(["a", "b", None] * 3 + ["c", 5, ["a"], "", "\u00e9"]),
            st.booleans(),
            st.sampled_from([0] * 4 + [1, 2]),
        )
        def same(obj: dict[str, Any], model: Any, ascii_only: bool, cut: int) -> None:
            # (Infinity from the floats is invalid JSON, as NaN would be; so is a cut body.)
            body = json.dumps({**obj, "model": model}, ensure_ascii=ascii_only).encode()
            body = body[: len(body) - cut]
            for path in ("/tokenize", "/apply-template"):
                got = [post(rig.port, body, {"Host": "x"}, path) for rig in (plain, lane, lane)]
                assert got[0][::2] == got[1][::2] == got[2][::2], body

        same()
        assert lane.counts()[0] > 0 and plain.provider.lane is None
