"""`llamactl worker` on the fake ggml-rpc-server: ready, listed by ps, restarted when killed,
bind failures retried, fatal starts reported, stopped by `llamactl stop`; the hello probe
against live sockets (down, busy, other version)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.workers import Worker
from support.workers import launch as launch_worker

from llamactl.net import free_port
from llamactl.proc import stop_group
from llamactl.serve import rpc
from llamactl.serve.rpc import Endpoint, RpcVersion

pytestmark = pytest.mark.fake

FAKE_RPC = Path(__file__).parent / "fakes" / "fake_rpc_server.py"
DEADLINE = 30.0
WORKER = (sys.executable, "-m", "llamactl", "worker", "--rpc-bin", str(FAKE_RPC))


def llamactl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamactl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLAMACTL_HOME": str(home)},
        check=False,
    )


def launch(home: Path, *args: str, env: dict[str, str] | None = None) -> Worker:
    return launch_worker(home, *args, rpc_bin=FAKE_RPC, env=env)


@pytest.fixture
def workers(llamactl_home: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        stop_group(w.proc.pid, grace=5, popen=w.proc)


def test_worker_ready_listed_restarted_and_stopped(
    llamactl_home: Path, workers: list[Worker]
) -> None:
    w = launch(llamactl_home)
    workers.append(w)
    w.wait_for("worker ready at")
    assert rpc.probe(Endpoint("127.0.0.1", w.port)).version == RpcVersion(7, 0, 0)

    ps = llamactl(llamactl_home, "ps", "--json")
    (row,) = json.loads(ps.stdout)
    assert row["kind"] == "worker"
    assert row["url"] == f"127.0.0.1:{w.port}"
    assert row["state"] == "ready"
    (child,) = w.rpc_children()
    assert row["server_pid"] == child.pid
    assert "worker" in llamactl(llamactl_home, "ps").stdout

    child.kill()  # the worker's ggml-rpc-server dies: supervision brings it back
    w.wait_for("worker ready again (restart 1)")
    assert rpc.probe(Endpoint("127.0.0.1", w.port)).ok
    (again,) = w.rpc_children()
    assert again.pid != child.pid

    stopped = llamactl(llamactl_home, "stop", str(w.port))
    assert stopped.returncode == 0, stopped.stderr
    assert w.proc.wait(timeout=DEADLINE) == 128 + signal.SIGTERM
    assert not again.is_running() or again.status() == psutil.STATUS_ZOMBIE
    assert json.loads(llamactl(llamactl_home, "ps", "--json").stdout) == []


def test_bind_failures_are_retried(
    llamactl_home: Path, workers: list[Worker], tmp_path: Path
) -> None:
    counter = tmp_path / "starts"
    w = launch(
        llamactl_home,
        env={"FAKE_RPC_BIND_FAILS": "2", "FAKE_RPC_COUNTER": str(counter)},
    )
    workers.append(w)
    w.wait_for("worker ready at")
    assert counter.read_text() == "3"


def test_an_unknown_device_ends_the_worker_with_the_reason(
    llamactl_home: Path, workers: list[Worker]
) -> None:
    w = launch(llamactl_home, "--device", "NOPE0", env={"FAKE_RPC_MODE": "unknown-device"})
    workers.append(w)
    assert w.proc.wait(timeout=DEADLINE) == 6
    err = w.stderr()
    assert "does not know a --device" in err and "NOPE0" in err
    assert "Traceback" not in err


def test_a_taken_port_is_named(llamactl_home: Path, workers: list[Worker]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        err = llamactl_home.parent / "taken.err"
        llamactl_home.mkdir(parents=True, exist_ok=True)
        with open(err, "w") as fh:
            proc = subprocess.run(
                [*WORKER, "--port", str(port)],
                stderr=fh,
                stdout=subprocess.DEVNULL,
                timeout=DEADLINE,
                env={**os.environ, "LLAMACTL_HOME": str(llamactl_home)},
                check=False,
            )
    assert proc.returncode == 6
    assert f"port {port} on 127.0.0.1 is in use" in err.read_text()


def test_a_public_address_needs_the_flag(llamactl_home: Path) -> None:
    out = llamactl(llamactl_home, "worker", "--rpc-bin", str(FAKE_RPC), "--host", "0.0.0.0")
    assert out.returncode == 2
    assert "no authentication" in out.stderr and "--i-understand-no-auth" in out.stderr


def test_probe_of_a_closed_port_says_refused() -> None:
    found = rpc.probe(Endpoint("127.0.0.1", free_port()), timeout=2)
    assert not found.ok and "refuses connections" in (found.problem or "")


def test_probe_of_a_busy_worker_says_busy(workers: list[Worker], llamactl_home: Path) -> None:
    w = launch(llamactl_home)
    workers.append(w)
    w.wait_for("worker ready at")
    head = socket.create_connection(("127.0.0.1", w.port))  # a head holds the worker
    try:
        head.sendall(rpc.hello_request())
        head.recv(36)
        found = rpc.probe(Endpoint("127.0.0.1", w.port), timeout=0.5)
        assert found.busy and "another head" in (found.problem or "")
    finally:
        head.close()
    deadline = time.monotonic() + DEADLINE
    while not rpc.probe(Endpoint("127.0.0.1", w.port), timeout=1).ok:
        assert time.monotonic() < deadline, "the worker did not serve the next client"


def test_async_probe_names_another_version(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_RPC), "--port", str(port)],
        env={**os.environ, "FAKE_RPC_VERSION": "6.2.0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            found = asyncio.run(rpc.probe_async(Endpoint("127.0.0.1", port), timeout=2))
            if found.ok or time.monotonic() > deadline:
                break
        assert found.version == RpcVersion(6, 2, 0)
        text = rpc.describe_unready([found], RpcVersion(7, 0, 0))
        assert text and "6.2.0" in text and "7.0.0" in text
    finally:
        proc.kill()
        proc.wait()


def ns_flags(address: str) -> list[str]:
    return ["--host", address, "--i-understand-no-auth"]


def test_a_worker_on_a_host_of_its_own_answers_across_the_link(
    llamactl_home: Path, tmp_path: Path
) -> None:
    from support.netns import host_namespace

    with host_namespace() as ns:
        if ns is None:
            pytest.skip("no network namespaces here (needs root and iproute2)")
        port = free_port()
        err = tmp_path / "ns-worker.err"
        with open(err, "w") as fh:
            proc = subprocess.Popen(
                [*ns.prefix(), *WORKER, "--port", str(port), *ns_flags(ns.address)],
                stdout=subprocess.DEVNULL,
                stderr=fh,
                env={**os.environ, "LLAMACTL_HOME": str(llamactl_home)},
                start_new_session=True,
            )
        try:
            endpoint = Endpoint(ns.address, port)
            deadline = time.monotonic() + DEADLINE
            while not (found := rpc.probe(endpoint, timeout=1)).ok:
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            assert found.version == RpcVersion(7, 0, 0)
            assert "anyone who can reach that address" in err.read_text()
            # Not on this side's loopback: the worker is on its own host.
            assert not rpc.probe(Endpoint("127.0.0.1", port), timeout=1).ok
        finally:
            stop_group(proc.pid, grace=5, popen=proc)
