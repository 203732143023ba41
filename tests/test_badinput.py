"""Bad input to the proxy (issue 6): each gets its 4xx in the OpenAI error shape or a closed
connection, and none crashes the proxy, leaks a task, a socket or memory, or disturbs other
clients. Driven against the fake llama-server; tests/test_proxy.py has the basic cases.

LLAMACTL_FUZZ_EXAMPLES=N runs the fuzz tests with N examples (a long run by hand)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import select
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.proxyharness import (
    ProxyThread,
    error_of,
    fake_server,
    raw_exchange,
    request,
    running_proxy,
)

from llamactl.serve import http as http_rules
from llamactl.serve import proxy as proxy_mod
from llamactl.serve.proxy import ProxyConfig, Upstream

pytestmark = [pytest.mark.fake, pytest.mark.timeout(120)]

FUZZ_EXAMPLES = int(os.environ.get("LLAMACTL_FUZZ_EXAMPLES", "40"))

# Small bounds so that every one is reached quickly. The sweep runs once a second on a coarse
# clock, so a time bound is only seen to within a second: 3 s tells a client that sends a byte
# a second from one that stalls.
LIMITS = {
    "max_header_bytes": 4096,
    "max_body_bytes": 65536,
    "request_timeout": 3.0,
    "upstream_timeout": 2.0,
    "keepalive_timeout": 3.0,
}


@pytest.fixture(scope="module")
def fake_port() -> Iterator[int]:
    with fake_server() as port:
        yield port


@pytest.fixture(scope="module")
def lpx(fake_port: int) -> Iterator[ProxyThread]:
    """One proxy with small limits, shared by the module: leaks add up across tests."""
    with running_proxy(fake_port, **LIMITS) as pt:
        yield pt


@pytest.fixture(autouse=True)
def _fresh_provider(request: pytest.FixtureRequest) -> None:
    if "lpx" in request.fixturenames:
        pt: ProxyThread = request.getfixturevalue("lpx")
        pt.provider.models.clear()
        pt.provider.releases.clear()


# -- measuring: counters, tasks, descriptors, memory -------------------------------------------


@dataclass(frozen=True)
class Snap:
    connections: int
    in_flight: int
    upstream_idle: int
    tasks: int
    #: The proxy's own sockets: its ends of client connections and its upstream connections.
    sockets: int
    #: All open descriptors of this process (the test's own sockets included).
    fds: int
    memory: int

    def show(self) -> str:
        return (
            f"connections={self.connections} in_flight={self.in_flight} "
            f"upstream_idle={self.upstream_idle} tasks={self.tasks} sockets={self.sockets} "
            f"fds={self.fds} traced_memory={self.memory}"
        )


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> list[str]:
    """What the open descriptors are, for failure messages."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(out)


def proxy_sockets(pt: ProxyThread) -> int:
    """Open sockets of this process that are the proxy's: accepted from its port, or connected
    to its upstream."""
    upstream = pt.provider.upstream.port
    count = 0
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            continue
        if (c.laddr and c.laddr.port == pt.port) or (c.raddr and c.raddr.port == upstream):
            count += 1
    return count


def snapshot(pt: ProxyThread) -> Snap:
    # What the test provider records grows with the requests, by design: not the proxy's.
    pt.provider.models.clear()
    pt.provider.releases.clear()
    gc.collect()
    stats = pt.call(lambda: pt.proxy.stats)
    tasks = pt.call(lambda: len(asyncio.all_tasks(pt.loop)))
    memory = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    return Snap(
        stats.connections,
        stats.in_flight,
        stats.upstream_idle,
        tasks,
        proxy_sockets(pt),
        fd_count(),
        memory,
    )


