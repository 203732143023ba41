"""docs/cli.md is the commands' current --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.cli import COMMANDS
from llamactl.cli.docs import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


pytestmark = pytest.mark.unit


def test_cli_md_is_current() -> None:
    assert DOC.read_text() == render(), "docs/cli.md is stale: run scripts/gen_cli_docs.py"


def test_every_command_is_documented() -> None:
    text = render()
    for name in COMMANDS:
        assert f"## llamactl {name}\n" in text
    assert "### llamactl models inspect" in text and "### llamactl source fetch" in text
