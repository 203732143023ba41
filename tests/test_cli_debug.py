"""`--debug`: a user's error is one line without it, and shows where it came from with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.cli import cli

pytestmark = pytest.mark.unit


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output  # stdout and stderr, as a terminal shows them


def test_error_without_debug_is_one_message_and_no_traceback(tmp_path: Path) -> None:
    code, out = run("models", "inspect", str(tmp_path / "missing.gguf"))
    assert code != 0
    assert "Error:" in out and "Traceback" not in out


def test_error_with_debug_shows_the_traceback_once(tmp_path: Path) -> None:
    code, out = run("--debug", "models", "inspect", str(tmp_path / "missing.gguf"))
    assert code != 0
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "llamactl/" in out and "Error:" in out
