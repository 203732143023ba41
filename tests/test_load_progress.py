"""ps's load progress: the share of the model file a loading llama-server has mapped in (mmap,
the default) or read (without mmap), from /proc, capped until it is ready. Fake numbers and a
fake /proc tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.serve import ps

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("state", "loaded", "total", "expected"),
    [
        ("starting", 0, 1000, 0.0),
        ("starting", 370, 1000, 0.37),
        ("starting", 1000, 1000, ps.LOADING_CAP),  # read whole, not ready yet
        ("starting", 1500, 1000, ps.LOADING_CAP),  # the header read twice, a projector
        ("starting", None, 1000, None),  # /proc says nothing
        ("starting", 10, 0, None),
        ("ready", None, None, 1.0),
        ("backoff", 500, 1000, None),
        ("failed", 500, 1000, None),
    ],
)
def test_progress_is_the_share_loaded_capped_until_ready(
    state: str, loaded: int | None, total: int | None, expected: float | None
) -> None:
    assert ps.load_progress(state, loaded, total) == expected


def test_progress_label_says_share_and_seconds_while_loading() -> None:
    assert ps.progress_label(0.37, "starting", 12.4) == "37% 12s"
    assert ps.progress_label(None, "starting", 3) == "? 3s"
    assert ps.progress_label(1.0, "ready", 99) == "100%"
    assert ps.progress_label(None, "stopped", 99) == "-"


def fake_proc(root: Path, pid: int, smaps: str, rchar: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "smaps").write_text(smaps)
    (d / "io").write_text(f"rchar: {rchar}\nwchar: 0\n")


def test_loaded_bytes_counts_the_models_mapped_pages_or_what_was_read(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    link = tmp_path / "alias.gguf"
    link.symlink_to(model)  # --models-dir names by symlink: the mapping shows the real file
    smaps = (
        f"7f00-7f10 r--p 00000000 08:01 11  {model}\n"
        "Size:  4096 kB\nRss:  1024 kB\nPss:  1024 kB\nVmFlags: rd mr\n"
        "7f10-7f20 r--p 00000000 08:01 12  /usr/lib/libggml.so\n"
        "Rss:  9999 kB\n"
        "7f20-7f30 rw-p 00000000 00:00 0 \n"
        "Rss:  5555 kB\n"
        f"7f30-7f40 r--p 00400000 08:01 11  {model}\n"
        "Rss:  1024 kB\n"
    )
    fake_proc(tmp_path / "proc", 7, smaps, rchar=4096)
    # mmap: 2 MiB mapped in, only the header read
    assert ps.loaded_bytes(7, [str(link)], str(tmp_path / "proc")) == 2048 * 1024
    # --load-mode none: nothing mapped, 3 MB read
    fake_proc(tmp_path / "proc", 8, "7f20-7f30 rw-p 00000000 00:00 0 \nRss:  5555 kB\n", 3_000_000)
    assert ps.loaded_bytes(8, [str(model)], str(tmp_path / "proc")) == 3_000_000
    assert ps.loaded_bytes(9, [str(model)], str(tmp_path / "proc")) is None  # gone


def test_a_split_model_counts_every_part() -> None:
    assert ps.model_files("/m/big-00001-of-00003.gguf") == [
        "/m/big-00001-of-00003.gguf",
        "/m/big-00002-of-00003.gguf",
        "/m/big-00003-of-00003.gguf",
    ]
    assert ps.model_files("/m/one.gguf") == ["/m/one.gguf"]
