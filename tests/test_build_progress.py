"""Build progress: plain lines for logs and pipes (a cold build printed nothing for 9 minutes
when its output was not a terminal, issue 16), a bar on a terminal, and what serve prints."""

from __future__ import annotations

import io
from typing import Any

import pytest

from llamactl.build.progress import LineReporter, Step, parse_progress
from llamactl.cli.render import BuildProgress, plain_stream

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_line_per_five_percent_of_the_ninja_steps() -> None:
    out, clock = io.StringIO(), FakeClock()
    report = LineReporter(out, clock=clock)
    report(Step(0, 0, "configuring", "configure"))
    report(Step(0, 0, "configuring: Including CUDA backend", "configure"))  # same phase
    for n in range(1, 369):
        step = parse_progress(f"[{n}/368] Building CUDA object a/b/mmq-instance-{n}.cu.o\n")
        assert step is not None
        report(step)
    lines = _lines(out)
    assert lines[0].startswith("configuring")
    build = [line for line in lines if line.startswith("[")]
    # 0 %, then every 5 %, and the last step: about 21 lines for 368 steps, not 368.
    assert 19 <= len(build) <= 23, build
    assert build[0].startswith("[1/368]") and build[-1].startswith("[368/368] 100%")
    assert "mmq-instance-368.cu" in build[-1]


def test_a_slow_step_still_prints_every_fifteen_seconds() -> None:
    out, clock = io.StringIO(), FakeClock()
    report = LineReporter(out, clock=clock)
    report(Step(1, 1000, "Building a.cu"))
    for n in range(2, 8):  # far below 5 %, but a minute and a half passes
        clock.now += 15.0
        report(Step(n, 1000, f"Building {n}.cu"))
    assert len(_lines(out)) == 7
    assert _lines(out)[-1].endswith("(1m30s)")


def test_messages_always_and_downloads_in_mib() -> None:
    out, clock = io.StringIO(), FakeClock()
    report = LineReporter(out, clock=clock)
    report(Step(0, 0, "waiting for another llamactl building x ...", "message"))
    total = 400 << 20
    for done in range(0, total + 1, 1 << 20):
        report(Step(done, total, "downloading nvidia-cublas 13.10.0.20", "download"))
    report(Step(1 << 20, 2 << 20, "downloading nvidia-nvvm 13.5.37", "download"))
    lines = _lines(out)
    assert lines[0] == "waiting for another llamactl building x ..."
    cublas = [line for line in lines if "cublas" in line]
    assert 19 <= len(cublas) <= 23 and cublas[-1].startswith(
        "downloading nvidia-cublas 13.10.0.20: 400/400 MiB"
    )
    assert lines[-1].startswith("downloading nvidia-nvvm")  # a new file is a new line


@pytest.mark.parametrize(
    ("out_tty", "err_tty", "where"),
    [(True, True, None), (False, True, "out"), (True, False, "err"), (False, False, "err")],
)
def test_plain_lines_go_where_the_log_is(out_tty: bool, err_tty: bool, where: str | None) -> None:
    out = Tty() if out_tty else io.StringIO()
    err = Tty() if err_tty else io.StringIO()
    chosen = plain_stream(out, err)
    assert chosen is {"out": out, "err": err, None: None}[where]


def test_the_cli_reporter_prints_lines_without_rich_when_not_a_terminal() -> None:
    out = io.StringIO()
    consoles: list[Any] = []

    def console() -> Any:
        consoles.append(1)
        raise AssertionError("no console (rich) for plain lines")

    with BuildProgress(console, lines=out) as report:
        report(Step(0, 0, "configuring", "configure"))
        report(Step(5, 10, "Building x.cpp"))
    assert _lines(out)[0].startswith("configuring") and "[5/10]" in _lines(out)[1]
    assert not consoles


def test_the_cli_reporter_draws_a_bar_on_a_terminal() -> None:
    from rich.console import Console

    tty = Tty()
    console = Console(file=tty, force_terminal=True, width=100)
    with BuildProgress(lambda: console, bar=True) as report:
        report(Step(0, 0, "a note for the user", "message"))
        report(Step(3, 10, "Building y.cpp"))
    text = tty.getvalue()
    assert "a note for the user" in text and "3/10" in text
