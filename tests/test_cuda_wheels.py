"""The CUDA toolkit from PyPI wheels: which set a machine gets, unpacking, the plan that points
CMake at it, and the recorded machines that choose it (issue 15). All without a network: the
downloads are files put where llamactl keeps them."""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest

from llamactl import paths
from llamactl.build import cuda_wheels as cw
from llamactl.build import decision as dec
from llamactl.build import hardware as hw
from llamactl.build import plan as b
from llamactl.build import run as brun
from llamactl.build import toolchain as tc
from llamactl.build.detection import Detection
from llamactl.build.source import SourceTree
from llamactl.errors import BuildError

pytestmark = pytest.mark.unit

PROBES = Path(__file__).parent / "fixtures" / "probes"
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


# --------------------------------------------------------------------------- which set


def test_every_pinned_set_has_the_six_parts_with_checksums() -> None:
    for wheel_set in cw.WHEEL_SETS:
        names = {w.package for w in wheel_set.wheels}
        assert names == {
            "nvidia-cuda-nvcc",
            "nvidia-nvvm",
            "nvidia-cuda-runtime",
            "nvidia-cuda-crt",
            "nvidia-cuda-cccl",
            "nvidia-cublas",
        }
        for w in wheel_set.wheels:
            assert len(w.sha256) == 64 and w.size > 0
            assert w.url.startswith("https://files.pythonhosted.org/packages/")
            assert w.url.endswith(".whl") and "x86_64" in w.filename
    # Newest first: choose() walks them in order.
    assert [s.cuda for s in cw.WHEEL_SETS] == sorted((s.cuda for s in cw.WHEEL_SETS), reverse=True)


@pytest.mark.parametrize(
    ("driver", "gpus", "version"),
    [
        (None, False, "13.5.37"),  # no GPU, no driver: a compile-only build takes the newest
        ("13.0", True, "13.0.88"),  # never newer than the driver supports
        ("13.4", True, "13.0.88"),
        ("13.5", True, "13.5.37"),
        ("14.1", True, "13.5.37"),
        ("12.8", True, None),  # older than any pinned set
        (None, True, None),  # a GPU whose driver did not say its CUDA version
    ],
)
def test_the_set_follows_the_driver(driver: str | None, gpus: bool, version: str | None) -> None:
    choice = cw.choose(driver, gpus=gpus)
    assert (choice.wheel_set.version if choice.wheel_set else None) == version, choice.reason
    assert choice.reason


def test_no_wheels_off_linux_x86_64() -> None:
    for os_name, arch in (("darwin", "arm64"), ("linux", "aarch64"), ("windows", "x86_64")):
        assert cw.choose(None, os_name, arch).wheel_set is None


@pytest.mark.parametrize(
    ("mode", "nvcc", "cublas", "kind", "root"),
    [
        ("auto", "/usr/local/bin/nvcc", True, "system", False),  # complete: the system's
        ("auto", "/usr/local/bin/nvcc", False, "pypi", True),  # this machine: no cuBLAS
        ("auto", None, None, "pypi", True),  # no toolkit at all
        ("system", "/usr/local/bin/nvcc", False, "system", False),  # as asked, even broken
        ("pypi", "/usr/local/bin/nvcc", True, "pypi", True),  # as asked, even if complete
    ],
)
def test_toolkit_choice(
    mode: str, nvcc: str | None, cublas: bool | None, kind: str, root: bool
) -> None:
    kit = tc.choose_cuda_toolkit(
        mode,
        nvcc=nvcc,
        nvcc_version="13.0" if nvcc else None,
        cublas=cublas,
        driver_cuda=None,
        os_name="linux",
        arch="x86_64",
    )
    assert kit.kind == kind and (kit.root is not None) == root, kit
    if kind == "pypi":
        assert kit.version == "13.5.37" and not kit.installed and kit.download_mib > 500
        assert kit.root == str(paths.toolkits_dir() / "cuda-13.5.37-pypi")


def test_pypi_asked_where_no_wheels_fit_keeps_the_reason() -> None:
    kit = tc.choose_cuda_toolkit(
        "pypi",
        nvcc=None,
        nvcc_version=None,
        cublas=None,
        driver_cuda="12.4",
        os_name="linux",
        arch="x86_64",
        gpus=True,
    )
    assert kit.kind == "pypi" and kit.root is None and "12.4" in kit.reason


# --------------------------------------------------------------------------- the plan


def _detection(**kw: Any) -> Detection:
    base: dict[str, Any] = {"os": "linux", "arch": "x86_64", "cpu_threads": 2, "cpu_cores": 2}
    base.update(kw)
    return Detection(**base)


