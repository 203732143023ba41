"""`llamactl serve` in a subprocess, the way a user runs it: one helper for every test that
needs one, with the real llama-server or the fake one, and any command line (several hosts, a
Unix socket, TLS). tests/conftest.py builds the shared fixtures on it.

serve's stdout is a pipe read only for its one `listening at` line, with a deadline; its stderr
goes to a file, so that a chatty serve can never block on a full pipe, and a failure quotes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from llamactl.net import free_port
from llamactl.proc import stop_group

FAKE = Path(__file__).resolve().parent.parent / "fakes" / "fake_llama_server.py"

#: Far above any start or recovery seen here (seconds), so only a hang trips it.
HANG = 120.0

#: The seed's request (llama-server's guide), pinned so that the default model answers Paris.
SEED: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "temperature": 0,
    "max_tokens": 32,
}

#: A short request for tests that only need an answer.
ASK: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


@dataclass
class Serve:
    """A `llamactl serve` subprocess in its own session."""

    proc: subprocess.Popen[str]
    home: Path
    port: int
    stderr_path: Path
    ready_line: str = ""
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8))
    #: Every address of the `listening at` line (http://, https://, unix://).
    urls: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_of(self, scheme: str = "http") -> str:
        """The first listening address of that scheme (http, https, unix)."""
        return next(u for u in self.urls if u.startswith(scheme + ":"))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def restart_seconds(self) -> list[float]:
        """What the supervisor logged for each restart: from the failure to ready again."""
        return [float(m) for m in re.findall(r"ready again after ([\d.]+) s", self.stderr())]

    def wait_listening(self, timeout: float = HANG) -> float:
        """Wait for serve's `listening at` line (printed once ready); the seconds it took."""
        assert self.proc.stdout is not None
        t0 = time.monotonic()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening at"):
            code = stop_group(self.proc.pid, grace=5, popen=self.proc)
            raise ServeFailed(
                f"serve did not start (code {code}): {line!r}\n{self.stderr()[-4000:]}"
            )
        self.ready_line = line.strip()
        self.urls = [u.strip() for u in self.ready_line[len("listening at ") :].split(",")]
        if not self.port:  # the port came with the command line (or --port 0)
            self.port = next((_port_of(u) for u in self.urls if u.startswith("http")), 0)
        return time.monotonic() - t0

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM to serve's group (as Ctrl-C would), SIGKILL after `grace`; its exit code."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        code = stop_group(self.proc.pid, grace=grace, popen=self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def llama_servers(self) -> list[psutil.Process]:
        """serve's live llama-server children (zombies are dead already)."""
        found = []
        for kid in self.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if kid.name() == "llama-server" and kid.status() != psutil.STATUS_ZOMBIE:
                    found.append(kid)
        return found

    def llama_server(self) -> psutil.Process:
        (one,) = self.llama_servers()
        return one

    def instance(self) -> dict[str, Any]:
        """The instance as serve's state record has it now."""
        (path,) = (self.home / "state" / "run").glob("*.json")
        (inst,) = json.loads(path.read_text())["instances"]
        return dict(inst)

    def wait_state(self, pred: Callable[[dict[str, Any]], bool], timeout: float = HANG) -> float:
        """Poll serve's state record until `pred` holds; the seconds it took."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(OSError, ValueError):
                if pred(self.instance()):
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"stuck: {self.instance()}\n{self.stderr()[-4000:]}")
            time.sleep(0.02)

    def ask(self, body: dict[str, Any] | None = None) -> Future[httpx.Response]:
        """A chat request in the background, bounded so that a hang fails the test."""
        return self.pool.submit(
            httpx.post, f"{self.url}/v1/chat/completions", json=body or ASK, timeout=HANG
        )

    def ps(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "llamactl", "ps", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "LLAMACTL_HOME": str(self.home)},
            check=True,
        )
        return list(json.loads(out.stdout))


class ServeFailed(AssertionError):
    """serve exited (or said nothing) before its `listening at` line."""


def _port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def serve_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment for serve, without any API key a developer may have set."""
    base = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    return {**base, "LLAMACTL_HOME": str(home), **(extra or {})}


def launch(
    server_bin: Path,
    model: Path | None,
    home: Path,
    *extra: str,
    port: int | None = 0,
    env: dict[str, str] | None = None,
    umask: int = -1,
) -> Serve:
    """Start `llamactl serve` without waiting for it (see Serve.wait_listening). `port` 0
    picks a free one; None adds no --port (the command line in `extra` says where to listen)."""
    if port == 0:
        port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    stderr_path = home.parent / f"{home.name}-serve-{port or time.monotonic_ns()}.err"
    argv = [sys.executable, "-m", "llamactl", "serve", "--server-bin", str(server_bin)]
    if model is not None:
        argv += ["-m", str(model)]
    argv += [*(["--port", str(port)] if port else []), *extra]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=serve_env(home, env),
            start_new_session=True,
            umask=umask,
        )
    return Serve(proc, home, port or 0, stderr_path)


def start(
    server_bin: Path,
    model: Path | None,
    home: Path,
    *extra: str,
    port: int | None = 0,
    env: dict[str, str] | None = None,
    umask: int = -1,
    timeout: float = HANG,
) -> Serve:
    """Start `llamactl serve` and return once it printed `listening at` (or fail with its log)."""
    serve = launch(server_bin, model, home, *extra, port=port, env=env, umask=umask)
    serve.wait_listening(timeout)
    return serve


def stop(serve: Serve, grace: float = 20.0) -> str:
    """Stop serve as Ctrl-C would (SIGTERM to its group, SIGKILL after `grace`); its stderr."""
    serve.stop(grace)
    return serve.stderr()


def start_serve(
    binary: Path,
    model: Path | None,
    home: Path,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    deadline: float = HANG,
) -> Serve:
    """`llamactl serve --server-bin BINARY [-m MODEL] ARGS` with the command line as given
    (where to listen included); returns once it printed `listening at`, ServeFailed with its
    stderr when it exits first or the deadline passes."""
    return start(binary, model, home, *args, port=None, env=env, timeout=deadline)


def fake_binary(folder: Path, *fake_args: str) -> Path:
    """The fake llama-server as an executable, as --server-bin wants one."""
    script = folder / "llama-server"
    run = shlex.join([sys.executable, str(FAKE), "--load-time", "0", *fake_args])
    script.write_text(f'#!/bin/sh\nexec {run} "$@"\n')
    script.chmod(0o755)
    return script


def fake_model(folder: Path) -> Path:
    model = folder / "m.gguf"
    model.write_bytes(b"GGUF")
    return model


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1 (openssl): (key, cert)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    argv += ["-subj", "/CN=localhost", "-addext", san, "-keyout", str(key), "-out", str(cert)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return key, cert
