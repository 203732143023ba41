"""`llamactl serve`: parse a llama-server command line, start and supervise llama-server,
and run the proxy in front of it until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import paths
from llamactl.errors import UsageError

# The command line lives in serve/args.py; these names stay importable from here.
from llamactl.serve.args import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY,
    DEFAULT_PORT,
    OWN_OPTIONS,
    REFUSED_FLAGS,
    TAKEN_FLAGS,
    ServeSpec,
    help_text,
    parse_serve_args,
    parse_size,
)

if TYPE_CHECKING:
    from llamactl.serve.listen import Front
    from llamactl.serve.output import StderrCopy
    from llamactl.serve.server import LocalServer

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY",
    "DEFAULT_PORT",
    "OWN_OPTIONS",
    "REFUSED_FLAGS",
    "TAKEN_FLAGS",
    "ServeSpec",
    "help_text",
    "main",
    "parse_serve_args",
    "parse_size",
    "serve",
]


# -- running ----------------------------------------------------------------------------------


def _layers_offloaded(lines: list[str]) -> str | None:
    # How many layers went to which GPU, from llama-server's load log (serve/loadlog.py).
    from llamactl.serve.loadlog import offload_summary

    return offload_summary(lines)


def _ngl_requested(passthrough: tuple[str, ...]) -> bool:
    return any(a.split("=")[0] in ("-ngl", "--gpu-layers", "--n-gpu-layers") for a in passthrough)


def _say(line: str) -> None:
    """A progress line on stderr (plain: rich is not imported on serve's fast path)."""
    print(f"llamactl: {line}", file=sys.stderr, flush=True)


def resolve_binary(spec: ServeSpec) -> tuple[Path, str | None]:
    """The llama-server to run and its backend: --server-bin, else a build, built if needed."""
    from llamactl.build import cache as builds
    from llamactl.errors import BuildError

    if spec.server_bin is not None:
        binary = spec.server_bin
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise UsageError(f"--server-bin {binary} is not an executable file")
        # Its backend, when one is named (a CUDA binary: models placed per GPU).
        return binary, spec.backend
    try:
        binary = builds.find_server_binary(backend=spec.backend)
    except BuildError:
        from llamactl.build.plan import BuildSpec
        from llamactl.build.progress import LineReporter
        from llamactl.build.run import build_llama

        _say("No llama.cpp build for this machine yet: building it first.")
        # Plain lines: serve's stderr is often a log (systemd, docker), never worth a bar.
        outcome = build_llama(
            BuildSpec(backend=spec.backend or "auto"), report=LineReporter(sys.stderr)
        )
        assert outcome.manifest is not None
        return outcome.manifest.server_binary, outcome.manifest.backend
    backend = next((m.backend for m in builds.find_builds() if m.server_binary == binary), None)
    return binary, backend


def resolve_model_args(spec: ServeSpec) -> tuple[tuple[str, ...], str]:
    """The llama-server flags with the model resolved to a path, and a label for it.

    The model is served under its name as `llamactl models` lists it (--alias NAME, unless the
    user gave one: theirs wins, as in llama-server), not as the path of a file in the cache."""
    if spec.model is not None:
        path = Path(spec.model).expanduser()
        if not path.is_file():  # a name, or a bad path: the models module explains
            from llamactl.models import catalog as models

            path = models.resolve_model(spec.model)
        return ("-m", str(path), *_named(spec.passthrough, path)), path.name
    if spec.has_model_source:
        return spec.passthrough, "from llama-server flags"
    from llamactl.models import default as default_model

    if default_model.default_model_present():
        path = default_model.default_model_path()
    else:
        from llamactl.models import pull

        # Plain lines, like serve's other progress lines: the first fetch is a one-off.
        path = pull.ensure_default_model(progress=pull.LineProgress(sys.stderr))
    return ("-m", str(path), *_named(spec.passthrough, path)), path.name


def _named(passthrough: tuple[str, ...], path: Path) -> tuple[str, ...]:
    """The flags plus `--alias NAME` when the user gave no alias (see resolve_model_args)."""
    if any(a.split("=", 1)[0] in ("-a", "--alias") for a in passthrough):
        return passthrough
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    name = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    return (*passthrough, "--alias", name)


def main(argv: list[str]) -> int:
    """`llamactl serve ARGS` without click (see llamactl.entry): the exit code."""
    import logging

    from llamactl.errors import LlamactlError

    logging.basicConfig(
        # "llamactl:" first: serve's lines stand apart from llama-server's on the same stderr.
        level=logging.WARNING,
        format="llamactl: %(asctime)s %(levelname)s %(message)s",
    )
    try:
        return serve(parse_serve_args(argv))
    except LlamactlError as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def serve(spec: ServeSpec) -> int:
    """Run serve in the foreground until stopped; the process exit code.

    The order is for time to ready: resolve the model and binary, bind the port, spawn
    llama-server, and only then import asyncio, the proxy and rich, while the model loads."""
    from llamactl.serve import listen, output, records, server

    if spec.show_help:
        print(help_text())
        return 0
    config = spec.config or (_default_config() if not spec.has_model_source else None)
    if spec.remotes or (config is not None and _declares_remotes(config)):
        from llamactl.serve import remote

        remotes = remote.remotes_from_args(spec.remotes, dict(os.environ))
        local_models = False
        if config is not None:
            from_file, local_models = remote.remotes_from_toml(config, dict(os.environ))
            remotes += from_file
        # A config file alone counts as a model source (many_models): its [models] decide.
        local = bool(spec.model is not None or spec.models_dir or spec.models_preset) or any(
            a.split("=", 1)[0] in server.MODEL_SOURCE_FLAGS for a in spec.passthrough
        )
        if not local and not local_models:
            from llamactl.serve.front import serve_remote_only

            return serve_remote_only(spec, remotes)
    else:
        remotes = ()
    if spec.many_models or (not spec.has_model_source and _default_config_exists()):
        from llamactl.serve.many import serve_many

        binary, backend = resolve_binary(spec)
        return serve_many(spec, binary, backend, tuple(remotes))
    args, model_label = resolve_model_args(spec)
    binary, backend = resolve_binary(spec)
    workers: tuple[Any, ...] = ()
    if any(a == "--rpc" or a.startswith("--rpc=") for a in args):
        from llamactl.serve import rpc

        # llama-server aborts at start when a worker is missing, and the workers may be
        # starting at this moment: wait for their hello first (bounded), and name the missing.
        workers = rpc.rpc_endpoints_in(args)
        rpc.wait_for_workers(workers, deadline_s=min(spec.start_timeout, 60.0), say=_say)
    # A bad certificate or a taken port fails before any model loads.
    front = listen.open_spec_front(spec)
    record_id = records.new_id()
    log_dir = paths.logs_dir()
    log_problem = None
    try:
        paths.ensure_private_dir(log_dir)
    except OSError as exc:
        log_problem = f"cannot create the log directory {log_dir}: {exc.strerror or exc}"
    log_path = log_dir / f"{record_id}-default.log"
    echo = None
    if spec.log_to_stderr:
        args = (*args, *output.color_flags(args, os.environ, sys.stderr.isatty()))
        echo = output.StderrCopy(note_path=str(log_path))
    process = server.LocalServer(
        server.private_spec(binary, args, log_path), echo=echo.write if echo else None
    )
    process.spawn()
    from llamactl.serve import express

    express.prebuild()  # the proxy's express lane, built (first time) while the model loads
    try:
        exposed = listen.exposed(spec.host)
        if exposed and not spec.api_keys:
            _say(
                f"warning: listening on {', '.join(exposed)} without --api-key: anyone who "
                "can reach this address can use the model"
            )
        if log_problem:
            _say(f"warning: {log_problem}; llama-server's output is kept in memory only")
        if backend == "cpu" and _ngl_requested(spec.passthrough):
            _say("note: this llama.cpp build is CPU-only: -ngl has no effect")
        _say(f"loading {model_label} with {binary} ...")
        started = _Started(
            record_id, front, process, backend, model_label, binary, echo, workers, tuple(remotes)
        )
        return _run(_serve_async(spec, started))
    except KeyboardInterrupt:
        return 130
    finally:
        front.close()  # removes a Unix socket's file
        # The loop never adopted it, or failed to stop it (asked of the kernel: the loop that
        # would have heard of its exit is gone).
        if process.popen is not None and process.popen.poll() is None:
            from llamactl import proc

            proc.stop_group(process.popen.pid, grace=5.0, popen=process.popen)
        if echo is not None:
            echo.close()  # llama-server's last lines (its shutdown) reach stderr


def _default_config() -> Path | None:
    """The config directory's serve.toml, when there is one (as serve/many.py reads it)."""
    path = paths.config_dir() / "serve.toml"
    return path if path.is_file() else None


def _alias_in(args: tuple[str, ...]) -> str | None:
    """The model name llama-server answers under (its -a / --alias)."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in ("-a", "--alias"):
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _declares_remotes(config: Path) -> bool:
    """Whether a TOML file has a [remotes.NAME] table (a cheap look before parsing it)."""
    try:
        return "[remotes." in config.read_text()
    except OSError:
        return False


def _default_config_exists() -> bool:
    """Whether the config directory holds a serve.toml (then serve routes its models)."""
    return (paths.config_dir() / "serve.toml").is_file()


@dataclass
class _Started:
    """What serve prepared before the event loop: the ids, the bound sockets, llama-server."""

    record_id: str
    front: Front  # the bound sockets, TLS, the addresses
    process: LocalServer
    backend: str | None
    model_label: str
    binary: Path
    echo: StderrCopy | None = None
    rpc_workers: tuple[Any, ...] = ()  # the --rpc workers its llama-server splits the model over
    remotes: tuple[Any, ...] = ()  # remote replicas beside the local model (serve/front.py)


def _run(coro: Any) -> int:
    from llamactl.serve.runner import run

    return int(run(coro))


async def _serve_async(spec: ServeSpec, started: _Started) -> int:
    import asyncio

    from llamactl.serve import records
    from llamactl.serve.many import model_path_in, where_label
    from llamactl.serve.proxy import Proxy, proxy_config
    from llamactl.serve.runner import stop_on_signals
    from llamactl.serve.supervisor import InstanceConfig, Policy, Supervisor

    stop, received = stop_on_signals()

    process = started.process
    record = records.serve_record(
        started.record_id,
        spec,
        started.front,
        backend=started.backend,
        server_bin=str(started.binary),
    )

    def write_record(sup: Supervisor) -> None:
        record.instances = []
        for inst in sup.instances.values():
            # A llama-server that has exited (a failed instance's last try) has no pid: ps
            # would show a dead one, or another program that got the pid since.
            alive = inst.process if inst.process and inst.process.returncode is None else None
            record.instances.append(
                records.InstanceRecord(
                    name=inst.name,
                    state=inst.state.value,
                    pid=alive.pid if alive else None,
                    port=inst.upstream.port if inst.upstream else None,
                    model=inst.config.model_label,
                    restarts=inst.restarts,
                    started_at=time.time() - (time.monotonic() - alive.started_at)
                    if alive
                    else None,
                    log_path=str(inst.config.log_path),
                    last_error=(inst.last_error or "").splitlines()[0] if inst.last_error else None,
                    where=where_label(inst.config.rpc_workers),
                    model_path=model_path_in(inst.config.args),
                )
            )
        if pool is not None:
            record.instances += records.replica_records(pool.replicas)
        records.write(record)

    policy = Policy(queue_timeout=spec.queue_timeout, stall_timeout=spec.start_timeout)
    supervisor = Supervisor(policy, on_change=write_record)
    provider: Any = supervisor
    pool: Any = None
    mixed: Any = None
    if started.remotes:
        from llamactl.serve.front import Mixed
        from llamactl.serve.remote import PoolPolicy, RemotePool

        pool = RemotePool(
            started.remotes,
            PoolPolicy(queue_timeout=spec.queue_timeout),
            on_change=lambda _pool: write_record(supervisor),
        )
        mixed = provider = Mixed(supervisor, pool, _alias_in(process.spec.args))

    proxy = Proxy(proxy_config(spec), provider)
    inst = supervisor.add(
        InstanceConfig(
            name="default",
            binary=started.binary,
            args=process.spec.args,
            log_path=process.spec.log_path,
            model_label=started.model_label,
            echo=started.echo.write if started.echo is not None else None,
            rpc_workers=started.rpc_workers,
        ),
        process=process,
    )
    start = asyncio.ensure_future(supervisor.start(inst.name))
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await proxy.start(started.front.sockets, ssl=started.front.tls)
        await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            return _signal_exit(received)
        start.result()  # raises ServerStartError with the diagnosis
        if mixed is not None:
            await pool.start()
            await mixed.read_local_slots()
        detail = [started.model_label, f"backend {started.backend or 'unknown'}"]
        if inst.process is not None:
            layers = _layers_offloaded(inst.process.tail(400))
            if layers:
                detail.append(layers)
        elapsed = time.monotonic() - process.started_at
        _say(f"ready in {elapsed:.2f} s: " + ", ".join(detail))
        # stdout, flushed: scripts wait for this line.
        print(started.front.listening_line(), flush=True)
        await waiter
        return _signal_exit(received)
    finally:
        waiter.cancel()
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        await proxy.close()
        if pool is not None:
            await pool.close()
        await supervisor.close()
        records.remove(record.id)


def _signal_exit(received: list[int]) -> int:
    # 128 + signal number, as shells report it (130 for Ctrl-C, 143 for SIGTERM).
    return 128 + received[0] if received else 0
