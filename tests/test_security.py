"""The security guarantees of docs/security.md, each proved here: loopback by default and a
warning elsewhere without a key; the API key on every endpoint but llama-server's public ones;
backends on loopback with a private key that no argv, record, `ps` or log shows; no shell;
private state and log files under any umask; CORS no looser than llama-server's own."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from support.proxyharness import fake_server, request, running_proxy
from support.serve import Serve, fake_binary, fake_model, start, stop

from llamactl.net import free_port
from llamactl.serve.proxy import ProxyError, is_public

PACKAGE = Path(__file__).resolve().parent.parent / "llamactl"
USER_KEY = "user-key-8c1f52d0e47b"
EVIL_ORIGIN = "http://evil.example"
real = pytest.mark.real


# -- running serve as a user would (tests/support/serve.py) ---------------------------------


def listening(proc: psutil.Process) -> set[str]:
    """The addresses a process listens on (TCP)."""
    return {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def listening_port(proc: psutil.Process) -> int:
    (port,) = {
        c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    }
    return int(port)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- fast: the fake llama-server ----------------------------------------------------------------


@pytest.mark.fake
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_loopback_by_default_and_private_files_under_any_umask(tmp_path: Path, umask: int) -> None:
    home = tmp_path / "home"
    s = start(fake_binary(tmp_path), fake_model(tmp_path), home, umask=umask)
    try:
        assert listening(psutil.Process(s.proc.pid)) == {"127.0.0.1"}
        (child,) = s.children()
        assert listening(child) == {"127.0.0.1"}
        state = home / "state"
        for directory in (state, state / "run", state / "logs"):
            assert mode_of(directory) == 0o700, f"{directory} is {oct(mode_of(directory))}"
        files = [*(state / "run").iterdir(), *(state / "logs").iterdir()]
        assert any(f.suffix == ".json" for f in files) and any(f.suffix == ".log" for f in files)
        for f in files:
            assert mode_of(f) == 0o600, f"{f} is {oct(mode_of(f))}"
    finally:
        err = stop(s)
    assert "warning" not in err


@pytest.mark.fake
@pytest.mark.parametrize(
    ("extra", "env", "warned"),
    [
        (("--host", "0.0.0.0"), {}, True),
        (("--host", "0.0.0.0", "--api-key", USER_KEY), {}, False),
        (("--host", "0.0.0.0"), {"LLAMACTL_API_KEY": USER_KEY}, False),
        (("--host", "localhost"), {}, False),
    ],
)
def test_listening_beyond_loopback_without_a_key_warns(
    tmp_path: Path, extra: tuple[str, ...], env: dict[str, str], warned: bool
) -> None:
    s = start(fake_binary(tmp_path), fake_model(tmp_path), tmp_path / "h", *extra, env=env)
    err = stop(s)
    warning = f"warning: listening on {extra[1]} without --api-key"
    assert (warning in err) is warned, err


@pytest.mark.fake
def test_proxy_own_answers_carry_no_cors_headers() -> None:
    """The proxy's own errors (401, 400, 413, 503) carry no Access-Control-* header: llama-server
    would echo the Origin on them, so the proxy is stricter, never looser."""
    origin = {"Origin": EVIL_ORIGIN}
    keyed = {**origin, "Authorization": "Bearer k"}
    with fake_server() as port, running_proxy(port, api_key="k", max_body_bytes=100) as pt:
        answers = [
            request(pt.port, "POST", "/v1/chat/completions", b"{}", origin),
            request(pt.port, "POST", "/v1/chat/completions", b"{not json", keyed),
            request(pt.port, "POST", "/v1/chat/completions", b"x" * 200, keyed),
        ]
        pt.provider.error = ProxyError(503, "Loading model", retry_after=1)
        answers.append(request(pt.port, "GET", "/v1/models", headers=keyed))
    assert [status for status, _, _ in answers] == [401, 400, 413, 503]
    for _, headers, _ in answers:
        assert not [h for h in headers if h.startswith("access-control-")], headers


@pytest.mark.fake
def test_preflight_needs_no_key_as_in_llama_server() -> None:
    # llama-server answers OPTIONS before its key check (server-http.cpp, the pre-routing
    # handler): browsers send preflights without credentials.
    assert is_public(b"OPTIONS", b"/v1/chat/completions")
    with fake_server() as port, running_proxy(port, api_key="k") as pt:
        status, _, _ = request(
            pt.port,
            "OPTIONS",
            "/v1/chat/completions",
            headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
    assert status != 401


_SHELL_PROGRAMS = {"sh", "bash", "zsh", "dash", "/bin/sh", "/bin/bash", "cmd", "cmd.exe"}
_SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"),
}


def shell_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every way `source` could run a command through a shell, as 'file:line what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{where} shell={ast.unparse(kw.value)}")
            func = node.func
            if isinstance(func, ast.Attribute):
                if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in _SHELL_CALLS:
                    found.append(f"{where} {func.value.id}.{func.attr}")
                if func.attr == "subprocess_shell":  # loop.subprocess_shell
                    found.append(f"{where} .subprocess_shell")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "asyncio"):
            for alias in node.names:
                if (node.module, alias.name) in _SHELL_CALLS:
                    found.append(f"{where} from {node.module} import {alias.name}")
        elif isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value in _SHELL_PROGRAMS:
                found.append(f"{where} argv starts with {first.value!r}")
    return found


@pytest.mark.unit
def test_the_shell_detector_sees_every_form() -> None:
    bad = """
