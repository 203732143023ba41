"""A CUDA toolkit made of NVIDIA's PyPI wheels, for machines whose toolkit is missing or
incomplete: pinned wheels (sha256 checked), unpacked into one directory of llamactl's cache.

NVIDIA publishes the toolkit's parts as wheels that all unpack under `nvidia/cu13/`: nvcc,
ptxas and nvlink (`nvidia-cuda-nvcc`), cicc and libnvvm (`nvidia-nvvm`, without which nvcc
cannot compile device code), cudart and the runtime headers, crt, cccl (thrust, cub, libcu++)
and cuBLAS. Merged into one folder they form a toolkit that CMake's FindCUDAToolkit accepts
(RESOURCES.md: the vendored llama-server built from it alone). Wheels carry no symbolic links,
so the unversioned `libcublas.so`-style names that the linker asks for are made here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamactl import locks, paths
from llamactl.errors import BuildError

#: Where the pinned wheels come from (PyPI's file host; the path segment is pinned per file).
FILES_URL = "https://files.pythonhosted.org/packages"
#: Written last into a toolkit directory: a directory without it was never fully unpacked.
MARKER = ".llamactl-toolkit.json"
#: The prefix every one of these wheels puts its files under.
WHEEL_ROOT = "nvidia/cu13/"

#: (done bytes, total bytes or None, what) as a download or unpack goes on.
Progress = Callable[[int, int | None, str], None]


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: name, version, file and checksum."""

    package: str
    version: str
    platform_tag: str
    url_path: str  # PyPI's hash path segment, e.g. "0b/7d/21c7..."
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-{self.platform_tag}.whl"

    @property
    def url(self) -> str:
        return f"{FILES_URL}/{self.url_path}/{self.filename}"


@dataclass(frozen=True)
class WheelSet:
    """The six wheels that make one CUDA release's toolkit."""

    cuda: tuple[int, int]  # the CUDA release, e.g. (13, 5)
    version: str  # nvcc's full version, e.g. "13.5.37"
    wheels: tuple[Wheel, ...]

    @property
    def name(self) -> str:
        return f"cuda-{self.version}-pypi"

    @property
    def size(self) -> int:
        return sum(w.size for w in self.wheels)


_X86_2014 = "manylinux2014_x86_64.manylinux_2_17_x86_64"
_X86_2010 = "manylinux2010_x86_64.manylinux_2_12_x86_64"

