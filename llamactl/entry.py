"""The `llamactl` console command.

`llamactl serve ...` goes straight to serve, without click: serve parses its own command
line (it is llama-server's), and skipping click's ~30 ms import brings the moment
llama-server is spawned, and so time to ready, closer to a bare llama-server's
(docs/performance.md). Everything else, `llamactl --debug serve` included, goes through
the click CLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        from llamactl.serve.main import main as serve_main

        sys.exit(serve_main(args[1:]))
    from llamactl.cli import main as cli_main

    cli_main()
