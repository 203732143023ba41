"""Bad input (issue 6) against a real `llamactl serve` in front of the real llama-server: the
right 4xx in the OpenAI shape, nothing leaked by the llamactl process, and a normal chat still
answered after all of it. tests/test_badinput.py covers the same with the fake server, fast."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.serve import SEED, Serve, start, stop

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

MAX_BODY = 1024 * 1024  # --max-body-size 1M
REQUEST_TIMEOUT = 30.0  # ProxyConfig.request_timeout, serve's default


@pytest.fixture(scope="module")
def serve(
    server_bin: Path, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    home = tmp_path_factory.mktemp("badinput-home")
    s = start(server_bin, default_model, home / "home", "--max-body-size", "1M")
    yield s
    stop(s)
    assert not s.llama_servers()


@pytest.fixture(scope="module")
def baseline_fds(serve: Serve) -> int:
    """Descriptors of the llamactl process after one normal request (the pool has one)."""
    assert chat(serve.port)
    return settled_fds(serve, None)


def proxy_process(serve: Serve) -> psutil.Process:
    return psutil.Process(serve.proc.pid)


def settled_fds(serve: Serve, want: int | None, timeout: float = 20.0) -> int:
    """The llamactl process's fd count once it is down to `want` (or steady), polled."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        fds = proxy_process(serve).num_fds()
        if (want is not None and fds <= want) or (want is None and fds == last):
            return fds
        if time.monotonic() > deadline:
            return fds
        last = fds
        time.sleep(0.2)


def request(
    port: int, method: str, path: str, body: bytes | str | None = None, timeout: float = 120
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def raw_exchange(port: int, data: bytes, timeout: float = 60) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def error_of(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert {"message", "type", "code"} <= set(err), err
    return err  # type: ignore[no-any-return]


def chat(port: int, **extra: Any) -> str:
    status, _, data = request(port, "POST", "/v1/chat/completions", json.dumps({**SEED, **extra}))
    assert status == 200, data[:300]
    return json.loads(data)["choices"][0]["message"]["content"]  # type: ignore[no-any-return]


def test_malformed_http_gets_400_and_close(serve: Serve, baseline_fds: int) -> None:
    for bad in (
        b"GARBAGE\x01 / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        raw = raw_exchange(serve.port, bad)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, raw[:200]
        assert error_of(body)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b'{"messages": [', "invalid_json"),
        (b'{"a": NaN}', "invalid_json"),
        (b"[" * 50000, "invalid_json"),
        (b'{"model": "\xff"}', "invalid_body"),
        (b"[1, 2]", "invalid_body"),
        (b"null", "invalid_body"),
        (b'{"model": 7, "messages": []}', "invalid_model"),
        (b'{"model": ["a"], "messages": []}', "invalid_model"),
    ],
)
def test_bad_json_gets_400(serve: Serve, baseline_fds: int, body: bytes, code: str) -> None:
    status, hdrs, data = request(serve.port, "POST", "/v1/chat/completions", body)
    assert status == 400, data[:200]
    assert hdrs["content-type"].startswith("application/json")
    err = error_of(data)
    assert err["type"] == "invalid_request_error" and err["code"] == code


def test_huge_header_and_body(serve: Serve, baseline_fds: int) -> None:
    raw = raw_exchange(
        serve.port, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 431"), raw[:200]
    error_of(raw.partition(b"\r\n\r\n")[2])
    # Over --max-body-size: refused from the Content-Length, the body is never sent.
    with socket.create_connection(("127.0.0.1", serve.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
            % (MAX_BODY + 1)
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    chunk = b"%x\r\n%s\r\n" % (300_000, b" " * 300_000)
    raw = raw_exchange(
        serve.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 4,
    )
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
    assert error_of(raw.partition(b"\r\n\r\n")[2])["type"] == "invalid_request_error"


def test_unknown_paths_get_llama_servers_404(serve: Serve, baseline_fds: int) -> None:
    for method, path in [("GET", "/no/such"), ("POST", "/v2/chat/completions"), ("DELETE", "/x")]:
        status, _, data = request(serve.port, method, path, b"{}")
        assert status == 404, (path, data[:200])
        assert error_of(data)["type"] == "not_found_error"


def test_traversal_reads_no_file(serve: Serve, baseline_fds: int) -> None:
    for path in (
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/_app/../../../etc/passwd",
        "/%252e%252e/etc/passwd",
    ):
        status, _, data = request(serve.port, "GET", path)
        assert status == 404 and b"root:" not in data, (path, data[:200])
    # One instance serves every model name; the name is not used for any path.
    for model in ("../../../../etc/passwd", "/etc/passwd", "..%2f..%2fetc%2fpasswd"):
        answer = chat(serve.port, model=model, max_tokens=8)
        assert "root:" not in answer


def trickle(port: int, first: bytes, give_up: float) -> tuple[bytes, float]:
    """Send `first`, then one byte a second until an answer comes; (answer, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(first)
        while time.monotonic() - start < give_up:
            if select.select([s], [], [], 1.0)[0]:
                answer = b""
                with contextlib.suppress(OSError):
                    while chunk := s.recv(65536):
                        answer += chunk
                return answer, time.monotonic() - start
            with contextlib.suppress(OSError):
                s.sendall(b" ")
    return b"", time.monotonic() - start


def test_one_byte_per_second_gets_408_while_chat_goes_on(serve: Serve, baseline_fds: int) -> None:
    heads = {
        "head": b"GET /health HTTP/1.1\r\nX-Slow: ",
        "body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 5000\r\n\r\n",
    }
    results: dict[str, tuple[bytes, float]] = {}

    def run(name: str) -> None:
        results[name] = trickle(serve.port, heads[name], give_up=4 * REQUEST_TIMEOUT)

    threads = [threading.Thread(target=run, args=(name,)) for name in heads]
    for t in threads:
        t.start()
    assert "Paris" in chat(serve.port)  # others are served meanwhile
    for t in threads:
        t.join(5 * REQUEST_TIMEOUT)
    for name, (answer, seconds) in results.items():
        assert answer.startswith(b"HTTP/1.1 408"), (name, seconds, answer[:200])
        assert error_of(answer.partition(b"\r\n\r\n")[2])["type"] == "invalid_request_error"


def test_client_that_never_reads_a_stream_does_not_hold_up_others(
    serve: Serve, baseline_fds: int
) -> None:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Count to a thousand."}], "stream": True,
         "max_tokens": 2000}
    ).encode()  # fmt: skip
    process = proxy_process(serve)
    rss = process.memory_info().rss
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", serve.port))
    try:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        time.sleep(2.0)
        assert "Paris" in chat(serve.port)
        # Backpressure: the stream is not gathered in the llamactl process.
        assert process.memory_info().rss - rss < 32 * 1024 * 1024
    finally:
        s.close()


def test_afterwards_chat_works_and_no_descriptor_is_left(serve: Serve, baseline_fds: int) -> None:
    """Last in the module: after all of the above, a normal chat, and the llamactl process
    has no more descriptors than before it (polled: closes finish in the background)."""
    assert "Paris" in chat(serve.port)
    fds = settled_fds(serve, baseline_fds)
    print(f"llamactl process fds: before {baseline_fds}, after {fds}")
    assert fds <= baseline_fds
    assert serve.proc.poll() is None
