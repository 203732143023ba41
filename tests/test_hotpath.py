"""The proxy's per-request path keeps to what it must do: a ready instance is leased without a
coroutine, a running llama-server is not asked of the kernel (waitpid) per request, and the
in-memory harness of scripts/bench_hotpath.py forwards requests and answers whole (so that the
figure it prints in docs/performance.md measures a working path). No socket, no timing."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from llamactl.serve import proxy as proxy_mod
from llamactl.serve.server import LocalServer
from llamactl.serve.upstream import Upstream

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_hotpath", ROOT / "scripts/bench_hotpath.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_hotpath"] = module
    spec.loader.exec_module(module)
    return module


def test_the_hot_path_harness_forwards_requests_and_answers_whole() -> None:
    bench = load_bench()
    rounds = asyncio.run(bench.measure(300, rounds=2))
    assert len(rounds) == 2 and all(r > 0 for r in rounds)


class Provider:
    """A provider with both ways in; counts which one the proxy used."""

    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.upstream = Upstream("m", "127.0.0.1", 9, None, 1)
        self.nowait = 0
        self.awaited = 0
        self.released: list[int] = []

    def acquire_nowait(self, model: str | None, method: bytes, path: bytes) -> Upstream | None:
        self.nowait += 1
        return self.upstream if self.ready else None

    async def acquire(self, model: str | None, method: bytes = b"GET", path: bytes = b"/") -> Any:
        self.awaited += 1
        return self.upstream

    def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        self.released.append(outcome)

    def replayable(self, upstream: Upstream) -> bool:
        return False


def exchange(provider: Provider) -> tuple[proxy_mod.Proxy, list[bytes]]:
    """One request through a client connection whose upstream connection is pooled; what
    reached the upstream."""
    bench = load_bench()

    async def main() -> tuple[proxy_mod.Proxy, list[bytes]]:
        proxy = proxy_mod.Proxy(proxy_mod.ProxyConfig(port=0), provider)  # type: ignore[arg-type]
        up = provider.upstream
        conn = proxy_mod._UpstreamConn(proxy, (up.name, up.host, up.port), up.generation)
        sent: list[bytes] = []
        transport = bench.MemoryTransport()
        transport.write = sent.append  # type: ignore[method-assign]
        conn.connection_made(transport)
        proxy._pool_put(conn)
        client = proxy_mod._ClientConn(proxy)
        client.connection_made(bench.MemoryTransport())
        client.data_received(bench.REQUESTS[0])
        for _ in range(10):  # the awaited acquire runs in a task
            await asyncio.sleep(0)
        conn.data_received(bench.ANSWER)
        return proxy, sent

    return asyncio.run(main())


def test_a_ready_upstream_is_leased_without_a_coroutine() -> None:
    provider = Provider(ready=True)
    proxy, sent = exchange(provider)
    assert (provider.nowait, provider.awaited) == (1, 0)
    assert sent and sent[0].startswith(b"POST /tokenize HTTP/1.1\r\n")
    assert provider.released == [200] and proxy.in_flight == 0


def test_an_upstream_not_at_hand_is_awaited() -> None:
    provider = Provider(ready=False)
    proxy, sent = exchange(provider)
    assert (provider.nowait, provider.awaited) == (1, 1)
    assert sent and provider.released == [200] and proxy.in_flight == 0


class Popen:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self.polls = 0

    def poll(self) -> int | None:
        self.polls += 1
        return self.returncode


def test_a_running_server_is_not_polled_while_its_output_is_open() -> None:
    server = LocalServer.__new__(LocalServer)
    popen = Popen()
    server.popen = popen  # type: ignore[assignment]

    async def main() -> None:
        server._exited = asyncio.Event()
        assert [server.returncode for _ in range(100)] == [None] * 100
        assert popen.polls == 0
        # Its output closed: it died (or is dying), and the kernel is asked.
        server._exited.set()
        popen.returncode = -9
        assert server.returncode == -9 and popen.polls == 1

    asyncio.run(main())
    # Not attached (no output being read): always asked.
    server._exited = None
    popen.returncode = None
    assert server.returncode is None and popen.polls == 2
