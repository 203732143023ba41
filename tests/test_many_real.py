"""Several models behind `llamactl serve` on the real llama-server: three names for the default
model (symlinks) with a small context, routed, swapped under --models-max, named as llamactl
names them; and one model served under its `llamactl models` name."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.serve import SEED, Serve, start, stop

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]


@pytest.fixture
def names(tmp_path: Path, default_model: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (d / f"{name}.gguf").symlink_to(default_model)
    return d


@pytest.fixture
def many(tmp_path: Path, server_bin: Path, names: Path) -> Iterator[Serve]:
    s = start(
        server_bin,
        None,
        tmp_path / "home",
        "--models-dir",
        str(names),
        "--models-max",
        "2",
        "-c",
        "512",
        "-t",
        "1",
    )
    try:
        yield s
    finally:
        print(stop(s)[-3000:])


def ask(s: Serve, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{s.url}/v1/chat/completions", json={**SEED, "model": model, **extra}, timeout=300
    )


def states(s: Serve) -> dict[str, str]:
    data = httpx.get(f"{s.url}/models", timeout=30).json()["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def test_three_names_routed_swapped_and_named(many: Serve) -> None:
    for name in ("alpha", "beta"):
        answer = ask(many, name)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == name
        assert "Paris" in body["choices"][0]["message"]["content"]
    assert states(many) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}
    assert len(many.llama_servers()) == 2
    # alpha is the least recently used: gamma takes its place.
    assert ask(many, "gamma").json()["model"] == "gamma"
    assert states(many) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    assert len(many.llama_servers()) == 2
    for kid in many.llama_servers():
        cmdline = " ".join(kid.cmdline())
        assert "--models-dir" not in cmdline and "-c 512" in cmdline
    metrics = httpx.get(f"{many.url}/metrics", timeout=30).text
    assert 'llamactl_requests_total{model="alpha",status="2xx"} 1' in metrics
    assert 'llamactl_evictions_total{model="alpha"} 1' in metrics
    # each instance's own llama-server metrics, labelled with its model
    assert 'llamacpp:prompt_tokens_total{model="gamma"}' in metrics
    unknown = ask(many, "delta")
    assert unknown.status_code == 404 and "alpha" in unknown.json()["error"]["message"]
    assert "Evicting" in many.stderr() or "evicted to make room for gamma" in many.stderr()


def test_a_stream_waiting_for_a_load_gets_its_answer(many: Serve) -> None:
    with httpx.stream(
        "POST",
        f"{many.url}/v1/chat/completions",
        json={**SEED, "model": "beta", "stream": True},
        timeout=300,
    ) as resp:
        assert resp.status_code == 200
        text = "".join(resp.iter_text())
    assert "Paris" in text.replace('"', "") or "Paris" in text
    assert text.rstrip().endswith("data: [DONE]")


def test_a_conversation_is_looked_up_resumed_and_stopped_by_its_id_alone(many: Serve) -> None:
    """Resumable streams (X-Conversation-Id) across two models: the lookup, the resume and the
    stop name no model and still reach the llama-server that holds each conversation."""
    for model, conv in (("alpha", "conv-a"), ("beta", "conv-b")):
        with httpx.stream(
            "POST",
            f"{many.url}/v1/chat/completions",
            json={**SEED, "model": model, "stream": True, "max_tokens": 8},
            headers={"X-Conversation-Id": conv},
            timeout=300,
        ) as resp:
            assert resp.status_code == 200
            assert "".join(resp.iter_text()).rstrip().endswith("data: [DONE]")
    found = httpx.post(
        f"{many.url}/v1/streams/lookup",
        json={"conversation_ids": ["conv-a", "conv-b", "conv-unknown"]},
        timeout=30,
    )
    assert found.status_code == 200
    assert sorted(e["conversation_id"] for e in found.json()) == ["conv-a", "conv-b"]
    replay = httpx.get(f"{many.url}/v1/stream", params={"conv_id": "conv-b", "from": 0}, timeout=60)
    assert replay.status_code == 200 and '"model":"beta"' in replay.text.replace(" ", "")
    stop = httpx.delete(f"{many.url}/v1/stream", params={"conv_id": "conv-b"}, timeout=30)
    assert stop.status_code == 204
    gone = httpx.get(f"{many.url}/v1/stream", params={"conv_id": "conv-b", "from": 0}, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "stream_not_found"
    # The other conversation is untouched.
    again = httpx.get(f"{many.url}/v1/stream", params={"conv_id": "conv-a", "from": 0}, timeout=60)
    assert again.status_code == 200 and "data: " in again.text


def test_one_model_is_served_under_its_llamactl_name(
    tmp_path: Path, server_bin: Path, default_model: Path
) -> None:
    s = start(server_bin, default_model, tmp_path / "home", "-c", "512")
    try:
        ids = [m["id"] for m in httpx.get(f"{s.url}/v1/models", timeout=30).json()["data"]]
        assert ids == ["SmolLM2-135M-Instruct.Q4_1"]
        answer = httpx.post(f"{s.url}/v1/chat/completions", json=SEED, timeout=300).json()
        assert answer["model"] == "SmolLM2-135M-Instruct.Q4_1"
    finally:
        stop(s)


def test_a_presets_environment_variable_key_reaches_its_llama_server(
    tmp_path: Path, server_bin: Path, default_model: Path
) -> None:
    """Router mode takes llama-server's environment-variable names as preset keys; llamactl
    gives them to that model's llama-server as its environment, which it reads like flags."""
    preset = tmp_path / "preset.ini"
    preset.write_text(f"[small]\nmodel = {default_model}\nLLAMA_ARG_CTX_SIZE = 512\n")
    s = start(server_bin, None, tmp_path / "home", "--models-preset", str(preset), "-t", "1")
    try:
        props = httpx.get(f"{s.url}/props", params={"model": "small"}, timeout=300)
        assert props.status_code == 200, props.text
        # The model's own context is 8192: 512 is the preset's.
        assert props.json()["default_generation_settings"]["n_ctx"] == 512
        (kid,) = s.llama_servers()
        assert kid.environ().get("LLAMA_ARG_CTX_SIZE") == "512"
    finally:
        stop(s)


