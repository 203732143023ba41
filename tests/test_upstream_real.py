"""llama.cpp's own server tests, from the vendored source, through `llamactl serve`: every
test that passes against the llama-server llamactl built passes through llamactl too. Runs
scripts/upstream_server_tests.py on its quick set, a share of the files that need no network,
and on the quick share of router mode's tests (docs/drop-in.md: the script runs the rest; they
take too long for every test run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL_CACHE

from llamactl import paths

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

SCRIPT = paths.REPO_DIR / "scripts" / "upstream_server_tests.py"
UPSTREAM = paths.REPO_DIR / "vendor" / "llama.cpp" / "tools" / "server" / "tests"


def run_set(name: str, tmp_path: Path, timeout_s: int) -> tuple[dict[str, Any], str]:
    """scripts/upstream_server_tests.py on one set: its summary and what it printed."""
    if not (UPSTREAM / "utils.py").is_file():
        pytest.skip(f"no upstream server tests at {UPSTREAM}")
    out = tmp_path / "summary.json"
    env = {**os.environ, "LLAMACTL_CACHE_DIR": str(REAL_CACHE)}
    result = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), "--set", name, "--json", str(out)),
            *("--keep", str(tmp_path / "logs"), "--timeout", str(timeout_s - 60)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    printed = result.stdout[-3000:] + result.stderr[-3000:]
    assert out.is_file(), printed
    summary = json.loads(out.read_text())
    assert summary["only"]["direct"] == [], result.stdout
    assert result.returncode == 0, printed
    return summary, result.stdout


def test_upstream_server_tests_pass_through_llamactl(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    summary, printed = run_set("quick", tmp_path, 840)
    # The run did test something: most of these files pass against llama-server here.
    assert summary["total"]["direct"] > summary["total"]["tests"] / 2, printed


def test_upstream_router_tests_pass_through_llamactl(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    """Router mode's own tests (the quick share: `--set router` runs the whole file), with
    `--models-preset` naming the default model under the ids they load."""
    summary, printed = run_set("router-quick", tmp_path, 600)
    # All twelve ran, and most passed against router mode (all of them on a quiet machine).
    assert summary["total"]["tests"] == 12, printed
    assert summary["total"]["direct"] > summary["total"]["tests"] / 2, printed
