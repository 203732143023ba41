"""Supervision on a fake backend and a fake clock: start, crash, hang, broken, crash loop,
port clashes, kills while starting, stop. No process, no socket, no real time: minutes of
backoff and health checks run in milliseconds. (A few of the same on real processes:
test_supervisor_processes.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from support.fakebackend import FakeBackends, FakeClock

from llamactl.errors import ServerStartError
from llamactl.serve.supervisor import InstanceConfig, Policy, State, Supervisor
from llamactl.serve.upstream import ProxyError

pytestmark = pytest.mark.unit

FAST = Policy(
    queue_timeout=10.0,
    stall_timeout=10.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    crash_limit=3,
    crash_window=30.0,
    health_interval=0.1,
    health_timeout=0.5,
    hung_after=2,
    broken_after=3,
    stop_grace=2.0,
)

CONFIG = InstanceConfig(
    name="default", binary=Path("/fake/llama-server"), args=(), log_path=Path("/fake/default.log")
)

Body = Callable[[Supervisor, FakeClock, FakeBackends], Awaitable[None]]


def drive(body: Body, policy: Policy = FAST) -> None:
    """Run `body` with a supervisor on a fake backend and clock; close it afterwards."""

    async def main() -> None:
        clock = FakeClock()
        backends = FakeBackends(clock)
        sup = Supervisor(policy, clock=clock, sleep=clock.sleep, backend_factory=backends)
        sup.add(CONFIG)
        try:
            await body(sup, clock, backends)
        finally:
            await sup.close()
        assert all(b.returncode is not None for b in backends.made if b.attached)

    # A real-time bound only against a hang of the test itself.
    asyncio.run(asyncio.wait_for(main(), timeout=30))


def start(sup: Supervisor, clock: FakeClock) -> Coroutine[Any, Any, Any]:
    async def go() -> Any:
        task = asyncio.ensure_future(sup.start("default"))
        await clock.run_until(task.done)
        return task.result()

    return go()


def state_is(sup: Supervisor, state: State) -> Callable[[], bool]:
    return lambda: sup.instances["default"].state is state


def test_start_acquire_and_stop() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        assert inst.state is State.READY
        up = await sup.acquire("any-model-name")
        backend = backends.made[0]
        assert up.port == backend.port and up.auth == b"Bearer key-0" and up.generation == 1
        assert inst.in_flight == 1
        sup.release(up, 200)
        assert inst.in_flight == 0
        await sup.close()
        assert inst.state is State.STOPPED and backend.stopped

    drive(body)


def test_crash_while_starting_fails_at_once_with_the_log() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.fail_start = 1
        with pytest.raises(ServerStartError) as err:
            await start(sup, clock)
        assert "exited with code 1 while starting" in err.value.message
        assert "last lines of" in err.value.message
        assert len(backends.made) == 1  # an exit is no signal: not retried

    drive(body)


def test_killed_server_is_restarted_and_waiting_requests_get_the_new_one() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        first = await sup.acquire(None)
        backends.made[0].crash(-9)
        await clock.run_until(state_is(sup, State.BACKOFF))
        waiting = asyncio.ensure_future(sup.acquire(None))  # arrives during the restart
        await clock.run_until(waiting.done)
        second = waiting.result()
        assert inst.state is State.READY and inst.restarts == 1
        assert second.generation == first.generation + 1 and second.port == backends.made[1].port
        assert "exited unexpectedly" in (inst.last_error or "")
        assert "killed by SIGKILL" in (inst.last_error or "")

    drive(body)


def test_frozen_server_is_killed_and_restarted() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        frozen = backends.made[0]
        backends.script.hang = True
        await clock.run_until(state_is(sup, State.BACKOFF))
        backends.script.hang = False
        await clock.run_until(state_is(sup, State.READY))
        assert "stopped answering /health" in (inst.last_error or "")
        assert inst.restarts == 1 and inst.backend is not frozen
        assert frozen.killed and frozen.returncode is not None

    drive(body)


def test_crash_loop_stops_retrying_and_answers_clients_clearly() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        # From now on every start fails, as with a model file deleted under a running server.
        backends.script.fail_start = 1
        backends.made[0].crash(-9)
        await clock.run_until(state_is(sup, State.FAILED))
        assert len(inst.failures) >= FAST.crash_limit
        with pytest.raises(ProxyError) as err:
            await sup.acquire(None)
        assert err.value.status == 503 and err.value.code == "instance_failed"
        assert "failed and was not restarted" in err.value.message
        # The failed instance stays down: no further start is tried, however long one waits.
        made = len(backends.made)
        await clock.advance(600)
        assert len(backends.made) == made

    drive(body)


def test_backoff_grows_exponentially_up_to_its_bound() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        await start(sup, clock)
        delays = []
        for _ in range(3):
            backends.made[-1].crash(-9)
            await clock.run_until(state_is(sup, State.BACKOFF))
            down = clock.now
            await clock.run_until(lambda: backends.made[-1].attached and len(backends.made) > 1)
            await clock.run_until(state_is(sup, State.READY))
            delays.append(round(backends.made[-1].started_at - down, 3))
        assert delays == [0.05, 0.1, 0.2]

    drive(body, Policy(**{**FAST.__dict__, "crash_limit": 10}))


def test_server_that_fails_every_request_is_restarted() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        backends.script.probe_ok = False
        up = await sup.acquire(None)
        for _ in range(FAST.broken_after):
            sup.release(up, 500)
        await clock.run_until(state_is(sup, State.BACKOFF))
        assert "fails every request" in (inst.last_error or "")
        assert backends.probes == 1

    drive(body)


def test_errors_the_client_caused_do_not_count_as_broken() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        up = await sup.acquire(None)
        for _ in range(FAST.broken_after * 2):
            sup.release(up, 400)
            sup.release(up, 503)  # loading: not a failure
        await clock.advance(0.3)
        assert inst.state is State.READY and inst.consecutive_bad == 0
        assert backends.probes == 0
        # 5xx in a row on a server whose probe still succeeds: no restart either.
        for _ in range(FAST.broken_after):
            sup.release(up, 500)
        await clock.advance(0.5)
        assert backends.probes == 1
        assert inst.state is State.READY and inst.restarts == 0

    drive(body)


def test_a_release_after_a_restart_is_not_counted_against_the_successor() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        old = await sup.acquire(None)
        backends.made[0].crash(-9)
        await clock.run_until(state_is(sup, State.READY))
        for _ in range(FAST.broken_after * 2):
            sup.release(old, 0)
        assert inst.consecutive_bad == 0 and backends.probes == 0

    drive(body)


def test_requests_wait_for_a_slow_start_then_get_503_with_retry_after() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.load_time = 3.0
        starting = asyncio.ensure_future(sup.start("default"))
        await clock.advance(0.1)
        sup.policy = Policy(**{**FAST.__dict__, "queue_timeout": 0.3})
        impatient = asyncio.ensure_future(sup.acquire(None))
        await clock.run_until(impatient.done)
        with pytest.raises(ProxyError) as err:
            impatient.result()
        assert err.value.status == 503 and err.value.retry_after
        assert err.value.code == "instance_starting"
        sup.policy = FAST  # a longer bound: this one waits until ready
        patient = asyncio.ensure_future(sup.acquire(None))
        await clock.run_until(patient.done)
        assert patient.result().generation == 1 and starting.done()
        assert clock.now - backends.made[0].started_at == pytest.approx(3.0)

    drive(body)


# -- faults (issue 6): port clashes, kills while starting, signals named ---------------------


def test_taken_port_is_retried_at_once_on_another_port_and_is_no_crash() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.clashes = 1
        inst = await start(sup, clock)
        assert inst.state is State.READY
        assert backends.made[0].clash and inst.backend is backends.made[1]
        assert not inst.failures and inst.restarts == 0
        # A restart whose first port is taken: one restart, one failure (the kill) only.
        backends.script.clashes = 1
        backends.made[1].crash(-9)
        await clock.run_until(state_is(sup, State.BACKOFF))
        await clock.run_until(state_is(sup, State.READY))
        assert backends.made[2].clash and inst.backend is backends.made[3]
        assert inst.restarts == 1 and len(inst.failures) == 1
        assert "port" not in (inst.last_error or "")

    drive(body)


def test_a_port_taken_every_time_fails_with_the_diagnosis() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.clashes = 1000
        with pytest.raises(ServerStartError) as err:
            await start(sup, clock)
        assert "couldn't bind" in err.value.message
        assert len(backends.made) == FAST.port_retries + 1

    drive(body)


def test_kill_during_the_first_load_is_retried() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.load_time = 1.0
        starting = asyncio.ensure_future(sup.start("default"))
        inst = sup.instances["default"]
        await clock.run_until(lambda: inst.state is State.STARTING and bool(backends.made))
        await clock.advance(0.3)  # loading
        victim = backends.made[0]
        victim.crash(-9)
        await clock.run_until(starting.done)
        starting.result()
        assert inst.state is State.READY and inst.backend is not victim
        assert len(inst.failures) == 1

    drive(body)


def test_a_first_start_killed_every_time_gives_up_with_the_signal_named() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.fail_start = -9
        with pytest.raises(ServerStartError) as err:
            await start(sup, clock)
        assert "killed by SIGKILL" in err.value.message
        assert "out-of-memory" in err.value.message
        assert len(sup.instances["default"].failures) == FAST.first_start_retries
        assert len(backends.made) == FAST.first_start_retries + 1

    drive(body)


def test_a_crash_names_the_signal_and_what_it_means() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        backends.made[0].crash(-7)  # SIGBUS
        await clock.run_until(state_is(sup, State.BACKOFF))
        assert "killed by SIGBUS" in (inst.last_error or "")
        assert "model file was truncated" in (inst.last_error or "")

    drive(body)


def test_failed_instance_answers_one_line_without_the_log() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        backends.script.fail_start = 1
        backends.made[0].crash(-9)
        await clock.run_until(state_is(sup, State.FAILED))
        assert "last lines of" in (inst.last_error or "")  # kept for ps and the operator
        with pytest.raises(ProxyError) as err:
            await sup.acquire(None)
        assert "\n" not in err.value.message and "last lines" not in err.value.message
        assert "exited with code 1 while starting" in err.value.message

    drive(body)


def test_a_busy_server_that_still_answers_requests_is_not_killed_as_hung() -> None:
    # Under heavy load /health can miss its timeout while requests still complete: a server
    # that answers requests (or writes its log) is busy, not hung. Once nothing shows life,
    # it is killed as before.
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        inst = await start(sup, clock)
        backend = backends.made[0]
        backends.script.hang = True
        # Long enough for hung_after missed checks twice over (each waits health_timeout).
        until = clock.now + 2 * FAST.hung_after * (FAST.health_interval + FAST.health_timeout)
        while clock.now < until:  # the proxy's side: requests keep being answered
            upstream = await sup.acquire(None)
            sup.release(upstream, 200)
            await clock.advance(0.05)
        assert inst.state is State.READY and inst.restarts == 0
        assert inst.backend is backend and not backend.killed
        await clock.run_until(state_is(sup, State.BACKOFF))  # no more answers: now it is hung
        assert "stopped answering /health" in (inst.last_error or "")
        assert backend.killed

    drive(body)


def test_close_stops_a_backend_that_is_still_starting() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        backends.script.load_time = 100.0
        starting = asyncio.ensure_future(sup.start("default"))
        await clock.advance(1.0)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        assert backends.made[0].stopped

    drive(body)


class _Lane:
    def __init__(self) -> None:
        self.clears = 0

    def clear(self) -> None:
        self.clears += 1


def test_the_express_lane_forgets_its_route_on_a_restart_and_its_failures_count() -> None:
    async def body(sup: Supervisor, clock: FakeClock, backends: FakeBackends) -> None:
        lane = _Lane()
        sup.attach_lane(lane)
        inst = await start(sup, clock)
        first = sup.express_route("any")
        assert first is not None and first.port == backends.made[0].port
        assert inst.in_flight == 0  # no lease
        cleared = lane.clears
        backends.made[0].crash(-9)
        await clock.run_until(state_is(sup, State.BACKOFF))
        assert lane.clears > cleared and sup.express_route("any") is None
        await clock.run_until(state_is(sup, State.READY))
        second = sup.express_route(None)
        assert second is not None and second.generation == first.generation + 1
        # The lane's exchanges count as released ones do: a run of 500s makes a probe.
        backends.script.probe_ok = False
        for _ in range(FAST.broken_after):
            sup.note(second, 500, 0.001)
        await clock.run_until(state_is(sup, State.BACKOFF))
        assert "fails every request" in (inst.last_error or "")
        assert inst.in_flight == 0

    drive(body)
