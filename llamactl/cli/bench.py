"""`llamactl bench`: llamactl against llama-server direct and its router mode, on one model."""

from __future__ import annotations

from pathlib import Path

import click

from llamactl.cli import Command
from llamactl.errors import UsageError


@click.command(cls=Command)
@click.option("--server-bin", type=click.Path(dir_okay=False, path_type=Path),
              help="llama-server to measure (default: llamactl's build).")  # fmt: skip
@click.option("-m", "--model", type=click.Path(dir_okay=False, path_type=Path),
              help="GGUF model (default: the default model).")  # fmt: skip
@click.option("--targets", default="direct,router,llamactl,proxy,router2,many", show_default=True,
              help="Comma-separated: direct, router, llamactl (serve), proxy (alone), router2 and "
              "many (router mode and llamactl serving two names of the model).")  # fmt: skip
@click.option("--runs", default=1, show_default=True, help="Runs; medians are reported.")
@click.option("--duration", default=6.0, show_default=True, help="Seconds of wrk per target.")
@click.option("--streams", default=8, show_default=True, help="Concurrent streamed chats.")
@click.option("--max-tokens", default=64, show_default=True, help="Tokens per streamed chat.")
@click.option("--ready-rounds", default=10, show_default=True,
              help="Alternating starts of direct and llamactl, for time to ready.")  # fmt: skip
@click.option("--swap-rounds", default=3, show_default=True,
              help="Forced swaps between two models under --models-max 1 (0: none).")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every run's figures to this file.")  # fmt: skip
def bench(
    server_bin: Path | None,
    model: Path | None,
    targets: str,
    runs: int,
    duration: float,
    streams: int,
    max_tokens: int,
    ready_rounds: int,
    swap_rounds: int,
    json_path: Path | None,
) -> None:
    """Measure /tokenize req/s and latency (wrk, 4 connections), streamed tokens/s and time to
    the first answer: llama-server direct, its router mode, and llamactl."""
    from llamactl import bench as core

    default_server, default_model = core.default_paths()
    server_bin = server_bin or default_server
    model = model or default_model
    if server_bin is None:
        raise UsageError(
            "no llama-server build found", hint="run `llamactl build` or pass --server-bin"
        )
    if model is None:
        raise UsageError("no model given and the default model is not pulled", hint="pass -m")
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in core.TARGETS]
    if unknown:
        raise UsageError(
            f"unknown target(s) {', '.join(unknown)}; known: {', '.join(core.TARGETS)}"
        )
    spec = core.BenchSpec(
        server_bin=server_bin,
        model=model,
        targets=names,
        runs=runs,
        duration=duration,
        streams=streams,
        max_tokens=max_tokens,
        ready_rounds=ready_rounds,
        swap_rounds=swap_rounds,
    )
    results = core.run(spec, progress=lambda line: click.echo(line, err=True))
    ready: dict[str, list[float]] = {}
    if ready_rounds > 0 and {"direct", "llamactl"} <= set(names):
        ready = core.run_ready(spec, progress=lambda line: click.echo(line, err=True))
    swap: dict[str, list[float]] = {}
    if swap_rounds > 0 and "many" in names:
        swap = core.run_swap(spec, progress=lambda line: click.echo(line, err=True))
    click.echo(core.report(core.medians(results), runs))
    if ready:
        click.echo(core.report_ready(ready))
    if swap:
        click.echo(core.report_swap(swap))
    if json_path is not None:
        json_path.write_text(core.to_json(results))
