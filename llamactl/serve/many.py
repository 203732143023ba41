"""`llamactl serve` with several models (router mode's flags, several -m, a TOML config): no
llama-server is spawned up front; the proxy listens at once and the fleet (serve/fleet.py)
loads each model when it is first asked for."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import paths

if TYPE_CHECKING:
    from llamactl.serve.args import ServeSpec
    from llamactl.serve.config import Fleet
    from llamactl.serve.listen import Front
    from llamactl.serve.output import StderrCopy
    from llamactl.serve.supervisor import Supervisor

#: The TOML file read when --config is not given (and it exists).
DEFAULT_CONFIG_NAME = "serve.toml"


def default_config() -> Path | None:
    """The config directory's serve.toml, when there is one."""
    path = paths.config_dir() / DEFAULT_CONFIG_NAME
    return path if path.is_file() else None


def declare_fleet(spec: ServeSpec) -> Fleet:
    """Every model of this serve, from its flags and files; ConfigError when one is wrong."""
    from llamactl.serve.config import declare

    return declare(
        model_args=spec.models,
        models_dir=spec.models_dir,
        models_preset=spec.models_preset,
        config=spec.config or (default_config() if not spec.models else None),
        models_max=spec.models_max,
        autoload=spec.models_autoload,
        common_args=spec.passthrough,
    )


def _say(line: str) -> None:
    print(f"llamactl: {line}", file=sys.stderr, flush=True)


def serve_many(
    spec: ServeSpec, binary: Path, backend: str | None, remotes: tuple[Any, ...] = ()
) -> int:
    """Run a serve with several models in the foreground until stopped; its exit code."""
    from llamactl.serve import listen, output, records
    from llamactl.serve.runner import run

    fleet = declare_fleet(spec)
    front = listen.open_spec_front(spec)
    from llamactl.serve import express

    express.prebuild()  # the proxy's express lane (a first build) while the rest starts
    echo = None
    try:
        record_id = records.new_id()
        log_dir = paths.logs_dir()
        try:
            paths.ensure_private_dir(log_dir)
        except OSError as exc:
            _say(f"warning: cannot create the log directory {log_dir}: {exc.strerror or exc}")
        exposed = listen.exposed(spec.host)
        if exposed and not spec.api_keys:
            _say(
                f"warning: listening on {', '.join(exposed)} without --api-key: anyone who "
                "can reach this address can use the models"
            )
        names = ", ".join(d.name for d in fleet.models)
        _say(f"serving {len(fleet.models)} models with {binary}: {names}")
        if spec.log_to_stderr:
            echo = output.StderrCopy(note_path=str(log_dir))
        return int(run(_serve_async(spec, fleet, front, echo, record_id, binary, backend, remotes)))
    except KeyboardInterrupt:
        return 130
    finally:
        front.close()  # removes a Unix socket's file
        if echo is not None:
            echo.close()


def instance_records(sup: Supervisor) -> list[Any]:
    """The instances as `ps` shows them."""
    from llamactl.serve import records

    out = []
    for inst in sup.instances.values():
        # A llama-server that has exited has no pid: ps would show a dead one, or another
        # program that got the pid since.
        alive = inst.backend if inst.backend and inst.backend.returncode is None else None
        out.append(
            records.InstanceRecord(
                name=inst.name,
                state=inst.state.value,
                pid=alive.pid if alive else None,
                port=inst.upstream.port if inst.upstream else None,
                model=inst.config.model_label,
                restarts=inst.restarts,
                started_at=time.time() - (time.monotonic() - alive.started_at) if alive else None,
                log_path=str(inst.config.log_path),
                last_error=(inst.last_error or "").splitlines()[0] if inst.last_error else None,
                memory=inst.config.estimate_bytes or None,
                in_flight=inst.in_flight,
                where=where_label(inst.config.rpc_workers),
                gpu=inst.config.gpu,
                model_path=model_path_in(inst.config.args),
            )
        )
    return out