import os, subprocess, asyncio
from os import system
subprocess.run("ls", shell=True)
subprocess.Popen(cmd, shell=flag)
os.system("ls"); os.popen("ls"); subprocess.getoutput("ls")
subprocess.getstatusoutput("ls"); asyncio.create_subprocess_shell("ls")
loop.subprocess_shell(factory, "ls")
subprocess.run(["sh", "-c", "ls"])
"""
    assert len(shell_uses(bad)) == 10
    assert shell_uses("subprocess.run(['ls'], shell=False)\nos.getpid()") == []


@pytest.mark.unit
def test_no_shell_anywhere_in_llamactl() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20  # the whole package was read
    found = [hit for f in sources for hit in shell_uses(f.read_text(), str(f))]
    assert found == [], "a shell in llamactl:\n" + "\n".join(found)


# -- real: llama-server behind `llamactl serve`, and llama-server direct -----------------------

#: Every route of llama-server (tools/server/server.cpp), as the web UI and clients call them.
ENDPOINTS = [
    ("GET", "/props"),
    ("GET", "/v1/models"),
    ("GET", "/models"),
    ("GET", "/slots"),
    ("GET", "/metrics"),
    ("GET", "/lora-adapters"),
    ("GET", "/tools"),
    ("GET", "/cors-proxy"),
    ("GET", "/v1/stream"),
    ("DELETE", "/v1/stream"),
    ("POST", "/props"),
    ("POST", "/completion"),
    ("POST", "/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/chat/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/input_tokens"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/infill"),
    ("POST", "/embedding"),
    ("POST", "/v1/embeddings"),
    ("POST", "/rerank"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/apply-template"),
    ("POST", "/lora-adapters"),
    ("POST", "/slots/0"),
    ("POST", "/v1/streams/lookup"),
]


@pytest.fixture(scope="module")
def keyed(
    server_bin: Path, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    """One `llamactl serve --api-key-file` on the real llama-server for the module."""
    home = tmp_path_factory.mktemp("security-home")
    keys = home / "keys.txt"
    keys.write_text(f"# clients\n{USER_KEY}\n")
    keys.chmod(0o600)
    s = start(server_bin, default_model, home, "--api-key-file", str(keys))
    yield s
    stop(s)


@pytest.fixture(scope="module")
def direct(
    server_bin: Path, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """llama-server itself, as the user would run it with the same key; its URL."""
    port = free_port()
    argv = [str(server_bin), "-m", str(default_model), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--api-key", USER_KEY]
    log = tmp_path_factory.mktemp("direct") / "llama-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"llama-server direct did not start:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def llama_server_of(serve: Serve) -> psutil.Process:
    (child,) = [c for c in serve.children() if c.name() == "llama-server"]
    return child


def ask(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = b"{}" if method == "POST" else None
    hdrs = {"Accept-Encoding": "gzip", **(headers or {})}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    return httpx.request(method, url + path, content=body, headers=hdrs, timeout=60)


@real
def test_every_endpoint_needs_the_key(keyed: Serve) -> None:
    for method, path in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"}):
            resp = ask(keyed.url, method, path, headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "authentication_error" and error["message"], error
            # Answered by the proxy itself: the request never reached llama-server.
            assert error["code"] == "invalid_api_key", error
        for headers in ({"Authorization": f"Bearer {USER_KEY}"}, {"X-Api-Key": USER_KEY}):
            resp = ask(keyed.url, method, path, headers)
            assert resp.status_code != 401, (method, path, headers, resp.text)
    # The public ones: health, and the web UI's own files.
    for path in ("/health", "/v1/health", "/", "/index.html"):
        assert ask(keyed.url, "GET", path).status_code == 200, path
    # A path the proxy lets through as a possible UI file reaches llama-server without the
    # private key, so llama-server's own list has the last word.
    resp = ask(keyed.url, "GET", "/no-such-asset.js")
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"


#: Requests without a key, a few of each kind llama-server's key check tells apart.
PUBLIC_PROBES = [
    ("GET", "/health"),
    ("GET", "/v1/health"),
    ("POST", "/health"),
    ("GET", "/health?x=1"),
    ("GET", "/"),
    ("GET", "/index.html"),
    ("HEAD", "/"),
    ("GET", "/sw.js"),
    ("GET", "/manifest.webmanifest"),
    ("GET", "/no-such-asset.js"),
    ("GET", "/_app/no-such.js"),
    ("GET", "/props"),
    ("GET", "/%68ealth"),
    ("GET", "//health"),
    ("POST", "/index.html"),
    ("OPTIONS", "/props"),
]
#: Where the proxy is stricter than llama-server: it takes no percent-escape or POST as a
#: public file (llama-server decodes the path, and checks the path whatever the method).
STRICTER = {("GET", "/%68ealth"), ("POST", "/index.html")}


@real
def test_public_paths_are_llama_servers_and_no_more(keyed: Serve, direct: str) -> None:
    stricter = set()
    for method, path in PUBLIC_PROBES:
        through = ask(keyed.url, method, path).status_code
        itself = ask(direct, method, path).status_code
        if through != itself:
            assert through == 401, (method, path, through, itself)
            stricter.add((method, path))
    assert stricter == STRICTER


def cors_of(resp: httpx.Response) -> dict[str, str]:
    return {
        k.lower(): v
        for k, v in resp.headers.multi_items()
        if k.lower().startswith("access-control-") or k.lower() == "vary"
    }


@real
def test_cors_is_llama_servers_or_stricter(keyed: Serve, direct: str) -> None:
    origin = {"Origin": EVIL_ORIGIN}
    key = {"Authorization": f"Bearer {USER_KEY}"}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    same = [
        ("GET", "/health", origin, None),
        ("GET", "/health", {}, None),
        ("POST", "/v1/chat/completions", {**origin, **key}, chat),
        ("OPTIONS", "/v1/chat/completions", preflight, None),
        ("GET", "/v1/models", {**origin, **key}, None),
    ]
    for method, path, headers, body in same:
        through = httpx.request(method, keyed.url + path, headers=headers, json=body, timeout=60)
        itself = httpx.request(method, direct + path, headers=headers, json=body, timeout=60)
        assert through.status_code == itself.status_code, (method, path)
        assert cors_of(through) == cors_of(itself), (method, path)
    # llama-server's default (--cors-origins "*" with credentials) echoes any Origin, even on
    # its 401. The proxy answers a missing key itself, with no CORS header: stricter.
    itself = httpx.post(direct + "/v1/chat/completions", headers=origin, json=chat)
    through = httpx.post(keyed.url + "/v1/chat/completions", headers=origin, json=chat)
    assert itself.status_code == through.status_code == 401
    assert cors_of(itself)["access-control-allow-origin"] == EVIL_ORIGIN
    assert cors_of(through) == {}


@real
def test_backend_on_loopback_with_a_private_key_nobody_sees(keyed: Serve) -> None:
    child = llama_server_of(keyed)
    assert listening(child) == {"127.0.0.1"}
    assert listening(psutil.Process(keyed.proc.pid)) == {"127.0.0.1"}
    private = child.environ()["LLAMA_API_KEY"]
    assert len(private) >= 32 and private != USER_KEY
    assert USER_KEY not in child.environ().values()

    # Straight to the backend, only the private key opens it: not the user's.
    backend = f"http://127.0.0.1:{listening_port(child)}"
    for key, status in ((None, 401), (USER_KEY, 401), (private, 200)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(backend + "/v1/models", headers=headers).status_code == status

    # In nobody's argv: /proc/PID/cmdline is readable by every local user.
    for pid in (child.pid, keyed.proc.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert cmdline and private.encode() not in cmdline
    assert USER_KEY.encode() not in Path(f"/proc/{child.pid}/cmdline").read_bytes()
    for p in psutil.process_iter(["cmdline"]):
        assert private not in " ".join(p.info["cmdline"] or []), p

    # Nor in the state records, `llamactl ps --json`, or the logs.
    state = keyed.home / "state"
    records = list((state / "run").glob("*.json"))
    logs = list((state / "logs").glob("*.log"))
    assert records and logs
    for f in (*records, *logs):
        text = f.read_text(errors="replace")
        assert private not in text and USER_KEY not in text, f
    assert "llama" in logs[0].read_text(errors="replace")  # the log has llama-server's output
    env = {**os.environ, "LLAMACTL_HOME": str(keyed.home)}
    out = subprocess.run(
        [sys.executable, "-m", "llamactl", "ps", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    assert str(keyed.port) in out and json.loads(out)
    assert private not in out and USER_KEY not in out


@real
def test_foreign_host_header_is_served_and_only_the_key_stops_it(keyed: Serve, direct: str) -> None:
    """Known limit (docs/security.md): neither llama-server nor the proxy checks Host, so a
    DNS-rebinding page reaches both; the API key is what stops it."""
    rebound = {"Host": f"evil.example:{keyed.port}"}
    for url in (keyed.url, direct):
        assert httpx.get(url + "/health", headers=rebound).status_code == 200
        assert httpx.get(url + "/v1/models", headers=rebound).status_code == 401
        with_key = {**rebound, "Authorization": f"Bearer {USER_KEY}"}
        assert httpx.get(url + "/v1/models", headers=with_key).status_code == 200


@real
def test_cors_origins_flag_narrows_cors_through_serve(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    """docs/security.md's advice works: llama-server's --cors-origins passes through serve."""
    s = start(server_bin, default_model, tmp_path / "h", "--cors-origins", "localhost")
    try:
        for origin, allowed in (
            (EVIL_ORIGIN, None),
            ("http://localhost:3000", "http://localhost:3000"),
        ):
            headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
            pre = httpx.options(s.url + "/v1/chat/completions", headers=headers)
            assert pre.status_code == 200
            assert pre.headers.get("access-control-allow-origin") == allowed
            got = httpx.get(s.url + "/v1/models", headers={"Origin": origin})
            assert got.status_code == 200
            assert got.headers.get("access-control-allow-origin") == allowed
    finally:
        stop(s)
