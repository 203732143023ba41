"""The soak (tests/support/soak.py): its validators must catch every kind of broken answer, its
stability verdict must catch growth; then the soak itself against the real `llamactl serve`,
short by default and long by hand (`pytest -m soak`, LLAMACTL_SOAK_SECONDS)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support import soak
from support.serve import start, stop
from support.soak import MIB, Limits, Sample

SSE = "text/event-stream"
JSON = "application/json; charset=utf-8"


def chunk(content: str | None = None, finish: str | None = None, cid: str = "chatcmpl-1") -> str:
    delta = {} if finish else {"content": content}
    obj: dict[str, Any] = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "id": cid,
        "object": "chat.completion.chunk",
    }
    if finish:
        obj["timings"] = {"predicted_n": 2}
    return "data: " + json.dumps(obj) + "\n\n"


GOOD_STREAM = (
    chunk("Hello") + ": ping\n\n" + chunk("!") + chunk(finish="length") + "data: [DONE]\n\n"
)
GOOD_CHAT = json.dumps(
    {
        "choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {"completion_tokens": 2},
    }
).encode()


@pytest.mark.unit
def test_a_good_stream_passes_with_its_tokens() -> None:
    check = soak.check_stream(200, SSE, GOOD_STREAM.encode(), expected_tokens=2)
    assert check.problem is None
    assert check.tokens == 2


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "why"),
    [
        (GOOD_STREAM[: len(GOOD_STREAM) // 2], "truncated"),  # cut mid-event
        (GOOD_STREAM[: GOOD_STREAM.index("data: [DONE]")], "[DONE]"),  # ends at a boundary
        (GOOD_STREAM.replace(": ping", "HTTP/1.1 200 OK"), "garbage"),
        (GOOD_STREAM.replace(": ping\n\n", '{"choices": []}\n\n'), "garbage"),
        (chunk("a") + "data: {not json\n\n" + chunk(finish="stop") + "data: [DONE]\n\n", "JSON"),
        (chunk("a") + "data: [DONE]\n\n" + chunk(finish="stop") + "data: [DONE]\n\n", "before"),
        (GOOD_STREAM + chunk("late"), "[DONE]"),  # events after [DONE]
        (chunk("a") + chunk("b") + "data: [DONE]\n\n", "finish_reason"),  # none at the end
        (chunk("a", finish="stop") + chunk("b", "stop") + "data: [DONE]\n\n", "finish_reason"),
        (chunk("a") + chunk(finish="stop", cid="chatcmpl-2") + "data: [DONE]\n\n", "different"),
        ('data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n', "error"),
        ('data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n', "delta"),
        ("", "empty"),
        ("data: [DONE]\n\n", "without any chunk"),
    ],
)
def test_broken_streams_are_caught(body: str, why: str) -> None:
    check = soak.check_stream(200, SSE, body.encode())
    assert check.problem is not None
    assert why in check.problem


@pytest.mark.unit
def test_stream_checks_status_type_encoding_and_token_count() -> None:
    assert "status 502" in (soak.check_stream(502, SSE, b"{}").problem or "")
    assert "content-type" in (soak.check_stream(200, JSON, GOOD_STREAM.encode()).problem or "")
    assert "UTF-8" in (soak.check_stream(200, SSE, b"data: \xff\n\n").problem or "")
    wrong = soak.check_stream(200, SSE, GOOD_STREAM.encode(), expected_tokens=7)
    assert "asked for 7" in (wrong.problem or "")


@pytest.mark.unit
def test_a_good_chat_passes_with_its_tokens() -> None:
    check = soak.check_chat(200, JSON, GOOD_CHAT, expected_tokens=2)
    assert check == soak.Check(None, 2)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (GOOD_CHAT[:-10], "not JSON"),  # truncated
        (GOOD_CHAT + GOOD_CHAT, "not JSON"),  # two answers in one body
        (b"[1, 2]", "not an object"),
        (b'{"error": {"message": "x"}}', "error"),
        (b'{"choices": []}', "choices[0]"),
        (b'{"choices": [{"message": {"role": "assistant"}}]}', "content"),
        (GOOD_CHAT.replace(b'"length"', b"null"), "finish_reason"),
        (GOOD_CHAT.replace(b"usage", b"nousage"), "completion_tokens"),
    ],
)
def test_broken_chat_answers_are_caught(body: bytes, why: str) -> None:
    check = soak.check_chat(200, JSON, body)
    assert check.problem is not None
    assert why in check.problem


@pytest.mark.unit
def test_chat_checks_status_type_and_token_count() -> None:
    assert "status 503" in (soak.check_chat(503, JSON, GOOD_CHAT).problem or "")
    assert "content-type" in (soak.check_chat(200, "text/plain", GOOD_CHAT).problem or "")
    assert "asked for 5" in (soak.check_chat(200, JSON, GOOD_CHAT, 5).problem or "")


@pytest.mark.unit
def test_small_requests_are_validated() -> None:
    pieces = json.dumps({"tokens": [{"id": 1, "piece": "so"}, {"id": 2, "piece": "ak"}]})
    assert soak.check_tokenize(200, JSON, pieces.encode(), "soak").problem is None
    other = soak.check_tokenize(200, JSON, pieces.encode(), "another request")
    assert "spell" in (other.problem or "")  # an answer meant for another request
    assert soak.check_tokenize(200, JSON, b'{"tokens": [1, 2]}', "x").problem
    assert soak.check_health(200, JSON, b'{"status": "ok"}').problem is None
    assert soak.check_health(200, JSON, b'{"status": "loading"}').problem
    assert soak.check_health(200, JSON, b'{"status": "ok"').problem
    assert soak.check_models(200, JSON, b'{"data": [{"id": "m"}]}').problem is None
    assert soak.check_models(200, JSON, b'{"data": []}').problem
    assert soak.check_models(503, JSON, b'{"data": [{"id": "m"}]}').problem


def samples(rss_mib: list[float], fds: list[int]) -> list[Sample]:
    return [
        Sample(t=float(i), rss=int(r * MIB), fds=f)
        for i, (r, f) in enumerate(zip(rss_mib, fds, strict=True))
    ]


@pytest.mark.unit
def test_flat_resources_are_stable() -> None:
    rss = [30.0, 40.0, 45, 45.5, 45, 46, 45, 45.5, 46, 45, 45.8, 46, 45.2]
    fds = [20, 140, 150, 148, 151, 150, 149, 152, 150, 150, 148, 151, 150]
    problems, figures = soak.stability_problems(samples(rss, fds), 18, 19, Limits(warmup_s=2))
    assert problems == []
    assert figures["rss_first_third"] == pytest.approx(45 * MIB)  # samples 2, 3, 4


@pytest.mark.unit
def test_steady_growth_fails() -> None:
    rss = [40.0 + 5 * i for i in range(20)]  # 5 MiB a sample: a leak
    fds = [100 + 3 * i for i in range(20)]
    problems, _ = soak.stability_problems(samples(rss, fds), 18, 18, Limits(warmup_s=2))
    assert any("RSS grew" in p for p in problems)
    assert any("fds grew" in p for p in problems)


@pytest.mark.unit
def test_fds_not_back_to_the_baseline_fail() -> None:
    problems, _ = soak.stability_problems([], 18, 30, Limits())
    assert problems and "30 fds open after every client closed" in problems[0]
    assert soak.stability_problems([], 18, 22, Limits(fd_slack_end=4))[0] == []


@pytest.mark.unit
def test_a_report_with_any_error_fails() -> None:
    report = soak.SoakReport(spec={})
    report.kinds["stream"] = soak.KindStats(requests=10, ok=9, corrupted=1)
    assert not report.ok
    report.kinds["stream"] = soak.KindStats(requests=10, ok=10)
    assert report.ok
    report.stability_problems = ["RSS grew"]
    assert not report.ok


# -- the soak itself, against the real serve ----------------------------------------------------

#: llama-server's default 4 slots, so that 64 clients queue inside it; 512 context tokens per
#: slot, ten times what a soak request needs; one compute thread (see DEFAULT_SERVE_ARGS in
#: scripts/soak.py for why).
SERVE_ARGS = ("-np", "4", "-c", "2048", "-t", "1")


def run_real_soak(
    server_bin: Path, default_model: Path, tmp_path: Path, seconds: float
) -> soak.SoakReport:
    served = start(server_bin, default_model, tmp_path / "serve", *SERVE_ARGS)
    try:
        spec = soak.SoakSpec(url=served.url, clients=64, duration=seconds, max_tokens=16)
        report = soak.run_soak(spec, pid=served.proc.pid, progress=print)
    finally:
        stop(served)
    code = served.proc.returncode
    report.serve_args = list(SERVE_ARGS)
    text = soak.format_report(report)
    print(text)
    (tmp_path / "soak.json").write_text(report.to_json())
    assert code in (0, 143, -15), f"serve exited with {code}"
    assert report.errors == 0, text
    assert report.stability_problems == [], text
    # Every kind was exercised, and the clients really ran concurrently.
    assert all(report.kinds[k].ok > 0 for k in soak.KINDS), text
    assert (report.peak_client_conns or 0) >= 32, text
    return report


@pytest.mark.real
def test_short_soak_loses_nothing_and_stays_flat(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    run_real_soak(server_bin, default_model, tmp_path, seconds=15.0)


@pytest.mark.real
@pytest.mark.soak
def test_long_soak(server_bin: Path, default_model: Path, tmp_path: Path) -> None:
    seconds = float(os.environ.get("LLAMACTL_SOAK_SECONDS", "300"))
    run_real_soak(server_bin, default_model, tmp_path, seconds=seconds)
