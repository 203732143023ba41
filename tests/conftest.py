"""Test set-up: every test runs in a temporary llamactl home; real tests reach the real
build and model cache through fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamactl import paths

# Resolved before any test changes the environment: where the real builds and models live.
REAL_CACHE = paths.cache_dir()
#: CI sets this so that a missing build or model fails the real tests instead of skipping them.
REQUIRE_REAL = os.environ.get("LLAMACTL_REQUIRE_REAL") == "1"


@pytest.fixture(autouse=True)
def llamactl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point cache, state and config at a temporary folder."""
    home = tmp_path / "llamactl-home"
    monkeypatch.setenv("LLAMACTL_HOME", str(home))
    for name in ("LLAMACTL_CACHE_DIR", "LLAMACTL_STATE_DIR", "LLAMACTL_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LLAMACTL_API_KEY", raising=False)
    return home


@pytest.fixture
def real_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Use the real build and model cache (state and config stay temporary)."""
    monkeypatch.setenv("LLAMACTL_CACHE_DIR", str(REAL_CACHE))
    return REAL_CACHE


def _missing(what: str) -> None:
    if REQUIRE_REAL:
        pytest.fail(f"{what} missing, and LLAMACTL_REQUIRE_REAL=1: run scripts/test.sh set-up")
    pytest.skip(f"{what} missing (run scripts/test.sh to build it)")


@pytest.fixture(scope="session")
def server_bin() -> Path:
    """The real llama-server that `llamactl which` names."""
    from llamactl.build.cache import find_server_binary

    override = os.environ.get("LLAMACTL_TEST_SERVER_BIN")  # a developer's own build
    if override:
        return Path(override)
    os.environ.setdefault("LLAMACTL_CACHE_DIR", str(REAL_CACHE))
    try:
        path = find_server_binary()
    except Exception as exc:
        _missing(f"llama-server build ({exc})")
        raise
    return path


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model (SmolLM2-135M-Instruct Q4_1) in the real cache."""
    from llamactl.models.catalog import DEFAULT_MODEL

    path = REAL_CACHE / "models" / DEFAULT_MODEL.filename
    if not path.is_file():
        _missing(f"default model {path}")
    return path
