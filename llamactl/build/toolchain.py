"""Toolchain facts a build plan depends on (compilers, nvcc and cuBLAS, the host gcc nvcc
accepts, hipconfig, glslc and the Vulkan headers, icpx), and which CUDA toolkit a CUDA build
uses: the system's, or NVIDIA's PyPI wheels unpacked into llamactl's cache.

Every look at the machine goes through the `hardware.Prober` seam, so a recorded machine
plans exactly as the real one would."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from llamactl.build.detection import Detection, parse_cc_version, parse_nvcc_version
from llamactl.build.hardware import Prober, default_prober

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

CUDA_TOOLKIT_CHOICES: tuple[str, ...] = ("auto", "system", "pypi")

#: Where the NVIDIA driver (or a toolkit's stubs) puts the unversioned libcuda.so that
#: ggml-cuda links for its virtual memory management (CUDA::cuda_driver).
LIBCUDA_PATTERNS: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/libcuda.so",
    "/usr/lib/aarch64-linux-gnu/libcuda.so",
    "/usr/lib64/libcuda.so",
    "/usr/lib/libcuda.so",
    "/usr/local/cuda/lib64/stubs/libcuda.so",
    "/usr/local/cuda/targets/*/lib/stubs/libcuda.so",
)


@dataclass(frozen=True)
class CudaToolkit:
    """The CUDA toolkit a CUDA build uses, and why."""

    kind: str  # system | pypi
    reason: str
    root: str | None = None  # pypi: the toolkit directory (None: no wheels fit this machine)
    version: str | None = None  # nvcc's version
    installed: bool = True  # pypi: False until the build downloads and unpacks the wheels
    download_mib: int = 0  # pypi, not installed: what the build will download
    libcuda: str | None = None  # the driver's libcuda.so, when one can be linked


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
    cuda: CudaToolkit | None = None  # None: the system toolkit described by nvcc/cublas


def choose_cuda_toolkit(
    mode: str,
    *,
    nvcc: str | None,
    nvcc_version: str | None,
    cublas: bool | None,
    driver_cuda: str | None,
    os_name: str,
    arch: str,
    libcuda: str | None = None,
    installed: tuple[str, ...] = (),
    gpus: bool = False,
) -> CudaToolkit:
    """System or PyPI wheels: `mode` auto takes the system toolkit when it is complete (nvcc
    and cuBLAS), else the wheels that the driver can run; pure (`installed`: the wheel sets
    already unpacked)."""
    from llamactl.build import cuda_wheels

    if mode not in CUDA_TOOLKIT_CHOICES:
        raise ValueError(f"unknown CUDA toolkit choice {mode!r}")
    system_ok = nvcc is not None and cublas is not False
    if mode == "system" or (mode == "auto" and system_ok):
        if mode == "system":
            why = "--cuda-toolkit system"
        else:
            why = f"nvcc {nvcc_version or '?'} with cuBLAS found"
        return CudaToolkit(
            "system", f"{why}: the system toolkit", version=nvcc_version, libcuda=libcuda
        )
    choice = cuda_wheels.choose(driver_cuda, os_name, arch, gpus=gpus)
    if mode == "auto":
        lack = (
            "no nvcc" if nvcc is None else f"the system's nvcc {nvcc_version or '?'} lacks cuBLAS"
        )
    else:
        lack = "--cuda-toolkit pypi"
    if choice.wheel_set is None:
        if mode == "auto":
            # Nothing better to offer: the system toolkit's own problems are reported.
            return CudaToolkit(
                "system", f"{lack}, and {choice.reason}", version=nvcc_version, libcuda=libcuda
            )
        return CudaToolkit("pypi", f"{lack}, but {choice.reason}")
    wheel_set = choice.wheel_set
    done = wheel_set.name in installed
    return CudaToolkit(
        "pypi",
        f"{lack}: {choice.reason}",
        root=str(cuda_wheels.toolkit_dir(wheel_set)),
        version=wheel_set.version,
        installed=done,
        download_mib=0 if done else wheel_set.size // (1024 * 1024),
        libcuda=libcuda,
    )


def _which(p: Prober, *names: str) -> str | None:
    for name in names:
        found = p.which(name)
        if found:
            return found
    return None


def _exists(p: Prober, path: str) -> bool:
    return bool(p.glob(path))


def _tool_version(detection: Detection, name: str) -> str | None:
    tool = detection.tools.get(name)
    return tool.version if tool is not None and tool.version else None


def gcc_version(p: Prober, cxx: str) -> str | None:
    """The gcc version of a C++ compiler ("12.2.0"); None for clang or when it does not run."""
    out = p.run([cxx, "--version"], timeout=5)
    if not out.ok or "clang" in out.stdout.lower():
        return None
    family, version = parse_cc_version(out.stdout)
    if version and family in ("gcc", None):
        return version
    out = p.run([cxx, "-dumpfullversion", "-dumpversion"], timeout=5)
    return out.stdout.strip() or None if out.ok else None


def _cuda_roots(p: Prober, nvcc: str, version: str | None) -> list[str]:
    roots: list[str] = []
    for var in ("CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT"):
        value = p.env(var)
        if value:
            roots.append(value)
    roots.append(os.path.dirname(os.path.dirname(p.realpath(nvcc))))
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if m:
        roots.append(f"/usr/local/cuda-{m.group(1)}.{m.group(2)}")
    roots += ["/usr/local/cuda", "/opt/cuda", "/usr"]
    return list(dict.fromkeys(roots))


def has_cublas(p: Prober, nvcc: str, version: str | None) -> bool:
    """Whether cublas_v2.h sits in one of the toolkit roots around this nvcc."""
    for root in _cuda_roots(p, nvcc, version):
        if _exists(p, f"{root}/include/cublas_v2.h"):
            return True
        if p.glob(f"{root}/targets/*/include/cublas_v2.h"):
            return True
    return False


def nvcc_wrapper_target(p: Prober, nvcc: str) -> str | None:
    """The real nvcc behind a shell wrapper (`exec /usr/local/cuda-X/bin/nvcc "$@"`)."""
    head = p.read_text(nvcc)
    if head is None:
        return None
    m = re.search(r"exec\s+(\S+/bin/nvcc)", head[:400])
    return m.group(1) if m else None


def vulkan_header_version(p: Prober) -> int | None:
    """VK_HEADER_VERSION from vulkan_core.h (the SDK's or the system's), when installed."""
    candidates = []
    sdk = p.env("VULKAN_SDK")
    if sdk:
        candidates.append(f"{sdk}/include")
    candidates += ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]
    for root in candidates:
        text = p.read_text(f"{root}/vulkan/vulkan_core.h")
        if text is None:
            continue
        m = re.search(r"#define\s+VK_HEADER_VERSION\s+(\d+)", text)
        if m:
            return int(m.group(1))
    return None


def _available_mib(p: Prober) -> int | None:
    from llamactl.build.detection import parse_meminfo

    text = p.read_text("/proc/meminfo")
    return parse_meminfo(text)[1] if text else None


def find_libcuda(p: Prober) -> str | None:
    """The unversioned libcuda.so a link against the driver API needs, when present."""
    for pattern in LIBCUDA_PATTERNS:
        hits = p.glob(pattern)
        if hits:
            return hits[0]
    return None


def installed_wheel_sets() -> tuple[str, ...]:
    """Names of the CUDA wheel sets already unpacked in llamactl's cache."""
    from llamactl.build import cuda_wheels

    return tuple(
        s.name
        for s in cuda_wheels.WHEEL_SETS
        if cuda_wheels.is_installed(cuda_wheels.toolkit_dir(s))
    )


