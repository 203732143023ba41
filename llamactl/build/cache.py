"""The build cache as readers see it: each complete build's manifest, the list of builds,
and which llama-server serve uses.

Kept apart from build.py (planning and compiling) so that `llamactl serve` finds its binary
without importing the planner and the hardware probes (time to ready, docs/performance.md)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl import paths
from llamactl.errors import BuildError, LlamactlError, SourceError

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


def current_commit() -> str:
    """The commit of the source a build would use now."""
    from llamactl.build.source import resolve_source

    try:
        return resolve_source().commit
    except SourceError:
        from llamactl.build.source import load_pin

        return load_pin().commit


def find_server_binary(backend: str | None = None) -> Path:
    """The llama-server serve will use (the newest complete build that fits this machine)."""
    # Preference: the build a plain `llamactl build` would make here, else the newest complete
    # build of any configuration for the current commit.
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
        # Several configurations: prefer the one a plain `llamactl build` made (remembered, so
        # that serve does not run the hardware probes, nvidia-smi and all, on every start),
        # else the one it would make here.
        if backend is None:
            remembered = _remembered_auto(commit)
            for m in builds:
                if m.key == remembered:
                    return m.server_binary
        from llamactl.build.plan import BuildSpec, resolve_plan

        with contextlib.suppress(LlamactlError):
            wanted = resolve_plan(BuildSpec(backend=backend or "auto"), fetch=False).key
            for m in builds:
                if m.key == wanted:
                    return m.server_binary
    return builds[0].server_binary


def _auto_path(commit: str) -> Path:
    return paths.builds_dir() / f".auto-{commit[:12]}"


def remember_auto(commit: str, key: str) -> None:
    """Note the build a plain `llamactl build` (backend auto) chose for this commit."""
    path = _auto_path(commit)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, path)


def _remembered_auto(commit: str) -> str | None:
    try:
        return _auto_path(commit).read_text().strip() or None
    except OSError:
        return None
