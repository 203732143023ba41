"""`llamactl serve`: a drop-in for `llama-server`, supervised and proxied."""

from __future__ import annotations

import sys

import click

from llamactl.cli import Command


@click.command(
    cls=Command,
    context_settings={
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": [],
    },
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve a model: llama-server, supervised, behind a streaming proxy.

    Takes llama-server's flags unchanged (-m, -ngl, -c, --host, --port, --api-key, ...).
    See `llamactl serve --help`.
    """
    from llamactl.serve.main import parse_serve_args
    from llamactl.serve.main import serve as run_serve

    sys.exit(run_serve(parse_serve_args(list(args))))