def settle(pt: ProxyThread, timeout: float = 15.0) -> Snap:
    """The snapshot once every client connection is gone and the proxy holds no socket but its
    pooled upstream connections (closes finish in the background: polled)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(pt)
        if snap.connections == 0 and snap.in_flight == 0 and snap.sockets == snap.upstream_idle:
            return snap
        if time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def assert_back_to(
    base: Snap, now: Snap, what: str, clients: int = 2, test_sockets: int = 0
) -> None:
    """The proxy is back where it was: no client connection, nothing in flight, no task and no
    socket more (its pool aside, never bigger than the clients run at once), and this process
    has no more descriptors than the test's own open sockets explain."""
    __tracebackhide__ = True
    assert now.connections == 0 and now.in_flight == 0, f"{what}: {now.show()}"
    assert now.upstream_idle <= max(base.upstream_idle, clients), f"{what}: {now.show()}"
    assert now.tasks == base.tasks, f"{what}: tasks {base.tasks} -> {now.tasks}"
    assert now.sockets == now.upstream_idle, f"{what}: {now.show()}: {fd_targets()}"
    # Other threads of the test process (pytest's, hypothesis's) may hold a descriptor or two
    # for a moment; a leak of the proxy's shows in `sockets` above, exactly.
    grown = (now.fds - now.upstream_idle) - (base.fds - base.upstream_idle) - test_sockets
    assert grown <= 2, f"{what}: fds {base.show()} -> {now.show()}: {fd_targets()}"


