"""A real `llamactl serve` in a subprocess, the way a user runs it: one helper for every test
that needs one (tests/conftest.py builds the shared fixtures on it).

serve's stdout is a pipe read only for its one `listening at` line, with a deadline; its stderr
goes to a file, so that a chatty serve can never block on a full pipe, and a failure quotes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from llamactl.net import free_port
from llamactl.proc import stop_group

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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
            stop_group(self.proc.pid, grace=5, popen=self.proc)
            raise AssertionError(f"serve did not start: {line!r}\n{self.stderr()[-4000:]}")
        self.ready_line = line.strip()
        return time.monotonic() - t0

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


def serve_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment for serve, without any API key a developer may have set."""
    base = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    return {**base, "LLAMACTL_HOME": str(home), **(extra or {})}


def launch(
    server_bin: Path,
    model: Path | None,
    home: Path,
    *extra: str,
    port: int = 0,
    env: dict[str, str] | None = None,
    umask: int = -1,
) -> Serve:
    """Start `llamactl serve` without waiting for it (see Serve.wait_listening)."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    stderr_path = home.parent / f"{home.name}-serve-{port}.err"
    argv = [sys.executable, "-m", "llamactl", "serve", "--server-bin", str(server_bin)]
    if model is not None:
        argv += ["-m", str(model)]
    argv += ["--port", str(port), *extra]
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
    return Serve(proc, home, port, stderr_path)


def start(
    server_bin: Path,
    model: Path | None,
    home: Path,
    *extra: str,
    port: int = 0,
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
    serve.pool.shutdown(wait=False, cancel_futures=True)
    stop_group(serve.proc.pid, grace=grace, popen=serve.proc)
    if serve.proc.stdout is not None:
        serve.proc.stdout.close()
    return serve.stderr()
