"""The build: plans, cache keys, progress, failures, manifest, no-op, CLI; real build marked."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from llamactl.build import buildlog, progress
from llamactl.build import cache as builds
from llamactl.build import plan as b
from llamactl.build import run as brun
from llamactl.build import toolchain as tc
from llamactl.build.decision import Decision
from llamactl.build.detection import GPU, Detection, Tool
from llamactl.build.source import SourceTree
from llamactl.errors import BuildError

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


# --------------------------------------------------------------------------- helpers


def det(
    *gpus: GPU,
    os_name: str = "linux",
    arch: str = "x86_64",
    threads: int = 16,
    avail_mib: int = 64_000,
    features: tuple[str, ...] = ("avx2", "fma"),
) -> Detection:
    return Detection(
        os=os_name,
        arch=arch,
        cpu_threads=threads,
        cpu_cores=threads // 2 or 1,
        cpu_features=features,
        ram_mib=avail_mib * 2,
        ram_available_mib=avail_mib,
        gpus=tuple(gpus),
        tools={"cmake": Tool("cmake", "/usr/bin/cmake", "3.25.1", ok=True)},
    )


def nvidia(cc: str, index: int = 0) -> GPU:
    return GPU(index, "nvidia", f"NVIDIA cc {cc}", 80_000, compute_capability=cc, api="cuda")


def amd(gfx: str, index: int = 0) -> GPU:
    return GPU(index, "amd", f"AMD {gfx}", 192_000, gfx_target=gfx, api="rocm")


def decision(backend: str = "cpu", **kw: Any) -> Decision:
    return Decision(backend=backend, reason=f"{backend} (test)", **kw)


def tree(path: str = "/src/llama.cpp", commit: str = COMMIT) -> SourceTree:
    return SourceTree(path=Path(path), commit=commit, origin="test", pinned=True)


def tools(**kw: Any) -> tc.Toolchain:
    base: dict[str, Any] = {
        "cmake": "/usr/bin/cmake",
        "cmake_version": "3.25.1",
        "ninja": "/usr/bin/ninja",
        "ccache": "/usr/bin/ccache",
        "npm": "/usr/bin/npm",
        "host_cxx_version": "12.2.0",
        "cpu_count": 16,
        "available_mib": 64_000,
    }
    base.update(kw)
    return tc.Toolchain(**base)


def make_plan(
    spec: b.BuildSpec | None = None,
    detection: Detection | None = None,
    dec: Decision | None = None,
    source: SourceTree | None = None,
    toolchain: tc.Toolchain | None = None,
    root: Path = Path("/cache/builds"),
) -> b.BuildPlan:
    return b.plan(
        spec or b.BuildSpec(),
        detection or det(),
        dec or decision(),
        source or tree(),
        toolchain or tools(),
        builds_root=root,
    )


def define(p: b.BuildPlan, name: str) -> str | None:
    for arg in p.cmake_args:
        if arg.startswith(f"-D{name}="):
            return arg.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- plans


@pytest.mark.unit
def test_cpu_plan_is_exactly_the_documented_command() -> None:
    p = make_plan()
    build_dir = f"/cache/builds/{p.key}"
    assert p.configure == (
        "cmake",
        "-S",
        "/src/llama.cpp",
        "-B",
        build_dir,
        "-G",
        "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        f"-DLLAMA_BUILD_COMMIT={COMMIT[:7]}",
        "-DLLAMA_BUILD_NUMBER=0",
        "-DGGML_RPC=ON",
        "-DLLAMA_BUILD_UI=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
    )
    assert p.build == (
        "cmake",
        "--build",
        build_dir,
        "--target",
        "llama-server",
        "ggml-rpc-server",
        "llama-bench",
        "-j",
        "16",
    )
    assert p.backend == "cpu" and p.env == () and not p.problems
    assert p.key.startswith("0c1e57098bba-cpu-")


@pytest.mark.unit
def test_version_names_the_pinned_commit_but_a_checkout_keeps_its_own() -> None:
    # Without this, llama.cpp's git query answers for the repository around vendor/: llamactl's.
    pinned = make_plan()
    assert f"-DLLAMA_BUILD_COMMIT={COMMIT[:7]}" in pinned.cmake_args
    custom = SourceTree(path=Path("/src/llama.cpp"), commit=COMMIT, origin="custom", pinned=False)
    assert not any("LLAMA_BUILD_COMMIT" in a for a in make_plan(source=custom).cmake_args)
    # A user's own value, after `--`, comes last and wins.
    mine = make_plan(b.BuildSpec(extra_cmake_args=("-DLLAMA_BUILD_COMMIT=mine",)))
    assert mine.cmake_args[-1] == "-DLLAMA_BUILD_COMMIT=mine"


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["cpu", "cuda", "hip", "vulkan", "metal", "sycl", "musa"])
def test_no_plan_uses_deprecated_or_network_switches(backend: str) -> None:
    p = make_plan(b.BuildSpec(backend=backend), det(os_name="linux"))
    joined = " ".join(p.configure)
    assert "LLAMA_CUDA" not in joined  # deprecated: silently ignored, a CPU build
    assert "-DLLAMA_USE_PREBUILT_UI=ON" not in joined  # downloads from Hugging Face
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in joined
    assert "CMAKE_CUDA_ARCHITECTURES=native" not in joined


@pytest.mark.unit
def test_cuda_architectures_come_from_the_detected_gpus() -> None:
    d = det(nvidia("9.0"), nvidia("8.6", 1))
    p = make_plan(
        b.BuildSpec(backend="cuda"), d, toolchain=tools(nvcc="/x/nvcc", nvcc_version="12.4")
    )
    assert "-DGGML_CUDA=ON" in p.cmake_args
    assert define(p, "CMAKE_CUDA_ARCHITECTURES") == "86;90"
    assert not p.problems


@pytest.mark.unit
def test_cuda_architectures_from_the_decision_win() -> None:
    d = det(nvidia("9.0"))
    dec = decision("cuda", cuda_architectures=("90",))
    p = make_plan(b.BuildSpec(), d, dec, toolchain=tools(nvcc="/x/nvcc", nvcc_version="12.4"))
    assert p.backend == "cuda"
    assert define(p, "CMAKE_CUDA_ARCHITECTURES") == "90"


@pytest.mark.unit
def test_blackwell_uses_the_arch_specific_real_target() -> None:
    p = make_plan(
        b.BuildSpec(backend="cuda"),
        det(nvidia("12.0")),
        toolchain=tools(nvcc="/x/nvcc", nvcc_version="12.8"),
    )
    assert define(p, "CMAKE_CUDA_ARCHITECTURES") == "120a-real"


@pytest.mark.unit
def test_cuda_without_gpu_uses_ggml_generic_list_not_native() -> None:
    p13 = make_plan(
        b.BuildSpec(backend="cuda"), toolchain=tools(nvcc="/x/nvcc", nvcc_version="13.0")
    )
    archs13 = define(p13, "CMAKE_CUDA_ARCHITECTURES")
    assert archs13 == "75-virtual;80-virtual;86-real;89-real;90-virtual;120a-real;121a-real"
    p12 = make_plan(
        b.BuildSpec(backend="cuda"), toolchain=tools(nvcc="/x/nvcc", nvcc_version="12.4")
    )
    archs12 = define(p12, "CMAKE_CUDA_ARCHITECTURES")
    assert archs12 is not None and archs12.startswith("50-virtual;61-virtual;70-virtual")
    assert "120a" not in archs12


@pytest.mark.unit
def test_explicit_cuda_architectures_override_detection() -> None:
    spec = b.BuildSpec(backend="cuda", cuda_architectures=b.parse_list("8.6, 89"))
    p = make_plan(spec, det(nvidia("9.0")), toolchain=tools(nvcc="/x/nvcc", nvcc_version="12.4"))
    assert define(p, "CMAKE_CUDA_ARCHITECTURES") == "86;89"


@pytest.mark.unit
def test_cuda13_refuses_architectures_it_dropped() -> None:
    p = make_plan(
        b.BuildSpec(backend="cuda"),
        det(nvidia("6.1")),
        toolchain=tools(nvcc="/x", nvcc_version="13.0"),
    )
    assert p.problems and "61" in p.problems[0].message


@pytest.mark.unit
def test_cuda_host_compiler_when_gcc_is_newer_than_nvcc_supports() -> None:
    tc = tools(
        nvcc="/x/nvcc",
        nvcc_version="12.2",
        host_cxx_version="13.2.0",
        host_compilers=(("/usr/bin/g++-11", 11), ("/usr/bin/g++-12", 12), ("/usr/bin/g++-13", 13)),
    )
    p = make_plan(b.BuildSpec(backend="cuda"), det(nvidia("8.9")), toolchain=tc)
    assert define(p, "CMAKE_CUDA_HOST_COMPILER") == "/usr/bin/g++-12"
    ok = make_plan(
        b.BuildSpec(backend="cuda"),
        det(nvidia("8.9")),
        toolchain=tools(nvcc="/x", nvcc_version="13.0", host_cxx_version="13.2.0"),
    )
    assert define(ok, "CMAKE_CUDA_HOST_COMPILER") is None
    stuck = make_plan(
        b.BuildSpec(backend="cuda"),
        det(nvidia("8.9")),
        toolchain=tools(nvcc="/x", nvcc_version="12.2", host_cxx_version="13.2.0"),
    )
    assert stuck.problems and "g++-12" in (stuck.problems[0].hint or "")


@pytest.mark.unit
def test_cuda_without_nvcc_is_a_problem() -> None:
    p = make_plan(b.BuildSpec(backend="cuda"), det(nvidia("9.0")))
    assert any("nvcc" in pr.message for pr in p.problems)


@pytest.mark.unit
def test_hip_plan_sets_targets_and_the_documented_environment() -> None:
    tc = tools(hip_clang_dir="/opt/rocm/llvm/bin", hip_root="/opt/rocm")
    p = make_plan(
        b.BuildSpec(), det(amd("gfx942"), amd("gfx1100", 1)), decision("hip"), toolchain=tc
    )
    assert p.backend == "hip"
    assert "-DGGML_HIP=ON" in p.cmake_args
    assert define(p, "GPU_TARGETS") == "gfx1100;gfx942"
    assert dict(p.env) == {"HIPCXX": "/opt/rocm/llvm/bin/clang", "HIP_PATH": "/opt/rocm"}
    assert p.commands()[0].startswith("HIPCXX=/opt/rocm/llvm/bin/clang HIP_PATH=/opt/rocm cmake ")
    explicit = make_plan(b.BuildSpec(backend="hip", gpu_targets=("gfx90a",)), toolchain=tc)
    assert define(explicit, "GPU_TARGETS") == "gfx90a"
    missing = make_plan(b.BuildSpec(backend="hip"))
    assert any("hipconfig" in pr.message for pr in missing.problems)


@pytest.mark.unit
def test_vulkan_plan_and_its_preflight() -> None:
    good = make_plan(
        b.BuildSpec(backend="vulkan"),
        toolchain=tools(glslc="/usr/bin/glslc", vulkan_header_version=290),
    )
    assert "-DGGML_VULKAN=ON" in good.cmake_args and not good.problems
    old = make_plan(
        b.BuildSpec(backend="vulkan"),
        toolchain=tools(glslc="/usr/bin/glslc", vulkan_header_version=239),
    )
    assert old.problems and "too old" in old.problems[0].message
    no_glslc = make_plan(b.BuildSpec(backend="vulkan"), toolchain=tools(vulkan_header_version=290))
    assert any("glslc" in pr.message for pr in no_glslc.problems)


@pytest.mark.unit
def test_metal_plans() -> None:
    mac = det(os_name="darwin", arch="arm64", features=("neon",))
    metal = make_plan(b.BuildSpec(), mac, decision("metal"))
    assert "-DGGML_METAL=ON" in metal.cmake_args and not metal.problems
    cpu_on_mac = make_plan(b.BuildSpec(backend="cpu"), mac, decision("metal"))
    assert "-DGGML_METAL=OFF" in cpu_on_mac.cmake_args  # Metal is on by default on macOS
    linux = make_plan(b.BuildSpec(backend="metal"))
    assert linux.problems


@pytest.mark.unit
def test_sycl_and_musa_plans() -> None:
    sycl = make_plan(b.BuildSpec(backend="sycl"), toolchain=tools(icpx="/opt/intel/bin/icpx"))
    assert sycl.cmake_args[-3:] == (
        "-DGGML_SYCL=ON",
        "-DCMAKE_C_COMPILER=icx",
        "-DCMAKE_CXX_COMPILER=icpx",
    )
    assert not sycl.problems
    assert make_plan(b.BuildSpec(backend="sycl")).problems  # no icpx
    musa = make_plan(b.BuildSpec(backend="musa", gpu_targets=("31",)))
    assert "-DGGML_MUSA=ON" in musa.cmake_args
    assert define(musa, "MUSA_ARCHITECTURES") == "31"


@pytest.mark.unit
def test_options_ui_rpc_native_generator_extra() -> None:
    no_npm = make_plan(toolchain=tools(npm=None))
    assert "-DLLAMA_BUILD_UI=ON" not in no_npm.cmake_args and not no_npm.ui
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in no_npm.cmake_args
    forced = make_plan(b.BuildSpec(ui=True), toolchain=tools(npm=None))
    assert any("npm" in pr.message for pr in forced.problems)
    off = make_plan(b.BuildSpec(ui=False))
    assert "-DLLAMA_BUILD_UI=ON" not in off.cmake_args
    no_rpc = make_plan(b.BuildSpec(rpc=False))
    assert "-DGGML_RPC=ON" not in no_rpc.cmake_args
    assert no_rpc.targets == ("llama-server", "llama-bench")
    portable = make_plan(b.BuildSpec(native=False))
    assert "-DGGML_NATIVE=OFF" in portable.cmake_args
    make = make_plan(toolchain=tools(ninja=None))
    assert "-G" not in make.configure and make.generator is None
    extra = make_plan(b.BuildSpec(extra_cmake_args=("-DGGML_CUDA_FA_ALL_QUANTS=ON",)))
    assert extra.configure[-1] == "-DGGML_CUDA_FA_ALL_QUANTS=ON"
    assert make_plan(b.BuildSpec(jobs=3)).build[-2:] == ("-j", "3")


@pytest.mark.unit
def test_unknown_backend_is_a_build_error() -> None:
    with pytest.raises(BuildError):
        make_plan(b.BuildSpec(backend="opencl"))


# --------------------------------------------------------------------------- cache keys


@pytest.mark.unit
def test_cache_key_same_config_same_key_and_source_path_does_not_matter() -> None:
    a = make_plan(source=tree("/home/a/llamactl/vendor/llama.cpp"))
    c = make_plan(source=tree("/tmp/other-clone/vendor/llama.cpp"))
    assert a.key == c.key
    assert a.build_dir == c.build_dir
    assert make_plan().key == make_plan().key


@pytest.mark.unit
def test_cache_key_changes_with_what_changes_the_binaries() -> None:
    base = make_plan().key
    assert make_plan(b.BuildSpec(extra_cmake_args=("-DGGML_BLAS=ON",))).key != base
    assert make_plan(b.BuildSpec(rpc=False)).key != base
    assert make_plan(b.BuildSpec(ui=False)).key != base
    assert make_plan(b.BuildSpec(native=False)).key != base
    assert make_plan(source=tree(commit="f" * 40)).key != base
    assert make_plan(toolchain=tools(env=(("CXX", "clang++"),))).key != base
    # native code depends on the CPU it was built for
    assert make_plan(detection=det(features=("avx512f",))).key != base
    # ...but not how it is built
    assert make_plan(b.BuildSpec(jobs=1)).key == base
    assert make_plan(toolchain=tools(ninja=None)).key == base
    assert make_plan(toolchain=tools(ccache=None)).key == base
    assert (
        make_plan(b.BuildSpec(native=False), det(features=("avx512f",))).key
        == make_plan(b.BuildSpec(native=False)).key
    )


@pytest.mark.unit
def test_cache_key_format() -> None:
    key = b.cache_key(COMMIT, "cuda", ["-DGGML_CUDA=ON"], [], b.TARGETS)
    commit, backend, digest = key.split("-")
    assert (commit, backend, len(digest)) == (COMMIT[:12], "cuda", 12)


# --------------------------------------------------------------------------- jobs


@pytest.mark.unit
@pytest.mark.parametrize(
    ("backend", "threads", "avail", "expected"),
    [
        ("cpu", 16, 64_000, 16),
        ("cpu", 16, 4_096, 4),  # ~1 GiB per C++ job
        ("cuda", 16, 8_192, 4),  # ~2 GiB per nvcc job
        ("cuda", 2, 24_000, 2),
        ("cpu", 8, 500, 1),  # never fewer than one
        ("cpu", None, None, 1),
        ("cpu", 4, None, 4),
    ],
)
def test_default_jobs(backend: str, threads: int | None, avail: int | None, expected: int) -> None:
    assert b.default_jobs(backend, threads, avail) == expected


@pytest.mark.unit
def test_plan_jobs_follow_detection() -> None:
    p = make_plan(b.BuildSpec(backend="cuda"), det(threads=32, avail_mib=10_000))
    assert p.jobs == 4


# --------------------------------------------------------------------------- progress


@pytest.mark.unit
def test_parse_ninja_progress() -> None:
    s = progress.parse_progress(
        "[93/222] Building CXX object common/CMakeFiles/llama-common.dir/x/y.cpp.o\n"
    )
    assert s == progress.Step(93, 222, "Building y.cpp")
    s = progress.parse_progress("[11/222] Linking CXX shared library bin/libggml-base.so.0.25.3")
    assert s == progress.Step(11, 222, "Linking libggml-base.so.0.25.3")
    s = progress.parse_progress("[12/222] Creating library symlink bin/libggml-base.so.0 bin/x.so")
    assert s is not None and (s.done, s.total) == (12, 222)
    assert progress.parse_progress("[ 42%] Building C object ggml/src/x.c.o") == progress.Step(
        42, 100, "Building x.c"
    )
    assert progress.parse_progress("-- Including CPU backend") is None
    assert progress.parse_progress("In file included from /usr/lib/gcc/x.h:49,") is None


# --------------------------------------------------------------------------- failures


@pytest.mark.unit
@pytest.mark.parametrize(
    ("log", "expect"),
    [
        (
            "/usr/local/cuda/include/crt/host_config.h:143:2: error: #error -- unsupported GNU "
            "version! gcc versions later than 12 are not supported!",
            "CMAKE_CUDA_HOST_COMPILER",
        ),
        (
            "CMake Error at ggml/src/ggml-cuda/CMakeLists.txt:1 (add_library):\n"
            '  Target "ggml-cuda" links to:\n    CUDA::cublas\n',
            "cuBLAS",
        ),
        ("CMake Error: Could NOT find Vulkan (missing: glslc) (found version 1.3.239)", "glslc"),
        (
            "ggml-vulkan.cpp:5214:22: error: 'LayerSettingEXT' is not a member of 'vk'",
            "Vulkan headers are too old",
        ),
        ("clang: error: invalid offload arch combinations: 'gfx9999'", "--gpu-targets"),
        (
            "c++: fatal error: Killed signal terminated program cc1plus\ncompilation terminated.",
            "-j 1",
        ),
        ("-- UI: npm ci failed (1)\n--   stderr: npm ERR! network", "--no-ui"),
        ("CMake Error: No CMAKE_CUDA_COMPILER could be found.", "nvcc was not found"),
        ("nvcc fatal   : Unsupported gpu architecture 'compute_50'", "--cuda-arch"),
    ],
)
def test_failure_hints(log: str, expect: str) -> None:
    hint = buildlog.failure_hint(log)
    assert hint is not None and expect in hint


@pytest.mark.unit
def test_unknown_failure_has_no_hint() -> None:
    assert buildlog.failure_hint("something odd happened") is None


@pytest.mark.unit
def test_error_lines_pick_the_relevant_lines() -> None:
    log = "\n".join(
        [
            "[1/3] Building CXX object a.o",
            "warning: -Werror is not set",
            "FAILED: ggml/src/ggml-vulkan.cpp.o",
            "ggml-vulkan.cpp:5214:22: error: 'LayerSettingEXT' is not a member of 'vk'",
            "ggml-vulkan.cpp:5214:22: error: 'LayerSettingEXT' is not a member of 'vk'",
            "ninja: build stopped: subcommand failed.",
        ]
    )
    lines = buildlog.error_lines(log)
    assert lines == [
        "FAILED: ggml/src/ggml-vulkan.cpp.o",
        "ggml-vulkan.cpp:5214:22: error: 'LayerSettingEXT' is not a member of 'vk'",
    ]


@pytest.mark.unit
def test_error_lines_keep_cmake_messages() -> None:
    log = (
        "-- Configuring done\n"
        "CMake Error at ggml/src/ggml-cuda/CMakeLists.txt:178 (target_link_libraries):\n"
        '  Target "ggml-cuda" links to:\n'
        "\n"
        "    CUDA::cublas\n"
        "\n"
        "  but the target was not found.  Possible reasons include:\n"
        "-- Generating done\n"
    )
    assert buildlog.error_lines(log) == [
        "CMake Error at ggml/src/ggml-cuda/CMakeLists.txt:178 (target_link_libraries):",
        '  Target "ggml-cuda" links to:',
        "    CUDA::cublas",
        "  but the target was not found.  Possible reasons include:",
    ]


@pytest.mark.unit
def test_included_backends_and_devices() -> None:
    configure = "-- Including CPU backend\n-- Using RPC backend\n-- Including RPC backend\n"
    assert buildlog.included_backends(configure) == ("CPU", "RPC")
    out = "Available devices:\n  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80500 MiB free)\n"
    assert buildlog.parse_devices(out) == (
        "CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80500 MiB free)",
    )
    assert buildlog.parse_devices("Available devices:\n  (none)\n") == ()


# --------------------------------------------------------------------------- manifest and cache


def manifest_for(
    build_dir: Path, *, commit: str = COMMIT, backend: str = "cpu", created: float | None = None
) -> builds.Manifest:
    (build_dir / "bin").mkdir(parents=True, exist_ok=True)
    for name in b.TARGETS:
        (build_dir / "bin" / name).write_text("#!/bin/sh\n")
    return builds.Manifest(
        key=build_dir.name,
        commit=commit,
        backend=backend,
        cmake_args=("-DCMAKE_BUILD_TYPE=Release",),
        env=(),
        targets=b.TARGETS,
        binaries={name: f"bin/{name}" for name in b.TARGETS},
        toolchain={"cmake": "3.25.1"},
        duration_s=12.5,
        created=created if created is not None else time.time(),
        llamactl_version="0.1.0",
        source="/src/llama.cpp",
        server_version="version: 1 (0c1e570)",
        backends_included=("CPU", "RPC"),
        path=build_dir,
    )


@pytest.mark.unit
def test_manifest_round_trip(tmp_path: Path) -> None:
    m = manifest_for(tmp_path / "k1")
    builds.write_manifest(m)
    data = json.loads((tmp_path / "k1" / builds.MANIFEST_NAME).read_text())
    assert data["commit"] == COMMIT and data["binaries"]["llama-server"] == "bin/llama-server"
    assert "created_iso" in data and data["llamactl_version"] == "0.1.0"
    again = builds.load_manifest(tmp_path / "k1")
    assert again == m
    assert again is not None and again.server_binary == tmp_path / "k1" / "bin" / "llama-server"
    assert not list((tmp_path / "k1").glob(".*.tmp"))


@pytest.mark.unit
def test_build_info_is_what_llama_server_props_says(tmp_path: Path) -> None:
    # llama-server's /props "build_info" is "b<number>-<commit>" (common/build-info.cpp.in).
    m = manifest_for(tmp_path / "k1")
    builds.write_manifest(m)
    assert builds.build_info(m.server_binary) == "b1-0c1e570"
    newer = manifest_for(tmp_path / "k2")
    newer = dataclasses.replace(
        newer, server_version="version: 0.5.0-dev (build 7, commit abc1234)\nbuilt with GNU"
    )
    builds.write_manifest(newer)
    assert builds.build_info(newer.server_binary) == "b7-abc1234"
    # No manifest: the binary's own --version.
    script = tmp_path / "bare" / "bin" / "llama-server"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\necho 'version: 0.5.0 (build 9, commit 1234567)' >&2\n")
    script.chmod(0o755)
    assert builds.build_info(script) == "b9-1234567"
    assert builds.build_info(tmp_path / "absent" / "bin" / "llama-server") == ""


@pytest.mark.unit
def test_find_builds_ignores_incomplete_and_sorts_newest_first(tmp_path: Path) -> None:
    builds.write_manifest(manifest_for(tmp_path / "old", created=100.0))
    builds.write_manifest(manifest_for(tmp_path / "new", created=200.0))
    (tmp_path / "half-done" / "bin").mkdir(parents=True)  # no manifest: not a build
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / builds.MANIFEST_NAME).write_text("{not json")
    assert [m.path.name for m in builds.find_builds(tmp_path)] == ["new", "old"]
    assert builds.find_builds(tmp_path / "absent") == []


@pytest.fixture
def builds_root(llamactl_home: Path) -> Path:
    from llamactl import paths

    root = paths.builds_dir()
    root.mkdir(parents=True)
    return root


@pytest.mark.unit
def test_find_server_binary_choices(builds_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builds, "current_commit", lambda: COMMIT)
    with pytest.raises(BuildError) as err:
        builds.find_server_binary()
    assert "llamactl build" in (err.value.hint or "")

    builds.write_manifest(
        manifest_for(builds_root / "other-commit", commit="f" * 40, created=900.0)
    )
    with pytest.raises(BuildError):
        builds.find_server_binary()

    builds.write_manifest(manifest_for(builds_root / "cpu-old", created=100.0))
    assert builds.find_server_binary() == builds_root / "cpu-old" / "bin" / "llama-server"

    builds.write_manifest(manifest_for(builds_root / "cuda-new", backend="cuda", created=300.0))
    builds.write_manifest(manifest_for(builds_root / "cpu-mid", created=200.0))

    # Without a recorded choice: the newest complete build of this commit (of that backend).
    assert builds.find_server_binary() == builds_root / "cuda-new" / "bin" / "llama-server"
    assert builds.find_server_binary("cpu") == builds_root / "cpu-mid" / "bin" / "llama-server"
    # What a plain `llamactl build` chose last wins over newer builds, from the cache alone:
    # serve never runs the planner or the hardware probes to pick its binary.
    builds.remember_auto(COMMIT, "cpu-old")
    assert builds.find_server_binary() == builds_root / "cpu-old" / "bin" / "llama-server"
    builds.remember_preferred(COMMIT, "cpu-mid", "cpu", plain=True)
    assert builds.find_server_binary() == builds_root / "cpu-mid" / "bin" / "llama-server"
    assert builds.find_server_binary("cuda") == builds_root / "cuda-new" / "bin" / "llama-server"
    # `llamactl build --backend cpu` records the cpu build serve takes with --backend cpu.
    builds.remember_preferred(COMMIT, "cpu-old", "cpu", plain=False)
    assert builds.find_server_binary("cpu") == builds_root / "cpu-old" / "bin" / "llama-server"
    assert builds.find_server_binary() == builds_root / "cpu-mid" / "bin" / "llama-server"
    # A manifest whose binary was deleted does not count.
    (builds_root / "cpu-mid" / "bin" / "llama-server").unlink()
    assert builds.find_server_binary() == builds_root / "cuda-new" / "bin" / "llama-server"


@pytest.mark.unit
def test_the_cache_imports_neither_the_planner_nor_the_probes() -> None:
    # serve finds its binary through the cache alone; an import of plan, hardware, decision or
    # toolchain would put the probes back on its path (issue 12).
    import ast

    import llamactl.build.cache as cache_module

    tree = ast.parse(Path(cache_module.__file__).read_text())
    imported = {
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    forbidden = {
        f"llamactl.build.{m}" for m in ("plan", "hardware", "decision", "toolchain", "run")
    }
    assert not imported & forbidden, imported & forbidden


# --------------------------------------------------------------------------- run_build (fakes)


class FakeChild:
    """A finished Popen: its output is already there."""

    def __init__(self, lines: Sequence[str], rc: int) -> None:
        self.stdout: Iterator[bytes] = iter([line.encode() for line in lines])
        self.returncode = rc
        self.pid = 999_999

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def poll(self) -> int:
        return self.returncode


CONFIGURE_OUT = [
    "-- The C compiler identification is GNU 12.2.0\n",
    "-- Including CPU backend\n",
    "-- Including RPC backend\n",
    "-- Build files have been written to: x\n",
]


class FakeSpawn:
    """Plays cmake: the configure step prints CONFIGURE_OUT, the build step writes binaries."""

    def __init__(
        self,
        configure: Sequence[str] = CONFIGURE_OUT,
        build_lines: Sequence[str] | None = None,
        build_rc: int = 0,
        make_binaries: bool = True,
    ) -> None:
        self.configure = configure
        self.build_lines = build_lines
        self.build_rc = build_rc
        self.make_binaries = make_binaries
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> FakeChild:
        self.calls.append(argv)
        self.envs.append(kw["env"])
        assert kw["stdout"] == subprocess.PIPE
        if "--build" not in argv:
            return FakeChild(self.configure, 0)
        build_dir = Path(argv[argv.index("--build") + 1])
        targets = argv[argv.index("--target") + 1 : argv.index("-j")]
        if self.make_binaries:
            (build_dir / "bin").mkdir(parents=True, exist_ok=True)
            for t in targets:
                (build_dir / "bin" / t).write_text("")
        lines = self.build_lines
        if lines is None:
            lines = [
                f"[{i}/{len(targets)}] Linking CXX executable bin/{t}\n"
                for i, t in enumerate(targets, 1)
            ]
        return FakeChild(lines, self.build_rc)


def fake_runner(argv: list[str], **kw: Any) -> Any:
    from llamactl.proc import Completed

    if argv[-1] == "--version":
        return Completed(tuple(argv), 0, "", "version: 1 (0c1e570)\nbuilt with GNU 12.2.0\n")
    return Completed(tuple(argv), 0, "Available devices:\n  (none)\n", "")


def real_plan(tmp_path: Path, spec: b.BuildSpec | None = None, **kw: Any) -> b.BuildPlan:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "CMakeLists.txt").write_text("")
    return make_plan(spec, source=tree(str(src)), root=tmp_path / "builds", **kw)


@pytest.mark.unit
def test_run_build_streams_progress_logs_and_writes_the_manifest(tmp_path: Path) -> None:
    p = real_plan(tmp_path)
    spawn = FakeSpawn()
    steps: list[progress.Step] = []
    m = brun.run_build(p, on_step=steps.append, spawn=spawn, runner=fake_runner)
    assert [c[:2] for c in spawn.calls] == [["cmake", "-S"], ["cmake", "--build"]]
    assert spawn.envs[1]["NINJA_STATUS"] == "[%f/%t] "
    assert (steps[-1].done, steps[-1].total) == (3, 3)
    assert m.server_version.startswith("version: 1")
    assert m.backends_included == ("CPU", "RPC")
    assert builds.load_manifest(p.build_dir) == m
    log = p.log_path.read_text()
    assert "$ cmake -S" in log and "[3/3] Linking CXX executable bin/llama-bench" in log


@pytest.mark.unit
def test_run_build_failure_quotes_errors_and_hints(tmp_path: Path) -> None:
    p = real_plan(tmp_path)
    lines = [
        "[1/9] Building CXX object a.o\n",
        "FAILED: ggml/src/ggml-cpu.o\n",
        "c++: fatal error: Killed signal terminated program cc1plus\n",
        "ninja: build stopped: subcommand failed.\n",
    ]
    spawn = FakeSpawn(build_lines=lines, build_rc=1, make_binaries=False)
    with pytest.raises(BuildError) as err:
        brun.run_build(p, spawn=spawn, runner=fake_runner)
    text = err.value.format_message()
    assert "Killed signal terminated program cc1plus" in text
    assert str(p.log_path) in text
    assert "-j 1" in text
    assert builds.load_manifest(p.build_dir) is None  # a failed build is never complete


@pytest.mark.unit
def test_run_build_refuses_a_gpu_request_that_ends_cpu_only(tmp_path: Path) -> None:
    p = real_plan(
        tmp_path,
        b.BuildSpec(backend="vulkan"),
        toolchain=tools(glslc="/usr/bin/glslc", vulkan_header_version=290),
    )
    with pytest.raises(BuildError) as err:
        brun.run_build(p, spawn=FakeSpawn(), runner=fake_runner)
    assert "did not include the Vulkan backend" in err.value.message
    assert builds.load_manifest(p.build_dir) is None


@pytest.mark.unit
def test_run_build_records_a_gpu_backend_and_warns_without_device(tmp_path: Path) -> None:
    p = real_plan(
        tmp_path,
        b.BuildSpec(backend="cuda"),
        toolchain=tools(nvcc="/x/nvcc", nvcc_version="13.0"),
    )
    configure = [*CONFIGURE_OUT, "-- Including CUDA backend\n"]
    m = brun.run_build(p, spawn=FakeSpawn(configure=configure), runner=fake_runner)
    assert "CUDA" in m.backends_included
    assert m.warnings and "no CUDA device" in m.warnings[0]


@pytest.mark.unit
def test_run_build_preflight_problems_stop_before_cmake(tmp_path: Path) -> None:
    p = real_plan(
        tmp_path,
        b.BuildSpec(backend="vulkan"),
        toolchain=tools(glslc="/usr/bin/glslc", vulkan_header_version=239),
    )
    spawn = FakeSpawn()
    with pytest.raises(BuildError) as err:
        brun.run_build(p, spawn=spawn, runner=fake_runner)
    assert "too old" in err.value.message and spawn.calls == []


@pytest.mark.unit
def test_run_build_fails_when_npm_did_not_build_the_ui(tmp_path: Path) -> None:
    p = real_plan(tmp_path)
    lines = ["[1/2] Provisioning UI assets\n", "-- UI: npm ci failed (1)\n", "[2/2] Linking x\n"]
    with pytest.raises(BuildError) as err:
        brun.run_build(p, spawn=FakeSpawn(build_lines=lines), runner=fake_runner)
    assert "--no-ui" in (err.value.hint or "")


@pytest.mark.unit
def test_reset_stale_cache_from_another_clone(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    (build_dir / "CMakeFiles").mkdir(parents=True)
    cache = build_dir / "CMakeCache.txt"
    cache.write_text(
        "CMAKE_HOME_DIRECTORY:INTERNAL=/elsewhere/llama.cpp\nCMAKE_GENERATOR:INTERNAL=Ninja\n"
    )
    brun._reset_stale_cache(build_dir, tmp_path / "src", "Ninja")
    assert not cache.exists() and not (build_dir / "CMakeFiles").exists()


# --------------------------------------------------------------------------- no-op and CLI


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine kind as data: no GPU, nvcc 13.0, Ninja, npm; the pinned source."""
    monkeypatch.delenv("LLAMACTL_SOURCE", raising=False)
    monkeypatch.setattr(brun, "_detect", lambda: det(threads=2, avail_mib=22_000))
    monkeypatch.setattr(
        tc,
        "probe_toolchain",
        lambda detection, backend, **kw: tools(
            cpu_count=2,
            nvcc="/usr/local/bin/nvcc" if backend == "cuda" else None,
            nvcc_version="13.0",
        ),
    )


