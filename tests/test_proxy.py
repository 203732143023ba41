"""The proxy in front of llama-server, driven against the fake server (and, marked `real`,
against the real one)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.proxyharness import (
    ProxyThread,
    StaticProvider,
    error_of,
    fake_server,
    raw_exchange,
    request,
    running_proxy,
)

from llamactl.net import free_port
from llamactl.serve import proxy as proxy_mod
from llamactl.serve.proxy import (
    Proxy,
    ProxyBindError,
    ProxyConfig,
    ProxyError,
    Upstream,
)

pytestmark = [pytest.mark.fake, pytest.mark.timeout(60)]


# -- fixtures: the fake llama-server, a provider, the proxy in a thread --------------------------


@pytest.fixture(scope="module")
def fake_port() -> Iterator[int]:
    with fake_server() as port:
        yield port


@pytest.fixture
def px(fake_port: int) -> Iterator[ProxyThread]:
    with running_proxy(fake_port) as pt:
        yield pt


def echo(port: int, method: str = "POST", **kw: Any) -> dict[str, Any]:
    status, _, data = request(port, method, "/debug/echo", **kw)
    assert status == 200, data
    return json.loads(data)  # type: ignore[no-any-return]


def header_names(echoed: dict[str, Any]) -> list[str]:
    return [k.lower() for k, _ in echoed["headers"]]


# (the pure HTTP rules: tests/test_http_rules.py)


# -- forwarding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_forwards_method_path_query_headers_and_body(px: ProxyThread, method: str) -> None:
    body = json.dumps({"model": "m1", "text": "héllo"}).encode() if method != "GET" else None
    got = echo(
        px.port,
        method,
        body=body,
        headers={
            "X-Custom": "a b",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Content-Type": "application/json",
        },
    )
    assert got["method"] == method
    assert dict((k.lower(), v) for k, v in got["headers"])["x-custom"] == "a b"
    names = header_names(got)
    # Hop-by-hop headers do not cross the proxy.
    assert "connection" not in names and "keep-alive" not in names and "x-hop" not in names
    if body is not None:
        import base64

        assert base64.b64decode(got["body_b64"]) == body
    status, _, _ = request(px.port, method, "/debug/echo?a=1&b=%20x", body=body)
    assert status == 200


def test_path_and_query_reach_upstream_unchanged(px: ProxyThread) -> None:
    status, _, data = request(px.port, "GET", "/debug/echo?a=1&b=%20x&model=q")
    assert status == 200
    assert json.loads(data)["target"] == "/debug/echo?a=1&b=%20x&model=q"
    # GET requests route by ?model=, as llama-server's router mode reads it.
    assert px.provider.models[-1] == "q"


def test_model_field_routes_request(px: ProxyThread) -> None:
    status, _, _ = request(px.port, "POST", "/tokenize", b'{"model": "smol", "content": "a b"}')
    assert status == 200
    assert px.provider.models[-1] == "smol"
    assert px.provider.releases[-1] == 200


def test_chunked_request_body_is_forwarded_whole(px: ProxyThread) -> None:
    body = b'{"content": "one two three four"}'
    parts = [body[:5], body[5:17], body[17:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    raw = raw_exchange(
        px.port,
        b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunked,
    )
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    got = json.loads(payload)
    import base64

    assert base64.b64decode(got["body_b64"]) == body
    names = header_names(got)
    assert "transfer-encoding" not in names and "content-length" in names


def test_keep_alive_reuses_one_upstream_connection(px: ProxyThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
    for _ in range(5):
        conn.request("POST", "/tokenize", body=b'{"content": "x y"}')
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    assert px.call(lambda: px.proxy.stats.upstream_idle) == 1


def test_pipelined_requests_answered_in_order(px: ProxyThread) -> None:
    reqs = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n"
        b'{"content": "a"}\n'
        b"GET /debug/echo?second HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = raw_exchange(px.port, reqs)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    first = raw.index(b'"tokens"')
    second = raw.index(b"/debug/echo?second")
    third = raw.index(b'{"status":"ok"}')
    assert first < second < third


def test_http10_client_without_host(px: ProxyThread) -> None:
    raw = raw_exchange(px.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    assert b'"object": "list"' in raw


def test_http10_gets_streamed_answer_until_close(px: ProxyThread) -> None:
    body = b'{"stream": true, "max_tokens": 3}'
    raw = raw_exchange(
        px.port,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert payload.endswith(b"data: [DONE]\n\n")


def test_expect_100_continue(px: ProxyThread) -> None:
    body = b'{"content": "a b c"}'
    with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
        s.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        assert s.recv(1000).startswith(b"HTTP/1.1 200 OK")


def test_head_request_keeps_connection_usable(px: ProxyThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
    conn.request("HEAD", "/debug/echo")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


# -- streaming -----------------------------------------------------------------------------------


def sse_body(port: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    status, hdrs, data = request(
        port, "POST", "/v1/chat/completions", json.dumps(payload).encode(), headers
    )
    assert status == 200
    assert hdrs["content-type"].startswith("text/event-stream")
    return data


def test_sse_passthrough_byte_for_byte(px: ProxyThread, fake_port: int) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 12}
    direct = sse_body(fake_port, payload)
    through = sse_body(px.port, payload)
    assert through == direct
    assert through.endswith(b"data: [DONE]\n\n")
    _, hdrs, _ = request(px.port, "POST", "/v1/chat/completions", json.dumps(payload))
    assert hdrs["x-accel-buffering"] == "no"


def test_sse_is_not_buffered(px: ProxyThread, fake_port: int) -> None:
    """The first event reaches the client while llama-server is still producing the stream
    (asked of the server itself, not timed)."""

    def completed() -> int:
        return int(json.loads(request(fake_port, "GET", "/debug/stats")[2])["streams_completed"])

    before = completed()
    body = json.dumps({"stream": True, "max_tokens": 10}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"X-Fake-Token-Delay": "0.2"})
    resp = conn.getresponse()
    first = resp.readline()
    assert first.startswith(b"data: {")
    assert completed() == before  # the stream is still being generated
    rest = resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert completed() == before + 1


def test_gzip_web_ui_passes_through_untouched(px: ProxyThread, fake_port: int) -> None:
    status, hdrs, data = request(px.port, "GET", "/", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert hdrs["content-encoding"] == "gzip"
    _, _, direct = request(fake_port, "GET", "/", headers={"Accept-Encoding": "gzip"})
    assert data == direct
    assert gzip.decompress(data).startswith(b"<!doctype html>")
    status, _, _ = request(px.port, "GET", "/")
    assert status == 415  # llama-server's answer without gzip, passed on as is


# -- errors the proxy answers itself ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"messages": [', "invalid_json"),
        (b'{"model": "\xff"}', "invalid_body"),
        (b"[1, 2, 3]", "invalid_body"),
        (b'{"model": ["a"]}', "invalid_model"),
    ],
)
def test_bad_json_bodies_get_400(px: ProxyThread, body: bytes, code: str) -> None:
    status, hdrs, data = request(px.port, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert hdrs["content-type"].startswith("application/json")
    err = error_of(data)
    assert err["type"] == "invalid_request_error" and err["code"] == code
    assert px.provider.models == []  # refused before routing


def test_malformed_http_gets_400_and_close(px: ProxyThread) -> None:
    raw = raw_exchange(px.port, b"GARBAGE\x01 / HTTP/9\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    assert b"Connection: close" in raw
    error_of(raw.partition(b"\r\n\r\n")[2])


def test_huge_header_gets_431(fake_port: int) -> None:
    with running_proxy(fake_port, max_header_bytes=4096) as pt:
        raw = raw_exchange(pt.port, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 431")
        # Also when the header never ends: the proxy does not buffer without bound.
        with socket.create_connection(("127.0.0.1", pt.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nX-Big: ")
            with contextlib.suppress(OSError):
                for _ in range(100):
                    s.sendall(b"b" * 1000)
            assert s.recv(100).startswith(b"HTTP/1.1 431")


def test_body_over_limit_gets_413_without_reading_it(fake_port: int) -> None:
    with running_proxy(fake_port, max_body_bytes=1000) as pt:
        with socket.create_connection(("127.0.0.1", pt.port), timeout=5) as s:
            # Content-Length alone decides: the body is never sent.
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n"
            )
            head = s.recv(1000)
        assert head.startswith(b"HTTP/1.1 413")
        chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
        raw = raw_exchange(
            pt.port,
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3,
        )
        assert raw.startswith(b"HTTP/1.1 413")
        assert error_of(raw.partition(b"\r\n\r\n")[2])["type"] == "invalid_request_error"
        assert pt.provider.models == []


def test_unreachable_upstream_gets_502(fake_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llamactl.serve.proxy.REQUEUE_S", 0.3)
    with running_proxy(free_port()) as pt:
        status, _, data = request(pt.port, "POST", "/tokenize", b'{"content": "a"}')
        assert status == 502
        assert error_of(data)["type"] == "server_error"
        # Asked again while the window lasted (a dead server's successor may come), then 502.
        assert len(pt.provider.models) > 1 and set(pt.provider.releases) == {0}
        assert len(pt.provider.releases) == len(pt.provider.models)


def test_a_request_refused_by_a_dead_server_waits_for_its_successor(fake_port: int) -> None:
    # llama-server has just died and the supervisor has not noticed: its port refuses
    # connections. The request is sent again, rebuilt with the new upstream's key, to the
    # restarted one instead of failing with 502 (test_serve_real's kill -9 test hit this).
    dead = Upstream("fake", "127.0.0.1", free_port(), b"Bearer old", 1)
    live = Upstream("fake", "127.0.0.1", fake_port, b"Bearer new", 2)

    class Restarting(StaticProvider):
        async def acquire(
            self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
        ) -> Upstream:
            self.models.append(model)
            return dead if len(self.models) < 3 else live

    with running_proxy(fake_port) as pt:
        pt.provider.__class__ = Restarting
        body = b'{"model": "m", "x": 1}'
        headers = {"Content-Type": "application/json"}
        status, _, data = request(pt.port, "POST", "/debug/echo", body, headers)
        assert status == 200, data
        echoed = json.loads(data)
        assert base64.b64decode(echoed["body_b64"]) == body
        auth = [v for k, v in echoed["headers"] if k.lower() == "authorization"]
        assert auth == ["Bearer new"]
        assert pt.provider.models == ["m", "m", "m"]
        assert pt.provider.releases[:2] == [0, 0]


def test_garbage_from_upstream_gets_502() -> None:
    with fake_server("--mode", "garbage") as port, running_proxy(port) as pt:
        status, _, data = request(pt.port, "GET", "/v1/models")
        assert status == 502
        error_of(data)
        assert pt.provider.releases == [0]


def test_provider_error_is_answered_with_its_status_and_retry_after(px: ProxyThread) -> None:
    px.provider.error = ProxyError(
        503, "still starting", "unavailable_error", "instance_starting", retry_after=5
    )
    status, hdrs, data = request(px.port, "GET", "/v1/models")
    assert status == 503 and hdrs["retry-after"] == "5"
    assert error_of(data) == {
        "message": "still starting",
        "type": "unavailable_error",
        "code": "instance_starting",
    }
    assert px.provider.releases == []  # nothing was acquired, nothing is released


@pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout is Python 3.11+")
def test_acquire_that_needs_a_current_task_works(fake_port: int) -> None:
    """An acquire using asyncio.timeout (which needs a current task) still works."""

    class TimeoutProvider(StaticProvider):
        async def acquire(
            self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
        ) -> Upstream:
            async with asyncio.timeout(5):  # type: ignore[attr-defined,unused-ignore]
                return await super().acquire(model, method, path)

    provider = TimeoutProvider(Upstream("fake", "127.0.0.1", fake_port, None, 1))
    pt = ProxyThread(ProxyConfig(port=0), provider)
    try:
        assert request(pt.port, "POST", "/tokenize", b'{"content": "a"}')[0] == 200
        provider.delay = 0.1
        assert request(pt.port, "POST", "/tokenize", b'{"content": "a"}')[0] == 200
        assert provider.releases == [200, 200]
    finally:
        pt.close()


def test_slow_acquire_waits_then_forwards(px: ProxyThread) -> None:
    px.provider.delay = 0.3
    status, _, _ = request(px.port, "POST", "/tokenize", b'{"content": "a"}')
    assert status == 200 and px.provider.releases[-1] == 200


# -- API key -------------------------------------------------------------------------------------


def test_api_key_required_except_health_and_ui(fake_port: int) -> None:
    with running_proxy(fake_port, api_key="s3cret") as pt:
        status, hdrs, data = request(pt.port, "POST", "/tokenize", b'{"content": "a"}')
        assert status == 401 and hdrs["www-authenticate"] == "Bearer"
        assert error_of(data)["type"] == "authentication_error"
        status, _, _ = request(
            pt.port, "POST", "/tokenize", b"{}", {"Authorization": "Bearer wrong"}
        )
        assert status == 401
        for headers in ({"Authorization": "Bearer s3cret"}, {"X-Api-Key": "s3cret"}):
            assert request(pt.port, "POST", "/tokenize", b"{}", headers)[0] == 200
        assert request(pt.port, "GET", "/health")[0] == 200
        assert request(pt.port, "GET", "/v1/health")[0] == 200
        assert request(pt.port, "GET", "/", headers={"Accept-Encoding": "gzip"})[0] == 200
        assert request(pt.port, "GET", "/slots")[0] == 401
        assert pt.provider.models.count(None) >= 3


def test_api_key_compared_in_constant_time(fake_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = proxy_mod.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(proxy_mod.hmac, "compare_digest", spy)
    with running_proxy(fake_port, api_key="k") as pt:
        assert (
            request(pt.port, "GET", "/v1/models", headers={"Authorization": "Bearer k"})[0] == 200
        )
    assert (b"k", b"k") in calls


def test_several_api_keys_comma_separated_as_llama_server(fake_port: int) -> None:
    with running_proxy(fake_port, api_key="one,two") as pt:
        for key in ("one", "two"):
            headers = {"Authorization": f"Bearer {key}"}
            assert request(pt.port, "GET", "/v1/models", headers=headers)[0] == 200
        assert request(pt.port, "GET", "/v1/models", headers={"X-Api-Key": "one,two"})[0] == 401


def test_private_upstream_key_replaces_client_key() -> None:
    env = {"LLAMA_API_KEY": "private", "PATH": "/usr/bin:/bin"}
    with fake_server(env=env) as port, running_proxy(port, b"Bearer private", api_key="pub") as pt:
        got = echo(pt.port, "GET", headers={"Authorization": "Bearer pub"})
        auth = [v for k, v in got["headers"] if k.lower() == "authorization"]
        assert auth == ["Bearer private"]
        assert request(pt.port, "GET", "/v1/models", headers={"X-Api-Key": "pub"})[0] == 200
        # The web UI is public: it reaches llama-server without the private key, and
        # llama-server itself agrees that it is public.
        assert request(pt.port, "GET", "/", headers={"Accept-Encoding": "gzip"})[0] == 200
        # Without the proxy, nobody gets in with the public key.
        assert request(port, "GET", "/v1/models", headers={"Authorization": "Bearer pub"})[0] == 401


# -- failures of the upstream -------------------------------------------------------------------


def test_retry_once_on_stale_pooled_connection() -> None:
    with fake_server("--mode", "drop-reused") as port, running_proxy(port) as pt:
        for _ in range(3):
            status, _, _ = request(pt.port, "POST", "/tokenize", b'{"content": "a"}')
            assert status == 200
        _, _, stats = request(port, "GET", "/debug/stats")
        assert json.loads(stats)["dropped_reused"] >= 2
        assert pt.provider.releases == [200, 200, 200]


def test_upstream_death_mid_stream_ends_with_sse_error_event(px: ProxyThread) -> None:
    body = json.dumps({"stream": True, "max_tokens": 10}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"X-Fake-Drop-After": "2"})
    resp = conn.getresponse()
    data = resp.read()  # a complete chunked body: the stream was ended properly
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 3
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "server_error"
    assert b"[DONE]" not in data
    # The client connection stays usable.
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert px.provider.releases[0] == 0


def test_upstream_death_mid_body_closes_client_connection(px: ProxyThread) -> None:
    raw = raw_exchange(
        px.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake-Drop-After: 0\r\n"
        b"Content-Length: 2\r\n\r\n{}",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) < 1000  # cut short: the client sees an incomplete body and a close


def test_upstream_process_crash_mid_stream() -> None:
    with fake_server("--mode", "crash-mid-stream") as port, running_proxy(port) as pt:
        data = sse_body(pt.port, {"stream": True, "max_tokens": 10})
        assert b'"error"' in data.split(b"\n\n")[-2]
        status, _, _ = request(pt.port, "GET", "/health")
        assert status == 502  # the server is gone; nothing hangs


def test_client_disconnect_closes_upstream(px: ProxyThread, fake_port: int) -> None:
    def stats() -> dict[str, int]:
        return json.loads(request(fake_port, "GET", "/debug/stats")[2])  # type: ignore[no-any-return]

    before = stats()["streams_cancelled"]
    body = json.dumps({"stream": True, "max_tokens": 200}).encode()
    s = socket.create_connection(("127.0.0.1", px.port), timeout=5)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake-Token-Delay: 0.05\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    deadline = time.monotonic() + 5
    while stats()["streams_cancelled"] == before:
        assert time.monotonic() < deadline, "llama-server kept generating for a gone client"
        time.sleep(0.05)
    assert px.call(lambda: px.proxy.stats.in_flight) == 0
    assert px.provider.releases[-1] == 200


def test_slow_client_does_not_block_others(px: ProxyThread) -> None:
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", px.port))
    slow.sendall(b"GET /debug/big?n=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.5)
    for _ in range(20):  # each bounded by its own timeout: a blocked proxy fails here
        assert request(px.port, "POST", "/tokenize", b'{"content": "a"}', timeout=5)[0] == 200

    def buffered() -> int:
        return max(c.transport.get_write_buffer_size() for c in px.proxy._clients)

    # Backpressure: the proxy holds about its high-water mark, not the 200 MB body.
    assert px.call(buffered) < 2 * 1024 * 1024
    slow.close()


def test_generation_change_drops_pooled_connections(px: ProxyThread) -> None:
    assert request(px.port, "GET", "/health")[0] == 200
    old = px.provider.upstream
    px.provider.upstream = Upstream(old.name, old.host, old.port, old.auth, old.generation + 1)
    assert request(px.port, "GET", "/health")[0] == 200
    assert px.call(lambda: px.proxy.stats.upstream_idle) == 1


def test_silent_upstream_times_out_with_504(fake_port: int) -> None:
    with running_proxy(fake_port, upstream_timeout=1.0) as pt:
        status, _, data = request(pt.port, "GET", "/v1/models", headers={"X-Fake-Hang": "1"})
        assert status == 504
        error_of(data)
        assert pt.provider.releases == [0]


def test_slow_request_head_gets_408_and_others_are_served(fake_port: int) -> None:
    with running_proxy(fake_port, request_timeout=1.0) as pt:
        with socket.create_connection(("127.0.0.1", pt.port), timeout=5) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHo")
            for _ in range(3):  # one byte now and then never completes the head
                time.sleep(0.4)
                slow.sendall(b"s")
                assert request(pt.port, "GET", "/health")[0] == 200
            time.sleep(1.5)
            answer = slow.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408")


def test_expect_continue_with_bad_key_is_refused_at_once(fake_port: int) -> None:
    with running_proxy(fake_port, api_key="k") as pt:
        with socket.create_connection(("127.0.0.1", pt.port), timeout=5) as s:
            s.sendall(
                b"POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 10\r\n\r\n"
            )
            head = s.recv(1000)
        assert head.startswith(b"HTTP/1.1 401") and b"Connection: close" in head


def test_unknown_path_gets_llama_server_answer(px: ProxyThread) -> None:
    status, _, data = request(px.port, "GET", "/no/such/path")
    assert status == 404
    assert json.loads(data)["error"]["type"] == "not_found_error"


def test_bind_error_is_clear(px: ProxyThread) -> None:
    other = Proxy(ProxyConfig(port=px.port), px.provider)
    with pytest.raises(ProxyBindError, match="already in use"):
        px.run(other.start())


def test_stats_count_requests(px: ProxyThread) -> None:
    for _ in range(3):
        request(px.port, "GET", "/health")
    stats = px.call(lambda: px.proxy.stats)
    assert stats.requests == 3 and stats.in_flight == 0


# -- fuzzing (issue 6: bad input) --------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_proxy(fake_port: int) -> Iterator[ProxyThread]:
    with running_proxy(fake_port, max_header_bytes=8192, max_body_bytes=4096) as pt:
        yield pt


_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"G\x00T", b""])
_TARGETS = st.sampled_from([b"/health", b"/tokenize", b"/v1/chat/completions", b"*", b"/%zz", b""])
_HEADER = st.tuples(
    st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"Expect", b"X-A", b""]),
    st.binary(max_size=20),
)


@given(
    method=_METHODS,
    target=_TARGETS,
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"XX"]),
    headers=st.lists(_HEADER, max_size=5),
    body=st.binary(max_size=300),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzzed_requests_get_http_answers_and_never_hurt_the_proxy(
    fuzz_proxy: ProxyThread,
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    head = b"%s %s %s\r\n" % (method, target, version)
    head += b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
    with socket.create_connection(("127.0.0.1", fuzz_proxy.port), timeout=5) as s:
        s.sendall(head + b"\r\n" + body)
        s.shutdown(socket.SHUT_WR)  # a client that has said everything it will say
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
    if got:
        assert got.startswith(b"HTTP/1.1 "), got[:100]
    assert request(fuzz_proxy.port, "GET", "/health")[0] == 200
    # Nothing left behind: no request in flight, no client connection kept.
    deadline = time.monotonic() + 2
    while True:
        stats = fuzz_proxy.call(lambda: fuzz_proxy.proxy.stats)
        if (stats.in_flight, stats.connections) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert stats.in_flight == 0 and stats.connections == 0, stats


# -- streams that wait for their model ---------------------------------------------------------


def test_a_waiting_stream_gets_comments_then_the_stream(fake_port: int) -> None:
    with running_proxy(fake_port, sse_wait_comment_s=0.1) as pt:
        pt.provider.delay = 0.35
        body = json.dumps({"stream": True, "max_tokens": 3}).encode()
        status, hdrs, data = request(pt.port, "POST", "/v1/chat/completions", body)
        assert status == 200 and hdrs["content-type"] == "text/event-stream"
        events = [e for e in data.split(b"\n\n") if e]
        assert events[0] == b": waiting for the model to load" and len(events) >= 3
        assert events[-1] == b"data: [DONE]"
        # not a stream, or ready at once: no early head
        pt.provider.delay = 0.0
        _, hdrs, data = request(pt.port, "POST", "/v1/chat/completions", body)
        assert not data.startswith(b":")
        pt.provider.delay = 0.35
        status, _, data = request(pt.port, "POST", "/tokenize", b'{"content": "a"}')
        assert status == 200 and data.startswith(b"{")


def test_a_waiting_stream_that_fails_gets_an_error_event(fake_port: int) -> None:
    with running_proxy(fake_port, sse_wait_comment_s=0.1) as pt:
        pt.provider.delay = 0.35
        pt.provider.error = ProxyError(503, "model 'x' failed to load: boom", code="model_failed")
        body = json.dumps({"stream": True}).encode()
        status, _, data = request(pt.port, "POST", "/v1/chat/completions", body)
        assert status == 200
        events = [e for e in data.split(b"\n\n") if e]
        assert events[0].startswith(b": waiting")
        err = json.loads(events[-1][6:])["error"]
        assert err["code"] == 503 and "boom" in err["message"]
        # the connection stays usable
        pt.provider.error = None
        pt.provider.delay = 0.0
        assert request(pt.port, "GET", "/health")[0] == 200


# -- resumable streams: a provider that routes by conversation ----------------------------------


class ConvProvider(StaticProvider):
    """A provider that routes by conversation, as a fleet does, and whose model 'loads' until
    the test lets it."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        self.loaded = asyncio.Event()
        self.convs: list[tuple[bytes, bytes | None]] = []
        self.cancelled = 0

    async def acquire_conversation(
        self, model: str | None, method: bytes, path: bytes, url: bytes, conv: bytes | None
    ) -> Upstream:
        self.convs.append((path, conv))
        await self.wait_loaded()
        return self.upstream

    async def wait_loaded(self) -> None:
        try:
            await self.loaded.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        self.models.append(model)
        await self.wait_loaded()
        return self.upstream


