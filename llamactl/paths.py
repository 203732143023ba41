"""Every directory llamactl uses, from platformdirs, each overridable by an environment variable.

LLAMACTL_HOME puts cache, state and config under one folder (tests use it); the finer
LLAMACTL_CACHE_DIR / LLAMACTL_STATE_DIR / LLAMACTL_CONFIG_DIR win over it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "llamactl"

#: The repository checkout this package runs from, when it runs from one (editable install).
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _dir(specific: str, sub: str, default: str) -> Path:
    value = os.environ.get(specific)
    if value:
        return Path(value).expanduser()
    home = os.environ.get("LLAMACTL_HOME")
    if home:
        return Path(home).expanduser() / sub
    return Path(default)


def _platform_dir(kind: str) -> str:
    """platformdirs' user_{kind}_dir for llamactl. On Linux the XDG rule is computed here,
    as platformdirs computes it (tests/test_paths.py compares the two), sparing `serve` the
    ~10 ms import on its way to spawning llama-server."""
    if sys.platform.startswith("linux"):
        variable, fallback = _XDG[kind]
        base = os.environ.get(variable, "").strip()
        return os.path.join(base or os.path.expanduser(fallback), APP)
    import platformdirs

    return str(getattr(platformdirs, f"user_{kind}_dir")(APP))


_XDG = {
    "cache": ("XDG_CACHE_HOME", "~/.cache"),
    "state": ("XDG_STATE_HOME", "~/.local/state"),
    "config": ("XDG_CONFIG_HOME", "~/.config"),
}


def cache_dir() -> Path:
    """Builds, models and downloaded archives (safe to delete, slow to remake)."""
    return _dir("LLAMACTL_CACHE_DIR", "cache", _platform_dir("cache"))


def state_dir() -> Path:
    """Records of running servers, logs, chat history."""
    return _dir("LLAMACTL_STATE_DIR", "state", _platform_dir("state"))


def config_dir() -> Path:
    """The config file."""
    return _dir("LLAMACTL_CONFIG_DIR", "config", _platform_dir("config"))


def builds_dir() -> Path:
    return cache_dir() / "builds"


def models_dir() -> Path:
    return cache_dir() / "models"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def toolkits_dir() -> Path:
    """Toolkits llamactl installs itself (the CUDA toolkit from PyPI wheels)."""
    return cache_dir() / "toolkits"


def run_dir() -> Path:
    """One JSON record per running `serve`."""
    return state_dir() / "run"


def logs_dir() -> Path:
    return state_dir() / "logs"


def vendor_dir() -> Path:
    """Where the pin lives and the pinned source is unpacked: the checkout's vendor/ folder,
    or a folder in the cache when llamactl is installed from a wheel."""
    checkout = REPO_DIR / "vendor"
    if (REPO_DIR / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    return cache_dir() / "vendor"


def ensure_private_dir(path: Path) -> Path:
    """Create a directory readable by its owner only (logs and state hold prompts and keys).

    mkdir -p gives missing parents the umask's mode (0777 under umask 000): the state
    directory above logs/ and run/ is made private first."""
    state = state_dir()
    if state in path.parents:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