def model_path_in(args: tuple[str, ...]) -> str | None:
    """The model file an instance's llama-server loads (its -m), for ps's load progress."""
    from llamactl.models.estimate import flag_value

    return flag_value(args, "-m", "--model")


def where_label(workers: tuple[Any, ...]) -> str:
    """Where an instance's model runs, as ps shows it."""
    return "rpc " + ",".join(str(w) for w in workers) if workers else "local"


async def _serve_async(
    spec: ServeSpec,
    fleet: Fleet,
    front: Front,
    echo: StderrCopy | None,
    record_id: str,
    binary: Path,
    backend: str | None,
    remotes: tuple[Any, ...] = (),
) -> int:

    from llamactl.build.cache import build_info
    from llamactl.serve import records
    from llamactl.serve.fleet import ModelFleet
    from llamactl.serve.http import cors_of
    from llamactl.serve.placement import FreeMemory
    from llamactl.serve.proxy import Proxy, proxy_config
    from llamactl.serve.supervisor import Policy, Supervisor

    # Why each model was loaded, where, and why each was evicted: said at INFO, shown.
    logging.getLogger("llamactl.serve.fleet").setLevel(logging.INFO)
    from llamactl.serve.runner import stop_on_signals

    stop, received = stop_on_signals()

    record = records.serve_record(record_id, spec, front, backend=backend, server_bin=str(binary))
    models: ModelFleet | None = None
    pool: Any = None

    def on_change(sup: Supervisor) -> None:
        if models is not None:
            models.changed()
        record.instances = instance_records(sup)
        if pool is not None:  # remote replicas beside the local models (serve/front.py)
            record.instances += records.replica_records(pool.replicas)
        records.write(record)

    policy = Policy(queue_timeout=spec.queue_timeout, stall_timeout=spec.start_timeout)
    supervisor = Supervisor(policy, on_change=on_change)
    # A CUDA build decides by free VRAM per GPU and places each model on one; a CPU build
    # decides by free RAM (serve/placement.py).
    free = FreeMemory(gpu=backend in ("cuda",))
    models = ModelFleet(
        fleet,
        supervisor,
        binary=binary,
        log_dir=paths.logs_dir(),
        record_id=record_id,
        echo=echo.write if echo is not None else None,
        worker_wait=min(spec.start_timeout, 60.0),
        memory=free,
        gpus=free.gpus,
        # Router mode's test hook (tools/server/server-models.cpp): with it set, each request
        # holds its model busy 2 s and each load waits 2 s, which its scheduler tests need.
        hold=2.0 if os.environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING") else 0.0,
        build_info=functools.cache(functools.partial(build_info, binary)),
        redeclare=lambda: declare_fleet(spec),
        cors=cors_of(fleet.common_args, os.environ),
        # A CPU build shares the cores out among the models that may run at once.
        cpus=len(os.sched_getaffinity(0)) if backend in ("cpu", None) else 0,
    )
    provider: Any = models
    if remotes:
        from llamactl.serve.front import MixedFleet
        from llamactl.serve.remote import PoolPolicy, RemotePool

        pool = RemotePool(
            remotes,
            PoolPolicy(queue_timeout=spec.queue_timeout),
            on_change=lambda _pool: on_change(supervisor),
        )
        provider = MixedFleet(models, pool)
    proxy = Proxy(proxy_config(spec), provider)
    try:
        await models.start()
        if pool is not None:
            await pool.start()
        await proxy.start(front.sockets, ssl=front.tls)
        records.write(record)
        # stdout, flushed: scripts wait for this line.
        print(front.listening_line(), flush=True)
        await stop.wait()
        return 128 + received[0] if received else 0
    finally:
        await proxy.close()
        if pool is not None:
            await pool.close()
        await models.close()
        await supervisor.close()
        records.remove(record.id)
