"""serve as a drop-in for llama-server's listening side: every --host form (several addresses,
IPv6, Unix sockets), --reuse-port, TLS with llama-server's flags, and llama-server's output
on serve's stderr. Pure rules first (unit), then sockets and a serve with the fake
llama-server (fake); tests/test_dropin_real.py does the same with the real one."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.serve import fake_binary, fake_model, make_certificate, start_serve

from llamactl.serve import listen, output
from llamactl.serve.listen import ProxyBindError, host_allowed, local_names, split_hosts
from llamactl.serve.main import parse_serve_args
from llamactl.serve.records import ServeRecord

unit = pytest.mark.unit
fake = pytest.mark.fake

HAS_IPV6 = socket.has_ipv6
try:
    with socket.socket(socket.AF_INET6) as _probe:
        _probe.bind(("::1", 0))
except OSError:
    HAS_IPV6 = False
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")


# -- the rules (unit) -----------------------------------------------------------------------


@unit
@pytest.mark.parametrize(
    "value, hosts",
    [
        ("127.0.0.1", ["127.0.0.1"]),
        ("127.0.0.1,::1", ["127.0.0.1", "::1"]),
        (" 127.0.0.1 , [::1] ,", ["127.0.0.1", "::1"]),
        ("[::]", ["::"]),
        ("/run/x.sock,127.0.0.1", ["/run/x.sock", "127.0.0.1"]),
        (" , ", []),
    ],
)
def test_split_hosts_reads_host_as_llama_server_does(value: str, hosts: list[str]) -> None:
    assert split_hosts(value) == hosts


@unit
def test_a_host_ending_in_sock_is_a_unix_socket() -> None:
    assert listen.is_unix("/tmp/a.sock") and listen.is_unix("rel.sock")
    assert not listen.is_unix("sock.example") and not listen.is_unix("127.0.0.1")


@unit
def test_parse_mode() -> None:
    assert listen.parse_mode("0660") == 0o660 and listen.parse_mode("600") == 0o600
    for bad in ("rw", "999", "01000"):
        with pytest.raises(ValueError):
            listen.parse_mode(bad)


@unit
def test_serve_takes_the_listening_flags_and_passes_the_rest() -> None:
    spec = parse_serve_args(
        [
            "--host",
            "127.0.0.1,::1",
            "--reuse-port",
            "--ssl-key-file",
            "k.pem",
            "--ssl-cert-file=c.pem",
            "--socket-mode",
            "0660",
            "--allowed-hosts",
            "Box.lan,other",
            "--log-disable",
            "-v",
            "--log-file",
            "x.log",
            "--log-colors",
            "off",
        ],
        environ={},
    )
    assert spec.host == "127.0.0.1,::1" and spec.reuse_port
    assert (spec.ssl_key_file, spec.ssl_cert_file) == ("k.pem", "c.pem")
    assert spec.socket_mode == 0o660 and spec.allowed_hosts == ("box.lan", "other")
    assert not spec.log_to_stderr
    # The log flags other than --log-disable are llama-server's own business.
    assert spec.passthrough == ("-v", "--log-file", "x.log", "--log-colors", "off")


@unit
def test_tls_and_reuse_port_from_llama_servers_environment() -> None:
    env = {
        "LLAMA_ARG_SSL_KEY_FILE": "k.pem",
        "LLAMA_ARG_SSL_CERT_FILE": "c.pem",
        "LLAMA_ARG_REUSE_PORT": "1",
    }
    spec = parse_serve_args([], environ=env)
    assert (spec.ssl_key_file, spec.ssl_cert_file, spec.reuse_port) == ("k.pem", "c.pem", True)


@unit
def test_llama_server_never_sees_the_tls_variables() -> None:
    from llamactl.serve.server import ServerSpec, build_env

    env = build_env(
        ServerSpec(Path("x"), (), 1, Path("l")),
        base={"LLAMA_ARG_SSL_KEY_FILE": "k", "LLAMA_ARG_SSL_CERT_FILE": "c", "KEEP": "1"},
    )
    assert "LLAMA_ARG_SSL_KEY_FILE" not in env and "LLAMA_ARG_SSL_CERT_FILE" not in env
    assert env["KEEP"] == "1"


@unit
@pytest.mark.parametrize(
    "value, ok",
    [
        (b"localhost:8080", True),
        (b"LOCALHOST", True),
        (b"localhost.", True),
        (b"app.localhost:3000", True),
        (b"127.0.0.1:8080", True),
        (b"10.1.2.3", True),  # an IP literal cannot be a rebinding attack
        (b"[::1]:8080", True),
        (b"[::1]", True),
        (b"box.lan:8080", True),  # given to --host
        (b"rebind.example", False),
        (b"rebind.example:8080", False),
        (b"localhost.rebind.example", False),
        (b"[nonsense]:80", False),
        (b"[::1", False),
        (b"localhost:http", False),
        (b"", False),
    ],
)
def test_host_rule(value: bytes, ok: bool) -> None:
    assert host_allowed(value, local_names("127.0.0.1,box.lan")) is ok


@unit
def test_allowed_hosts_star_allows_any_name() -> None:
    assert host_allowed(b"rebind.example", local_names("127.0.0.1") | {b"*"})


@unit
def test_a_wildcard_listener_accepts_the_machines_own_name() -> None:
    names = local_names("0.0.0.0")
    assert socket.gethostname().lower().encode() in names
    assert socket.gethostname().lower().encode() not in local_names("127.0.0.1") or (
        socket.gethostname().lower() == "localhost"
    )


@unit
def test_color_flags_follow_llama_servers_auto_rule() -> None:
    assert output.color_flags((), {}, stderr_is_tty=True) == ("--log-colors", "on")
    assert output.color_flags((), {}, stderr_is_tty=False) == ()
    assert output.color_flags(("--log-colors", "off"), {}, stderr_is_tty=True) == ()
    assert output.color_flags(("--log-colors=on",), {}, stderr_is_tty=True) == ()
    assert output.color_flags((), {"NO_COLOR": "1"}, stderr_is_tty=True) == ()
    assert output.color_flags((), {"TERM": "dumb"}, stderr_is_tty=True) == ()
    assert output.color_flags((), {"LLAMA_ARG_LOG_COLORS": "off"}, stderr_is_tty=True) == ()


@unit
def test_strip_colors_keeps_the_text() -> None:
    raw = b"\x1b[32mI \x1b[0msrv  update_slots: all slots are idle\n"
    assert output.strip_colors(raw) == b"I srv  update_slots: all slots are idle\n"
    plain = b"no colors\n"
    assert output.strip_colors(plain) is plain


@unit
def test_record_url_is_the_first_tcp_address() -> None:
    rec = ServeRecord(
        id="x",
        pid=1,
        pid_started=0.0,
        host="/r/x.sock,0.0.0.0",
        port=8080,
        started_at=0.0,
        urls=["unix:///r/x.sock", "https://0.0.0.0:8080"],
    )
    assert rec.url == "https://127.0.0.1:8080"
    rec.urls = ["unix:///r/x.sock"]
    assert rec.url == "unix:///r/x.sock"


# -- sockets (fake) -------------------------------------------------------------------------


@fake
@needs_ipv6
def test_several_addresses_share_one_port_even_when_port_0_is_asked() -> None:
    sockets = listen.bind("127.0.0.1,[::1]", 0)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(sockets) == 2 and len(ports) == 1
        v6 = next(s for s in sockets if s.family == socket.AF_INET6)
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        urls = [a.url for a in listen.addresses(sockets)]
        port = ports.pop()
        assert urls == [f"http://127.0.0.1:{port}", f"http://[::1]:{port}"]
    finally:
        listen.close(sockets)


@fake
@needs_ipv6
def test_a_lone_ipv6_wildcard_is_dual_stack_as_in_llama_server() -> None:
    sockets = listen.bind("::", 0)
    try:
        assert len(sockets) == 1
        assert sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        listen.close(sockets)


@fake
def test_reuse_port_lets_two_listeners_share_a_port() -> None:
    first = listen.bind("127.0.0.1", 0, reuse_port=True)
    port = first[0].getsockname()[1]
    try:
        second = listen.bind("127.0.0.1", port, reuse_port=True)
        listen.close(second)
        with pytest.raises(ProxyBindError, match="already in use"):
            listen.bind("127.0.0.1", port)
    finally:
        listen.close(first)


@fake
def test_unix_socket_is_private_answers_and_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sockets = listen.bind(str(path), 8080)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [a.url for a in listen.addresses(sockets)] == [f"unix://{path}"]
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        listen.close(sockets)
    assert not path.exists()


@fake
def test_unix_socket_mode_can_be_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sockets = listen.bind(str(path), 0, socket_mode=0o660)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    finally:
        listen.close(sockets)


@fake
def test_a_stale_socket_file_is_replaced_a_live_one_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a server that died
    sockets = listen.bind(str(path), 0)
    try:
        with pytest.raises(ProxyBindError, match="another program is listening"):
            listen.bind(str(path), 0)
    finally:
        listen.close(sockets)
    path.write_text("not a socket")
    with pytest.raises(ProxyBindError, match="not a socket"):
        listen.bind(str(path), 0)
    assert path.read_text() == "not a socket"


@fake
def test_close_leaves_a_socket_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sockets = listen.bind(str(path), 0)
    os.unlink(path)
    other = listen.bind(str(path), 0)  # another serve took the path meanwhile
    try:
        listen.close(sockets)
        assert path.exists()
    finally:
        listen.close(other)
    assert not path.exists()


@fake
def test_tls_context_errors_say_what_is_wrong(tmp_path: Path) -> None:
    key, cert = make_certificate(tmp_path)
    assert isinstance(listen.tls_context(str(key), str(cert)), ssl.SSLContext)
    with pytest.raises(ProxyBindError, match="no such file"):
        listen.tls_context(str(tmp_path / "nokey.pem"), str(cert))
    with pytest.raises(ProxyBindError, match="not a PEM certificate"):
        listen.tls_context(str(cert), str(cert))


@fake
def test_stderr_copy_never_blocks_on_an_unread_pipe() -> None:
    read_end, write_end = os.pipe()
    copy = output.StderrCopy(fd=write_end, limit=64 * 1024, note_path="/x.log")
    try:
        line = b"x" * 99 + b"\n"
        for _ in range(20_000):  # 2 MB: far more than the pipe and the buffer hold
            copy.write(line)
        assert copy.dropped > 0
        dropped = copy.dropped
        got = b""
        os.set_blocking(read_end, False)
        deadline = time.monotonic() + 30
        while b"were not shown" not in got and time.monotonic() < deadline:
            copy.write(b"after\n")  # a line after the reader came back carries the note
            try:
                got += os.read(read_end, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
        assert b"lines of llama-server's output were not shown" in got
        assert b"/x.log" in got and dropped <= copy.dropped
    finally:
        copy.close()
        os.close(read_end)
        os.close(write_end)


@fake
def test_stderr_copy_stops_quietly_when_stderr_is_gone() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    copy = output.StderrCopy(fd=write_end)
    copy.write(b"nobody reads this\n")
    copy.close(timeout=10)
    assert copy._thread is not None and not copy._thread.is_alive()
    copy.write(b"ignored\n")  # no error, no thread
    os.close(write_end)


# -- serve with the fake llama-server (fake) ------------------------------------------------


@fake
@needs_ipv6
def test_serve_on_two_addresses_and_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "serve.sock"
    s = start_serve(
        fake_binary(tmp_path),
        fake_model(tmp_path),
        tmp_path / "home",
        ["--host", f"127.0.0.1,::1,{sock}", "--port", "0"],
    )
    try:
        v4, v6, unix = s.urls
        assert v4.startswith("http://127.0.0.1:") and v6.startswith("http://[::1]:")
        assert v4.rsplit(":", 1)[1] == v6.rsplit(":", 1)[1]
        assert unix == f"unix://{sock}"
        for url in (v4, v6):
            assert httpx.get(f"{url}/health", trust_env=False).status_code == 200
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            assert client.get("http://localhost/v1/models").status_code == 200
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        code = s.stop()
    assert code == 143
    assert not sock.exists(), "serve left its Unix socket behind"


@fake
def test_serve_terminates_tls_and_speaks_plain_http_to_llama_server(tmp_path: Path) -> None:
    key, cert = make_certificate(tmp_path)
    s = start_serve(
        fake_binary(tmp_path),
        fake_model(tmp_path),
        tmp_path / "home",
        ["--port", "0", "--ssl-key-file", str(key), "--ssl-cert-file", str(cert)],
    )
    try:
        url = s.url_of("https")
        port = url.rsplit(":", 1)[1]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            r = client.post(
                f"https://localhost:{port}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
            assert r.status_code == 200 and r.json()["choices"]
            # llama-server behind got plain HTTP: the echo endpoint saw the request.
            echo = client.get(f"https://localhost:{port}/debug/echo").json()
            assert echo["method"] == "GET"
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is no answer
            httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=10)
    finally:
        s.stop()


@fake
def test_a_bad_certificate_fails_before_llama_server_starts(tmp_path: Path) -> None:
    _key, cert = make_certificate(tmp_path)
    out = subprocess.run(
        [
            *(sys.executable, "-m", "llamactl", "serve"),
            *("--server-bin", str(fake_binary(tmp_path)), "-m", str(fake_model(tmp_path))),
            *("--port", "0", "--ssl-key-file", str(cert), "--ssl-cert-file", str(cert)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLAMACTL_HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 6 and "cannot use TLS" in out.stderr
    assert "Traceback" not in out.stderr and "fake llama-server" not in out.stderr


def _log_files(home: Path) -> list[Path]:
    return sorted(home.rglob("*-default.log"))


@fake
def test_llama_servers_output_reaches_stderr_and_the_log_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    s = start_serve(fake_binary(tmp_path), fake_model(tmp_path), home, ["--port", "0"])
    s.stop()
    err = s.stderr()
    # llama-server's lines unchanged, serve's own lines marked.
    assert "\nllama_model_loader: loading model from" in "\n" + err
    assert "srv  update_slots: all slots are idle" in err
    assert "llamactl: loading m.gguf" in err and "llamactl: ready in" in err
    logged = _log_files(home)[0].read_text()
    assert "llama_model_loader: loading model from" in logged
    assert "llamactl:" not in logged


@fake
def test_log_disable_keeps_stderr_quiet_and_the_log_file_full(tmp_path: Path) -> None:
    home = tmp_path / "home"
    s = start_serve(
        fake_binary(tmp_path), fake_model(tmp_path), home, ["--port", "0", "--log-disable"]
    )
    s.stop()
    assert "llama_model_loader" not in s.stderr()
    assert "llama_model_loader: loading model from" in _log_files(home)[0].read_text()


@fake
def test_several_models_listen_the_same_ways(tmp_path: Path) -> None:
    """serve with several models (serve/many.py) takes every listen form, TLS, the Host rule
    and the stderr copy as serve with one does."""
    key, cert = make_certificate(tmp_path)
    sock = tmp_path / "many.sock"
    second = tmp_path / "n.gguf"
    second.write_bytes(b"GGUF")
    s = start_serve(
        fake_binary(tmp_path),
        fake_model(tmp_path),
        tmp_path / "home",
        [
            *("-m", str(second), "--host", f"127.0.0.1,{sock}", "--port", "0"),
            *("--ssl-key-file", str(key), "--ssl-cert-file", str(cert)),
        ],
    )
    try:
        tcp, unix = s.urls
        assert tcp.startswith("https://127.0.0.1:") and unix == f"unix://{sock}"
        context = ssl.create_default_context(cafile=str(cert))
        port = tcp.rsplit(":", 1)[1]
        with httpx.Client(verify=context, timeout=60) as client:
            r = client.post(
                f"https://localhost:{port}/v1/chat/completions",
                json={"model": "n", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200, r.text
            foreign = client.get(
                f"https://localhost:{port}/v1/models", headers={"Host": "rebind.example"}
            )
            assert foreign.status_code == 403
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        s.stop()
    assert not sock.exists()
    err = s.stderr()
    assert "llamactl: serving 2 models" in err
    assert "fake llama-server" in err  # the loaded model's llama-server, on serve's stderr


@fake
def test_a_front_for_remotes_listens_the_same_ways(tmp_path: Path) -> None:
    """serve with remote servers only (serve/remote.py) takes every listen form and TLS too."""
    from support.serve import FAKE

    from llamactl.net import free_port, wait_ready
    from llamactl.proc import stop_group

    remote_port = free_port()
    remote = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", str(remote_port), "--load-time", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready("127.0.0.1", remote_port, deadline_s=60)
        key, cert = make_certificate(tmp_path)
        sock = tmp_path / "front.sock"
        s = start_serve(
            fake_binary(tmp_path),
            None,
            tmp_path / "home",
            [
                *("--remote", f"http://127.0.0.1:{remote_port}"),
                *("--host", f"127.0.0.1,{sock}", "--port", "0"),
                *("--ssl-key-file", str(key), "--ssl-cert-file", str(cert)),
            ],
        )
        try:
            tcp, unix = s.urls
            assert tcp.startswith("https://127.0.0.1:") and unix == f"unix://{sock}"
            context = ssl.create_default_context(cafile=str(cert))
            with httpx.Client(verify=context, timeout=60) as client:
                r = client.get(f"https://localhost:{tcp.rsplit(':', 1)[1]}/v1/models")
                assert r.status_code == 200, r.text
        finally:
            s.stop()
        assert not sock.exists()
    finally:
        stop_group(remote.pid, grace=1.0, popen=remote)
