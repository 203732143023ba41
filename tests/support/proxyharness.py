"""The proxy's test harness: the fake llama-server in a subprocess, a static provider, the
proxy on its own event loop in a thread, and small raw HTTP helpers. Shared by test_proxy,
test_badinput and the supervisor's proxy tests."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from llamactl.net import free_port
from llamactl.serve.proxy import Proxy, ProxyConfig, ProxyError, Upstream
from llamactl.serve.runner import new_loop

FAKE = Path(__file__).parent.parent / "fakes" / "fake_llama_server.py"


def wait_health(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server on port {port} never became healthy")


@contextlib.contextmanager
def fake_server(*args: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run the fake llama-server; yield its port."""
    port = free_port()
    cmd = [sys.executable, str(FAKE), "--port", str(port), "--load-time", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    try:
        wait_health(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


class StaticProvider:
    """One upstream; optionally slow or failing; records every release."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.error: ProxyError | None = None
        self.delay = 0.0
        self.models: list[str | None] = []
        self.releases: list[int] = []
        self.hung_generations: set[int] = set()

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        self.models.append(model)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.upstream

    def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        self.releases.append(outcome)

    def replayable(self, upstream: Upstream) -> bool:
        """As Supervisor.replayable: true for generations a test marks as killed as hung."""
        return upstream.generation in self.hung_generations


class ProxyThread:
    """A Proxy on its own event loop (uvloop when present) in a background thread."""

    def __init__(self, config: ProxyConfig, provider: StaticProvider) -> None:
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.provider = provider
        self.proxy = Proxy(config, provider)
        self.run(self.proxy.start())
        self.port = self.proxy.address[1]

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: Future[Any] = Future()

        def go() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(go)
        return fut.result(5)

    def close(self) -> None:
        self.run(self.proxy.close(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def running_proxy(port: int, auth: bytes | None = None, **config: Any) -> Iterator[ProxyThread]:
    provider = StaticProvider(Upstream("fake", "127.0.0.1", port, auth, 1))
    pt = ProxyThread(ProxyConfig(host="127.0.0.1", port=0, **config), provider)
    try:
        yield pt
    finally:
        pt.close()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return resp.status, hdrs, data


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while True:
                got = s.recv(65536)
                if not got:
                    break
                chunks.append(got)
    return b"".join(chunks)


def error_of(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "code"}
    return err  # type: ignore[no-any-return]
