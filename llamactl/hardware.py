"""Hardware and toolchain probes, and the backend decision, as data.

OWNER: the hardware helper fills in detect() and decide(); the dataclasses below are the
contract other modules (build.py, cli/doctor.py) code against. Add fields, do not rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS: tuple[str, ...] = ("cpu", "cuda", "hip", "vulkan", "metal", "sycl", "musa")


@dataclass(frozen=True)
class GPU:
    """One GPU as a probe saw it."""

    index: int
    vendor: str  # nvidia | amd | intel | apple | moore | other
    name: str
    memory_mib: int | None = None
    driver: str | None = None
    compute_capability: str | None = None  # NVIDIA, e.g. "9.0"
    gfx_target: str | None = None  # AMD, e.g. "gfx942"
    api: str | None = None  # the probe that found it: cuda | rocm | vulkan | metal | sycl | musa
    is_software: bool = False  # llvmpipe and friends: a Vulkan device that is really the CPU


@dataclass(frozen=True)
class Tool:
    """One toolchain piece: found or not, where, which version, and anything wrong with it."""

    name: str
    path: str | None = None
    version: str | None = None
    ok: bool = False
    note: str | None = None


@dataclass(frozen=True)
class Detection:
    """Everything the probes found; a pure function of probe outputs."""

    os: str  # linux | darwin | windows
    arch: str  # x86_64 | aarch64 | arm64
    cpu_model: str | None = None
    cpu_cores: int | None = None  # physical
    cpu_threads: int | None = None  # logical
    cpu_features: tuple[str, ...] = ()  # avx2, avx512f, amx_tile, neon, ...
    ram_mib: int | None = None
    ram_available_mib: int | None = None
    gpus: tuple[GPU, ...] = ()
    tools: dict[str, Tool] = field(default_factory=dict)  # cmake, ninja, cc, cxx, ccache, npm, nvcc, ...
    problems: tuple[str, ...] = ()  # probes that failed or answered nonsense, in words


@dataclass(frozen=True)
class Decision:
    """Which backend to build, why (in words), and what would make a better one possible."""

    backend: str
    reason: str
    hints: tuple[str, ...] = ()
    cuda_architectures: tuple[str, ...] = ()  # e.g. ("86", "90") from the GPUs present
    gpu_targets: tuple[str, ...] = ()  # HIP, e.g. ("gfx942",)
    requested: str = "auto"