class OtherClients:
    """A well-behaved client in a thread: keeps asking while the bad ones do their worst."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                status, _, data = request(
                    self.port, "POST", "/tokenize", b'{"content": "a b"}', timeout=10
                )
                if status == 200 and b"tokens" in data:
                    self.ok += 1
                else:
                    self.failures.append(f"{status} {data[:200]!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            time.sleep(0.005)

    def __enter__(self) -> OtherClients:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10
        while self.ok == 0 and not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stop.set()
        self.thread.join(15)

    def check(self) -> None:
        __tracebackhide__ = True
        assert not self.failures, self.failures[:5]
        assert self.ok > 0, "the other client was never served"


# -- one bad input each: send it, check the answer ----------------------------------------------

MALFORMED = [
    b"GARBAGE\x01 / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b" / HTTP/1.1\r\n\r\n",
    b"\xff\xfe\xfd\r\n\r\n",
]

BAD_JSON = [
    (b'{"messages": [', "invalid_json"),
    (b"", "invalid_json"),  # no body at all (raw llama-server: 500, a JSON parse error)
    (b"{", "invalid_json"),
    (b'{"model": "a",}', "invalid_json"),
    (b"{'model': 'a'}", "invalid_json"),
    (b'{"a": NaN}', "invalid_json"),
    (b'{"a": Infinity}', "invalid_json"),
    (b"\xef\xbb\xbf{}", "invalid_json"),  # a BOM: not JSON text (RFC 8259 8.1)
    (b"[" * 50000, "invalid_json"),
    (b'{"model": "\xff"}', "invalid_body"),
    (b'{"model": "\xc3\x28"}', "invalid_body"),
    (b"\xfe\xff\x00{\x00}", "invalid_body"),
    (b'{"model": "ok", "messages": [{"content": "\xed\xa0\x80"}]}', "invalid_body"),
    (b"[1, 2, 3]", "invalid_body"),
    (b'"text"', "invalid_body"),
    (b"42", "invalid_body"),
    (b"null", "invalid_body"),
    (b"true", "invalid_body"),
    (b'{"model": 3}', "invalid_model"),
    (b'{"model": 1.5}', "invalid_model"),
    (b'{"model": true}', "invalid_model"),
    (b'{"model": ["a"]}', "invalid_model"),
    (b'{"model": {"name": "a"}}', "invalid_model"),
    (b'{"model": "a", "model": 7}', "invalid_model"),  # the last duplicate wins, as nlohmann
]


def test_empty_body_is_refused_only_where_json_is_required(lpx: ProxyThread) -> None:
    for path in ("/v1/chat/completions", "/completion", "/tokenize", "/v1/embeddings"):
        status, _, data = request(lpx.port, "POST", path, b"")
        assert status == 400 and error_of(data)["code"] == "invalid_json", path
    # An empty body elsewhere is llama-server's to judge (POST /slots/0?action=erase takes one).
    assert request(lpx.port, "POST", "/debug/echo", b"")[0] == 200
    assert request(lpx.port, "POST", "/health", b"")[0] == 200


TRAVERSAL_PATHS = [
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/..%2f..%2f..%2fetc%2fpasswd",
    "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/_app/../../../etc/passwd",
    "/static/..%5c..%5c..%5cetc%5cpasswd",
    "/%252e%252e/%252e%252e/etc/passwd",
    "/..;/..;/etc/passwd",
]
TRAVERSAL_MODELS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "....//....//etc/passwd",
    "..\\..\\..\\etc\\passwd",
    "a\u0000b",
    "~/../../etc/passwd",
]


def send_malformed(port: int, i: int) -> None:
    raw = raw_exchange(port, MALFORMED[i % len(MALFORMED)])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw[:200]
    assert b"Connection: close" in head
    assert error_of(body)["type"] == "invalid_request_error"


def send_bad_json(port: int, i: int) -> None:
    body, code = BAD_JSON[i % len(BAD_JSON)]
    status, hdrs, data = request(port, "POST", "/v1/chat/completions", body)
    assert status == 400, (body[:50], data[:200])
    assert hdrs["content-type"].startswith("application/json")
    err = error_of(data)
    assert err["type"] == "invalid_request_error" and err["code"] == code, (body[:50], err)


def send_huge_header(port: int, i: int) -> None:
    heads = [
        b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 800 + b"\r\n",
        b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X-" + b"n" * 8000 + b": 1\r\n\r\n",
    ]
    raw = raw_exchange(port, heads[i % len(heads)])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), raw[:200]
    assert error_of(body)["type"] == "invalid_request_error"


def send_huge_body(port: int, i: int) -> None:
    if i % 2 == 0:
        data = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"
        )
    else:
        chunk = b"%x\r\n%s\r\n" % (30000, b"a" * 30000)
        data = b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        data += chunk * 3
    raw = raw_exchange(port, data)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), raw[:200]
    assert error_of(body)["type"] == "invalid_request_error"


def send_unknown_path(port: int, i: int) -> None:
    path = ["/no/such/path", "/v2/chat/completions", "/v1/models/../../x", "/%ff%00"][i % 4]
    status, _, data = request(port, ["GET", "POST", "DELETE", "PROPFIND"][i % 4], path, b"{}")
    assert status == 404, data[:200]
    assert json.loads(data)["error"]["type"] == "not_found_error"


def send_traversal(port: int, i: int) -> None:
    path = TRAVERSAL_PATHS[i % len(TRAVERSAL_PATHS)]
    status, _, data = request(port, "GET", path)
    assert status in (400, 404), (path, status, data[:200])
    assert b"root:" not in data
    model = TRAVERSAL_MODELS[i % len(TRAVERSAL_MODELS)]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
    status, _, data = request(port, "POST", "/v1/chat/completions", body)
    assert status == 200 and b"root:" not in data


def send_pipelined_mix(port: int, i: int) -> None:
    """Good and bad requests on one connection: every one answered, in order."""
    reqs = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{"
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{"model": 1}\n'
        b"GET /no/such HTTP/1.1\r\nHost: x\r\n\r\n"
        b"BROKEN\x01\r\n\r\n"
    )
    raw = raw_exchange(port, reqs)
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d\d\d) ", raw)]
    assert statuses == [400, 200, 400, 404, 400], raw[:600]


BARRAGES: dict[str, Callable[[int, int], None]] = {
    "malformed_http": send_malformed,
    "bad_json": send_bad_json,
    "huge_header": send_huge_header,
    "huge_body": send_huge_body,
    "unknown_path": send_unknown_path,
    "traversal": send_traversal,
    "pipelined_mix": send_pipelined_mix,
}


@pytest.mark.parametrize("name", sorted(BARRAGES))
def test_each_bad_input_once(lpx: ProxyThread, name: str) -> None:
    """Every variant of each bad input gets its answer."""
    send = BARRAGES[name]
    for i in range(max(len(BAD_JSON), len(MALFORMED), len(TRAVERSAL_PATHS))):
        send(lpx.port, i)
    assert request(lpx.port, "GET", "/health")[0] == 200


def test_refused_requests_never_reach_the_provider(lpx: ProxyThread) -> None:
    for i in range(len(BAD_JSON)):
        send_bad_json(lpx.port, i)
    for i in range(4):
        send_huge_header(lpx.port, i)
        send_huge_body(lpx.port, i)
    for i in range(len(MALFORMED)):
        send_malformed(lpx.port, i)
    assert lpx.provider.models == [] and lpx.provider.releases == []


# -- leak checks: a barrage of each, the counters come back, memory does not grow --------------

N = 30


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def barrage(pt: ProxyThread, send: Callable[[int, int], None], count: int, start: int) -> None:
    with OtherClients(pt.port) as other:
        for i in range(start, start + count):
            send(pt.port, i)
    other.check()


def measured_barrage(pt: ProxyThread, name: str) -> tuple[Snap, Snap, Snap]:
    send = BARRAGES[name]
    barrage(pt, send, N, 0)  # warm-up: lazy imports, caches, the pool
    base = settle(pt)
    barrage(pt, send, N, 0)
    after_n = settle(pt)
    barrage(pt, send, 9 * N, N)
    after_10n = settle(pt)
    return base, after_n, after_10n


# Python objects a leak would keep: one exchange, its lists and its request bytes are several
# hundred bytes, a client connection with its transport and parser a few KB; 9N = 270 leaked
# requests would be 100 KB or more. Noise (caches, freelists, the other client) stays far below.
MEMORY_SLACK = 64 * 1024


@pytest.mark.parametrize("name", sorted(BARRAGES))
def test_barrage_leaves_nothing_behind(lpx: ProxyThread, traced: None, name: str) -> None:
    base, after_n, after_10n = measured_barrage(lpx, name)
    print(
        f"{name}: base {base.show()}\n  after N: {after_n.show()}\n  after 10N: {after_10n.show()}"
    )
    assert_back_to(base, after_n, f"{name} after {N}")
    assert_back_to(base, after_10n, f"{name} after {10 * N}")
    growth = after_10n.memory - after_n.memory
    assert growth < MEMORY_SLACK, f"{name}: {growth} bytes more after {9 * N} more bad requests"


def test_memory_check_catches_a_real_leak(
    lpx: ProxyThread, traced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: keep every finished exchange and it does."""
    kept: list[Any] = []
    real_done = proxy_mod._ClientConn._done

    def leaky_done(self: Any, ex: Any) -> None:
        kept.append(ex)
        real_done(self, ex)

    monkeypatch.setattr(proxy_mod._ClientConn, "_done", leaky_done)
    _, after_n, after_10n = measured_barrage(lpx, "bad_json")
    assert after_10n.memory - after_n.memory > MEMORY_SLACK
    kept.clear()


