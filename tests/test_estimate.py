"""A model's memory from its GGUF header, and the free memory the fleet decides against."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.gguf import LLAMA_KV, LLAMA_TENSORS, make_gguf

from llamactl.models import estimate as est
from llamactl.models.gguf import read_gguf

pytestmark = pytest.mark.unit

MIB = 1 << 20


def test_estimate_is_weights_plus_kv_for_the_context_plus_compute(tmp_path: Path) -> None:
    kv = {
        **LLAMA_KV,
        "llama.block_count": 4,
        "llama.embedding_length": 64,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2,
    }
    path = tmp_path / "m.gguf"
    path.write_bytes(make_gguf(kv, LLAMA_TENSORS))
    info = read_gguf(path)
    e = est.estimate(info, ["-c", "1024"])
    head_dim = 64 // 8
    assert e.weights == info.size_bytes - info.data_offset
    assert e.ctx == 1024 and e.kv_cache == 4 * 1024 * 2 * (head_dim + head_dim) * 2
    assert e.compute == 512 * (1000 + 8 * 64) * 4
    assert e.total == e.weights + e.kv_cache + e.compute
    # no -c: the trained context; a q8_0 cache is about half of f16
    assert est.estimate(info).ctx == 4096
    half = est.estimate(info, ["-c", "1024", "-ctk", "q8_0"]).kv_cache
    assert half < e.kv_cache * 0.6 and "MiB" in e.describe()


def test_flag_values_take_the_last_and_the_equals_form() -> None:
    assert est.flag_value(["-c", "512", "--ctx-size=1024"], "-c", "--ctx-size") == "1024"
    assert est.flag_value(["-t", "2"], "-c") is None


def test_environment_settings_count_and_flags_win_over_them() -> None:
    env = {"LLAMA_ARG_CTX_SIZE": "512", "LLAMA_ARG_THREADS": "2"}
    assert est.env_as_flags(env) == ("--ctx-size", "512")
    args = (*est.env_as_flags(env), "-c", "1024")
    assert est.flag_value(args, "-c", "--ctx-size") == "1024"
