"""The GGUF header reader on synthetic files: every value type, arrays, versions, damage."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from support.gguf import LLAMA_KV, LLAMA_TENSORS, make_gguf

from llamactl.errors import ModelError
from llamactl.models.gguf import ArraySummary, format_count, read_gguf
from llamactl.paths import REPO_DIR

pytestmark = pytest.mark.unit


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("version", [2, 3])
def test_reads_header_facts(tmp_path: Path, version: int) -> None:
    path = write(tmp_path, make_gguf(LLAMA_KV, LLAMA_TENSORS, version=version))
    info = read_gguf(path)
    assert info.version == version
    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert info.size_label == "1K"
    assert info.parameter_count == 64 * 16 + 64
    assert info.quantization == "Q4_1"
    assert info.context_length == 4096
    assert info.has_chat_template
    assert info.size_bytes == path.stat().st_size
    assert info.tensor_count == 2
    # Keys after the big arrays were reached, so the arrays were skipped by their real length.
    assert info.metadata["tokenizer.ggml.eos_token_id"] == 2
    assert info.data_offset % 32 == 0


def test_big_arrays_are_summarised_small_ones_kept(tmp_path: Path) -> None:
    kv = {
        "a.strings": [f"s{i}" for i in range(1000)],
        "a.ints": [("i32", -i) for i in range(500)],
        "a.small": [("u16", 1), ("u16", 2)],
        "a.words": ["x", "yz"],
        "a.nested": [[("u8", 1), ("u8", 2)], [("u8", 3)]],
        "a.empty": [],
        "after": "still read",
    }
    info = read_gguf(write(tmp_path, make_gguf(kv)))
    assert info.metadata["a.strings"] == ArraySummary("string", 1000)
    assert info.metadata["a.ints"] == ArraySummary("int32", 500)
    assert str(info.metadata["a.ints"]) == "[int32 x 500]"
    assert info.metadata["a.small"] == [1, 2]
    assert info.metadata["a.words"] == ["x", "yz"]
    assert info.metadata["a.nested"] == [[1, 2], [3]]
    assert info.metadata["a.empty"] == []
    assert info.metadata["after"] == "still read"


def test_every_scalar_type(tmp_path: Path) -> None:
    kv = {
        "u8": ("u8", 255),
        "i8": ("i8", -128),
        "u16": ("u16", 65535),
        "i16": ("i16", -32768),
        "u32": ("u32", 2**32 - 1),
        "i32": ("i32", -(2**31)),
        "f32": ("f32", 0.5),
        "bool": ("bool", True),
        "u64": ("u64", 2**64 - 1),
        "i64": ("i64", -(2**63)),
        "f64": ("f64", 1e300),
        "str": ("str", "héllo"),
    }
    info = read_gguf(write(tmp_path, make_gguf(kv)))
    assert info.metadata == {k: v[1] for k, v in kv.items()}


def test_missing_optional_keys(tmp_path: Path) -> None:
    # No file_type: the quantization is named from the tensor type holding most weights.
    tensors = [("blk.0.w", (256, 8), 12), ("norm", (256,), 0)]
    info = read_gguf(write(tmp_path, make_gguf({"general.architecture": "qwen2"}, tensors)))
    assert info.quantization == "Q4_K"
    assert info.context_length is None
    assert info.name is None
    assert not info.has_chat_template


def test_vocab_only_file_has_no_parameters(tmp_path: Path) -> None:
    info = read_gguf(write(tmp_path, make_gguf({"general.architecture": "llama"})))
    assert info.parameter_count == 0
    assert info.quantization is None


def test_every_truncation_is_a_model_error(tmp_path: Path) -> None:
    data = make_gguf(LLAMA_KV, LLAMA_TENSORS)
    path = tmp_path / "cut.gguf"
    # Every cut, in the header and in the tensor data, is reported, never crashes.
    for cut in [*range(0, 200), *range(200, len(data), 7)]:
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated"):
            read_gguf(path)


def test_not_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf(write(tmp_path, b"<html>Not Found</html>" * 10, "page.gguf"))
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf(write(tmp_path, b"PK\3\4", "short.gguf"))
    with pytest.raises(ModelError, match="truncated"):
        read_gguf(write(tmp_path, b"", "empty.gguf"))
    with pytest.raises(ModelError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelError, match="directory"):
        read_gguf(tmp_path)


def test_unsupported_versions(tmp_path: Path) -> None:
    data = make_gguf(LLAMA_KV)
    v1 = data[:4] + struct.pack("<I", 1) + data[8:]
    with pytest.raises(ModelError, match="version 1 is not supported"):
        read_gguf(write(tmp_path, v1))
    big_endian = data[:4] + struct.pack(">I", 3) + data[8:]
    with pytest.raises(ModelError, match="big-endian"):
        read_gguf(write(tmp_path, big_endian))


def test_absurd_counts_are_corrupt(tmp_path: Path) -> None:
    data = make_gguf(LLAMA_KV)
    bad = data[:16] + struct.pack("<Q", 2**40) + data[24:]
    with pytest.raises(ModelError, match="corrupt"):
        read_gguf(write(tmp_path, bad))


def test_random_damage_never_crashes(tmp_path: Path) -> None:
    data = make_gguf(LLAMA_KV, LLAMA_TENSORS)
    header_end = read_gguf(write(tmp_path, data)).data_offset
    rng = random.Random(7)
    path = tmp_path / "damaged.gguf"
    for _ in range(400):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(4, header_end)] = rng.randrange(256)
        path.write_bytes(damaged)
        try:
            read_gguf(path)
        except ModelError:
            pass


def test_format_count() -> None:
    assert format_count(134_515_008) == "135M"
    assert format_count(7_241_732_096) == "7.24B"
    assert format_count(0) == "-"
    assert format_count(999) == "999"


VOCABS = sorted((REPO_DIR / "vendor/llama.cpp/models").glob("ggml-vocab-*.gguf"))


@pytest.mark.skipif(not VOCABS, reason="vendor/llama.cpp is not unpacked")
def test_upstream_vocab_files() -> None:
    # Real files written by upstream's converter: every one parses and names its vocabulary.
    for path in VOCABS:
        info = read_gguf(path)
        assert info.architecture, path
        tokens = info.metadata["tokenizer.ggml.tokens"]
        assert isinstance(tokens, ArraySummary) and tokens.length > 1000, path
