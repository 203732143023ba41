"""Several models behind a real `llamactl serve`, each a fake llama-server process: swaps under
load lose nothing, an eviction waits for a stream, a failing load fails only its waiters, a
waiter that hangs up harms nothing, router mode's control API and /metrics."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.serve import Serve, start, stop

pytestmark = [pytest.mark.fake, pytest.mark.timeout(300)]

FAKE = Path(__file__).parent / "fakes" / "fake_llama_server.py"


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    script.chmod(0o755)
    return script


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (d / f"{name}.gguf").write_bytes(b"GGUF")  # the fake never reads it
    return d


@pytest.fixture
def serve(tmp_path: Path, fakebin: Path, models_dir: Path) -> Iterator[Serve]:
    preset = tmp_path / "preset.ini"
    preset.write_text(
        f"[broken]\nmodel = {models_dir / 'alpha.gguf'}\nmode = crash-on-start\n\n"
        f"[slow]\nmodel = {models_dir / 'alpha.gguf'}\nload-time = 5\n"
    )
    s = start(
        fakebin,
        None,
        tmp_path / "home",
        "--models-dir",
        str(models_dir),
        "--models-preset",
        str(preset),
        "--models-max",
        "1",
        "--queue-timeout",
        "60",
    )
    try:
        yield s
    finally:
        stderr = stop(s)
        print(stderr[-3000:])


def chat(s: Serve, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{s.url}/v1/chat/completions", json={**body, **extra}, timeout=120)


def states(s: Serve) -> dict[str, str]:
    data = httpx.get(f"{s.url}/models", timeout=30).json()["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def test_models_are_listed_routed_and_named_and_unknown_is_404(serve: Serve) -> None:
    assert httpx.get(f"{serve.url}/health", timeout=10).status_code == 200
    ids = [m["id"] for m in httpx.get(f"{serve.url}/v1/models", timeout=10).json()["data"]]
    assert sorted(ids) == ["alpha", "beta", "broken", "gamma", "slow"]
    answer = chat(serve, "alpha")
    assert answer.status_code == 200 and answer.json()["model"] == "alpha"
    assert states(serve)["alpha"] == "loaded"
    missing = chat(serve, "nope")
    assert missing.status_code == 404
    assert "alpha" in missing.json()["error"]["message"]
    # No llama-server child runs in router mode: llamactl routes.
    for kid in serve.children():
        assert "--models-dir" not in " ".join(kid.cmdline())


def test_swaps_under_load_lose_no_request(serve: Serve) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def client(model: str) -> None:
        for _ in range(4):
            code = chat(serve, model).status_code
            with lock:
                results.append(code)

    threads = [threading.Thread(target=client, args=(m,)) for m in ("alpha", "beta") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert len(results) == 24
    # Every request answered; an eviction that could not drain in time says so with 503.
    assert set(results) <= {200, 503}, results
    assert results.count(200) >= 12


def test_eviction_waits_for_the_stream_then_swaps(serve: Serve) -> None:
    assert chat(serve, "alpha").status_code == 200
    body = {
        "model": "alpha",
        "stream": True,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}],
    }
    events: list[bytes] = []
    with httpx.stream(
        "POST",
        f"{serve.url}/v1/chat/completions",
        json=body,
        headers={"X-Fake-Token-Delay": "0.1"},
        timeout=120,
    ) as stream:
        lines = stream.iter_lines()
        events.append(next(lines).encode())  # streaming now
        newcomer: list[httpx.Response] = []
        t = threading.Thread(target=lambda: newcomer.append(chat(serve, "beta")))
        t.start()
        for line in lines:
            if line:
                events.append(line.encode())
        t.join(120)
    assert events[-1] == b"data: [DONE]"  # the stream was not cut by the eviction
    assert newcomer[0].status_code == 200 and newcomer[0].json()["model"] == "beta"
    assert states(serve) == {**states(serve), "alpha": "unloaded", "beta": "loaded"}


def test_a_failing_load_fails_its_waiters_only(serve: Serve) -> None:
    assert chat(serve, "alpha").status_code == 200
    failed = chat(serve, "broken")
    assert failed.status_code == 503
    message = failed.json()["error"]["message"]
    assert "failed to load" in message and "exited with code 1" in message
    again = chat(serve, "alpha")
    assert again.status_code == 200
    listed = {m["id"]: m for m in httpx.get(f"{serve.url}/models", timeout=10).json()["data"]}
    assert listed["broken"]["status"].get("failed") is True


def test_a_waiter_that_hangs_up_harms_nothing(serve: Serve) -> None:
    body = json.dumps({"model": "gamma", "messages": [{"role": "user", "content": "x"}]}).encode()
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    # gone while gamma loads; the load goes on and serves the next one
    answer = chat(serve, "gamma")
    assert answer.status_code == 200 and answer.json()["model"] == "gamma"


def test_control_api_and_metrics(serve: Serve) -> None:
    url = serve.url
    assert httpx.post(f"{url}/models/load", json={"model": "beta"}, timeout=10).json() == {
        "success": True
    }
    for _ in range(500):
        if states(serve)["beta"] == "loaded":
            break
    assert states(serve)["beta"] == "loaded"
    assert chat(serve, "beta").status_code == 200
    unload = httpx.post(f"{url}/models/unload", json={"model": "beta"}, timeout=10)
    assert unload.status_code == 200
    for _ in range(500):
        if states(serve)["beta"] == "unloaded":
            break
    assert states(serve)["beta"] == "unloaded"
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'llamactl_requests_total{model="beta",status="2xx"} 1' in metrics
    assert 'llamactl_loads_total{model="beta"} 1' in metrics
    rows = serve.ps()
    assert {r["model"] for r in rows} >= {"beta"}


def test_a_stream_waiting_for_its_model_gets_sse_comments_then_its_answer(serve: Serve) -> None:
    body = {"model": "slow", "stream": True, "max_tokens": 4, "messages": []}
    with httpx.stream("POST", f"{serve.url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[0] == ": waiting for the model to load"
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) >= 3
    assert json.loads(data[0][6:])["model"] == "slow"


def test_each_model_is_started_on_the_gpu_placement_chose(
    tmp_path: Path, fakebin: Path, models_dir: Path
) -> None:
    """A CUDA build on a recorded two-GPU machine (nvidia-smi's answers replayed from
    tests/fixtures/probes/nvidia-3090-4090): llama-server gets --device CUDAn of the GPU with
    the most free memory, and CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDAn is nvidia-smi's GPU
    n; a model whose device the preset names is left as the user said; ps shows each GPU."""
    fixture = Path(__file__).parent / "fixtures" / "probes" / "nvidia-3090-4090"
    preset = tmp_path / "preset.ini"
    preset.write_text("[beta]\ndevice = CUDA1\n")
    s = start(
        fakebin,
        None,
        tmp_path / "home",
        "--backend",
        "cuda",
        "--models-dir",
        str(models_dir),
        "--models-preset",
        str(preset),
        env={"LLAMACTL_PROBE_FIXTURE": str(fixture)},
    )
    try:
        for model in ("alpha", "beta"):
            assert chat(s, model).status_code == 200
        data = {m["id"]: m for m in httpx.get(f"{s.url}/models", timeout=30).json()["data"]}
        # GPU0 has 20596 MiB free, GPU1 3410 MiB (the recording): alpha goes on GPU0.
        assert data["alpha"]["status"]["args"][:2] == ["--device", "CUDA0"]
        beta_args = data["beta"]["status"]["args"]
        assert beta_args.count("--device") == 1 and "CUDA1" in beta_args
        by_model: dict[str, Any] = {}
        for kid in s.children():
            line = kid.cmdline()
            if "--alias" in line:
                by_model[line[line.index("--alias") + 1]] = kid
        alpha_line = by_model["alpha"].cmdline()
        assert alpha_line[alpha_line.index("--device") + 1] == "CUDA0"
        assert by_model["alpha"].environ().get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        assert "CUDA_DEVICE_ORDER" not in by_model["beta"].environ()
        rows = {r["instance"]: r for r in s.ps()}
        assert (rows["alpha"]["gpu"], rows["beta"]["gpu"]) == (0, None)
        assert rows["alpha"]["load_progress"] == 1.0 and rows["alpha"]["load_human"] == "100%"
    finally:
        stderr = stop(s)
    assert "loading alpha on GPU0 (CUDA0): needs about 0 MiB, 20.1 GiB free" in stderr, stderr
