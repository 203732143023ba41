"""`llamactl worker` subprocesses for tests (fake or real ggml-rpc-server): started in their own
session, stderr to a file, waited for with a deadline, stopped for sure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from llamactl.net import free_port
from llamactl.proc import stop_group

DEADLINE = 60.0


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    port: int
    err: Path
    home: Path

    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = DEADLINE, count: int = 1) -> None:
        """Until `text` appears `count` times in the worker's stderr (or it exits: fail)."""
        deadline = time.monotonic() + timeout
        while self.stderr().count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the worker's output:\n{self.stderr()}")
            time.sleep(0.02)

    def rpc_children(self) -> list[psutil.Process]:
        """The worker's live ggml-rpc-server (or fake) processes."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for kid in kids:
            try:
                if kid.status() != psutil.STATUS_ZOMBIE:
                    alive.append(kid)
            except psutil.NoSuchProcess:
                continue
        return alive

    def stop(self) -> None:
        stop_group(self.proc.pid, grace=5, popen=self.proc)


def launch(
    home: Path,
    *args: str,
    rpc_bin: Path | None = None,
    port: int = 0,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    host: str | None = None,
) -> Worker:
    """Start `llamactl worker` (with `rpc_bin` as its ggml-rpc-server when given); `prefix`
    runs it elsewhere (`ip netns exec NS`), on `host` (an address of its own there)."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    err = home.parent / f"worker-{port}.err"
    argv = [*prefix, sys.executable, "-m", "llamactl", "worker", "--port", str(port)]
    if host is not None:
        argv += ["--host", host, "--i-understand-no-auth"]
    if rpc_bin is not None:
        argv += ["--rpc-bin", str(rpc_bin)]
    with open(err, "w") as fh:
        proc = subprocess.Popen(
            [*argv, *args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            text=True,
            env={**os.environ, "LLAMACTL_HOME": str(home), **(env or {})},
            start_new_session=True,
        )
    return Worker(proc, port, err, home, host or "127.0.0.1")
