"""Every directory llamactl uses, from platformdirs, each overridable by an environment variable.

LLAMACTL_HOME puts cache, state and config under one folder (tests use it); the finer
LLAMACTL_CACHE_DIR / LLAMACTL_STATE_DIR / LLAMACTL_CONFIG_DIR win over it.
"""

from __future__ import annotations

import os
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


def cache_dir() -> Path:
    """Builds, models and downloaded archives (safe to delete, slow to remake)."""
    import platformdirs

    return _dir("LLAMACTL_CACHE_DIR", "cache", platformdirs.user_cache_dir(APP))


def state_dir() -> Path:
    """Records of running servers, logs, chat history."""
    import platformdirs

    return _dir("LLAMACTL_STATE_DIR", "state", platformdirs.user_state_dir(APP))


def config_dir() -> Path:
    """The config file."""
    import platformdirs

    return _dir("LLAMACTL_CONFIG_DIR", "config", platformdirs.user_config_dir(APP))


def builds_dir() -> Path:
    return cache_dir() / "builds"


def models_dir() -> Path:
    return cache_dir() / "models"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


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
