"""What the probes found, as data: GPUs, tools, the machine (`Detection`), the pure parsers
that turn each probe's output into it, and the few hardware facts the decision and the CMake
plan share (CUDA architecture names, the newest host gcc per CUDA release, the oldest Vulkan
headers this llama.cpp compiles with). Imports nothing of llamactl but the ground floor."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BACKENDS: tuple[str, ...] = ("cpu", "cuda", "hip", "vulkan", "metal", "sycl", "musa")

#: ggml-vulkan.cpp builds a `vk::LayerSettingEXT` list unconditionally (VK_EXT_layer_settings,
#: first shipped in Vulkan-Headers 1.3.272); Debian 12's headers (239) fail with
#: "'LayerSettingEXT' is not a member of 'vk'" after a long build.
VULKAN_MIN_HEADER = 272

#: The newest gcc major each CUDA release accepts as host compiler (CUDA's host_config.h);
#: newer ones stop the build with "unsupported GNU version".
CUDA_MAX_GCC: tuple[tuple[tuple[int, int], int], ...] = (
    ((13, 0), 15),
    ((12, 8), 14),
    ((12, 4), 13),
    ((12, 0), 12),
    ((11, 4), 11),
    ((11, 1), 10),
    ((11, 0), 9),
)


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
class GpuMemory:
    """One NVIDIA GPU's memory at one moment, as nvidia-smi says it (MiB)."""

    #: nvidia-smi's index: PCI bus order, which is CUDA's when CUDA_DEVICE_ORDER=PCI_BUS_ID.
    index: int
    free_mib: int
    total_mib: int


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
    tools: dict[str, Tool] = field(
        default_factory=dict
    )  # cmake, ninja, cc, cxx, ccache, npm, nvcc, ...
    problems: tuple[str, ...] = ()  # probes that failed or answered nonsense, in words
    vulkan_devices: tuple[GPU, ...] = ()  # every device vulkaninfo listed, software ones too
    elapsed_ms: float = 0.0  # how long detect() took
    cuda_driver: str | None = None  # the CUDA version the NVIDIA driver supports, e.g. "13.0"


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo or sysctl says about the CPU."""

    model: str | None = None
    cores: int | None = None
    threads: int | None = None
    features: tuple[str, ...] = ()


# Only the flags that change what ggml compiles or how fast it runs; /proc/cpuinfo has ~150.
_X86_FEATURES: tuple[tuple[str, str], ...] = (
    ("ssse3", "ssse3"),
    ("sse4_2", "sse4_2"),
    ("avx", "avx"),
    ("f16c", "f16c"),
    ("fma", "fma"),
    ("avx2", "avx2"),
    ("avx_vnni", "avx_vnni"),
    ("avx512f", "avx512f"),
    ("avx512bw", "avx512bw"),
    ("avx512vl", "avx512vl"),
    ("avx512vbmi", "avx512vbmi"),
    ("avx512_vnni", "avx512_vnni"),
    ("avx512_bf16", "avx512_bf16"),
    ("amx_tile", "amx_tile"),
    ("amx_int8", "amx_int8"),
    ("amx_bf16", "amx_bf16"),
)
_ARM_FEATURES: tuple[tuple[str, str], ...] = (
    ("asimd", "neon"),
    ("asimdhp", "fp16"),
    ("asimddp", "dotprod"),
    ("i8mm", "i8mm"),
    ("bf16", "bf16"),
    ("sve", "sve"),
    ("sve2", "sve2"),
    ("sme", "sme"),
)
_SYSCTL_FEATURES: tuple[tuple[str, str], ...] = (
    ("hw.optional.AdvSIMD", "neon"),
    ("hw.optional.arm.FEAT_FP16", "fp16"),
    ("hw.optional.arm.FEAT_DotProd", "dotprod"),
    ("hw.optional.arm.FEAT_I8MM", "i8mm"),
    ("hw.optional.arm.FEAT_BF16", "bf16"),
    ("hw.optional.arm.FEAT_SME", "sme"),
    ("hw.optional.avx1_0", "avx"),
    ("hw.optional.fma", "fma"),
    ("hw.optional.avx2_0", "avx2"),
    ("hw.optional.avx512f", "avx512f"),
)
SYSCTL_KEYS: tuple[str, ...] = (
    "machdep.cpu.brand_string",
    "hw.physicalcpu",
    "hw.logicalcpu",
    "hw.memsize",
    *(key for key, _ in _SYSCTL_FEATURES),
)


# ARM's /proc/cpuinfo names no model, only the implementer and part numbers.
_ARM_PARTS: dict[tuple[str, str], str] = {
    ("0x41", "0xd08"): "ARM Cortex-A72",
    ("0x41", "0xd0b"): "ARM Cortex-A76",
    ("0x41", "0xd0c"): "ARM Neoverse-N1",
    ("0x41", "0xd40"): "ARM Neoverse-V1",
    ("0x41", "0xd49"): "ARM Neoverse-N2",
    ("0x41", "0xd4f"): "ARM Neoverse-V2",
    ("0x61", "0x022"): "Apple M1",
}


def parse_cpuinfo(text: str) -> CpuInfo:
    """CPU model, physical cores, threads and SIMD features from Linux /proc/cpuinfo."""
    model: str | None = None
    threads = 0
    cores: set[tuple[str, str]] = set()
    flags: set[str] = set()
    physical, core = "0", None
    implementer = part = ""
    per_package_cores: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            threads += 1
            physical, core = "0", None
        elif key in ("model name", "Processor", "Model") and model is None and value:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
        elif key == "cpu cores" and value.isdigit():
            per_package_cores[physical] = int(value)
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "CPU implementer" and not implementer:
            implementer = value.lower()
        elif key == "CPU part" and not part:
            part = value.lower()
    if model is None and part:
        model = _ARM_PARTS.get(
            (implementer, part), f"ARM CPU (implementer {implementer}, part {part})"
        )
    wanted = _X86_FEATURES if "avx" in flags or "sse2" in flags else _ARM_FEATURES
    features = tuple(name for flag, name in wanted if flag in flags)
    if cores:
        n_cores: int | None = len(cores)
    elif per_package_cores:
        n_cores = sum(per_package_cores.values())
    else:
        # ARM kernels give no core ids: one thread per core is the honest guess.
        n_cores = threads or None
    return CpuInfo(model, n_cores, threads or None, features)


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(total, available) MiB from Linux /proc/meminfo."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) // 1024
    total = values.get("MemTotal")
    available = values.get("MemAvailable", values.get("MemFree"))
    return total, available


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl a b c` output ("name: value" lines) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def cpu_from_sysctl(values: dict[str, str]) -> CpuInfo:
    """CPU facts from macOS sysctl values."""

    def _int(key: str) -> int | None:
        value = values.get(key, "")
        return int(value) if value.isdigit() else None

    features = tuple(name for key, name in _SYSCTL_FEATURES if values.get(key) == "1")
    return CpuInfo(
        values.get("machdep.cpu.brand_string") or None,
        _int("hw.physicalcpu"),
        _int("hw.logicalcpu"),
        features,
    )


def parse_vm_stat(text: str) -> int | None:
    """Available MiB (free + inactive + speculative pages) from macOS `vm_stat`."""
    m = re.search(r"page size of (\d+) bytes", text)
    if not m:
        return None
    page = int(m.group(1))
    pages = 0
    found = False
    for key in ("Pages free", "Pages inactive", "Pages speculative"):
        mm = re.search(rf"^{key}:\s+(\d+)\.?\s*$", text, re.MULTILINE)
        if mm:
            pages += int(mm.group(1))
            found = True
    return pages * page // (1024 * 1024) if found else None


def _int_or_none(value: str) -> int | None:
    value = value.strip()
    return int(float(value)) if re.fullmatch(r"\d+(\.\d+)?", value) else None


def parse_nvidia_smi(text: str) -> list[GPU]:
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap
    --format=csv,noheader,nounits`; lines that do not have five fields are skipped."""
    gpus: list[GPU] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        index, name, memory, driver, cap = parts
        cap_ok = re.fullmatch(r"\d+\.\d+", cap) is not None
        gpus.append(
            GPU(
                index=int(index),
                vendor="nvidia",
                name=name,
                memory_mib=_int_or_none(memory),
                driver=driver if driver and driver != "[N/A]" else None,
                compute_capability=cap if cap_ok else None,
                api="cuda",
            )
        )
    return gpus


