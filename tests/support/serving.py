"""`llamactl serve` as a test subprocess: started with any command line (several hosts, a Unix
socket, TLS), its "listening at" line awaited with a deadline, its stderr kept in a file (a
pipe nobody reads could fill), stopped for sure."""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FAKE = Path(__file__).resolve().parent.parent / "fakes" / "fake_llama_server.py"


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


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    urls: list[str]  # from the "listening at" line
    stderr_path: Path
    home: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def url(self, scheme_prefix: str = "http") -> str:
        """The first URL that starts with `scheme_prefix` (http, https, unix)."""
        return next(u for u in self.urls if u.startswith(scheme_prefix + ":"))

    def stop(self, deadline: float = 20.0) -> int:
        """SIGTERM to serve's group (as Ctrl-C would), SIGKILL after `deadline`; its code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(deadline)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


class ServeFailed(AssertionError):
    """serve exited (or said nothing) before its "listening at" line."""


def start_serve(
    binary: Path,
    model: Path | None,
    home: Path,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    deadline: float = 120.0,
    stderr_path: Path | None = None,
) -> Serve:
    """Start `llamactl serve --server-bin BINARY [-m MODEL] ARGS`; return once it printed
    "listening at"; ServeFailed with its stderr when it exits first or the deadline passes."""
    argv = [sys.executable, "-m", "llamactl", "serve", "--server-bin", str(binary)]
    if model is not None:
        argv += ["-m", str(model)]
    argv += list(args)
    base = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    err_path = stderr_path or home.parent / f"serve-{time.monotonic_ns()}.err"
    err_path.parent.mkdir(parents=True, exist_ok=True)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            env={**base, "LLAMACTL_HOME": str(home), **(env or {})},
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + deadline
    try:
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    finally:
        sel.close()
    text = line.decode(errors="replace").strip()
    if not text.startswith("listening at "):
        serve = Serve(proc, [], err_path, home)
        code = serve.stop(5.0)
        raise ServeFailed(f"serve did not start (code {code}): {text!r}\n{serve.stderr()}")
    urls = [u.strip() for u in text[len("listening at ") :].split(",")]
    return Serve(proc, urls, err_path, home)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl): (key, cert)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert
