"""paths computes the XDG directories itself on Linux: they must be platformdirs' own."""

from __future__ import annotations

import sys

import platformdirs
import pytest

from llamactl import paths

pytestmark = pytest.mark.unit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the XDG rule is Linux's")
@pytest.mark.parametrize("xdg", [None, "", "  ", "/custom/xdg"])
def test_platform_dirs_are_platformdirs_own(
    xdg: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    for variable in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        if xdg is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, xdg)
    for kind in ("cache", "state", "config"):
        ours = paths._platform_dir(kind)
        theirs = getattr(platformdirs, f"user_{kind}_dir")(paths.APP)
        assert ours == theirs, kind


def test_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_HOME", "/h")
    assert str(paths.cache_dir()) == "/h/cache"
    monkeypatch.setenv("LLAMACTL_CACHE_DIR", "/c")
    assert str(paths.cache_dir()) == "/c"