def probe_toolchain(
    detection: Detection,
    backend: str,
    *,
    cuda_toolkit: str = "auto",
    prober: Prober | None = None,
) -> Toolchain:
    """Gather the tool facts plan() needs for this backend."""
    # Only the chosen backend's tools are probed, so that a no-op build stays fast.
    p = prober if prober is not None else default_prober()
    env = tuple(sorted((k, v) for k in KEY_ENV_VARS if (v := p.env(k))))
    facts: dict[str, Any] = {
        "cmake": _which(p, "cmake"),
        "cmake_version": _tool_version(detection, "cmake"),
        "ninja": _which(p, "ninja", "ninja-build"),
        "ccache": _which(p, "ccache"),
        "npm": _which(p, "npm"),
        "host_cxx_version": _tool_version(detection, "cxx"),
        "cpu_count": os.cpu_count() or 1,
        "available_mib": None,
        "env": env,
    }
    if not (detection.cpu_threads or detection.cpu_cores) or not detection.ram_available_mib:
        facts["available_mib"] = _available_mib(p)
    if backend == "cuda":
        _probe_cuda(p, detection, facts, cuda_toolkit)
    elif backend == "hip":
        hipconfig = _which(p, "hipconfig") or (
            "/opt/rocm/bin/hipconfig" if _exists(p, "/opt/rocm/bin/hipconfig") else None
        )
        if hipconfig:
            out_l = p.run([hipconfig, "-l"], timeout=10)
            out_r = p.run([hipconfig, "-R"], timeout=10)
            facts["hip_clang_dir"] = out_l.stdout.strip() or None if out_l.ok else None
            facts["hip_root"] = out_r.stdout.strip() or None if out_r.ok else None
    elif backend == "vulkan":
        facts["glslc"] = _which(p, "glslc")
        facts["vulkan_header_version"] = vulkan_header_version(p)
    elif backend == "sycl":
        facts["icpx"] = _which(p, "icpx")
    return Toolchain(**facts)


def _probe_cuda(p: Prober, detection: Detection, facts: dict[str, Any], mode: str) -> None:
    nvcc = p.env("CUDACXX") or _which(p, "nvcc")
    if nvcc is None:
        for candidate in ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc"):
            if _exists(p, candidate):
                nvcc = candidate
                break
    facts["nvcc"] = nvcc
    version = None
    cublas = None
    if nvcc:
        version = _tool_version(detection, "nvcc")
        if not version:
            version = parse_nvcc_version(p.run([nvcc, "--version"], timeout=10).stdout)
        known = detection.tools.get("cublas")
        if known is not None and (known.ok or known.path):
            cublas = known.ok
        else:
            cublas = has_cublas(p, nvcc_wrapper_target(p, nvcc) or nvcc, version)
    facts["nvcc_version"] = version
    facts["cublas"] = cublas
    cxx = p.env("CXX") or _which(p, "c++", "g++")
    if cxx:
        facts["host_cxx_version"] = gcc_version(p, cxx) or facts["host_cxx_version"]
    candidates: list[tuple[str, int]] = []
    for major in range(8, 16):
        path = p.which(f"g++-{major}")
        if path:
            candidates.append((path, major))
    facts["host_compilers"] = tuple(candidates)
    facts["cuda"] = choose_cuda_toolkit(
        mode,
        nvcc=nvcc,
        nvcc_version=version,
        cublas=cublas,
        driver_cuda=detection.cuda_driver,
        os_name=detection.os,
        arch=detection.arch,
        libcuda=find_libcuda(p),
        installed=installed_wheel_sets(),
        gpus=any(g.vendor == "nvidia" for g in detection.gpus),
    )
