"""The llama.cpp build: the CMake plan (pure), running it with progress, and the build cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import __version__, locks, paths
from llamactl.build.cache import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    remember_auto,
)
from llamactl.errors import BuildError, SourceError

if TYPE_CHECKING:
    from rich.console import Console

    from llamactl.build.hardware import Decision, Detection
    from llamactl.build.source import SourceTree

BACKEND_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "hip", "vulkan", "metal", "sycl", "musa")
GPU_BACKENDS: frozenset[str] = frozenset({"cuda", "hip", "vulkan", "metal", "sycl", "musa"})
#: The only targets llamactl runs; building everything else would double the build time.
TARGETS: tuple[str, ...] = ("llama-server", "ggml-rpc-server", "llama-bench")
LOG_NAME = "build.log"

#: The name ggml's CMake prints in "Including <name> backend" (ggml/src/CMakeLists.txt).
BACKEND_CMAKE_NAMES: dict[str, str] = {
    "cpu": "CPU",
    "cuda": "CUDA",
    "hip": "HIP",
    "vulkan": "Vulkan",
    "metal": "METAL",
    "sycl": "SYCL",
    "musa": "MUSA",
}

#: MiB of memory one compile job may take: nvcc/hipcc and ggml-vulkan.cpp peak far above
#: plain C++ (RESOURCES.md); the kernel's OOM killer otherwise ends cc1plus mid-build.
JOB_MEMORY_MIB: dict[str, int] = {
    "cpu": 1024,
    "metal": 1024,
    "vulkan": 1536,
    "cuda": 2048,
    "hip": 2048,
    "musa": 2048,
    "sycl": 2048,
}

#: ggml-vulkan.cpp uses vk::LayerSettingEXT (VK_EXT_layer_settings, in Vulkan-Headers from
#: about 1.3.272); Debian 12's headers (239) fail after a long build with "'LayerSettingEXT'
#: is not a member of 'vk'" (RESOURCES.md), so refuse before starting.
MIN_VULKAN_HEADER = 272

#: Environment variables that change what CMake compiles, so they belong in the cache key.
KEY_ENV_VARS: tuple[str, ...] = (
    "CC",
    "CXX",
    "CUDACXX",
    "CUDAHOSTCXX",
    "HIPCXX",
    "HIP_PATH",
    "CMAKE_PREFIX_PATH",
)


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class BuildSpec:
    """What the user asked to build (CLI options, as data)."""

    backend: str = "auto"
    cuda_architectures: tuple[str, ...] = ()
    gpu_targets: tuple[str, ...] = ()
    jobs: int | None = None
    ui: bool | None = None  # None: on when npm is present
    rpc: bool = True
    native: bool = True
    clean: bool = False
    dry_run: bool = False
    extra_cmake_args: tuple[str, ...] = ()
    source: Path | None = None


@dataclass(frozen=True)
class Toolchain:
    """Facts about the build tools that the plan depends on (gathered by probe_toolchain)."""

    cmake: str | None = "cmake"
    cmake_version: str | None = None
    ninja: str | None = None
    ccache: str | None = None
    npm: str | None = None
    nvcc: str | None = None
    nvcc_version: str | None = None
    cublas: bool | None = None  # None: not checked
    host_cxx_version: str | None = None  # gcc version of the default C++ compiler
    host_compilers: tuple[tuple[str, int], ...] = ()  # (path, gcc major) candidates for nvcc
    hip_clang_dir: str | None = None  # hipconfig -l
    hip_root: str | None = None  # hipconfig -R
    glslc: str | None = None
    vulkan_header_version: int | None = None
    icpx: str | None = None
    cpu_count: int = 1
    available_mib: int | None = None
    env: tuple[tuple[str, str], ...] = ()  # the user's KEY_ENV_VARS that are set


@dataclass(frozen=True)
class Problem:
    """Something that makes the build fail for sure; run_build refuses before starting."""

    message: str
    hint: str | None = None


@dataclass(frozen=True)
class BuildPlan:
    """Exactly what a build runs: commands, environment, build directory and cache key."""

    backend: str
    commit: str
    source: Path
    build_dir: Path
    key: str
    cmake_args: tuple[str, ...]  # the -D arguments (part of the key)
    configure: tuple[str, ...]
    build: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # added to the caller's environment
    targets: tuple[str, ...]
    generator: str | None
    jobs: int
    ui: bool
    rpc: bool
    native: bool
    clean: bool = False
    toolchain: tuple[tuple[str, str], ...] = ()  # name -> version, for the manifest
    notes: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def manifest_path(self) -> Path:
        return self.build_dir / MANIFEST_NAME

    @property
    def log_path(self) -> Path:
        return self.build_dir / LOG_NAME

    def commands(self) -> list[str]:
        """The two commands as a user would type them, shell-quoted."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        lines = [shlex.join(self.configure), shlex.join(self.build)]
        return [f"{prefix} {line}" if prefix else line for line in lines]


# ---------------------------------------------------------------------------------------------
# Pure decisions


