"""The one event-loop runner: uvloop when it is installed (the proxy is about twice as fast on
it, docs/performance.md), else asyncio's. serve, the proxy's tests and bench all use it.

Imports asyncio only when called: serve imports this module before llama-server is spawned."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh event loop and return its result."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)


def new_loop() -> Any:
    """A fresh event loop of the same kind, for a loop run in a thread (tests, bench)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def stop_on_signals() -> tuple[Any, list[int]]:
    """In the running loop: an asyncio.Event that SIGINT, SIGTERM or SIGHUP sets, and the list
    of the signals received (serve exits with 128 + the first)."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop, received
