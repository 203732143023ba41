"""The one way llamactl runs programs: argument lists, explicit environment, own session,
output captured or sent to a file, the command logged; and the one way it stops them."""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Completed:
    """What a finished (or missing, or timed-out) program left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    missing: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.missing and not self.timed_out


def run(
    argv: Sequence[str],
    *,
    timeout: float = 10.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Completed:
    """Run a program to completion and capture its output; a missing program or a timeout is
    a result, never an exception (probes rely on that)."""
    args = tuple(str(a) for a in argv)
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        return Completed(args, 127, "", f"{args[0]}: not found", missing=True)
    except PermissionError as exc:
        return Completed(args, 126, "", str(exc), missing=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return Completed(args, -1, out, f"timed out after {timeout:g} s", timed_out=True)
    return Completed(args, proc.returncode, proc.stdout, proc.stderr)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Linux only: the kernel sends SIGKILL to the child when the thread that forked it exits,
    # so even a SIGKILL of llamactl leaves no llama-server behind.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort; the supervisor still stops children
        pass


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a long-running program in its own session (its own process group), so that it
    can be stopped as a group and a Ctrl-C in the terminal reaches llamactl only.

    Call it from the main thread: the parent-death signal fires when the spawning *thread*
    exits, not the process."""
    args = [str(a) for a in argv]
    log.info("spawn: %s", shlex.join(args))
    preexec = _die_with_parent if (die_with_parent and sys.platform == "linux") else None
    return subprocess.Popen(
        args,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=preexec,  # only prctl runs between fork and exec
    )


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_group(
    pid: int,
    *,
    grace: float = 5.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> int | None:
    """Stop a process and its group: SIGTERM, wait up to `grace` seconds, then SIGKILL.
    A process already gone is success. Returns the exit code when it is known."""

    def _signal(sig: int) -> bool:
        try:
            os.killpg(pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            try:
                os.kill(pid, sig)
                return True
            except ProcessLookupError:
                return False

    def _gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not pid_alive(pid)

    if _gone():
        return popen.returncode if popen is not None else None
    _signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _gone():
            break
        time.sleep(0.02)
    else:
        _signal(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not _gone():
            time.sleep(0.02)
    if popen is not None:
        try:
            return popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None
    return None