def parse_nvidia_smi_memory(text: str) -> list[GpuMemory]:
    """Free and total memory per GPU from `nvidia-smi --query-gpu=index,memory.free,
    memory.total --format=csv,noheader,nounits`; lines without three numbers ([N/A] on some
    virtual GPUs) are skipped."""
    out: list[GpuMemory] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out.append(GpuMemory(int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def parse_rocminfo(text: str) -> list[GPU]:
    """GPU agents (Device Type GPU) from `rocminfo`, with gfx target, name and VRAM."""
    driver_m = re.search(r"ROCk module version (\S+) is loaded", text)
    driver = driver_m.group(1) if driver_m else None
    agents: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    in_global_pool = False
    for line in text.splitlines():
        if re.match(r"^\s*Agent \d+\s*$", line):
            current = {}
            agents.append(current)
            in_global_pool = False
            continue
        if current is None:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        # The first block of keys describes the agent; ISA and cache blocks repeat "Name".
        if key in ("Name", "Marketing Name", "Device Type", "Vendor Name") and key not in current:
            current[key] = value
        elif key == "Segment":
            in_global_pool = value.startswith("GLOBAL")
        elif key == "Size" and in_global_pool and "vram_kb" not in current:
            m = re.match(r"(\d+)", value)
            if m:
                current["vram_kb"] = m.group(1)
    gpus: list[GPU] = []
    for agent in agents:
        if agent.get("Device Type") != "GPU":
            continue
        target_m = re.search(r"gfx[0-9a-f]+", agent.get("Name", ""))
        marketing = agent.get("Marketing Name") or agent.get("Name", "AMD GPU")
        gpus.append(
            GPU(
                index=len(gpus),
                vendor="amd",
                name=marketing,
                memory_mib=int(agent["vram_kb"]) // 1024 if "vram_kb" in agent else None,
                driver=driver,
                gfx_target=target_m.group(0) if target_m else None,
                api="rocm",
            )
        )
    return gpus


def gfx_from_target_version(value: int) -> str | None:
    """KFD's gfx_target_version as an LLVM target: 90402 -> gfx942, 110000 -> gfx1100,
    90010 -> gfx90a (minor and stepping are written in hex, as LLVM names them)."""
    if value <= 0:
        return None
    major, minor, step = value // 10000, (value // 100) % 100, value % 100
    return f"gfx{major}{minor:x}{step:x}"


def parse_kfd_properties(text: str) -> dict[str, int]:
    """A KFD topology node's `properties` file ("name value" lines) as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


_VULKAN_VENDORS = {
    0x10DE: "nvidia",
    0x1002: "amd",
    0x8086: "intel",
    0x106B: "apple",
    0x1ED5: "moore",
}


def parse_vulkaninfo_summary(text: str) -> list[GPU]:
    """Devices from `vulkaninfo --summary`; deviceType CPU (llvmpipe, SwiftShader) is marked
    software, because such a device is the CPU and no reason to build Vulkan."""
    devices: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    in_devices = False
    for line in text.splitlines():
        if line.strip() == "Devices:":
            in_devices = True
            continue
        if not in_devices:
            continue
        if re.match(r"^GPU\d+:\s*$", line.strip()):
            current = {}
            devices.append(current)
            continue
        if current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    gpus: list[GPU] = []
    for dev in devices:
        name = dev.get("deviceName")
        if not name:
            continue
        dtype = dev.get("deviceType", "")
        try:
            vendor_id = int(dev.get("vendorID", "0"), 16)
        except ValueError:
            vendor_id = 0
        software = dtype.endswith("_CPU") or "llvmpipe" in name.lower()
        gpus.append(
            GPU(
                index=len(gpus),
                vendor="other" if software else _VULKAN_VENDORS.get(vendor_id, "other"),
                name=name,
                driver=dev.get("driverInfo") or dev.get("driverVersion"),
                api="vulkan",
                is_software=software,
            )
        )
    return gpus


def parse_sycl_ls(text: str) -> list[GPU]:
    """GPUs from oneAPI `sycl-ls`, one per distinct name (Level Zero and OpenCL list each)."""
    gpus: list[GPU] = []
    seen: set[str] = set()
    pattern = re.compile(
        r"^\[(?P<be>[\w]+):gpu\]\[[^\]]*\]\s+[^,]+,\s+(?P<name>.+?)\s+[\d.]+\s+\[(?P<drv>[^\]]+)\]"
    )
    for line in text.splitlines():
        m = pattern.match(line.strip())
        if not m or m.group("name") in seen:
            continue
        seen.add(m.group("name"))
        vendor = "intel" if "intel" in m.group("name").lower() else "other"
        gpus.append(GPU(len(gpus), vendor, m.group("name"), driver=m.group("drv"), api="sycl"))
    return gpus


def parse_vulkan_header(text: str) -> tuple[int | None, str | None]:
    """(VK_HEADER_VERSION, "1.3.275") from vulkan_core.h."""
    m = re.search(r"^#define\s+VK_HEADER_VERSION\s+(\d+)", text, re.MULTILINE)
    if not m:
        return None, None
    patch = int(m.group(1))
    c = re.search(
        r"#define\s+VK_HEADER_VERSION_COMPLETE\s+VK_MAKE_API_VERSION\(\s*0\s*,\s*(\d+)\s*,\s*(\d+)",
        text,
    )
    return patch, (f"{c.group(1)}.{c.group(2)}.{patch}" if c else str(patch))


def parse_nvcc_version(text: str) -> str | None:
    """ "13.0" from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else None


def parse_cc_version(text: str) -> tuple[str | None, str | None]:
    """(family, version) from `cc --version`: ("gcc", "12.2.0"), ("clang", "17.0.6")."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"clang version (\d+[\w.]*)", first)
    if m:
        return ("apple-clang" if first.startswith("Apple") else "clang"), m.group(1)
    m = re.search(r"(?:gcc|g\+\+|cc|c\+\+)(?:-\d+)? \(.*\) (\d+\.\d+(?:\.\d+)?)", first)
    if m:
        return "gcc", m.group(1)
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", first)
    return (None, m.group(1)) if m else (None, None)


def first_version(text: str) -> str | None:
    m = re.search(r"(\d+\.\d+(?:\.\d+)?(?:[.+-][\w.]+)?)", text)
    return m.group(1) if m else None


def cuda_arch(compute_capability: str) -> str | None:
    """A CMAKE_CUDA_ARCHITECTURES entry for a compute capability: "9.0" -> "90";
    Blackwell 12.x -> "120a-real"/"121a-real", as the vendored ggml-cuda CMakeLists lists
    them (the "a" variants carry the FP4 tensor-core instructions ggml uses there)."""
    m = re.fullmatch(r"(\d+)\.(\d+)", compute_capability.strip())
    if not m:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    if major == 12:
        return f"{major}{minor}a-real"
    return f"{major}{minor}"


def version_tuple(version: str | None) -> tuple[int, ...]:
    """ "12.2.0" -> (12, 2, 0); the first three numbers of any version string; () for none."""
    if not version:
        return ()
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def cuda_max_gcc(nvcc_version: str | None) -> int | None:
    """The newest gcc major this nvcc accepts as host compiler, when known."""
    v = version_tuple(nvcc_version)
    if not v:
        return None
    for since, gcc in CUDA_MAX_GCC:
        if v[:2] >= since:
            return gcc
    return None


def parse_nvidia_smi_cuda(text: str) -> str | None:
    """The CUDA version the driver supports, from plain `nvidia-smi`'s header ("CUDA Version:
    13.0"): a toolkit newer than it builds binaries that this driver cannot run."""
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", text)
    return m.group(1) if m else None
