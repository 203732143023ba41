"""The backend decision: a pure function from a `Detection` to a `Decision` (which backend to
build, why in words, and what would make a better one possible)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llamactl.build.detection import (
    BACKENDS,
    CUDA_MAX_GCC,
    GPU,
    VULKAN_MIN_HEADER,
    Detection,
    cuda_arch,
)
from llamactl.build.detection import version_tuple as _vtuple


@dataclass(frozen=True)
class Decision:
    """Which backend to build, why (in words), and what would make a better one possible."""

    backend: str
    reason: str
    hints: tuple[str, ...] = ()
    cuda_architectures: tuple[str, ...] = ()  # e.g. ("86", "90") from the GPUs present
    gpu_targets: tuple[str, ...] = ()  # HIP, e.g. ("gfx942",)
    requested: str = "auto"
    cuda_toolkit: str = ""  # which CUDA toolkit a CUDA build would use and why ("" off topic)


_HINT_CUDA = (
    "install the CUDA toolkit with cuBLAS (NVIDIA's apt repository: "
    "`apt-get install cuda-toolkit-12-8`; Debian/Ubuntu: `apt-get install nvidia-cuda-toolkit`), "
    "then run `llamactl doctor` again"
)
_HINT_ROCM = (
    "install ROCm with HIP (AMD's repository: `amdgpu-install --usecase=rocm,hip`, "
    "or `apt-get install rocm-hip-sdk`), then run `llamactl doctor` again"
)
_HINT_VULKAN = (
    "for Vulkan install the loader headers, glslc and SPIRV-Headers: "
    "`apt-get install libvulkan-dev glslc spirv-headers` (Vulkan-Headers >= 1.3.{min}: "
    "Ubuntu 24.04, Debian 13, or the LunarG Vulkan SDK)"
)
_HINT_ONEAPI = (
    "install Intel oneAPI Base Toolkit (icpx) and `source /opt/intel/oneapi/setvars.sh` "
    "before building"
)
_HINT_MUSA = "install the MUSA SDK (mcc) from Moore Threads"
_HINT_XCODE = "install the Xcode Command Line Tools: `xcode-select --install`"


def _cc_detail(g: GPU) -> str | None:
    return f"compute {g.compute_capability}" if g.compute_capability else None


def _gfx_detail(g: GPU) -> str | None:
    return g.gfx_target


def _no_detail(g: GPU) -> str | None:
    return None


def _tool_ok(d: Detection, name: str) -> bool:
    tool = d.tools.get(name)
    return tool is not None and tool.ok


def _tool_version(d: Detection, name: str) -> str | None:
    tool = d.tools.get(name)
    return tool.version if tool is not None else None


def _gpu_list(gpus: Sequence[GPU], detail: Callable[[GPU], str | None]) -> str:
    # Identical cards collapse: "2x NVIDIA H100 (compute 9.0)".
    labels: list[str] = []
    counts: dict[str, int] = {}
    for g in gpus:
        extra = detail(g)
        label = f"{g.name} ({extra})" if extra else g.name
        if label not in counts:
            labels.append(label)
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{counts[lbl]}x {lbl}" if counts[lbl] > 1 else lbl for lbl in labels)


def cuda_toolkit_choice(d: Detection) -> tuple[str, str]:
    """Which CUDA toolkit a CUDA build here would use, and why: ("system" | "pypi" | "none",
    reason). The system's when complete (nvcc and cuBLAS), else NVIDIA's PyPI wheels when a
    pinned set fits this platform and driver (llamactl.build.cuda_wheels)."""
    from llamactl.build import cuda_wheels

    nvcc = d.tools.get("nvcc")
    if nvcc is not None and nvcc.ok and _tool_ok(d, "cublas"):
        return "system", f"the system toolkit: nvcc {nvcc.version} with cuBLAS"
    if nvcc is None or not nvcc.ok:
        lack = "no nvcc"
    else:
        lack = f"the system's nvcc {nvcc.version} lacks cuBLAS"
    nvidia = any(g.vendor == "nvidia" for g in d.gpus)
    choice = cuda_wheels.choose(d.cuda_driver, d.os, d.arch, gpus=nvidia)
    if choice.wheel_set is not None:
        return "pypi", (
            f"{lack}: PyPI wheels, {choice.reason} (`llamactl build` installs them into "
            "llamactl's cache; --cuda-toolkit system|pypi chooses)"
        )
    return "none", f"{lack}, and no PyPI wheels fit: {choice.reason}"


def _cuda_state(d: Detection) -> tuple[bool, list[str]]:
    """Whether a CUDA build can be made (system toolkit or PyPI wheels), and hints about it."""
    hints: list[str] = []
    kind, _why = cuda_toolkit_choice(d)
    nvcc = d.tools.get("nvcc")
    if kind == "pypi":
        if nvcc is not None and nvcc.ok:
            hints.append(
                f"the system's nvcc {nvcc.version} lacks cuBLAS, so CUDA builds take the "
                "toolkit from PyPI wheels; for the system toolkit instead install cuBLAS "
                f"for CUDA {nvcc.version} (`apt-get install "
                f"libcublas-dev-{(nvcc.version or '12.8').replace('.', '-')}` from NVIDIA's "
                "repository, or the full cuda-toolkit package)"
            )
        return True, hints
    if nvcc is None or not nvcc.ok:
        return False, [f"nvcc not found: {_HINT_CUDA}"]
    if not _tool_ok(d, "cublas"):
        cublas = d.tools.get("cublas")
        where = f" in {cublas.path}" if cublas is not None and cublas.path else ""
        hints.append(
            f"nvcc {nvcc.version} has no cuBLAS (cublas_v2.h missing{where}): "
            'a CUDA build stops at `Target "ggml-cuda" links to: CUDA::cublas`; install '
            f"cuBLAS for CUDA {nvcc.version} (`apt-get install "
            f"libcublas-dev-{(nvcc.version or '12.8').replace('.', '-')}` from NVIDIA's "
            "repository, or the full cuda-toolkit package)"
        )
        return False, hints
    if nvcc.note:
        hints.append(f"nvcc at {nvcc.path}: {nvcc.note}")
    return True, hints


def _host_compiler_hint(d: Detection) -> str | None:
    nvcc = _vtuple(_tool_version(d, "nvcc"))
    cxx = _tool_version(d, "cxx") or ""
    if not nvcc or not cxx.startswith("gcc "):
        return None
    gcc_major = _vtuple(cxx)[0] if _vtuple(cxx) else 0
    for since, max_gcc in CUDA_MAX_GCC:
        if nvcc[:2] >= since:
            if gcc_major > max_gcc:
                return (
                    f"nvcc {_tool_version(d, 'nvcc')} supports gcc up to {max_gcc}, and c++ is "
                    f"{cxx}: install g++-{max_gcc} and set CUDAHOSTCXX=g++-{max_gcc}"
                )
            return None
    return None


def _vulkan_state(d: Detection) -> tuple[bool, list[str]]:
    """Whether glslc, new-enough Vulkan headers and SPIRV-Headers are all present."""
    missing = []
    for name in ("glslc", "vulkan-headers", "spirv-headers"):
        tool = d.tools.get(name)
        if tool is None or not tool.ok:
            detail = tool.note if tool and tool.note else "missing"
            version = f" {tool.version}" if tool and tool.version else ""
            missing.append(f"{name}{version} ({detail})")
    if not missing:
        return True, []
    return False, [
        "Vulkan toolchain incomplete: "
        + "; ".join(missing)
        + ": "
        + _HINT_VULKAN.format(min=VULKAN_MIN_HEADER)
    ]


def _architectures(gpus: Sequence[GPU]) -> tuple[str, ...]:
    archs = {
        a for g in gpus if g.compute_capability for a in [cuda_arch(g.compute_capability)] if a
    }
    # Numeric order: "86" < "90" < "120a-real", which plain string order gets wrong.
    return tuple(sorted(archs, key=lambda a: (int(re.sub(r"\D.*", "", a) or 0), a)))


def _targets(gpus: Sequence[GPU]) -> tuple[str, ...]:
    return tuple(sorted({g.gfx_target for g in gpus if g.gfx_target}))


def decide(detection: Detection, requested: str = "auto") -> Decision:
    """Pick the backend: an explicit request wins; else Metal on Apple Silicon, CUDA, HIP,
    MUSA, SYCL, Vulkan (each only with its GPU and a complete toolchain), else CPU."""
    d = detection
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
    nvidia = [g for g in d.gpus if g.vendor == "nvidia"]
    amd = [g for g in d.gpus if g.vendor == "amd"]
    intel = [g for g in d.gpus if g.vendor == "intel"]
    moore = [g for g in d.gpus if g.vendor == "moore"]
    real_vulkan = [g for g in d.vulkan_devices if not g.is_software]
    software_vulkan = [g for g in d.vulkan_devices if g.is_software]
    archs = _architectures(nvidia)
    targets = _targets(amd)
    cuda_ok, cuda_hints = _cuda_state(d)
    rocm_ok = _tool_ok(d, "rocm")
    vulkan_ok, vulkan_hints = _vulkan_state(d)
    apple_silicon = d.os == "darwin" and d.arch in ("arm64", "aarch64")

    toolkit = ""
    if nvidia or _tool_version(d, "nvcc") or requested == "cuda":
        kind, why = cuda_toolkit_choice(d)
        toolkit = f"{kind}: {why}"

    def make(backend: str, reason: str, hints: Sequence[str] = ()) -> Decision:
        return Decision(
            backend, reason, tuple(dict.fromkeys(hints)), archs, targets, requested, toolkit
        )

    if requested != "auto":
        return make(requested, f"--backend {requested} requested", _request_hints(d, requested))

    nvcc_version = _tool_version(d, "nvcc")

    if apple_silicon:
        chip = d.gpus[0].name if d.gpus else "Apple Silicon GPU"
        return make("metal", f"{chip} found: Metal", [] if _tool_ok(d, "xcode") else [_HINT_XCODE])

    if nvidia and cuda_ok:
        extra = [h for h in [_host_compiler_hint(d), *_old_arch_hints(d, nvidia)] if h]
        if cuda_toolkit_choice(d)[0] == "pypi":
            lack = (
                "no CUDA toolkit"
                if not _tool_ok(d, "nvcc")
                else f"nvcc {nvcc_version} lacks cuBLAS"
            )
            found = f"{lack}: CUDA with the toolkit from PyPI wheels"
        else:
            found = f"nvcc {nvcc_version} found: CUDA"
        return make("cuda", f"{_gpu_list(nvidia, _cc_detail)} found, {found}", cuda_hints + extra)
    if amd and rocm_ok and targets:
        rocm = _tool_version(d, "rocm")
        return make("hip", f"{_gpu_list(amd, _gfx_detail)} found, ROCm {rocm} found: HIP")
    if moore and _tool_ok(d, "mcc"):
        return make("musa", f"{_gpu_list(moore, _no_detail)} found, mcc found: MUSA")
    if intel and _tool_ok(d, "icpx"):
        icpx = _tool_version(d, "icpx")
        return make("sycl", f"{_gpu_list(intel, _no_detail)} found, icpx {icpx} found: SYCL")

    # No native backend: say what the native one lacks, then try Vulkan.
    blocked: list[str] = []
    hints: list[str] = []
    if nvidia:
        lack = "no CUDA toolkit (nvcc missing)" if not _tool_ok(d, "nvcc") else "no cuBLAS"
        blocked.append(f"{_gpu_list(nvidia, _cc_detail)} found but {lack}")
        hints += cuda_hints
    if amd:
        rocm_tool = d.tools.get("rocm")
        lack = "no ROCm" if rocm_tool is None or rocm_tool.path is None else "ROCm incomplete"
        if rocm_ok and not targets:
            lack = "no gfx target read"
        blocked.append(f"{_gpu_list(amd, _gfx_detail)} found but {lack}")
        hints.append(
            f"ROCm: {rocm_tool.note}; {_HINT_ROCM}"
            if rocm_tool is not None and rocm_tool.note
            else _HINT_ROCM
        )
    if intel and not real_vulkan:
        blocked.append(f"{_gpu_list(intel, _no_detail)} found but no oneAPI (icpx)")
        hints.append(_HINT_ONEAPI)
    if moore:
        blocked.append(f"{_gpu_list(moore, _no_detail)} found but no MUSA SDK (mcc)")
        hints.append(_HINT_MUSA)

    if real_vulkan and vulkan_ok:
        headers = _tool_version(d, "vulkan-headers")
        via = f"{_gpu_list(real_vulkan, _no_detail)} found via Vulkan"
        prefix = "; ".join(blocked) + "; " if blocked else ""
        return make(
            "vulkan", f"{prefix}{via}, glslc and Vulkan headers {headers} found: Vulkan", hints
        )

    if real_vulkan or nvidia or amd or intel:
        hints += vulkan_hints
    if blocked:
        return make("cpu", "; ".join(blocked) + ": CPU", hints)
    if real_vulkan:
        names = _gpu_list(real_vulkan, _no_detail)
        return make(
            "cpu", f"{names} found via Vulkan but the Vulkan toolchain is incomplete: CPU", hints
        )
    if nvcc_version:
        # This machine kind: a CUDA compiler and nothing to run it on.
        hints = [h for h in cuda_hints if "cuBLAS" in h]
        return make("cpu", f"nvcc {nvcc_version} found but no NVIDIA GPU: CPU", hints)
    if software_vulkan:
        names = ", ".join(g.name for g in software_vulkan)
        return make("cpu", f"only a software Vulkan device ({names}), no GPU: CPU")
    return make("cpu", "no GPU found: CPU")


def _old_arch_hints(d: Detection, nvidia: Sequence[GPU]) -> list[str]:
    # CUDA 13 dropped every architecture below 7.5 (Maxwell, Pascal, Volta).
    nvcc = _vtuple(_tool_version(d, "nvcc"))
    if not nvcc or nvcc[0] < 13:
        return []
    old = [g for g in nvidia if g.compute_capability and _vtuple(g.compute_capability) < (7, 5)]
    if not old:
        return []
    names = _gpu_list(old, lambda g: f"compute {g.compute_capability}")
    return [f"{names}: CUDA 13 no longer compiles for compute < 7.5; use CUDA 12.x"]


def _request_hints(d: Detection, backend: str) -> list[str]:
    """What looks missing for an explicitly requested backend."""
    hints: list[str] = []
    if backend == "cuda":
        ok, cuda_hints = _cuda_state(d)
        hints += cuda_hints
        if not any(g.vendor == "nvidia" for g in d.gpus):
            hints.append(
                "no NVIDIA GPU found: pass CUDA architectures explicitly (e.g. 90 for H100), "
                "because ggml's default `native` fails on a machine without a GPU"
            )
        elif ok:
            hint = _host_compiler_hint(d)
            hints += [hint] if hint else []
    elif backend == "hip":
        if not _tool_ok(d, "rocm"):
            tool = d.tools.get("rocm")
            hints.append(f"ROCm: {tool.note}; {_HINT_ROCM}" if tool and tool.note else _HINT_ROCM)
        if not _targets(d.gpus):
            hints.append("no AMD GPU found: pass GPU targets explicitly (e.g. gfx942, gfx1100)")
    elif backend == "vulkan":
        hints += _vulkan_state(d)[1]
        if not any(not g.is_software for g in d.vulkan_devices):
            hints.append("no Vulkan GPU found: the build may work, but it will run on no GPU")
    elif backend == "metal":
        if d.os != "darwin":
            hints.append("Metal exists only on macOS: this build will fail here")
        elif not _tool_ok(d, "xcode"):
            hints.append(_HINT_XCODE)
    elif backend == "sycl" and not _tool_ok(d, "icpx"):
        hints.append(_HINT_ONEAPI)
    elif backend == "musa" and not _tool_ok(d, "mcc"):
        hints.append(_HINT_MUSA)
    return hints
