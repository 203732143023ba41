"""Where a model's llama-server runs when serve has several models: the memory the fleet
decides against (free RAM, or free VRAM per GPU from nvidia-smi through build/hardware.py's
probe seam), whether the user chose the devices of a model themselves, and the flag and
environment that put an instance on one GPU. The choice itself is router.route()'s (pure).

Why `--device CUDAn` and not CUDA_VISIBLE_DEVICES: llama-server then still sees every GPU
under the names `llama-server --list-devices` prints, so its own log lines ("CUDA1 model
buffer size", "using device CUDA1") name the same GPU as `llamactl ps` and nvidia-smi.
CUDA_VISIBLE_DEVICES would renumber the one GPU left as CUDA0 in every instance. CUDA numbers
devices fastest first by default, nvidia-smi by PCI bus: CUDA_DEVICE_ORDER=PCI_BUS_ID makes
CUDAn and nvidia-smi's index n the same GPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from llamactl.serve.router import Gpu

__all__ = [
    "FreeMemory",
    "cpu_threads",
    "device_env",
    "device_flags",
    "gpu_label",
    "user_placed",
]

#: Flags by which a user chooses devices (common/arg.cpp): serve leaves such a model alone.
_DEVICE_FLAGS = frozenset(
    {"-dev", "--device", "-ts", "--tensor-split", "-sm", "--split-mode", "-mg", "--main-gpu"}
)
#: The same choices made through the environment (serve's own, or a preset's LLAMA_ARG_ keys).
_DEVICE_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "LLAMA_ARG_DEVICE",
    "LLAMA_ARG_TENSOR_SPLIT",
    "LLAMA_ARG_SPLIT_MODE",
    "LLAMA_ARG_MAIN_GPU",
)


def user_placed(args: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why llamactl must not choose this instance's GPU (the user did, it runs on the CPU or
    over RPC workers), or None when it may. `env` is what the instance's environment will be."""
    for arg in args:
        flag = arg.partition("=")[0]
        if flag in _DEVICE_FLAGS:
            return f"{flag} given"
        if flag == "--rpc":
            return "split over RPC workers"
    for name in _DEVICE_ENV:
        if env.get(name):
            return f"{name} set"
    from llamactl.models.estimate import flag_value

    layers = flag_value(args, "-ngl", "--gpu-layers", "--n-gpu-layers")
    if layers is None:
        layers = env.get("LLAMA_ARG_N_GPU_LAYERS")
    if layers is not None and layers.strip() == "0":
        return "-ngl 0: it runs on the CPU"
    return None


def gpu_label(index: int) -> str:
    """How logs and ps name a GPU: nvidia-smi's index and llama-server's device name."""
    return f"GPU{index} (CUDA{index})"


def device_flags(index: int) -> tuple[str, ...]:
    """llama-server's flag that keeps an instance on one GPU (its weights, KV cache, compute
    buffers, and a projector or draft model, which follow --device)."""
    return ("--device", f"CUDA{index}")


def device_env() -> dict[str, str]:
    """The environment that makes CUDAn nvidia-smi's GPU n (see the module's docstring)."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


class FreeMemory:
    """The memory the fleet decides against, read at most once a second (the router asks on
    every decision, and nvidia-smi takes tens of milliseconds): `gpus()` is the free VRAM of
    each GPU for a GPU build (None for a CPU build, or when nvidia-smi says nothing), and
    calling it gives one number: their sum (llama.cpp splits a model that llamactl does not
    place over every visible GPU, -sm layer), else the RAM the kernel says is available."""

    def __init__(
        self,
        gpu: bool,
        clock: Callable[[], float] | None = None,
        probe: Callable[[], list[Gpu] | None] | None = None,
        ram: Callable[[], int | None] | None = None,
    ) -> None:
        self.gpu = gpu
        self._clock = clock or time.monotonic
        self._probe = probe or _probe_gpus
        self._ram = ram or _available_ram
        self._at = -1e9
        self._gpus: list[Gpu] | None = None
        self._value: int | None = None

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._at >= 1.0:
            self._at = now
            self._gpus = self._probe() if self.gpu else None
            if self._gpus:
                self._value = sum(g.free_bytes for g in self._gpus)
            else:
                self._value = self._ram()

    def __call__(self) -> int | None:
        self._refresh()
        return self._value

    def gpus(self) -> list[Gpu] | None:
        self._refresh()
        return self._gpus


def _probe_gpus() -> list[Gpu] | None:
    from llamactl.build.hardware import gpu_memory

    found = gpu_memory()
    if not found:
        return None
    return [Gpu(g.index, g.free_mib << 20, g.total_mib << 20) for g in found]


def _available_ram() -> int | None:
    from llamactl.models.estimate import available_memory

    return available_memory()


#: Flags and variables by which a user sets an instance's CPU threads (common/arg.cpp).
_THREAD_FLAGS = frozenset({"-t", "--threads"})
_THREAD_ENV = "LLAMA_ARG_THREADS"


def cpu_threads(
    cpus: int, concurrent: int, args: Sequence[str], env: Mapping[str, str]
) -> int | None:
    """The `-t` for each llama-server of a CPU build when up to `concurrent` of them may run at
    once on `cpus` CPUs: its share of them, so that they do not oversubscribe the cores; None
    when one runs at a time or the user set the threads (flag or LLAMA_ARG_THREADS).

    ggml's threads spin while they wait for each other: two llama-servers of two threads each
    generating at once on two cores took 75 s for what they did in 2.6 s with one thread each
    (docs/performance.md). llama.cpp's own default is every core, for one server alone."""
    if concurrent <= 1 or env.get(_THREAD_ENV):
        return None
    if any(a.partition("=")[0] in _THREAD_FLAGS for a in args):
        return None
    return max(1, cpus // concurrent)
