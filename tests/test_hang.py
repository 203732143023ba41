"""Hangs found fast without taking a busy server for a hung one, the request in flight on a hung
server sent again to its successor, and a broken-server probe that never restarts a healthy
server for a 501. Pure rules (unit), then the supervisor and serve with the fake llama-server
and small stand-ins (fake); tests/test_dropin_real.py does it with the real llama-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from support.serve import FAKE, fake_binary, fake_model, start_serve

from llamactl.serve.backend import Vitals
from llamactl.serve.proxy import Upstream
from llamactl.serve.server import probe_request, read_vitals
from llamactl.serve.supervisor import Instance, InstanceConfig, Policy, State, Supervisor

unit = pytest.mark.unit
fake = pytest.mark.fake

#: Fast checks, and a slow rule (hung_after x health_timeout) far beyond the fast one, so that
#: a kill within the slow rule's time can only be the fast rule's.
QUICK = Policy(
    queue_timeout=30.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    health_interval=0.3,
    health_timeout=20.0,
    hung_after=3,
    quick_timeout=0.5,
    recheck_after=0.2,
    sure_after=2,
    stop_grace=2.0,
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


# -- rules (unit) ---------------------------------------------------------------------------


def _proc_tree(root: Path, pid: int, state: str, utime: int, stime: int, tasks: list[str]) -> None:
    (root / str(pid) / "task").mkdir(parents=True)
    # Fields after the name: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt,
    # majflt, cmajflt, utime, stime, ...
    rest = f"{state} 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 8 0 100"
    (root / str(pid) / "stat").write_text(f"{pid} (llama server) {rest}\n")
    for i, task_state in enumerate(tasks):
        (root / str(pid) / "task" / str(pid + i)).mkdir()
        (root / str(pid) / "task" / str(pid + i) / "stat").write_text(
            f"{pid + i} (worker) {task_state} 1 1 1 0 -1 0 0 0 0 0 1 1 0\n"
        )


@unit
def test_read_vitals_reads_cpu_time_stopped_and_active(tmp_path: Path) -> None:
    _proc_tree(tmp_path, 10, "S", 7, 5, ["S", "S"])
    assert read_vitals(10, str(tmp_path)) == Vitals(cpu_ticks=12, stopped=False, active=False)
    _proc_tree(tmp_path, 20, "T", 1, 1, ["T", "T"])
    assert read_vitals(20, str(tmp_path)) == Vitals(cpu_ticks=2, stopped=True, active=False)
    _proc_tree(tmp_path, 30, "S", 1, 1, ["S", "R"])
    assert read_vitals(30, str(tmp_path)).active  # type: ignore[union-attr]
    _proc_tree(tmp_path, 40, "S", 1, 1, ["D"])
    assert read_vitals(40, str(tmp_path)).active  # type: ignore[union-attr]
    assert read_vitals(99, str(tmp_path)) is None


@dataclass
class _StubProcess:
    now: Vitals | None
    last_line_at: float = 0.0

    def vitals(self) -> Vitals | None:
        return self.now


def _lifeless(before: Vitals | None, now: Vitals | None, **kw: float) -> str | None:
    inst = Instance(config=InstanceConfig("default", Path("x"), (), Path("l")))
    inst.backend = _StubProcess(now, kw.get("last_line_at", 0.0))  # type: ignore[assignment]
    inst.last_ok = kw.get("last_ok", 0.0)
    return Supervisor()._lifeless(inst, before, since=10.0)


@unit
def test_only_a_process_with_no_sign_of_life_is_surely_hung() -> None:
    idle = Vitals(cpu_ticks=100, stopped=False, active=False)
    assert "no sign of life" in (_lifeless(idle, idle) or "")
    assert "SIGSTOP" in (_lifeless(idle, Vitals(100, True, False)) or "")
    # Busy in any way: maybe slow, never surely hung.
    assert _lifeless(idle, Vitals(101, False, False)) is None  # used CPU
    assert _lifeless(idle, Vitals(100, False, True)) is None  # runnable or in disk I/O
    assert _lifeless(idle, idle, last_line_at=11.0) is None  # wrote its log
    assert _lifeless(idle, idle, last_ok=11.0) is None  # answered a request
    assert _lifeless(None, idle) is None and _lifeless(idle, None) is None  # no /proc


@unit
@pytest.mark.parametrize(
    "args, env, path",
    [
        ((), {}, "/completion"),
        (("-m", "x.gguf", "-c", "512"), {}, "/completion"),
        (("--embedding",), {}, "/embedding"),
        (("--embeddings",), {}, "/embedding"),
        (("--pooling", "mean"), {}, "/embedding"),
        (("--pooling", "none"), {}, "/completion"),
        (("--rerank",), {}, "/rerank"),
        (("--reranking", "--embedding"), {}, "/rerank"),
        ((), {"LLAMA_ARG_EMBEDDINGS": "1"}, "/embedding"),
        ((), {"LLAMA_ARG_RERANKING": "1"}, "/rerank"),
    ],
)
def test_probe_uses_an_endpoint_the_server_offers(
    args: tuple[str, ...], env: dict[str, str], path: str
) -> None:
    assert probe_request(args, env)[0] == path


@unit
def test_a_501_is_the_clients_mistake_not_a_broken_server() -> None:
    async def main() -> None:
        sup = Supervisor(Policy(broken_after=2))
        inst = sup.add(InstanceConfig("default", Path("x"), (), Path("l")))
        inst.generation = 1
        up = Upstream("default", "127.0.0.1", 1, None, 1)
        for _ in range(10):
            sup.release(up, 501)
        assert inst.consecutive_bad == 0 and not inst.broken.is_set()
        assert not sup.replayable(up)
        inst.hung_generation = 1  # killed as hung: its unanswered requests replay
        assert sup.replayable(up)
        assert not sup.replayable(Upstream("default", "127.0.0.1", 1, None, 2))

    asyncio.run(main())


# -- processes (fake) -----------------------------------------------------------------------


@fake
def test_vitals_of_real_processes() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 30
        while True:
            v = read_vitals(sleeper.pid)
            if v is not None and not v.active:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(sleeper.pid, signal.SIGSTOP)
        while not (read_vitals(sleeper.pid) or Vitals(0, False, False)).stopped:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = read_vitals(spinner.pid)
        assert first is not None
        while True:  # a spinning process uses CPU time (or waits, runnable, for a CPU)
            now = read_vitals(spinner.pid)
            assert now is not None
            if now.cpu_ticks > first.cpu_ticks:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for p in (sleeper, spinner):
            p.kill()
            p.wait()


def _config(tmp_path: Path, *args: str, binary: Path | None = None) -> InstanceConfig:
    if binary is not None:
        return InstanceConfig("default", binary, args, tmp_path / "logs" / "d.log", "stand-in")
    return InstanceConfig(
        "default",
        Path(sys.executable),
        (str(FAKE), "--load-time", "0.1", *args),
        tmp_path / "logs" / "d.log",
        "fake",
    )


async def _wait_state(sup: Supervisor, state: State, timeout: float = 60.0) -> float:
    inst = sup.instances["default"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while inst.state is not state:
        assert loop.time() - t0 < timeout, f"stuck in {inst.state}: {inst.last_error}"
        await asyncio.sleep(0.02)
    return loop.time() - t0


@fake
def test_a_stopped_server_is_killed_by_the_fast_rule(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(QUICK)
        sup.add(_config(tmp_path))
        inst = await sup.start("default")
        frozen = inst.backend.pid  # type: ignore[union-attr]
        os.kill(frozen, signal.SIGSTOP)  # type: ignore[arg-type]
        await _wait_state(sup, State.BACKOFF)
        # Well before the slow rule (3 x 20 s) could have said so.
        assert "stopped (SIGSTOP)" in (inst.last_error or ""), inst.last_error
        await _wait_state(sup, State.READY)
        assert inst.restarts == 1
        await sup.close()

    run(main())


@fake
def test_a_silent_idle_server_is_killed_by_the_fast_rule(tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor(QUICK)
        sup.add(_config(tmp_path, "--mode", "hang", "--hang-after", "0.5"))
        inst = await sup.start("default")
        await _wait_state(sup, State.BACKOFF)
        assert "no sign of life" in (inst.last_error or ""), inst.last_error
        await sup.close()

    run(main())


#: A stand-in for a llama-server that is busy computing: /health answers while it starts, then
#: never again, while a thread keeps the CPU busy (as a long prompt or a GPU wait loop would).
_BUSY = textwrap.dedent(
    """
    import http.server, sys, threading, time
    port = int(sys.argv[sys.argv.index("--port") + 1])
    t0 = time.monotonic()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if time.monotonic() - t0 > 1.0:
                time.sleep(3600)
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
            self.wfile.write(b"{}")
        def log_message(self, *a): pass
    def spin():
        while True:
            pass
    threading.Thread(target=spin, daemon=True).start()
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@fake
def test_a_busy_server_is_not_taken_for_hung_by_the_fast_rule(tmp_path: Path) -> None:
    script = tmp_path / "busy.py"
    script.write_text(_BUSY)
    exe = tmp_path / "busy-server"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    exe.chmod(0o755)

    async def main() -> None:
        policy = Policy(**{**QUICK.__dict__, "health_timeout": 1.0})
        sup = Supervisor(policy)
        sup.add(_config(tmp_path, binary=exe))
        inst = await sup.start("default")
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.0 + 4 * (policy.health_interval + policy.quick_timeout)
        while loop.time() < until:  # many fast checks: every one finds it using CPU
            assert inst.state is State.READY, inst.last_error
            await asyncio.sleep(0.1)
        # The slow rule still ends a server that never answers again.
        await _wait_state(sup, State.BACKOFF)
        assert "stopped answering /health" in (inst.last_error or ""), inst.last_error
        await sup.close()

    run(main())


