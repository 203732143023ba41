"""`llamactl worker`: one ggml-rpc-server from llamactl's build, supervised (restart with
backoff, parent-death signal, a log file, a state record for ps / stop / logs), for a head's
`llamactl serve --rpc HOST:PORT,...` to split a model over.

Pure decisions (the argument list, where it may bind, what an exit means, how long to wait)
are functions of their inputs; `WorkerRunner` carries them out, with the process start, the
probe, the clock and the waits passed in, so the tests drive it without a process.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from llamactl import paths, proc
from llamactl.errors import BuildError, LlamactlError, UsageError
from llamactl.serve import rpc

log = logging.getLogger(__name__)

RPC_BINARY = "ggml-rpc-server"


class WorkerError(LlamactlError):
    """The worker cannot run: a fatal start problem of ggml-rpc-server, with its log."""

    exit_code = 6


@dataclass(frozen=True)
class WorkerSpec:
    """Everything `llamactl worker` was asked to do."""

    host: str = "127.0.0.1"
    port: int = rpc.DEFAULT_WORKER_PORT
    devices: tuple[str, ...] = ()
    cache: bool = False
    threads: int | None = None
    allow_remote: bool = False
    binary: Path | None = None
    backend: str | None = None


@dataclass(frozen=True)
class WorkerPolicy:
    """How hard the worker tries: every knob of its supervision."""

    ready_timeout: float = 60.0  # spawn -> hello answered (device init can take seconds)
    probe_timeout: float = 2.0
    backoff_initial: float = 0.25
    backoff_max: float = 10.0
    #: Up after this long without a failure: the next failure starts the backoff afresh.
    stable_after: float = 30.0
    #: "Failed to create server socket" on a port nobody holds (RESOURCES.md: seen on free
    #: ports, cause unknown) is retried at once this many times in a row before backing off.
    bind_retries: int = 10
    stop_grace: float = 5.0


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    FAILED = "failed"


# -- pure ------------------------------------------------------------------------------------


def bind_warning(host: str, allow_remote: bool) -> str | None:
    """Refuse an address ggml-rpc-server cannot bind or may not bind without the explicit
    flag; the warning to print for one that is allowed but reachable from elsewhere."""
    try:
        # ggml-rpc-server binds IPv4 literals only (inet_addr in its transport.cpp); a name
        # such as 'localhost' makes it exit with "Invalid host address".
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise UsageError(
            f"--host {host!r}: ggml-rpc-server binds an IPv4 address only "
            "(e.g. 127.0.0.1, or this host's LAN address)"
        ) from None
    if address.is_loopback:
        return None
    if not allow_remote:
        raise UsageError(
            f"--host {host} would let other machines use this worker, and the RPC protocol has "
            "no authentication: anyone who can reach the address can run code on this host's "
            "devices and read or overwrite the model's weights in its memory",
            hint="add --i-understand-no-auth if this is a private network you trust "
            "(see docs/security.md)",
        )
    return (
        f"warning: the RPC worker listens on {host}:{{port}} without authentication: anyone "
        "who can reach that address can use this host's devices and memory; keep it on a "
        "private network or behind a firewall (docs/security.md)"
    )


def worker_argv(binary: Path, spec: WorkerSpec) -> list[str]:
    """ggml-rpc-server's argument list (its flags: tools/rpc/rpc-server.cpp)."""
    argv = [str(binary), "--host", spec.host, "--port", str(spec.port)]
    if spec.devices:
        argv += ["--device", ",".join(spec.devices)]
    if spec.threads is not None:
        argv += ["--threads", str(spec.threads)]
    if spec.cache:
        argv.append("--cache")
    return argv


BIND_FAILED = "Failed to create server socket"

