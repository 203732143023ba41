"""A fake clock and a fake Backend for the supervisor's tests: no process, no socket, no real
time. Time moves only when the test says so (`advance`, `run_until`), jumping straight to the
next sleeper, so that minutes of backoff and health checks take milliseconds."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamactl.errors import ServerStartError
from llamactl.serve.backend import Vitals
from llamactl.serve.server import describe_exit


class FakeClock:
    """The supervisor's `clock` (call it) and `sleep` (await it), on virtual time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), fut))
        await fut

    @staticmethod
    async def settle(rounds: int = 30) -> None:
        """Let every task that can run without time passing run."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    def _wake_next(self, until: float) -> bool:
        """Move to the earliest live sleeper due by `until` and wake it; False if none."""
        while self._sleepers:
            deadline, _, fut = self._sleepers[0]
            if fut.done():  # cancelled meanwhile
                heapq.heappop(self._sleepers)
                continue
            if deadline > until:
                return False
            heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            fut.set_result(None)
            return True
        return False

    async def advance(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass, waking sleepers in order."""
        target = self.now + seconds
        await self.settle()
        while self._wake_next(target):
            await self.settle()
        self.now = target
        await self.settle()

    async def run_until(self, done: Callable[[], bool], limit: float = 3600.0) -> None:
        """Let time pass, sleeper by sleeper, until `done()`; fail if nothing is left to happen
        or `limit` virtual seconds pass."""
        end = self.now + limit
        await self.settle()
        while not done():
            if not self._wake_next(end):
                raise AssertionError(f"condition not reached (virtual time {self.now:.2f})")
            await self.settle()


@dataclass
class Script:
    """How the fake backends behave; tests change it between starts."""

    load_time: float = 0.5
    #: None: starts fine; an exit code: every start ends with it (negative: killed by a signal).
    fail_start: int | None = None
    #: How many of the next starts find their port taken.
    clashes: int = 0
    #: Health checks go unanswered (each takes its whole timeout).
    hang: bool = False
    #: The one-token probe of a server that fails requests succeeds.
    probe_ok: bool = True
    #: What its process shows (serve/backend.py Vitals); None: nothing can tell, only the slow
    #: hang rule applies.
    vitals: Vitals | None = None
    #: Models (InstanceConfig.model) whose every start fails with code 1.
    fail_models: set[str] = field(default_factory=set)


class FakeBackend:
    """A Backend on the fake clock; `crash()` ends it as a signal would."""

    def __init__(self, factory: FakeBackends, config: Any) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.config = config
        self.host = "127.0.0.1"
        self.port = 20000 + len(factory.made)
        self.api_key: str | None = f"key-{len(factory.made)}"
        self.pid: int | None = None
        self.returncode: int | None = None
        self.attached = False
        self.started_at = 0.0
        self.last_line_at = 0.0
        self.log_path = f"/fake/{config.name}.log"
        self.lines: list[str] = []
        self.clash = False
        self.stopped = False
        self.killed = False
        self._exited: asyncio.Event | None = None

    def start(self) -> None:
        self.attached = True
        self.pid = 40000 + self.port
        self.started_at = self.last_line_at = self.clock()
        self._exited = asyncio.Event()
        self.lines.append("llama server listening")

    def _end(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self.pid = None
        assert self._exited is not None
        self._exited.set()

    def crash(self, code: int = -9) -> None:
        self._end(code)

    async def wait_ready(self, *, stall_timeout: float, max_timeout: float) -> float:
        assert self._exited is not None
        script = self.factory.script
        if script.clashes > 0:
            script.clashes -= 1
            self.clash = True
            self.lines.append("couldn't bind HTTP server socket")
            self._end(1)
        elif script.fail_start is not None:
            self.lines.append("error loading model")
            self._end(script.fail_start)
        elif getattr(self.config, "model", None) in script.fail_models:
            self.lines.append("llama_model_load: error loading model: invalid magic")
            self._end(1)
        if self.returncode is None:
            loaded = asyncio.ensure_future(self.clock.sleep(script.load_time))
            exited = asyncio.ensure_future(self._exited.wait())
            try:
                await asyncio.wait({loaded, exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loaded.cancel()
                exited.cancel()
        code = self.returncode
        if code is not None:
            what = f"llama-server exited with code {code} while starting"
            if code < 0:
                what = f"llama-server exited while starting ({describe_exit(code)})"
            raise self.start_error(what)
        return self.clock() - self.started_at

    async def wait_exit(self) -> int | None:
        assert self._exited is not None
        await self._exited.wait()
        return self.returncode

    async def health(self, timeout: float = 3.0) -> int | None:
        if self.returncode is not None:
            return None
        if self.factory.script.hang:
            await self.clock.sleep(timeout)
            return None
        return 200

    async def probe(self, auth: bytes | None) -> bool:
        self.factory.probes += 1
        return self.factory.script.probe_ok

    async def stop(self, grace: float = 5.0) -> int | None:
        self.stopped = True
        if self._exited is not None:
            self._end(-15)
        return self.returncode

    def vitals(self) -> Vitals | None:
        return self.factory.script.vitals if self.returncode is None else None

    def kill_now(self) -> None:
        self.killed = True
        self._end(-9)

    def tail(self, n: int = 20) -> list[str]:
        return self.lines[-n:]

    def port_clash(self) -> bool:
        return self.clash

    def describe_exit(self, code: int) -> str:
        return describe_exit(code)

    def start_error(self, what: str) -> ServerStartError:
        quoted = "\n".join(f"  | {line}" for line in self.tail(8))
        return ServerStartError(f"{what}\nlast lines of {self.log_path}:\n{quoted}")


@dataclass
class FakeBackends:
    """The BackendFactory: every backend it made, in order, and the script they follow."""

    clock: FakeClock
    script: Script = field(default_factory=Script)
    made: list[FakeBackend] = field(default_factory=list)
    probes: int = 0

    def __call__(self, config: Any) -> FakeBackend:
        backend = FakeBackend(self, config)
        self.made.append(backend)
        return backend