@fake
def test_a_request_in_flight_on_a_frozen_server_goes_to_its_successor(tmp_path: Path) -> None:
    s = start_serve(fake_binary(tmp_path), fake_model(tmp_path), tmp_path / "home", ["--port", "0"])
    try:
        url = s.url_of("http")
        (victim,) = [
            p
            for p in psutil.Process(s.proc.pid).children(recursive=True)
            if "fake" in " ".join(p.cmdline())
        ]
        victim.suspend()  # SIGSTOP: its port accepts, nothing answers
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120, trust_env=False)
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["choices"]
        assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
        print(f"RECOVERY fake SIGSTOP: request in flight answered by the successor in {took:.2f} s")
    finally:
        s.stop()
    assert "stopped (SIGSTOP)" in s.stderr()


# -- the fast rule on the fake clock (unit) --------------------------------------------------


def _drive_fake(vitals: Vitals | None) -> tuple[float, str]:
    """A supervisor on the fake backend and clock with the default policy: how long after a
    hang (health silent) the instance left READY, and why."""
    from support.fakebackend import FakeBackends, FakeClock

    async def main() -> tuple[float, str]:
        clock = FakeClock()
        backends = FakeBackends(clock)
        sup = Supervisor(Policy(), clock=clock, sleep=clock.sleep, backend_factory=backends)
        sup.add(InstanceConfig("default", Path("/fake/llama-server"), (), Path("/fake/d.log")))
        try:
            task = asyncio.ensure_future(sup.start("default"))
            await clock.run_until(task.done)
            inst = task.result()
            backends.script.hang = True
            backends.script.vitals = vitals
            hung_at = clock()
            await clock.run_until(lambda: inst.state is not State.READY)
            return clock() - hung_at, inst.last_error or ""
        finally:
            await sup.close()

    return asyncio.run(asyncio.wait_for(main(), timeout=30))


@unit
def test_fast_rule_on_the_fake_clock_beats_the_slow_one() -> None:
    stopped, why = _drive_fake(Vitals(cpu_ticks=5, stopped=True, active=False))
    assert "SIGSTOP" in why
    lifeless, why2 = _drive_fake(Vitals(cpu_ticks=5, stopped=False, active=False))
    assert "no sign of life" in why2
    slow, why3 = _drive_fake(None)  # nothing to read: the slow rule alone
    assert "stopped answering /health" in why3
    # Default policy: at most one interval, then two quick checks half a second apart.
    p = Policy()
    fast_bound = p.health_interval + p.sure_after * p.quick_timeout + p.recheck_after
    assert stopped <= fast_bound and lifeless <= fast_bound < slow
    print(f"HANG virtual seconds: fast rule {stopped:.2f}, slow rule {slow:.2f}")
