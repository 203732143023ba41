"""The hardware probes: one seam (`Prober`) that every look at the machine goes through,
the real machine (`SystemProber`), a recorded one (`RecordedProber`, for tests and
`LLAMACTL_PROBE_FIXTURE`), and `detect()`, which runs the probes concurrently and turns their
outputs into a `Detection` (llamactl.build.detection). The backend decision is
llamactl.build.decision; the toolchain facts a plan needs, llamactl.build.toolchain."""

from __future__ import annotations

import glob as _glob
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from llamactl.build.detection import (
    GPU,
    SYSCTL_KEYS,
    VULKAN_MIN_HEADER,
    CpuInfo,
    Detection,
    GpuMemory,
    Tool,
    cpu_from_sysctl,
    first_version,
    gfx_from_target_version,
    parse_cc_version,
    parse_cpuinfo,
    parse_kfd_properties,
    parse_meminfo,
    parse_nvcc_version,
    parse_nvidia_smi,
    parse_nvidia_smi_cuda,
    parse_nvidia_smi_memory,
    parse_rocminfo,
    parse_sycl_ls,
    parse_sysctl,
    parse_vm_stat,
    parse_vulkan_header,
    parse_vulkaninfo_summary,
)
from llamactl.proc import Completed

#: Points `LLAMACTL_PROBE_FIXTURE` at a recorded fixture folder so the CLI replays it.
FIXTURE_ENV = "LLAMACTL_PROBE_FIXTURE"

#: Probes are tools users run by hand; a wedged driver can make them hang, so cap each one.
PROBE_TIMEOUT = 4.0

#: Free and total memory per NVIDIA GPU (serve places each model on one: serve/placement.py).
NVIDIA_MEMORY_QUERY = "--query-gpu=index,memory.free,memory.total"


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
    (stdout; optional .rc, .stderr, .timeout next to it; <program>.plain.txt for a call
    without arguments, <program>.<variant>.txt for a call in VARIANTS) and fs/ (a file tree
    rooted at /)."""

    #: Calls recorded apart from the program's main probe: an argument -> the file's infix
    #: (`nvidia-smi.memory.txt` answers the free-memory query).
    VARIANTS: ClassVar[dict[str, str]] = {NVIDIA_MEMORY_QUERY: "memory"}

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
        plain = base.with_name(base.name + ".plain.txt")
        if len(args) == 1 and plain.exists():
            out = plain  # a bare call (plain `nvidia-smi`) recorded apart from the query
        for arg in args[1:]:
            if arg in self.VARIANTS:
                out = base.with_name(f"{base.name}.{self.VARIANTS[arg]}.txt")
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
    cuda_driver: str | None = None


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
    parse: Callable[[str], str | None] = first_version,
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
        c = p.run(["sysctl", *SYSCTL_KEYS])
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
    cuda = None
    if gpus:
        # Only the plain table's header names the CUDA version the driver supports; which
        # CUDA toolkit wheels fit depends on it (llamactl.build.cuda_wheels).
        plain = p.run([path])
        cuda = parse_nvidia_smi_cuda(plain.stdout) if plain.ok else None
    return _Finding(gpus=tuple(gpus), cuda_driver=cuda)


def gpu_memory(prober: Prober | None = None) -> list[GpuMemory] | None:
    """Free and total memory of each NVIDIA GPU now, or None when nvidia-smi is absent, fails
    or lists none. Fast enough to ask once a second (tens of milliseconds)."""
    p = prober or default_prober()
    path = p.which("nvidia-smi")
    if path is None:
        return None
    c = p.run([path, NVIDIA_MEMORY_QUERY, "--format=csv,noheader,nounits"])
    if not c.ok:
        return None
    return parse_nvidia_smi_memory(c.stdout) or None


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
    return m.group(1) if m else first_version(first)


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
    cuda_driver: str | None = None
    for f in findings:
        if f.cpu is not None:
            cpu = f.cpu
        if f.ram is not None:
            ram = f.ram
        for tool in f.tools:
            tools[tool.name] = tool
        gpus.extend(f.gpus)
        cuda_driver = cuda_driver or f.cuda_driver
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
        cuda_driver=cuda_driver,
    )


def _reindex(gpu: GPU, index: int) -> GPU:
    from dataclasses import replace

    return gpu if gpu.index == index else replace(gpu, index=index)
