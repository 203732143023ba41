"""Several models on a fake backend and a fake clock: on-demand loads with one start for every
waiter, a failing load, eviction that waits for a stream (bounded), a waiter that hangs up,
idle TTL, replicas and the queue limit, pinned models, and the control answers. No process,
no socket, no real time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support.fakebackend import FakeBackends, FakeClock

from llamactl.serve.config import Fleet, ModelDecl
from llamactl.serve.control import CONTROL
from llamactl.serve.fleet import ModelFleet
from llamactl.serve.http import Cors
from llamactl.serve.router import Gpu
from llamactl.serve.supervisor import Policy, State, Supervisor
from llamactl.serve.upstream import ProxyError, Upstream

pytestmark = pytest.mark.unit

POLICY = Policy(
    queue_timeout=60.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    crash_limit=3,
    health_interval=1.0,
    health_timeout=0.5,
)


LIVE = (State.READY, State.STOPPING)
METRIC = b"llamacpp:requests_processing 0\n"


class World:
    """A fleet with its fake clock and backends."""

    def __init__(self, clock: FakeClock, backends: FakeBackends, fleet: ModelFleet) -> None:
        self.clock = clock
        self.backends = backends
        self.fleet = fleet
        self.slots = 4
        self.fetched: list[str] = []

    @property
    def sup(self) -> Supervisor:
        return self.fleet.supervisor

    def state(self, name: str) -> str:
        return self.fleet.model_state(name)

    async def get(self, model: str | None) -> Upstream:
        task = asyncio.ensure_future(self.fleet.acquire(model, b"POST", b"/v1/chat/completions"))
        await self.clock.run_until(task.done)
        return task.result()

    def made_for(self, model: str) -> list[Any]:
        return [b for b in self.backends.made if b.config.model == model]


def decl(name: str, **kw: Any) -> ModelDecl:
    return ModelDecl(name, f"/models/{name}.gguf", **kw)


def drive(
    body: Callable[[World], Awaitable[None]],
    models: list[ModelDecl],
    *,
    models_max: int = 1,
    drain_timeout: float = 30.0,
    memory: int | None = None,
    need: int = 0,
    gpus: list[int] | None = None,
    estimated: list[tuple[str, ...]] | None = None,
    cpus: int = 0,
) -> None:
    async def main() -> None:
        clock = FakeClock()
        backends = FakeBackends(clock)
        holder: list[ModelFleet] = []
        sup = Supervisor(
            POLICY,
            clock=clock,
            sleep=clock.sleep,
            backend_factory=backends,
            on_change=lambda s: holder[0].changed() if holder else None,
        )
        world: World

        async def fetch(host: str, port: int, path: str, auth: bytes | None) -> tuple[int, bytes]:
            world.fetched.append(path)
            if path == "/props":
                return 200, json.dumps({"total_slots": world.slots}).encode()
            if path == "/metrics":
                return (
                    200,
                    b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 0\n",
                )
            return 404, b""

        fleet = ModelFleet(
            Fleet(models=tuple(models), models_max=models_max),
            sup,
            binary=Path("/fake/llama-server"),
            log_dir=Path("/fake/logs"),
            record_id="t",
            clock=clock,
            sleep=clock.sleep,
            # Free memory as the kernel would report it: what ready instances took is gone.
            memory=lambda: (
                None
                if memory is None
                else memory
                - sum(i.config.estimate_bytes for i in sup.instances.values() if i.backend)
            ),
            # Free memory per GPU as nvidia-smi would say it: what running instances took is gone.
            gpus=None
            if gpus is None
            else lambda: [
                Gpu(
                    i,
                    free
                    - sum(
                        b.config.estimate_bytes
                        for b in backends.made
                        if b.config.gpu == i and b.attached and b.returncode is None
                    ),
                    24 << 30,
                )
                for i, free in enumerate(gpus)
            ],
            resolve=lambda d: Path(d.source),
            cpus=cpus,
            estimate=lambda path, args: (
                (estimated.append(args) if estimated is not None else None) or need
            ),
            fetch=fetch,
            drain_timeout=drain_timeout,
        )
        holder.append(fleet)
        world = World(clock, backends, fleet)
        await fleet.start(control=False)
        try:
            await body(world)
        finally:
            await fleet.close()
            await sup.close()
        assert all(b.returncode is not None for b in backends.made if b.attached)

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_first_request_loads_and_every_waiter_shares_one_start() -> None:
    async def body(w: World) -> None:
        tasks = [asyncio.ensure_future(w.fleet.acquire("a")) for _ in range(5)]
        await w.clock.run_until(lambda: all(t.done() for t in tasks))
        ups = {t.result() for t in tasks}
        assert len(ups) == 1 and len(w.backends.made) == 1
        assert w.sup.instances["a"].in_flight == 5
        args = w.backends.made[0].config.args
        assert args[-5:] == ("-m", "/models/a.gguf", "--alias", "a", "--metrics")
        assert w.state("a") == "loaded" and w.state("b") == "unloaded"
        assert w.fleet.metrics.loads["a"] == 1 and w.fleet.metrics.queue_wait["a"].total == 5

    drive(body, [decl("a"), decl("b")])


def test_aliases_resolve_unknown_is_404_naming_the_known_and_one_model_takes_none() -> None:
    async def body(w: World) -> None:
        assert (await w.get("al")).name == "a"
        with pytest.raises(ProxyError) as err:
            await w.fleet.acquire("nope")
        assert err.value.status == 404 and "a, b" in err.value.message
        with pytest.raises(ProxyError) as err:
            await w.fleet.acquire(None)
        assert err.value.status == 400

    drive(body, [decl("a", aliases=("al",)), decl("b")], models_max=2)

    async def one(w: World) -> None:
        assert (await w.get(None)).name == "a"

    drive(one, [decl("a")])


def test_a_failed_load_fails_its_waiters_only_with_the_diagnosis() -> None:
    async def body(w: World) -> None:
        a = await w.get("a")
        w.backends.script.fail_models.add("b")
        waiters = [asyncio.ensure_future(w.fleet.acquire("b")) for _ in range(3)]
        await w.clock.run_until(lambda: all(t.done() for t in waiters))
        for t in waiters:
            err = t.exception()
            assert isinstance(err, ProxyError) and err.status == 503
            assert "exited with code 1 while starting" in err.message
        assert len(w.made_for("b")) == 1  # one start for the three
        assert w.state("a") == "loaded" and (await w.get("a")) == a
        models = {m["id"]: m for m in w.fleet.models_json()["data"]}
        assert models["b"]["status"]["failed"] is True
        assert w.fleet.metrics.load_failures["b"] == 1

    drive(body, [decl("a"), decl("b")], models_max=2)


def test_a_busy_model_is_evicted_only_once_its_request_ends() -> None:
    async def body(w: World) -> None:
        streaming = await w.get("a")
        newcomer = asyncio.ensure_future(w.fleet.acquire("b"))
        await w.clock.advance(5.0)
        assert not newcomer.done()
        assert w.state("a") == "loaded"  # not drained: it still takes requests
        assert w.made_for("a")[0].returncode is None
        w.fleet.release(streaming, 200, 5.0)
        await w.clock.run_until(newcomer.done)
        assert newcomer.result().name == "b"
        assert w.state("a") == "unloaded" and w.state("b") == "loaded"
        assert w.fleet.metrics.evictions["a"] == 1

    drive(body, [decl("a"), decl("b")])


def test_a_model_busy_past_the_queue_timeout_gives_the_newcomer_503() -> None:
    async def body(w: World) -> None:
        await w.get("a")  # never released: a stream that runs on
        newcomer = asyncio.ensure_future(w.fleet.acquire("b"))
        await w.clock.run_until(newcomer.done)
        err = newcomer.exception()
        assert isinstance(err, ProxyError) and err.status == 503 and err.retry_after
        assert "busy" in err.message
        assert w.state("a") == "loaded"  # it keeps serving
        assert (await w.get("a")).name == "a"

    drive(body, [decl("a"), decl("b")])


def test_a_waiter_that_hangs_up_costs_the_busy_model_nothing() -> None:
    # Upstream's test_router_queue_client_disconnect_keeps_model.
    async def body(w: World) -> None:
        streaming = await w.get("a")
        gone = asyncio.ensure_future(w.fleet.acquire("b"))
        await w.clock.advance(1.0)
        gone.cancel()
        await w.clock.settle()
        assert w.fleet._line == {}
        w.fleet.release(streaming, 200, 1.0)
        await w.clock.advance(3.0)
        assert w.state("a") == "loaded" and w.state("b") == "unloaded"

    drive(body, [decl("a"), decl("b")])


def test_loads_go_in_the_order_requests_arrived() -> None:
    # Upstream's test_router_queue_is_fifo: b asked first, c second, both behind busy a.
    async def body(w: World) -> None:
        streaming = await w.get("a")
        first = asyncio.ensure_future(w.fleet.acquire("b"))
        await w.clock.advance(1.0)
        second = asyncio.ensure_future(w.fleet.acquire("c"))
        await w.clock.advance(1.0)
        w.fleet.release(streaming, 200, 2.0)
        await w.clock.run_until(first.done)
        assert not second.done() and w.state("c") == "unloaded"
        w.fleet.release(first.result(), 200, 0.1)
        await w.clock.run_until(second.done)
        assert second.result().name == "c" and w.state("b") == "unloaded"

    drive(body, [decl("a"), decl("b"), decl("c")])


def test_fake_timing_holds_each_request_and_each_load() -> None:
    # Router mode's LLAMA_SERVER_DEBUG_FAKE_TIMING, which its scheduler tests rely on.
    async def body(w: World) -> None:
        w.fleet.hold = 2.0
        assert w.fleet.acquire_nowait("a") is None  # never the fast path
        got = asyncio.ensure_future(w.fleet.acquire("a"))
        await w.clock.run_until(lambda: w.state("a") == "loaded")
        assert not got.done() and w.sup.instances["a"].in_flight == 1  # busy while held
        await w.clock.run_until(got.done)
        w.fleet.release(got.result(), 200, 0.1)
        held = asyncio.ensure_future(w.fleet.acquire("a"))
        await w.clock.advance(1.0)
        held.cancel()  # a client gone while held gives its slot back
        await w.clock.settle()
        assert w.sup.instances["a"].in_flight == 0

    drive(body, [decl("a")])


def test_a_waiter_that_hangs_up_does_not_stop_the_load() -> None:
    async def body(w: World) -> None:
        w.backends.script.load_time = 3.0
        gone = asyncio.ensure_future(w.fleet.acquire("a"))
        await w.clock.advance(1.0)
        gone.cancel()
        await w.clock.settle()
        assert w.fleet._queued["a"] == 0
        up = await w.get("a")
        assert up.name == "a" and len(w.backends.made) == 1
        assert w.sup.instances["a"].in_flight == 1

    drive(body, [decl("a")])


def test_idle_ttl_unloads() -> None:
    async def body(w: World) -> None:
        up = await w.get("a")
        w.fleet.release(up, 200, 0.1)
        await w.clock.advance(30)
        assert w.state("a") == "loaded"
        await w.clock.advance(40)
        assert w.state("a") == "unloaded" and w.fleet.metrics.unloads["a"] == 1

    drive(body, [decl("a", ttl=60.0)])


def test_replicas_take_requests_by_free_slot_and_the_queue_is_bounded() -> None:
    async def body(w: World) -> None:
        w.slots = 1
        first = await w.get("a")
        second = await w.get("a")  # the first is busy: it queues there, a replica starts
        assert (first.name, second.name) == ("a", "a")
        await w.clock.run_until(lambda: w.sup.instances["a#2"].state is State.READY)
        third = await w.get("a")
        assert third.name == "a#2"  # the free slot
        assert (await w.get("a")).name == "a#2"  # overflow: 1 waiting at a, 1 at a#2
        with pytest.raises(ProxyError) as err:
            await w.fleet.acquire("a")
        assert err.value.status == 429 and err.value.retry_after == 1
        w.fleet.release(first, 200, 1.0)
        assert (await w.get("a")).name == "a"

    drive(body, [decl("a", replicas=2, queue_limit=2)], models_max=2)


def test_a_pinned_model_loads_at_start_and_is_never_evicted() -> None:
    async def body(w: World) -> None:
        await w.clock.run_until(lambda: w.state("p") == "loaded")
        up = await w.get("a")
        w.fleet.release(up, 200, 0.1)
        b = await w.get("b")  # evicts a, never p
        assert b.name == "b" and w.state("p") == "loaded" and w.state("a") == "unloaded"

    drive(body, [decl("p", pinned=True), decl("a"), decl("b")], models_max=2)


def test_memory_decides_and_the_log_says_why(caplog: pytest.LogCaptureFixture) -> None:
    async def body(w: World) -> None:
        up = await w.get("a")
        w.fleet.release(up, 200, 0.1)
        await w.get("b")
        assert w.state("a") == "unloaded"

    with caplog.at_level("INFO", logger="llamactl.serve.fleet"):
        drive(body, [decl("a"), decl("b")], models_max=0, memory=150 << 20, need=100 << 20)
    text = caplog.text
    assert "loading a" in text and "fits: needs about 100 MiB" in text
    assert "to free memory" in text and "unloading a: evicted to make room for b" in text


def test_each_model_goes_on_the_gpu_that_fits_it_and_the_log_says_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gib = 1 << 30

    async def body(w: World) -> None:
        for model in ("a", "b"):
            w.fleet.release(await w.get(model), 200, 0.1)
            w.clock.now += 1
        # a went on GPU1 (9 GiB free of 8 and 9), b on GPU0 (8 against the 4 a left).
        (a,) = w.made_for("a")
        (b,) = w.made_for("b")
        assert a.config.args[:2] == ("--device", "CUDA1") and a.config.gpu == 1
        assert b.config.args[:2] == ("--device", "CUDA0") and b.config.gpu == 0
        assert a.config.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        # c fits nowhere: a, least recently used, is evicted from GPU1, and c goes there.
        await w.get("c")
        assert (w.state("a"), w.state("b")) == ("unloaded", "loaded")
        (c,) = w.made_for("c")
        assert c.config.args[:2] == ("--device", "CUDA1")
        # A model whose devices the user chose is left alone (and decided by the sum).
        (d,) = [x for x in w.fleet.fleet.models if x.name == "d"]
        assert w.fleet._user_placed(d) == "--device given"

    with caplog.at_level("INFO", logger="llamactl.serve.fleet"):
        drive(
            body,
            [decl("a"), decl("b"), decl("c"), decl("d", args=("--device", "CUDA0"))],
            models_max=0,
            need=5 * gib,
            gpus=[8 * gib, 9 * gib],
        )
    text = caplog.text
    assert "loading a on GPU1 (CUDA1): needs about 5.0 GiB, 9.0 GiB free" in text
    assert "loading b on GPU0 (CUDA0): needs about 5.0 GiB, 8.0 GiB free" in text
    assert "unloading a: evicted from GPU1 to make room for c" in text
    assert "loading c on GPU1 (CUDA1): needs about 5.0 GiB, 9.0 GiB free" in text
    assert "model c ready on GPU1 (CUDA1)" in text


def test_a_presets_environment_reaches_the_instance_and_the_estimate() -> None:
    estimated: list[tuple[str, ...]] = []

    async def body(w: World) -> None:
        await w.get("a")
        (a,) = w.made_for("a")
        assert a.config.env == {"LLAMA_ARG_CTX_SIZE": "512", "LLAMA_ARG_N_PARALLEL": "2"}
        assert "CUDA_DEVICE_ORDER" not in a.config.env  # no GPUs: nothing placed
        assert estimated and estimated[0][:2] == ("--ctx-size", "512")

    env = (("LLAMA_ARG_CTX_SIZE", "512"), ("LLAMA_ARG_N_PARALLEL", "2"))
    drive(body, [decl("a", env=env)], estimated=estimated)


def test_control_load_unload_models_and_metrics() -> None:
    async def body(w: World) -> None:
        reply = await w.fleet.handle_control("POST", "/models/load", "", b'{"model": "a"}')
        assert reply.status == 200 and json.loads(reply.body) == {"success": True}
        assert w.state("a") == "loading"
        await w.clock.run_until(lambda: w.state("a") == "loaded")
        with pytest.raises(ProxyError) as err:
            await w.fleet.handle_control("POST", "/models/load", "", b'{"model": "a"}')
        assert err.value.status == 400 and "already running" in err.value.message
        with pytest.raises(ProxyError) as err:
            await w.fleet.handle_control("POST", "/models/load", "", b'{"model": "zz"}')
        assert err.value.status == 404
        listed = json.loads((await w.fleet.handle_control("GET", "/models", "", b"")).body)
        assert [(m["id"], m["status"]["value"]) for m in listed["data"]] == [
            ("a", "loaded"),
            ("b", "unloaded"),
        ]
        up = await w.get("a")
        w.fleet.release(up, 200, 0.02)
        metrics = (await w.fleet.handle_control("GET", "/metrics", "", b"")).body.decode()
        assert 'llamactl_requests_total{model="a",status="2xx"} 1' in metrics
        assert 'llamacpp:requests_processing{model="a"} 0' in metrics
        assert metrics.count("# TYPE llamacpp:requests_processing gauge") == 1
        reply = await w.fleet.handle_control("POST", "/models/unload", "", b'{"model": "a"}')
        assert reply.status == 200
        await w.clock.run_until(lambda: w.state("a") == "unloaded")
        with pytest.raises(ProxyError) as err:
            await w.fleet.handle_control("POST", "/models/unload", "", b'{"model": "a"}')
        assert "not running" in err.value.message
        health = await w.fleet.handle_control("GET", "/health", "", b"")
        assert health.status == 200

    drive(body, [decl("a"), decl("b")], models_max=2)


def test_control_paths_go_to_llamactl_model_paths_to_the_model() -> None:
    async def body(w: World) -> None:
        control = w.fleet._control_upstream
        for path in (b"/health", b"/models", b"/v1/models", b"/models/load"):
            assert await w.fleet.acquire(None, b"GET", path) == control
        assert await w.fleet.acquire(None, b"GET", b"/metrics") == control
        task = asyncio.ensure_future(w.fleet.acquire("a", b"GET", b"/metrics"))
        await w.clock.run_until(task.done)
        assert task.result().name == "a"

    drive(body, [decl("a"), decl("b")], models_max=2)


def test_a_crashed_instance_is_restarted_and_requests_wait_for_it() -> None:
    async def body(w: World) -> None:
        first = await w.get("a")
        w.fleet.release(first, 200, 0.1)
        w.backends.made[0].crash(-9)
        again = await w.get("a")
        assert again.generation == first.generation + 1 and w.sup.instances["a"].restarts == 1

    drive(body, [decl("a")])


def test_reload_adds_new_models_and_unloads_removed_ones() -> None:
    # Router mode's GET /models?reload=1 (upstream's test_router_reload_models).
    async def body(w: World) -> None:
        w.fleet.release(await w.get("a"), 200, 0.1)
        w.fleet._redeclare = lambda: Fleet(models=(decl("b"), decl("c")), models_max=9)
        reply = await w.fleet.handle_control("GET", "/models", "reload=1", b"")
        ids = [m["id"] for m in json.loads(reply.body)["data"]]
        assert ids == ["b", "c"] and w.fleet.fleet.models_max == 1
        await w.clock.settle()
        assert w.sup.instances["a"].state is State.STOPPED
        with pytest.raises(ProxyError) as err:
            await w.fleet.acquire("a")
        assert err.value.status == 404
        assert (await w.get("c")).name == "c"

    drive(body, [decl("a"), decl("b")])


def test_a_model_ready_a_moment_ago_is_not_the_least_recently_used() -> None:
    async def body(w: World) -> None:
        w.fleet.request_load("a")
        await w.clock.run_until(lambda: w.state("a") == "loaded")
        await w.clock.advance(5.0)
        w.fleet.request_load("b")
        await w.clock.run_until(lambda: w.state("b") == "loaded")
        w.fleet.request_load("c")
        await w.clock.run_until(lambda: w.state("c") == "loaded")
        assert (w.state("a"), w.state("b")) == ("unloaded", "loaded")

    drive(body, [decl("a"), decl("b"), decl("c")], models_max=2)


def test_an_explicit_load_with_no_room_now_is_refused_not_queued() -> None:
    # Router mode's POST /models/load: "model limit reached, try again later".
    async def body(w: World) -> None:
        streaming = await w.get("a")
        with pytest.raises(ProxyError) as err:
            w.fleet.request_load("b")
        assert err.value.status == 503 and "busy" in err.value.message
        w.fleet.release(streaming, 200, 0.1)
        w.fleet.request_load("b")
        await w.clock.run_until(lambda: w.state("b") == "loaded")
        assert w.state("a") == "unloaded"

    drive(body, [decl("a"), decl("b")])


def test_preflights_are_the_routers_to_answer_with_no_model_loaded() -> None:
    # Router mode answers OPTIONS itself (upstream's test_cors_origins_* on a router).
    async def body(w: World) -> None:
        w.fleet.control.cors = Cors(origins="localhost")
        for model in (None, "a"):
            up = w.fleet.acquire_nowait(model, b"OPTIONS", b"/completions")
            assert up is not None and up.name == CONTROL
        assert w.state("a") == "unloaded"

    drive(body, [decl("a"), decl("b")])


def test_a_cpu_build_shares_its_cores_out_among_the_models_that_may_run_at_once() -> None:
    # Two models at once on 4 CPUs: -t 2 each (ggml's spinning threads oversubscribed the
    # cores 28x over, docs/performance.md); a model whose threads the user set keeps them.
    async def body(w: World) -> None:
        for model in ("a", "b", "c"):  # c evicts a (--models-max 2)
            w.fleet.release(await w.get(model), 200)
        args = {m: w.made_for(m)[0].config.args for m in ("a", "b", "c")}
        assert args["a"][-2:] == ("-t", "2") and args["b"][-2:] == ("-t", "2")
        assert "-t" in args["c"] and args["c"].count("-t") == 1
        assert args["c"][args["c"].index("-t") + 1] == "3"

    drive(body, [decl("a"), decl("b"), decl("c", args=("-t", "3"))], models_max=2, cpus=4)


def test_one_model_at_a_time_or_a_gpu_build_keeps_llama_cpps_default_threads() -> None:
    async def body(w: World) -> None:
        await w.get("a")
        assert "-t" not in w.made_for("a")[0].config.args

    drive(body, [decl("a"), decl("b")], models_max=1, cpus=4)
    drive(body, [decl("a"), decl("b")], models_max=2, cpus=0)


class FakeLane:
    """The express lane as the fleet sees it (serve/express.py's Lane): routes it forgets on a
    change, exchanges in flight per instance, and finished ones handed over on sync."""

    def __init__(self, fleet: ModelFleet) -> None:
        self.fleet = fleet
        self.clears = 0
        self.busy: dict[str, int] = {}
        self.finished: list[tuple[Upstream, int, float]] = []

    def clear(self) -> None:
        self.clears += 1

    def in_flight(self, name: str) -> int:
        return self.busy.get(name, 0)

    def sync(self) -> None:
        done, self.finished = self.finished, []
        for upstream, status, elapsed in done:
            self.fleet.note(upstream, status, elapsed)


async def lane_and_a(w: World) -> tuple[FakeLane, Upstream]:
    """A fake lane attached to the fleet, and model a loaded (one request served)."""
    lane = FakeLane(w.fleet)
    w.fleet.attach_lane(lane)
    a = await w.get("a")
    w.fleet.release(a, 200)
    return lane, a


def test_the_lanes_routes_go_on_every_change_of_state() -> None:
    async def body(w: World) -> None:
        lane = FakeLane(w.fleet)
        w.fleet.attach_lane(lane)
        w.fleet.release(await w.get("a"), 200)
        assert lane.clears >= 2  # starting, then ready: a route learned before is gone
        before = lane.clears
        w.fleet.request_unload("a")
        await w.clock.run_until(lambda: w.state("a") == "unloaded")
        assert lane.clears > before

    drive(body, [decl("a"), decl("b")])


def test_the_lanes_requests_count_in_metrics_last_use_and_failures() -> None:
    async def body(w: World) -> None:
        lane, a = await lane_and_a(w)
        inst = w.sup.instances[a.name]
        await w.clock.advance(10.0)
        lane.finished = [(a, 200, 0.001), (a, 500, 0.002), (a, 0, 0.0)]
        w.fleet._seen()  # every decision syncs first
        assert w.fleet.metrics.requests[("a", "2xx")] == 2  # one by the proxy, one by the lane
        assert w.fleet.metrics.errors["a"] == 2
        assert inst.last_used == w.clock()
        assert inst.consecutive_bad == 2
        assert inst.in_flight == 0  # the lane's exchanges hold no lease

    drive(body, [decl("a"), decl("b")])


def test_a_model_the_lane_is_serving_is_evicted_only_once_that_ends() -> None:
    async def body(w: World) -> None:
        lane, a = await lane_and_a(w)
        lane.busy[a.name] = 1
        newcomer = asyncio.ensure_future(w.fleet.acquire("b"))
        await w.clock.advance(5.0)
        assert not newcomer.done() and w.state("a") == "loaded"
        lane.busy[a.name] = 0
        await w.clock.run_until(newcomer.done)
        assert newcomer.result().name.startswith("b")
        assert w.state("a") == "unloaded"

    drive(body, [decl("a"), decl("b")])


def test_the_lane_is_given_only_ready_single_replica_routes() -> None:
    async def body(w: World) -> None:
        assert w.fleet.express_route("a") is None  # not loaded
        a = await w.get("a")
        w.fleet.release(a, 200)
        assert w.fleet.express_route("a") == a
        w.fleet.changed()  # the fast path forgot it: the route is found all the same
        assert w.fleet.express_route("a") == a
        assert w.fleet.express_route("nope") is None
        r = await w.get("r")
        w.fleet.release(r, 200)
        assert w.fleet.express_route("r") is None  # replicas: the fleet picks by free slot
        w.fleet.request_unload("a")
        await w.clock.run_until(lambda: w.state("a") == "unloaded")
        assert w.fleet.express_route("a") is None

    drive(body, [decl("a"), decl("r", replicas=2)], models_max=3)
