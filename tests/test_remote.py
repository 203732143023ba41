"""Remote upstreams: URL rules, the circuit breaker and the choice of a replica (unit), and
`serve --remote` in front of fake llama-servers (fake): load shared, a dead replica routed
around, a request that got no byte sent again elsewhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamactl.errors import UsageError
from llamactl.net import free_port, wait_ready
from llamactl.proc import stop_group
from llamactl.serve import remote
from llamactl.serve.remote import Breaker, BreakerState, RemoteSpec, Replica, choose

FAKE = str(Path(__file__).parent / "fakes" / "fake_llama_server.py")
HANG = 60.0


# -- unit --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_urls_parsed_and_bad_ones_refused() -> None:
    assert remote.parse_url("http://10.0.0.2:8080/v1").base == "http://10.0.0.2:8080"
    assert remote.parse_url("https://models.example.com").port == 443
    assert remote.parse_url("http://[::1]:9").base == "http://[::1]:9"
    for bad in ("10.0.0.2:8080", "ftp://x", "http://x/prefix", "http://u:p@x", "http://x:99999"):
        with pytest.raises(UsageError):
            remote.parse_url(bad)


@pytest.mark.unit
def test_remote_key_from_the_environment_and_no_duplicates() -> None:
    specs = remote.remotes_from_args(
        ["http://a:1", "http://b:2/"], {remote.REMOTE_KEY_ENV: "sekrit"}
    )
    assert [s.url for s in specs] == ["http://a:1", "http://b:2"]
    assert all(s.api_key == "sekrit" and s.verify_tls for s in specs)
    with pytest.raises(UsageError, match="twice"):
        remote.remotes_from_args(["http://a:1", "http://a:1/v1"], {})


@pytest.mark.unit
def test_models_and_slots_read_from_answers() -> None:
    assert remote.models_in({"data": [{"id": "a"}, {"id": "b"}, {"x": 1}]}) == ("a", "b")
    assert remote.models_in([1, 2]) == ()
    assert remote.total_slots_in({"total_slots": 4}) == 4
    assert remote.total_slots_in({"total_slots": True}) is None
    assert remote.total_slots_in({"total_slots": 0}) is None


@pytest.mark.unit
def test_breaker_opens_cools_down_tries_once_and_closes() -> None:
    b = Breaker(threshold=2, cooldown=1.0, max_cooldown=4.0)
    assert b.allows(0) and not b.failure(0)
    assert b.failure(0.1) and b.state is BreakerState.OPEN
    assert not b.allows(0.5)
    assert b.allows(1.2) and b.state is BreakerState.HALF_OPEN
    b.on_trial()
    assert not b.allows(1.3)  # one trial at a time
    assert b.failure(1.4) and b.current_cooldown == 2.0  # a failed trial doubles the wait
    assert not b.allows(3.0) and b.allows(3.5)
    b.on_trial()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allows(3.6)


def replica(name: str, *, slots: int = 1, busy: int = 0, models: tuple[str, ...] = ()) -> Replica:
    r = Replica(
        spec=RemoteSpec(url=f"http://{name}:1"),
        address=remote.parse_url(f"http://{name}:1"),
        name=name,
        healthy=True,
        checked=True,
        models=models,
        total_slots=slots,
    )
    r.in_flight = busy
    return r


@pytest.mark.unit
def test_the_replica_with_most_free_slots_wins_and_equals_take_turns() -> None:
    a, b = replica("a", slots=4, busy=3), replica("b", slots=2)
    assert choose([a, b], None, 0) is b
    c, d = replica("c"), replica("d")
    assert [choose([c, d], None, 0, turn=t).name for t in range(4)] == ["c", "d", "c", "d"]  # type: ignore[union-attr]


@pytest.mark.unit
def test_unhealthy_open_and_other_model_replicas_are_passed_over() -> None:
    a, b, c = replica("a"), replica("b", models=("m1",)), replica("c")
    a.healthy = False
    c.breaker.trip(0)
    assert choose([a, b, c], "m1", 0.5) is b
    assert choose([a, b, c], "m2", 0.5) is None
    assert choose([a, c], None, 0.5) is None


@pytest.mark.unit
def test_a_replica_that_just_failed_is_avoided_unless_it_is_the_only_one() -> None:
    a, b = replica("a"), replica("b")
    assert choose([a, b], None, 0, avoid=["a"]) is b
    assert choose([a], None, 0, avoid=["a"]) is a


# -- fake: serve --remote in front of fake llama-servers ---------------------------------------


class Fake:
    def __init__(self, tmp: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, "--port", str(self.port), "--load-time", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_ready("127.0.0.1", self.port, deadline_s=HANG)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> int:
        stats = httpx.get(f"{self.url}/debug/stats", timeout=5).json()
        return int(stats["requests"])

    def kill(self) -> None:
        stop_group(self.proc.pid, grace=0.1, popen=self.proc)


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[list[Fake]]:
    made = [Fake(tmp_path), Fake(tmp_path)]
    yield made
    for f in made:
        f.kill()


def front(
    home: Path, *urls: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    args = [a for u in urls for a in ("--remote", u)]
    err = open(home.parent / f"front-{port}.err", "w")  # noqa: SIM115 - closed with the test
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "LLAMACTL_HOME": str(home), **(extra_env or {})},
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening at"), (home.parent / f"front-{port}.err").read_text()
    return proc, port


ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.fake
def test_two_replicas_share_load_and_a_dead_one_is_routed_around(
    fakes: list[Fake], llamactl_home: Path
) -> None:
    proc, port = front(llamactl_home, *(f.url for f in fakes))
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=HANG).status_code == 200
        before = [f.requests() for f in fakes]
        for _ in range(10):
            r = httpx.post(f"{url}/v1/chat/completions", json=ASK, timeout=HANG)
            assert r.status_code == 200, r.text
        shares = [f.requests() - b for f, b in zip(fakes, before, strict=True)]
        assert all(s >= 3 for s in shares), shares  # both took part (health checks add a few)

        ps = subprocess.run(
            [sys.executable, "-m", "llamactl", "ps", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "LLAMACTL_HOME": str(llamactl_home)},
            check=True,
        )
        rows = json.loads(ps.stdout)
        assert sorted(r["where"] for r in rows) == sorted(f.url for f in fakes)

        # The front says where each model runs: /v1/models, /models, /metrics.
        (model,) = httpx.get(f"{url}/v1/models", timeout=HANG).json()["data"]
        assert sorted(r["url"] for r in model["replicas"]) == sorted(f.url for f in fakes)
        assert httpx.get(f"{url}/models", timeout=HANG).json()["data"][0]["id"] == model["id"]
        metrics = httpx.get(f"{url}/metrics", timeout=HANG).text
        for f in fakes:
            assert f'llamactl_remote_up{{remote="{f.url}"' in metrics

        fakes[0].kill()
        answered = 0
        for _ in range(10):
            r = httpx.post(f"{url}/v1/chat/completions", json=ASK, timeout=HANG)
            answered += r.status_code == 200
        assert answered == 10
    finally:
        stop_group(proc.pid, grace=10, popen=proc)
    assert proc.returncode == 128 + signal.SIGTERM


@pytest.mark.fake
def test_front_with_no_answering_remote_fails_naming_them(llamactl_home: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, "-m", "llamactl", "serve", "--remote", dead, "--start-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "LLAMACTL_HOME": str(llamactl_home), "LLAMACTL_NO_PORT": "1"},
        check=False,
    )
    assert out.returncode == 6, out.stderr
    assert dead in out.stderr and "Traceback" not in out.stderr


@pytest.mark.fake
def test_a_request_waits_for_a_replica_that_comes_back(
    fakes: list[Fake], llamactl_home: Path, tmp_path: Path
) -> None:
    proc, port = front(llamactl_home, fakes[0].url)
    pool = ThreadPoolExecutor(1)
    try:
        url = f"http://127.0.0.1:{port}"
        fakes[0].kill()
        # The front notices (a health check, or the refused request itself), then waits.
        pending = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=ASK, timeout=HANG)
        time.sleep(0.5)  # let the request reach the front while nothing answers
        assert not pending.done()
        back = Fake(tmp_path, port=fakes[0].port)
        fakes.append(back)
        assert pending.result(timeout=HANG).status_code == 200
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_group(proc.pid, grace=10, popen=proc)


# -- a stub remote: answers health checks, and does with requests what the test says ----------


class Stub:
    """A remote server in a thread: /health, /props and /v1/models like llama-server; a POST
    is dropped unanswered (`drop`), or answered with the Host header it got."""

    def __init__(self, *, drop: bool, slots: int = 8, tls: Any = None) -> None:
        import asyncio
        import threading

        self.drop = drop
        self.slots = slots
        self.tls = tls
        self.posts = 0
        self.hosts: list[str] = []
        self.writers: list[Any] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self.server = await asyncio.start_server(
                self.handle, "127.0.0.1", self.port, ssl=self.tls
            )
            ready.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()),
            daemon=True,
        )
        self.thread.start()
        assert ready.wait(10)

    async def handle(self, reader: Any, writer: Any) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (x.partition(":") for x in lines[1:] if x)
                }
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                if method == "POST":
                    self.posts += 1
                    self.hosts.append(headers.get("host", ""))
                    if self.drop:
                        writer.close()
                        return
                    body = {"choices": [{"message": {"content": "stub"}}]}
                elif target == "/props":
                    body = {"total_slots": self.slots}
                elif target == "/v1/models":
                    body = {"data": [{"id": "stub-model"}]}
                else:
                    body = {"status": "ok"}
                data = json.dumps(body).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
                )
                await writer.drain()
        except Exception:
            writer.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def close(self) -> None:
        """As a killed server: the port closed, and every connection reset."""

        def stop() -> None:
            self.server.close()
            for w in self.writers:
                w.transport.abort()
            # After the sockets are really closed (abort closes them in a callback).
            self.loop.call_soon(self.loop.stop)

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(timeout=10)


@pytest.mark.fake
def test_a_request_dropped_before_any_answer_byte_is_sent_to_another_replica(
    fakes: list[Fake], llamactl_home: Path
) -> None:
    dropper = Stub(drop=True, slots=64)  # the most free slots: chosen first
    proc, port = front(llamactl_home, dropper.url, fakes[0].url)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(5):
            r = httpx.post(f"{url}/v1/chat/completions", json=ASK, timeout=HANG)
            assert r.status_code == 200, r.text
        assert dropper.posts >= 1  # it was tried, and its failures took it out
    finally:
        stop_group(proc.pid, grace=10, popen=proc)
        dropper.close()


@pytest.mark.fake
def test_health_of_a_front_with_no_usable_replica_answers_at_once(llamactl_home: Path) -> None:
    stub = Stub(drop=False)
    proc, port = front(llamactl_home, stub.url)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=HANG).status_code == 200
        stub.close()
        deadline = time.monotonic() + HANG
        while True:  # the health checks notice within a few seconds
            r = httpx.get(f"{url}/health", timeout=10)  # never waits the queue bound
            if r.status_code == 503:
                break
            assert time.monotonic() < deadline
        assert "no remote server can take the request" in r.json()["error"]["message"]
    finally:
        stop_group(proc.pid, grace=10, popen=proc)


@pytest.mark.fake
def test_https_remote_verified_and_sent_its_own_host(llamactl_home: Path, tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    stub = Stub(drop=False, tls=ctx)
    try:
        # Not trusted: the front does not start, and says why.
        out = subprocess.run(
            [
                *(sys.executable, "-m", "llamactl", "serve", "--remote", stub.url),
                *("--start-timeout", "3", "--port", str(free_port())),
            ],
            capture_output=True,
            text=True,
            timeout=HANG,
            env={**os.environ, "LLAMACTL_HOME": str(llamactl_home)},
            check=False,
        )
        assert out.returncode == 6 and "certificate" in out.stderr.lower(), out.stderr
        # Trusted through the standard OpenSSL variable: served over TLS, with its own Host.
        proc, port = front(llamactl_home, stub.url, extra_env={"SSL_CERT_FILE": str(cert)})
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ASK, timeout=HANG)
            assert r.status_code == 200, r.text
            assert stub.hosts[-1] == f"127.0.0.1:{stub.port}"
        finally:
            stop_group(proc.pid, grace=10, popen=proc)
    finally:
        stub.close()


@pytest.mark.unit
def test_remotes_declared_in_the_toml_config(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n")
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        "[remotes.a]\nurl = 'http://10.0.0.2:8080'\nmodels = ['m1']\napi_key_env = 'A_KEY'\n\n"
        "[remotes.b]\nurl = 'https://b.example'\napi_key_file = 'key'\nverify_tls = false\n"
    )
    specs, local = remote.remotes_from_toml(cfg, {"A_KEY": "from-env"})
    assert not local
    a, b = specs
    assert (a.url, a.models, a.api_key, a.verify_tls) == (
        "http://10.0.0.2:8080",
        ("m1",),
        "from-env",
        True,
    )
    assert (b.url, b.api_key, b.verify_tls) == ("https://b.example:443", "from-file", False)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[remotes.a]\nurl = 'ftp://x'\n", r"serve\.toml:2: \[remotes\.a\] url: "),
        ("[remotes.a]\nurl = 'http://x'\nkey = 'k'\n", r":3: \[remotes\.a\] key: unknown key"),
        ("[remotes.a]\nmodels = ['m']\n", r":1: \[remotes\.a\]: url = BASE_URL is required"),
        ("[remotes.a]\nurl = 'http://x'\napi_key_env = 'NOPE'\n", r"NOPE is not set"),
        ("[remotes.a]\nurl = 'http://x'\nverify_tls = 'yes'\n", r"verify_tls: expected bool"),
    ],
)
def test_a_bad_remote_table_is_refused_with_file_line_and_key(
    tmp_path: Path, text: str, where: str
) -> None:
    from llamactl.serve.config import ConfigError

    cfg = tmp_path / "serve.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=where):
        remote.remotes_from_toml(cfg, {})


@pytest.mark.fake
def test_a_front_from_the_config_file_alone(fakes: list[Fake], llamactl_home: Path) -> None:
    cfg = llamactl_home.parent / "front.toml"
    cfg.write_text("".join(f"[remotes.r{i}]\nurl = '{f.url}'\n" for i, f in enumerate(fakes)))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "LLAMACTL_HOME": str(llamactl_home)},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening at")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ASK, timeout=HANG)
        assert r.status_code == 200, r.text
    finally:
        stop_group(proc.pid, grace=10, popen=proc)


@pytest.mark.fake
def test_a_local_model_and_a_remote_replica_share_one_front(
    fakes: list[Fake], llamactl_home: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from support.serve import start, stop

    fakebin = tmp_path / "llama-server"
    fakebin.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    fakebin.chmod(0o755)
    model = tmp_path / "smol.gguf"
    model.write_bytes(b"GGUF")
    serve = start(fakebin, model, tmp_path / "home", "--remote", fakes[0].url)
    pool = ThreadPoolExecutor(4)
    try:
        before = fakes[0].requests()
        slow = {**ASK, "max_tokens": 40}
        codes = list(
            pool.map(
                lambda _: (
                    httpx.post(
                        f"{serve.url}/v1/chat/completions", json=slow, timeout=HANG
                    ).status_code
                ),
                range(8),
            )
        )
        assert codes == [200] * 8
        metrics = httpx.get(f"{serve.url}/metrics", timeout=HANG).text
        assert fakes[0].requests() - before >= 2, metrics  # the remote took a share
        models = httpx.get(f"{serve.url}/v1/models", timeout=HANG).json()["data"]
        places = {p["url"] for m in models for p in m["replicas"]}
        assert {"local", fakes[0].url} <= places, models
        assert httpx.get(f"{serve.url}/health", timeout=HANG).json()["replicas"][0] == "local"
        rows = serve.ps()
        assert {r["where"] for r in rows} == {"local", fakes[0].url}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop(serve)


@pytest.mark.fake
def test_several_local_models_and_a_remote_one_behind_one_front(
    llamactl_home: Path, tmp_path: Path
) -> None:
    from support.serve import start, stop

    fakebin = tmp_path / "llama-server"
    fakebin.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    fakebin.chmod(0o755)
    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha", "beta"):
        (models / f"{name}.gguf").write_bytes(b"GGUF")
    port = free_port()
    gamma = subprocess.Popen(
        [sys.executable, FAKE, "--port", str(port), "--load-time", "0", "--alias", "gamma"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_ready("127.0.0.1", port, deadline_s=HANG)
    serve = start(
        fakebin,
        None,
        tmp_path / "home",
        *("--models-dir", str(models), "--remote", f"http://127.0.0.1:{port}"),
    )
    try:
        listed: dict[str, Any] = {}
        deadline = time.monotonic() + HANG
        while "gamma" not in listed:  # the remote's models arrive with its first check
            assert time.monotonic() < deadline, listed
            data = httpx.get(f"{serve.url}/v1/models", timeout=HANG).json()["data"]
            listed = {m["id"]: m for m in data}
        assert {"alpha", "beta", "gamma"} <= set(listed)
        assert [r["url"] for r in listed["gamma"]["replicas"]] == [f"http://127.0.0.1:{port}"]
        for model in ("alpha", "gamma"):
            body = {**ASK, "model": model}
            r = httpx.post(f"{serve.url}/v1/chat/completions", json=body, timeout=HANG)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
        where = {row["where"] for row in serve.ps()}
        assert {"local", f"http://127.0.0.1:{port}"} <= where
    finally:
        stop(serve)
        stop_group(gamma.pid, grace=1, popen=gamma)
