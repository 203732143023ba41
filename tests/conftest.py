"""Test set-up: every test runs in a temporary llamactl home; real tests reach the real
build and model cache through fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.serve import Serve, start, stop

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


# -- test tiers ------------------------------------------------------------------------------

TIERS = ("unit", "fake", "real", "build", "soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test names its tier, so that `pytest -m unit` is the whole fast tier."""
    untiered = [i.nodeid for i in items if not any(i.get_closest_marker(t) for t in TIERS)]
    if untiered:
        shown = "\n  ".join(untiered[:20])
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}):\n  {shown}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test, so that fixtures can show logs on failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(node, f"report_{w}", None) and getattr(node, f"report_{w}").failed
        for w in ("setup", "call")
    )


# -- a real `llamactl serve` -----------------------------------------------------------------


@pytest.fixture(scope="session")
def real_serve(
    server_bin: Path, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    """One `llamactl serve -m <default model>` for every real test that needs no special
    flags; stopped at the end, and no llama-server may outlive it."""
    s = start(server_bin, default_model, tmp_path_factory.mktemp("real-serve") / "home")
    yield s
    stop(s)
    assert not s.llama_servers(), "llama-server outlived serve"


@pytest.fixture
def serve_factory(
    server_bin: Path, default_model: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Serve]]:
    """Start serves with their own flags (`serve_factory("--api-key", "k")`); each is stopped
    after the test, its stderr shown when the test failed."""
    started: list[Serve] = []

    def make(*extra: str, model: Path | None = default_model, **kw: Any) -> Serve:
        home = tmp_path / f"home-{len(started)}"
        s = start(server_bin, model, home, *extra, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        log = stop(s)
        if failed(request):
            print(f"\n--- serve on port {s.port}: stderr ---\n{log[-6000:]}")
