"""Build progress as data: `Step`s parsed from Ninja's (or Make's) output, the `Reporter`
callback the core reports them through, and `LineReporter`, which prints them as plain,
throttled lines for logs and pipes (a cold build is minutes of silence otherwise)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]\s*(.*)$")


@dataclass(frozen=True)
class Step:
    """One progress update: `done` of `total` (0: unknown), what is being done, and the phase:
    message (a line to show as is), download (bytes), configure, or build (Ninja steps)."""

    done: int
    total: int
    description: str
    phase: str = "build"


#: What the core calls with each Step; the CLI renders it (a bar on a terminal, plain lines
#: elsewhere), serve prints plain lines, tests record them.
Reporter = Callable[[Step], None]


def parse_progress(line: str) -> Step | None:
    """Ninja's `[n/m] Building CXX object ...` (or Make's `[ 42%] ...`) as a Step."""
    line = line.rstrip("\r\n")
    m = _NINJA_STEP.match(line)
    if m:
        return Step(int(m.group(1)), int(m.group(2)), _short_description(m.group(3)))
    m = _MAKE_STEP.match(line)
    if m:
        return Step(int(m.group(1)), 100, _short_description(m.group(2)))
    return None


def _short_description(text: str) -> str:
    # "Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o" -> "Building ggml.cpp"
    m = re.match(r"(Building \w+) object .*/([^/]+?)\.o(?:bj)?$", text)
    if m:
        return f"{m.group(1).split()[0]} {m.group(2)}"
    m = re.match(r"(Linking) \w+ (?:\w+ )*?(?:library|executable) (.*)$", text)
    if m:
        return f"Linking {Path(m.group(2)).name}"
    return text if len(text) <= 60 else text[:57] + "..."


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class LineReporter:
    """Prints Steps as plain lines: every message, the first configure line, and a build line
    each `every_percent` of the steps or each `every_s` seconds (whichever comes first), with
    [done/total]; downloads likewise by bytes."""

    def __init__(
        self,
        stream: TextIO,
        *,
        every_percent: float = 5.0,
        every_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.every_percent = every_percent
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self._last_time: float | None = None
        self._last_fraction = -1.0
        self._last_phase = ""
        self._last_what = ""

    def __call__(self, step: Step) -> None:
        now = self.clock()
        if step.phase == "message":
            self._emit(step.description, now)
            return
        new_phase = step.phase != self._last_phase or (
            step.phase == "download" and step.description != self._last_what
        )
        if new_phase:
            self._last_phase = step.phase
            self._last_what = step.description
            self._last_fraction = -1.0
        fraction = step.done / step.total if step.total else None
        due_time = self._last_time is None or now - self._last_time >= self.every_s
        due_step = fraction is not None and (
            fraction >= 1.0 or fraction - self._last_fraction >= self.every_percent / 100
        )
        if not (new_phase or due_time or due_step):
            return
        if fraction is not None:
            self._last_fraction = fraction
        self._emit(self._format(step, fraction, now), now)

    def _format(self, step: Step, fraction: float | None, now: float) -> str:
        elapsed = _clock_text(now - self.started)
        if step.phase == "download":
            done = step.done / (1 << 20)
            total = f"/{step.total / (1 << 20):.0f}" if step.total else ""
            return f"{step.description}: {done:.0f}{total} MiB ({elapsed})"
        if fraction is None:
            return f"{step.description} ({elapsed})"
        return f"[{step.done}/{step.total}] {fraction * 100:3.0f}% {step.description} ({elapsed})"

    def _emit(self, line: str, now: float) -> None:
        self._last_time = now
        self.stream.write(line + "\n")
        self.stream.flush()
