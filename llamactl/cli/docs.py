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


def _help(command: click.Command, name: str, parent: click.Context) -> str:
    ctx = click.Context(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH
    )
    return command.get_help(ctx)


def render() -> str:
    """The whole of docs/cli.md."""
    from llamactl.serve import help_text

    root = click.Context(cli, info_name="llamactl", terminal_width=WIDTH, max_content_width=WIDTH)
    parts = [HEADER, "## llamactl\n", "```\n" + cli.get_help(root) + "\n```\n"]
    for name in sorted(COMMANDS):
        command = cli.get_command(root, name)
        assert command is not None
        parts.append(f"## llamactl {name}\n")
        if name == "serve":  # serve parses its own (llama-server's) command line
            parts.append("```\n" + help_text().rstrip() + "\n```\n")
            continue
        parts.append("```\n" + _help(command, name, root) + "\n```\n")
        if isinstance(command, click.Group):
            group_ctx = click.Context(command, info_name=name, parent=root)
            for sub in command.list_commands(group_ctx):
                subcommand = command.get_command(group_ctx, sub)
                assert subcommand is not None
                parts.append(f"### llamactl {name} {sub}\n")
                parts.append("```\n" + _help(subcommand, sub, group_ctx) + "\n```\n")
    return "\n".join(parts)
