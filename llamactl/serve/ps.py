"""What `ps` shows and how `stop` stops a serve: pure formatting, psutil reads, and a loading
instance's progress read from /proc (load_progress, loaded_bytes)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from llamactl.proc import pid_alive
from llamactl.serve import records


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _rss(pids: list[int]) -> int | None:
    import psutil

    total, seen = 0, False
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
            seen = True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total if seen else None


#: Shown while loading at most: the file can be read whole before llama-server is ready.
LOADING_CAP = 0.99
_SPLIT = re.compile(r"^(?P<prefix>.+)-\d{5}-of-(?P<count>\d{5})\.gguf$")


def load_progress(state: str, loaded: int | None, total: int | None) -> float | None:
    """How far a load is, 0..1: the share of the model file its llama-server has read or
    mapped in, at most LOADING_CAP until it is ready; 1 once ready; None when not known or not
    loading. llama-server prints no progress at its default verbosity, so this is measured
    from outside (loaded_bytes)."""
    if state == "ready":
        return 1.0
    if state != "starting" or loaded is None or not total:
        return None
    return max(0.0, min(LOADING_CAP, loaded / total))


def model_files(path: str) -> list[str]:
    """The files of a model: the one given, or every part of a split GGUF (-00001-of-00003)."""
    m = _SPLIT.match(os.path.basename(path))
    if m is None:
        return [path]
    folder = os.path.dirname(path)
    count = int(m["count"])
    return [
        os.path.join(folder, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf")
        for i in range(1, count + 1)
    ]


def loaded_bytes(pid: int, files: list[str], proc_root: str = "/proc") -> int | None:
    """Bytes of the model a loading llama-server has taken in: with mmap (the default) the
    model file's resident pages in its mappings (/proc/PID/smaps; its rchar stays at the
    header), without mmap (--load-mode none or dio) what it has read (rchar of
    /proc/PID/io; then nothing is mapped). The larger of the two; None when /proc says
    nothing."""
    real = {os.path.realpath(f) for f in files}
    mapped = read = None
    try:
        with open(f"{proc_root}/{pid}/smaps") as fh:
            mapped, current = 0, False
            for line in fh:
                head = line.split(None, 5)
                if head and "-" in head[0] and not head[0].endswith(":"):
                    current = len(head) == 6 and head[5].strip() in real
                elif current and line.startswith("Rss:"):
                    mapped += int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        mapped = None
    try:
        with open(f"{proc_root}/{pid}/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    read = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        read = None
    if mapped is None and read is None:
        return None
    return max(mapped or 0, read or 0)


def _progress(inst: records.InstanceRecord) -> float | None:
    if inst.state != "starting":
        return load_progress(inst.state, None, None)
    if inst.pid is None or inst.model_path is None:
        return None
    files = model_files(inst.model_path)
    try:
        total = sum(Path(f).stat().st_size for f in files)
    except OSError:
        return None
    return load_progress(inst.state, loaded_bytes(inst.pid, files), total)


def progress_label(progress: float | None, state: str, elapsed: float) -> str:
    """What ps shows of a load: `37% 12s` while loading, `100%` once ready, else `-`."""
    if progress is None:
        return f"? {human_duration(elapsed)}" if state == "starting" else "-"
    if state == "starting":
        return f"{progress:.0%} {human_duration(elapsed)}"
    return f"{progress:.0%}"


def rows(now: float | None = None) -> list[dict[str, Any]]:
    """One row per running serve instance (a serve with no instance yet gets one row)."""
    now = time.time() if now is None else now
    out: list[dict[str, Any]] = []
    for rec in records.live_records(kind=None):
        instances = rec.instances or [records.InstanceRecord(name="-", state="starting")]
        for inst in instances:
            pids = [rec.pid] + ([inst.pid] if inst.pid else [])
            memory = _rss(pids)
            uptime = now - (inst.started_at or rec.started_at)
            progress = _progress(inst)
            out.append(
                {
                    "id": rec.id,
                    "kind": rec.kind,
                    "pid": rec.pid,
                    "server_pid": inst.pid,
                    "instance": inst.name,
                    "model": inst.model,
                    "where": inst.where,
                    "url": rec.url,
                    "state": inst.state,
                    "uptime_s": round(uptime, 1),
                    "uptime_human": human_duration(uptime),
                    "restarts": inst.restarts,
                    "memory_bytes": memory,
                    "memory_human": human_bytes(memory),
                    # Several models: the estimate from the GGUF header, and requests in flight.
                    "memory_estimate_bytes": inst.memory,
                    "in_flight": inst.in_flight,
                    # The GPU llamactl placed it on (nvidia-smi's index; llama-server's CUDAn).
                    "gpu": inst.gpu,
                    # A load's progress, 0..1 (see load_progress), and its label with seconds.
                    "load_progress": progress,
                    "load_human": progress_label(progress, inst.state, uptime),
                    "backend": rec.backend,
                    "log": inst.log_path,
                    "last_error": inst.last_error,
                }
            )
    return out


def stop_serve(rec: records.ServeRecord, timeout: float = 10.0) -> None:
    """SIGTERM the serve (it stops its llama-servers), wait, then SIGKILL it and them."""
    try:
        os.kill(rec.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(rec.pid):
        time.sleep(0.05)
    if pid_alive(rec.pid):
        for pid in [rec.pid] + [i.pid for i in rec.instances if i.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    records.remove(rec.id)