def test_ps_shows_a_loads_progress_then_ready(
    tmp_path: Path, server_bin: Path, default_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A llama-server held before it begins (a wrapper that stops itself, then execs it: the
    same pid) is loading at 0%; let go, ps follows it (never past 99% while loading) to 100%
    once ready. The measure is /proc's: the model's mapped pages or the bytes read."""
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nkill -STOP $$\nexec "{server_bin}" "$@"\n')
    wrapper.chmod(0o755)
    preset = tmp_path / "preset.ini"
    preset.write_text(f"[slow]\nmodel = {default_model}\nload-on-startup = true\n")
    home = tmp_path / "home"
    s = start(wrapper, None, home, "--models-preset", str(preset), "-c", "512", "-t", "1")
    monkeypatch.setenv("LLAMACTL_HOME", str(home))
    from llamactl.serve.ps import rows

    def row() -> dict[str, Any]:
        return next((r for r in rows() if r["instance"] == "slow"), {})

    try:
        deadline = time.monotonic() + 60
        while not (row().get("state") == "starting" and row().get("server_pid")):
            assert time.monotonic() < deadline, row()
            time.sleep(0.02)
        held = row()
        # Only the wrapper's few bytes of script were read.
        assert held["load_progress"] < 0.01 and held["load_human"].startswith("0% ")
        os.kill(held["server_pid"], signal.SIGCONT)
        seen: list[float] = []
        while (now := row()).get("state") != "ready":
            assert time.monotonic() < deadline, now
            if now.get("state") == "starting" and now["load_progress"] is not None:
                seen.append(now["load_progress"])
            time.sleep(0.005)
        # Never past 99% while loading; it grows (the loader unmaps a few unused pages at the
        # end of a load, so a late sample may be a little below an earlier one).
        assert all(0.0 <= p <= 0.99 for p in seen), seen
        assert not seen or seen[-1] >= seen[0], seen
        print("load progress samples:", [round(p, 3) for p in seen])
        assert (now["load_progress"], now["load_human"]) == (1.0, "100%")
        table = subprocess.run(
            [sys.executable, "-m", "llamactl", "ps"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "LOAD" in table and "100%" in table, table
    finally:
        stop(s)


def test_two_models_on_a_cpu_build_share_the_cores(
    tmp_path: Path, server_bin: Path, names: Path
) -> None:
    # No -t given: each llama-server gets its share of the CPUs (two may run at once), so that
    # two generating together do not oversubscribe the cores (docs/performance.md).
    s = start(server_bin, None, tmp_path / "home", "--models-dir", str(names), "--models-max", "2")
    try:
        for name in ("alpha", "beta"):
            answer = ask(s, name, max_tokens=8)
            assert answer.status_code == 200, answer.text
        share = str(max(1, len(os.sched_getaffinity(0)) // 2))
        kids = s.llama_servers()
        assert len(kids) == 2
        for kid in kids:
            argv = kid.cmdline()
            assert argv[argv.index("-t") + 1] == share, argv
    finally:
        print(stop(s)[-3000:])


def test_tokenize_for_two_models_is_served_by_the_express_lane_and_counted(many: Serve) -> None:
    # The first request per model goes through Python (which loads the model and teaches the
    # lane its route); then the lane serves them, on the same keep-alive connection.
    with httpx.Client(base_url=many.url, timeout=300) as client:
        for name in ("alpha", "beta") * 20:
            got = client.post("/tokenize", json={"model": name, "content": "Paris is nice"})
            assert got.status_code == 200, got.text
            assert len(got.json()["tokens"]) >= 3
        bad = client.post("/tokenize", json={"model": "alpha", "content": 5, "x": [1, {}]})
        assert bad.status_code in (400, 500)  # llama-server's own answer, through the lane
        broken = client.post("/tokenize", content=b'{"model": "alpha", "content": ')
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
        metrics = client.get("/metrics").text
    served = int(re.search(r"^llamactl_express_requests_total (\d+)$", metrics, re.M)[1])  # type: ignore[index]
    assert served >= 30, metrics[-2000:]
    for name in ("alpha", "beta"):
        line = f'llamactl_requests_total{{model="{name}",status="2xx"}} '
        assert int(metrics.split(line)[1].split()[0]) >= 20
