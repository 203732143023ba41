"""llama.cpp's own server tests, from the vendored source, through `llamactl serve`: every
test that passes against the llama-server llamactl built passes through llamactl too. Runs
scripts/upstream_server_tests.py on its quick set, a share of the files that need no network
(docs/drop-in.md: the script runs the rest; they take too long for every test run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_CACHE

from llamactl import paths

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

SCRIPT = paths.REPO_DIR / "scripts" / "upstream_server_tests.py"
UPSTREAM = paths.REPO_DIR / "vendor" / "llama.cpp" / "tools" / "server" / "tests"


def test_upstream_server_tests_pass_through_llamactl(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    if not (UPSTREAM / "utils.py").is_file():
        pytest.skip(f"no upstream server tests at {UPSTREAM}")
    out = tmp_path / "summary.json"
    env = {**os.environ, "LLAMACTL_CACHE_DIR": str(REAL_CACHE)}
    result = subprocess.run(
        [
            *(sys.executable, str(SCRIPT), "--set", "quick", "--json", str(out)),
            *("--keep", str(tmp_path / "logs"), "--timeout", "780"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["only"]["direct"] == [], result.stdout
    # The run did test something: most of these files pass against llama-server here.
    assert summary["total"]["direct"] > summary["total"]["tests"] / 2, result.stdout
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