#: Log lines after which a start will fail the same way however often it is tried.
_FATAL = (
    ("unknown device", "ggml-rpc-server does not know a --device name (its log lists them)"),
    ("No devices found", "ggml-rpc-server found no device to serve"),
    ("Invalid host address", "ggml-rpc-server cannot bind that address"),
    ("unknown argument", "ggml-rpc-server rejected a flag"),
    ("Failed to find RPC backend", "this llama.cpp build has no RPC backend (GGML_RPC=OFF)"),
    ("Failed to create cache directory", "ggml-rpc-server cannot create its --cache directory"),
)


class ExitKind(str, enum.Enum):
    BIND = "bind"  # could not listen: retried at once, a few times
    FATAL = "fatal"  # a configuration problem: retrying cannot help
    CRASH = "crash"  # anything else: restart with backoff


def classify_exit(code: int | None, lines: Sequence[str]) -> tuple[ExitKind, str]:
    """What an ended ggml-rpc-server means, from its exit code and last log lines."""
    text = "\n".join(lines)
    if BIND_FAILED in text:
        return ExitKind.BIND, "it could not listen on its port"
    for needle, reason in _FATAL:
        if needle in text:
            return ExitKind.FATAL, reason
    if code == 0:
        # It returns 0 after --help or an unknown flag; otherwise its accept loop never ends.
        return ExitKind.FATAL, "ggml-rpc-server exited with code 0 (see its log)"
    from llamactl.serve.server import describe_exit

    return ExitKind.CRASH, f"ggml-rpc-server ended ({describe_exit(code) if code else '?'})"


def backoff_delay(failures: int, policy: WorkerPolicy) -> float:
    """Seconds before the next start after `failures` failures in a row (>= 1)."""
    return min(policy.backoff_max, policy.backoff_initial * 2 ** max(0, failures - 1))


# -- finding the binary -----------------------------------------------------------------------


def find_rpc_binary(backend: str | None = None) -> Path:
    """ggml-rpc-server of the build that serve would use (same commit as every head run by
    this llamactl): from its manifest, else beside its llama-server."""
    from llamactl.build import cache as builds

    server = builds.find_server_binary(backend=backend)
    for manifest in builds.find_builds():
        if manifest.server_binary == server and RPC_BINARY in manifest.binaries:
            binary = manifest.binary(RPC_BINARY)
            if binary.is_file():
                return binary
    sibling = server.with_name(RPC_BINARY)
    if sibling.is_file():
        return sibling
    raise BuildError(
        f"the llama.cpp build at {server.parent} has no {RPC_BINARY}",
        hint="rebuild with the RPC backend: `llamactl build` (GGML_RPC is on by default)",
    )


# -- running -----------------------------------------------------------------------------------


class Process(Protocol):
    """What the runner needs of a started ggml-rpc-server (a Popen, or a test's fake)."""

    pid: int

    def poll(self) -> int | None: ...


@dataclass
class Status:
    """The worker as `ps` shows it; updated by the runner, written to the state record."""

    state: State = State.STOPPED
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    last_error: str | None = None
    version: rpc.RpcVersion | None = None


def _tail(path: Path, n: int = 30) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return fh.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


