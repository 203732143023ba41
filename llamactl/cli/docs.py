"""docs/cli.md, generated from the commands' own help (scripts/gen_cli_docs.py writes it;
tests/test_cli_docs.py checks that it is current)."""

from __future__ import annotations

import click

from llamactl.cli import COMMANDS, cli

WIDTH = 100
HEADER = """# Command reference

Generated from `--help` by `scripts/gen_cli_docs.py`; `tests/test_cli_docs.py` fails when it is
out of date. The guides: [build.md](build.md), [doctor.md](doctor.md), [models.md](models.md),
[chat.md](chat.md), [proxy.md](proxy.md) (serve), [performance.md](performance.md).
"""


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    # As the real CLI runs: the root's -h/--help reaches every command through its parent.
    return click.Context(
        command,
        info_name=name,
        parent=parent,
        terminal_width=WIDTH,
        max_content_width=WIDTH,
        help_option_names=["-h", "--help"],
    )


def _block(text: str) -> str:
    return "```\n" + text.rstrip() + "\n```\n"


def render() -> str:
    """The whole of docs/cli.md."""
    from llamactl.serve.main import help_text

    root = _context(cli, "llamactl", None)
    parts = [HEADER, "## llamactl\n", _block(cli.get_help(root))]
    for name in sorted(COMMANDS):
        command = cli.get_command(root, name)
        assert command is not None
        parts.append(f"## llamactl {name}\n")
        if name == "serve":  # serve parses its own (llama-server's) command line
            parts.append(_block(help_text()))
            continue
        ctx = _context(command, name, root)
        parts.append(_block(command.get_help(ctx)))
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                subcommand = command.get_command(ctx, sub)
                assert subcommand is not None
                parts.append(f"### llamactl {name} {sub}\n")
                parts.append(_block(subcommand.get_help(_context(subcommand, sub, ctx))))
    return "\n".join(parts)
