"""`llamactl serve --remote URL ...` (or a config of `[remotes.NAME]` tables) with no local
model: llamactl's proxy in front of remote replicas only (serve/remote.py's RemotePool),
until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from llamactl.serve.remote import PoolPolicy, RemotePool, RemoteSpec

log = logging.getLogger(__name__)


def serve_remote_only(spec: Any, remotes: Sequence[RemoteSpec]) -> int:
    """`llamactl serve --remote URL ...` with no local model: the proxy in front of the remotes
    only, until Ctrl-C or SIGTERM; the exit code."""
    from llamactl.serve import listen
    from llamactl.serve.runner import run

    sockets = listen.bind(spec.host, spec.port)
    try:
        return int(run(_serve_remote_async(spec, remotes, sockets)))
    except KeyboardInterrupt:
        return 130
    finally:
        for sock in sockets:
            sock.close()


async def _serve_remote_async(spec: Any, remotes: Sequence[RemoteSpec], sockets: list[Any]) -> int:
    import signal
    import sys

    from llamactl.errors import ServerStartError
    from llamactl.serve import records
    from llamactl.serve.proxy import Proxy, ProxyConfig

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    port = int(sockets[0].getsockname()[1])
    record = records.ServeRecord(
        id=records.new_id(),
        pid=os.getpid(),
        pid_started=records.process_start_time(os.getpid()) or time.time(),
        host=spec.host,
        port=port,
        started_at=time.time(),
        auth=bool(spec.api_keys),
    )

    def write_record(pool: RemotePool) -> None:
        record.instances = [
            records.InstanceRecord(
                name=r.name,
                state=r.state,
                model=", ".join(r.models) or None,
                last_error=r.last_error,
                where=r.address.base,
            )
            for r in pool.replicas
        ]
        try:
            records.write(record)
        except OSError as exc:
            log.warning("cannot write the state record: %s", exc)

    pool = RemotePool(
        remotes,
        PoolPolicy(queue_timeout=spec.queue_timeout),
        on_change=write_record,
    )
    from llamactl.serve import listen

    proxy = Proxy(
        ProxyConfig(
            host=spec.host,
            port=spec.port,
            api_key=",".join(spec.api_keys) or None,
            max_body_bytes=spec.max_body_bytes,
            host_names=listen.guarded_names(spec.host, spec.allowed_hosts),
            max_connections=spec.max_connections or listen.connection_bound(),
        ),
        pool,
    )
    write_record(pool)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await proxy.start(sockets)
        starting = asyncio.ensure_future(pool.start(wait=spec.start_timeout))
        await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 128 + received[0] if received else 0
        if not pool.is_ready():
            raise ServerStartError(
                f"no remote server answered /health within {spec.start_timeout:g} s:\n"
                + "\n".join(f"  {r.address.base}: {r.last_error or r.state}" for r in pool.replicas)
            )
        ready = [r.address.base for r in pool.replicas if r.healthy]
        print(
            f"ready: {len(ready)} of {len(pool.replicas)} remote servers answer "
            f"({', '.join(ready)}); no local model",
            file=sys.stderr,
            flush=True,
        )
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        print(f"listening at http://{host}:{port}", flush=True)
        await waiter
        return 128 + received[0] if received else 0
    finally:
        waiter.cancel()
        await proxy.close()
        await pool.close()
        records.remove(record.id)
