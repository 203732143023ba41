"""Detection and the backend decision: recorded machines, each parser's edge cases, and one
real probe of this machine."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.build import decision as dec
from llamactl.build import detection as facts
from llamactl.build import hardware as hw
from llamactl.build.detection import GPU, Detection, Tool

PROBES = Path(__file__).parent / "fixtures" / "probes"
CASES = sorted(p.name for p in PROBES.iterdir() if (p / "expected.json").exists())

# The machines issue 2 asks fixtures for; a renamed or deleted folder must fail loudly.
REQUIRED = {
    "cpu-x86_64",
    "nvcc-no-gpu",
    "nvidia-h100",
    "nvidia-3090-4090",
    "nvidia-no-nvcc",
    "amd-mi300x",
    "amd-rx7900xtx",
    "vulkan-intel-arc",
    "vulkan-llvmpipe",
    "apple-m2",
}


@pytest.mark.unit
def test_every_required_machine_has_a_fixture() -> None:
    assert set(CASES) >= REQUIRED


@pytest.mark.unit
@pytest.mark.parametrize("case", CASES)
def test_recorded_machine(case: str) -> None:
    expected = json.loads((PROBES / case / "expected.json").read_text())
    detection = hw.detect(hw.RecordedProber(PROBES / case))
    decision = dec.decide(detection)

    assert decision.backend == expected["backend"]
    assert expected["reason"] in decision.reason
    assert list(decision.cuda_architectures) == expected.get("cuda_architectures", [])
    assert list(decision.gpu_targets) == expected.get("gpu_targets", [])
    assert len(detection.gpus) == expected["gpus"]
    assert all(not g.is_software for g in detection.gpus)
    if "hint" in expected:
        assert any(expected["hint"] in h for h in decision.hints), decision.hints
    if "cuda_toolkit" in expected:
        assert decision.cuda_toolkit.startswith(expected["cuda_toolkit"]), decision.cuda_toolkit
    for key in ("cpu_model", "cpu_cores", "cpu_threads", "ram_mib"):
        if key in expected:
            assert getattr(detection, key) == expected[key]
    assert set(expected.get("features_include", [])) <= set(detection.cpu_features)
    if "gpu_memory_mib" in expected:
        assert [g.memory_mib for g in detection.gpus] == expected["gpu_memory_mib"]
    if "vulkan_devices" in expected:
        assert len(detection.vulkan_devices) == expected["vulkan_devices"]
    for name in expected.get("tools_ok", []):
        assert detection.tools[name].ok, detection.tools[name]
    for name in expected.get("tools_missing", []):
        assert not detection.tools[name].ok, detection.tools[name]
    if "npm_version" in expected:
        assert detection.tools["npm"].version == expected["npm_version"]
    problems = " | ".join(detection.problems)
    for phrase in expected.get("problems_include", []):
        assert phrase in problems
    if "problems_include" not in expected:
        assert detection.problems == ()


@pytest.mark.unit
@pytest.mark.parametrize("case", CASES)
def test_every_backend_can_be_requested(case: str) -> None:
    detection = hw.detect(hw.RecordedProber(PROBES / case))
    for backend in facts.BACKENDS:
        decision = dec.decide(detection, backend)
        assert decision.backend == backend
        assert decision.requested == backend
        assert "requested" in decision.reason


# --------------------------------------------------------------------------- the decision


def _machine(**overrides: object) -> Detection:
    tools = {
        "cmake": Tool("cmake", "/usr/bin/cmake", "3.28.3", True),
        "cxx": Tool("cxx", "/usr/bin/c++", "gcc 13.3.0", True),
        "nvcc": Tool("nvcc", "/usr/local/cuda/bin/nvcc", "12.4", True),
        "cublas": Tool("cublas", "/usr/local/cuda/include/cublas_v2.h", ok=True),
    }
    base = Detection(os="linux", arch="x86_64", tools=tools)
    return replace(base, **overrides)  # type: ignore[arg-type]


def _nvidia(cc: str, name: str = "NVIDIA GPU", index: int = 0) -> GPU:
    return GPU(index, "nvidia", name, compute_capability=cc, api="cuda")


@pytest.mark.unit
def test_cuda_architectures_are_deduplicated_and_numerically_sorted() -> None:
    gpus = (_nvidia("12.0"), _nvidia("9.0"), _nvidia("8.6"), _nvidia("9.0"), _nvidia("12.1"))
    decision = dec.decide(_machine(gpus=gpus))
    assert decision.backend == "cuda"
    assert decision.cuda_architectures == ("86", "90", "120a-real", "121a-real")


@pytest.mark.unit
def test_identical_gpus_are_counted_in_the_reason() -> None:
    gpus = tuple(_nvidia("9.0", "NVIDIA H100 80GB HBM3", i) for i in range(8))
    decision = dec.decide(_machine(gpus=gpus))
    assert decision.reason == "8x NVIDIA H100 80GB HBM3 (compute 9.0) found, nvcc 12.4 found: CUDA"


@pytest.mark.unit
def test_nvcc_without_cublas_is_not_a_cuda_toolkit() -> None:
    tools = dict(_machine().tools)
    tools["cublas"] = Tool("cublas", note="cublas_v2.h not found")
    decision = dec.decide(_machine(gpus=(_nvidia("9.0"),), tools=tools))
    assert decision.backend == "cpu"
    assert "no cuBLAS" in decision.reason
    assert any("libcublas-dev-12-4" in h for h in decision.hints)


@pytest.mark.unit
def test_host_compiler_newer_than_nvcc_supports_gives_a_hint() -> None:
    tools = dict(_machine().tools)
    tools["cxx"] = Tool("cxx", "/usr/bin/c++", "gcc 14.2.0", True)
    decision = dec.decide(_machine(gpus=(_nvidia("8.9"),), tools=tools))
    assert decision.backend == "cuda"
    assert any("CUDAHOSTCXX=g++-13" in h for h in decision.hints)


@pytest.mark.unit
def test_cuda_13_and_a_pascal_card_gives_a_hint() -> None:
    tools = dict(_machine().tools)
    tools["nvcc"] = Tool("nvcc", "/usr/local/cuda/bin/nvcc", "13.0", True)
    decision = dec.decide(_machine(gpus=(_nvidia("6.1", "NVIDIA GeForce GTX 1080"),), tools=tools))
    assert decision.cuda_architectures == ("61",)
    assert any("compute < 7.5" in h for h in decision.hints)


@pytest.mark.unit
def test_explicit_request_wins_and_explains_what_is_missing() -> None:
    detection = hw.detect(hw.RecordedProber(PROBES / "nvcc-no-gpu"))
    decision = dec.decide(detection, "cuda")
    assert decision.backend == "cuda"
    assert any("cuBLAS" in h for h in decision.hints)
    assert any("architectures explicitly" in h for h in decision.hints)
    vulkan = dec.decide(detection, "vulkan")
    assert any("glslc" in h for h in vulkan.hints)


@pytest.mark.unit
def test_explicit_cpu_on_a_cuda_machine_is_honoured() -> None:
    detection = hw.detect(hw.RecordedProber(PROBES / "nvidia-h100"))
    decision = dec.decide(detection, "cpu")
    assert decision.backend == "cpu"
    assert decision.cuda_architectures == ("90",)  # still known, for a later --backend cuda


@pytest.mark.unit
def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        dec.decide(_machine(), "opencl-ish")


@pytest.mark.unit
def test_old_vulkan_headers_block_vulkan_and_name_the_minimum() -> None:
    detection = hw.detect(hw.RecordedProber(PROBES / "vulkan-intel-arc"))
    tools = dict(detection.tools)
    tools["vulkan-headers"] = Tool(
        "vulkan-headers", "/usr/include/vulkan/vulkan_core.h", "1.3.239", False, "too old"
    )
    decision = dec.decide(replace(detection, tools=tools))
    assert decision.backend == "cpu"
    assert "Vulkan toolchain is incomplete" in decision.reason
    assert any(f"1.3.{facts.VULKAN_MIN_HEADER}" in h for h in decision.hints)


@pytest.mark.unit
def test_decide_is_pure() -> None:
    detection = hw.detect(hw.RecordedProber(PROBES / "amd-mi300x"))
    assert dec.decide(detection) == dec.decide(detection)


# --------------------------------------------------------------------------- parsers


@pytest.mark.unit
def test_nvidia_smi_rows_and_garbage() -> None:
    text = (
        "0, NVIDIA H100 80GB HBM3, 81559, 550.54.15, 9.0\n"
        "1, NVIDIA A100-SXM4-40GB, [N/A], [N/A], [N/A]\n"
        "Unable to determine the device handle for GPU0000:41:00.0: Unknown Error\n"
        "\n"
    )
    gpus = facts.parse_nvidia_smi(text)
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]
    assert gpus[0].memory_mib == 81559 and gpus[0].compute_capability == "9.0"
    assert gpus[1].memory_mib is None and gpus[1].driver is None
    assert gpus[1].compute_capability is None
    # Drivers before 510 do not know compute_cap and say so instead of answering.
    assert facts.parse_nvidia_smi('Field "compute_cap" is not a valid field to query.\n') == []
    assert facts.parse_nvidia_smi("") == []


@pytest.mark.unit
def test_rocminfo_skips_cpu_agents_and_garbage() -> None:
    assert facts.parse_rocminfo("") == []
    assert facts.parse_rocminfo("Agent 1\n  Name: x\n  Device Type: DSP\n") == []
    text = (PROBES / "amd-rx7900xtx" / "run" / "rocminfo.txt").read_text()
    (gpu,) = facts.parse_rocminfo(text)
    assert (gpu.name, gpu.gfx_target, gpu.driver) == ("Radeon RX 7900 XTX", "gfx1100", "6.7.0")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "target"),
    [(90402, "gfx942"), (110000, "gfx1100"), (100300, "gfx1030"), (90010, "gfx90a"), (0, None)],
)
def test_gfx_target_version(value: int, target: str | None) -> None:
    assert facts.gfx_from_target_version(value) == target


@pytest.mark.unit
def test_kfd_properties_ignore_junk_lines() -> None:
    props = facts.parse_kfd_properties("gfx_target_version 110000\njunk\nname with spaces x\n")
    assert props == {"gfx_target_version": 110000}


@pytest.mark.unit
def test_vulkaninfo_marks_software_devices() -> None:
    text = (
        "Devices:\n========\nGPU0:\n\tvendorID = 0x1ae0\n\tdeviceType = PHYSICAL_DEVICE_TYPE_CPU\n"
        "\tdeviceName = SwiftShader Device (Subzero)\n"
        "GPU1:\n\tvendorID = 0x1002\n\tdeviceType = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU\n"
        "\tdeviceName = AMD Radeon RX 7900 XTX (RADV NAVI31)\n\tdriverInfo = Mesa 24.0.9\n"
    )
    soft, amd = facts.parse_vulkaninfo_summary(text)
    assert soft.is_software and not amd.is_software
    assert amd.vendor == "amd" and amd.driver == "Mesa 24.0.9"
    assert facts.parse_vulkaninfo_summary("ERROR: [Loader Message] Code 0 : vkCreateInstance") == []
    assert facts.parse_vulkaninfo_summary("Devices:\nGPU0:\n\tvendorID = zz\n") == []


@pytest.mark.unit
def test_vulkan_header_version() -> None:
    text = (PROBES / "vulkan-llvmpipe" / "fs/usr/include/vulkan/vulkan_core.h").read_text()
    assert facts.parse_vulkan_header(text) == (239, "1.3.239")
    assert facts.parse_vulkan_header("#define VK_HEADER_VERSION 290\n") == (290, "290")
    assert facts.parse_vulkan_header("nothing here") == (None, None)


@pytest.mark.unit
def test_sycl_ls_lists_each_gpu_once() -> None:
    text = (
        "[opencl:cpu][opencl:0] Intel(R) OpenCL, Intel(R) Core(TM) i7-12700K OpenCL 3.0 (Build 0) "
        "[2024.18.6.0.02_160000]\n"
        "[opencl:gpu][opencl:1] Intel(R) OpenCL Graphics, Intel(R) Arc(TM) A770 Graphics "
        "OpenCL 3.0 NEO  [24.13.29138.7]\n"
        "[level_zero:gpu][level_zero:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics "
        "1.3 [1.3.29138]\n"
    )
    gpus = facts.parse_sycl_ls(text)
    assert [g.name for g in gpus] == ["Intel(R) Arc(TM) A770 Graphics"]
    assert gpus[0].vendor == "intel"
    assert facts.parse_sycl_ls("garbage\n[x:gpu]") == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cc (Debian 12.2.0-14+deb12u1) 12.2.0\n", ("gcc", "12.2.0")),
        ("gcc-13 (Homebrew GCC 13.2.0) 13.2.0\n", ("gcc", "13.2.0")),
        (
            "Ubuntu clang version 18.1.3 (1ubuntu1)\nTarget: x86_64-pc-linux-gnu\n",
            ("clang", "18.1.3"),
        ),
        ("Apple clang version 15.0.0 (clang-1500.3.9.4)\n", ("apple-clang", "15.0.0")),
        ("", (None, None)),
        ("\x00\x01 binary junk", (None, None)),
    ],
)
def test_compiler_versions(text: str, expected: tuple[str | None, str | None]) -> None:
    assert facts.parse_cc_version(text) == expected


@pytest.mark.unit
def test_nvcc_version() -> None:
    assert facts.parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88") == "13.0"
    assert facts.parse_nvcc_version("nvcc fatal : No input files specified") is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cc", "arch"),
    [
        ("9.0", "90"),
        ("8.6", "86"),
        ("7.5", "75"),
        ("12.0", "120a-real"),
        ("12.1", "121a-real"),
        ("10.0", "100"),
        ("", None),
        ("[N/A]", None),
    ],
)
def test_cuda_arch(cc: str, arch: str | None) -> None:
    assert facts.cuda_arch(cc) == arch


@pytest.mark.unit
def test_cpuinfo_edge_cases() -> None:
    assert facts.parse_cpuinfo("") == facts.CpuInfo()
    assert facts.parse_cpuinfo("no colons at all\n\x00") == facts.CpuInfo()
    # No core ids (some VMs): cores come from "cpu cores", not from the thread count.
    text = "processor : 0\ncpu cores : 1\nflags : sse2 avx avx2\nprocessor : 1\ncpu cores : 1\n"
    info = facts.parse_cpuinfo(text)
    assert (info.cores, info.threads, info.features) == (1, 2, ("avx", "avx2"))


@pytest.mark.unit
def test_meminfo_sysctl_and_vm_stat_edge_cases() -> None:
    assert facts.parse_meminfo("MemTotal: 2048 kB\nMemFree: 1024 kB\n") == (2, 1)
    assert facts.parse_meminfo("garbage") == (None, None)
    values = facts.parse_sysctl("hw.memsize: 17179869184\nsysctl: unknown oid 'x'\nnot a line\n")
    assert values["hw.memsize"] == "17179869184"
    assert facts.cpu_from_sysctl({"hw.physicalcpu": "many"}).cores is None
    assert facts.parse_vm_stat("Pages free: 1.\n") is None


# --------------------------------------------------------------------------- probes


@pytest.mark.unit
def test_missing_timed_out_and_failing_probes_are_facts(tmp_path: Path) -> None:
    case = tmp_path / "case"
    shutil.copytree(PROBES / "nvidia-h100", case)
    (case / "run" / "nvcc.timeout").write_text("")
    (case / "run" / "cmake.txt").unlink()  # on PATH, but the run answers "not found"
    detection = hw.detect(hw.RecordedProber(case))
    assert not detection.tools["nvcc"].ok and "timed out" in (detection.tools["nvcc"].note or "")
    assert not detection.tools["cmake"].ok
    assert dec.decide(detection).backend == "cpu"
    assert len(detection.problems) == 2


@pytest.mark.unit
def test_nvcc_outside_path_is_found_in_usr_local_cuda(tmp_path: Path) -> None:
    case = tmp_path / "case"
    shutil.copytree(PROBES / "nvidia-h100", case)
    manifest = json.loads((case / "probe.json").read_text())
    del manifest["which"]["nvcc"]
    (case / "probe.json").write_text(json.dumps(manifest))
    (case / "fs/usr/local/cuda-12.4/bin").mkdir(parents=True)
    (case / "fs/usr/local/cuda-12.4/bin/nvcc").write_text("")
    detection = hw.detect(hw.RecordedProber(case))
    assert detection.tools["nvcc"].ok and "CUDACXX" in (detection.tools["nvcc"].note or "")
    decision = dec.decide(detection)
    assert decision.backend == "cuda"
    assert any("CUDACXX" in h for h in decision.hints)


@pytest.mark.unit
def test_recorded_prober_answers_like_the_system_one() -> None:
    p = hw.RecordedProber(PROBES / "nvcc-no-gpu")
    assert p.which("nvidia-smi") is None
    assert p.run(["nvidia-smi"]).missing
    assert p.read_text("/nonexistent") is None
    assert p.glob("/proc/cpu*") == ["/proc/cpuinfo"]
    assert p.platform() == ("linux", "x86_64")


@pytest.mark.fake
def test_default_prober_follows_the_fixture_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hw.FIXTURE_ENV, str(PROBES / "apple-m2"))
    assert hw.detect().os == "darwin"
    monkeypatch.delenv(hw.FIXTURE_ENV)
    assert isinstance(hw.default_prober(), hw.SystemProber)


@pytest.mark.fake
def test_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe on this machine kind: nvcc 13.0, no GPU, no cuBLAS."""
    if shutil.which("nvcc") is None or shutil.which("nvidia-smi") is not None:
        pytest.skip("not this machine kind (needs nvcc and no NVIDIA driver)")
    monkeypatch.delenv(hw.FIXTURE_ENV, raising=False)
    start = time.perf_counter()
    detection = hw.detect(hw.SystemProber())
    elapsed = time.perf_counter() - start
    decision = dec.decide(detection)
    assert decision.backend == "cpu"
    assert "nvcc" in decision.reason
    assert detection.cpu_threads and detection.ram_mib
    # `llamactl build` with nothing to do has one second in all; detection may take little.
    assert elapsed < 0.5, f"detect() took {elapsed * 1000:.0f} ms"
