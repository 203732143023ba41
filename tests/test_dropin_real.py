"""serve as a drop-in for llama-server, with the real llama-server and the default model:
every listen form, TLS, llama-server's output on stderr and the log flags, the Host rule and
the connection bound, a request in flight on a frozen llama-server answered by its successor,
and an embedding server that a client's 501s never get restarted."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import stat
import time
from pathlib import Path

import httpx
import psutil
import pytest
from support.serve import SEED, Serve, make_certificate, start_serve

from llamactl.serve.output import strip_colors
from llamactl.serve.server import probe_request

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

#: Only a hang trips it.
HANG = 120.0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _wait_for(serve: Serve, text: str, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while text not in serve.stderr():
        assert time.monotonic() < deadline, f"{text!r} not on serve's stderr:\n{serve.stderr()}"
        time.sleep(0.05)


def _log_file(home: Path) -> Path:
    (path,) = home.rglob("*-default.log")
    return path


def test_addresses_unix_socket_logs_and_host_rule(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "llamactl.sock"
    home = tmp_path / "home"
    s = start_serve(
        server_bin,
        default_model,
        home,
        ["--host", f"127.0.0.1,::1,{sock}", "--port", "0", "--max-connections", "8"],
    )
    try:
        v4, v6, unix = s.urls
        port = _port(v4)
        assert v6 == f"http://[::1]:{port}" and unix == f"unix://{sock}"
        for url in (v4, v6):
            assert httpx.get(f"{url}/health", trust_env=False).status_code == 200
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=HANG) as c:
            r = c.post("http://localhost/v1/chat/completions", json=SEED)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        # llama-server's own lines, as it prints them, on serve's stderr and in its log.
        _wait_for(s, "prompt eval time")
        assert "prompt eval time" in _log_file(home).read_text()
        assert "llamactl: ready in" in s.stderr()
        # DNS rebinding: no key, so a foreign Host is refused; the listening names are served.
        foreign = httpx.get(f"{v4}/v1/models", headers={"Host": "rebind.example"})
        assert foreign.status_code == 403
        assert foreign.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(f"http://localhost:{port}/v1/models").status_code == 200
        # The connection bound: 8 held, the 9th gets 503.
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
        try:
            for c in held:
                c.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert c.recv(4096).startswith(b"HTTP/1.1 200")
            r = httpx.get(f"{v4}/health", timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        finally:
            for c in held:
                c.close()
    finally:
        assert s.stop() == 143
    assert not sock.exists()


def test_the_seed_over_tls_answers_paris(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    key, cert = make_certificate(tmp_path)
    s = start_serve(
        server_bin,
        default_model,
        tmp_path / "home",
        ["--port", "0", "--ssl-key-file", str(key), "--ssl-cert-file", str(cert)],
    )
    try:
        port = _port(s.url_of("https"))
        verify = ssl.create_default_context(cafile=str(cert))
        r = httpx.post(
            f"https://localhost:{port}/v1/chat/completions", json=SEED, verify=verify, timeout=HANG
        )
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        # llama-server behind stays plain HTTP on loopback.
        (child,) = [p for p in psutil.Process(s.proc.pid).children() if p.name() == "llama-server"]
        assert "--ssl-key-file" not in child.cmdline()
        assert all(c.laddr.ip == "127.0.0.1" for c in child.net_connections("tcp"))
    finally:
        s.stop()


def test_log_flags_behave_as_for_llama_server(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    own_log = tmp_path / "llama-server.log"
    home = tmp_path / "home"
    s = start_serve(
        server_bin,
        default_model,
        home,
        ["--port", "0", "--log-colors", "on", "--log-file", str(own_log), "-v"],
    )
    try:
        httpx.post(s.url_of("http") + "/v1/chat/completions", json=SEED, timeout=HANG)
        _wait_for(s, "prompt eval time")
    finally:
        s.stop()
    err = s.stderr()
    assert "\x1b[" in err  # --log-colors on: as llama-server prints it
    # -v: debug lines ("D" after the timestamp) that llama-server hides by default.
    assert re.search(r"^\S+ D ", strip_colors(err.encode()).decode(), re.MULTILINE)
    assert "\x1b[" not in _log_file(home).read_text()  # the log file stays plain
    assert own_log.stat().st_size > 0  # --log-file: llama-server writes it itself
    plain = s.stderr().count("\n")
    quiet_home = tmp_path / "quiet"
    q = start_serve(server_bin, default_model, quiet_home, ["--port", "0", "--log-disable"])
    try:
        httpx.post(q.url_of("http") + "/v1/chat/completions", json=SEED, timeout=HANG)
    finally:
        q.stop()
    assert "prompt eval time" not in q.stderr() and "load_model" not in q.stderr()
    assert q.stderr().count("\n") < plain
    logged = _log_file(quiet_home).read_text()
    assert "load_model" in logged and "prompt eval time" in logged


def test_a_request_in_flight_on_a_frozen_llama_server_is_answered_by_its_successor(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    s = start_serve(server_bin, default_model, tmp_path / "home", ["--port", "0"])
    try:
        url = s.url_of("http")
        (victim,) = [p for p in psutil.Process(s.proc.pid).children() if p.name() == "llama-server"]
        victim.suspend()  # SIGSTOP: its port still accepts connections, nothing answers
        frozen_at = time.monotonic()
        with httpx.Client(timeout=HANG) as client:
            r = client.post(f"{url}/v1/chat/completions", json=SEED)
        answered = time.monotonic() - frozen_at
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        assert "stopped (SIGSTOP)" in s.stderr()
        with contextlib.suppress(psutil.NoSuchProcess):
            assert victim.status() == psutil.STATUS_ZOMBIE or not victim.is_running()
        print(f"RECOVERY SIGSTOP real: the request in flight got 200 after {answered:.2f} s")
    finally:
        s.stop()


def test_an_embedding_server_is_not_restarted_for_a_clients_501s(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    s = start_serve(server_bin, default_model, tmp_path / "home", ["--port", "0", "--embeddings"])
    try:
        url = s.url_of("http")
        (first,) = [p for p in psutil.Process(s.proc.pid).children() if p.name() == "llama-server"]
        # An endpoint this server does not offer answers 501 (server-context.cpp: /metrics
        # without --metrics): the client's mistake. Well past broken_after (5) in a row.
        statuses = {httpx.get(f"{url}/metrics", timeout=HANG).status_code for _ in range(12)}
        assert statuses == {501}, statuses
        # The probe's request for this server works (it would restart it if it did not).
        path, body = probe_request(first.cmdline())
        assert path == "/embedding"
        r = httpx.post(
            url + path, content=body, headers={"Content-Type": "application/json"}, timeout=HANG
        )
        assert r.status_code == 200, r.text
        (now,) = [p for p in psutil.Process(s.proc.pid).children() if p.name() == "llama-server"]
        assert now.pid == first.pid, s.stderr()[-2000:]
    finally:
        s.stop()
    assert "restarting it" not in s.stderr()