# Pinned 2026-11-30 from PyPI's simple index (x86_64 Linux). Two releases: a toolkit must not
# be newer than the CUDA version the driver supports (nvidia-smi's "CUDA Version"), so a
# 13.0-13.4 driver gets 13.0, a newer one (or no driver: a compile-only build) gets 13.5.
WHEEL_SETS: tuple[WheelSet, ...] = (
    WheelSet(
        (13, 5),
        "13.5.37",
        (
            Wheel(
                "nvidia-cuda-nvcc",
                "13.5.37",
                _X86_2014,
                "0b/7d/21c734e63423dc53fb1b1ebbb6dee84e9ccafbeeaa30e9ae07e6fdcdd15b",
                "f5c4f7ead5d964fb4af42bbf1e6d3ec3c1e6e9d83b53749f691d387e7fcaa3a7",
                47028279,
            ),
            Wheel(
                "nvidia-nvvm",
                "13.5.37",
                _X86_2010,
                "23/dc/c7089283bad8e8089825b0cae0898f8a89b5d27bdb2edea5266d259101e1",
                "c41bfa362e407405163f103c2229f0765f8cc2ed7d148b754dc77f228bf7e070",
                75141406,
            ),
            Wheel(
                "nvidia-cuda-runtime",
                "13.5.37",
                _X86_2014,
                "0b/7c/14b8f5518f8951e9dca57ea80f44f8ea8bcc8671812e6cc38009f3205e57",
                "df2b79a8852f10d1fef8c848489c49eebb5754051bf870202a862831412b179d",
                2504024,
            ),
            Wheel(
                "nvidia-cuda-crt",
                "13.5.37",
                _X86_2014,
                "d5/ac/fb3ca43f437405ce33bfd8ba64503148fdc9198265f26f8ecd1bd6e76338",
                "e898b7f73d3035fa89915a3f7bf3b54a73e90249746111aed295822c4729bb29",
                166163,
            ),
            Wheel(
                "nvidia-cuda-cccl",
                "13.3.5.0.6",
                _X86_2014,
                "a7/7e/4aa67cca14e0558b5a151a692f5ffe609930cdfc20d16c7a584de68424d4",
                "d5230098fa2df5021e1a00c0c4eee41797671a91119d31e892463e5ccf3ee326",
                4113651,
            ),
            Wheel(
                "nvidia-cublas",
                "13.10.0.20",
                "manylinux1_x86_64.manylinux_2_5_x86_64",
                "b4/12/16628161ed8c109c8c73b38167df50cbc630a8a6e6548e2534d461526c3c",
                "dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84",
                444289903,
            ),
        ),
    ),
    WheelSet(
        (13, 0),
        "13.0.88",
        (
            Wheel(
                "nvidia-cuda-nvcc",
                "13.0.88",
                _X86_2014,
                "71/8b/a546c12881fffeba927d810598987df25d74b8b241788c7db8dfc93b0173",
                "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
                37384532,
            ),
            Wheel(
                "nvidia-nvvm",
                "13.0.88",
                _X86_2010,
                "15/b0/ee41e6d1108d959b5097163e7190c2d0f7857dea75606ce358f0275891b4",
                "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0",
                61601415,
            ),
            Wheel(
                "nvidia-cuda-runtime",
                "13.0.96",
                _X86_2014,
                "2e/24/d1558f3b68b1d26e706813b1d10aa1d785e4698c425af8db8edc3dced472",
                "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
                2243632,
            ),
            Wheel(
                "nvidia-cuda-crt",
                "13.0.88",
                _X86_2014,
                "05/69/a1ec4d9f0747d85964206feb47bf359f48a2d6af74c0add8abba6efe3dda",
                "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4",
                134086,
            ),
            Wheel(
                "nvidia-cuda-cccl",
                "13.0.85",
                _X86_2014,
                "ab/fb/0384bb2129bed6b1b39f8e44471c615ab5ab29b7e55817538a1d390d8f84",
                "e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649",
                3120526,
            ),
            Wheel(
                "nvidia-cublas",
                "13.0.2.14",
                "manylinux_2_27_x86_64",
                "28/d4/30e630055d8e0f7058cc0d39e562c965d692f4735537d3f02f45d579a280",
                "0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c",
                420882912,
            ),
        ),
    ),
)


@dataclass(frozen=True)
class WheelChoice:
    """Which wheel set a machine gets, or why none fits."""

    wheel_set: WheelSet | None
    reason: str


