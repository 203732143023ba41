"""The build plan, pure: a `BuildSpec` (what the user asked), a `Detection` and `Decision`
(the machine), the source tree and the `Toolchain` facts -> the exact CMake commands, build
directory and cache key (`BuildPlan`). No probes, no files, no processes: llamactl.build.run
carries a plan out."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import paths
from llamactl.build.cache import MANIFEST_NAME
from llamactl.build.detection import VULKAN_MIN_HEADER, cuda_arch, cuda_max_gcc
from llamactl.build.toolchain import CudaToolkit, Toolchain
from llamactl.errors import BuildError

if TYPE_CHECKING:
    from llamactl.build.decision import Decision
    from llamactl.build.detection import Detection
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
    cuda_toolkit: str = "auto"  # auto | system | pypi (llamactl.build.toolchain)


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
    cuda_wheels: str | None = None  # the CUDA wheel set it uses, installed first if missing

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
    """Compute capability "8.6" -> CMake architecture "86" (Blackwell 12.x -> "12Xa-real", as
    llamactl.build.detection.cuda_arch names it); an architecture name passes unchanged."""
    return cuda_arch(capability) or capability.strip()


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
    return cuda_max_gcc(nvcc_version)


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


def _plan_cuda(
    spec: BuildSpec,
    detection: Detection,
    decision: Decision,
    toolchain: Toolchain,
    extra: Sequence[str],
    args: list[str],
    notes: list[str],
    problems: list[Problem],
) -> None:
    """The CUDA part of the plan: architectures, the toolkit (system or PyPI wheels), the host
    compiler nvcc accepts."""
    args.append("-DGGML_CUDA=ON")
    kit = toolchain.cuda
    pypi = kit is not None and kit.kind == "pypi"
    nvcc_version = kit.version if kit is not None and kit.version else toolchain.nvcc_version
    if not _has_define(extra, "CMAKE_CUDA_ARCHITECTURES"):
        archs = tuple(cuda_arch_from_capability(a) for a in spec.cuda_architectures)
        origin = "as asked"
        if not archs:
            archs = _detected_cuda_archs(detection, decision)
            origin = "from the detected GPUs"
        if not archs:
            # No GPU to ask: `native` would fail at build time, so name ggml's own
            # non-native list for this nvcc (ggml/src/ggml-cuda/CMakeLists.txt).
            archs = default_cuda_architectures(nvcc_version)
            origin = "no NVIDIA GPU detected: ggml's generic list (slow to compile)"
        archs = tuple(sorted(dict.fromkeys(archs), key=_arch_sort_key))
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
        notes.append(f"CUDA architectures {';'.join(archs)} ({origin})")
        nv = _version_tuple(nvcc_version)
        old = [a for a in archs if _arch_sort_key(a)[0] < 75]
        if nv and nv >= (13,) and old:
            problems.append(
                Problem(
                    f"CUDA {nvcc_version} cannot compile for {', '.join(old)}",
                    "CUDA 13 dropped architectures below 7.5: use an older CUDA toolkit",
                )
            )
    if kit is not None and pypi:
        _plan_cuda_wheels(kit, extra, args, notes, problems)
    else:
        if kit is not None and kit.reason:
            notes.append(f"CUDA toolkit: {kit.reason}")
        if not toolchain.nvcc:
            problems.append(
                Problem(
                    "nvcc not found",
                    "install the CUDA toolkit and put its bin/ on PATH (or set CUDACXX), "
                    "or build with the toolkit from PyPI: --cuda-toolkit pypi",
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
    max_gcc = nvcc_max_gcc(nvcc_version)
    host = _version_tuple(toolchain.host_cxx_version)
    if not user_host and max_gcc is not None and host is not None and host[0] > max_gcc:
        fits = sorted((c for c in toolchain.host_compilers if c[1] <= max_gcc), key=lambda c: -c[1])
        if fits:
            args.append(f"-DCMAKE_CUDA_HOST_COMPILER={fits[0][0]}")
            notes.append(
                f"nvcc {nvcc_version} accepts gcc <= {max_gcc}, the default is "
                f"{toolchain.host_cxx_version}: host compiler {fits[0][0]}"
            )
        else:
            problems.append(
                Problem(
                    f"nvcc {nvcc_version} does not support gcc "
                    f"{toolchain.host_cxx_version} (newest supported: {max_gcc})",
                    f"install g++-{max_gcc} (llamactl then uses it as "
                    "CMAKE_CUDA_HOST_COMPILER) or a newer CUDA toolkit",
                )
            )


def _plan_cuda_wheels(
    kit: CudaToolkit,
    extra: Sequence[str],
    args: list[str],
    notes: list[str],
    problems: list[Problem],
) -> None:
    """Point CMake at the toolkit unpacked from PyPI wheels (RESOURCES.md, measured here)."""
    if kit.root is None:
        problems.append(
            Problem(
                f"no CUDA toolkit wheels fit: {kit.reason}",
                "install a complete CUDA toolkit and use --cuda-toolkit system",
            )
        )
        return
    root = kit.root
    args += [f"-DCMAKE_CUDA_COMPILER={root}/bin/nvcc", f"-DCUDAToolkit_ROOT={root}"]
    if kit.libcuda is None and not _has_define(extra, "GGML_CUDA_NO_VMM"):
        # ggml-cuda links CUDA::cuda_driver (libcuda.so) for its virtual memory pool; only a
        # driver or a full toolkit's stubs/ provide it, the wheels do not.
        args.append("-DGGML_CUDA_NO_VMM=ON")
        notes.append("no libcuda.so (no NVIDIA driver): GGML_CUDA_NO_VMM=ON (compile-only build)")
    # The wheels' libraries are not on the loader's path: libggml-cuda needs libcublas.so.13
    # at link time (-rpath-link) and llama-server finds them at run time through RPATH, with
    # no LD_LIBRARY_PATH.
    rpath = f"-Wl,-rpath-link,{root}/lib -Wl,-rpath,{root}/lib"
    for name in ("CMAKE_EXE_LINKER_FLAGS", "CMAKE_SHARED_LINKER_FLAGS"):
        if not _has_define(extra, name):
            args.append(f"-D{name}={rpath}")
    state = (
        "installed"
        if kit.installed
        else f"not installed yet: the build downloads about {kit.download_mib} MiB first"
    )
    notes.append(f"CUDA toolkit: {kit.reason} ({root}, {state})")


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
        _plan_cuda(spec, detection, decision, toolchain, extra, args, notes, problems)
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
        elif toolchain.vulkan_header_version < VULKAN_MIN_HEADER:
            problems.append(
                Problem(
                    f"Vulkan headers too old (VK_HEADER_VERSION {toolchain.vulkan_header_version},"
                    f" this llama.cpp needs about {VULKAN_MIN_HEADER}+ for vk::LayerSettingEXT)",
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

    # The real path: worktrees that share one tree through a vendor/llama.cpp symlink then
    # run identical compile commands, so ccache serves one checkout's objects to the others.
    source_path = source.path.resolve()
    configure = ["cmake", "-S", str(source_path), "-B", str(build_dir)]
    if generator:
        configure += ["-G", generator]
    configure += args
    build = ["cmake", "--build", str(build_dir), "--target", *targets, "-j", str(jobs)]

    kit = toolchain.cuda
    nvcc_version = kit.version if kit is not None and kit.version else toolchain.nvcc_version
    wheels = None
    if backend == "cuda" and kit is not None and kit.kind == "pypi" and kit.root:
        wheels = kit.version
    versions: dict[str, str | None] = {
        name: tool.version for name, tool in detection.tools.items() if tool.version
    }
    versions.update(
        {
            "cmake": toolchain.cmake_version or versions.get("cmake"),
            "cxx": toolchain.host_cxx_version or versions.get("cxx"),
            "nvcc": nvcc_version if backend == "cuda" else None,
            "cuda_toolkit": f"{kit.kind} {kit.version or ''}".strip()
            if backend == "cuda" and kit is not None
            else None,
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
        source=source_path,
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
        cuda_wheels=wheels,
    )
