"""Several models behind one serve: each model is its own supervised llama-server (a private
port and key), and every request goes straight to the right one by its `model`. Loads on
demand (one start for every waiter), evicts least recently used first (never a pinned model,
never one serving a request: the newcomer waits until it is idle, bounded), loads in the order
requests arrived, unloads idle models after their TTL, spreads requests over replicas by free
slots, and answers router mode's control API through the control server (serve/control.py).

The decisions are router.route()'s (pure); this module carries them out and owns the effects.
The proxy sees only the UpstreamProvider contract (serve/upstream.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from llamactl.errors import LlamactlError
from llamactl.serve import answers, conversations
from llamactl.serve.answers import first_line as _first_line
from llamactl.serve.backend import Clock, Sleep
from llamactl.serve.config import Fleet, ModelDecl
from llamactl.serve.control import CONTROL, ControlServer, Reply, http_get, http_post
from llamactl.serve.http import Cors
from llamactl.serve.metrics import Metrics
from llamactl.serve.placement import (
    FreeMemory,
    cpu_threads,
    device_env,
    device_flags,
    gpu_label,
    user_placed,
)
from llamactl.serve.router import Decision, Gpu, Limits, Seen, expired, route, size
from llamactl.serve.rpc import rpc_endpoints_in, wait_for_workers_async
from llamactl.serve.supervisor import Instance, InstanceConfig, State, Supervisor
from llamactl.serve.upstream import ProxyError, Upstream

log = logging.getLogger(__name__)

__all__ = ["CONTROL_PATHS", "ModelFleet"]

#: Paths llamactl answers itself when it serves several models (router mode's own routes).
CONTROL_PATHS = frozenset(
    {b"/health", b"/v1/health", b"/models", b"/v1/models", b"/models/load", b"/models/unload"}
)
#: Paths llamactl answers itself when no model is named (router mode's /props and /metrics).
CONTROL_UNNAMED = frozenset({b"/metrics", b"/props"})
_LIVE = (State.STARTING, State.READY, State.BACKOFF, State.STOPPING)


class _Busy(Exception):
    """A model to evict is still generating after the drain bound."""


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.#" else "_" for c in name)[:80]


class ModelFleet:
    """The UpstreamProvider of a serve with several models."""

    def __init__(
        self,
        fleet: Fleet,
        supervisor: Supervisor,
        *,
        binary: Path,
        log_dir: Path,
        record_id: str,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        memory: Callable[[], int | None] | None = None,
        gpus: Callable[[], list[Gpu] | None] | None = None,
        resolve: Callable[[ModelDecl], Path] | None = None,
        estimate: Callable[[Path, tuple[str, ...]], int] | None = None,
        fetch: Callable[..., Any] = http_get,
        post: Callable[..., Any] = http_post,
        drain_timeout: float = 30.0,
        echo: Callable[[bytes], None] | None = None,
        worker_wait: float = 60.0,
        hold: float = 0.0,
        build_info: Callable[[], str] = lambda: "",
        redeclare: Callable[[], Fleet] | None = None,
        cors: Cors | None = None,
        cpus: int = 0,
    ) -> None:
        #: A CPU build's CPUs, shared out among the instances that may run at once; 0: a GPU
        #: build (or asked not to), each llama-server takes llama.cpp's default threads.
        self.cpus = cpus
        #: Where every llama-server's output goes besides its log file (serve's stderr).
        self.echo = echo
        self.supervisor = supervisor
        self.binary = binary
        self.log_dir = log_dir
        self.record_id = record_id
        self._clock = clock
        self._sleep = sleep
        self._memory = memory if memory is not None else FreeMemory(gpu=False)
        #: Free memory per GPU (a CUDA build): each model is placed on one (router.route).
        self._gpus = gpus
        self._resolve_source = resolve if resolve is not None else _resolve_source
        self._estimate = estimate if estimate is not None else _estimate_bytes
        self._fetch = fetch
        self._post = post
        #: Which instance owns each conversation's resumable stream (serve/conversations.py).
        self.conversations = conversations.Conversations()
        #: The proxy's express lane while it runs (attach_lane).
        self._lane: Any = None
        self.drain_timeout = drain_timeout
        self.worker_wait = worker_wait
        #: Seconds each request holds its model busy before it is sent, and each load waits
        #: first: router mode's LLAMA_SERVER_DEBUG_FAKE_TIMING (2 s) for its tests; else 0.
        self.hold = hold
        self._build_info = build_info
        #: The models as the serve's flags and files declare them now (GET /models?reload=1).
        self._redeclare = redeclare
        self._declare(fleet)
        self._need: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._fast: dict[str | None, Instance] = {}
        self._changed = asyncio.Event()
        self._waiters = 0
        self._queued: collections.Counter[str] = collections.Counter()
        #: Models that requests wait for, in arrival order (dicts keep it), with how many
        #: requests wait: one entry per model, as router mode's queue has.
        self._line: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unloading: set[str] = set()
        self.metrics = Metrics()
        # Preflights (OPTIONS) are the router's to answer, as router mode's HTTP layer does,
        # whatever model or path they name: no model loads for one.
        self.control = ControlServer(self.handle_control, cors=cors)
        self._control_upstream = self.control.upstream
        self._reaper: asyncio.Task[None] | None = None

    def _declare(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.decls = {d.name: d for d in fleet.models}
        self._names = fleet.names()
        if len(fleet.models) == 1:
            self._names[None] = fleet.models[0]  # type: ignore[index]
        self._ttl = {d.name: d.ttl for d in fleet.models if d.ttl is not None}

    def reload(self) -> None:
        """Router mode's GET /models?reload=1: read the preset, models folder and config again;
        a model removed or changed is unloaded (the changed one loads anew on demand)."""
        if self._redeclare is None:
            return
        try:
            fleet = self._redeclare()
        except LlamactlError as exc:
            raise ProxyError(400, f"cannot reload the models: {exc.message}") from None
        new = {d.name: d for d in fleet.models}
        gone = {name for name, decl in self.decls.items() if new.get(name) != decl}
        for name in gone:
            self._need.pop(name, None)
            self._paths.pop(name, None)
            for inst in list(self.supervisor.instances.values()):
                if inst.config.model == name and inst.state in _LIVE:
                    self._spawn(self._unload(inst.name, "its declaration changed (reload)"))
        if gone or new.keys() - self.decls.keys():
            log.info("models reloaded: %s", ", ".join(new))
        self._declare(replace(fleet, models_max=self.fleet.models_max))
        self.changed()

    # -- life ------------------------------------------------------------------------------

    async def start(self, *, control: bool = True) -> None:
        """Start the control server (tests of the decisions go without), the idle reaper and
        the models loaded at start-up."""
        if control:
            await self.control.start()
            self._control_upstream = self.control.upstream
        if self._ttl:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        for decl in self.fleet.models:
            if decl.load_on_startup or decl.pinned:
                self.request_load(decl.name, reason="load on start-up")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.control.close()

    def changed(self) -> None:
        """Something changed state (the supervisor's on_change): drop the fast lookups and
        wake every waiter to decide again."""
        self._fast.clear()
        self._pulse()

    def _pulse(self) -> None:
        ev = self._changed
        self._changed = asyncio.Event()
        ev.set()

    async def _wait_change(self, timeout: float) -> None:
        """Until something changes state, a request ends, or `timeout` passes (fake-able)."""
        ev = self._changed
        self._waiters += 1
        waiter = asyncio.ensure_future(ev.wait())
        timer = asyncio.ensure_future(self._sleep(timeout))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters -= 1
            waiter.cancel()
            timer.cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the proxy's side ------------------------------------------------------------------

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        """The upstream for a request: llamactl's control server for its own paths, else the
        model's instance (loaded on demand, waited for, bounded)."""
        if self._controls(model, method, path):
            return self._control_upstream
        upstream = self._ready(model) or await self._acquire_slow(model)
        if self.hold:
            try:
                await self._sleep(self.hold)  # counted in flight: the model is busy meanwhile
            except asyncio.CancelledError:
                self.release(upstream, 499)
                raise
        return upstream

    async def acquire_conversation(
        self, model: str | None, method: bytes, path: bytes, url: bytes, conv: bytes | None
    ) -> Upstream:
        """acquire for a request with an X-Conversation-Id, or on a resumable stream's route
        (the proxy calls this instead): routed by conversation (serve/conversations.py)."""
        return await conversations.acquire(self, model, method, path, url, conv)

    def acquire_nowait(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream | None:
        """acquire's answer when it needs neither a wait nor a decision (the model is loaded
        and has a free slot), else None: the proxy calls this first, with no coroutine."""
        if self._controls(model, method, path):
            return self._control_upstream
        return None if self.hold else self._ready(model)

    def _controls(self, model: str | None, method: bytes, path: bytes) -> bool:
        """Whether llamactl answers this itself: its own paths, and preflights."""
        return (
            path in CONTROL_PATHS
            or (model is None and path in CONTROL_UNNAMED)
            or (method == b"OPTIONS" and self.control.cors is not None)
        )

    def _ready(self, model: str | None) -> Upstream | None:
        inst = self._fast.get(model)
        if inst is not None and inst.state is State.READY and inst.in_flight < inst.slots:
            upstream = inst.upstream
            backend = inst.backend
            if upstream is not None and (backend is None or backend.returncode is None):
                inst.in_flight += 1
                inst.last_used = self._clock()
                return upstream
        return None

    def replayable(self, upstream: Upstream) -> bool:
        return upstream.name != CONTROL and self.supervisor.replayable(upstream)

    def attach_lane(self, lane: Any) -> None:
        """The proxy's express lane (None: it stopped): its routes go on any change of state
        (the supervisor's watch), and its exchanges count in every decision (_seen)."""
        self._lane = lane
        self.supervisor.attach_lane(lane)

    def express_route(self, model: str | None) -> Upstream | None:
        """Where the express lane may send a slot-free request naming `model`, without a wait
        or a lease: the instance the fast path holds for that name (one replica, ready)."""
        inst = self._fast.get(model)
        if inst is None:
            # Not routed since the last change: the one ready instance of a single-replica model.
            decl = self._names.get(model)  # type: ignore[arg-type]
            if decl is None or decl.replicas != 1:
                return None
            ready = [
                i
                for i in self.supervisor.instances.values()
                if i.config.model == decl.name and i.state is State.READY
            ]
            inst = ready[0] if len(ready) == 1 else None
        if self.hold or inst is None or inst.state is not State.READY:
            return None
        backend = inst.backend
        if inst.upstream is None or (backend is not None and backend.returncode is not None):
            return None
        return inst.upstream

    def _lane_in_flight(self, name: str) -> int:
        return self._lane.in_flight(name) if self._lane is not None else 0

    def note(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        """A request the express lane served: counted as release counts one (no lease)."""
        inst = self.supervisor.instances.get(upstream.name)
        self.supervisor.note(upstream, outcome, elapsed)
        if inst is not None and inst.config.model is not None:
            self.metrics.request_done(inst.config.model, outcome, elapsed)

    def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        if upstream.name == CONTROL:
            return
        inst = self.supervisor.instances.get(upstream.name)
        self.supervisor.release(upstream, outcome, elapsed)
        if inst is not None and inst.config.model is not None:
            self.metrics.request_done(inst.config.model, outcome, elapsed)
        if self._waiters:
            self._pulse()

    def resolve(self, model: str | None) -> ModelDecl:
        """The declared model a request names (aliases resolve); 404 naming the known ones."""
        decl = self._names.get(model)  # type: ignore[arg-type]
        if decl is not None:
            return decl
        known = ", ".join(sorted(self.decls))
        if model is None:
            raise ProxyError(
                400,
                f"model name is missing from the request; known models: {known}",
                code="model_required",
            )
        raise ProxyError(
            404,
            f"model {model!r} not found; known models: {known}",
            "not_found_error",
            "model_not_found",
        )

    def _seen(self) -> list[Seen]:
        if self._lane is not None:
            self._lane.sync()  # last use and outcomes of what the lane served, up to now
        return [
            Seen(
                name=i.name,
                model=i.config.model or i.name,
                state=i.state.value,
                in_flight=i.in_flight + self._lane_in_flight(i.name),
                last_used=i.last_used,
                pinned=i.config.pinned,
                bytes=i.config.estimate_bytes,
                slots=i.slots,
                groups=i.config.groups,
                failed_at=i.failed_at,
                gpu=i.config.gpu,
            )
            for i in self.supervisor.instances.values()
        ]

    def _limits(self, autoload: bool | None = None) -> Limits:
        free = self._memory()
        measured = (self._gpus() if self._gpus is not None else None) or []
        gpus = {g.index: g.free_bytes for g in measured}
        # Instances still loading have not taken their memory yet.
        for inst in self.supervisor.instances.values():
            if inst.state in (State.STARTING, State.BACKOFF):
                if free is not None:
                    free -= inst.config.estimate_bytes
                if inst.config.gpu in gpus:
                    gpus[inst.config.gpu] -= inst.config.estimate_bytes
        return Limits(
            gpus=tuple(Gpu(g.index, gpus[g.index], g.total_bytes) for g in measured),
            models_max=self.fleet.models_max,
            free_bytes=free,
            exclusive_groups=self.fleet.exclusive_groups,
            autoload=self.fleet.autoload if autoload is None else autoload,
        )

    def _turn(self, name: str) -> bool:
        """Whether `name` may load now: no earlier request waits for another model that is
        not loading or loaded yet."""
        for waited in self._line:
            if waited == name:
                return True
            if not any(
                i.config.model == waited and i.state in _LIVE
                for i in self.supervisor.instances.values()
            ):
                return False
        return True

    def _decide(
        self, decl: ModelDecl, autoload: bool | None = None, turn: bool | None = None
    ) -> Decision:
        return route(
            decl.name,
            replicas=decl.replicas,
            need_bytes=self._need.get(decl.name, 0),
            pinned=decl.pinned,
            groups=decl.groups,
            instances=self._seen(),
            limits=self._limits(autoload),
            now=self._clock(),
            queued=self._queued[decl.name],
            queue_limit=decl.queue_limit,
            placeable=self._user_placed(decl) is None,
            protected=frozenset(self._line) - {decl.name},
            turn=self._turn(decl.name) if turn is None else turn,
        )

    def _user_placed(self, decl: ModelDecl) -> str | None:
        """Why llamactl leaves this model's devices alone (see placement.user_placed)."""
        args = (*self.fleet.common_args, *decl.args)
        return user_placed(args, {**os.environ, **dict(decl.env)})

    def _ensure_need(self, decl: ModelDecl) -> None:
        """Estimate a local model's memory before deciding on it (a header read, once)."""
        if decl.name in self._need or decl.is_pull:
            return
        try:
            path = self._resolve_source(decl)
        except LlamactlError:
            return  # the load says why
        self._paths[decl.name] = path
        self._need[decl.name] = self._estimate_need(decl, self._args(decl, decl.name, path), path)

    def _estimate_need(self, decl: ModelDecl, args: tuple[str, ...], path: Path) -> int:
        """The model's memory from its header, its environment's settings counted (-c given
        as LLAMA_ARG_CTX_SIZE), its flags winning over them as in llama-server."""
        from llamactl.models.estimate import env_as_flags

        return self._estimate(path, (*env_as_flags(dict(decl.env)), *args))

    async def _acquire_slow(self, model: str | None) -> Upstream:
        decl = self.resolve(model)
        name = decl.name
        self._ensure_need(decl)
        started = self._clock()
        deadline = started + self.supervisor.policy.queue_timeout
        waited = False
        try:
            while True:
                decision = self._decide(decl)
                if decision.action == "use":
                    inst = self.supervisor.instances[decision.instance or ""]
                    upstream = inst.upstream
                    backend = inst.backend
                    if upstream is not None and (backend is None or backend.returncode is None):
                        inst.in_flight += 1
                        inst.last_used = self._clock()
                        if decl.replicas == 1:
                            self._fast[model] = inst
                        if waited:
                            self.metrics.queue_wait[name].observe(self._clock() - started)
                        return upstream
                    # Died a moment ago and its watcher has not seen it yet: wait for the
                    # restart.
                    inst.set_state(State.BACKOFF, "llama-server exited")
                elif decision.action == "reject":
                    message = decision.message
                    if decision.code == "model_failed":
                        failed = [
                            i
                            for i in self.supervisor.instances.values()
                            if i.config.model == name and i.state is State.FAILED
                        ]
                        if failed:
                            message += f": {_first_line(failed[0].last_error)}"
                    self.metrics.rejected[(name, decision.status)] += 1
                    raise ProxyError(
                        decision.status,
                        message,
                        code=decision.code,
                        retry_after=decision.retry_after,
                    )
                elif decision.action == "load":
                    self._begin_load(decl, decision)
                    continue
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self.metrics.rejected[(name, 503)] += 1
                    raise ProxyError(
                        503,
                        f"model {name!r} is still loading or busy; retry shortly",
                        "unavailable_error",
                        "model_loading",
                        retry_after=5,
                    )
                if not waited:  # in line for its model, once, until it leaves
                    self._line[name] = self._line.get(name, 0) + 1
                    waited = True
                self._queued[name] += 1
                try:
                    await self._wait_change(min(remaining, 1.0))
                finally:
                    self._queued[name] -= 1
        finally:
            if waited:
                self._line[name] -= 1
                if not self._line[name]:
                    del self._line[name]
                    self._pulse()  # the next in line may load now, or evict this model

    # -- loading and unloading -------------------------------------------------------------

    def _begin_load(self, decl: ModelDecl, decision: Decision) -> Instance:
        """Claim the instance (STARTING, at once: one start for every waiter) and load it in
        the background after evicting what the decision says."""
        name = decision.instance or decl.name
        config = InstanceConfig(
            name=name,
            binary=self.binary,
            args=(),
            log_path=self.log_dir / f"{self.record_id}-{_safe(name)}.log",
            model_label=decl.name,
            model=decl.name,
            pinned=decl.pinned,
            groups=decl.groups,
            estimate_bytes=self._need.get(decl.name, 0),
            echo=self.echo,
            env=dict(decl.env) | (device_env() if decision.gpu is not None else {}),
            gpu=decision.gpu,
        )
        inst = self.supervisor.instances.get(name)
        if inst is None:
            inst = self.supervisor.add(config)
        else:
            inst.config = config
        inst.failed_at = None
        # Loading is a use: the model ready a moment ago is not the least recently used one
        # while its first request has not reached it yet.
        inst.last_used = self._clock()
        inst.set_state(State.STARTING, f"loading: {decision.reason}")
        self._spawn(self._load(inst, decl, decision))
        self.changed()
        return inst

    async def _load(self, inst: Instance, decl: ModelDecl, decision: Decision) -> None:
        started = self._clock()
        try:
            if self.hold:
                await self._sleep(self.hold)
            for victim in decision.evict:
                gone = self.supervisor.instances.get(victim)
                where = (
                    f" from GPU{gone.config.gpu}" if gone and gone.config.gpu is not None else ""
                )
                await self._unload(
                    victim, f"evicted{where} to make room for {decl.name}", evict=True
                )
            path = self._paths.get(decl.name)
            if path is None:
                if decl.is_pull:  # may download: in a thread
                    path = await asyncio.get_running_loop().run_in_executor(
                        None, self._resolve_source, decl
                    )
                else:  # a path or a name in the model dirs: a quick look
                    path = self._resolve_source(decl)
                self._paths[decl.name] = path
            args = self._args(decl, inst.name, path)
            if decl.name not in self._need:
                self._need[decl.name] = self._estimate_need(decl, args, path)
            if decision.gpu is not None:
                args = (*device_flags(decision.gpu), *args)
            workers = rpc_endpoints_in(args)
            inst.config = replace(
                inst.config,
                args=args,
                estimate_bytes=self._need[decl.name],
                rpc_workers=workers,
            )
            if workers:
                # llama-server aborts at start when a worker is missing: every worker must
                # answer its hello first (bounded), and a missing one is named.
                await wait_for_workers_async(workers, deadline_s=self.worker_wait)
            log.info(
                "loading %s from %s (about %.0f MiB): %s",
                inst.name,
                path,
                inst.config.estimate_bytes / (1 << 20),
                decision.reason,
            )
            if decision.gpu is not None:
                log.info(
                    "loading %s on %s: needs about %s, %s free",
                    inst.name,
                    gpu_label(decision.gpu),
                    size(inst.config.estimate_bytes),
                    size(decision.free_bytes or 0),
                )
            await self.supervisor.start(inst.name)
            inst.slots = await self._slots(inst)
            inst.last_used = self._clock()
            self.metrics.loads[decl.name] += 1
            self.metrics.load_seconds[decl.name].observe(self._clock() - started)
            log.info(
                "model %s ready%s on port %s in %.2f s",
                inst.name,
                "" if decision.gpu is None else f" on {gpu_label(decision.gpu)}",
                inst.upstream.port if inst.upstream else "?",
                self._clock() - started,
            )
        except _Busy as exc:
            self._failed(inst, str(exc))
        except LlamactlError as exc:
            self._failed(inst, exc.message)
        finally:
            self.changed()

    def _failed(self, inst: Instance, message: str) -> None:
        model = inst.config.model or inst.name
        inst.last_error = message
        inst.failed_at = self._clock()
        inst.set_state(State.FAILED, _first_line(message))
        self.metrics.load_failures[model] += 1
        log.warning("model %s failed to load: %s", inst.name, message)

    def _args(self, decl: ModelDecl, name: str, path: Path) -> tuple[str, ...]:
        """The flags of one instance: the serve's, the model's, then what llamactl owns: the
        file, the model's name as its alias (so every answer's `model` is the name people
        typed) and --metrics (for /metrics)."""
        args = (*self.fleet.common_args, *decl.args, "-m", str(path), "--alias", decl.name)
        if "--metrics" not in args:
            args += ("--metrics",)
        if self.cpus:
            # A CPU build: each instance gets its share of the cores (placement.cpu_threads).
            models = self.fleet.models
            concurrent = sum(d.replicas for d in models)
            if self.fleet.models_max > 0:
                concurrent = min(concurrent, self.fleet.models_max)
            env = {**os.environ, **dict(decl.env)}
            threads = cpu_threads(self.cpus, concurrent, args, env)
            if threads is not None:
                args += ("-t", str(threads))
        return args

    async def _slots(self, inst: Instance) -> int:
        """llama-server's parallel slots (GET /props total_slots); unknown: no bound."""
        up = inst.upstream
        if up is None:
            return 1 << 30
        status, body = await self._fetch(up.host, up.port, "/props", up.auth)
        if status == 200:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                slots = int(json.loads(body).get("total_slots") or 0)
                if slots > 0:
                    return slots
        return 1 << 30

    async def _unload(self, name: str, reason: str, *, evict: bool = False) -> None:
        """Stop taking requests, let those in flight end (bounded), then stop the instance.
        An eviction that finds the model still generating after the bound gives up (_Busy):
        the newcomer gets 503 with Retry-After, the busy model keeps serving."""
        inst = self.supervisor.instances.get(name)
        if inst is None or inst.state not in _LIVE:
            return
        if name in self._unloading:  # already going: wait until it is gone (its own bound)
            while inst.state in _LIVE and name in self._unloading:
                await self._wait_change(1.0)
            if inst.state in _LIVE and evict:
                raise _Busy(f"model {inst.config.model} is still generating; retry shortly")
            return
        self._unloading.add(name)
        try:
            before = inst.state
            inst.set_state(State.STOPPING, reason)
            self.changed()
            deadline = self._clock() + self.drain_timeout
            while inst.in_flight > 0 or self._lane_in_flight(name) > 0:
                left = deadline - self._clock()
                if left <= 0:
                    if evict:
                        inst.set_state(before, "still generating: not evicted")
                        self.changed()
                        raise _Busy(
                            f"model {inst.config.model} is still generating after "
                            f"{self.drain_timeout:g} s and cannot be evicted yet; retry shortly"
                        )
                    log.warning(
                        "unloading %s with %d requests still in flight", name, inst.in_flight
                    )
                    break
                # (The lane's exchanges end without a pulse: look again soon.)
                await self._wait_change(min(1.0 if inst.in_flight else 0.01, left))
            log.info("unloading %s: %s", name, reason)
            await self.supervisor.stop_instance(name, reason)
            model = inst.config.model or name
            self.metrics.unloads[model] += 1
            if evict:
                self.metrics.evictions[model] += 1
        finally:
            self._unloading.discard(name)
            self.changed()

    async def _reap(self) -> None:
        """Unload ready models idle past their TTL."""
        while True:
            await self._sleep(min(1.0, *self._ttl.values()))
            for seen in expired(self._seen(), self._ttl, self._clock()):
                self._spawn(self._unload(seen.name, f"idle for {self._ttl[seen.model]:g} s"))

    def request_load(self, name: str, reason: str = "asked to load (POST /models/load)") -> None:
        """Router mode's POST /models/load: start loading now, answer at once."""
        decl = self.decls.get(name) or self._names.get(name)
        if decl is None:
            raise ProxyError(404, "model is not found", "not_found_error", "model_not_found")
        if any(
            i.config.model == decl.name and i.state in _LIVE
            for i in self.supervisor.instances.values()
        ):
            raise ProxyError(400, "model is already running", code="model_running")
        self._ensure_need(decl)
        # As router mode's load does: not queued (its turn whatever the line), and refused
        # at once when no model can make room now.
        decision = self._decide(decl, autoload=True, turn=True)
        if decision.action == "reject":
            raise ProxyError(decision.status, decision.message, code=decision.code)
        if decision.action == "wait" and decision.instance is None:
            raise ProxyError(
                503,
                f"cannot load model {name!r} now: {decision.reason}; retry shortly",
                "unavailable_error",
                "no_room",
                retry_after=5,
            )
        if decision.action == "load":
            self._begin_load(decl, replace(decision, reason=f"{reason}; {decision.reason}"))

    def request_unload(self, name: str) -> None:
        """Router mode's POST /models/unload: start unloading now, answer at once."""
        decl = self.decls.get(name) or self._names.get(name)
        if decl is None:
            raise ProxyError(400, "model is not found", code="model_not_found")
        live = [
            i.name
            for i in self.supervisor.instances.values()
            if i.config.model == decl.name and i.state in _LIVE
        ]
        if not live:
            raise ProxyError(400, "model is not running", code="model_not_running")
        for inst_name in live:
            self._spawn(self._unload(inst_name, "asked to unload (POST /models/unload)"))

    # -- llamactl's own answers (serve/answers.py) ----------------------------------------

    def model_state(self, name: str) -> str:
        """Router mode's status value of a model: loaded, loading, unloading, unloaded."""
        return answers.model_state(self, name)

    def models_json(self) -> dict[str, Any]:
        """Router mode's GET /models (also /v1/models): every model with its state."""
        return answers.models_json(self)

    async def handle_control(self, method: str, path: str, query: str, body: bytes) -> Reply:
        """The control server's handler."""
        return await answers.handle_control(self, method, path, query, body)


def _resolve_source(decl: ModelDecl) -> Path:
    """The file of a model: a path as given, a name from `llamactl models`, or a pull (run in
    a thread: it may download)."""
    from llamactl.models import catalog

    if decl.is_pull:
        from llamactl.models.pull import pull

        return pull(decl.source)
    path = Path(decl.source).expanduser()
    if path.is_file():
        return path
    return catalog.resolve_model(decl.source)


def _estimate_bytes(path: Path, args: tuple[str, ...]) -> int:
    from llamactl.errors import ModelError
    from llamactl.models.estimate import estimate
    from llamactl.models.gguf import read_gguf

    try:
        return estimate(read_gguf(path), args).total
    except (ModelError, OSError, ValueError) as exc:
        log.warning("cannot estimate the memory of %s: %s", path, exc)
        return 0
