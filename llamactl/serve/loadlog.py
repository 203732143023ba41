"""What llama-server's load log says about GPU offload, pure: how many layers went to the GPUs
and to which devices, for serve's start line."""

from __future__ import annotations

import re
from collections.abc import Sequence

# llama.cpp src/llama.cpp: "using device CUDA0 (NVIDIA H200) (0000:19:00.0) - 140000 MiB free"
_USING = re.compile(r"using device (\S+) \((.*?)\)(?: \(.*?\))? - (\d+) MiB free")
# src/llama-model.cpp: "offloaded 31/31 layers to GPU"
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# src/llama-model.cpp: "load_tensors:        CUDA0 model buffer size =    80.00 MiB"
_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s*([\d.]+) MiB")
# Host buffers, not devices: "CPU", "CPU_Mapped", "CUDA_Host", "CPU_REPACK", ...
_HOST = re.compile(r"^(CPU|.*_Host|.*_Mapped|CPU_.*)$")


def offload_summary(lines: Sequence[str]) -> str | None:
    """ "31/31 layers on the GPU (CUDA0 NVIDIA H200: 80 MiB)" from the last load in the log;
    None when the log names no offload (a CPU-only build prints none)."""
    offloaded: tuple[int, int] | None = None
    names: dict[str, str] = {}
    weights: dict[str, float] = {}
    for line in lines:
        m = _USING.search(line)
        if m:
            names[m.group(1)] = m.group(2)
            continue
        m = _OFFLOADED.search(line)
        if m:
            offloaded = (int(m.group(1)), int(m.group(2)))
            weights = {}  # a reload starts over
            continue
        m = _BUFFER.search(line)
        if m and not _HOST.match(m.group(1)):
            weights[m.group(1)] = weights.get(m.group(1), 0.0) + float(m.group(2))
    if offloaded is None:
        return None
    done, total = offloaded
    summary = f"{done}/{total} layers on the GPU"
    devices = [
        f"{dev} {names[dev]}: {mib:.0f} MiB" if dev in names else f"{dev}: {mib:.0f} MiB"
        for dev, mib in weights.items()
    ]
    if done == 0:
        return f"{summary} (none offloaded: raise -ngl)"
    if devices:
        summary += f" ({', '.join(devices)})"
    return summary
