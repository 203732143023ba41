"""Hardware and toolchain probes, and the backend decision, as data.

Every probe goes through one seam, `Prober`: `SystemProber` asks the real machine,
`RecordedProber` replays a fixture folder. `detect()` turns probe outputs into a `Detection`;
`decide()` is a pure function from a `Detection` to a `Decision`.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llamactl.proc import Completed

BACKENDS: tuple[str, ...] = ("cpu", "cuda", "hip", "vulkan", "metal", "sycl", "musa")

#: ggml-vulkan.cpp builds a `vk::LayerSettingEXT` list unconditionally (VK_EXT_layer_settings,
#: first shipped in Vulkan-Headers 1.3.272); Debian 12's headers (239) fail with
#: "'LayerSettingEXT' is not a member of 'vk'".
VULKAN_MIN_HEADER = 272

#: Points `LLAMACTL_PROBE_FIXTURE` at a recorded fixture folder so the CLI replays it.
FIXTURE_ENV = "LLAMACTL_PROBE_FIXTURE"

#: Probes are tools users run by hand; a wedged driver can make them hang, so cap each one.
PROBE_TIMEOUT = 4.0


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
    tools: dict[str, Tool] = field(
        default_factory=dict
    )  # cmake, ninja, cc, cxx, ccache, npm, nvcc, ...
    problems: tuple[str, ...] = ()  # probes that failed or answered nonsense, in words
    vulkan_devices: tuple[GPU, ...] = ()  # every device vulkaninfo listed, software ones too
    elapsed_ms: float = 0.0  # how long detect() took


@dataclass(frozen=True)
class Decision:
    """Which backend to build, why (in words), and what would make a better one possible."""

    backend: str
    reason: str
    hints: tuple[str, ...] = ()
    cuda_architectures: tuple[str, ...] = ()  # e.g. ("86", "90") from the GPUs present
    gpu_targets: tuple[str, ...] = ()  # HIP, e.g. ("gfx942",)
    requested: str = "auto"


# --------------------------------------------------------------------------- the probe seam


class Prober(Protocol):
    """The one seam every probe goes through, so tests can replay recorded outputs."""

    def run(self, argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> Completed:
        """Run a program; a missing program or a timeout is a result, never an exception."""
        ...

    def read_text(self, path: str) -> str | None:
        """A file's text, or None when it cannot be read."""
        ...

    def which(self, name: str) -> str | None:
        """The program's path on PATH, or None."""
        ...

    def glob(self, pattern: str) -> list[str]:
        """Existing paths matching a glob pattern, sorted."""
        ...

    def platform(self) -> tuple[str, str]:
        """(os, arch): linux|darwin|windows, x86_64|aarch64|arm64."""
        ...

    def env(self, name: str) -> str | None:
        """An environment variable, or None."""
        ...

    def realpath(self, path: str) -> str:
        """The path with symlinks resolved."""
        ...


