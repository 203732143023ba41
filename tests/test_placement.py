"""Where a model's llama-server runs: free memory per GPU from a recorded nvidia-smi (through
build/hardware.py's probe seam), read at most once a second; whether the user chose devices;
the flag and environment of a placed instance. Pure, or on recorded probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.build import hardware as hw
from llamactl.build.detection import GpuMemory, parse_nvidia_smi_memory
from llamactl.serve import placement
from llamactl.serve.placement import cpu_threads
from llamactl.serve.router import Gpu

pytestmark = pytest.mark.unit

PROBES = Path(__file__).parent / "fixtures" / "probes"
MIB = 1 << 20


def test_nvidia_smi_memory_is_parsed_and_replayed_from_the_recorded_machine() -> None:
    assert parse_nvidia_smi_memory("0, 20596, 24576\n1, [N/A], [N/A]\n\n") == [
        GpuMemory(0, 20596, 24576)
    ]
    found = hw.gpu_memory(hw.RecordedProber(PROBES / "nvidia-3090-4090"))
    assert found == [GpuMemory(0, 20596, 24576), GpuMemory(1, 3410, 24564)]
    # The detection probe of the same machine still reads its own recording.
    assert len(hw.detect(hw.RecordedProber(PROBES / "nvidia-3090-4090")).gpus) == 2
    assert hw.gpu_memory(hw.RecordedProber(PROBES / "cpu-x86_64")) is None


@pytest.mark.parametrize(
    ("args", "env", "why"),
    [
        ((), {}, None),
        (("-c", "512", "-ngl", "99"), {}, None),
        (("--device", "CUDA1"), {}, "--device given"),
        (("-dev=CUDA0,CUDA1",), {}, "-dev given"),
        (("-ts", "3,1"), {}, "-ts given"),
        (("--split-mode", "row"), {}, "--split-mode given"),
        (("-mg", "1"), {}, "-mg given"),
        (("--rpc", "h:50052"), {}, "split over RPC workers"),
        ((), {"CUDA_VISIBLE_DEVICES": "1"}, "CUDA_VISIBLE_DEVICES set"),
        ((), {"LLAMA_ARG_DEVICE": "CUDA0"}, "LLAMA_ARG_DEVICE set"),
        (("-ngl", "0"), {}, "-ngl 0: it runs on the CPU"),
        ((), {"LLAMA_ARG_N_GPU_LAYERS": "0"}, "-ngl 0: it runs on the CPU"),
    ],
)
def test_a_model_whose_devices_the_user_chose_is_left_alone(
    args: tuple[str, ...], env: dict[str, str], why: str | None
) -> None:
    assert placement.user_placed(args, env) == why


def test_a_placed_instance_gets_its_device_by_llama_servers_name() -> None:
    assert placement.device_flags(1) == ("--device", "CUDA1")
    assert placement.device_env() == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert placement.gpu_label(1) == "GPU1 (CUDA1)"


def test_free_memory_is_read_at_most_once_a_second() -> None:
    calls: list[str] = []
    now = [0.0]

    def probe() -> list[Gpu] | None:
        calls.append("gpu")
        return [Gpu(0, 3 * MIB, 8 * MIB), Gpu(1, 4 * MIB, 8 * MIB)]

    def ram() -> int | None:
        calls.append("ram")
        return 100

    cpu = placement.FreeMemory(gpu=False, clock=lambda: now[0], probe=probe, ram=ram)
    assert cpu() == 100 and cpu() == 100 and cpu.gpus() is None and calls == ["ram"]
    now[0] = 1.5
    assert cpu() == 100 and calls == ["ram", "ram"]
    gpu = placement.FreeMemory(gpu=True, clock=lambda: now[0], probe=probe, ram=ram)
    assert gpu() == 7 * MIB and [g.index for g in gpu.gpus() or []] == [0, 1]
    assert calls[-1] == "gpu" and calls.count("gpu") == 1
    none = placement.FreeMemory(gpu=True, clock=lambda: now[0], probe=lambda: None, ram=ram)
    assert none() == 100 and none.gpus() is None  # no nvidia-smi: RAM, nothing placed


def test_free_memory_reads_the_recorded_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hw.FIXTURE_ENV, str(PROBES / "nvidia-3090-4090"))
    free = placement.FreeMemory(gpu=True)
    assert free.gpus() == [Gpu(0, 20596 * MIB, 24576 * MIB), Gpu(1, 3410 * MIB, 24564 * MIB)]
    assert free() == (20596 + 3410) * MIB


@pytest.mark.parametrize(
    ("cpus", "concurrent", "args", "env", "threads"),
    [
        (2, 2, (), {}, 1),
        (16, 3, (), {}, 5),
        (2, 4, (), {}, 1),  # never below one
        (8, 1, (), {}, None),  # one at a time: llama.cpp's default
        (8, 2, ("-t", "6"), {}, None),  # the user's threads
        (8, 2, ("--threads=6",), {}, None),
        (8, 2, (), {"LLAMA_ARG_THREADS": "6"}, None),
    ],
)
def test_cpu_threads_shares_the_cores(
    cpus: int, concurrent: int, args: tuple[str, ...], env: dict[str, str], threads: int | None
) -> None:
    assert cpu_threads(cpus, concurrent, args, env) == threads
