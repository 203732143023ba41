"""`llamactl worker`: options to a WorkerSpec, one core call."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llamactl.cli import Command


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="IPv4 address to listen on; any but loopback needs --i-understand-no-auth.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="Port."
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="NAME[,NAME]",
    help="Devices to serve, e.g. CUDA0 (default: every GPU, else the CPU); repeatable.",
)
@click.option("--cache", is_flag=True, help="Keep received tensors in a local file cache.")
@click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads.")
@click.option(
    "--i-understand-no-auth",
    "allow_remote",
    is_flag=True,
    help="Allow a non-loopback --host: the RPC protocol has no authentication.",
)
@click.option("--backend", help="Use this backend's build: cpu, cuda, hip, ...")
@click.option(
    "--rpc-bin",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Use this ggml-rpc-server instead of llamactl's build.",
)
def worker(
    host: str,
    port: int,
    devices: tuple[str, ...],
    cache: bool,
    threads: int | None,
    allow_remote: bool,
    backend: str | None,
    rpc_bin: Path | None,
) -> None:
    """Run a llama.cpp RPC worker (ggml-rpc-server), supervised.

    A head splits one model over its workers: `llamactl serve --rpc HOST:PORT,...`.
    Every host must run the same llamactl version (same llama.cpp commit).
    """
    from llamactl.serve.worker import WorkerSpec, run_worker

    spec = WorkerSpec(
        host=host,
        port=port,
        devices=tuple(d for item in devices for d in item.split(",") if d),
        cache=cache,
        threads=threads,
        allow_remote=allow_remote,
        binary=rpc_bin,
        backend=backend,
    )
    sys.exit(run_worker(spec))
