"""Small network helpers of the ground floor: a free port, and the one synchronous readiness
loop (poll GET /health with a deadline, watching the process) that chat, bench and the test
support share. serve's own readiness is asynchronous (serve/server.py) but follows the same
rule: each pass first asks whether the process died, then asks /health."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_status(host: str, port: int, path: str = "/health", *, timeout: float = 2.0) -> int | None:
    """The status code of a plain GET, or None when nothing answers (refused, reset, timeout).

    A raw socket rather than httpx: this runs in loops before anything heavy is imported."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(256)
                if not chunk:
                    return None
                head += chunk
    except OSError:
        return None
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


class NotReady(Exception):
    """The server did not become ready: `exit_code` is set when its process ended first."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def wait_ready(
    host: str,
    port: int,
    *,
    deadline_s: float,
    exited: Callable[[], int | None] = lambda: None,
    path: str = "/health",
    interval_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll GET `path` until 200; raise NotReady when `exited()` reports an exit code or when
    the deadline passes. Never sleeps past the deadline."""
    deadline = clock() + deadline_s
    while True:
        code = exited()
        if code is not None:
            raise NotReady(f"exited with code {code} before it was ready", exit_code=code)
        if http_status(host, port, path, timeout=min(2.0, max(0.1, deadline - clock()))) == 200:
            return
        left = deadline - clock()
        if left <= 0:
            raise NotReady(f"not ready after {deadline_s:g} s")
        sleep(min(interval_s, left))