def parse_list(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Split "86,89" or "86;89 90" (or several options) into items."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        out.extend(p for p in re.split(r"[,;\s]+", item) if p)
    return tuple(out)


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        m2 = re.search(r"\d+", version)
        return (int(m2.group()),) if m2 else None
    return tuple(int(g) for g in m.groups() if g is not None)


def cuda_arch_from_capability(capability: str) -> str:
    """Compute capability "8.6" -> CMake architecture "86"; Blackwell 12.x -> "12Xa-real"."""
    cap = capability.strip()
    if "." not in cap:
        return cap
    major, minor = cap.split(".", 1)
    arch = f"{int(major)}{int(minor)}"
    # The vendored ggml-cuda CMakeLists rewrites 12X to 12Xa: the FP4 tensor core instructions
    # are not forward compatible; "-real" because a PTX copy buys nothing until the next family.
    if int(major) == 12:
        return f"{arch}a-real"
    return arch


def _arch_sort_key(arch: str) -> tuple[int, str]:
    m = re.match(r"\d+", arch)
    return (int(m.group()) if m else 0, arch)


def default_cuda_architectures(nvcc_version: str | None) -> tuple[str, ...]:
    """ggml's own non-native CUDA architecture list for this nvcc, spelled out."""
    # Spelled out so that a build on a machine without a GPU never asks nvcc for `native`.
    v = _version_tuple(nvcc_version) or (13, 0)
    archs: list[str] = []
    if v < (13,):
        archs += ["50-virtual", "61-virtual", "70-virtual"]  # CUDA 13 dropped these
    archs += ["75-virtual", "80-virtual", "86-real"]
    if v >= (11, 8):
        archs += ["89-real", "90-virtual"]
    if v >= (12, 8):
        archs.append("120a-real")
    if v >= (12, 9):
        archs.append("121a-real")
    return tuple(archs)


def nvcc_max_gcc(nvcc_version: str | None) -> int | None:
    """The newest gcc major this nvcc accepts as host compiler, when known."""
    from llamactl.build.hardware import CUDA_MAX_GCC  # lazily: serve's start-up path skips hardware

    v = _version_tuple(nvcc_version)
    if v is None:
        return None
    for since, gcc in CUDA_MAX_GCC:
        if v >= since:
            return gcc
    return None


def default_jobs(backend: str, threads: int | None, available_mib: int | None) -> int:
    """Parallel compile jobs: one per thread, fewer when memory cannot hold them; at least 1."""
    jobs = max(1, threads or 1)
    if available_mib:
        jobs = min(jobs, available_mib // JOB_MEMORY_MIB.get(backend, 1024))
    return max(1, jobs)


def cache_key(
    commit: str,
    backend: str,
    cmake_args: Sequence[str],
    env: Sequence[tuple[str, str]],
    targets: Sequence[str],
    cpu: str | None = None,
) -> str:
    """The build directory name: `<commit12>-<backend>-<hash of what changes the binaries>`."""
    # The source path is deliberately not part of it: another clone of the same commit with
    # the same configuration reuses the build.
    material = json.dumps(
        {
            "cmake_args": list(cmake_args),
            "env": sorted([k, v] for k, v in env),
            "targets": list(targets),
            "cpu": cpu,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(material.encode()).hexdigest()[:12]
    return f"{(commit or 'unknown')[:12]}-{backend}-{digest}"


def _detected_cuda_archs(detection: Detection, decision: Decision) -> tuple[str, ...]:
    if decision.backend == "cuda" and decision.cuda_architectures:
        return tuple(cuda_arch_from_capability(a) for a in decision.cuda_architectures)
    caps = {g.compute_capability for g in detection.gpus if g.vendor == "nvidia"}
    return tuple(cuda_arch_from_capability(c) for c in caps if c)


def _detected_gfx(detection: Detection, decision: Decision) -> tuple[str, ...]:
    if decision.backend == "hip" and decision.gpu_targets:
        return tuple(decision.gpu_targets)
    return tuple(
        sorted({g.gfx_target for g in detection.gpus if g.vendor == "amd" and g.gfx_target})
    )


def _has_define(args: Sequence[str], name: str) -> bool:
    return any(a.startswith((f"-D{name}=", f"-D{name}:")) for a in args)


def plan(
    spec: BuildSpec,
    detection: Detection,
    decision: Decision,
    source: SourceTree,
    toolchain: Toolchain,
    *,
    builds_root: Path | None = None,
) -> BuildPlan:
    """The exact CMake commands for this spec on this machine; pure (no probes, no files)."""
    if spec.backend not in BACKEND_CHOICES:
        raise BuildError(
            f"unknown backend {spec.backend!r}", hint=f"choose one of {', '.join(BACKEND_CHOICES)}"
        )
    backend = decision.backend if spec.backend == "auto" else spec.backend
    if backend not in BACKEND_CMAKE_NAMES:
        raise BuildError(f"the hardware decision named an unknown backend {backend!r}")
    notes: list[str] = [decision.reason] if decision.reason else []
    if decision.backend == backend:
        notes += list(decision.hints)
    problems: list[Problem] = []
    env: dict[str, str] = {}
    extra = tuple(spec.extra_cmake_args)

    if not toolchain.cmake:
        problems.append(Problem("cmake not found", "install cmake >= 3.18 (apt-get install cmake)"))

    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]
    if source.origin != "custom" and len(source.commit) >= 7:
        # llama.cpp asks git for its version, and in a tree without .git (the PyPI sdist) git
        # answers for the enclosing repository: llamactl's own commit. Name the pinned commit;
        # the build number (a commit count) is not known without the history.
        args += [f"-DLLAMA_BUILD_COMMIT={source.commit[:7]}", "-DLLAMA_BUILD_NUMBER=0"]
    if spec.rpc:
        args.append("-DGGML_RPC=ON")

    ui = spec.ui if spec.ui is not None else toolchain.npm is not None
    if ui:
        # Build tools/ui with npm; the prebuilt default downloads from Hugging Face.
        args += ["-DLLAMA_BUILD_UI=ON", "-DLLAMA_USE_PREBUILT_UI=OFF"]
        if not toolchain.npm:
            problems.append(
                Problem(
                    "the web UI needs npm, which is not installed", "install node/npm or --no-ui"
                )
            )
    else:
        args.append("-DLLAMA_USE_PREBUILT_UI=OFF")
        if spec.ui is None:
            notes.append("npm not found: building without the web UI (GET / answers 404)")

    if not spec.native:
        args.append("-DGGML_NATIVE=OFF")

    if backend == "cpu":
        if detection.os == "darwin":
            args.append("-DGGML_METAL=OFF")  # Metal is on by default on macOS
    elif backend == "cuda":
        args.append("-DGGML_CUDA=ON")
        if not _has_define(extra, "CMAKE_CUDA_ARCHITECTURES"):
            archs = tuple(cuda_arch_from_capability(a) for a in spec.cuda_architectures)
            origin = "as asked"
            if not archs:
                archs = _detected_cuda_archs(detection, decision)
                origin = "from the detected GPUs"
            if not archs:
                # No GPU to ask: `native` would fail at build time, so name ggml's own
                # non-native list for this nvcc (ggml/src/ggml-cuda/CMakeLists.txt).
                archs = default_cuda_architectures(toolchain.nvcc_version)
                origin = "no NVIDIA GPU detected: ggml's generic list (slow to compile)"
            archs = tuple(sorted(dict.fromkeys(archs), key=_arch_sort_key))
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
            notes.append(f"CUDA architectures {';'.join(archs)} ({origin})")
            nv = _version_tuple(toolchain.nvcc_version)
            old = [a for a in archs if _arch_sort_key(a)[0] < 75]
            if nv and nv >= (13,) and old:
                problems.append(
                    Problem(
                        f"CUDA {toolchain.nvcc_version} cannot compile for {', '.join(old)}",
                        "CUDA 13 dropped architectures below 7.5: use an older CUDA toolkit",
                    )
                )
        if not toolchain.nvcc:
            problems.append(
                Problem(
                    "nvcc not found",
                    "install the CUDA toolkit and put its bin/ on PATH (or set CUDACXX)",
                )
            )
        elif toolchain.cublas is False and not any("cublas" in h.lower() for h in notes):
            notes.append(
                "cuBLAS headers (cublas_v2.h) not found next to nvcc: configure will fail with "
                "'CUDA::cublas' unless the full toolkit is installed"
            )
        user_host = "CUDAHOSTCXX" in dict(toolchain.env) or _has_define(
            extra, "CMAKE_CUDA_HOST_COMPILER"
        )
        max_gcc = nvcc_max_gcc(toolchain.nvcc_version)
        host = _version_tuple(toolchain.host_cxx_version)
        if not user_host and max_gcc is not None and host is not None and host[0] > max_gcc:
            fits = sorted(
                (c for c in toolchain.host_compilers if c[1] <= max_gcc), key=lambda c: -c[1]
            )
            if fits:
                args.append(f"-DCMAKE_CUDA_HOST_COMPILER={fits[0][0]}")
                notes.append(
                    f"nvcc {toolchain.nvcc_version} accepts gcc <= {max_gcc}, the default is "
                    f"{toolchain.host_cxx_version}: host compiler {fits[0][0]}"
                )
            else:
                problems.append(
                    Problem(
                        f"nvcc {toolchain.nvcc_version} does not support gcc "
                        f"{toolchain.host_cxx_version} (newest supported: {max_gcc})",
                        f"install g++-{max_gcc} (llamactl then uses it as "
                        "CMAKE_CUDA_HOST_COMPILER) or a newer CUDA toolkit",
                    )
                )
    elif backend == "hip":
        args.append("-DGGML_HIP=ON")
        if not _has_define(extra, "GPU_TARGETS"):
            targets = spec.gpu_targets or _detected_gfx(detection, decision)
            if targets:
                args.append(f"-DGPU_TARGETS={';'.join(targets)}")
            else:
                notes.append(
                    "no AMD GPU detected and no --gpu-targets: ROCm builds for the GPUs present"
                )
        # docs/build.md: HIPCXX="$(hipconfig -l)/clang" HIP_PATH="$(hipconfig -R)"
        if toolchain.hip_clang_dir and toolchain.hip_root:
            env["HIPCXX"] = f"{toolchain.hip_clang_dir.rstrip('/')}/clang"
            env["HIP_PATH"] = toolchain.hip_root
        else:
            problems.append(
                Problem("hipconfig not found", "install ROCm and put /opt/rocm/bin on PATH")
            )
    elif backend == "vulkan":
        args.append("-DGGML_VULKAN=ON")
        if detection.os == "darwin":
            args.append("-DGGML_METAL=OFF")
        if not toolchain.glslc:
            problems.append(
                Problem(
                    "glslc not found (the Vulkan shader compiler)",
                    "install the Vulkan SDK, or on Debian/Ubuntu: "
                    "apt-get install libvulkan-dev glslc spirv-headers",
                )
            )
        if toolchain.vulkan_header_version is None:
            notes.append("Vulkan headers (vulkan/vulkan_core.h) not found: install libvulkan-dev")
        elif toolchain.vulkan_header_version < MIN_VULKAN_HEADER:
            problems.append(
                Problem(
                    f"Vulkan headers too old (VK_HEADER_VERSION {toolchain.vulkan_header_version},"
                    f" this llama.cpp needs about {MIN_VULKAN_HEADER}+ for vk::LayerSettingEXT)",
                    "install the LunarG Vulkan SDK (source its setup-env.sh) or newer "
                    "libvulkan-dev (Debian 13, Ubuntu 24.04)",
                )
            )
    elif backend == "metal":
        args.append("-DGGML_METAL=ON")
        if detection.os != "darwin":
            problems.append(Problem("Metal exists only on macOS", "choose --backend vulkan or cpu"))
    elif backend == "sycl":
        # docs/backend/SYCL.md: oneAPI's icx/icpx after `source /opt/intel/oneapi/setvars.sh`.
        args += ["-DGGML_SYCL=ON", "-DCMAKE_C_COMPILER=icx", "-DCMAKE_CXX_COMPILER=icpx"]
        if not toolchain.icpx:
            problems.append(
                Problem(
                    "icpx not found",
                    "install Intel oneAPI and run `source /opt/intel/oneapi/setvars.sh` first",
                )
            )
    elif backend == "musa":
        args.append("-DGGML_MUSA=ON")
        if spec.gpu_targets and not _has_define(extra, "MUSA_ARCHITECTURES"):
            args.append(f"-DMUSA_ARCHITECTURES={';'.join(spec.gpu_targets)}")

    if spec.backend != "auto" and backend in GPU_BACKENDS and backend != decision.backend:
        notes.append(f"--backend {backend} overrides the detected choice ({decision.backend})")

    args += list(extra)

    generator = "Ninja" if toolchain.ninja else None
    jobs = (
        spec.jobs
        if spec.jobs
        else default_jobs(
            backend,
            detection.cpu_threads or detection.cpu_cores or toolchain.cpu_count,
            detection.ram_available_mib or toolchain.available_mib,
        )
    )
    if jobs < 1:
        raise BuildError("--jobs must be at least 1")
    targets = TARGETS if spec.rpc else tuple(t for t in TARGETS if t != "ggml-rpc-server")

    key_env = tuple(sorted({**dict(toolchain.env), **env}.items()))
    # -march=native code is only valid on CPUs like this one; a cache shared between machines
    # must not hand it to another CPU.
    cpu = None
    if spec.native:
        cpu = f"{detection.arch}:{','.join(sorted(set(detection.cpu_features)))}"
    key = cache_key(source.commit, backend, args, key_env, targets, cpu)
    build_dir = (builds_root if builds_root is not None else paths.builds_dir()) / key

    configure = ["cmake", "-S", str(source.path), "-B", str(build_dir)]
    if generator:
        configure += ["-G", generator]
    configure += args
    build = ["cmake", "--build", str(build_dir), "--target", *targets, "-j", str(jobs)]

    versions: dict[str, str | None] = {
        name: tool.version for name, tool in detection.tools.items() if tool.version
    }
    versions.update(
        {
            "cmake": toolchain.cmake_version or versions.get("cmake"),
            "cxx": toolchain.host_cxx_version or versions.get("cxx"),
            "nvcc": toolchain.nvcc_version if backend == "cuda" else None,
            "vulkan_headers": str(toolchain.vulkan_header_version)
            if backend == "vulkan" and toolchain.vulkan_header_version
            else None,
            "generator": generator or "default",
            "ccache": "yes" if toolchain.ccache else None,
        }
    )
    return BuildPlan(
        backend=backend,
        commit=source.commit,
        source=source.path,
        build_dir=build_dir,
        key=key,
        cmake_args=tuple(args),
        configure=tuple(configure),
        build=tuple(build),
        env=tuple(sorted(env.items())),
        targets=targets,
        generator=generator,
        jobs=jobs,
        ui=ui,
        rpc=spec.rpc,
        native=spec.native,
        clean=spec.clean,
        toolchain=tuple(sorted((k, v) for k, v in versions.items() if v)),
        notes=tuple(notes),
        problems=tuple(problems),
    )


# ---------------------------------------------------------------------------------------------
# Progress and failure parsing (pure)


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]\s*(.*)$")


@dataclass(frozen=True)
class Step:
    """One progress update: `done` of `total` steps, and what is being done."""

    done: int
    total: int
    description: str


def parse_progress(line: str) -> Step | None:
    """Ninja's `[n/m] Building CXX object ...` (or Make's `[ 42%] ...`) as a Step."""
    line = line.rstrip("\r\n")
    m = _NINJA_STEP.match(line)
    if m:
        return Step(int(m.group(1)), int(m.group(2)), _short_description(m.group(3)))
    m = _MAKE_STEP.match(line)
    if m:
        return Step(int(m.group(1)), 100, _short_description(m.group(2)))
    return None


def _short_description(text: str) -> str:
    # "Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o" -> "Building ggml.cpp"
    m = re.match(r"(Building \w+) object .*/([^/]+?)\.o(?:bj)?$", text)
    if m:
        return f"{m.group(1).split()[0]} {m.group(2)}"
    m = re.match(r"(Linking) \w+ (?:\w+ )*?(?:library|executable) (.*)$", text)
    if m:
        return f"Linking {Path(m.group(2)).name}"
    return text if len(text) <= 60 else text[:57] + "..."


# "FAILED" stays case-sensitive: Ninja's own "FAILED: <target>" line, not "subcommand failed".
_ERROR_LINE = re.compile(r"(?i:error|fatal|killed)|FAILED|unsupported GNU version")
_NOT_ERROR = re.compile(r"-Werror|-Wno-error|error_|_error|Werror=|errors? 0\b", re.IGNORECASE)

#: (pattern in the log, hint): the failures users hit most, most specific first.
FAILURE_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"unsupported GNU version|unsupported clang version"),
        "nvcc does not support this host compiler: install an older g++ (e.g. g++-12) and "
        "rebuild with `llamactl build -- -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-12` "
        "(or set CUDAHOSTCXX), or install a newer CUDA toolkit",
    ),
    (
        re.compile(r"CUDA::cublas|cublas_v2\.h"),
        "the CUDA toolkit has no cuBLAS: install the full toolkit (e.g. apt-get install "
        "cuda-toolkit, or libcublas-dev) or build another backend (--backend cpu)",
    ),
    (
        re.compile(r"No CMAKE_CUDA_COMPILER could be found|Failed to find nvcc|CUDA Toolkit not"),
        "nvcc was not found: install the CUDA toolkit and put its bin/ on PATH (or set CUDACXX)",
    ),
    (
        re.compile(r"Unsupported gpu architecture|nvcc fatal.*arch"),
        "nvcc cannot compile for one of the CUDA architectures: pass the right ones with "
        "--cuda-arch (nvidia-smi --query-gpu=compute_cap --format=csv); CUDA 13 dropped < 7.5",
    ),
    (
        re.compile(r"LayerSettingEXT|CooperativeMatrixFeaturesKHR"),
        "the Vulkan headers are too old for this llama.cpp: install the LunarG Vulkan SDK or a "
        "newer libvulkan-dev (Debian 13 / Ubuntu 24.04)",
    ),
    (
        re.compile(r"glslc|Could NOT find Vulkan|spirv/unified1/spirv\.hpp"),
        "the Vulkan SDK is incomplete: install glslc, the Vulkan headers and SPIRV-Headers "
        "(Debian/Ubuntu: apt-get install libvulkan-dev glslc spirv-headers) or the LunarG SDK",
    ),
    (
        re.compile(
            r"invalid target ID|invalid offload arch|unsupported HIP gpu architecture|"
            r"Unsupported AMDGPU target|amdgpu-target|gfx\w+ is not (?:a )?(?:valid|supported)",
            re.IGNORECASE,
        ),
        "ROCm cannot compile for that gfx target: pass the GPU's own with --gpu-targets "
        "(rocminfo | grep gfx); for an unsupported card build its family's target, e.g. gfx1030, "
        "and set HSA_OVERRIDE_GFX_VERSION at run time",
    ),
    (
        re.compile(r"cannot find ROCm device library"),
        "set HIP_DEVICE_LIB_PATH to the folder under ROCm that holds oclc_abi_version_400.bc",
    ),
    (
        re.compile(
            r"Killed signal terminated program|signal 9|virtual memory exhausted|"
            r"cannot allocate memory|out of memory allocating"
        ),
        "the compiler was killed for lack of memory: build with fewer jobs, e.g. `llamactl build "
        "-j 1`",
    ),
    (
        re.compile(
            r"UI: npm (?:ci|run build) failed|UI: no assets available|UI: npm build finished"
            r" but assets missing|npm ERR!"
        ),
        "building the web UI with npm failed (see the log): fix npm/node, or build without the "
        "UI: `llamactl build --no-ui`",
    ),
    (
        re.compile(
            r"Could not find compiler set in environment variable (?:CC|CXX)|"
            r"icpx.*not found|No CMAKE_CXX_COMPILER could be found"
        ),
        "the C/C++ compiler was not found: install build-essential (or, for SYCL, source "
        "oneAPI's setvars.sh first)",
    ),
    (
        re.compile(r"does not match the source .* used to generate cache"),
        "this build directory was configured from another tree: `llamactl build --clean`",
    ),
)


