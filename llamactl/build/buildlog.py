"""What a build's output says, pure: the error lines worth showing, a hint for the failures
users hit most, the backends the configure step compiled in, and the devices llama-server
lists."""

from __future__ import annotations

import re

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
        "the CUDA toolkit has no cuBLAS: build with the toolkit from PyPI wheels "
        "(`llamactl build --backend cuda --cuda-toolkit pypi`), install the full toolkit "
        "(e.g. apt-get install cuda-toolkit, or libcublas-dev), or build another backend "
        "(--backend cpu)",
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
