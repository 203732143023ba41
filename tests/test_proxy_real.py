"""The proxy alone in front of the real llama-server with the default model."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest
from support.proxyharness import request, running_proxy, wait_health

from llamactl.net import free_port
from llamactl.proc import spawn, stop_group

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]


def test_real_llama_server_through_proxy(
    server_bin: Path, default_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    # Its output to a file: a pipe nobody drains could block it.
    log = (tmp_path / "llama-server.log").open("wb")
    proc = spawn(
        [str(server_bin), "-m", str(default_model), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        # llama-server reads its key from LLAMA_API_KEY (common/arg.cpp), as serve passes it.
        env={"LLAMA_API_KEY": "private-key", "PATH": "/usr/bin:/bin"},
    )
    try:
        wait_health(port, timeout=120)
        with running_proxy(port, b"Bearer private-key", api_key="user-key") as pt:
            auth = {"Authorization": "Bearer user-key"}
            status, _, data = request(
                pt.port, "POST", "/tokenize", b'{"content": "Hello world"}', auth
            )
            assert status == 200 and json.loads(data)["tokens"]
            chat = {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
                "temperature": 0,
                "max_tokens": 32,
            }
            status, _, data = request(
                pt.port, "POST", "/v1/chat/completions", json.dumps(chat), auth, timeout=120
            )
            assert status == 200, data
            assert "Paris" in json.loads(data)["choices"][0]["message"]["content"]
            status, hdrs, data = request(
                pt.port,
                "POST",
                "/v1/chat/completions",
                json.dumps({**chat, "stream": True}),
                auth,
                timeout=120,
            )
            assert status == 200 and hdrs["x-accel-buffering"] == "no"
            events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
            assert events[-1] == b"data: [DONE]"
            text = "".join(
                (json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for e in events[:-1]
            )
            assert "Paris" in text
            status, hdrs, data = request(pt.port, "GET", "/", headers={"Accept-Encoding": "gzip"})
            if status == 404:
                pytest.skip("this llama-server build has no web UI assets")
            assert status == 200 and hdrs["content-encoding"] == "gzip"
            assert b"<html" in gzip.decompress(data).lower()
            status, _, data = request(pt.port, "POST", "/v1/chat/completions", b"{bad", auth)
            assert status == 400
            assert request(pt.port, "GET", "/v1/models")[0] == 401
        # llama-server itself holds the private key: the user's key does not open it.
        assert request(port, "GET", "/v1/models", headers=auth)[0] == 401
    finally:
        stop_group(proc.pid, grace=10, popen=proc)
        log.close()