def _plan(kit: tc.CudaToolkit, extra: tuple[str, ...] = ()) -> b.BuildPlan:
    toolchain = tc.Toolchain(
        cmake="/usr/bin/cmake",
        ninja="/usr/bin/ninja",
        nvcc="/usr/local/bin/nvcc",
        nvcc_version="13.0",
        cublas=False,
        host_cxx_version="12.2.0",
        cuda=kit,
    )
    spec = b.BuildSpec(backend="cuda", cuda_architectures=("90",), ui=False, extra_cmake_args=extra)
    detection = _detection()
    tree = SourceTree(Path("/src/llama.cpp"), COMMIT, "test", True)
    return b.plan(
        spec, detection, dec.decide(detection, "cuda"), tree, toolchain, builds_root=Path("/b")
    )


def _wheel_kit(**kw: Any) -> tc.CudaToolkit:
    base: dict[str, Any] = {
        "kind": "pypi",
        "reason": "the system's nvcc 13.0 lacks cuBLAS: PyPI wheels",
        "root": "/tk",
        "version": "13.5.37",
        "installed": False,
        "download_mib": 575,
    }
    base.update(kw)
    return tc.CudaToolkit(**base)


def test_a_wheel_toolkit_plan_points_cmake_at_it_with_rpath() -> None:
    p = _plan(_wheel_kit())
    args = p.cmake_args
    assert "-DGGML_CUDA=ON" in args and "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    assert "-DCMAKE_CUDA_COMPILER=/tk/bin/nvcc" in args and "-DCUDAToolkit_ROOT=/tk" in args
    # No driver here: libcuda.so cannot be linked, so ggml's VMM pool is off.
    assert "-DGGML_CUDA_NO_VMM=ON" in args
    rpath = "-Wl,-rpath-link,/tk/lib -Wl,-rpath,/tk/lib"
    assert f"-DCMAKE_EXE_LINKER_FLAGS={rpath}" in args
    assert f"-DCMAKE_SHARED_LINKER_FLAGS={rpath}" in args
    assert p.cuda_wheels == "13.5.37" and not p.problems
    notes = " ".join(p.notes)
    assert "575 MiB" in notes and "PyPI wheels" in notes
    # The system nvcc's missing cuBLAS is no problem of this plan.
    assert "configure will fail" not in notes
    assert dict(p.toolchain)["cuda_toolkit"] == "pypi 13.5.37"
    assert dict(p.toolchain)["nvcc"] == "13.5.37"


def test_with_a_driver_vmm_stays_on_and_user_flags_win() -> None:
    p = _plan(
        _wheel_kit(libcuda="/usr/lib/x86_64-linux-gnu/libcuda.so", installed=True),
        extra=("-DCMAKE_EXE_LINKER_FLAGS=-Wl,--my-own",),
    )
    assert "-DGGML_CUDA_NO_VMM=ON" not in p.cmake_args
    assert [a for a in p.cmake_args if a.startswith("-DCMAKE_EXE_LINKER_FLAGS")] == [
        "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--my-own"
    ]
    assert "installed)" in " ".join(p.notes)


def test_the_system_toolkit_and_the_wheels_are_two_cache_keys() -> None:
    system = _plan(tc.CudaToolkit("system", "--cuda-toolkit system", version="13.0"))
    wheels = _plan(_wheel_kit())
    assert system.key != wheels.key
    assert system.cuda_wheels is None
    assert not any("CUDAToolkit_ROOT" in a for a in system.cmake_args)


def test_no_fitting_wheels_is_a_problem_before_anything_runs() -> None:
    p = _plan(_wheel_kit(root=None, version=None, reason="--cuda-toolkit pypi, but 12.4"))
    assert p.problems and "no CUDA toolkit wheels fit" in p.problems[0].message
    with pytest.raises(BuildError):
        brun.preflight(p)


# --------------------------------------------------------------------------- recorded machines


def test_a_driver_without_toolkit_builds_cuda_from_wheels_matching_the_driver() -> None:
    prober = hw.RecordedProber(PROBES / "nvidia-driver-cuda13-no-toolkit")
    detection = hw.detect(prober)
    assert detection.cuda_driver == "13.0"
    decision = dec.decide(detection)
    assert decision.backend == "cuda" and "PyPI wheels" in decision.reason
    kit = tc.probe_toolchain(detection, "cuda", prober=prober).cuda
    assert kit is not None and kit.kind == "pypi" and kit.version == "13.0.88"
    assert kit.libcuda == "/usr/lib/x86_64-linux-gnu/libcuda.so"


def test_an_old_driver_without_toolkit_stays_on_cpu_and_says_why() -> None:
    detection = hw.detect(hw.RecordedProber(PROBES / "nvidia-driver-cuda12-no-toolkit"))
    decision = dec.decide(detection)
    assert decision.backend == "cpu"
    assert "12.8" in decision.cuda_toolkit and "update the NVIDIA driver" in decision.cuda_toolkit


def test_the_machine_kind_of_this_project_plans_wheels_for_an_explicit_cuda_build() -> None:
    prober = hw.RecordedProber(PROBES / "nvcc-no-gpu")
    detection = hw.detect(prober)
    decision = dec.decide(detection, "cuda")
    assert decision.cuda_toolkit.startswith("pypi:")
    # The check of issue 11: nothing in the plan foresees the missing cuBLAS as a failure.
    text = " ".join(decision.hints)
    for phrase in ("no cuBLAS", "build stops", "cublas_v2.h missing"):
        assert phrase not in text


