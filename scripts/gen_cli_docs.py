#!/usr/bin/env python3
"""Write docs/cli.md from the commands' --help (tests/test_cli_docs.py checks it is current).

.venv/bin/python scripts/gen_cli_docs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamactl.cli.docs import render  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render())
    print("wrote docs/cli.md")
