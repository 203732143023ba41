"""`llamactl doctor`, driven through click with recorded machines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamactl.build.hardware import FIXTURE_ENV
from llamactl.cli import cli

pytestmark = pytest.mark.unit

PROBES = Path(__file__).parent / "fixtures" / "probes"


def _doctor(case: str, *args: str) -> tuple[int, str]:
    runner = CliRunner()
    env = {FIXTURE_ENV: str(PROBES / case), "COLUMNS": "200"}
    result = runner.invoke(cli, ["doctor", *args], env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_json_has_backend_detection_and_decision() -> None:
    code, out = _doctor("nvidia-3090-4090", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["backend"] == "cuda"
    assert data["decision"]["cuda_architectures"] == ["86", "89"]
    assert [g["compute_capability"] for g in data["detection"]["gpus"]] == ["8.6", "8.9"]
    assert data["detection"]["tools"]["nvcc"]["version"] == "12.6"


def test_json_for_this_machine_kind() -> None:
    code, out = _doctor("nvcc-no-gpu", "--json")
    data = json.loads(out)
    assert code == 0
    assert '"backend": "cpu"' in out
    assert data["decision"]["reason"] == "nvcc 13.0 found but no NVIDIA GPU: CPU"
    assert data["detection"]["tools"]["cublas"]["ok"] is False


def test_table_shows_machine_toolchain_and_reason() -> None:
    code, out = _doctor("nvidia-h100")
    assert code == 0
    for phrase in (
        "AMD EPYC 9454",
        "NVIDIA H100 80GB HBM3",
        "compute 9.0",
        "79.6 GiB",
        "nvcc",
        "12.4",
        "backend: cuda",
        "reason:  NVIDIA H100 80GB HBM3 (compute 9.0) found, nvcc 12.4 found: CUDA",
        "CUDA architectures: 90",
    ):
        assert phrase in out, phrase


def test_table_shows_software_vulkan_as_not_a_gpu_and_hints() -> None:
    code, out = _doctor("vulkan-llvmpipe", "--backend", "vulkan")
    assert code == 0
    assert "llvmpipe" in out and "not a GPU" in out
    assert "backend: vulkan" in out
    assert "hint:" in out and "too old" in out


def test_backend_override_in_json() -> None:
    code, out = _doctor("nvidia-h100", "--json", "--backend", "vulkan")
    data = json.loads(out)
    assert code == 0
    assert data["backend"] == "vulkan"
    assert data["decision"]["requested"] == "vulkan"


def test_probe_problems_are_printed_not_raised() -> None:
    code, out = _doctor("broken-probes")
    assert code == 0
    assert "probe problem:" in out and "nvidia-smi failed" in out


@pytest.mark.parametrize("bad", ["opencl", "CUDA!"])
def test_unknown_backend_is_a_usage_error(bad: str) -> None:
    code, _ = _doctor("cpu-x86_64", "--backend", bad)
    assert code == 2


def test_doctor_names_the_cuda_toolkit_a_build_would_use() -> None:
    # This machine kind: nvcc 13.0 without cuBLAS and no GPU: a CUDA build takes the wheels.
    code, out = _doctor("nvcc-no-gpu")
    assert code == 0
    assert "CUDA toolkit: pypi:" in out and "PyPI wheels" in out
    code, out = _doctor("nvidia-3090-4090", "--json")
    assert json.loads(out)["decision"]["cuda_toolkit"].startswith("system:")
    code, out = _doctor("nvidia-driver-cuda13-no-toolkit", "--json")
    data = json.loads(out)
    assert data["backend"] == "cuda" and data["detection"]["cuda_driver"] == "13.0"
    assert "CUDA 13.0.88 wheels" in data["decision"]["cuda_toolkit"]