class SystemProber:
    """Probes the machine this process runs on."""

    def run(self, argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> Completed:
        """Run a program through llamactl.proc.run (never raises for a missing program)."""
        from llamactl.proc import run

        return run(argv, timeout=timeout)

    def read_text(self, path: str) -> str | None:
        """A file's text, or None when it cannot be read."""
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return None

    def which(self, name: str) -> str | None:
        """The program's path on PATH, or None."""
        return shutil.which(name)

    def glob(self, pattern: str) -> list[str]:
        """Existing paths matching a glob pattern, sorted."""
        return sorted(_glob.glob(pattern))

    def platform(self) -> tuple[str, str]:
        """(os, arch) of this machine."""
        import platform

        osname = {"linux": "linux", "darwin": "darwin", "win32": "windows"}.get(
            sys.platform, sys.platform
        )
        arch = platform.machine().lower()
        arch = {"amd64": "x86_64", "x64": "x86_64"}.get(arch, arch)
        return osname, arch

    def env(self, name: str) -> str | None:
        """An environment variable, or None."""
        return os.environ.get(name)

    def realpath(self, path: str) -> str:
        """The path with symlinks resolved."""
        return os.path.realpath(path)


class RecordedProber:
    """Replays a fixture folder: probe.json (platform, which, env, links), run/<program>.txt
    (stdout; optional .rc, .stderr, .timeout next to it) and fs/ (a file tree rooted at /)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "probe.json").read_text())
        osname, arch = manifest.get("platform", ["linux", "x86_64"])
        self._platform = (str(osname), str(arch))
        self._which: dict[str, str] = manifest.get("which", {})
        self._env: dict[str, str] = manifest.get("env", {})
        self._links: dict[str, str] = manifest.get("links", {})
        self._fs = self.folder / "fs"

    def run(self, argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> Completed:
        """The recorded output of the program (keyed by its file name)."""
        args = tuple(str(a) for a in argv)
        base = self.folder / "run" / os.path.basename(args[0])
        if base.with_suffix(".timeout").exists():
            return Completed(args, -1, "", f"timed out after {timeout:g} s", timed_out=True)
        out = base.with_name(base.name + ".txt")
        if not out.exists():
            return Completed(args, 127, "", f"{args[0]}: not found", missing=True)
        rc_file = base.with_name(base.name + ".rc")
        err_file = base.with_name(base.name + ".stderr")
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else 0
        err = err_file.read_text() if err_file.exists() else ""
        return Completed(args, rc, out.read_text(), err)

    def read_text(self, path: str) -> str | None:
        """A file from the fixture's fs/ tree."""
        try:
            return (self._fs / path.lstrip("/")).read_text()
        except OSError:
            return None

    def which(self, name: str) -> str | None:
        """The path probe.json records for the program."""
        return self._which.get(name)

    def glob(self, pattern: str) -> list[str]:
        """Paths in the fs/ tree, given back as absolute machine paths."""
        root = str(self._fs)
        hits = _glob.glob(root + "/" + pattern.lstrip("/"))
        return sorted(h[len(root) :] for h in hits)

    def platform(self) -> tuple[str, str]:
        """The recorded (os, arch)."""
        return self._platform

    def env(self, name: str) -> str | None:
        """The recorded environment variable."""
        return self._env.get(name)

    def realpath(self, path: str) -> str:
        """The recorded link target, or the path itself."""
        return self._links.get(path, path)


def default_prober() -> Prober:
    """The real machine, or the fixture folder named by LLAMACTL_PROBE_FIXTURE."""
    fixture = os.environ.get(FIXTURE_ENV)
    if fixture:
        return RecordedProber(fixture)
    return SystemProber()


# --------------------------------------------------------------------------- pure parsers


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
_SYSCTL_KEYS: tuple[str, ...] = (
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


def _first_version(text: str) -> str | None:
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


def _vtuple(version: str | None) -> tuple[int, ...]:
    if not version:
        return ()
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class _Finding:
    """What one probe contributed; detect() merges them in a fixed order."""

    tools: tuple[Tool, ...] = ()
    gpus: tuple[GPU, ...] = ()
    vulkan: tuple[GPU, ...] = ()
    problems: tuple[str, ...] = ()
    cpu: CpuInfo | None = None
    ram: tuple[int | None, int | None] | None = None


def _describe_failure(c: Completed) -> str:
    if c.timed_out:
        return "timed out"
    tail = (c.stderr or c.stdout).strip().splitlines()
    return f"exit {c.returncode}" + (f": {tail[-1][:160]}" if tail else "")


def _find(p: Prober, names: Sequence[str], fallbacks: Sequence[str] = ()) -> str | None:
    for name in names:
        path = p.which(name)
        if path:
            return path
    for pattern in fallbacks:
        hits = p.glob(pattern)
        if hits:
            return hits[-1]  # sorted: the newest versioned install (cuda-12.8 > cuda-12.4)
    return None


def _version_tool(
    p: Prober,
    name: str,
    path: str | None,
    parse: Callable[[str], str | None] = _first_version,
    args: Sequence[str] = ("--version",),
) -> _Finding:
    if path is None:
        return _Finding(tools=(Tool(name, note="not found"),))
    c = p.run([path, *args])
    if not c.ok:
        note = f"`{name} {' '.join(args)}` failed ({_describe_failure(c)})"
        return _Finding(tools=(Tool(name, path, ok=False, note=note),), problems=(note,))
    version = parse(c.stdout + c.stderr)
    return _Finding(tools=(Tool(name, path, version, ok=True),))


def _probe_compiler(p: Prober, name: str, env_var: str, names: Sequence[str]) -> _Finding:
    # CMake honours CC/CXX first, so the compiler it will use is the one to report.
    chosen = p.env(env_var)
    path = (p.which(chosen) or chosen) if chosen else _find(p, names)
    if path is None:
        return _Finding(tools=(Tool(name, note="no C/C++ compiler found"),))
    c = p.run([path, "--version"])
    if not c.ok:
        note = f"`{path} --version` failed ({_describe_failure(c)})"
        return _Finding(tools=(Tool(name, path, ok=False, note=note),), problems=(note,))
    family, version = parse_cc_version(c.stdout)
    shown = f"{family} {version}" if family and version else version
    return _Finding(tools=(Tool(name, path, shown, ok=True),))


def _probe_npm(p: Prober) -> _Finding:
    # `npm --version` starts node and takes ~0.4 s; the version sits in npm's package.json.
    path = p.which("npm")
    if path is None:
        return _Finding(tools=(Tool("npm", note="not found"),))
    real = p.realpath(path)
    for candidate in (
        os.path.join(os.path.dirname(os.path.dirname(real)), "package.json"),
        os.path.join(os.path.dirname(os.path.dirname(path)), "lib/node_modules/npm/package.json"),
    ):
        text = p.read_text(candidate)
        if text:
            try:
                version = json.loads(text).get("version")
            except ValueError:
                continue
            return _Finding(tools=(Tool("npm", path, version, ok=True),))
    return _Finding(tools=(Tool("npm", path, None, ok=True, note="version not read"),))


def _probe_cpu(p: Prober, osname: str) -> _Finding:
    if osname == "darwin":
        c = p.run(["sysctl", *_SYSCTL_KEYS])
        # Unknown keys (x86 flags on arm64) make sysctl exit 1 after printing the rest.
        values = parse_sysctl(c.stdout)
        if not values:
            return _Finding(problems=(f"sysctl gave nothing ({_describe_failure(c)})",))
        memsize = values.get("hw.memsize", "")
        total = int(memsize) // (1024 * 1024) if memsize.isdigit() else None
        vm = p.run(["vm_stat"])
        available = parse_vm_stat(vm.stdout) if vm.ok else None
        return _Finding(cpu=cpu_from_sysctl(values), ram=(total, available))
    problems: list[str] = []
    cpuinfo = p.read_text("/proc/cpuinfo")
    cpu = parse_cpuinfo(cpuinfo) if cpuinfo else None
    if cpu is None or cpu.threads is None:
        problems.append("/proc/cpuinfo unreadable or empty")
    meminfo = p.read_text("/proc/meminfo")
    ram = parse_meminfo(meminfo) if meminfo else None
    if ram is None or ram[0] is None:
        problems.append("/proc/meminfo unreadable or empty")
    return _Finding(cpu=cpu, ram=ram, problems=tuple(problems))


_NVIDIA_QUERY = "--query-gpu=index,name,memory.total,driver_version,compute_cap"


def _probe_nvidia(p: Prober) -> _Finding:
    path = p.which("nvidia-smi")
    if path is None:
        return _Finding()
    c = p.run([path, _NVIDIA_QUERY, "--format=csv,noheader,nounits"])
    if not c.ok:
        # "couldn't communicate with the NVIDIA driver": the card may be there, unusable.
        return _Finding(problems=(f"nvidia-smi failed ({_describe_failure(c)})",))
    gpus = parse_nvidia_smi(c.stdout)
    if not gpus and c.stdout.strip():
        return _Finding(problems=("nvidia-smi answered something unreadable",))
    return _Finding(gpus=tuple(gpus))


def _probe_amd(p: Prober, osname: str) -> _Finding:
    path = _find(p, ["rocminfo"], ["/opt/rocm/bin/rocminfo"])
    problems: list[str] = []
    if path is not None:
        c = p.run([path])
        if c.ok:
            agents = parse_rocminfo(c.stdout)
            if agents:
                return _Finding(gpus=tuple(agents))
        else:
            problems.append(f"rocminfo failed ({_describe_failure(c)})")
    if osname != "linux":
        return _Finding(problems=tuple(problems))
    # Without ROCm userspace the amdgpu kernel driver still publishes each GPU's target.
    gpus: list[GPU] = []
    for props_path in p.glob("/sys/class/kfd/kfd/topology/nodes/*/properties"):
        text = p.read_text(props_path)
        if not text:
            continue
        props = parse_kfd_properties(text)
        target = gfx_from_target_version(props.get("gfx_target_version", 0))
        if target is None or props.get("simd_count", 0) == 0:
            continue  # CPU nodes have no SIMDs and target 0
        gpus.append(GPU(len(gpus), "amd", "AMD GPU", gfx_target=target, api="kfd"))
    return _Finding(gpus=tuple(gpus), problems=tuple(problems))


def _probe_vulkan(p: Prober) -> _Finding:
    path = p.which("vulkaninfo")
    if path is None:
        return _Finding()
    c = p.run([path, "--summary"])
    devices = parse_vulkaninfo_summary(c.stdout)
    if not devices:
        if not c.ok:
            return _Finding(problems=(f"vulkaninfo failed ({_describe_failure(c)})",))
        return _Finding(problems=("vulkaninfo listed no devices",))
    return _Finding(vulkan=tuple(devices))


def _probe_sycl(p: Prober) -> _Finding:
    path = p.which("sycl-ls")
    if path is None:
        return _Finding()
    c = p.run([path])
    if not c.ok:
        return _Finding(problems=(f"sycl-ls failed ({_describe_failure(c)})",))
    return _Finding(gpus=tuple(parse_sycl_ls(c.stdout)))


def _probe_xcode(p: Prober) -> _Finding:
    # Metal is on by default on Apple Silicon; it needs only Apple clang and the macOS SDK
    # (ggml embeds its shader source and compiles it at run time).
    xcrun = p.which("xcrun")
    if xcrun is None:
        return _Finding(tools=(Tool("xcode", note="xcrun not found (no Command Line Tools)"),))
    sdk = p.run([xcrun, "--sdk", "macosx", "--show-sdk-version"])
    if sdk.ok and sdk.stdout.strip():
        return _Finding(tools=(Tool("xcode", xcrun, f"macOS SDK {sdk.stdout.strip()}", ok=True),))
    note = f"no macOS SDK ({_describe_failure(sdk)})"
    return _Finding(tools=(Tool("xcode", xcrun, ok=False, note=note),), problems=(note,))


def _probe_nvcc(p: Prober) -> _Finding:
    path = _find(
        p,
        ["nvcc"],
        ["/usr/local/cuda/bin/nvcc", "/usr/local/cuda-*/bin/nvcc", "/opt/cuda/bin/nvcc"],
    )
    if path is None:
        return _Finding(tools=(Tool("nvcc", note="not found"), Tool("cublas", note="no CUDA")))
    found = _version_tool(p, "nvcc", path, parse_nvcc_version)
    nvcc = found.tools[0]
    if nvcc.ok and p.which("nvcc") is None:
        nvcc = Tool(nvcc.name, nvcc.path, nvcc.version, True, "not on PATH: set CUDACXX to it")
    # CMake's CUDA::cublas target needs the header and the library; a toolkit with only the
    # compiler (pip's nvidia-cuda-nvcc, a trimmed image) configures and then fails.
    roots = [
        os.path.dirname(os.path.dirname(p.realpath(path))),
        os.path.dirname(os.path.dirname(path)),
    ]
    roots += [v for v in (p.env(n) for n in ("CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT")) if v]
    # nvcc may be a wrapper script (/usr/local/bin/nvcc), so also try the versioned default.
    if nvcc.version:
        roots.append(f"/usr/local/cuda-{nvcc.version}")
    roots += ["/usr/local/cuda", "/usr"]
    roots = list(dict.fromkeys(roots))
    toolkit = next(
        (
            r
            for r in roots
            if p.glob(f"{r}/include/cuda_runtime.h")
            or p.glob(f"{r}/targets/*/include/cuda_runtime.h")
        ),
        None,
    )
    patterns = [f"{r}/include/cublas_v2.h" for r in roots]
    patterns += [f"{r}/targets/*/include/cublas_v2.h" for r in roots]
    header = next((hit for pat in patterns for hit in p.glob(pat)), None)
    if header is None:
        # path names the toolkit that lacks it, so the hint can say where to install.
        cublas = Tool("cublas", toolkit, note="cublas_v2.h not found: incomplete toolkit")
    else:
        cublas = Tool("cublas", header, ok=True)
    return _Finding(tools=(nvcc, cublas), problems=found.problems)


def _probe_rocm(p: Prober) -> _Finding:
    path = _find(p, ["hipconfig"], ["/opt/rocm/bin/hipconfig", "/opt/rocm-*/bin/hipconfig"])
    if path is None:
        hipcc = p.which("hipcc")
        note = "hipconfig not found" + (f" (hipcc at {hipcc})" if hipcc else "")
        return _Finding(tools=(Tool("rocm", note=note),))
    found = _version_tool(p, "rocm", path, _rocm_version)
    tool = found.tools[0]
    # The HIP build runs ROCm's own clang ($(hipconfig -l)/clang); without it CMake stops.
    root = os.path.dirname(os.path.dirname(p.realpath(path)))
    clangs = [
        f"{root}/lib/llvm/bin/clang",
        f"{root}/llvm/bin/clang",
        f"{root}/lib/llvm-*/bin/clang",
    ]
    if tool.ok and not any(p.glob(pattern) for pattern in clangs):
        tool = Tool("rocm", path, tool.version, False, f"ROCm clang not found under {root}")
    return _Finding(tools=(tool,), problems=found.problems)


def _rocm_version(text: str) -> str | None:
    # hipconfig prints "6.2.41133-dd7f95766": the part after the dash is a git hash.
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def _probe_vulkan_sdk(p: Prober) -> _Finding:
    tools = list(_version_tool(p, "glslc", p.which("glslc"), _glslc_version).tools)
    sdk = p.env("VULKAN_SDK")
    dirs = ([f"{sdk}/include"] if sdk else []) + [
        "/usr/include",
        "/usr/local/include",
        "/opt/homebrew/include",
    ]
    header = next(
        (f"{d}/vulkan/vulkan_core.h" for d in dirs if p.glob(f"{d}/vulkan/vulkan_core.h")), None
    )
    if header is None:
        tools.append(Tool("vulkan-headers", note="vulkan/vulkan_core.h not found"))
    else:
        patch, shown = parse_vulkan_header(p.read_text(header) or "")
        if patch is None:
            tools.append(Tool("vulkan-headers", header, note="VK_HEADER_VERSION not found"))
        elif patch < VULKAN_MIN_HEADER:
            note = f"too old: llama.cpp needs VK_HEADER_VERSION >= {VULKAN_MIN_HEADER}"
            tools.append(Tool("vulkan-headers", header, shown, False, note))
        else:
            tools.append(Tool("vulkan-headers", header, shown, True))
    spirv = next((f"{d}/spirv" for d in dirs if p.glob(f"{d}/spirv/unified1/spirv.hpp")), None)
    tools.append(
        Tool("spirv-headers", spirv, ok=True)
        if spirv
        else Tool("spirv-headers", note="spirv/unified1/spirv.hpp not found")
    )
    return _Finding(tools=tuple(tools))


def _glslc_version(text: str) -> str | None:
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"shaderc (v[\w.\-]+)", first)
    return m.group(1) if m else _first_version(first)


def _probe_icpx(p: Prober) -> _Finding:
    path = p.which("icpx")
    if path is None:
        installed = p.glob("/opt/intel/oneapi/compiler/*/bin/icpx")
        note = (
            f"not on PATH (oneAPI at {installed[-1]}: source /opt/intel/oneapi/setvars.sh)"
            if installed
            else "not found"
        )
        return _Finding(tools=(Tool("icpx", note=note),))
    return _version_tool(p, "icpx", path)


def _probe_mcc(p: Prober) -> _Finding:
    path = _find(p, ["mcc"], ["/usr/local/musa/bin/mcc"])
    return _version_tool(p, "mcc", path)


def detect(prober: Prober | None = None) -> Detection:
    """Probe OS, CPU, RAM, GPUs and toolchains, concurrently; never raises for a bad probe."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    p = prober if prober is not None else default_prober()
    osname, arch = p.platform()
    apple_silicon = osname == "darwin" and arch in ("arm64", "aarch64")

    jobs: list[Callable[[], _Finding]] = [
        lambda: _probe_cpu(p, osname),
        lambda: _version_tool(p, "cmake", _find(p, ["cmake"])),
        lambda: _version_tool(p, "ninja", _find(p, ["ninja", "ninja-build"])),
        lambda: _probe_compiler(p, "cc", "CC", ["cc", "gcc", "clang"]),
        lambda: _probe_compiler(p, "cxx", "CXX", ["c++", "g++", "clang++"]),
        lambda: _version_tool(p, "ccache", _find(p, ["ccache"])),
        lambda: _version_tool(p, "node", _find(p, ["node", "nodejs"])),
        lambda: _probe_npm(p),
        lambda: _probe_nvidia(p),
        lambda: _probe_nvcc(p),
        lambda: _probe_vulkan(p),
        lambda: _probe_vulkan_sdk(p),
    ]
    if osname == "darwin":
        jobs.append(lambda: _probe_xcode(p))
    else:
        jobs += [
            lambda: _probe_amd(p, osname),
            lambda: _probe_rocm(p),
            lambda: _probe_sycl(p),
            lambda: _probe_icpx(p),
            lambda: _probe_mcc(p),
        ]

    # Probes are mostly waiting on subprocesses, so threads overlap them well.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe") as pool:
        findings = list(pool.map(lambda job: job(), jobs))

    cpu = CpuInfo()
    ram: tuple[int | None, int | None] = (None, None)
    tools: dict[str, Tool] = {}
    gpus: list[GPU] = []
    vulkan: list[GPU] = []
    problems: list[str] = []
    for f in findings:
        if f.cpu is not None:
            cpu = f.cpu
        if f.ram is not None:
            ram = f.ram
        for tool in f.tools:
            tools[tool.name] = tool
        gpus.extend(f.gpus)
        vulkan.extend(f.vulkan)
        problems.extend(f.problems)

    # A GPU that a vendor probe saw is listed once, with the vendor's richer facts; Vulkan
    # adds only the real devices whose vendor no vendor probe covered (Intel Arc, AMD
    # without ROCm when sysfs is closed, ...).
    if apple_silicon:
        # The GPU is part of the chip; sysctl's brand string ("Apple M2") names both.
        gpus.insert(0, GPU(0, "apple", f"{cpu.model or 'Apple Silicon'} GPU", api="metal"))
    seen_vendors = {g.vendor for g in gpus}
    gpus.extend(g for g in vulkan if not g.is_software and g.vendor not in seen_vendors)
    gpus = [_reindex(g, i) for i, g in enumerate(gpus)]

    return Detection(
        os=osname,
        arch=arch,
        cpu_model=cpu.model,
        cpu_cores=cpu.cores,
        cpu_threads=cpu.threads,
        cpu_features=cpu.features,
        ram_mib=ram[0],
        ram_available_mib=ram[1],
        gpus=tuple(gpus),
        tools=tools,
        problems=tuple(problems),
        vulkan_devices=tuple(vulkan),
        elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
    )


def _reindex(gpu: GPU, index: int) -> GPU:
    from dataclasses import replace

    return gpu if gpu.index == index else replace(gpu, index=index)


# --------------------------------------------------------------------------- the decision

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

#: The newest gcc major each CUDA release accepts as host compiler (CUDA's host_config.h);
#: newer ones stop the build with "unsupported GNU version". build.py uses it too.
CUDA_MAX_GCC: tuple[tuple[tuple[int, int], int], ...] = (
    ((13, 0), 15),
    ((12, 8), 14),
    ((12, 4), 13),
    ((12, 0), 12),
    ((11, 4), 11),
    ((11, 1), 10),
    ((11, 0), 9),
)


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


def _cuda_state(d: Detection) -> tuple[bool, list[str]]:
    """Whether the CUDA toolkit is complete, and hints about it."""
    hints: list[str] = []
    nvcc = d.tools.get("nvcc")
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

    def make(backend: str, reason: str, hints: Sequence[str] = ()) -> Decision:
        return Decision(backend, reason, tuple(dict.fromkeys(hints)), archs, targets, requested)

    if requested != "auto":
        return make(requested, f"--backend {requested} requested", _request_hints(d, requested))

    nvcc_version = _tool_version(d, "nvcc")

    if apple_silicon:
        chip = d.gpus[0].name if d.gpus else "Apple Silicon GPU"
        return make("metal", f"{chip} found: Metal", [] if _tool_ok(d, "xcode") else [_HINT_XCODE])

    if nvidia and cuda_ok:
        extra = [h for h in [_host_compiler_hint(d), *_old_arch_hints(d, nvidia)] if h]
        return make(
            "cuda",
            f"{_gpu_list(nvidia, _cc_detail)} found, nvcc {nvcc_version} found: CUDA",
            cuda_hints + extra,
        )
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
