"""What `ps` shows and how `stop` stops a serve: pure formatting plus psutil reads."""

from __future__ import annotations

import os
import signal
import time
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