class WorkerRunner:
    """Start ggml-rpc-server, confirm it answers the hello, restart it when it ends, until
    `stop` is set. Every collaborator that touches the machine is a parameter."""

    def __init__(
        self,
        spec: WorkerSpec,
        binary: Path,
        log_path: Path,
        *,
        policy: WorkerPolicy | None = None,
        expected: rpc.RpcVersion | None = None,
        start: Callable[[list[str], Path], Process] | None = None,
        stop_process: Callable[[Process, float], None] | None = None,
        probe: Callable[[rpc.Endpoint, float], rpc.Probe] = rpc.probe,
        port_free: Callable[[rpc.Endpoint], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
        on_change: Callable[[Status], None] = lambda status: None,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.spec = spec
        self.binary = binary
        self.log_path = log_path
        self.policy = policy or WorkerPolicy()
        self.expected = expected or rpc.expected_version()
        self._start = start or _start_process
        self._stop_process = stop_process or _stop_process
        self._probe = probe
        self._port_free_fn = port_free or _port_free
        self._clock = clock
        self.stop = stop or threading.Event()
        self._on_change = on_change
        self._say = say
        self.status = Status()
        self.process: Process | None = None
        # The endpoint to probe: a wildcard bind is reached on loopback.
        probe_host = "127.0.0.1" if spec.host == "0.0.0.0" else spec.host
        self.endpoint = rpc.Endpoint(probe_host, spec.port)

    def _set(self, state: State, reason: str) -> None:
        if state is not self.status.state:
            log.info("worker: %s -> %s (%s)", self.status.state.value, state.value, reason)
        self.status.state = state
        self._on_change(self.status)

    def run(self) -> None:
        """Supervise until stopped; WorkerError when a start fails in a way no retry fixes."""
        failures = 0  # in a row, reset by a stable run
        bind_failures = 0  # in a row, reset by a ready start
        ever_ready = False
        try:
            while not self.stop.is_set():
                outcome = self._start_and_wait_ready()
                if outcome is None:  # stopped while starting
                    return
                kind, reason = outcome
                if kind is None:  # ready
                    if ever_ready:
                        self.status.restarts += 1
                        self._say(f"worker ready again (restart {self.status.restarts})")
                    else:
                        self._say(
                            f"worker ready at {self.spec.host}:{self.spec.port} "
                            f"(RPC protocol {self.status.version}); a head uses it with "
                            f"`llamactl serve --rpc {self.endpoint}`"
                        )
                    self._on_change(self.status)
                    ever_ready = True
                    bind_failures = 0
                    up_since = self._clock()
                    code = self._wait_exit()
                    if code is None:  # stopped
                        return
                    kind, reason = classify_exit(code, _tail(self.log_path))
                    if self._clock() - up_since >= self.policy.stable_after:
                        failures = 0
                self.status.pid = None
                self.status.last_error = reason
                if kind is ExitKind.FATAL:
                    self._fail(reason)
                if kind is ExitKind.BIND:
                    if not self._port_free():
                        self._fail(
                            f"port {self.spec.port} on {self.spec.host} is in use by another "
                            "program (pick another with --port)"
                        )
                    bind_failures += 1
                    if bind_failures <= self.policy.bind_retries:
                        self._set(State.BACKOFF, f"{reason}; starting it again at once")
                        continue
                if not ever_ready and failures >= 2:
                    self._fail(f"{reason}, on each of 3 tries")
                failures += 1
                delay = backoff_delay(failures, self.policy)
                self._say(f"warning: {reason}; starting it again in {delay:.2f} s")
                self._set(State.BACKOFF, f"{reason}; starting again in {delay:.2f} s")
                if self.stop.wait(delay):
                    return
        finally:
            self._stop_current()
            if self.status.state is not State.FAILED:
                self._set(State.STOPPED, "llamactl worker is stopping")

    def _fail(self, reason: str) -> None:
        self._set(State.FAILED, reason)
        raise WorkerError(self._failure_message(reason))

    def _start_and_wait_ready(self) -> tuple[ExitKind | None, str] | None:
        """(None, '') once ready; (kind, reason) when it ended first; None when stopped."""
        argv = worker_argv(self.binary, self.spec)
        self._set(State.STARTING, "spawning ggml-rpc-server")
        self.process = self._start(argv, self.log_path)
        self.status.pid = self.process.pid
        self.status.started_at = time.time()
        self._on_change(self.status)
        deadline = self._clock() + self.policy.ready_timeout
        while not self.stop.is_set():
            code = self.process.poll()
            if code is not None:
                return classify_exit(code, _tail(self.log_path))
            result = self._probe(self.endpoint, self.policy.probe_timeout)
            if result.ok:
                assert result.version is not None
                wrong = rpc.version_problem(result.version, self.expected)
                if wrong:
                    # Another program of another llama.cpp answers on our port.
                    self._stop_current()
                    return ExitKind.FATAL, f"the RPC server on port {self.spec.port} {wrong}"
                if self.process.poll() is None:
                    self.status.version = result.version
                    self._set(State.READY, f"answers the RPC hello on {self.endpoint}")
                    return None, ""
            if self._clock() >= deadline:
                self._stop_current()
                return ExitKind.CRASH, (
                    f"ggml-rpc-server did not answer the RPC hello within "
                    f"{self.policy.ready_timeout:g} s"
                )
            if self.stop.wait(0.05):
                break
        return None

    def _wait_exit(self) -> int | None:
        """Block until the process ends (its code) or stop is set (None)."""
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                return code
            if self.stop.wait(0.2):
                return None

    def _port_free(self) -> bool:
        return self._port_free_fn(self.endpoint)

    def _stop_current(self) -> None:
        if self.process is not None:
            self._stop_process(self.process, self.policy.stop_grace)
            self.process = None
            self.status.pid = None

    def _failure_message(self, reason: str) -> str:
        lines = "\n".join(f"  | {line}" for line in _tail(self.log_path, 8))
        message = f"the RPC worker cannot run: {reason}"
        if lines:
            message += f"\nlast lines of {self.log_path}:\n{lines}"
        return message


def _port_free(endpoint: rpc.Endpoint) -> bool:
    """True when nothing answers on the port (so a bind failure was not a real clash)."""
    import socket

    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=0.5):
            return False
    except OSError:
        return True


def _start_process(argv: list[str], log_path: Path) -> Process:
    with contextlib.suppress(OSError):  # the open below reports it
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab", buffering=0) as logfile:
        logfile.write(f"[llamactl] {' '.join(argv)}\n".encode())
        popen: subprocess.Popen[bytes] = proc.spawn(argv, stdout=logfile, stderr=subprocess.STDOUT)
    return popen


def _stop_process(process: Process, grace: float) -> None:
    proc.stop_group(
        process.pid, grace=grace, popen=process if isinstance(process, subprocess.Popen) else None
    )


# -- the command -------------------------------------------------------------------------------


def run_worker(spec: WorkerSpec, *, err: IO[str] | None = None) -> int:
    """`llamactl worker`: run until Ctrl-C or SIGTERM; the exit code (128 + signal)."""
    import sys

    from llamactl.serve import records

    out = err or sys.stderr

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    warning = bind_warning(spec.host, spec.allow_remote)
    binary = spec.binary or find_rpc_binary(spec.backend)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise UsageError(f"{binary} is not an executable file")
    if warning:
        say(warning.format(port=spec.port))
    record_id = records.new_id()
    log_dir = paths.ensure_private_dir(paths.logs_dir())
    log_path = log_dir / f"{record_id}-worker.log"
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    record = records.ServeRecord(
        id=record_id,
        pid=os.getpid(),
        pid_started=records.process_start_time(os.getpid()) or time.time(),
        host=spec.host,
        port=spec.port,
        started_at=time.time(),
        backend=spec.backend,
        server_bin=str(binary),
        kind="worker",
    )

    def write_record(status: Status) -> None:
        record.instances = [
            records.InstanceRecord(
                name="worker",
                state=status.state.value,
                pid=status.pid,
                port=spec.port,
                model=f"RPC v{status.version}" if status.version else None,
                restarts=status.restarts,
                started_at=status.started_at,
                log_path=str(log_path),
                last_error=status.last_error,
            )
        ]
        try:
            records.write(record)
        except OSError as exc:  # ps cannot list it; the worker still works
            log.warning("cannot write the state record: %s", exc)

    say(f"starting {binary.name} on {spec.host}:{spec.port} (log: {log_path})")
    runner = WorkerRunner(spec, binary, log_path, stop=stop, on_change=write_record, say=say)
    try:
        runner.run()
    finally:
        records.remove(record_id)
    return 128 + received[0] if received else 0