# -- slow clients: one byte per second ----------------------------------------------------------


def trickle(port: int, first: bytes, byte: bytes, give_up: float) -> tuple[bytes, float]:
    """Send `first`, then one byte a second until the proxy answers; (answer, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(first)
        while time.monotonic() - start < give_up:
            readable, _, _ = select.select([s], [], [], 1.0)
            if readable:
                answer = b""
                with contextlib.suppress(OSError):
                    while chunk := s.recv(65536):
                        answer += chunk
                return answer, time.monotonic() - start
            try:
                s.sendall(byte)
            except OSError:
                break
    return b"", time.monotonic() - start


TRICKLES = {
    "head": (b"GET /health HTTP/1.1\r\nX-Slow: ", b"a"),
    "body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n",
        b" ",
    ),
    "chunked body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10000\r\n",
        b" ",
    ),
    "chunk extension": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1;ext=",
        b"x",
    ),
    "body after a fast start": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
        + b" " * 3000,
        b" ",
    ),
}


def test_one_byte_per_second_gets_408_and_others_are_served(lpx: ProxyThread) -> None:
    """Head and body alike: a request that trickles in is bounded (request_timeout 3 s, and a
    body must keep up `min_body_rate` on average), while other clients are served."""
    base = settle(lpx)
    results: dict[str, tuple[bytes, float]] = {}

    def run(name: str) -> None:
        first, byte = TRICKLES[name]
        results[name] = trickle(lpx.port, first, byte, give_up=30.0)

    threads = [threading.Thread(target=run, args=(name,)) for name in TRICKLES for _ in range(2)]
    with OtherClients(lpx.port) as other:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    other.check()
    for name, (answer, seconds) in results.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), (name, seconds, answer[:200])
        assert b"Connection: close" in head
        assert error_of(body)["type"] == "invalid_request_error"
        print(f"trickled {name}: 408 after {seconds:.1f} s")
    assert_back_to(base, settle(lpx), "after the trickles")


def test_fast_body_is_not_cut_by_the_rate_bound(fake_port: int) -> None:
    """A body that arrives in pieces at a sane rate is not refused: the bound is on stalls and
    on crawling, not on size."""
    # The sweep runs once a second on a coarse clock: 2 s is the least bound to test with.
    with running_proxy(fake_port, request_timeout=2.0) as pt:
        body = json.dumps({"content": "a " * 20000}).encode()
        with socket.create_connection(("127.0.0.1", pt.port), timeout=10) as s:
            s.sendall(
                b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            for i in range(0, len(body), 2048):  # 40 KB over 4 s, twice the timeout
                s.sendall(body[i : i + 2048])
                time.sleep(0.2)
            answer = s.recv(100)
        assert answer.startswith(b"HTTP/1.1 200"), answer


def test_crlf_between_requests_does_not_keep_an_idle_connection(fake_port: int) -> None:
    """Empty lines between requests are allowed by HTTP (RFC 9112 2.2) but are not activity:
    a client sending only them is idle and is closed after keepalive_timeout."""
    with running_proxy(fake_port, keepalive_timeout=3.0) as pt:
        answer, _ = trickle(pt.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n", 20)
        assert answer.startswith(b"HTTP/1.1 200")  # the first answer makes it readable
        with socket.create_connection(("127.0.0.1", pt.port), timeout=5) as s:
            start = time.monotonic()
            closed = False
            while time.monotonic() - start < 20:
                try:
                    s.sendall(b"\r\n")
                    readable, _, _ = select.select([s], [], [], 0.3)
                    if readable and s.recv(100) == b"":
                        closed = True
                        break
                except OSError:
                    closed = True
                    break
        assert closed, "a client sending empty lines was never closed"
        print(f"CRLF-only client closed after {time.monotonic() - start:.1f} s")


def test_trailers_are_bounded_and_not_forwarded(lpx: ProxyThread) -> None:
    """Trailer fields of a chunked body are dropped (RFC 9110 6.5.1 allows it; the body goes
    upstream with a Content-Length, where a trailer has no place), and count against
    max_header_bytes so that they cannot grow without bound."""
    raw = raw_exchange(
        lpx.port,
        b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: 1\r\nHost: evil\r\n\r\n",
    )
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    names = [k.lower() for k, v in json.loads(payload)["headers"]]
    assert "x-trailer" not in names and names.count("host") == 1
    base = snapshot(lpx)
    with socket.create_connection(("127.0.0.1", lpx.port), timeout=5) as s:
        s.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\nX-Trailer: "
        )
        with contextlib.suppress(OSError):
            for _ in range(200):  # 2 MB of one trailer value, far over the 4 KB bound
                s.sendall(b"t" * 10000)
        answer = s.recv(100)
    assert answer.startswith(b"HTTP/1.1 431"), answer
    assert_back_to(base, settle(lpx), "after a huge trailer")


# -- clients that never read -------------------------------------------------------------------


def non_reader(port: int, data: bytes) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    return s


def buffered(pt: ProxyThread) -> int:
    """Bytes the proxy holds for its clients, all of them together."""
    return pt.call(lambda: sum(c.transport.get_write_buffer_size() for c in pt.proxy._clients))


STREAM_BODY = json.dumps({"stream": True, "max_tokens": 1000000}).encode()
NEVER_READ = {
    "big body": b"GET /debug/big?n=300000000 HTTP/1.1\r\nHost: x\r\n\r\n",
    "big body, then close": b"GET /debug/big?n=300000000 HTTP/1.1\r\nConnection: close\r\n\r\n",
    "stream": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Fake-Token-Delay: 0\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY),
    "HTTP/1.0 stream": b"POST /v1/chat/completions HTTP/1.0\r\nX-Fake-Token-Delay: 0\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY),
    "a small answer, then close": b"GET /debug/big?n=200000 HTTP/1.1\r\nConnection: close\r\n\r\n",
    "a small answer, kept alive": b"GET /debug/big?n=200000 HTTP/1.1\r\nHost: x\r\n\r\n",
}


def test_client_that_never_reads_is_bounded_then_dropped(lpx: ProxyThread, fake_port: int) -> None:
    """Backpressure: the proxy stops reading llama-server and holds about its high-water mark
    per client, not the 300 MB body or the endless stream; once the client has read nothing for
    upstream_timeout (2 s here) its connection goes, and the upstream one with it."""
    base = settle(lpx)
    cancelled = json.loads(request(fake_port, "GET", "/debug/stats")[2])["streams_cancelled"]
    with OtherClients(lpx.port) as other:
        clients = [non_reader(lpx.port, data) for data in NEVER_READ.values()]
        time.sleep(1.0)
        held = buffered(lpx)
        print(f"{len(clients)} clients that never read: the proxy holds {held} bytes for them")
        assert held < len(clients) * 1024 * 1024
        for _ in range(20):
            assert request(lpx.port, "GET", "/health")[0] == 200
        # The proxy's ends of the connections go although these clients keep theirs open.
        after = settle(lpx, timeout=30)
    other.check()
    try:
        assert_back_to(
            base, after, "clients that never read", len(clients) + 1, test_sockets=len(clients)
        )
        stats = json.loads(request(fake_port, "GET", "/debug/stats")[2])
        assert stats["streams_cancelled"] >= cancelled + 2  # llama-server stopped generating
    finally:
        for s in clients:
            s.close()
    assert_back_to(base, settle(lpx), "after the never-readers closed", len(clients) + 1)


def test_answer_left_unread_when_complete_is_dropped(
    fake_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer that is complete but still waits in the proxy (a client that never reads, far
    away: the kernel's buffers are full) does not keep the connection for ever: neither after
    `Connection: close` (close() would wait for the buffer to drain) nor on an idle keep-alive
    connection. Small kernel send buffers stand in for the distance."""
    real = proxy_mod._ClientConn.connection_made

    def small_kernel_buffer(self: Any, transport: Any) -> None:
        real(self, transport)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    monkeypatch.setattr(proxy_mod._ClientConn, "connection_made", small_kernel_buffer)
    with running_proxy(fake_port, upstream_timeout=2.0, keepalive_timeout=3.0) as pt:
        base = settle(pt)
        clients = [
            non_reader(pt.port, b"GET /debug/big?n=200000 HTTP/1.1\r\nConnection: close\r\n\r\n"),
            non_reader(pt.port, b"GET /debug/big?n=200000 HTTP/1.1\r\nHost: x\r\n\r\n"),
        ]
        try:
            deadline = time.monotonic() + 10
            # Both answers complete (nothing in flight) and held by the proxy: the sum of the
            # buffers can pass the mark while the second answer is still arriving.
            while (
                pt.call(lambda: pt.proxy.stats.requests) < 2
                or buffered(pt) < 150_000
                or pt.call(lambda: pt.proxy.stats.in_flight) != 0
            ):
                assert time.monotonic() < deadline, (buffered(pt), pt.proxy.stats.in_flight)
                time.sleep(0.05)
            after = settle(pt, timeout=30)
            assert_back_to(base, after, "unread complete answers", test_sockets=len(clients))
        finally:
            for s in clients:
                s.close()


