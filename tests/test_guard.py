"""Where serve is stricter than llama-server at no cost to a normal user: the Host rule against
DNS rebinding (no API key: a foreign Host gets 403) and the bound on client connections (over
it: 503, never a descriptor exhaustion). serve with the fake llama-server (fake); the real
one in tests/test_dropin_real.py."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from support.serve import Serve, fake_binary, fake_model, start_serve

from llamactl.serve import listen

pytestmark = pytest.mark.fake


def _serve(tmp_path: Path, *args: str) -> Serve:
    return start_serve(
        fake_binary(tmp_path), fake_model(tmp_path), tmp_path / "home", ["--port", "0", *args]
    )


@pytest.fixture
def open_serve(tmp_path: Path) -> Iterator[Serve]:
    s = _serve(tmp_path, "--allowed-hosts", "box.lan")
    yield s
    s.stop()


def _get(url: str, host: str | None, **headers: str) -> httpx.Response:
    if host is not None:
        headers["Host"] = host
    return httpx.get(url, headers=headers, trust_env=False, timeout=30)


def test_no_key_a_foreign_host_is_refused_in_the_openai_shape(open_serve: Serve) -> None:
    url = open_serve.url_of("http") + "/v1/models"
    port = url.split(":")[2].split("/")[0]
    r = _get(url, f"rebind.example:{port}")
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["type"] == "permission_error" and err["code"] == "host_not_allowed"
    assert "--allowed-hosts" in err["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "box.lan", "app.localhost", None):
        assert _get(url, host).status_code == 200, host
    # The web UI and /health are no exception: a rebound page may not read them either.
    assert _get(open_serve.url_of("http") + "/health", "rebind.example").status_code == 403


def test_with_a_key_the_key_decides_not_the_host(tmp_path: Path) -> None:
    s = _serve(tmp_path, "--api-key", "k1")
    try:
        url = s.url_of("http") + "/v1/models"
        assert _get(url, "rebind.example").status_code == 401
        ok = _get(url, "rebind.example", Authorization="Bearer k1")
        assert ok.status_code == 200
    finally:
        s.stop()


def test_allowed_hosts_star_turns_the_rule_off(tmp_path: Path) -> None:
    s = _serve(tmp_path, "--allowed-hosts", "*")
    try:
        assert _get(s.url_of("http") + "/v1/models", "rebind.example").status_code == 200
    finally:
        s.stop()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _exchange(sock: socket.socket) -> bytes:
    """One keep-alive GET /health on `sock`: the answer's head and body."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def test_connections_over_the_bound_get_503_and_the_rest_are_served(tmp_path: Path) -> None:
    s = _serve(tmp_path, "--max-connections", "4")
    port = int(s.url_of("http").rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = _connect(port)
            assert _exchange(sock).startswith(b"HTTP/1.1 200")
            held.append(sock)
        extra = _connect(port)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = _read_all(extra)  # answered, then closed by serve
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"Retry-After: 1" in answer and b"too_many_connections" in answer
        # The connections within the bound go on being served.
        assert _exchange(held[0]).startswith(b"HTTP/1.1 200")
        held.pop().close()
        deadline = time.monotonic() + 30
        while True:  # serve notices the close at once; poll rather than sleep
            again = _connect(port)
            got = _exchange(again)
            again.close()
            if got.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
    finally:
        for sock in held:
            sock.close()
        s.stop()


def test_a_flood_of_connections_never_exhausts_descriptors(tmp_path: Path) -> None:
    s = _serve(tmp_path, "--max-connections", "16")
    port = int(s.url_of("http").rsplit(":", 1)[1])
    serve_proc = psutil.Process(s.proc.pid)
    flood: list[socket.socket] = []
    try:
        before = serve_proc.num_fds()
        for _ in range(400):  # idle connections that never send anything
            with contextlib.suppress(OSError):
                flood.append(_connect(port))
        # serve holds at most 16 served connections plus a bounded number being refused.
        peak = serve_proc.num_fds()
        assert peak - before <= 16 + 64 + 8, (before, peak)
        for sock in flood:
            sock.close()
        flood.clear()
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), _connect(port) as sock:
                if _exchange(sock).startswith(b"HTTP/1.1 200"):
                    break
            assert time.monotonic() < deadline, "serve does not serve after the flood"
            time.sleep(0.05)
    finally:
        for sock in flood:
            sock.close()
        s.stop()


@pytest.mark.unit
def test_connection_bound_is_sized_from_the_descriptor_limit() -> None:
    import resource

    bound = listen.connection_bound()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 8 <= bound <= soft // 2


def test_the_host_rule_spares_unix_socket_clients(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    s = _serve(tmp_path, "--host", f"127.0.0.1,{sock}")
    try:
        # No browser reaches a Unix socket, so no rebinding: any Host is fine there.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            assert client.get("http://docker/v1/models").status_code == 200
        assert _get(s.url_of("http") + "/v1/models", "docker").status_code == 403
    finally:
        s.stop()
