"""Supervision of real processes (the fake llama-server, a python that kills itself): what the
fake backend cannot show: pids gone, keys kept out of argv, logs written, SIGSTOP, real port
clashes. The rest runs on a fake backend and clock in test_supervisor.py."""

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
from llamactl.serve.supervisor import InstanceConfig, Policy, State, Supervisor

FAKE = str(Path(__file__).parent / "fakes" / "fake_llama_server.py")
pytestmark = pytest.mark.fake
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
        assert up.port == inst.process.port and up.auth and up.generation == 1  # type: ignore[union-attr]
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


def test_a_failed_load_that_never_exits_fails_the_start_promptly(tmp_path: Path) -> None:
    # llama-server hangs at times after "failed to load model" (its join on an HTTP thread
    # that started listening after the stop): serve stops it instead of waiting out the
    # stall bound (120 s), and says why.
    async def main() -> None:
        sup = Supervisor(FAST)
        sup.add(config(tmp_path, "--mode", "hang-on-load-error"))
        with pytest.raises(ServerStartError) as err:
            await asyncio.wait_for(sup.start("default"), timeout=30)
        assert "could not load the model and did not exit" in err.value.message
        assert "failed to load model" in err.value.message
        pid = sup.instances["default"].process.pid  # type: ignore[union-attr]
        await sup.close()
        assert pid is not None and not pid_alive(pid)

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


# -- faults (issue 6): port clashes, kills while starting, signals named ---------------------


def _taking_ports(
    monkeypatch: pytest.MonkeyPatch, taken: list[int], how_many: int | None = None
) -> list[int]:
    """Make the supervisor's private_spec hand out ports in `taken` (ports that another
    process listens on) for its next `how_many` calls (None: always); the ports it gave out."""
    import dataclasses

    from llamactl.serve import server

    real = server.private_spec
    given: list[int] = []

    def clashing(*args: Any, **kwargs: Any) -> Any:
        spec = real(*args, **kwargs)
        if how_many is None or len(given) < how_many:
            spec = dataclasses.replace(spec, port=taken[len(given) % len(taken)])
        given.append(spec.port)
        return spec

    monkeypatch.setattr(server, "private_spec", clashing)
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
            assert given[0] == taken and inst.process.port != taken  # type: ignore[union-attr]
            assert not inst.failures and inst.restarts == 0
            # A restart whose first port is taken: one restart, one failure (the kill) only.
            given = _taking_ports(monkeypatch, [taken], how_many=1)
            os.kill(inst.process.pid, signal.SIGKILL)  # type: ignore[union-attr, arg-type]
            await wait_for_state(sup, State.BACKOFF)
            await wait_for_state(sup, State.READY)
            assert given[0] == taken and inst.process.port == given[-1] != taken  # type: ignore[union-attr]
            assert inst.restarts == 1 and len(inst.failures) == 1
            assert "port" not in (inst.last_error or "")
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
        # Loading: /health says 503 once it listens (a loaded machine may take a while).
        deadline = asyncio.get_running_loop().time() + 10
        while await victim.health() != 503:
            assert asyncio.get_running_loop().time() < deadline, "never saw it loading"
            await asyncio.sleep(0.02)
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
