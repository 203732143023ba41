"""`llamactl serve` for real: the seed's requests, clients, the web UI, restarts, no orphans."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from support.serve import SEED, Serve

from llamactl.net import free_port

pytestmark = pytest.mark.real


def test_listening_line_only_once_ready(real_serve: Serve) -> None:
    assert real_serve.ready_line == f"listening at http://127.0.0.1:{real_serve.port}"
    # Ready means a request succeeds at once, not a 503 "loading".
    assert httpx.get(f"{real_serve.url}/health").status_code == 200


def test_seed_curl_request(real_serve: Serve) -> None:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--request",
            "POST",
            "--url",
            f"{real_serve.url}/v1/chat/completions",
            "--header",
            "Content-Type: application/json",
            "--data",
            json.dumps(SEED),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    body = json.loads(out.stdout)
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_seed_streaming_request(real_serve: Serve) -> None:
    data = {
        "messages": [{"role": "user", "content": "Tell me a short story about a robot."}],
        "stream": True,
        "max_tokens": 16,
    }
    events = []
    with httpx.stream("POST", f"{real_serve.url}/v1/chat/completions", json=data, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("x-accel-buffering") == "no"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 10
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_seed_python_requests_client(real_serve: Serve) -> None:
    import requests

    resp = requests.post(
        f"{real_serve.url}/v1/chat/completions",
        headers={"Content-Type": "application/json"},
        data=json.dumps({**SEED, "stream": False}),
        timeout=120,
    )
    assert resp.status_code == 200
    assert "Paris" in resp.json()["choices"][0]["message"]["content"]


def test_openai_sdk_plain_and_streaming(real_serve: Serve) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{real_serve.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model="default", **SEED)  # type: ignore[call-overload]
    assert "Paris" in (reply.choices[0].message.content or "")
    stream = client.chat.completions.create(model="default", stream=True, **SEED)  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text
    assert [m.id for m in client.models.list().data]


def test_web_ui_and_other_endpoints(real_serve: Serve) -> None:
    with httpx.stream("GET", real_serve.url + "/", headers={"Accept-Encoding": "gzip"}) as raw:
        assert raw.status_code == 200
        # The body is passed through compressed, as llama-server wrote it (iter_raw: no decoding).
        assert raw.headers.get("content-encoding") == "gzip"
        body = b"".join(raw.iter_raw())
    assert b"<html" in gzip.decompress(body).lower()
    # Without gzip, llama-server answers 415, and the proxy must not hide that.
    plain = httpx.get(real_serve.url + "/", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 415
    tok = httpx.post(
        real_serve.url + "/tokenize", json={"content": "What is the capital of France?"}
    )
    assert tok.status_code == 200 and tok.json()["tokens"]
    assert httpx.get(real_serve.url + "/props").status_code == 200
    # /metrics is off unless llama-server got --metrics: its own answer is passed on.
    assert httpx.get(real_serve.url + "/metrics").status_code == 501


def test_client_disconnect_mid_stream_stops_generation(real_serve: Serve) -> None:
    data = {
        "messages": [{"role": "user", "content": "Count from one to one thousand in words."}],
        "stream": True,
        "max_tokens": 2000,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{real_serve.url}/v1/chat/completions", json=data, timeout=120) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n > 5:
                break  # hang up after a few events
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        slots = httpx.get(real_serve.url + "/slots").json()
        if not any(s.get("is_processing") for s in slots):
            break
        time.sleep(0.1)
    else:
        pytest.fail("llama-server kept generating after the client hung up")


def test_kill_9_of_llama_server_then_a_request_succeeds(real_serve: Serve) -> None:
    (victim,) = real_serve.llama_servers()
    victim.kill()
    # The next request waits for the restart instead of failing (bounded by its timeout).
    resp = httpx.post(f"{real_serve.url}/v1/chat/completions", json=SEED, timeout=120)
    assert resp.status_code == 200, resp.text
    assert "Paris" in resp.json()["choices"][0]["message"]["content"]
    (new,) = real_serve.llama_servers()
    assert new.pid != victim.pid


def test_wrong_api_key_is_401_and_health_stays_open(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory("--api-key", "sesame")
    bad = httpx.post(
        f"{s.url}/v1/chat/completions", json=SEED, headers={"Authorization": "Bearer nope"}
    )
    assert bad.status_code == 401
    assert bad.json()["error"]["type"]
    assert httpx.post(f"{s.url}/v1/chat/completions", json=SEED).status_code == 401
    assert httpx.get(f"{s.url}/health").status_code == 200
    good = httpx.post(
        f"{s.url}/v1/chat/completions",
        json=SEED,
        headers={"Authorization": "Bearer sesame"},
        timeout=120,
    )
    assert good.status_code == 200
    # The private key of the llama-server behind is in no process's argv.
    (child,) = s.llama_servers()
    assert "sesame" not in " ".join(child.cmdline())
    assert not any(a == "--api-key" for a in child.cmdline())


def test_sigkill_of_llamactl_leaves_no_llama_server(serve_factory: Callable[..., Serve]) -> None:
    s = serve_factory()
    (child,) = s.llama_servers()
    s.proc.kill()  # SIGKILL: no chance to clean up; the parent-death signal does it
    s.proc.wait()
    child_gone = psutil.wait_procs([child], timeout=10)[1] == []
    assert child_gone, "llama-server outlived a SIGKILLed llamactl"
    # The stale state record is ignored (and cleaned) by ps.
    from llamactl.serve import records

    os.environ["LLAMACTL_HOME"] = str(s.home)
    assert records.live_records() == []


def test_start_failure_is_diagnosed_with_a_nonzero_exit(server_bin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_text("this is not a GGUF file\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamactl",
            "serve",
            "--server-bin",
            str(server_bin),
            "-m",
            str(bad),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLAMACTL_HOME": str(tmp_path)},
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "not a valid GGUF" in out.stderr or "not a GGUF" in out.stderr, out.stderr
