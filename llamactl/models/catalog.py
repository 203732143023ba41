"""The model catalog: the names models go by, listing with header facts, inspect's lookup,
resolving a name or path to the file to serve, and removal. Fetching lives in pull.py."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamactl import paths
from llamactl.errors import ModelError
from llamactl.models.default import (
    DEFAULT_MODEL,
    DefaultModel,
    default_model_path,
    default_model_present,
)
from llamactl.models.gguf import SPLIT_NAME, GGUFInfo, model_name, read_gguf
from llamactl.models.pull import ensure_default_model, file_lock

_INDEX_VERSION = 1

__all__ = [
    "DEFAULT_MODEL",
    "DefaultModel",
    "ModelError",
    "default_model_path",
    "default_model_present",
    "ensure_default_model",
]


# --- listing and names --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One model file as `llamactl models` shows it."""

    name: str
    path: Path
    size_bytes: int
    pulled: bool
    default: bool
    architecture: str | None = None
    title: str | None = None
    parameter_count: int | None = None
    size_label: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    chat_template: bool = False
    gguf_version: int | None = None
    parts: int = 1
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class _Found:
    name: str
    path: Path
    parts: tuple[Path, ...]
    pulled: bool


def model_dirs() -> list[Path]:
    """The models cache first, then LLAMACTL_MODEL_DIRS (os.pathsep separated)."""
    dirs = [paths.models_dir()]
    for entry in os.environ.get("LLAMACTL_MODEL_DIRS", "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()).expanduser())
    return dirs


def _scan() -> list[_Found]:
    """Every .gguf in the model dirs (top level and one folder down), no file opened."""
    found: list[_Found] = []
    seen: set[Path] = set()
    for index, root in enumerate(model_dirs()):
        files: list[Path] = []
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.name.endswith(".gguf") and entry.is_file():
                files.append(Path(entry.path))
            elif entry.is_dir():
                # One level down covers the usual <model>/<file>.gguf layout without walking
                # whole disks when someone points LLAMACTL_MODEL_DIRS at a home folder.
                try:
                    sub = sorted(os.scandir(entry.path), key=lambda e: e.name)
                except OSError:
                    continue
                files += [
                    Path(e.path)
                    for e in sub
                    if e.name.endswith(".gguf") and not e.name.startswith(".") and e.is_file()
                ]
        splits: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
        for path in files:
            m = SPLIT_NAME.match(path.name[: -len(".gguf")])
            if m:
                splits.setdefault((path.parent, m["prefix"]), []).append((int(m["index"]), path))
                continue
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(_Found(model_name(path), path, (path,), pulled=index == 0))
        for (_, prefix), numbered in splits.items():
            numbered.sort()
            first = numbered[0][1]
            # llama.cpp opens a split through its first part and finds the rest itself.
            if numbered[0][0] == 1 and first.resolve() not in seen:
                seen.add(first.resolve())
                parts = tuple(p for _, p in numbered)
                found.append(_Found(prefix, first, parts, pulled=index == 0))
    return found


def _index_path() -> Path:
    return paths.cache_dir() / "models-index.json"


def _load_index() -> dict[str, Any]:
    try:
        data = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _INDEX_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save_index(entries: dict[str, Any]) -> None:
    path = _index_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _INDEX_VERSION, "entries": entries}))
        os.replace(tmp, path)
    except OSError:
        # A read-only cache only costs speed: the headers are read again next time.
        with contextlib.suppress(OSError):
            tmp.unlink()


def _stamp(parts: tuple[Path, ...]) -> list[list[int]]:
    stamps = []
    for p in parts:
        st = p.stat()
        stamps.append([st.st_size, st.st_mtime_ns, st.st_ino])
    return stamps


def _summarize(found: _Found) -> dict[str, Any]:
    """The header facts listing needs, from every part of the model."""
    try:
        infos: list[GGUFInfo] = [read_gguf(p) for p in found.parts]
    except ModelError as exc:
        return {"error": exc.message}
    first = infos[0]
    return {
        "architecture": first.architecture,
        "title": first.name,
        "parameter_count": sum(i.parameter_count for i in infos),
        "size_label": first.size_label,
        "quantization": first.quantization,
        "context_length": first.context_length,
        "chat_template": first.has_chat_template,
        "gguf_version": first.version,
    }