def _cuda_tuple(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def choose(
    driver_cuda: str | None,
    os_name: str = "linux",
    arch: str = "x86_64",
    *,
    gpus: bool = False,
) -> WheelChoice:
    """The newest pinned set the driver can run; with no GPU and no driver, the newest (a
    compile-only build). `gpus`: NVIDIA GPUs were seen, so the driver's version matters."""
    if os_name != "linux" or arch != "x86_64":
        return WheelChoice(
            None, f"the pinned CUDA wheels are for Linux x86_64, not {os_name} {arch}"
        )
    newest = WHEEL_SETS[0]
    driver = _cuda_tuple(driver_cuda)
    if driver is None and gpus:
        # Guessing could build binaries this driver refuses ("CUDA driver version is
        # insufficient"): say so rather than pick.
        return WheelChoice(
            None,
            "the CUDA version the NVIDIA driver supports is unknown (plain `nvidia-smi` did not "
            "show it)",
        )
    if driver is None:
        return WheelChoice(newest, f"no NVIDIA driver to match: CUDA {newest.version} wheels")
    for wheel_set in WHEEL_SETS:
        if wheel_set.cuda <= driver:
            return WheelChoice(
                wheel_set,
                f"the driver supports CUDA {driver_cuda}: CUDA {wheel_set.version} wheels",
            )
    oldest = WHEEL_SETS[-1]
    return WheelChoice(
        None,
        f"the driver supports CUDA {driver_cuda}, older than the oldest pinned wheels "
        f"(CUDA {oldest.cuda[0]}.{oldest.cuda[1]}): update the NVIDIA driver, or install a "
        "CUDA toolkit that matches it",
    )


def toolkit_dir(wheel_set: WheelSet) -> Path:
    """Where this set is (or will be) unpacked."""
    return paths.toolkits_dir() / wheel_set.name


def is_installed(root: Path) -> bool:
    """Whether the directory holds a completely unpacked toolkit."""
    return (root / MARKER).is_file() and (root / "bin" / "nvcc").is_file()


def install(wheel_set: WheelSet, *, progress: Progress | None = None) -> Path:
    """Download (checksums checked) and unpack the set into its toolkit directory, once."""
    root = toolkit_dir(wheel_set)
    if is_installed(root):
        return root
    with locks.held(root.with_name(f".{root.name}.lock")):
        if is_installed(root):  # another llamactl installed it while this one waited
            return root
        files = [_download(w, progress) for w in wheel_set.wheels]
        staging = root.with_name(f".{root.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            for wheel, path in zip(wheel_set.wheels, files, strict=True):
                if progress:
                    progress(0, None, f"unpacking {wheel.package}")
                unpack(path, staging)
            link_unversioned(staging / "lib")
            (staging / MARKER).write_text(
                json.dumps(
                    {
                        "version": wheel_set.version,
                        "wheels": [w.filename for w in wheel_set.wheels],
                        "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    indent=2,
                )
                + "\n"
            )
            if root.exists():
                shutil.rmtree(root)  # a half-unpacked leftover without the marker
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _download(wheel: Wheel, progress: Progress | None) -> Path:
    from llamactl.build.source import download
    from llamactl.errors import SourceError

    dest = paths.downloads_dir() / wheel.filename

    def report(done: int, total: int | None) -> None:
        if progress:
            progress(done, total or wheel.size, f"downloading {wheel.package} {wheel.version}")

    try:
        return download(wheel.url, dest, sha256=wheel.sha256, progress=report)
    except SourceError as exc:
        raise BuildError(
            f"cannot get the CUDA toolkit wheel {wheel.filename}: {exc.message}",
            hint=(
                f"offline? fetch it elsewhere (`pip download --no-deps {wheel.package}=="
                f"{wheel.version}`) and put it at {dest}; or install a complete CUDA toolkit "
                "and build with --cuda-toolkit system"
            ),
        ) from exc


def unpack(wheel: Path, target: Path) -> int:
    """Unpack the wheel's `nvidia/cu13/` files into target, keeping executable bits."""
    count = 0
    base = target.resolve()
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(WHEEL_ROOT) or info.is_dir():
                continue
            rel = info.filename[len(WHEEL_ROOT) :]
            dest = (target / rel).resolve()
            if not str(dest).startswith(str(base) + os.sep):
                raise BuildError(f"wheel member escapes the toolkit directory: {info.filename}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            # zip keeps Unix modes in the high half of external_attr; nvcc, ptxas and cicc
            # must stay executable.
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, 0o755 if mode & 0o111 else 0o644)
            count += 1
    return count


_VERSIONED = re.compile(r"^(lib[\w+-]+?\.so)\.\d+(?:\.\d+)*$")


def link_unversioned(lib_dir: Path) -> list[str]:
    """`libcublas.so -> libcublas.so.13` for every library that has only a versioned name."""
    made: list[str] = []
    try:
        entries = sorted(p.name for p in lib_dir.iterdir())
    except OSError:
        return made
    for name in entries:
        m = _VERSIONED.match(name)
        if not m:
            continue
        link = lib_dir / m.group(1)
        if not link.exists() and not link.is_symlink():
            os.symlink(name, link)
            made.append(m.group(1))
    return made


def nvcc_version(root: Path) -> str | None:
    """The toolkit's version from its marker ("13.5.37"), without running nvcc."""
    try:
        data = json.loads((root / MARKER).read_text())
        return str(data["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
