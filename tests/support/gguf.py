"""Synthetic GGUF files for tests: a writer for every value type and a small llama-shaped
header (tests of the reader, the catalog and the memory estimate share it)."""

from __future__ import annotations

import struct
from typing import Any

from llamactl.models.gguf import GGML_TYPES

# GGUF value type ids (gguf-py GGUFValueType).
TYPES = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7}
TYPES.update({"str": 8, "arr": 9, "u64": 10, "i64": 11, "f64": 12})
FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
FORMATS[12] = "d"


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _typed(v: Any) -> tuple[int, Any]:
    """(type id, value) for a plain Python value, or an explicit ("u8", 3) pair."""
    if isinstance(v, tuple):
        return TYPES[v[0]], v[1]
    if isinstance(v, bool):
        return TYPES["bool"], v
    if isinstance(v, int):
        return TYPES["u32"] if 0 <= v < 2**32 else TYPES["i64"], v
    if isinstance(v, float):
        return TYPES["f32"], v
    if isinstance(v, str):
        return TYPES["str"], v
    if isinstance(v, list):
        return TYPES["arr"], v
    raise TypeError(v)


def _payload(t: int, v: Any) -> bytes:
    if t == TYPES["str"]:
        return _str(v)
    if t == TYPES["arr"]:
        et, _ = _typed(v[0]) if v else (TYPES["u8"], None)
        items = [_typed(x)[1] for x in v]
        return struct.pack("<IQ", et, len(v)) + b"".join(_payload(et, x) for x in items)
    return struct.pack("<" + FORMATS[t], v)


def make_gguf(
    kv: dict[str, Any],
    tensors: list[tuple[str, tuple[int, ...], int]] = (),  # type: ignore[assignment]
    *,
    version: int = 3,
    alignment: int = 32,
) -> bytes:
    """A complete GGUF file: header, tensor infos, padding, zeroed tensor data."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kv))]
    for key, value in kv.items():
        t, v = _typed(value)
        out += [_str(key), struct.pack("<I", t), _payload(t, v)]
    offset = 0
    for name, dims, ttype in tensors:
        _, block, nbytes = GGML_TYPES[ttype]
        elements = 1
        for d in dims:
            elements *= d
        out += [_str(name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)]
        offset += -(-(elements // block * nbytes) // alignment) * alignment
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    return head + b"\0" * offset


LLAMA_KV: dict[str, Any] = {
    "general.architecture": "llama",
    "general.name": "Tiny Test",
    "general.size_label": "1K",
    "general.file_type": 3,
    "llama.context_length": 4096,
    "tokenizer.ggml.tokens": [f"tok{i}" for i in range(1000)],
    "tokenizer.ggml.token_type": [("i32", 1)] * 100,
    "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "tokenizer.ggml.eos_token_id": 2,
}
LLAMA_TENSORS = [("token_embd.weight", (64, 16), 3), ("output_norm.weight", (64,), 0)]