def test_pipelined_refusals_to_a_client_that_never_reads_are_bounded(lpx: ProxyThread) -> None:
    """Answers the proxy writes itself (400 here) respect backpressure too: it stops reading a
    client that sends request after request and reads none of the answers."""
    one = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{"
    block = one * 1000
    base = settle(lpx)
    s = non_reader(lpx.port, b"")
    s.settimeout(0.5)  # well within the 2 s after which the proxy drops a client that never reads
    sent = 0
    with contextlib.suppress(OSError):
        while sent < 8 * 1024 * 1024:
            s.sendall(block)
            sent += len(block)
    held = buffered(lpx)
    print(f"sent {sent} bytes of pipelined bad requests; the proxy holds {held} bytes of answers")
    assert held < 1024 * 1024
    assert request(lpx.port, "GET", "/health")[0] == 200
    after = settle(lpx, timeout=30)
    s.close()
    assert_back_to(base, after, "a client of pipelined refusals, still open", test_sockets=1)
    assert_back_to(base, settle(lpx), "after pipelined refusals")


# -- path traversal: names never reach the filesystem ----------------------------------------


_AUDIT: dict[str, Any] = {"thread": None, "events": []}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT["thread"] == threading.get_ident() and (
        event == "open" or event.startswith(("os.", "shutil.", "pathlib."))
    ):
        _AUDIT["events"].append((event, args[:2]))


def test_traversal_in_model_or_path_touches_no_file(fake_port: int) -> None:
    """With one instance, `model` is not used for a path at all: the supervisor serves every
    name with its one instance, as llama-server itself does, and the proxy opens no file while
    it handles traversal in the model name or in the URL path (seen by an audit hook)."""
    from llamactl.serve.supervisor import InstanceConfig, State, Supervisor

    sup = Supervisor()
    inst = sup.add(InstanceConfig("default", Path("/nonexistent"), (), Path("/nonexistent.log")))
    upstream = Upstream("default", "127.0.0.1", fake_port, None, 1)
    inst.upstream = upstream
    inst.set_state(State.READY, "test")
    pt = ProxyThread(ProxyConfig(port=0), sup)  # type: ignore[arg-type]
    sys.addaudithook(_audit)
    try:
        _AUDIT["thread"] = pt.thread.ident
        for model in TRAVERSAL_MODELS:
            assert pt.run(sup.acquire(model)) == upstream
            body = json.dumps({"model": model, "content": "x"}).encode()
            status, _, data = request(pt.port, "POST", "/debug/echo", body)
            assert status == 200
            # The name reaches llama-server as it was sent, which ignores it.
            assert json.loads(data)["body_b64"] and b"root:" not in data
            status, _, data = request(pt.port, "GET", f"/props?model={quote(model)}")
            assert status == 200 and b"root:" not in data
        for path in TRAVERSAL_PATHS:
            status, _, data = request(pt.port, "GET", path)
            assert status == 404 and b"root:" not in data
        _AUDIT["thread"] = None
        assert _AUDIT["events"] == []
    finally:
        _AUDIT["thread"] = None
        pt.close()


def test_traversal_paths_are_never_public_with_a_key(fake_port: int) -> None:
    """With an API key, a dot segment or an escape makes no path public (so no UI-file rule can
    be used to reach another route without the key)."""
    with running_proxy(fake_port, api_key="k") as pt:
        for path in [*TRAVERSAL_PATHS, "/_app/../slots", "/x/%2e%2e/metrics.js", "/a/..\\b.js"]:
            status, _, data = request(pt.port, "GET", path)
            assert status == 401, path
            assert error_of(data)["type"] == "authentication_error"


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "...",
        ".hidden",
        "../../../../etc/passwd",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e",
        "..\\..\\etc\\passwd",
        "a\u0000b",
        "~/../../etc/passwd",
        "model/../../../etc/passwd",
    ],
)
def test_resolve_model_never_leaves_the_model_dirs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model name is only ever matched against the .gguf files found in the model dirs: a
    name that would escape them is refused, and an encoded one is just an unknown name."""
    from llamactl import paths
    from llamactl.models import catalog as models

    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"GGUF")
    models_dir = paths.models_dir()
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / "good.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path / "llamactl-home")
    with pytest.raises(models.ModelError):
        models.resolve_model(name, paths_allowed=False)
    if "/" not in name and "~" not in name:  # else a path on the command line, taken as given
        with pytest.raises(models.ModelError):
            models.resolve_model(name)
    assert models.resolve_model("good", paths_allowed=False) == models_dir / "good.gguf"
    with pytest.raises(models.ModelError, match="unknown model"):
        models.resolve_model("secret", paths_allowed=False)


# -- fuzzing: bodies of chat requests -----------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_json_any = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]) | _json_leaf},
    optional={"content": st.text(max_size=40) | _json_any, "name": _json_leaf},
)
_chat = st.fixed_dictionaries(
    {"messages": st.lists(_message, max_size=4) | _json_any},
    optional={
        "model": st.text(max_size=30) | _json_leaf | _json_any,
        "stream": st.booleans(),
        "max_tokens": st.integers(min_value=1, max_value=6),
        "temperature": _json_leaf,
        "extra": _json_any,
    },
)


@st.composite
def chat_bodies(draw: st.DrawFn) -> bytes:
    """A chat request body: well formed, or damaged the ways clients damage them."""
    value = draw(_chat | _json_any)
    text = json.dumps(value, ensure_ascii=draw(st.booleans())).encode()
    damage = draw(st.sampled_from(["none", "none", "cut", "flip", "insert", "latin1"]))
    if damage == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "flip" and text:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + bytes([text[at] ^ draw(st.integers(1, 255))]) + text[at + 1 :]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
    elif damage == "latin1":
        text = json.dumps(value, ensure_ascii=False).encode("latin-1", "replace")
    return text


def expected_refusal(body: bytes) -> str | None:
    """The proxy's code for a body it must refuse, None for one it must forward."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_body"
    try:
        obj = json.JSONDecoder(parse_constant=http_rules._reject_constant).decode(text)
    except (ValueError, RecursionError):
        return "invalid_json"
    if type(obj) is not dict:
        return "invalid_body"
    model = obj.get("model")
    return None if model is None or type(model) is str else "invalid_model"


@given(body=chat_bodies())
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_fuzzed_chat_bodies_are_refused_or_forwarded(lpx: ProxyThread, body: bytes) -> None:
    expected = expected_refusal(body)
    status, _, data = request(lpx.port, "POST", "/v1/chat/completions", body)
    if expected is None:
        assert status == 200, (body[:200], data[:200])
    else:
        assert status == 400, (body[:200], data[:200])
        err = error_of(data)
        assert err["type"] == "invalid_request_error" and err["code"] == expected, body[:200]
    stats = lpx.call(lambda: lpx.proxy.stats)
    assert stats.in_flight == 0


def test_proxy_thread_still_serves_after_everything(lpx: ProxyThread) -> None:
    """Last in the module: the shared proxy survived all of the above."""
    assert lpx.thread.is_alive()
    assert request(lpx.port, "POST", "/tokenize", b'{"content": "a"}')[0] == 200
