"""The RPC hello and the worker's decisions: bytes, parsing, versions, where a worker may bind,
what an exit means, and the runner's supervision on fakes (no process, no socket)."""

from __future__ import annotations

import os
import re
import struct
import threading
from pathlib import Path

import pytest

from llamactl import paths
from llamactl.errors import UsageError
from llamactl.serve import rpc, worker
from llamactl.serve.rpc import Endpoint, Probe, RpcVersion

pytestmark = pytest.mark.unit

V7 = RpcVersion(7, 0, 0)


def reply(major: int, minor: int, patch: int) -> bytes:
    body = bytes([major, minor, patch, 0]) + bytes(24)
    return struct.pack("<Q", len(body)) + body


def test_hello_request_is_cmd_14_then_size_then_zero_caps() -> None:
    data = rpc.hello_request()
    assert data[0] == 14
    assert struct.unpack("<Q", data[1:9]) == (24,)
    assert data[9:] == bytes(24)
    assert len(data) == 33


def test_hello_reply_parsed() -> None:
    assert rpc.parse_hello_reply(reply(7, 1, 3)) == RpcVersion(7, 1, 3)


@pytest.mark.parametrize(
    "data",
    [b"", reply(7, 0, 0)[:20], struct.pack("<Q", 8) + bytes(28)],
)
def test_bad_hello_replies_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        rpc.parse_hello_reply(data)


def test_version_must_match_exactly_and_both_are_named() -> None:
    assert rpc.version_problem(V7, V7) is None
    for other in (RpcVersion(6, 0, 0), RpcVersion(7, 1, 0), RpcVersion(7, 0, 1)):
        problem = rpc.version_problem(other, V7)
        assert problem is not None
        assert str(other) in problem and "7.0.0" in problem


