"""llamactl installed the way Python command-line tools are (a wheel in a fresh environment),
run from a directory outside the checkout: the pin travels as package data, the source goes
to the cache, and the cached build and default model serve a chat."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REAL_CACHE

from llamactl import net, paths, proc
from llamactl.build import source

CHECKOUT_PIN = paths.REPO_DIR / "vendor" / source.PIN_FILE


# --- the pin as package data (unit) -----------------------------------------------------------


@pytest.mark.unit
def test_the_packaged_pin_is_the_checkouts() -> None:
    """A developer changes vendor/llama.cpp.pin.json; the wheel ships llamactl/build's copy."""
    assert json.loads(source.PACKAGED_PIN.read_text()) == json.loads(CHECKOUT_PIN.read_text()), (
        f"copy {CHECKOUT_PIN} to {source.PACKAGED_PIN}: the two pins differ"
    )


@pytest.mark.unit
def test_the_packaged_pin_is_declared_as_package_data() -> None:
    pyproject = (paths.REPO_DIR / "pyproject.toml").read_text()
    relative = source.PACKAGED_PIN.relative_to(paths.PACKAGE_DIR).as_posix()
    assert f'"{relative}"' in pyproject


@pytest.mark.unit
def test_outside_a_checkout_the_packaged_pin_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed package: its parent folder is site-packages, with no pyproject.toml.
    monkeypatch.setattr(paths, "REPO_DIR", tmp_path / "site-packages")
    cache_vendor = paths.cache_dir() / "vendor"
    assert paths.vendor_dir() == cache_vendor
    assert source.pin_path() == source.PACKAGED_PIN
    assert source.default_tree_path() == cache_vendor / source.TREE_NAME
    # A pin file left in the cache (say by an older version) is not the package's pin.
    cache_vendor.mkdir(parents=True)
    (cache_vendor / source.PIN_FILE).write_text('{"commit": "stale"}')
    assert source.load_pin().commit == json.loads(CHECKOUT_PIN.read_text())["commit"]


@pytest.mark.unit
def test_in_a_checkout_the_vendor_pin_is_read() -> None:
    assert paths.vendor_dir() == paths.REPO_DIR / "vendor"
    assert source.pin_path() == CHECKOUT_PIN


# --- the wheel in a fresh environment (real) ---------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """A fresh virtual environment holding only the built wheel of llamactl."""

    bin: Path
    wheel: Path
    env: dict[str, str]
    cwd: Path

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "llamactl"), *args],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _build_wheel(out: Path) -> Path:
    """The wheel of this checkout, built from a copy of it (the checkout gets no build/)."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(paths.REPO_DIR / name, src / name)
    shutil.copytree(
        paths.PACKAGE_DIR, src / "llamactl", ignore=shutil.ignore_patterns("__pycache__")
    )
    # No build isolation when this environment can build wheels (the test extra brings
    # `wheel`): nothing is downloaded. Else pip fetches the build backend from PyPI.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("wheel") else []
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation),
            *("--disable-pip-version-check", "-w", str(out / "dist"), str(src)),
        ],
        timeout=300,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (out / "dist").glob("llamactl-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The wheel installed into a fresh venv whose only other path is this environment's
    site-packages (for click, httpx and the rest: nothing is downloaded)."""
    root = tmp_path_factory.mktemp("installed")
    wheel = _build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bin_dir = venv / "bin"
    python = bin_dir / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path line: the dependencies are found after the venv's own site-packages, and
    # this environment's editable llamactl (a .pth in that folder) is not processed from it.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "-q"),
            *("--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)),
        ],
        timeout=300,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cwd = root / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACTL_")}
    env.update(
        LLAMACTL_CACHE_DIR=str(REAL_CACHE),  # the cached build and default model
        LLAMACTL_STATE_DIR=str(root / "state"),
        LLAMACTL_CONFIG_DIR=str(root / "config"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("PYTHONPATH", None)
    yield Installed(bin=bin_dir, wheel=wheel, env=env, cwd=cwd)


@pytest.mark.real
def test_the_wheel_carries_the_pin(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        assert "llamactl/build/llama.cpp.pin.json" in z.namelist()
        # The express lane's source: an installed serve compiles it on first use.
        assert "llamactl/serve/express.c" in z.namelist()


@pytest.mark.real
def test_installed_llamactl_runs_from_the_package_not_the_checkout(installed: Installed) -> None:
    result = subprocess.run(
        [str(installed.bin / "python"), "-c", "import llamactl; print(llamactl.__file__)"],
        cwd=installed.cwd,
        env=installed.env,
        capture_output=True,
        text=True,
        check=True,
    )
    location = Path(result.stdout.strip())
    assert installed.bin.parent in location.parents
    assert paths.REPO_DIR not in location.parents


@pytest.mark.real
def test_installed_source_status_which_and_dry_run(
    installed: Installed, server_bin: Path, default_model: Path
) -> None:
    pin = json.loads(CHECKOUT_PIN.read_text())
    status = installed.run("source", "status")
    assert "cannot read the llama.cpp pin" not in status.stderr
    assert f"pin:      {pin['commit']}" in status.stdout, status.stderr
    # Outside a clone the source belongs in the cache (fetched there on demand).
    assert f"tree:     {REAL_CACHE / 'vendor' / source.TREE_NAME}" in status.stdout
    assert status.returncode in (0, 1)  # 1: not fetched yet, which status says

    which = installed.run("which")
    assert which.returncode == 0, which.stderr
    assert Path(which.stdout.strip()) == server_bin

    dry = installed.run("build", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "cmake" in dry.stdout and pin["commit"][:12] in dry.stdout + dry.stderr


@pytest.mark.real
def test_installed_serve_and_chat_answer_paris(
    installed: Installed, server_bin: Path, default_model: Path
) -> None:
    port = net.free_port()
    log_path = installed.cwd / "serve.log"
    with open(log_path, "ab") as log:
        serve = proc.spawn(
            [str(installed.bin / "llamactl"), "serve", "--port", str(port), "-c", "2048"],
            env=installed.env,
            cwd=installed.cwd,
            stdout=log,
        )
    try:
        try:
            net.wait_ready("127.0.0.1", port, deadline_s=120, exited=serve.poll)
        except net.NotReady as exc:
            pytest.fail(f"installed serve: {exc}\n{log_path.read_text()[-2000:]}")
        chat = installed.run(
            "chat",
            "--url",
            f"http://127.0.0.1:{port}",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "-p",
            "What is the capital of France?",
        )
        assert chat.returncode == 0, chat.stderr
        assert "Paris" in chat.stdout
    finally:
        proc.stop_group(serve.pid, popen=serve)
