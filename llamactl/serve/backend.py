"""The `Backend` protocol: what the supervisor needs from one upstream it runs. A local
llama-server (serve/server.py `LocalServer`) is the first implementation; a remote server or
an RPC-backed instance are peers behind the same methods, so the supervisor treats them alike
and its tests run on a fake one (tests/support/fakebackend.py) with a fake clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llamactl.errors import ServerStartError
    from llamactl.serve.rpc import Endpoint

__all__ = ["Backend", "BackendFactory", "Clock", "InstanceConfig", "Sleep", "Vitals"]

#: The supervisor's time seams: a monotonic clock in seconds, and an awaitable pause.
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Vitals:
    """What the system says of a backend's process at one moment: signs of life that /health
    cannot give (for a local llama-server, read from /proc: server.read_vitals)."""

    cpu_ticks: int  # user + system time of all its threads, in clock ticks
    stopped: bool  # SIGSTOP (state T) or a tracer's stop (t): it cannot answer anything
    active: bool  # a thread runnable (R: waiting for a CPU) or in disk sleep (D: waiting for I/O)


@dataclass
class InstanceConfig:
    """What one instance runs: llama-server and its flags; the port is chosen per start."""

    name: str
    binary: Path
    args: tuple[str, ...]
    log_path: Path
    model_label: str | None = None
    #: With several models (serve/fleet.py): the model this instance serves, and what the
    #: router needs to know of it.
    model: str | None = None
    pinned: bool = False
    groups: tuple[str, ...] = ()
    estimate_bytes: int = 0
    #: Where llama-server's output goes besides its log file (serve's stderr: output.py).
    echo: Callable[[bytes], None] | None = None
    #: The RPC workers its llama-server splits the model over (its --rpc flag): a head whose
    #: worker is gone aborts, and cannot start again until the worker is back (RESOURCES.md).
    rpc_workers: tuple[Endpoint, ...] = ()
    #: Added to its llama-server's environment: a preset's LLAMA_ARG_ keys, the GPU order.
    env: Mapping[str, str] = field(default_factory=dict)
    #: The GPU llamactl placed it on (its --device CUDAn); None: not placed by llamactl.
    gpu: int | None = None


class Backend(Protocol):
    """One upstream the supervisor starts, watches and stops."""

    @property
    def host(self) -> str:
        """Where the upstream listens (loopback for a local server)."""
        ...

    @property
    def port(self) -> int: ...

    @property
    def api_key(self) -> str | None:
        """The private key the proxy sends as `Authorization: Bearer KEY`; None: no key."""
        ...

    @property
    def pid(self) -> int | None:
        """The local process id, for ps; None when there is none (remote, not started)."""
        ...

    @property
    def returncode(self) -> int | None:
        """The exit code once it has ended (negative: killed by that signal); None while it
        runs or before it starts."""
        ...

    @property
    def attached(self) -> bool:
        """Whether `start` has been called (a backend is started once; a restart makes a new
        one)."""
        ...

    @property
    def started_at(self) -> float:
        """Clock time of the spawn."""
        ...

    @property
    def last_line_at(self) -> float:
        """Clock time of the last sign of progress (a log line): busy is not hung."""
        ...

    @property
    def log_path(self) -> str:
        """Where its output is kept, for messages and ps."""
        ...

    def start(self) -> None:
        """Spawn (or connect) and begin following its output; returns at once."""
        ...

    async def wait_ready(self, *, stall_timeout: float, max_timeout: float) -> float:
        """Until it answers /health with 200; ServerStartError with the diagnosis when it
        exits, makes no progress for `stall_timeout` or is not ready in `max_timeout`."""
        ...

    async def wait_exit(self) -> int | None:
        """Until it has ended; its exit code."""
        ...

    async def health(self, timeout: float = 3.0) -> int | None:
        """GET /health: the status, or None when nothing answers."""
        ...

    async def probe(self, auth: bytes | None) -> bool:
        """One tiny real request (a one-token generation): does it still serve?"""
        ...

    async def stop(self, grace: float = 5.0) -> int | None:
        """Stop it for sure (SIGTERM, `grace`, SIGKILL); gone already is success."""
        ...

    def vitals(self) -> Vitals | None:
        """Its process's signs of life now; None when nothing can tell (a remote server, no
        /proc, gone): then only the slow hang rule applies."""
        ...

    def kill_now(self) -> None:
        """Stop it at once, no grace (a hung server)."""
        ...

    def tail(self, n: int = 20) -> list[str]:
        """Its last output lines."""
        ...

    def port_clash(self) -> bool:
        """Whether it ended because its port was taken (retried at once elsewhere)."""
        ...

    def describe_exit(self, code: int) -> str:
        """How it ended, for people: 'code 1', 'killed by SIGBUS: what that means'."""
        ...

    def start_error(self, what: str) -> ServerStartError:
        """A ServerStartError for `what`, with the diagnosis and the relevant log lines."""
        ...


#: Makes a fresh, unstarted backend for an instance (a new private port and key per call).
BackendFactory = Callable[[InstanceConfig], Backend]