def test_pinned_version_is_the_vendored_headers() -> None:
    header = paths.vendor_dir() / "llama.cpp" / "ggml" / "include" / "ggml-rpc.h"
    if not header.is_file():
        pytest.skip("no vendored llama.cpp")
    text = header.read_text()
    found = tuple(
        int(re.search(rf"RPC_PROTO_{p}_VERSION\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        for p in ("MAJOR", "MINOR", "PATCH")
    )
    assert found == rpc.PINNED_VERSION
    assert rpc.expected_version() == RpcVersion(*found)


def test_expected_version_without_source_is_the_constant(tmp_path: Path) -> None:
    assert rpc.expected_version(tmp_path) == RpcVersion(*rpc.PINNED_VERSION)


def test_endpoints_parsed_as_llama_server_takes_them() -> None:
    assert rpc.parse_endpoints("127.0.0.1:50052, 10.0.0.2:1") == (
        Endpoint("127.0.0.1", 50052),
        Endpoint("10.0.0.2", 1),
    )
    for bad in ("", "host", "h:0", "h:70000", "h:p", "a:1,a:1"):
        with pytest.raises(UsageError):
            rpc.parse_endpoints(bad)


def test_rpc_flag_found_in_llama_server_args() -> None:
    assert rpc.rpc_endpoints_in(["-ngl", "99", "--rpc", "h:1,h:2"]) == (
        Endpoint("h", 1),
        Endpoint("h", 2),
    )
    assert rpc.rpc_endpoints_in(["--rpc=h:3"]) == (Endpoint("h", 3),)
    assert rpc.rpc_endpoints_in(["-ngl", "99"]) == ()
    with pytest.raises(UsageError):
        rpc.rpc_endpoints_in(["--rpc"])


def test_unready_workers_each_named() -> None:
    probes = [
        Probe(Endpoint("a", 1), version=V7),
        Probe(Endpoint("b", 2), problem="refuses connections"),
        Probe(Endpoint("c", 3), version=RpcVersion(6, 1, 0)),
    ]
    text = rpc.describe_unready(probes, V7)
    assert text is not None
    assert "a:1" not in text
    assert "b:2 refuses connections" in text
    assert "c:3 speaks RPC protocol 6.1.0" in text and "7.0.0" in text
    assert rpc.describe_unready(probes[:1], V7) is None


# -- the worker's decisions -----------------------------------------------------------------


def test_loopback_binds_silently() -> None:
    assert worker.bind_warning("127.0.0.1", False) is None
    assert worker.bind_warning("127.0.0.2", False) is None


def test_other_addresses_need_the_flag_and_warn() -> None:
    with pytest.raises(UsageError, match="no authentication") as info:
        worker.bind_warning("0.0.0.0", False)
    assert "--i-understand-no-auth" in (info.value.hint or "")
    warning = worker.bind_warning("192.168.1.5", True)
    assert warning is not None and "anyone who can reach" in warning


def test_names_are_refused_as_ggml_binds_ipv4_literals_only() -> None:
    with pytest.raises(UsageError, match="IPv4"):
        worker.bind_warning("localhost", True)


def test_worker_argv() -> None:
    spec = worker.WorkerSpec(port=5000, devices=("CUDA0", "CUDA1"), cache=True, threads=3)
    assert worker.worker_argv(Path("/b/ggml-rpc-server"), spec) == [
        "/b/ggml-rpc-server",
        "--host",
        "127.0.0.1",
        "--port",
        "5000",
        "--device",
        "CUDA0,CUDA1",
        "--threads",
        "3",
        "--cache",
    ]


@pytest.mark.parametrize(
    ("code", "lines", "kind"),
    [
        (0, ["Starting RPC server v7.0.0", "Failed to create server socket"], "bind"),
        (1, ["error: unknown device: X"], "fatal"),
        (1, ["No devices found"], "fatal"),
        (0, ["usage ..."], "fatal"),
        (-9, ["Accepted client connection"], "crash"),
        (-6, [], "crash"),
    ],
)
def test_exits_classified(code: int, lines: list[str], kind: str) -> None:
    assert worker.classify_exit(code, lines)[0].value == kind


def test_backoff_grows_to_its_bound() -> None:
    policy = worker.WorkerPolicy(backoff_initial=0.25, backoff_max=2.0)
    assert [worker.backoff_delay(n, policy) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1, 2, 2]


# -- the runner on fakes --------------------------------------------------------------------


class FakeProc:
    def __init__(self, pid: int, code: int | None = None) -> None:
        self.pid = pid
        self.code = code

    def poll(self) -> int | None:
        return self.code


class Script:
    """Each start takes the next (exit code or None for 'runs', log line) from a list."""

    def __init__(self, log: Path, outcomes: list[tuple[int | None, str]]) -> None:
        self.log = log
        self.outcomes = outcomes
        self.started: list[FakeProc] = []
        self.stopped: list[int] = []

    def start(self, argv: list[str], log_path: Path) -> FakeProc:
        code, line = self.outcomes.pop(0) if self.outcomes else (None, "")
        with open(log_path, "a") as fh:
            fh.write(line + "\n")
        p = FakeProc(100 + len(self.started), code)
        self.started.append(p)
        return p

    def stop(self, p: worker.Process, grace: float) -> None:
        self.stopped.append(p.pid)


def runner(tmp_path: Path, script: Script, **kw: object) -> worker.WorkerRunner:
    stop = threading.Event()
    policy = worker.WorkerPolicy(backoff_initial=0.001, backoff_max=0.002, ready_timeout=5)

    def probe(endpoint: Endpoint, timeout: float) -> Probe:
        current = script.started[-1]
        if current.code is None:
            return Probe(endpoint, version=V7)
        return Probe(endpoint, problem="refuses connections")

    return worker.WorkerRunner(
        worker.WorkerSpec(port=5000),
        Path("/fake"),
        script.log,
        policy=policy,
        expected=V7,
        start=script.start,
        stop_process=script.stop,
        probe=kw.pop("probe", probe),  # type: ignore[arg-type]
        port_free=lambda e: True,
        stop=stop,
        **kw,  # type: ignore[arg-type]
    )


def test_bind_failures_on_a_free_port_are_retried_at_once(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    script = Script(log, [(0, "Failed to create server socket")] * 3)
    states: list[str] = []

    def on_change(status: worker.Status) -> None:
        states.append(status.state.value)
        if status.state is worker.State.READY:
            r.stop.set()

    r = runner(tmp_path, script, on_change=on_change)
    r.run()
    assert len(script.started) == 4
    assert "ready" in states and states[-1] == "stopped"
    assert r.status.restarts == 0  # never ready before: not restarts


def test_a_fatal_exit_ends_the_worker_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    script = Script(log, [(1, "error: unknown device: NOPE0")])
    r = runner(tmp_path, script)
    with pytest.raises(worker.WorkerError, match="does not know a --device") as info:
        r.run()
    assert "NOPE0" in info.value.message
    assert r.status.state is worker.State.FAILED


def test_a_crash_after_ready_restarts_and_counts(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    first = FakeProc(1)
    script = Script(log, [])
    started: list[FakeProc] = []

    def start(argv: list[str], log_path: Path) -> FakeProc:
        p = first if not started else FakeProc(2)
        started.append(p)
        script.started.append(p)
        return p

    def on_change(status: worker.Status) -> None:
        if status.state is worker.State.READY:
            if len(started) == 1:
                first.code = -9  # killed from outside once it is ready
            else:
                r.stop.set()

    r = runner(tmp_path, script, on_change=on_change)
    r._start = start  # type: ignore[assignment]
    r.run()
    assert len(started) == 2
    assert r.status.restarts == 1
    assert "SIGKILL" in (r.status.last_error or "")


def test_a_worker_that_keeps_crashing_before_ready_gives_up(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    script = Script(log, [(-11, "Segmentation fault")] * 5)
    r = runner(tmp_path, script)
    with pytest.raises(worker.WorkerError, match="3 tries"):
        r.run()
    assert len(script.started) == 3


def test_another_version_on_our_port_is_fatal_with_both_versions(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    script = Script(log, [(None, "")])
    r = runner(
        tmp_path,
        script,
        probe=lambda e, t: Probe(e, version=RpcVersion(6, 0, 0)),
    )
    with pytest.raises(worker.WorkerError, match=r"6\.0\.0.*7\.0\.0"):
        r.run()
    assert script.stopped  # our own process is not left behind


# -- a head waits for its workers -------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_head_waits_for_workers_that_start_late_and_says_so_once() -> None:
    clock = FakeClock()
    said: list[str] = []
    late = Endpoint("127.0.0.1", 2)

    def probe(e: Endpoint, timeout: float) -> Probe:
        if e == late and clock.now < 1.0:
            return Probe(e, problem="refuses connections")
        return Probe(e, version=V7)

    rpc.wait_for_workers(
        [Endpoint("127.0.0.1", 1), late],
        deadline_s=10,
        expected=V7,
        say=said.append,
        probe_one=probe,
        clock=clock,
        sleep=clock.sleep,
    )
    assert said == ["waiting for RPC worker 127.0.0.1:2: it refuses connections"]
    assert 1.0 <= clock.now < 2.0


def test_head_names_the_worker_that_never_answers() -> None:
    from llamactl.errors import ServerStartError

    clock = FakeClock()
    with pytest.raises(ServerStartError) as info:
        rpc.wait_for_workers(
            [Endpoint("h", 1), Endpoint("h", 2)],
            deadline_s=5,
            expected=V7,
            probe_one=lambda e, t: (
                Probe(e, version=V7) if e.port == 1 else Probe(e, problem="refuses connections")
            ),
            clock=clock,
            sleep=clock.sleep,
        )
    assert "RPC worker h:2 refuses connections" in info.value.message
    assert "h:1" not in info.value.message
    assert "llamactl worker" in (info.value.hint or "")
    assert clock.now == pytest.approx(5, abs=0.3)


def test_head_refuses_a_worker_of_another_version_at_once() -> None:
    from llamactl.errors import ServerStartError

    clock = FakeClock()
    with pytest.raises(ServerStartError, match=r"h:1 speaks RPC protocol 6\.0\.0.*7\.0\.0"):
        rpc.wait_for_workers(
            [Endpoint("h", 1)],
            deadline_s=5,
            expected=V7,
            probe_one=lambda e, t: Probe(e, version=RpcVersion(6, 0, 0)),
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.now == 0


def test_a_head_log_that_says_a_worker_was_lost_is_no_crash_of_its_own() -> None:
    from llamactl.serve.supervisor import Instance, InstanceConfig, Supervisor

    class Tail:
        def __init__(self, lines: list[str]) -> None:
            self.lines = lines

        def tail(self, n: int = 20) -> list[str]:
            return self.lines[-n:]

    def inst(lines: list[str], workers: tuple[Endpoint, ...]) -> Instance:
        config = InstanceConfig("m", Path("/x"), (), Path("/l"), rpc_workers=workers)
        return Instance(config=config, backend=Tail(lines))  # type: ignore[arg-type]

    sup = Supervisor()
    crashed = ["...", "Remote RPC server crashed or returned malformed response", "abort"]
    one = (Endpoint("h", 1),)
    assert sup._lost_worker(inst(crashed, one)) == "an RPC worker was lost"
    assert sup._lost_worker(inst(["Failed to connect to h:1"], one)) is not None
    assert sup._lost_worker(inst(["segfault"], one)) is None
    assert sup._lost_worker(inst(crashed, ())) is None  # not an RPC-backed instance


def test_a_toml_model_split_over_rpc_workers(tmp_path: Path) -> None:
    from llamactl.serve.config import ConfigError, declare

    (tmp_path / "big.gguf").write_bytes(b"GGUF")
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        "[models.big]\nfile = 'big.gguf'\nargs = ['-ngl', '999']\n"
        "rpc = ['10.0.0.2:50052', '10.0.0.3:50052']\n"
    )
    (big,) = declare(config=cfg).models
    assert big.args == ("-ngl", "999", "--rpc", "10.0.0.2:50052,10.0.0.3:50052")
    assert rpc.rpc_endpoints_in(big.args) == (
        Endpoint("10.0.0.2", 50052),
        Endpoint("10.0.0.3", 50052),
    )
    cfg.write_text("[models.big]\nfile = 'big.gguf'\nrpc = ['nowhere']\n")
    with pytest.raises(ConfigError, match=r"serve\.toml:3: \[models\.big\] rpc: not an RPC"):
        declare(config=cfg)


# -- a local head's own connections (/proc) ------------------------------------------------------

# /proc/PID/net/tcp of a head (llama-server --rpc 127.0.0.1:47001,127.0.0.1:47002), recorded
# after the ggml-rpc-server on 47001 was killed: its listening socket, the live link to 47002
# and the one to 47001 in CLOSE_WAIT (08), plus another process's socket it does not own.
PROC = Path(__file__).parent / "fixtures" / "proc"
PROC_TCP = (PROC / "head-net-tcp.txt").read_text()
# IPv6, hand-made in the same format: an IPv4-mapped link in CLOSE_WAIT, a live one to ::1.
PROC_TCP6 = (PROC / "head-net-tcp6.txt").read_text()
HEAD_INODES = {"4171346", "4172560", "4172554", "555", "556"}


def test_a_heads_links_come_from_proc_with_their_states() -> None:
    assert rpc.parse_proc_tcp(PROC_TCP, HEAD_INODES) == [
        ("0.0.0.0", 0, "0A"),
        ("127.0.0.1", 47002, rpc.TCP_ESTABLISHED),
        ("127.0.0.1", 47001, rpc.TCP_CLOSE_WAIT),
    ]
    assert rpc.parse_proc_tcp(PROC_TCP6, HEAD_INODES) == [
        ("10.0.0.2", 47001, rpc.TCP_CLOSE_WAIT),  # IPv4-mapped
        ("::1", 47003, rpc.TCP_ESTABLISHED),
    ]
    assert rpc.parse_proc_tcp("header only\n", HEAD_INODES) == []


def test_a_worker_whose_end_closed_is_lost_and_only_the_heads_workers_count() -> None:
    w1, w2 = Endpoint("127.0.0.1", 47001), Endpoint("gpu-box", 47001)
    links = rpc.parse_proc_tcp(PROC_TCP, HEAD_INODES) + rpc.parse_proc_tcp(PROC_TCP6, HEAD_INODES)
    assert rpc.lost_links(links, {("127.0.0.1", 47001): w1, ("127.0.0.1", 47002): w1}) == [w1]
    assert rpc.lost_links(links, {("10.0.0.2", 47001): w2}) == [w2]  # a name, resolved
    assert rpc.lost_links(links, {("127.0.0.1", 47002): w1}) == []  # its link is live
    assert rpc.lost_links(links, {}) == []


def test_a_process_that_proc_cannot_show_is_none() -> None:
    assert rpc.process_links(2**22 + 12345) is None  # beyond pid_max: no such process
    mine = rpc.process_links(os.getpid())
    if Path("/proc/self/fd").is_dir():
        assert mine is not None