def test_a_bare_call_reads_its_own_recording() -> None:
    prober = hw.RecordedProber(PROBES / "nvidia-driver-cuda13-no-toolkit")
    assert "CUDA Version: 13.0" in prober.run(["nvidia-smi"]).stdout
    assert prober.run(["nvidia-smi", "--query-gpu=x"]).stdout.startswith("0, NVIDIA H200")


# --------------------------------------------------------------------------- unpacking


def _fake_wheel(path: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, data)
    return path


def test_unpack_keeps_exec_bits_and_links_unversioned_libraries(tmp_path: Path) -> None:
    wheel = _fake_wheel(
        tmp_path / "w.whl",
        {
            "nvidia/cu13/bin/nvcc": (b"#!/bin/sh\n", 0o755),
            "nvidia/cu13/lib/libcublas.so.13": (b"elf", 0o644),
            "nvidia/cu13/lib/libnvvm.so.4": (b"elf", 0o644),
            "nvidia_x-1.dist-info/METADATA": (b"meta", 0o644),
        },
    )
    target = tmp_path / "tk"
    assert cw.unpack(wheel, target) == 3
    assert os.access(target / "bin" / "nvcc", os.X_OK)
    assert not (target / "nvidia_x-1.dist-info").exists()
    assert sorted(cw.link_unversioned(target / "lib")) == ["libcublas.so", "libnvvm.so"]
    assert os.readlink(target / "lib" / "libcublas.so") == "libcublas.so.13"
    assert cw.link_unversioned(target / "lib") == []  # idempotent


def test_a_member_escaping_the_toolkit_is_refused(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl", {"nvidia/cu13/../../evil": (b"x", 0o644)})
    with pytest.raises(BuildError, match="escapes"):
        cw.unpack(wheel, tmp_path / "tk")


def test_install_verifies_unpacks_once_and_marks_it(tmp_path: Path) -> None:
    data = _fake_wheel(
        tmp_path / "src.whl",
        {
            "nvidia/cu13/bin/nvcc": (b"#!/bin/sh\n", 0o755),
            "nvidia/cu13/lib/libcudart.so.13": (b"elf", 0o644),
        },
    ).read_bytes()
    wheel = cw.Wheel(
        "nvidia-cuda-nvcc",
        "99.0.1",
        "manylinux2014_x86_64",
        "00/00/none",
        hashlib.sha256(data).hexdigest(),
        len(data),
    )
    # Already downloaded (as after a `pip download`): no network is needed.
    paths.downloads_dir().mkdir(parents=True)
    (paths.downloads_dir() / wheel.filename).write_bytes(data)
    wheel_set = cw.WheelSet((99, 0), "99.0.1", (wheel,))
    seen: list[str] = []
    root = cw.install(wheel_set, progress=lambda done, total, what: seen.append(what))
    assert root == paths.toolkits_dir() / "cuda-99.0.1-pypi"
    assert cw.is_installed(root) and cw.nvcc_version(root) == "99.0.1"
    assert (root / "lib" / "libcudart.so").is_symlink()
    assert any("unpacking" in s for s in seen)
    assert not list(paths.toolkits_dir().glob(".*staging*"))
    (root / "bin" / "extra").write_text("kept")
    assert cw.install(wheel_set) == root and (root / "bin" / "extra").exists()  # once


def test_a_corrupt_download_is_refused_with_what_to_do(tmp_path: Path) -> None:
    wheel = cw.Wheel("nvidia-cublas", "99.0", "manylinux_2_27_x86_64", "00/00/x", "0" * 64, 3)
    paths.downloads_dir().mkdir(parents=True)
    (paths.downloads_dir() / wheel.filename).write_bytes(b"bad")

    class Offline:
        def __call__(self, *a: Any, **kw: Any) -> Any:
            import httpx

            raise httpx.ConnectError("offline")

    import httpx

    mp = pytest.MonkeyPatch()
    mp.setattr(httpx, "stream", Offline())
    try:
        with pytest.raises(BuildError) as err:
            cw.install(cw.WheelSet((99, 0), "99.0", (wheel,)))
    finally:
        mp.undo()
    assert "pip download --no-deps nvidia-cublas==99.0" in (err.value.hint or "")
    assert not cw.is_installed(paths.toolkits_dir() / "cuda-99.0-pypi")


def test_the_build_installs_the_wheels_before_cmake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed: list[str] = []
    monkeypatch.setattr(
        cw, "install", lambda wheel_set, progress=None: installed.append(wheel_set.version)
    )
    steps: list[Any] = []
    brun.install_cuda_wheels("13.5.37", steps.append)
    assert installed == ["13.5.37"]
    assert steps and steps[0].phase == "message" and "13.5.37" in steps[0].description
    with pytest.raises(BuildError):
        brun.install_cuda_wheels("1.0", None)
