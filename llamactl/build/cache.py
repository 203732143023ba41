"""The build cache: each complete build's manifest (written last, atomically), the list of
builds, the build `llamactl build` last chose (the preferred one), and the llama-server that
serve uses.

It imports neither the planner nor the probes: `llamactl serve` finds its binary from the
cache alone (time to ready, docs/performance.md), by the choice `llamactl build` recorded."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl import paths
from llamactl.errors import BuildError, SourceError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """A complete build, as recorded in its manifest.json (written last)."""

    key: str
    commit: str
    backend: str
    cmake_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    targets: tuple[str, ...]
    binaries: dict[str, str]  # name -> path relative to the build directory
    toolchain: dict[str, str]
    duration_s: float
    created: float  # unix time
    llamactl_version: str
    source: str
    generator: str | None = None
    jobs: int | None = None
    ui: bool = False
    rpc: bool = False
    native: bool = True
    server_version: str = ""
    backends_included: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    path: Path = field(default=Path(), compare=False)  # the build directory it was read from

    def binary(self, name: str) -> Path:
        return self.path / self.binaries[name]

    @property
    def server_binary(self) -> Path:
        return self.binary("llama-server")

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "commit": self.commit,
            "backend": self.backend,
            "cmake_args": list(self.cmake_args),
            "env": dict(self.env),
            "targets": list(self.targets),
            "binaries": dict(self.binaries),
            "toolchain": dict(self.toolchain),
            "duration_s": self.duration_s,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "llamactl_version": self.llamactl_version,
            "source": self.source,
            "generator": self.generator,
            "jobs": self.jobs,
            "ui": self.ui,
            "rpc": self.rpc,
            "native": self.native,
            "server_version": self.server_version,
            "backends_included": list(self.backends_included),
            "devices": list(self.devices),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> Manifest:
        return cls(
            key=str(data["key"]),
            commit=str(data["commit"]),
            backend=str(data["backend"]),
            cmake_args=tuple(data["cmake_args"]),
            env=tuple(sorted(dict(data.get("env", {})).items())),
            targets=tuple(data.get("targets", ())),
            binaries=dict(data["binaries"]),
            toolchain=dict(data.get("toolchain", {})),
            duration_s=float(data.get("duration_s", 0.0)),
            created=float(data["created"]),
            llamactl_version=str(data.get("llamactl_version", "")),
            source=str(data.get("source", "")),
            generator=data.get("generator"),
            jobs=data.get("jobs"),
            ui=bool(data.get("ui", False)),
            rpc=bool(data.get("rpc", False)),
            native=bool(data.get("native", True)),
            server_version=str(data.get("server_version", "")),
            backends_included=tuple(data.get("backends_included", ())),
            devices=tuple(data.get("devices", ())),
            warnings=tuple(data.get("warnings", ())),
            path=path,
        )


def find_builds(root: Path | None = None) -> list[Manifest]:
    """Every complete build in the cache, newest first."""
    root = root if root is not None else paths.builds_dir()
    manifests: list[Manifest] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        path = entry / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            manifests.append(Manifest.from_json(data, entry))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an incomplete or foreign directory is not a build
    manifests.sort(key=lambda m: m.created, reverse=True)
    return manifests


def load_manifest(build_dir: Path) -> Manifest | None:
    """The manifest of a complete build, or None when the build is absent or incomplete."""
    try:
        data = json.loads((build_dir / MANIFEST_NAME).read_text())
        return Manifest.from_json(data, build_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: `llama-server --version`'s first line: "version: 0.5.0-dev (build 0, commit 0c1e570)", or
#: in older trees "version: 1234 (0c1e570)".
_VERSION = re.compile(r"\(build (\d+), commit (\w+)\)|version: (\d+) \((\w+)\)")


def build_info(binary: Path) -> str:
    """What llama-server's /props calls build_info ("b<number>-<commit>", common/build-info)
    for `binary`: from its build's manifest, else from `--version`; "" when neither says."""
    manifest = load_manifest(binary.parent.parent)
    text = manifest.server_version if manifest is not None else ""
    if not _VERSION.search(text):
        from llamactl import proc

        done = proc.run([str(binary), "--version"], timeout=10.0)
        text = done.stdout + done.stderr
    m = _VERSION.search(text)
    if m is None:
        return ""
    number, commit = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    return f"b{number}-{commit}"


def current_commit() -> str:
    """The commit of the source a build would use now."""
    from llamactl.build.source import resolve_source

    try:
        return resolve_source().commit
    except SourceError:
        from llamactl.build.source import load_pin

        return load_pin().commit


def write_manifest(manifest: Manifest) -> Path:
    """Write manifest.json atomically: a reader sees a whole manifest or none."""
    target = manifest.path / MANIFEST_NAME
    tmp = target.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


def find_server_binary(backend: str | None = None) -> Path:
    """The llama-server serve will use: among the complete builds of the current commit (of
    that backend, when given), the one `llamactl build` last chose, else the newest."""
    commit = current_commit()
    builds = [
        m
        for m in find_builds()
        if m.commit == commit
        and (backend is None or m.backend == backend)
        and "llama-server" in m.binaries
        and m.server_binary.is_file()
    ]
    if not builds:
        what = f"{backend} build" if backend else "build"
        raise BuildError(
            f"no complete llama.cpp {what} for commit {commit[:12]} in {paths.builds_dir()}",
            hint=f"run `llamactl build{f' --backend {backend}' if backend else ''}`",
        )
    if len(builds) > 1:
        # Several configurations: the one a plain `llamactl build` made (or, for a backend,
        # the last one `llamactl build --backend X` made). Never the probes: nvidia-smi alone
        # costs about 40 ms on a GPU machine, on every start.
        preferred = _remembered(
            _auto_path(commit) if backend is None else _backend_path(commit, backend)
        )
        for m in builds:
            if m.key == preferred:
                return m.server_binary
    return builds[0].server_binary


def _auto_path(commit: str) -> Path:
    return paths.builds_dir() / f".auto-{commit[:12]}"


def _backend_path(commit: str, backend: str) -> Path:
    return paths.builds_dir() / f".preferred-{commit[:12]}-{backend}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remember_preferred(commit: str, key: str, backend: str, *, plain: bool) -> None:
    """Note the build `llamactl build` chose for this commit: for its backend, and, when it was
    a plain `llamactl build` (backend auto), as the build serve uses by default."""
    _write_atomic(_backend_path(commit, backend), key + "\n")
    if plain:
        remember_auto(commit, key)


def remember_auto(commit: str, key: str) -> None:
    """Note the build a plain `llamactl build` (backend auto) chose for this commit."""
    _write_atomic(_auto_path(commit), key + "\n")


def _remembered(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _remembered_auto(commit: str) -> str | None:
    return _remembered(_auto_path(commit))
