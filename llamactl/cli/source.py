"""`llamactl source`: fetch or inspect the pinned llama.cpp source."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from llamactl.cli import Group


@click.group(cls=Group)
def source() -> None:
    """Fetch or inspect the pinned llama.cpp source (vendor/llama.cpp)."""


@source.command()
@click.option(
    "--method",
    type=click.Choice(["auto", "pypi", "git"]),
    default="auto",
    show_default=True,
    help="Where to fetch from: the PyPI source archive, upstream git, or the first that works.",
)
@click.option("--force", is_flag=True, help="Fetch again even if the tree matches the pin.")
def fetch(method: str, force: bool) -> None:
    """Fetch the pinned tree into vendor/llama.cpp, verified by checksum."""
    from rich.console import Console

    from llamactl.build.source import fetch as fetch_source
    from llamactl.cli.render import BuildProgress

    with BuildProgress(lambda: Console(stderr=True)) as report:
        tree = fetch_source(method=method, force=force, report=report)
    click.echo(f"llama.cpp {tree.commit[:12]} from {tree.origin} at {tree.path}")


@source.command()
@click.option(
    "--source",
    "source_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LLAMACTL_SOURCE",
    help="Another llama.cpp checkout to report on (env LLAMACTL_SOURCE).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(source_dir: Path | None, as_json: bool) -> None:
    """Show the pinned commit, the tree on disk, and whether they match."""
    from llamactl.build.source import source_status

    st = source_status(source_dir)
    if as_json:
        data = asdict(st)
        data["path"] = str(st.path)
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"pin:      {st.pin.commit} ({st.pin.date})")
    click.echo(f"tree:     {st.path}{' (custom, --source)' if st.custom else ''}")
    if not st.present:
        click.echo("state:    missing: run `llamactl source fetch`")
        raise SystemExit(1)
    click.echo(f"commit:   {st.commit or 'unknown'}")
    click.echo(f"origin:   {st.origin or 'unknown'}")
    if st.fetched_at:
        click.echo(f"fetched:  {st.fetched_at}")
    if st.problem:
        click.echo(f"problem:  {st.problem}")
    click.echo(f"matches:  {'yes' if st.matches_pin else 'NO'}")
