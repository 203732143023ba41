"""`llamactl doctor`: what was detected, which backend fits, and why."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from llamactl.build.decision import Decision
from llamactl.build.detection import BACKENDS, Detection
from llamactl.cli import Command

if TYPE_CHECKING:
    from rich.console import Console

# The tools worth a row, in the order a reader checks them; anything else follows.
_TOOL_ORDER = (
    "cmake",
    "ninja",
    "cc",
    "cxx",
    "ccache",
    "node",
    "npm",
    "nvcc",
    "cublas",
    "rocm",
    "glslc",
    "vulkan-headers",
    "spirv-headers",
    "xcode",
    "icpx",
    "mcc",
)


def report(detection: Detection, decision: Decision) -> dict[str, Any]:
    """The doctor report as plain data: the same content as the table, for --json."""
    return {
        "backend": decision.backend,
        "decision": asdict(decision),
        "detection": asdict(detection),
    }


def _mib(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


def render(console: Console, detection: Detection, decision: Decision) -> None:
    """Print the report as rich tables."""
    from rich.table import Table

    d = detection
    system = Table(title="System", show_header=False, title_justify="left")
    system.add_column(style="bold")
    system.add_column()
    system.add_row("OS", f"{d.os} {d.arch}")
    cores = f"{d.cpu_cores or '?'} cores, {d.cpu_threads or '?'} threads"
    system.add_row("CPU", f"{d.cpu_model or 'unknown'} ({cores})")
    system.add_row("SIMD", ", ".join(d.cpu_features) or "none detected")
    system.add_row("RAM", f"{_mib(d.ram_mib)} total, {_mib(d.ram_available_mib)} available")
    console.print(system)

    gpus = Table(title="GPUs", title_justify="left")
    for col in ("#", "vendor", "name", "memory", "driver", "target", "seen by"):
        gpus.add_column(col)
    for g in d.gpus:
        target = (g.compute_capability and f"compute {g.compute_capability}") or g.gfx_target or ""
        memory = _mib(g.memory_mib) if g.memory_mib else ""
        gpus.add_row(str(g.index), g.vendor, g.name, memory, g.driver or "", target, g.api or "")
    for g in d.vulkan_devices:
        if g.is_software:
            gpus.add_row("-", "software", g.name, "", g.driver or "", "not a GPU", "vulkan")
    if d.gpus or d.vulkan_devices:
        console.print(gpus)
    else:
        console.print("[bold]GPUs[/bold]: none found")

    tools = Table(title="Toolchain", title_justify="left")
    for col in ("tool", "status", "version", "path / note"):
        tools.add_column(col)
    names = [n for n in _TOOL_ORDER if n in d.tools] + sorted(set(d.tools) - set(_TOOL_ORDER))
    for name in names:
        t = d.tools[name]
        if t.ok:
            status = "[green]ok[/green]"
        elif t.path:
            status = "[yellow]broken[/yellow]"
        else:
            status = "[dim]missing[/dim]"
        where = "; ".join(x for x in (t.path, t.note) if x)
        tools.add_row(name, status, t.version or "", where)
    console.print(tools)

    for problem in d.problems:
        console.print(f"[yellow]probe problem:[/yellow] {problem}", highlight=False)
    console.print(f"[bold]backend: {decision.backend}[/bold]", highlight=False)
    console.print(f"reason:  {decision.reason}", highlight=False)
    if decision.cuda_architectures:
        console.print(f"CUDA architectures: {';'.join(decision.cuda_architectures)}")
    if decision.cuda_toolkit:
        console.print(f"CUDA toolkit: {decision.cuda_toolkit}", highlight=False)
    if decision.gpu_targets:
        console.print(f"GPU targets: {';'.join(decision.gpu_targets)}")
    for hint in decision.hints:
        console.print(f"[cyan]hint:[/cyan] {hint}", highlight=False, soft_wrap=False)
    console.print(f"[dim]probed in {d.elapsed_ms:.0f} ms[/dim]")


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="Print detection and decision as JSON.")
@click.option(
    "--backend",
    type=click.Choice(["auto", *BACKENDS]),
    default="auto",
    show_default=True,
    help="Override the backend choice (its toolchain is still checked).",
)
def doctor(as_json: bool, backend: str) -> None:
    """Show what was detected and which backend fits, and why.

    Set LLAMACTL_PROBE_FIXTURE to a recorded probe folder to replay another machine."""
    from llamactl.build.decision import decide
    from llamactl.build.hardware import detect

    detection = detect()
    decision = decide(detection, backend)
    if as_json:
        click.echo(json.dumps(report(detection, decision), indent=2))
        return
    from rich.console import Console

    render(Console(), detection, decision)
