"""State records of running `llamactl serve` processes, read by ps / stop / logs / chat.

One JSON file per serve in paths.run_dir(), written atomically, readable by its owner only.
A record whose process is gone (or whose pid was reused by another program) is stale: it is
ignored and removed when read.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamactl import paths


@dataclass
class InstanceRecord:
    """One supervised llama-server as `ps` shows it."""

    name: str
    state: str
    pid: int | None = None
    port: int | None = None
    model: str | None = None
    restarts: int = 0
    started_at: float | None = None
    log_path: str | None = None
    last_error: str | None = None
    #: Where the model runs: "local", "rpc HOST:PORT,..." (split over RPC workers), ...
    where: str | None = None
    memory: int | None = None  # estimated bytes (several models: from the GGUF header)
    in_flight: int = 0
    gpu: int | None = None  # the GPU llamactl placed it on (nvidia-smi's index, CUDAn)
    #: The model file its llama-server loads: ps measures a load's progress against it.
    model_path: str | None = None


@dataclass
class ServeRecord:
    """One running `llamactl serve`."""

    id: str
    pid: int
    pid_started: float  # the process's create_time: tells a live record from a reused pid
    host: str
    port: int
    started_at: float
    backend: str | None = None
    server_bin: str | None = None
    auth: bool = False
    instances: list[InstanceRecord] = field(default_factory=list)
    #: Every address it listens on (several --host addresses, a Unix socket, https).
    urls: list[str] = field(default_factory=list)
    #: "serve", or "worker" (`llamactl worker`: a ggml-rpc-server, no HTTP).
    kind: str = "serve"

    @property
    def url(self) -> str:
        """Where a client on this machine reaches it: the first TCP address, else the first;
        a worker's is what a head's --rpc takes (the RPC protocol is no HTTP)."""
        if self.kind == "worker":
            return f"{self.host}:{self.port}"
        tcp = [u for u in self.urls if not u.startswith("unix://")]
        if tcp or self.urls:
            url = (tcp or self.urls)[0]
            for wildcard in ("://0.0.0.0:", "://[::]:"):
                url = url.replace(wildcard, "://127.0.0.1:")
            return url
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["url"] = self.url
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeRecord:
        known = InstanceRecord.__dataclass_fields__
        insts = [
            InstanceRecord(**{k: v for k, v in i.items() if k in known})
            for i in data.get("instances", [])
        ]
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "instances"}
        return cls(**fields, instances=insts)


def serve_record(
    record_id: str,
    spec: Any,
    front: Any,
    *,
    backend: str | None = None,
    server_bin: str | None = None,
) -> ServeRecord:
    """The record of this serve process: `spec` is its ServeSpec (host, api_keys), `front`
    where it listens (listen.Front: port, urls)."""
    me = os.getpid()
    return ServeRecord(
        id=record_id,
        pid=me,
        pid_started=process_start_time(me) or time.time(),
        host=spec.host,
        port=front.port,
        started_at=time.time(),
        urls=front.urls,
        backend=backend,
        server_bin=server_bin,
        auth=bool(spec.api_keys),
    )


def replica_records(replicas: Any) -> list[InstanceRecord]:
    """One row per remote replica (serve/remote.py's Replica) for ps."""
    return [
        InstanceRecord(
            name=r.name,
            state=r.state,
            model=", ".join(r.models) or None,
            last_error=r.last_error,
            where=r.address.base,
        )
        for r in replicas
    ]


def new_id() -> str:
    return os.urandom(4).hex()  # what secrets.token_hex does, without its ~8 ms import


def process_start_time(pid: int) -> float | None:
    """When a process started (seconds since the epoch), to tell it from a later process with
    the same pid; None when there is no such process."""
    try:  # Linux: what psutil computes, without its ~15 ms import on serve's start-up path
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, ValueError, IndexError):
        pass
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _boot_time() -> float:
    with open("/proc/stat", "rb") as fh:
        for line in fh:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def _path(record_id: str) -> Path:
    return paths.run_dir() / f"{record_id}.json"


def write(record: ServeRecord) -> Path:
    """Write (or replace) a record atomically, mode 0600."""
    directory = paths.ensure_private_dir(paths.run_dir())
    path = _path(record.id)
    tmp = directory / f".{record.id}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record.to_json(), fh, indent=2)
    os.replace(tmp, path)
    return path


def remove(record_id: str) -> None:
    _path(record_id).unlink(missing_ok=True)


def _is_live(record: ServeRecord) -> bool:
    started = process_start_time(record.pid)
    # create_time is rounded differently by different readers: allow a little slack.
    return started is not None and abs(started - record.pid_started) < 2.0


def live_records(*, clean: bool = True, kind: str | None = "serve") -> list[ServeRecord]:
    """Records of serves (or of `kind`; None: of every kind) that are still running, newest
    first; stale ones are removed."""
    directory = paths.run_dir()
    if not directory.is_dir():
        return []
    found: list[ServeRecord] = []
    for path in directory.glob("*.json"):
        try:
            record = ServeRecord.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            if clean:
                path.unlink(missing_ok=True)
            continue
        if _is_live(record):
            if kind is None or record.kind == kind:
                found.append(record)
        elif clean:
            path.unlink(missing_ok=True)
    found.sort(key=lambda r: r.started_at, reverse=True)
    return found


def find(prefix: str, kind: str | None = None) -> ServeRecord | None:
    """The live record whose id starts with prefix (or whose port equals it)."""
    for record in live_records(kind=kind):
        if record.id.startswith(prefix) or str(record.port) == prefix:
            return record
    return None


def now() -> float:
    return time.time()
