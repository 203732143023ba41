"""serve's start line says how many layers went to which GPU, from llama-server's load log
(issue 15). The logs are written from the format strings of the vendored llama.cpp
(src/llama.cpp `using device`, src/llama-model.cpp `offloaded`, `model buffer size`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.serve.loadlog import offload_summary

pytestmark = pytest.mark.unit

LOGS = Path(__file__).parent / "fixtures" / "loadlogs"


def test_full_offload_to_one_gpu_names_it() -> None:
    lines = (LOGS / "cuda-h200-ngl999.log").read_text().splitlines()
    assert offload_summary(lines) == "31/31 layers on the GPU (CUDA0 NVIDIA H200: 86 MiB)"


def test_partial_offload_over_two_gpus_names_each() -> None:
    lines = (LOGS / "cuda-2gpu-partial.log").read_text().splitlines()
    assert offload_summary(lines) == (
        "40/81 layers on the GPU (CUDA0 NVIDIA GeForce RTX 3090: 17000 MiB, "
        "CUDA1 NVIDIA GeForce RTX 4090: 17500 MiB)"
    )


def test_no_offload_line_is_no_claim() -> None:
    # A CPU-only build prints no offload line: serve's own note says -ngl has no effect.
    assert offload_summary(["load_tensors:   CPU_Mapped model buffer size =    98.00 MiB"]) is None
    assert offload_summary([]) is None


def test_zero_layers_says_so() -> None:
    lines = ["load_tensors: offloaded 0/31 layers to GPU"]
    assert offload_summary(lines) == "0/31 layers on the GPU (none offloaded: raise -ngl)"


def test_a_reload_counts_only_the_last_load() -> None:
    lines = (LOGS / "cuda-h200-ngl999.log").read_text().splitlines() * 2
    assert offload_summary(lines) == "31/31 layers on the GPU (CUDA0 NVIDIA H200: 86 MiB)"