def fake_requests(port: int) -> int:
    status, _, body = request(port, "GET", "/debug/stats")
    assert status == 200
    return int(json.loads(body)["requests"])


@pytest.mark.parametrize("with_conv", [True, False])
def test_a_resumable_stream_whose_client_left_during_the_load_is_still_sent(
    fake_port: int, with_conv: bool
) -> None:
    """A request with X-Conversation-Id whose client leaves while its model loads (a page
    reload) still reaches llama-server, so that its stream session fills for a resume (router
    mode detaches it too); without a conversation id it is dropped, as before."""
    provider = ConvProvider(Upstream("fake", "127.0.0.1", fake_port, None, 1))
    pt = ProxyThread(ProxyConfig(host="127.0.0.1", port=0), provider)
    try:
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
        conv = b"X-Conversation-Id: conv-7\r\n" if with_conv else b""
        sock = socket.create_connection(("127.0.0.1", pt.port), timeout=5)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"%sContent-Length: %d\r\n\r\n%s" % (conv, len(body), body)
        )
        deadline = time.monotonic() + 10
        while not pt.call(lambda: provider.models or provider.convs):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert pt.call(lambda: provider.convs) == (
            [(b"/v1/chat/completions", b"conv-7")] if with_conv else []
        )
        sock.close()
        while pt.call(lambda: pt.proxy.stats.in_flight):  # the proxy saw the client go
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = fake_requests(fake_port)
        pt.call(provider.loaded.set)
        if with_conv:
            while not pt.call(lambda: provider.releases):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert pt.call(lambda: provider.releases) == [200]
            assert fake_requests(fake_port) == before + 2  # the chat, then this stats call
        else:
            while not pt.call(lambda: provider.cancelled):  # its wait for the model is dropped
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert fake_requests(fake_port) == before + 1  # only this stats call
        assert pt.call(lambda: (provider.cancelled, len(pt.proxy._detached))) == (
            (0, 0) if with_conv else (1, 0)
        )
    finally:
        pt.close()
