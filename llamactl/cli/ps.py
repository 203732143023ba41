"""`llamactl ps`, `stop` and `logs`: the running serves, from their state records."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llamactl.cli import Command
from llamactl.errors import UsageError

if TYPE_CHECKING:
    from llamactl.serve.records import ServeRecord


def _pick(record_id: str | None) -> ServeRecord:
    from llamactl.serve import records

    live = records.live_records()  # with no id: the newest serve (a worker needs its id)
    if record_id:
        found = records.find(record_id)
        if found is None:
            raise UsageError(f"no running serve with id or port {record_id!r} (see `llamactl ps`)")
        return found
    if not live:
        raise UsageError("no llamactl serve is running")
    return live[0]


def _model(row: dict[str, object]) -> str:
    """The model, its instance name when that says more, and where it runs when not here."""
    model = str(row["model"] or "-")
    if row.get("kind") != "worker" and row.get("instance") not in ("default", row["model"], None):
        model += f" ({row['instance']})"
    where = row.get("where")
    return f"{model} @ {where}" if where and where != "local" else model


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ps(as_json: bool) -> None:
    """List running servers and RPC workers: id, kind, pid, model, address, state, load
    progress, uptime, restarts, memory, and the GPU llamactl placed each model on."""
    from llamactl.serve.ps import rows

    table = rows()
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    if not table:
        click.echo("no llamactl serve or worker is running")
        return
    from rich.console import Console
    from rich.table import Table

    out = Table(box=None, header_style="bold")
    placed = any(row.get("gpu") is not None for row in table)
    columns = ["ID", "KIND", "PID", "MODEL", "ADDRESS", "STATE", "LOAD", "UPTIME", "RESTARTS"]
    for col in [*columns, "MEMORY", *(["GPU"] if placed else [])]:
        out.add_column(col)
    for row in table:
        cells = [
            row["id"],
            row["kind"],
            str(row["pid"]),
            _model(row),
            row["url"],
            row["state"],
            row["load_human"],
            row["uptime_human"],
            str(row["restarts"]),
            row["memory_human"],
        ]
        if placed:
            cells.append("-" if row.get("gpu") is None else f"GPU{row['gpu']} (CUDA{row['gpu']})")
        out.add_row(*cells)
    Console().print(out)


@click.command(cls=Command)
@click.argument("record_id", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every running serve and worker.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds before SIGKILL.")
def stop(record_id: str | None, stop_all: bool, timeout: float) -> None:
    """Stop a running serve or worker (by id or port; the only one when there is one)."""
    from llamactl.serve import records
    from llamactl.serve.ps import stop_serve

    live = records.live_records(kind=None)
    if stop_all:
        targets = live
    elif record_id is not None:
        targets = [_pick(record_id)]
    elif len(live) > 1:
        raise UsageError(
            "several serves or workers are running: name one (see `llamactl ps`) or use --all"
        )
    else:
        targets = live
    if not targets:
        click.echo("no llamactl serve or worker is running")
        return
    for rec in targets:
        stop_serve(rec, timeout=timeout)
        click.echo(f"stopped {rec.id} ({rec.url})")


@click.command(cls=Command)
@click.argument("record_id", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=50, show_default=True, help="How many last lines.")
def logs(record_id: str | None, follow: bool, lines: int) -> None:
    """Show the llama-server log of a running serve (the newest when no id is given)."""
    rec = _pick(record_id)
    paths = [Path(i.log_path) for i in rec.instances if i.log_path]
    if not paths or not paths[0].is_file():
        raise UsageError(f"serve {rec.id} has no log yet")
    path = paths[0]
    with open(path, "rb") as fh:
        data = fh.read()
        tail = data.splitlines()[-lines:] if lines > 0 else []
        for line in tail:
            sys.stdout.write(line.decode(errors="replace") + "\n")
        sys.stdout.flush()
        if not follow:
            return
        from llamactl.proc import pid_alive

        try:
            while True:
                chunk = fh.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                elif not pid_alive(rec.pid):
                    return
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return
