#!/usr/bin/env python3
"""The Python cost of one proxied request, without a socket: the proxy's client and upstream
protocols driven by in-memory transports, behind the real ModelFleet and Supervisor (two models
loaded on fake backends), so that only our own code is timed, not the kernel or llama-server.

    .venv/bin/python scripts/bench_hotpath.py [--requests N] [--profile]

Prints CPU µs per request (process time, median of five rounds), steady on a noisy machine
where req/s under wrk is not. docs/performance.md has the figures and what they led to."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.fakebackend import FakeBackends, FakeClock

from llamactl.serve import proxy as proxy_mod
from llamactl.serve.config import Fleet, ModelDecl
from llamactl.serve.fleet import ModelFleet
from llamactl.serve.supervisor import Policy, Supervisor

TEXT = "Hello, world! The quick brown fox jumps over the lazy dog."
# What wrk sends (bench's tokenize.lua) and what llama-server answers, byte for byte.
REQUESTS = [
    (
        b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    for body in (
        b'{"model":"alpha","content":"%s"}' % TEXT.encode(),
        b'{"model":"beta","content":"%s"}' % TEXT.encode(),
    )
]
ANSWER_BODY = b'{"tokens":[19556,28,905,17,378,2365,6354,16438,27003,690,260,23790,2767,30]}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: \r\nContent-Length: %d\r\n"
    b"Content-Type: application/json; charset=utf-8\r\nKeep-Alive: timeout=5, max=100\r\n"
    b"Server: llama.cpp\r\n\r\n%s" % (len(ANSWER_BODY), ANSWER_BODY)
)


class MemoryTransport(asyncio.Transport):
    """Counts what is written; nothing leaves the process."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.last: Any = None
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += 1
        self.last = data

    def writelines(self, list_of_data: Any) -> None:
        self.written += 1
        self.last = b"".join(list_of_data)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def build() -> tuple[proxy_mod.Proxy, ModelFleet, Supervisor]:
    clock = FakeClock()
    holder: list[ModelFleet] = []
    policy = Policy(queue_timeout=60.0, health_interval=3600.0)
    sup = Supervisor(
        policy,
        clock=clock,
        sleep=clock.sleep,
        backend_factory=FakeBackends(clock),
        on_change=lambda s: holder[0].changed() if holder else None,
    )

    async def fetch(host: str, port: int, path: str, auth: bytes | None) -> tuple[int, bytes]:
        return (200, b'{"total_slots": 4}') if path == "/props" else (404, b"")

    models = (ModelDecl("alpha", "/m/alpha.gguf"), ModelDecl("beta", "/m/beta.gguf"))
    fleet = ModelFleet(
        Fleet(models=models, models_max=2),
        sup,
        binary=Path("/fake/llama-server"),
        log_dir=Path("/fake/logs"),
        record_id="bench",
        clock=clock,
        sleep=clock.sleep,
        memory=lambda: None,
        resolve=lambda d: Path(d.source),
        estimate=lambda path, args: 0,
        fetch=fetch,
    )
    holder.append(fleet)
    await fleet.start(control=False)
    for name in ("alpha", "beta"):
        task = asyncio.ensure_future(fleet.acquire(name, b"POST", b"/tokenize"))
        await clock.run_until(task.done)
        fleet.release(task.result(), 200)
    proxy = proxy_mod.Proxy(proxy_mod.ProxyConfig(port=0), fleet)
    proxy.now = asyncio.get_running_loop().time()
    return proxy, fleet, sup


async def measure(requests: int, rounds: int = 5, profile: bool = False) -> list[float]:
    """CPU µs per request of each round (after a warm-up round); with `profile`, print a
    cProfile of one round instead and return []."""
    proxy, fleet, sup = await build()
    try:
        # One upstream connection per model, pooled, answering from memory.
        for name in ("alpha", "beta"):
            up = sup.instances[name].upstream
            assert up is not None
            conn = proxy_mod._UpstreamConn(proxy, (up.name, up.host, up.port), up.generation)
            conn.connection_made(MemoryTransport())
            proxy._pool_put(conn)
        client = proxy_mod._ClientConn(proxy)
        client_transport = MemoryTransport()
        client.connection_made(client_transport)

        def one_round(n: int) -> float:
            t0 = time.process_time()
            for i in range(n):
                client.data_received(REQUESTS[i & 1])
                conn = client.queue[0].conn
                assert conn is not None, "the request did not reach an upstream"
                conn.data_received(ANSWER)
            return (time.process_time() - t0) / n * 1e6

        one_round(min(2000, requests))  # warm
        assert client_transport.last.startswith(b"HTTP/1.1 200 OK"), client_transport.last
        assert client_transport.last.endswith(ANSWER_BODY)
        assert not client.queue and proxy.in_flight == 0
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            one_round(requests)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return []
        return [one_round(requests) for _ in range(rounds)]
    finally:
        await fleet.close()
        await sup.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="per round (5 rounds)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    args = parser.parse_args()
    rounds = asyncio.run(measure(args.requests, profile=args.profile))
    if rounds:
        print(
            f"CPU µs per request (Python only, two models): median "
            f"{statistics.median(rounds):.2f}, min {min(rounds):.2f}"
        )


if __name__ == "__main__":
    main()
