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
from llamactl.proxy import ProxyError
from llamactl.supervisor import InstanceConfig, Policy, State, Supervisor

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
