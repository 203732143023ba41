"""serve's start-up path: what it imports before llama-server is spawned, the sockets bound
before the event loop, the readiness poll, and the console entry's own error handling.

Time to ready itself is measured by `llamactl bench` (docs/performance.md), never timed
here; these tests pin down the design that makes it fast."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from llamactl.errors import UsageError
from llamactl.serve import listen, records, server

FAKE = Path(__file__).parent / "fakes" / "fake_llama_server.py"
# Subprocesses and sockets: the fake tier (a few pure checks ride along).
pytestmark = pytest.mark.fake

# Run in a fresh interpreter: which modules are loaded when serve is about to spawn?
_PROBE = """
import os, sys
from llamactl.serve import main as serve
from llamactl.serve import server
def spawn(self):
    print(" ".join(sorted(sys.modules)), flush=True)
    os._exit(0)
server.ServerProcess.spawn = spawn
sys.exit(serve.main(sys.argv[1:]))
"""


def _modules_at_spawn(*args: str, tmp_path: Path) -> set[str]:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    fake_bin = tmp_path / "llama-server"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    out = subprocess.run(
        [sys.executable, str(probe), "--server-bin", str(fake_bin), "-m", str(model), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLAMACTL_HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "llamactl.serve.server" in loaded, out.stdout  # it did reach the spawn
    return loaded


def test_serve_spawns_llama_server_before_the_heavy_imports(tmp_path: Path) -> None:
    loaded = _modules_at_spawn("--port", str(server.free_port()), tmp_path=tmp_path)
    # These overlap the model's load instead of delaying it (docs/performance.md).
    for heavy in (
        "click",
        "rich",
        "httpx",
        "psutil",
        "asyncio",
        "llamactl.serve.proxy",
        "llamactl.build.plan",
    ):
        assert heavy not in loaded, f"{heavy} is imported before llama-server is spawned"


def test_console_entry_reports_serve_errors_without_click(tmp_path: Path) -> None:
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path)}
    bad_port = subprocess.run(
        [sys.executable, "-m", "llamactl", "serve", "--port", "99999"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad_port.returncode == 2
    assert bad_port.stderr.startswith("Error: --port must be a number")
    assert "Traceback" not in bad_port.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "llamactl", "serve", "-m", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 5
    assert "no such model file" in missing.stderr and "Traceback" not in missing.stderr


def test_serve_help_through_the_console_entry(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llamactl", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--server-bin" in out.stdout


def test_bind_reports_a_taken_port_clearly() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(listen.ProxyBindError, match="already in use") as info:
            listen.bind("127.0.0.1", port)
        assert info.value.exit_code == 6


def test_bind_unknown_host_is_an_error_not_a_traceback() -> None:
    with pytest.raises(listen.ProxyBindError, match="cannot listen on"):
        listen.bind("no-such-host.invalid", 0)


def test_bind_localhost_listens_on_every_address_it_names() -> None:
    sockets = listen.bind("localhost", 0)
    try:
        assert sockets and all(s.getsockname()[1] for s in sockets)
        families = {s.family for s in sockets}
        assert socket.AF_INET in families
    finally:
        for s in sockets:
            s.close()


def test_process_start_time_agrees_with_psutil() -> None:
    for pid in (os.getpid(), 1):
        ours = records.process_start_time(pid)
        assert ours is not None
        assert abs(ours - psutil.Process(pid).create_time()) < 0.05
    assert records.process_start_time(2**22 + 12345) is None


def test_poll_interval_is_short_first_then_gentle() -> None:
    assert server.poll_interval(0.0) <= 0.01
    assert server.poll_interval(5.0) > server.poll_interval(0.0)
    assert server.poll_interval(60.0) >= server.poll_interval(5.0)


def test_http_status_of_nothing_listening_is_none() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        assert asyncio.run(server.http_status("127.0.0.1", port, "/health", timeout=1)) is None


def test_http_status_reads_the_status_of_a_real_http_server(tmp_path: Path) -> None:
    port = server.free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def poll() -> int | None:
            for _ in range(400):
                status = await server.http_status("127.0.0.1", port, "/health", timeout=1)
                if status == 200:
                    return status
                await asyncio.sleep(0.025)
            return None

        assert asyncio.run(poll()) == 200
    finally:
        proc.kill()
        proc.wait(10)


def test_private_spec_keys_are_fresh_and_not_in_argv(tmp_path: Path) -> None:
    a = server.private_spec(Path("/bin/true"), ("-c", "512"), tmp_path / "a.log")
    b = server.private_spec(Path("/bin/true"), ("-c", "512"), tmp_path / "b.log")
    assert a.api_key and b.api_key and a.api_key != b.api_key and len(a.api_key) >= 32
    assert a.api_key not in " ".join(server.build_argv(a))
    assert server.build_env(a, {})["LLAMA_API_KEY"] == a.api_key


def test_parse_errors_are_usage_errors() -> None:
    from llamactl.serve.main import parse_serve_args

    with pytest.raises(UsageError):
        parse_serve_args(["--port", "0x50"])
