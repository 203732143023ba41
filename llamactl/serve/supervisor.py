"""Supervised instances: named states, restart with backoff, crash loops, hangs, broken
servers; and the proxy's view of them (acquire / release, serve/upstream.py).

Instances are managed through the Backend protocol only (serve/backend.py), and time through
the clock and sleep seams, so that tests drive it on a fake backend and a fake clock."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamactl.errors import ServerStartError
from llamactl.serve import rpc
from llamactl.serve.backend import (
    Backend,
    BackendFactory,
    Clock,
    InstanceConfig,
    Sleep,
    Vitals,
)
from llamactl.serve.upstream import ProxyError, Upstream

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    """The one state each instance is in."""

    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class Policy:
    """How hard to try: all the knobs of supervision in one value."""

    queue_timeout: float = 120.0  # how long a request waits for a starting instance
    stall_timeout: float = 120.0  # start: seconds without log progress before giving up
    max_start: float = 3600.0  # start: the bound in all
    backoff_initial: float = 0.25
    backoff_max: float = 30.0
    crash_limit: int = 5  # this many failures ...
    crash_window: float = 60.0  # ... within this many seconds is a crash loop
    health_interval: float = 2.0  # while ready: how often /health is asked
    health_timeout: float = 5.0
    hung_after: int = 3  # consecutive unanswered health checks before a kill
    #: The fast way to a hang: /health unanswered for `quick_timeout` s while the process shows
    #: no sign of life (stopped by SIGSTOP, or: no CPU time used, no thread runnable or in disk
    #: I/O, no log line, no request answered) is a sure miss; `sure_after` of them in a row,
    #: `recheck_after` s apart, kill it. Anything alive on a loaded machine uses CPU, waits
    #: for one, or waits for the disk, so load alone never makes a sure miss (docs/reliability.md).
    quick_timeout: float = 1.0
    sure_after: int = 2
    recheck_after: float = 0.5
    broken_after: int = 5  # consecutive upstream 5xx / transport failures before a probe
    stop_grace: float = 5.0
    #: A first start that llama-server ends by exiting (a bad flag, a bad model file, no memory)
    #: fails at once: serve exits with the diagnosis, as a retry cannot help. One ended by a
    #: signal (a kill from outside, a crash) is retried up to this many times, as after a crash
    #: of a ready server; not more, as the out-of-memory killer would kill every try.
    first_start_retries: int = 2
    #: Starts that fail because the private port was taken meanwhile (free_port's answer is only
    #: free when asked) are retried at once on another port, this many times, and are not
    #: counted as crashes.
    port_retries: int = 5
    #: While an RPC worker of an instance is gone: how often it is asked for its hello.
    worker_poll: float = 0.5
    worker_probe_timeout: float = 2.0
    #: While ready: how often a head's workers are checked, and how long a hello may wait
    #: (a worker serving its head does not answer: that is the good case).
    worker_check_interval: float = 2.0
    worker_busy_timeout: float = 0.5


@dataclass
class Instance:
    """One supervised llama-server and its history."""

    config: InstanceConfig
    state: State = State.STOPPED
    restarts: int = 0
    generation: int = 0
    last_error: str | None = None
    last_exit: int | None = None  # the exit code of the last failed start; None: never exited
    backend: Backend | None = None
    upstream: Upstream | None = None
    ready_at: float | None = None
    failures: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=64))
    consecutive_bad: int = 0
    #: The generation that was killed as hung: a request it never answered is sent again.
    hung_generation: int = -1
    in_flight: int = 0
    last_ok: float = 0.0  # clock time of the last request answered below 500
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = 0.0  # clock time of the last request given to it
    slots: int = 1 << 30  # parallel slots (llama-server's /props total_slots); unknown: many
    failed_at: float | None = None  # clock time of its last failed load
    #: Called on every change of state (the supervisor drops the express lane's routes).
    watch: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def process(self) -> Backend | None:
        """The current backend (the name from when it could only be a local process)."""
        return self.backend

    def set_state(self, state: State, reason: str) -> None:
        if state is not self.state:
            log.info("instance %s: %s -> %s (%s)", self.name, self.state.value, state.value, reason)
        self.state = state
        if self.watch is not None:
            self.watch()
        if state is State.READY:
            self.ready_event.set()
        else:
            self.ready_event.clear()


class Supervisor:
    """Runs instances and answers the proxy's acquire/release calls."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        on_change: Callable[[Supervisor], None] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        backend_factory: BackendFactory | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.instances: dict[str, Instance] = {}
        self._on_change = on_change
        self._clock = clock
        self._sleep = sleep
        if backend_factory is None:
            from llamactl.serve.server import local_backend

            backend_factory = local_backend
        self._new_backend = backend_factory
        self._stopping = False
        #: The proxy's express lane (serve/express.py) while it runs: its learned routes go
        #: on any change of an instance's state.
        self._lane: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def add(self, config: InstanceConfig, process: Backend | None = None) -> Instance:
        """A new instance; `process`, when given, is its backend already spawned (serve spawns
        its llama-server before the event loop exists, to save start-up time), adopted by
        `start`."""
        inst = Instance(config=config, backend=process)
        inst.watch = self._routes_changed
        self.instances[config.name] = inst
        return inst

    def attach_lane(self, lane: Any) -> None:
        """The proxy's express lane (None: it stopped); see serve/express.py."""
        self._lane = lane

    def _routes_changed(self) -> None:
        if self._lane is not None:
            self._lane.clear()

    async def start(self, name: str) -> Instance:
        """First start of an instance, then its supervision. A failure is raised (serve exits
        with the diagnosis) unless llama-server was killed by a signal: that is retried, up to
        policy.first_start_retries times (see there)."""
        inst = self.instances[name]
        tries = 0
        while True:
            try:
                await self._start_once(inst)
                break
            except ServerStartError as exc:
                code = inst.last_exit
                killed = code is not None and code < 0
                # A worker lost while the model loaded over RPC: wait for it, then try again.
                lost_worker = await self._wait_for_workers(inst, exc.message.splitlines()[0])
                if tries >= self.policy.first_start_retries or not (killed or lost_worker):
                    raise
                tries += 1
                inst.failures.append(self._clock())
                delay = self._backoff_delay(inst)
                log.warning(
                    "instance %s: %s; starting again in %.2f s",
                    inst.name,
                    exc.message.splitlines()[0],
                    delay,
                )
                inst.set_state(State.BACKOFF, f"killed while starting; again in {delay:.2f} s")
                self._notify()
                await self._sleep(delay)
        inst.task = asyncio.get_running_loop().create_task(self._supervise(inst))
        return inst

    async def close(self) -> None:
        """Stop every instance for sure."""
        self._stopping = True
        for inst in self.instances.values():
            if inst.task is not None:
                inst.task.cancel()
        for inst in self.instances.values():
            if inst.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await inst.task
            await self._stop_process(inst, "llamactl is stopping")
            inst.set_state(State.STOPPED, "llamactl is stopping")
        self._notify()

    async def _start_once(self, inst: Instance) -> None:
        """Start a fresh backend (a new private port and key) and wait until it is healthy; a
        port taken meanwhile is no failure: another port, at once (policy.port_retries)."""
        cfg = inst.config
        clashes = 0
        while True:
            process = inst.backend
            if process is None or process.attached:  # not a fresh pre-spawned one: a new one
                process = self._new_backend(cfg)
                inst.backend = process
            inst.set_state(State.STARTING, "spawning llama-server")
            process.start()
            self._notify()  # after the spawn: ps reads a loading instance's pid in the record
            try:
                await process.wait_ready(
                    stall_timeout=self.policy.stall_timeout,
                    max_timeout=self.policy.max_start,
                )
                break
            except ServerStartError as exc:
                inst.last_exit = process.returncode  # before our stop can set it
                if process.port_clash() and clashes < self.policy.port_retries:
                    clashes += 1
                    log.warning(
                        "instance %s: port %d was taken before llama-server could listen on "
                        "it; starting again on another port",
                        inst.name,
                        process.port,
                    )
                    await self._stop_process(inst, "its port was taken")
                    continue
                inst.last_error = exc.message
                await self._stop_process(inst, "failed to start")
                raise
            except BaseException:
                await self._stop_process(inst, "start interrupted")
                raise
        key = process.api_key
        inst.generation += 1
        inst.upstream = Upstream(
            name=cfg.name,
            host=process.host,
            port=process.port,
            auth=f"Bearer {key}".encode() if key else None,
            generation=inst.generation,
        )
        inst.consecutive_bad = 0
        inst.broken.clear()
        inst.ready_at = self._clock()
        inst.set_state(State.READY, f"healthy on port {process.port}")
        self._notify()

    async def _stop_process(self, inst: Instance, reason: str) -> None:
        process = inst.backend
        if process is None:
            return
        inst.upstream = None
        if process.returncode is None or inst.state is State.READY:
            # Never READY without an upstream: acquire would spin on the set ready event.
            inst.set_state(State.STOPPING, reason)
        await process.stop(grace=self.policy.stop_grace)

    def _recent_failures(self, inst: Instance) -> int:
        return sum(1 for t in inst.failures if self._clock() - t < self.policy.crash_window)

    def _backoff_delay(self, inst: Instance) -> float:
        return min(
            self.policy.backoff_max,
            self.policy.backoff_initial * 2 ** max(0, self._recent_failures(inst) - 1),
        )

    async def _supervise(self, inst: Instance) -> None:
        """Watch a ready instance; restart it when it exits, hangs or is broken."""
        while not self._stopping:
            reason = await self._watch(inst)
            if self._stopping:
                return
            down_since = self._clock()
            lost = self._lost_worker(inst, reason)
            if lost:
                reason = f"{reason}: {lost} (not counted as a crash)"
            # Warnings: serve logs at WARNING, and whoever runs it should see each failure.
            log.warning("instance %s: %s; restarting it", inst.name, reason)
            inst.last_error = reason
            await self._stop_process(inst, reason)
            if not (await self._wait_for_workers(inst, reason) or lost):
                # A head that died with its worker is not a crash of its own: a worker lost is
                # waited for (or is back already), not counted against the crash-loop budget.
                inst.failures.append(down_since)
            while not self._stopping:
                recent = self._recent_failures(inst)
                if recent >= self.policy.crash_limit:
                    inst.set_state(
                        State.FAILED,
                        f"{recent} failures within {self.policy.crash_window:g} s: {reason}",
                    )
                    log.error(
                        "instance %s: %d failures within %g s; not restarted again "
                        "(clients get 503): %s",
                        inst.name,
                        recent,
                        self.policy.crash_window,
                        reason,
                    )
                    self._notify()
                    return
                delay = self._backoff_delay(inst)
                inst.set_state(State.BACKOFF, f"{reason}; restarting in {delay:.2f} s")
                self._notify()
                await self._sleep(delay)
                try:
                    await self._start_once(inst)
                    inst.restarts += 1
                    log.warning(
                        "instance %s: ready again after %.2f s (restart %d)",
                        inst.name,
                        self._clock() - down_since,
                        inst.restarts,
                    )
                    self._notify()
                    break
                except ServerStartError as exc:
                    reason = exc.message.splitlines()[0]
                    log.warning("instance %s: restart failed: %s", inst.name, reason)
                    inst.last_error = exc.message
                    if not await self._wait_for_workers(inst, reason):
                        inst.failures.append(self._clock())

    def _lost_worker(self, inst: Instance, reason: str = "") -> str | None:
        """Why the head of an RPC-backed instance died, when its log says a worker was lost
        (ggml-rpc.cpp aborts with these lines) or the worker watch said so; None otherwise."""
        if not inst.config.rpc_workers or inst.process is None:
            return None
        if reason.startswith("RPC worker "):
            return "an RPC worker was lost"
        for line in reversed(inst.process.tail(80)):
            if "Remote RPC server crashed" in line or "Failed to connect to" in line:
                return "an RPC worker was lost"
        return None

    async def _wait_for_workers(self, inst: Instance, reason: str) -> bool:
        """When a worker of the instance does not answer its hello, wait (state BACKOFF, named
        in the reason) until every worker does; True when there was a wait. Stopping ends it."""
        workers = inst.config.rpc_workers
        if not workers:
            return False
        waited = False
        while not self._stopping:
            probes = await asyncio.gather(
                *(rpc.probe_async(w, timeout=self.policy.worker_probe_timeout) for w in workers)
            )
            missing = [p for p in probes if not p.ok]
            if not missing:
                if waited:
                    log.warning("instance %s: every RPC worker answers again", inst.name)
                return waited
            what = "; ".join(f"RPC worker {p.endpoint} {p.problem}" for p in missing)
            if not waited:
                log.warning("instance %s: %s; waiting for it: %s", inst.name, reason, what)
            waited = True
            inst.last_error = f"waiting for {what}"
            names = ", ".join(str(p.endpoint) for p in missing)
            inst.set_state(State.BACKOFF, f"waiting for {names}")
            self._notify()
            await self._sleep(self.policy.worker_poll)
        return waited

    async def _watch(self, inst: Instance) -> str:
        """Wait until the instance needs a restart; say why."""
        process = inst.backend
        assert process is not None
        exited = asyncio.ensure_future(process.wait_exit())
        broken = asyncio.ensure_future(inst.broken.wait())
        # A head over RPC workers: also watch that each worker still serves it.
        workers = asyncio.ensure_future(
            self._watch_workers(inst) if inst.config.rpc_workers else asyncio.Event().wait()
        )
        policy = self.policy
        misses = sure = 0
        try:
            while True:
                tick = asyncio.ensure_future(
                    self._sleep(policy.recheck_after if sure else policy.health_interval)
                )
                try:
                    done, _ = await asyncio.wait(
                        {exited, broken, tick, workers}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    tick.cancel()
                if workers in done:
                    return str(workers.result())
                if exited in done:
                    code = exited.result()
                    how = "?" if code is None else process.describe_exit(code)
                    return f"llama-server exited unexpectedly ({how})"
                if broken in done:
                    return "llama-server answers /health but fails every request"
                window = self._clock()
                before = process.vitals()
                check = asyncio.ensure_future(process.health(timeout=policy.health_timeout))
                quick = asyncio.ensure_future(self._sleep(policy.quick_timeout))
                try:
                    await asyncio.wait({check, quick}, return_when=asyncio.FIRST_COMPLETED)
                    if not check.done():
                        lifeless = self._lifeless(inst, before, window)
                        if lifeless is not None:
                            sure += 1
                            if sure >= policy.sure_after:
                                return self._kill_hung(inst, lifeless)
                            continue
                    sure = 0
                    status = await check
                finally:
                    check.cancel()
                    quick.cancel()
                if status is None and process.returncode is None:
                    if max(process.last_line_at, inst.last_ok) > window:
                        # A new log line or a request answered since this check began: busy
                        # (on a loaded machine /health can wait seconds), not hung.
                        misses = 0
                        continue
                    misses += 1
                    if misses >= policy.hung_after:
                        return self._kill_hung(
                            inst, f"llama-server stopped answering /health ({misses} checks)"
                        )
                else:
                    misses = 0
        finally:
            exited.cancel()
            broken.cancel()
            workers.cancel()

    async def _watch_workers(self, inst: Instance) -> str:
        """While a head runs, each of its workers is busy serving it (a worker serves one
        client at a time, and llama-server holds its connections). A worker seen busy that
        then answers a hello has lost the head's connection (it was restarted: the head would
        abort on its next request); one that then refuses connections is gone. Either way
        the head cannot go on: the reason, so that it is restarted once the worker answers.
        A worker never seen busy (one the head does not use) is left alone.

        Where the head is a local process, its own connections tell first and without a probe
        (/proc): the worker's end of one closed (the head's side in CLOSE_WAIT) is a lost
        worker. Probes cannot always tell: ggml-rpc-server listens with a backlog of one, so
        while a head holds it, the probes given up on fill its queue and the next connect
        times out instead of showing the worker busy."""
        seen_busy: set[rpc.Endpoint] = set()
        addresses = await self._worker_addresses(inst.config.rpc_workers)
        first = True
        while True:
            # The first look at once: a worker lost before it would go unseen.
            if not first:
                await self._sleep(self.policy.worker_check_interval)
            first = False
            pid = inst.backend.pid if inst.backend is not None else None
            links = rpc.process_links(pid) if pid is not None else None
            if links is not None:
                lost = rpc.lost_links(links, addresses)
                if lost:
                    return (
                        f"RPC worker {lost[0]} closed the head's connection: it was restarted "
                        "or stopped, and the head cannot go on without it"
                    )
                continue  # the head's links say it all: no probe to fill a worker's queue
            probes = await asyncio.gather(
                *(
                    rpc.probe_async(w, timeout=self.policy.worker_busy_timeout)
                    for w in inst.config.rpc_workers
                )
            )
            for p in probes:
                if p.busy:
                    seen_busy.add(p.endpoint)
                elif p.endpoint in seen_busy and p.ok:
                    return (
                        f"RPC worker {p.endpoint} answers a new client: it was restarted, and "
                        "the head's connection to it is gone"
                    )
                elif p.endpoint in seen_busy and p.problem and "refuses" in p.problem:
                    return f"RPC worker {p.endpoint} is gone ({p.problem})"

    @staticmethod
    async def _worker_addresses(
        workers: tuple[rpc.Endpoint, ...],
    ) -> dict[tuple[str, int], rpc.Endpoint]:
        """Each worker under the addresses its name resolves to, as /proc lists them."""
        loop = asyncio.get_running_loop()
        addresses: dict[tuple[str, int], rpc.Endpoint] = {}
        for w in workers:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(w.host, w.port, type=socket.SOCK_STREAM), 5.0
                )
            except (OSError, asyncio.TimeoutError):
                continue
            for info in infos:
                addresses[(str(info[4][0]), w.port)] = w
        return addresses

    def _lifeless(self, inst: Instance, before: Vitals | None, since: float) -> str | None:
        """Why a server whose /health is late is surely hung, or None when it may be busy."""
        process = inst.backend
        assert process is not None
        now = process.vitals()
        if before is None or now is None:
            return None  # no /proc: only the slow rule (hung_after) decides
        if now.stopped:
            return "llama-server is stopped (SIGSTOP) and cannot answer"
        if max(process.last_line_at, inst.last_ok) > since:
            return None
        if now.active or now.cpu_ticks != before.cpu_ticks:
            return None
        return "llama-server stopped answering /health and shows no sign of life"

    def _kill_hung(self, inst: Instance, reason: str) -> str:
        # First mark the generation: requests that got no answer from it are sent again to
        # its successor when their connections fail (Supervisor.replayable).
        inst.hung_generation = inst.generation
        assert inst.backend is not None
        inst.backend.kill_now()
        return reason

    # -- the proxy's side ---------------------------------------------------------------------

    def pick(self, model: str | None) -> Instance:
        """Which instance serves a request. One instance today: it serves every model name,
        as llama-server itself accepts any `model`."""
        if not self.instances:
            raise ProxyError(503, "no model is being served", "unavailable_error", "no_instance")
        return next(iter(self.instances.values()))

    def is_ready(self, model: str | None = None) -> bool:
        try:
            return self.pick(model).state is State.READY
        except ProxyError:
            return False

    def acquire_nowait(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream | None:
        """acquire's answer when the instance is ready (no wait), else None: the proxy calls
        this first, with no coroutine."""
        inst = next(iter(self.instances.values()), None)  # the one instance (pick)
        if inst is not None and inst.state is State.READY and inst.upstream is not None:
            process = inst.backend
            if process is None or process.returncode is None:
                inst.in_flight += 1
                return inst.upstream
        return None

    def express_route(self, model: str | None) -> Upstream | None:
        """Where the express lane may send a slot-free request naming `model` (any: one
        instance serves every name) without a wait or a lease: the ready instance, else None."""
        inst = next(iter(self.instances.values()), None)
        if inst is None or inst.state is not State.READY or inst.upstream is None:
            return None
        process = inst.backend
        return inst.upstream if process is None or process.returncode is None else None

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        """The upstream for a request, waiting (up to the queue bound) while it starts."""
        inst = self.pick(model)
        deadline = self._clock() + self.policy.queue_timeout
        while True:
            if inst.state is State.READY and inst.upstream is not None:
                process = inst.backend
                if process is None or process.returncode is None:
                    inst.in_flight += 1
                    return inst.upstream
                # Died a moment ago and the watcher has not seen it yet: wait for the restart
                # instead of sending this request to a dead port.
                inst.set_state(State.BACKOFF, "llama-server exited")
            if inst.state is State.FAILED or (self._stopping and inst.state is State.STOPPED):
                # The first line only: the log lines after it are for the operator (`llamactl
                # logs`), not for every client.
                reason = (inst.last_error or "unknown reason").splitlines()[0]
                raise ProxyError(
                    503,
                    f"the model server failed and was not restarted: {reason}",
                    "unavailable_error",
                    "instance_failed",
                )
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ProxyError(
                    503,
                    "the model server is still starting; retry shortly",
                    "unavailable_error",
                    "instance_starting",
                    retry_after=5,
                )
            # Ready wakes every waiter at once; a failure is noticed within half a second.
            await self._wait_event(inst.ready_event, min(remaining, 0.5))

    def replayable(self, upstream: Upstream) -> bool:
        """Whether a request sent to `upstream` that got no byte of an answer may be sent
        again: its llama-server was killed as hung, so the request did not fail there; a
        server that died by itself might have died of the request, which is not replayed."""
        inst = self.instances.get(upstream.name)
        return inst is not None and inst.hung_generation == upstream.generation

    async def stop_instance(self, name: str, reason: str) -> None:
        """Stop one instance for sure and leave it STOPPED (unloaded); it can start again."""
        inst = self.instances[name]
        task, inst.task = inst.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_process(inst, reason)
        inst.upstream = None
        inst.set_state(State.STOPPED, reason)
        self._notify()

    def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        """Count the outcome: many 5xx or transport failures in a row on a server that still
        answers /health make a probe; a failed probe means broken, and a restart."""
        inst = self.instances.get(upstream.name)
        if inst is None:
            return
        inst.in_flight = max(0, inst.in_flight - 1)
        self._outcome(inst, upstream, outcome)

    def note(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        """A request the express lane served (no lease): counted as release counts it."""
        inst = self.instances.get(upstream.name)
        if inst is None:
            return
        inst.last_used = self._clock()
        self._outcome(inst, upstream, outcome)

    def _outcome(self, inst: Instance, upstream: Upstream, outcome: int) -> None:
        if upstream.generation != inst.generation:
            return
        if 0 < outcome < 500 or outcome == 501:
            # 501: an endpoint this server does not offer (/completion on an embedding
            # server): the client's mistake, answered by a working server.
            inst.last_ok = self._clock()
        if outcome == 0 or (outcome >= 500 and outcome not in (501, 503)):
            inst.consecutive_bad += 1
            if inst.consecutive_bad == self.policy.broken_after:
                asyncio.get_running_loop().create_task(self._probe(inst, upstream))
        else:
            inst.consecutive_bad = 0

    async def _probe(self, inst: Instance, upstream: Upstream) -> None:
        """One tiny real job on an endpoint the server offers (LocalServer.probe): the server
        is broken only if this fails too."""
        process = inst.backend
        ok = process is not None and await process.probe(upstream.auth)
        if not ok and upstream.generation == inst.generation:
            inst.broken.set()
        else:
            inst.consecutive_bad = 0

    async def _wait_event(self, event: asyncio.Event, timeout: float) -> None:
        """Until `event` is set or `timeout` seconds pass on the supervisor's clock."""
        if event.is_set():
            return
        waiter = asyncio.ensure_future(event.wait())
        timer = asyncio.ensure_future(self._sleep(timeout))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self)
            except Exception:  # a state file that cannot be written must not stop serving
                log.exception("state record update failed")
