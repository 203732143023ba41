"""Supervision against the fake llama-server: start, crash, hang, broken, crash loop, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from llamactl.errors import ServerStartError
from llamactl.proc import pid_alive
from llamactl.serve.proxy import ProxyError
from llamactl.serve.supervisor import InstanceConfig, Policy, State, Supervisor

FAKE = str(Path(__file__).parent / "fakes" / "fake_llama_server.py")
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


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def config(tmp_path: Path, *args: str) -> InstanceConfig:
    return InstanceConfig(
        name="default",
        binary=Path(sys.executable),
        args=(FAKE, "--load-time", "0.1", *args),
        log_path=tmp_path / "logs" / "default.log",
        model_label="fake",
    )


async def wait_for_state(sup: Supervisor, state: State, timeout: float = 15.0) -> None:
    inst = sup.instances["default"]
    deadline = asyncio.get_running_loop().time() + timeout
    while inst.state is not state:
        assert asyncio.get_running_loop().time() < deadline, f"stuck in {inst.state}"
        await asyncio.sleep(0.02)


def test_start_acquire_and_stop_leaves_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        assert inst.state is State.READY
        up = await sup.acquire("any-model-name")
        assert up.port == inst.process.spec.port and up.auth and up.generation == 1  # type: ignore[union-attr]
        sup.release(up, 200)
        pid = inst.process.pid  # type: ignore[union-attr]
        await sup.close()
        assert inst.state is State.STOPPED
        assert pid is not None and not pid_alive(pid)
        # The private key reached the server through its environment, never its argv.
        assert up.auth is not None and up.auth.split()[-1].decode() not in " ".join(
            inst.process.popen.args  # type: ignore[union-attr]
        )

    run(main())


def test_crash_while_starting_fails_at_once_with_the_log(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path, "--mode", "crash-on-start"))
        with pytest.raises(ServerStartError) as err:
            await sup.start("default")
        assert "exited with code 1 while starting" in err.value.message
        assert "last lines of" in err.value.message
        assert (tmp_path / "logs" / "default.log").is_file()
        await sup.close()

    run(main())


def test_killed_server_is_restarted_and_waiting_requests_get_the_new_one(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        first = await sup.acquire(None)
        os.kill(inst.process.pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
        await wait_for_state(sup, State.BACKOFF)
        waiting = asyncio.ensure_future(sup.acquire(None))  # arrives during the restart
        second = await waiting
        assert inst.state is State.READY and inst.restarts == 1
        assert second.generation == first.generation + 1
        assert "exited unexpectedly" in (inst.last_error or "")
        await sup.close()

    run(main())


def test_frozen_server_is_killed_and_restarted(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        frozen = inst.process.pid  # type: ignore[union-attr]
        os.kill(frozen, signal.SIGSTOP)  # type: ignore[arg-type]
        await wait_for_state(sup, State.BACKOFF)
        await wait_for_state(sup, State.READY)
        assert "stopped answering /health" in (inst.last_error or "")
        assert inst.restarts == 1 and inst.process.pid != frozen  # type: ignore[union-attr]
        assert not pid_alive(frozen or 0)
        await sup.close()

    run(main())


def test_crash_loop_stops_retrying_and_answers_clients_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        # From now on every start fails, as with a model file deleted under a running server.
        monkeypatch.setenv("FAKE_LLAMA_MODE", "crash-on-start")
        os.kill(inst.process.pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
        await wait_for_state(sup, State.FAILED)
        assert len(inst.failures) >= FAST.crash_limit
        with pytest.raises(ProxyError) as err:
            await sup.acquire(None)
        assert err.value.status == 503 and err.value.code == "instance_failed"
        assert "failed and was not restarted" in err.value.message
        await sup.close()
        assert not pid_alive(inst.process.pid or 0)  # type: ignore[union-attr]

    run(main())


def test_server_that_fails_every_request_is_restarted(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path, "--mode", "fail-requests"))
        inst = await sup.start("default")
        up = await sup.acquire(None)
        for _ in range(FAST.broken_after):
            sup.release(up, 500)
        await wait_for_state(sup, State.BACKOFF)
        assert "fails every request" in (inst.last_error or "")
        await sup.close()

    run(main())


def test_errors_the_client_caused_do_not_count_as_broken(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        up = await sup.acquire(None)
        for _ in range(FAST.broken_after * 2):
            sup.release(up, 400)
            sup.release(up, 503)  # loading: not a failure
        await asyncio.sleep(0.3)
        assert inst.state is State.READY and inst.consecutive_bad == 0
        # 5xx in a row on a server whose probe still succeeds: no restart either.
        for _ in range(FAST.broken_after):
            sup.release(up, 500)
        await asyncio.sleep(0.5)
        assert inst.state is State.READY and inst.restarts == 0
        await sup.close()

    run(main())


def test_requests_wait_for_a_slow_start_then_get_503_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        policy = Policy(**{**FAST.__dict__, "queue_timeout": 0.3})
        sup = Supervisor(policy)
        sup.add(config(tmp_path, "--mode", "slow-start", "--load-time", "3"))
        start = asyncio.ensure_future(sup.start("default"))
        await asyncio.sleep(0.1)
        with pytest.raises(ProxyError) as err:
            await sup.acquire(None)
        assert err.value.status == 503 and err.value.retry_after
        patient = asyncio.ensure_future(Supervisor.acquire(sup, None))
        sup.policy = FAST  # a longer bound: this one waits until ready
        await start
        assert (await patient).generation == 1
        await sup.close()

    run(main())


# -- faults (issue 6): port clashes, kills while starting, signals named ---------------------


def _taking_ports(
    monkeypatch: pytest.MonkeyPatch, taken: list[int], how_many: int | None = None
) -> list[int]:
    """Make the supervisor's private_spec hand out ports in `taken` (ports that another
    process listens on) for its next `how_many` calls (None: always); the ports it gave out."""
    import dataclasses

    from llamactl.serve import supervisor

    real = supervisor.private_spec
    given: list[int] = []

    def clashing(*args: Any, **kwargs: Any) -> Any:
        spec = real(*args, **kwargs)
        if how_many is None or len(given) < how_many:
            spec = dataclasses.replace(spec, port=taken[len(given) % len(taken)])
        given.append(spec.port)
        return spec

    monkeypatch.setattr(supervisor, "private_spec", clashing)
    return given


def _listener() -> Any:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_taken_port_is_retried_at_once_on_another_port_and_is_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        with _listener() as occupier:
            taken = occupier.getsockname()[1]
            sup = Supervisor(FAST)
            sup.add(config(tmp_path))
            given = _taking_ports(monkeypatch, [taken], how_many=1)
            inst = await sup.start("default")
            assert inst.state is State.READY
            assert given[0] == taken and inst.process.spec.port != taken  # type: ignore[union-attr]
            assert not inst.failures and inst.restarts == 0
            # A restart whose first port is taken: one restart, one failure (the kill) only.
            given = _taking_ports(monkeypatch, [taken], how_many=1)
            os.kill(inst.process.pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
            await wait_for_state(sup, State.BACKOFF)
            await wait_for_state(sup, State.READY)
            assert given[0] == taken and inst.process.spec.port == given[-1] != taken  # type: ignore[union-attr]
            assert inst.restarts == 1 and len(inst.failures) == 1
            assert "port" not in (inst.last_error or "")
            await sup.close()

    run(main())


def test_a_port_taken_every_time_fails_with_the_diagnosis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        with _listener() as occupier:
            given = _taking_ports(monkeypatch, [occupier.getsockname()[1]])
            sup = Supervisor(FAST)
            sup.add(config(tmp_path))
            with pytest.raises(ServerStartError) as err:
                await sup.start("default")
            assert "its port is already in use" in err.value.message
            assert len(given) == FAST.port_retries + 1
            await sup.close()

    run(main())


def test_kill_during_the_first_load_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path, "--mode", "slow-start", "--load-time", "1"))
        start = asyncio.ensure_future(sup.start("default"))
        inst = sup.instances["default"]
        await wait_for_state(sup, State.STARTING)
        while inst.process is None or inst.process.pid is None:
            await asyncio.sleep(0.01)
        victim = inst.process
        await asyncio.sleep(0.3)  # loading: /health says 503
        assert await victim.health() == 503
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await start
        assert inst.state is State.READY and inst.process is not victim
        assert len(inst.failures) == 1
        await sup.close()

    run(main())


def test_a_first_start_killed_every_time_gives_up_with_the_signal_named(tmp_path: Path) -> None:
    async def main() -> None:
        suicidal = InstanceConfig(
            name="default",
            binary=Path(sys.executable),
            args=("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
            log_path=tmp_path / "default.log",
        )
        sup = Supervisor(FAST)
        sup.add(suicidal)
        with pytest.raises(ServerStartError) as err:
            await sup.start("default")
        assert "killed by SIGKILL" in err.value.message
        assert "out-of-memory" in err.value.message
        assert len(sup.instances["default"].failures) == FAST.first_start_retries
        await sup.close()

    run(main())


def test_a_crash_names_the_signal_and_what_it_means(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        os.kill(inst.process.pid, signal.SIGBUS)  # type: ignore[union-attr, arg-type]
        await wait_for_state(sup, State.BACKOFF)
        assert "killed by SIGBUS" in (inst.last_error or "")
        assert "model file was truncated" in (inst.last_error or "")
        await sup.close()

    run(main())


def test_failed_instance_answers_one_line_without_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path))
        inst = await sup.start("default")
        monkeypatch.setenv("FAKE_LLAMA_MODE", "crash-on-start")
        os.kill(inst.process.pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
        await wait_for_state(sup, State.FAILED)
        assert "last lines of" in (inst.last_error or "")  # kept for ps and the operator
        with pytest.raises(ProxyError) as err:
            await sup.acquire(None)
        assert "\n" not in err.value.message and "last lines" not in err.value.message
        assert "exited with code 1 while starting" in err.value.message
        await sup.close()

    run(main())


def test_a_busy_server_that_still_answers_requests_is_not_killed_as_hung(tmp_path: Path) -> None:
    # Under heavy load /health can miss its timeout while requests still complete: a server
    # that answers requests (or writes its log) is busy, not hung. Once nothing shows life,
    # it is killed as before.
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path, "--mode", "busy-health", "--hang-after", "0.2"))
        inst = await sup.start("default")
        pid = inst.process.pid  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        # Long enough for hung_after missed checks twice over (each waits health_timeout).
        misses = 2 * FAST.hung_after
        until = loop.time() + misses * (FAST.health_interval + FAST.health_timeout)
        while loop.time() < until:  # the proxy's side: requests keep being answered
            upstream = await sup.acquire(None)
            sup.release(upstream, 200)
            await asyncio.sleep(0.05)
        assert inst.state is State.READY and inst.restarts == 0
        assert inst.process.pid == pid  # type: ignore[union-attr]
        await wait_for_state(sup, State.BACKOFF)  # no more answers: now it counts as hung
        assert "stopped answering /health" in (inst.last_error or "")
        await sup.close()

    run(main())