def list_models() -> list[ModelInfo]:
    """Every model in the models cache and the configured model dirs, with header facts."""
    # Header facts are kept in an index keyed by (size, mtime, inode) of each file: a
    # vocabulary of 150k+ strings takes tens of ms to walk, so a folder of big models would
    # otherwise take seconds; a changed or replaced file gets a new stamp and is read again.
    index = _load_index()
    fresh: dict[str, Any] = {}
    out = []
    default_path = default_model_path()
    for found in _scan():
        try:
            stamp = _stamp(found.parts)
        except OSError:
            continue  # removed while we looked
        key = str(found.path)
        entry = index.get(key)
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            entry = {"stamp": stamp, "summary": _summarize(found)}
        fresh[key] = entry
        summary = {k: v for k, v in entry["summary"].items() if k in ModelInfo.__dataclass_fields__}
        out.append(
            ModelInfo(
                name=found.name,
                path=found.path,
                size_bytes=sum(s[0] for s in stamp),
                pulled=found.pulled,
                default=found.path == default_path,
                parts=len(found.parts),
                **summary,
            )
        )
    if fresh != index:
        _save_index(fresh)
    return out


def _check_name(name: str) -> str:
    """A model name from a user; refused if it could point outside the model dirs."""
    if (
        not name
        or "/" in name
        or "\\" in name
        or os.sep in name
        or "\0" in name
        or name in (".", "..")
        or name.startswith(".")
    ):
        raise ModelError(f"{name!r} is not a model name (names have no path separators or '..')")
    return name


def _match(name: str, found: list[_Found]) -> _Found | None:
    wanted = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    for f in found:
        if f.name.casefold() == wanted.casefold() or f.path.name.casefold() == name.casefold():
            return f
    return None


def _known_names(found: list[_Found]) -> str:
    names = [f.name for f in found]
    if not any(f.path == default_model_path() for f in found):
        names.append(f"{DEFAULT_MODEL.name} (the default; fetched on first use)")
    return ", ".join(names) or "none"


def resolve_model(name_or_path: str | os.PathLike[str], *, paths_allowed: bool = True) -> Path:
    """The file to serve for a path or a model name; fetches the default model if named.

    A path is taken as given: it comes from the user's own command line. With
    `paths_allowed=False` (for a name that came in a request) only the name of a .gguf found
    in the model dirs is accepted: anything that could point elsewhere (separators, `..`, a
    leading dot, NUL) is refused unlooked-at, and nothing is fetched."""
    raw = os.fspath(name_or_path)
    if not paths_allowed:
        _check_name(raw)
    else:
        path = Path(raw).expanduser()
        if path.exists():
            if not path.is_file():
                raise ModelError(f"{path} is not a file")
            return path
        if raw.casefold() == DEFAULT_MODEL.name.casefold():
            return ensure_default_model()
    looks_like_path = "/" in raw or "\\" in raw or os.sep in raw or raw.startswith(".")
    if looks_like_path:
        raise ModelError(f"no such model file: {raw}")
    _check_name(raw)
    found = _scan()
    match = _match(raw, found)
    if match is None:
        raise ModelError(
            f"unknown model {raw!r}",
            hint=f"models here: {_known_names(found)}; or `llamactl pull SOURCE`",
        )
    return match.path


def pulled_files(name: str) -> list[Path]:
    """The files `remove_model(name)` would delete; ModelError if none are llamactl's."""
    if name.casefold() == DEFAULT_MODEL.name.casefold():
        name = model_name(default_model_path())
    _check_name(name)
    found = _scan()
    match = _match(name, [f for f in found if f.pulled])
    if match is None:
        other = _match(name, found)
        if other is not None:
            raise ModelError(
                f"{other.path} is not in llamactl's models cache; llamactl only removes what it "
                "pulled",
                hint="delete it yourself if you mean to",
            )
        raise ModelError(f"unknown model {name!r}", hint=f"models here: {_known_names(found)}")
    return list(match.parts)


def remove_model(name: str) -> list[Path]:
    """Delete a pulled model (all parts of a split) from the models cache; returns the files."""
    removed = []
    for part in pulled_files(name):
        # Under the pull lock: a pull of the same file in progress finishes first.
        with file_lock(part, timeout=5.0):
            part.unlink(missing_ok=True)
            (paths.downloads_dir() / f"{part.name}.part").unlink(missing_ok=True)
        removed.append(part)
    return removed
