"""A small GGUF header reader: metadata and tensor shapes, never the tensor data."""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl.errors import ModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: Arrays longer than this are summarised by type and length (tokenizer vocabularies, merges).
SMALL_ARRAY = 32
#: ggml's GGML_MAX_DIMS; more dimensions than this means the header is garbage.
MAX_DIMS = 4

# GGUF value types (gguf-py constants.GGUFValueType) -> struct format of one element.
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_STRING = 8
_ARRAY = 9
VALUE_TYPE_NAMES: dict[int, str] = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}
_SCALARS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<4sIQQ")  # magic, version, tensor_count, kv_count

# ggml tensor types -> (name, elements per block, bytes per block), from gguf-py's
# GGMLQuantizationType and GGML_QUANT_SIZES (QK_K = 256). Used to check that a file is long
# enough for its tensors, which catches truncated downloads without reading the data.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# general.file_type (llama.cpp's llama_ftype, gguf-py LlamaFileType) -> the name users know.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array, kept as its element type and length only."""

    element_type: str
    length: int

    def __str__(self) -> str:
        return f"[{self.element_type} x {self.length}]"


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says about the model in it."""

    path: Path
    version: int
    size_bytes: int
    tensor_count: int
    metadata: dict[str, Any] = field(compare=False, repr=False)
    parameter_count: int
    #: The most common tensor type by elements, for files without general.file_type.
    dominant_tensor_type: str | None
    data_offset: int

    @property
    def architecture(self) -> str | None:
        """`general.architecture`, e.g. llama."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        """`general.name`, the model's own name."""
        value = self.metadata.get("general.name")
        return value if isinstance(value, str) else None

    @property
    def size_label(self) -> str | None:
        """`general.size_label`, e.g. 135M or 8x7B, when the converter wrote one."""
        value = self.metadata.get("general.size_label")
        return value if isinstance(value, str) else None

    @property
    def file_type(self) -> int | None:
        """`general.file_type` (llama_ftype)."""
        value = self.metadata.get("general.file_type")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def quantization(self) -> str | None:
        """The quantization name (Q4_1, Q4_K_M, F16, ...)."""
        ftype = self.file_type
        if ftype is not None:
            return FILE_TYPES.get(ftype, f"ftype {ftype}")
        # Old converters did not write general.file_type; llama.cpp then guesses from tensors.
        return self.dominant_tensor_type

    @property
    def context_length(self) -> int | None:
        """`<arch>.context_length`: the context the model was trained for."""
        arch = self.architecture
        value = self.metadata.get(f"{arch}.context_length") if arch else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def has_chat_template(self) -> bool:
        """Whether `tokenizer.chat_template` is embedded (llama-server uses it for /v1/chat)."""
        return isinstance(self.metadata.get("tokenizer.chat_template"), str)


#: The names llama.cpp's gguf-split gives the parts of one model: `<prefix>-00001-of-00003`.
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)


def model_name(path: Path) -> str:
    """The name a model file goes by: its stem, without a split's `-0000N-of-0000M`."""
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.stem
    m = SPLIT_NAME.match(stem)
    return m["prefix"] if m else stem


def format_count(n: int | None) -> str:
    """135M, 7.2B: a parameter count as people write it."""
    if not n:
        return "-"
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return str(n)


class _Truncated(Exception):
    """Internal: the header runs past the end of the file."""