def error_lines(log_text: str, limit: int = 12) -> list[str]:
    """The first lines of a build log that say what went wrong."""
    out: list[str] = []
    seen: set[str] = set()
    lines = log_text.splitlines()
    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if not line or not _ERROR_LINE.search(line):
            continue
        if _NOT_ERROR.search(line) and not re.search(r"error:|FAILED:|fatal", line):
            continue
        picked = [line]
        if line.startswith("CMake Error"):
            # CMake puts the message itself on the indented lines that follow.
            for follow in lines[i + 1 : i + 8]:
                if follow.strip() and not follow.startswith(" "):
                    break
                if follow.strip():
                    picked.append(follow.rstrip())
        for item in picked:
            if item in seen:
                continue
            seen.add(item)
            out.append(item if len(item) <= 400 else item[:397] + "...")
        if len(out) >= limit:
            break
    return out[:limit]


def failure_hint(log_text: str) -> str | None:
    """The hint for the first known failure found in a build log."""
    for pattern, hint in FAILURE_HINTS:
        if pattern.search(log_text):
            return hint
    return None


_INCLUDING = re.compile(r"Including (\S+) backend")


def included_backends(configure_log: str) -> tuple[str, ...]:
    """The backends ggml's configure step says it compiled in ("-- Including CUDA backend")."""
    return tuple(dict.fromkeys(m.group(1) for m in _INCLUDING.finditer(configure_log)))