@pytest.mark.unit
def test_build_is_a_noop_when_the_manifest_exists(
    fake_machine: None, builds_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = b.BuildSpec(backend="cpu")
    the_plan = brun.resolve_plan(spec, fetch=False)
    builds.write_manifest(manifest_for(the_plan.build_dir))

    def no_build(*a: Any, **kw: Any) -> None:
        raise AssertionError("a no-op build must not run cmake")

    monkeypatch.setattr(brun, "run_build", no_build)
    outcome = brun.build_llama(spec)
    assert outcome.state == "up-to-date" and outcome.plan.build_dir == the_plan.build_dir

    result = CliRunner().invoke(b_cli().build, ["--backend", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"up to date: {the_plan.build_dir}"


@pytest.mark.unit
def test_a_plain_build_is_remembered_for_serve(fake_machine: None, builds_root: Path) -> None:
    the_plan = brun.resolve_plan(b.BuildSpec(), fetch=False)
    builds.write_manifest(manifest_for(the_plan.build_dir))
    outcome = brun.build_llama(b.BuildSpec())
    assert outcome.state == "up-to-date" and outcome.manifest is not None
    assert builds._remembered_auto(COMMIT) == the_plan.key
    other = brun.resolve_plan(b.BuildSpec(backend="cpu", native=False), fetch=False)
    builds.write_manifest(manifest_for(other.build_dir))
    brun.build_llama(b.BuildSpec(backend="cpu", native=False))  # a chosen backend is not "plain"
    assert builds._remembered_auto(COMMIT) == the_plan.key
    # ...but it is what `serve --backend cpu` (and `which --backend cpu`) takes from now on.
    assert builds._remembered(builds._backend_path(COMMIT, "cpu")) == other.key
    assert builds.find_server_binary("cpu") == other.build_dir / "bin" / "llama-server"
    assert builds.find_server_binary() == the_plan.build_dir / "bin" / "llama-server"


@pytest.mark.unit
def test_clean_removes_the_build_dir_first(
    fake_machine: None, builds_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = b.BuildSpec(backend="cpu", clean=True)
    the_plan = brun.resolve_plan(spec, fetch=False)
    builds.write_manifest(manifest_for(the_plan.build_dir))
    (the_plan.build_dir / "stale.o").write_text("")
    seen: list[bool] = []
    monkeypatch.setattr(
        "llamactl.build.source.ensure_source", lambda *a, **kw: the_plan_source(the_plan)
    )
    monkeypatch.setattr(
        brun,
        "run_build",
        lambda p, **kw: seen.append(p.build_dir.exists()) or manifest_for(p.build_dir),
    )
    outcome = brun.build_llama(spec)
    assert outcome.state == "built" and seen == [False]


@pytest.mark.unit
def test_two_builds_of_one_configuration_run_one_after_the_other(
    fake_machine: None, builds_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = b.BuildSpec(backend="cpu")
    the_plan = brun.resolve_plan(spec, fetch=False)
    monkeypatch.setattr(
        "llamactl.build.source.ensure_source", lambda *a, **kw: the_plan_source(the_plan)
    )
    inside: list[int] = []
    overlap: list[bool] = []
    entered = threading.Event()

    def slow_build(p: b.BuildPlan, **kw: Any) -> builds.Manifest:
        inside.append(1)
        overlap.append(len(inside) > 1)
        entered.set()
        time.sleep(0.5)
        manifest = manifest_for(p.build_dir)
        builds.write_manifest(manifest)
        inside.pop()
        return manifest

    monkeypatch.setattr(brun, "run_build", slow_build)
    outcomes: list[brun.BuildOutcome] = []
    first = threading.Thread(target=lambda: outcomes.append(brun.build_llama(spec)))
    first.start()
    assert entered.wait(10)
    second = brun.build_llama(spec)  # waits for the first, then finds its manifest
    first.join(10)
    assert [o.state for o in outcomes] == ["built"] and second.state == "up-to-date"
    assert overlap == [False]


def the_plan_source(p: b.BuildPlan) -> SourceTree:
    return SourceTree(path=p.source, commit=p.commit, origin="test", pinned=True)


def b_cli() -> Any:
    from llamactl.cli import build as cli_build

    return cli_build


@pytest.mark.unit
def test_cli_dry_run_cuda_on_a_machine_without_gpu(fake_machine: None, builds_root: Path) -> None:
    result = CliRunner().invoke(b_cli().build, ["--backend", "cuda", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("cmake ")]
    assert len(lines) == 2
    configure = shlex.split(lines[0])
    assert "-DGGML_CUDA=ON" in configure
    archs = [a for a in configure if a.startswith("-DCMAKE_CUDA_ARCHITECTURES=")]
    assert archs and "native" not in archs[0] and "90" in archs[0]
    assert shlex.split(lines[1])[:2] == ["cmake", "--build"]
    assert not list(builds_root.iterdir())  # a dry run changes nothing


@pytest.mark.unit
def test_cli_passes_extra_cmake_args_and_options(fake_machine: None, builds_root: Path) -> None:
    args = [
        "--dry-run",
        "--backend",
        "hip",
        "--gpu-targets",
        "gfx942",
        "--portable",
        "--no-ui",
        "--no-rpc",
        "-j",
        "3",
        "--",
        "-DGGML_HIP_ROCWMMA_FATTN=ON",
    ]
    result = CliRunner().invoke(b_cli().build, args)
    assert result.exit_code == 0, result.output
    configure = shlex.split(next(x for x in result.output.splitlines() if " -S " in x))
    assert "-DGPU_TARGETS=gfx942" in configure and "-DGGML_NATIVE=OFF" in configure
    assert "-DGGML_RPC=ON" not in configure and "-DLLAMA_BUILD_UI=ON" not in configure
    assert configure[-1] == "-DGGML_HIP_ROCWMMA_FATTN=ON"
    build_line = next(x for x in result.output.splitlines() if "--build" in x)
    assert build_line.endswith("--target llama-server llama-bench -j 3")


@pytest.mark.unit
def test_cli_rejects_stray_arguments(fake_machine: None) -> None:
    result = CliRunner().invoke(b_cli().build, ["--dry-run", "oops"])
    assert result.exit_code == 2 and "after `--`" in result.output


@pytest.mark.unit
def test_cli_which_and_list(builds_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builds, "current_commit", lambda: COMMIT)
    runner = CliRunner()
    missing = runner.invoke(b_cli().which, [])
    assert missing.exit_code == 4 and "llamactl build" in missing.output
    builds.write_manifest(manifest_for(builds_root / "only"))
    result = runner.invoke(b_cli().which, [])
    assert result.exit_code == 0
    assert result.output.splitlines()[-1] == str(builds_root / "only" / "bin" / "llama-server")
    listed = runner.invoke(b_cli().build, ["--list"])
    assert listed.exit_code == 0 and "only" in listed.output and "cpu" in listed.output


# --------------------------------------------------------------------------- the real build


def _llamactl(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamactl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        check=False,
    )


@pytest.mark.build
@pytest.mark.timeout(3600)
def test_real_cpu_build_then_noop(real_cache: Path) -> None:
    first = _llamactl("build", "--backend", "cpu", timeout=3500)
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    server = Path(_llamactl("which", "--backend", "cpu", timeout=60).stdout.splitlines()[-1])
    assert server.is_file() and str(server).startswith(str(real_cache))
    version = subprocess.run(
        [str(server), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0 and "version" in (version.stdout + version.stderr)
    manifest = builds.load_manifest(server.parent.parent)
    assert manifest is not None and "CPU" in manifest.backends_included

    log = server.parent.parent / "build.log"
    before = log.stat().st_mtime_ns
    again = _llamactl("build", "--backend", "cpu", timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"up to date: {server.parent.parent}"
    # A no-op: neither CMake nor the log was touched (no wall-clock assertion: issue 12).
    assert log.stat().st_mtime_ns == before


@pytest.mark.fake
def test_stream_writes_everything_to_the_log() -> None:
    log = io.StringIO()
    seen: list[str] = []
    rc = brun._stream(
        ["cmake", "--version"],
        env={},
        log=log,
        on_line=seen.append,
        spawn=lambda argv, **kw: FakeChild(["\x1b[01;31m\x1b[Kerror:\x1b[m\x1b[K x\n"], 0),
    )
    assert rc == 0 and seen == ["error: x\n"]
    assert log.getvalue() == "$ cmake --version\nerror: x\n"


@pytest.mark.fake
def test_ctrl_c_stops_the_whole_build_process_group() -> None:
    from llamactl import proc

    log = io.StringIO()
    pids: list[int] = []

    def interrupt(line: str) -> None:
        pids.append(int(line))
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        # The shell's child `sleep` stands for a compiler that Ninja started.
        brun._stream(
            ["sh", "-c", "sleep 30 & echo $!; wait"],
            env=dict(os.environ),
            log=log,
            on_line=interrupt,
            spawn=proc.spawn,
        )
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while proc.pid_alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.pid_alive(pids[0])
    assert "interrupted" in log.getvalue()


_BUILD_SCRIPT = """
import os, sys
from llamactl import proc
from llamactl.build import run as build
build._stream(
    ["sh", "-c", "sleep 300 & echo started; wait"],
    env=dict(os.environ), log=open(os.devnull, "w"),
    on_line=lambda line: (print(line, end="", flush=True)), spawn=proc.spawn,
)
"""


@pytest.mark.fake
def test_sigterm_during_a_build_stops_the_whole_build(tmp_path: Path) -> None:
    # A `serve` stopped while it builds must not leave Ninja and compilers running: the
    # parent-death signal alone reaches only CMake, not its children.
    import psutil

    script = tmp_path / "build.py"
    script.write_text(_BUILD_SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "started\n"
        sleepers: list[psutil.Process] = []
        for _ in range(200):  # the forked shell may not have exec'd sleep yet
            sleepers = [
                p for p in psutil.Process(child.pid).children(recursive=True) if p.name() == "sleep"
            ]
            if sleepers:
                break
            time.sleep(0.05)
        assert sleepers
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
        _gone, alive = psutil.wait_procs(sleepers, timeout=10)
        assert not alive, "the build's grandchild outlived a SIGTERM of llamactl"
    finally:
        if child.poll() is None:
            child.kill()