class _Header:
    """One pass over the header bytes of an open file."""

    def __init__(self, buf: memoryview | bytes, path: Path) -> None:
        self.buf = buf
        self.end = len(buf)
        self.path = path

    def bad(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: corrupt GGUF header ({what})")

    def string(self, pos: int) -> tuple[str, int]:
        (n,) = _U64.unpack_from(self.buf, pos)
        pos += 8
        if pos + n > self.end:
            raise _Truncated
        return bytes(self.buf[pos : pos + n]).decode("utf-8", "replace"), pos + n

    def skip_strings(self, pos: int, count: int) -> int:
        # The hot loop of the whole reader: a vocabulary holds ~50k-250k strings, and each
        # string's length must be read to find the next. Bound to locals for speed.
        unpack = _U64.unpack_from
        buf = self.buf
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        if pos > self.end:
            raise _Truncated
        return pos

    def value(self, vtype: int, pos: int) -> tuple[Any, int]:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            (v,) = scalar.unpack_from(self.buf, pos)
            return v, pos + scalar.size
        if vtype == _STRING:
            return self.string(pos)
        if vtype == _ARRAY:
            return self.array(pos)
        raise self.bad(f"unknown value type {vtype} at byte {pos}")

    def array(self, pos: int) -> tuple[Any, int]:
        (etype,) = _U32.unpack_from(self.buf, pos)
        (count,) = _U64.unpack_from(self.buf, pos + 4)
        pos += 12
        scalar = _SCALARS.get(etype)
        if scalar is not None:
            size = scalar.size * count
            if pos + size > self.end:
                raise _Truncated
            if count > SMALL_ARRAY:
                return ArraySummary(VALUE_TYPE_NAMES[etype], count), pos + size
            fmt = f"<{count}{_SCALAR_FORMATS[etype]}"
            return list(struct.unpack_from(fmt, self.buf, pos)), pos + size
        if etype == _STRING:
            if count > SMALL_ARRAY:
                return ArraySummary("string", count), self.skip_strings(pos, count)
            items = []
            for _ in range(count):
                item, pos = self.string(pos)
                items.append(item)
            return items, pos
        if etype == _ARRAY:
            # Nested arrays are legal in the spec though no model uses them: walk, keep length.
            if count > self.end:
                raise _Truncated
            items = []
            for _ in range(count):
                item, pos = self.array(pos)
                items.append(item)
            if count > SMALL_ARRAY:
                return ArraySummary("array", count), pos
            return items, pos
        raise self.bad(f"unknown array element type {etype} at byte {pos}")


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's metadata and tensor shapes; ModelError if it is not a whole GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEAD.size:
                head = f.read(4)
                if head and not GGUF_MAGIC.startswith(head[:4]):
                    raise _not_gguf(path, head)
                raise ModelError(f"{path}: truncated GGUF file ({size} bytes)")
            # mmap touches only the header pages: a 100 GB model costs the same as a 100 MB one.
            # A memoryview over it unpacks ~30% faster than the mmap object itself.
            with (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
                memoryview(mm) as buf,
            ):
                return _parse(buf, path, size)
    except ModelError:
        raise
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _not_gguf(path: Path, head: bytes) -> ModelError:
    return ModelError(
        f"{path}: not a GGUF file (starts with {head[:4]!r}, not b'GGUF')",
        hint="llama.cpp loads only GGUF; convert other formats with its convert_hf_to_gguf.py",
    )


def _parse(buf: memoryview | bytes, path: Path, size: int) -> GGUFInfo:
    magic, version, tensor_count, kv_count = _HEAD.unpack_from(buf, 0)
    if magic != GGUF_MAGIC:
        raise _not_gguf(path, magic)
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise ModelError(f"{path}: big-endian GGUF (version {version >> 24}) is not supported")
        raise ModelError(
            f"{path}: GGUF version {version} is not supported (llamactl reads versions 2 and 3)"
        )
    h = _Header(buf, path)
    # Each entry needs at least a key length, a type and a value: larger counts mean garbage.
    if kv_count > size // 13 or tensor_count > size // 24:
        raise ModelError(
            f"{path}: truncated or corrupt GGUF file "
            f"({kv_count} keys and {tensor_count} tensors cannot fit in {size} bytes)"
        )
    try:
        pos = _HEAD.size
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = h.string(pos)
            (vtype,) = _U32.unpack_from(buf, pos)
            metadata[key], pos = h.value(vtype, pos + 4)

        parameters = 0
        extent = 0  # bytes of tensor data the file must hold after data_offset
        known_extent = True
        by_type: dict[int, int] = {}
        for _ in range(tensor_count):
            (n,) = _U64.unpack_from(buf, pos)
            pos += 8 + n
            (n_dims,) = _U32.unpack_from(buf, pos)
            if n_dims > MAX_DIMS:
                raise h.bad(f"tensor with {n_dims} dimensions at byte {pos}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            elements = 1
            for d in dims:
                elements *= d
            parameters += elements
            by_type[ttype] = by_type.get(ttype, 0) + elements
            layout = GGML_TYPES.get(ttype)
            if layout is None:
                known_extent = False
            else:
                extent = max(extent, offset + elements // layout[1] * layout[2])
    except (_Truncated, struct.error, OverflowError):
        # OverflowError: a garbage length sends the offset past what unpack_from accepts.
        raise ModelError(
            f"{path}: truncated GGUF file: the header runs past the end ({size} bytes)",
            hint="an interrupted download? pull it again",
        ) from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_offset = -(-pos // alignment) * alignment
    if tensor_count and known_extent and data_offset + extent > size:
        raise ModelError(
            f"{path}: truncated GGUF file: its tensors need {data_offset + extent} bytes, "
            f"the file has {size}",
            hint="an interrupted download? pull it again",
        )
    dominant = None
    if by_type:
        # By elements, so the bulk of the weights names it and small F32 norms do not.
        ttype = max(by_type, key=lambda t: by_type[t])
        dominant = GGML_TYPES.get(ttype, (f"type {ttype}", 0, 0))[0]
    return GGUFInfo(
        path=path,
        version=version,
        size_bytes=size,
        tensor_count=tensor_count,
        metadata=metadata,
        parameter_count=parameters,
        dominant_tensor_type=dominant,
        data_offset=data_offset,
    )
