"""A head over RPC workers, on fakes: the supervisor waits for a lost worker instead of
spending its crash-loop budget, then restarts the head; serve names a missing worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from llamactl.net import free_port
from llamactl.serve import rpc
from llamactl.serve.rpc import Endpoint
from llamactl.serve.supervisor import InstanceConfig, Policy, State, Supervisor

pytestmark = pytest.mark.fake

FAKES = Path(__file__).parent / "fakes"
FAKE_SERVER = str(FAKES / "fake_llama_server.py")
FAKE_RPC = str(FAKES / "fake_rpc_server.py")
FAST = Policy(
    queue_timeout=10.0,
    stall_timeout=10.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    crash_limit=3,
    crash_window=60.0,
    health_interval=0.1,
    health_timeout=0.5,
    stop_grace=2.0,
    worker_poll=0.05,
    worker_probe_timeout=0.5,
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=90))


class FakeWorker:
    """The fake ggml-rpc-server on a fixed port, stopped and started again at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, FAKE_RPC, "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not rpc.probe(self.endpoint, timeout=1).ok:
            assert time.monotonic() < deadline, "fake worker did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


async def wait_for(pred: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"stuck waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_head_whose_worker_died_waits_for_it_without_spending_its_budget(
    tmp_path: Path,
) -> None:
    worker = FakeWorker()
    worker.start()

    async def main() -> None:
        sup = Supervisor(FAST)
        inst = sup.add(
            InstanceConfig(
                name="default",
                binary=Path(sys.executable),
                args=(FAKE_SERVER, "--load-time", "0.05", "--rpc", str(worker.endpoint)),
                log_path=tmp_path / "head.log",
                rpc_workers=(worker.endpoint,),
            )
        )
        await sup.start("default")
        try:
            # More worker losses than the crash-loop limit, each taking the head down with it.
            for episode in range(FAST.crash_limit + 2):
                generation = inst.generation
                worker.kill()
                assert inst.process is not None and inst.process.popen is not None
                inst.process.popen.kill()  # what llama-server does: it aborts
                await wait_for(
                    lambda: inst.state is State.BACKOFF and "waiting" in (inst.last_error or ""),
                    "the wait for the worker",
                )
                assert str(worker.endpoint) in (inst.last_error or "")
                # It keeps waiting (no restart, no failure) while the worker is gone.
                await asyncio.sleep(0.3)
                assert inst.state is State.BACKOFF and inst.generation == generation
                worker.start()
                await wait_for(lambda: inst.state is State.READY, "the head back", timeout=30)
                assert inst.generation == generation + 1, episode
            assert not inst.failures
            assert inst.restarts == FAST.crash_limit + 2
            up = await sup.acquire(None)
            sup.release(up, 200)
        finally:
            await sup.close()

    try:
        run(main())
    finally:
        worker.kill()


def test_a_head_that_crashed_on_its_own_still_counts(tmp_path: Path) -> None:
    worker = FakeWorker()
    worker.start()

    async def main() -> None:
        sup = Supervisor(FAST)
        inst = sup.add(
            InstanceConfig(
                name="default",
                binary=Path(sys.executable),
                args=(FAKE_SERVER, "--load-time", "0.05"),
                log_path=tmp_path / "head.log",
                rpc_workers=(worker.endpoint,),
            )
        )
        await sup.start("default")
        try:
            assert inst.process is not None and inst.process.popen is not None
            inst.process.popen.kill()
            await wait_for(lambda: inst.restarts == 1, "the restart")
            assert len(inst.failures) == 1  # the worker answered: the head's own crash
        finally:
            await sup.close()

    try:
        run(main())
    finally:
        worker.kill()


def test_serve_names_a_worker_that_does_not_answer(llamactl_home: Path) -> None:
    port = free_port()
    out = subprocess.run(
        [
            *(sys.executable, "-m", "llamactl", "serve", "--server-bin", sys.executable),
            *("-m", FAKE_SERVER, "--rpc", f"127.0.0.1:{port}", "--start-timeout", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLAMACTL_HOME": str(llamactl_home)},
        check=False,
    )
    assert out.returncode == 6, out.stderr
    assert f"waiting for RPC worker 127.0.0.1:{port}" in out.stderr
    assert f"Error: RPC worker 127.0.0.1:{port} refuses connections" in out.stderr
    assert "llamactl worker" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_config_model_over_rpc_waits_for_its_worker_and_names_a_missing_one(
    tmp_path: Path,
) -> None:
    import httpx
    from support.serve import start, stop

    fakebin = tmp_path / "llama-server"
    fakebin.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    fakebin.chmod(0o755)
    (tmp_path / "big.gguf").write_bytes(b"GGUF")
    worker = FakeWorker()
    missing = free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f"[models.big]\nfile = 'big.gguf'\nrpc = ['127.0.0.1:{worker.port}']\n\n"
        f"[models.lost]\nfile = 'big.gguf'\nrpc = ['127.0.0.1:{missing}']\n"
    )
    worker.start()
    serve = start(fakebin, None, tmp_path / "home", "--config", str(cfg), "--start-timeout", "3")
    try:
        body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(f"{serve.url}/v1/chat/completions", json=body, timeout=90)
        assert r.status_code == 200, r.text
        (row,) = [x for x in serve.ps() if x["model"] == "big"]
        assert row["where"] == f"rpc 127.0.0.1:{worker.port}"
        cmdlines = [" ".join(k.cmdline()) for k in serve.children()]
        assert any(f"--rpc 127.0.0.1:{worker.port}" in c for c in cmdlines), cmdlines
        r = httpx.post(
            f"{serve.url}/v1/chat/completions", json={**body, "model": "lost"}, timeout=120
        )
        assert r.status_code >= 500, r.text
        assert f"RPC worker 127.0.0.1:{missing} refuses connections" in r.text
    finally:
        stop(serve)
        worker.kill()
