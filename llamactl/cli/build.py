"""`llamactl build` and `llamactl which`: options to a BuildSpec, one core call, rendering."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llamactl.build.plan import BACKEND_CHOICES, BuildSpec, parse_list
from llamactl.build.toolchain import CUDA_TOOLKIT_CHOICES
from llamactl.cli import Command
from llamactl.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from llamactl.build.cache import Manifest
    from llamactl.build.run import BuildOutcome


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    help="GPU backend; auto picks the best one detected (see `llamactl doctor`).",
)
@click.option(
    "--cuda-arch",
    "cuda_arch",
    metavar="LIST",
    help="CUDA architectures, e.g. 86,89 or 8.6 (default: those of the detected GPUs).",
)
@click.option(
    "--cuda-toolkit",
    type=click.Choice(CUDA_TOOLKIT_CHOICES),
    default="auto",
    show_default=True,
    help="CUDA toolkit: the system's, NVIDIA's PyPI wheels (installed into llamactl's cache), "
    "or auto: the system's when complete (nvcc and cuBLAS), else the wheels.",
)
@click.option(
    "--gpu-targets",
    metavar="LIST",
    help="HIP GPU targets, e.g. gfx942,gfx1100 (or MUSA architectures); default: detected.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    help="Parallel compile jobs (default: from cores and available memory).",
)
@click.option(
    "--ui/--no-ui",
    default=None,
    help="Build the web UI from tools/ui with npm (default: on when npm is installed).",
)
@click.option("--rpc/--no-rpc", default=True, show_default=True, help="RPC backend and server.")
@click.option(
    "--native/--portable",
    default=True,
    show_default=True,
    help="CPU code for this machine only, or for any CPU of its architecture.",
)
@click.option("--clean", is_flag=True, help="Delete this configuration's build directory first.")
@click.option(
    "--dry-run", is_flag=True, help="Print the exact cmake commands; change and fetch nothing."
)
@click.option("--list", "list_builds", is_flag=True, help="List the cached builds and exit.")
@click.option(
    "--source",
    "source_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LLAMACTL_SOURCE",
    help="Build another llama.cpp checkout (env LLAMACTL_SOURCE).",
)
@click.argument("cmake_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMAKE_ARGS...]")
def build(
    backend: str,
    cuda_arch: str | None,
    cuda_toolkit: str,
    gpu_targets: str | None,
    jobs: int | None,
    ui: bool | None,
    rpc: bool,
    native: bool,
    clean: bool,
    dry_run: bool,
    list_builds: bool,
    source_dir: Path | None,
    cmake_args: tuple[str, ...],
) -> None:
    """Compile the vendored llama.cpp for this machine, cached per configuration.

    Extra CMake arguments go after `--`, e.g. `llamactl build -- -DGGML_CUDA_FA_ALL_QUANTS=ON`.
    """
    if list_builds:
        _render_list()
        return
    stray = [a for a in cmake_args if not a.startswith("-")]
    if stray:
        raise UsageError(
            f"unexpected argument {stray[0]!r}: extra CMake arguments go after `--`, "
            "e.g. `llamactl build -- -DGGML_CUDA_FA_ALL_QUANTS=ON`"
        )
    spec = BuildSpec(
        backend=backend,
        cuda_architectures=parse_list(cuda_arch),
        gpu_targets=parse_list(gpu_targets),
        jobs=jobs,
        ui=ui,
        rpc=rpc,
        native=native,
        clean=clean,
        dry_run=dry_run,
        extra_cmake_args=tuple(cmake_args),
        source=source_dir,
        cuda_toolkit=cuda_toolkit,
    )
    if dry_run:
        from llamactl.build.run import build_llama

        _render_dry_run(build_llama(spec))
        return
    _run(spec)


def _run(spec: BuildSpec) -> None:
    from llamactl.build.run import build_llama
    from llamactl.cli.render import BuildProgress

    started = time.monotonic()
    consoles: list[Console] = []

    def console() -> Console:
        if not consoles:
            consoles.append(_stderr_console())
        return consoles[0]

    with BuildProgress(console) as report:
        outcome = build_llama(spec, report=report)
    if outcome.state == "up-to-date":
        click.echo(f"up to date: {outcome.plan.build_dir}")
        return
    for note in outcome.plan.notes:
        console().print(f"[dim]note:[/] {note}")
    manifest = outcome.manifest
    assert manifest is not None
    for warning in manifest.warnings:
        console().print(f"[yellow]warning:[/] {warning}")
    click.echo(
        f"built {manifest.backend} llama.cpp {manifest.commit[:12]} in "
        f"{_duration(time.monotonic() - started)}: {manifest.path}"
    )
    click.echo(f"llama-server: {manifest.server_binary}")


def _render_dry_run(outcome: BuildOutcome) -> None:
    the_plan = outcome.plan
    err = _stderr_console()
    err.print(
        f"[bold]{the_plan.backend}[/] build of llama.cpp {the_plan.commit[:12]} "
        f"from {the_plan.source}"
    )
    for note in the_plan.notes:
        err.print(f"[dim]note:[/] {note}")
    for problem in the_plan.problems:
        hint = f" (hint: {problem.hint})" if problem.hint else ""
        err.print(f"[red]problem:[/] {problem.message}{hint}")
    err.print(f"[dim]build dir:[/] {the_plan.build_dir}")
    # Plain echo, never rich: the commands must stay copy-pasteable (no wrapping, no markup).
    for line in the_plan.commands():
        click.echo(line)


def _render_list() -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from llamactl.build.cache import find_builds

    builds: list[Manifest] = find_builds()
    console = Console()
    if not builds:
        console.print("no builds yet: run `llamactl build`")
        return
    from llamactl import paths

    table = Table(
        title=f"builds in {paths.builds_dir()}, newest first", box=box.SIMPLE_HEAD, pad_edge=False
    )
    table.add_column("build", no_wrap=True)
    for col in ("backend", "built", "took", "ui", "rpc"):
        table.add_column(col, no_wrap=True)
    for m in builds:
        table.add_row(
            m.path.name,
            m.backend,
            time.strftime("%m-%d %H:%M", time.localtime(m.created)),
            _duration(m.duration_s),
            "yes" if m.ui else "no",
            "yes" if m.rpc else "no",
        )
    console.print(table)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--backend",
    type=click.Choice([b for b in BACKEND_CHOICES if b != "auto"]),
    default=None,
    help="Only builds of this backend.",
)
def which(backend: str | None) -> None:
    """Print the llama-server that serve will use."""
    from llamactl.build.cache import find_server_binary

    click.echo(str(find_server_binary(backend)))