def parse_devices(list_devices_output: str) -> tuple[str, ...]:
    """`llama-server --list-devices` output -> ("CUDA0: NVIDIA H100 (...)", ...)."""
    devices: list[str] = []
    started = False
    for line in list_devices_output.splitlines():
        if line.startswith("Available devices"):
            started = True
            continue
        if started and line.startswith("  ") and line.strip() != "(none)" and ":" in line:
            devices.append(line.strip())
    return tuple(devices)


# ---------------------------------------------------------------------------------------------
# Effects: probing tools, the cache


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _tool_version(detection: Detection, name: str) -> str | None:
    tool = detection.tools.get(name)
    return tool.version if tool is not None and tool.version else None


def _gcc_version(cxx: str) -> str | None:
    from llamactl import proc

    out = proc.run([cxx, "--version"], timeout=5)
    if not out.ok or "clang" in out.stdout.lower():
        return None
    m = re.search(r"\)\s*(\d+\.\d+(?:\.\d+)?)", out.stdout.splitlines()[0] if out.stdout else "")
    if m:
        return m.group(1)
    out = proc.run([cxx, "-dumpfullversion", "-dumpversion"], timeout=5)
    return out.stdout.strip() or None if out.ok else None


def _cuda_roots(nvcc: str, version: str | None) -> list[Path]:
    roots: list[Path] = []
    for var in ("CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]))
    roots.append(Path(nvcc).resolve().parent.parent)
    v = _version_tuple(version)
    if v and len(v) >= 2:
        roots.append(Path(f"/usr/local/cuda-{v[0]}.{v[1]}"))
    roots += [Path("/usr/local/cuda"), Path("/opt/cuda"), Path("/usr")]
    return roots


def _has_cublas(nvcc: str, version: str | None) -> bool:
    for root in _cuda_roots(nvcc, version):
        if (root / "include" / "cublas_v2.h").is_file():
            return True
        if any(root.glob("targets/*/include/cublas_v2.h")):
            return True
    return False


def _nvcc_wrapper_root(nvcc: str) -> str | None:
    # Some installs put a shell wrapper on PATH (exec /usr/local/cuda-X/bin/nvcc "$@").
    try:
        head = Path(nvcc).read_bytes()[:400].decode(errors="replace")
    except OSError:
        return None
    m = re.search(r"exec\s+(\S+/bin/nvcc)", head)
    return m.group(1) if m else None


def vulkan_header_version(roots: Sequence[Path] | None = None) -> int | None:
    """VK_HEADER_VERSION from vulkan_core.h (the SDK's or the system's), when installed."""
    if roots is None:
        candidates = []
        if os.environ.get("VULKAN_SDK"):
            candidates.append(Path(os.environ["VULKAN_SDK"]) / "include")
        candidates += [
            Path("/usr/include"),
            Path("/usr/local/include"),
            Path("/opt/homebrew/include"),
        ]
        roots = candidates
    for root in roots:
        header = root / "vulkan" / "vulkan_core.h"
        try:
            text = header.read_text(errors="replace")
        except OSError:
            continue
        m = re.search(r"#define\s+VK_HEADER_VERSION\s+(\d+)", text)
        if m:
            return int(m.group(1))
    return None


def _available_mib() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available // (1024 * 1024))
    except Exception:  # psutil missing or unreadable /proc: the jobs default then uses cores
        return None


def probe_toolchain(detection: Detection, backend: str) -> Toolchain:
    """Gather the tool facts plan() needs for this backend."""
    # Only the chosen backend's tools are probed, so that a no-op build stays fast.
    from llamactl import proc

    env = tuple(sorted((k, os.environ[k]) for k in KEY_ENV_VARS if os.environ.get(k)))
    facts: dict[str, Any] = {
        "cmake": _which("cmake"),
        "cmake_version": _tool_version(detection, "cmake"),
        "ninja": _which("ninja", "ninja-build"),
        "ccache": _which("ccache"),
        "npm": _which("npm"),
        "host_cxx_version": _tool_version(detection, "cxx"),
        "cpu_count": os.cpu_count() or 1,
        "available_mib": None,
        "env": env,
    }
    if not (detection.cpu_threads or detection.cpu_cores) or not detection.ram_available_mib:
        facts["available_mib"] = _available_mib()
    if backend == "cuda":
        nvcc = os.environ.get("CUDACXX") or _which("nvcc")
        if nvcc is None:
            for root in ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc"):
                if Path(root).is_file():
                    nvcc = root
                    break
        facts["nvcc"] = nvcc
        if nvcc:
            version = _tool_version(detection, "nvcc")
            if not version:
                out = proc.run([nvcc, "--version"], timeout=10)
                m = re.search(r"release (\d+\.\d+)", out.stdout)
                version = m.group(1) if m else None
            facts["nvcc_version"] = version
            known = detection.tools.get("cublas")
            if known is not None and (known.ok or known.path):
                facts["cublas"] = known.ok
            else:
                facts["cublas"] = _has_cublas(_nvcc_wrapper_root(nvcc) or nvcc, version)
        cxx = os.environ.get("CXX") or _which("c++", "g++")
        if cxx:
            facts["host_cxx_version"] = _gcc_version(cxx) or facts["host_cxx_version"]
        candidates: list[tuple[str, int]] = []
        for major in range(8, 16):
            path = _which(f"g++-{major}")
            if path:
                candidates.append((path, major))
        facts["host_compilers"] = tuple(candidates)
    elif backend == "hip":
        hipconfig = _which("hipconfig") or (
            "/opt/rocm/bin/hipconfig" if Path("/opt/rocm/bin/hipconfig").is_file() else None
        )
        if hipconfig:
            out_l = proc.run([hipconfig, "-l"], timeout=10)
            out_r = proc.run([hipconfig, "-R"], timeout=10)
            facts["hip_clang_dir"] = out_l.stdout.strip() or None if out_l.ok else None
            facts["hip_root"] = out_r.stdout.strip() or None if out_r.ok else None
    elif backend == "vulkan":
        facts["glslc"] = _which("glslc")
        facts["vulkan_header_version"] = vulkan_header_version()
    elif backend == "sycl":
        facts["icpx"] = _which("icpx")
    return Toolchain(**facts)


def write_manifest(manifest: Manifest) -> Path:
    """Write manifest.json atomically: a reader sees a whole manifest or none."""
    target = manifest.path / MANIFEST_NAME
    tmp = target.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------
# The core: from a spec to a plan, and from a plan to a build


def _detect() -> Detection:
    from llamactl.build.hardware import detect

    return detect()


def _decide(detection: Detection, requested: str) -> Decision:
    from llamactl.build.hardware import decide

    return decide(detection, requested)


def _pinned_source() -> SourceTree:
    """The pinned tree as it will be once fetched (dry runs plan against it)."""
    from llamactl.build.source import SourceTree, default_tree_path, load_pin

    pin = load_pin()
    return SourceTree(path=default_tree_path(), commit=pin.commit, origin="pin", pinned=True)


def resolve_plan(
    spec: BuildSpec,
    *,
    fetch: bool = True,
    console: Console | None = None,
    detection: Detection | None = None,
) -> BuildPlan:
    """Detect, decide, find (or fetch) the source, and plan."""
    # Without `fetch` (and in dry runs) a missing pinned tree is planned at the pinned commit.
    from llamactl.build.source import ensure_source, resolve_source

    if spec.dry_run or not fetch:
        try:
            source = resolve_source(spec.source)
        except SourceError:
            if spec.source is not None or os.environ.get("LLAMACTL_SOURCE"):
                raise
            source = _pinned_source()
    else:
        source = ensure_source(spec.source, console=console)
    detection = detection if detection is not None else _detect()
    decision = _decide(detection, spec.backend)
    backend = decision.backend if spec.backend == "auto" else spec.backend
    toolchain = probe_toolchain(detection, backend)
    return plan(spec, detection, decision, source, toolchain)


@dataclass(frozen=True)
class BuildOutcome:
    """What `llamactl build` did: planned only, found it up to date, or built it."""

    plan: BuildPlan
    state: str  # dry-run | up-to-date | built
    manifest: Manifest | None = None


ProgressFactory = Callable[[], contextlib.AbstractContextManager[Callable[[Step], None]]]


def build_llama(
    spec: BuildSpec,
    *,
    console: Callable[[], Console] | None = None,
    progress: ProgressFactory | None = None,
) -> BuildOutcome:
    """`llamactl build`: plan, return at once when that build exists, else fetch and build."""
    outcome = _build_llama(spec, console=console, progress=progress)
    if spec.backend == "auto" and outcome.manifest is not None:
        # serve picks this one among several builds without running the probes again.
        with contextlib.suppress(OSError):
            remember_auto(outcome.manifest.commit, outcome.manifest.key)
    return outcome


def _build_llama(
    spec: BuildSpec,
    *,
    console: Callable[[], Console] | None = None,
    progress: ProgressFactory | None = None,
) -> BuildOutcome:
    # `console` and `progress` are factories, called only when a build really runs, so that
    # the no-op path imports nothing heavy (rich) and fetches nothing.
    detection = _detect()
    the_plan = resolve_plan(spec, fetch=False, detection=detection)
    if spec.dry_run:
        return BuildOutcome(the_plan, "dry-run")
    if not spec.clean:
        existing = load_manifest(the_plan.build_dir)
        if existing is not None and existing.server_binary.is_file():
            return BuildOutcome(the_plan, "up-to-date", existing)
    preflight(the_plan)

    def waiting() -> None:
        message = f"waiting for another llamactl building {the_plan.key} ..."
        if console is not None:
            console().print(message)
        else:
            print(message, file=sys.stderr)

    # Two builds of one configuration at once would share (and wreck) one build directory.
    with locks.held(the_plan.build_dir.with_name(f".{the_plan.key}.lock"), on_wait=waiting):
        if spec.clean:
            if the_plan.build_dir.exists():
                shutil.rmtree(the_plan.build_dir)
        else:
            existing = load_manifest(the_plan.build_dir)  # the other one may have built it
            if existing is not None and existing.server_binary.is_file():
                return BuildOutcome(the_plan, "up-to-date", existing)
        return _build_locked(spec, the_plan, detection, console, progress)


def _build_locked(
    spec: BuildSpec,
    the_plan: BuildPlan,
    detection: Detection,
    console: Callable[[], Console] | None,
    progress: ProgressFactory | None,
) -> BuildOutcome:
    from llamactl.build.source import ensure_source

    tree = ensure_source(spec.source, console=console() if console else None)
    if (tree.path, tree.commit) != (the_plan.source, the_plan.commit):
        the_plan = resolve_plan(replace(spec, clean=False), fetch=False, detection=detection)
        the_plan = replace(the_plan, clean=spec.clean)
    if progress is None:
        manifest = run_build(the_plan)
    else:
        with progress() as on_step:
            manifest = run_build(the_plan, on_step=on_step)
    return BuildOutcome(the_plan, "built", manifest)


def preflight(the_plan: BuildPlan) -> None:
    """Refuse a plan that is sure to fail, before fetching or compiling anything."""
    if the_plan.problems:
        first = the_plan.problems[0]
        extra = "".join(f"\n  also: {p.message}" for p in the_plan.problems[1:])
        message = f"cannot build {the_plan.backend}: {first.message}{extra}"
        raise BuildError(message, hint=first.hint)


class BuildInterrupted(BuildError):
    """The user pressed Ctrl-C during a build."""

    exit_code = 130


def _reset_stale_cache(build_dir: Path, source: Path, generator: str | None) -> None:
    """Drop a half-done configuration made from another tree or with another generator."""
    # CMake refuses to reuse those, and another clone of the same commit shares the build dir.
    cache = build_dir / "CMakeCache.txt"
    try:
        text = cache.read_text(errors="replace")
    except OSError:
        return
    home = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", text, re.MULTILINE)
    gen = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", text, re.MULTILINE)
    stale = home is not None and Path(home.group(1)).resolve() != source.resolve()
    wanted = generator or ("Unix Makefiles" if os.name != "nt" else None)
    if gen is not None and wanted is not None and gen.group(1) != wanted:
        stale = True
    if stale:
        cache.unlink(missing_ok=True)
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


Spawn = Callable[..., "subprocess.Popen[bytes]"]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _stream(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Any,
    on_line: Callable[[str], None],
    spawn: Spawn,
) -> int:
    """Run one command, copy its output to the log line by line, return its exit code."""
    # Ctrl-C stops the command's whole process group (CMake, Ninja and the compilers).
    from llamactl import proc

    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    child = spawn(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with _terminate_raises():
            assert child.stdout is not None
            for raw in child.stdout:
                # Compilers colour their diagnostics even into a pipe (ccache asks them to).
                line = _ANSI.sub("", raw.decode(errors="replace"))
                log.write(line)
                on_line(line)
            return child.wait()
    except BaseException as exc:
        # Ctrl-C, SIGTERM (a `serve` that is stopped while it builds) or any error: CMake,
        # Ninja and the compilers go too; the parent-death signal alone would reach CMake only.
        proc.stop_group(child.pid, grace=5.0, popen=child)
        why = "by the user" if isinstance(exc, KeyboardInterrupt) else f"({exc!r})"
        log.write(f"\n[llamactl] interrupted {why}\n")
        raise
    finally:
        log.flush()


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """While a build runs in the main thread, SIGTERM and SIGHUP raise SystemExit (128 + signal)
    instead of ending Python at once, so that the build's process group is stopped first."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to restore
                signal.signal(sig, handler)


def _fail(message: str, the_plan: BuildPlan, log_text: str, hint: str | None = None) -> BuildError:
    lines = error_lines(log_text)
    body = message
    if lines:
        body += "\n" + "\n".join(f"  {line}" for line in lines)
    body += f"\nfull log: {the_plan.log_path}"
    return BuildError(body, hint=hint or failure_hint(log_text))


def run_build(
    the_plan: BuildPlan,
    *,
    on_step: Callable[[Step], None] | None = None,
    spawn: Spawn | None = None,
    runner: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Manifest:
    """Configure and compile, verify the binaries and the backend, then write the manifest."""
    from llamactl import proc

    spawn = spawn or proc.spawn
    runner = runner or proc.run
    preflight(the_plan)
    if not (the_plan.source / "CMakeLists.txt").is_file():
        raise BuildError(
            f"no llama.cpp source at {the_plan.source}", hint="run `llamactl source fetch`"
        )
    step = on_step or (lambda _s: None)
    the_plan.build_dir.mkdir(parents=True, exist_ok=True)
    (the_plan.build_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _reset_stale_cache(the_plan.build_dir, the_plan.source, the_plan.generator)
    env = {**os.environ, **dict(the_plan.env)}
    # Ninja prints one "[n/m] ..." line per step when its output is not a terminal.
    env.setdefault("NINJA_STATUS", "[%f/%t] ")
    env.pop("CLICOLOR_FORCE", None)
    started = clock()
    configure_lines: list[str] = []

    with open(the_plan.log_path, "w", encoding="utf-8", buffering=1) as log:
        # Line-buffered: `tail -f build.log` follows a running build.
        log.write(f"# llamactl {__version__} build {the_plan.key}\n")
        for k, v in the_plan.env:
            log.write(f"# env {k}={v}\n")
        step(Step(0, 0, "configuring"))

        def on_configure(line: str) -> None:
            configure_lines.append(line)
            if line.startswith("-- "):
                step(Step(0, 0, f"configuring: {line[3:].strip()[:50]}"))

        try:
            rc = _stream(the_plan.configure, env=env, log=log, on_line=on_configure, spawn=spawn)
        except KeyboardInterrupt:
            raise BuildInterrupted("build interrupted while configuring") from None
        if rc != 0:
            log.flush()
            raise _fail(f"cmake configure failed (exit {rc})", the_plan, "".join(configure_lines))

        def on_build(line: str) -> None:
            parsed = parse_progress(line)
            if parsed is not None:
                step(parsed)

        try:
            rc = _stream(the_plan.build, env=env, log=log, on_line=on_build, spawn=spawn)
        except KeyboardInterrupt:
            raise BuildInterrupted(
                "build interrupted; the next `llamactl build` continues where it stopped",
            ) from None
    log_text = the_plan.log_path.read_text(errors="replace")
    if rc != 0:
        raise _fail(f"the build failed (exit {rc})", the_plan, log_text)
    duration = clock() - started
    return _verify_and_record(the_plan, log_text, "".join(configure_lines), duration, runner)


def _verify_and_record(
    the_plan: BuildPlan,
    log_text: str,
    configure_log: str,
    duration: float,
    runner: Callable[..., Any],
) -> Manifest:
    """Check the binaries and the compiled-in backend, then write the manifest (last)."""
    binaries: dict[str, str] = {}
    missing: list[str] = []
    for target in the_plan.targets:
        rel = Path("bin") / target
        if (the_plan.build_dir / rel).is_file():
            binaries[target] = str(rel)
        else:
            missing.append(target)
    if missing:
        raise _fail(f"the build finished but {', '.join(missing)} is missing", the_plan, log_text)

    warnings: list[str] = []
    included = included_backends(configure_log)
    wanted = BACKEND_CMAKE_NAMES[the_plan.backend]
    if the_plan.backend != "cpu" and wanted.lower() not in {b.lower() for b in included}:
        # A GPU request must never end silently in a CPU-only build.
        raise _fail(
            f"asked for {the_plan.backend} but the configure step did not include the {wanted} "
            f"backend (included: {', '.join(included) or 'none'})",
            the_plan,
            configure_log,
        )
    if the_plan.ui and re.search(
        r"UI: no assets available|UI: npm (?:ci|run build) failed", log_text
    ):
        raise _fail(
            "the web UI was asked for but npm did not build it",
            the_plan,
            log_text,
            hint="fix npm/node (see the log), or build without it: `llamactl build --no-ui`",
        )

    server = the_plan.build_dir / binaries["llama-server"]
    version = runner([str(server), "--version"], timeout=30)
    server_version = (version.stdout + version.stderr).strip()
    if not version.ok:
        raise BuildError(
            f"the built llama-server does not run: {server} --version exited {version.returncode}"
            f"\n{server_version[-2000:]}",
            hint=f"see {the_plan.log_path}; `llamactl build --clean` starts over",
        )
    listed = runner([str(server), "--list-devices"], timeout=60)
    devices = parse_devices(listed.stdout + listed.stderr)
    if the_plan.backend not in ("cpu", "metal") and not any(
        d.lower().startswith(wanted.lower()) for d in devices
    ):
        warnings.append(
            f"llama-server --list-devices shows no {wanted} device on this machine "
            "(the backend is compiled in; a GPU or driver is missing here)"
        )

    manifest = Manifest(
        key=the_plan.key,
        commit=the_plan.commit,
        backend=the_plan.backend,
        cmake_args=the_plan.cmake_args,
        env=the_plan.env,
        targets=the_plan.targets,
        binaries=binaries,
        toolchain=dict(the_plan.toolchain),
        duration_s=duration,
        created=time.time(),
        llamactl_version=__version__,
        source=str(the_plan.source),
        generator=the_plan.generator,
        jobs=the_plan.jobs,
        ui=the_plan.ui,
        rpc=the_plan.rpc,
        native=the_plan.native,
        server_version=server_version,
        backends_included=included,
        devices=devices,
        warnings=tuple(warnings),
        path=the_plan.build_dir,
    )
    write_manifest(manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Rendering helpers (rich), used by the CLI


@contextlib.contextmanager
def rich_progress(console: Console) -> Iterator[Callable[[Step], None]]:
    """A progress bar (description, bar, n/m, elapsed) fed by Steps."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", style="cyan"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("configuring", total=None)

    def update(step: Step) -> None:
        if step.total:
            progress.update(
                task, completed=step.done, total=step.total, description=step.description[:48]
            )
        else:
            progress.update(task, description=step.description[:48])

    with progress:
        yield update
