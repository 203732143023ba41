#!/usr/bin/env python3
"""A fake llama-server for fast tests: stdlib only, speaks llama-server's HTTP for the endpoints
that matter.

    python3 tests/fakes/fake_llama_server.py --port N [--mode MODE] [llama-server flags...]

Flags as llama-server reads them: -m/--model, --host, --port, -a/--alias, --api-key (keys
comma-separated; also the env var LLAMA_API_KEY, which is what llama-server reads, or
LLAMA_ARG_API_KEY), --api-key-file (LLAMA_ARG_API_KEY_FILE), and LLAMA_ARG_HOST /
LLAMA_ARG_PORT / LLAMA_ARG_MODEL; unknown flags are ignored, so any llama-server command line
starts it. Fake-only flags: --mode, --load-time S (how long /health says 503, default 0.2),
--token-delay S (between streamed tokens, default 0.005), --keep-alive-timeout S (idle
keep-alive connections are closed after it, like httplib's 5 s), --crash-after N (events
before crash-mid-stream exits, default 3), --hang-after S (see hang).
FAKE_LLAMA_MODE in the environment sets --mode when the flag is absent.

Modes:
  normal            load for --load-time, then serve.
  slow-start        like normal with a 3 s load (or --load-time when given).
  crash-on-start    print a llama-server-like load error on stderr and exit 1 while loading.
  hang-on-load-error  print llama-server's failed-load lines, then never exit (llama-server's
                    own join on its HTTP thread can hang there: server.cpp, clean_up()).
  crash-mid-stream  healthy; a streamed completion exits the process (code 1) after
                    --crash-after events.
  hang              loads for --load-time, is healthy for --hang-after seconds (default 1),
                    then never answers anything again (accepts connections, reads, stays
                    silent), /health included.
  garbage           /health answers 200; every other request gets bytes that are not HTTP,
                    then the connection closes.
  fail-requests     /health answers 200; every other request gets a 500 JSON error (a server
                    that looks alive but is broken).
  busy-health       like hang, but only /health goes silent after --hang-after; every other
                    request is served normally (a server too loaded to answer its health
                    check in time, yet working).
  drop-reused       a request that arrives on a connection that already served one gets the
                    connection closed without an answer (a keep-alive connection that the server
                    closed just as the client reused it).

A port that cannot be bound makes it exit 1 at once with llama-server's message ("couldn't bind
HTTP server socket, hostname: H, port: P"), in every mode but crash-on-start.

Endpoints: GET /health and /v1/health (503 while loading), POST /v1/chat/completions and
/chat/completions (plain, or SSE with `data: {...}` events and `data: [DONE]`), POST /completion,
POST /tokenize, POST /detokenize, GET /v1/models and /models, GET /props, GET /slots, GET /
(gzip HTML with Accept-Encoding: gzip, else 415, as llama-server's UI handler does).
Test-only: ANY /debug/echo (the request as JSON), GET /debug/stats (counters), GET
/debug/big?n=BYTES (a body of n bytes). Per-request header X-Fake-Drop-After: N makes a stream
(or a plain answer) end by a connection reset after N events (or after the head);
X-Fake-Token-Delay: S overrides --token-delay; X-Fake-Hang: 1 makes the server read the request
and never answer it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

INDEX_HTML = (
    b"<!doctype html><html><head><title>llama.cpp - chat</title></head>"
    b"<body><div id=app>fake llama-server web UI</div></body></html>"
)
ANSWER = "The capital of France is Paris."


@dataclass
class Settings:
    """What the command line asked for."""

    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "model.gguf"
    alias: str | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    mode: str = "normal"
    load_time: float = 0.2
    token_delay: float = 0.005
    keep_alive_timeout: float = 5.0
    crash_after: int = 3
    hang_after: float = 1.0
    unknown: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Settings:
    """llama-server-like flags; unknown ones are kept aside and ignored."""
    env = os.environ
    s = Settings()
    s.host = env.get("LLAMA_ARG_HOST", s.host)
    s.port = int(env.get("LLAMA_ARG_PORT", s.port))
    s.model = env.get("LLAMA_ARG_MODEL", s.model)
    s.alias = env.get("LLAMA_ARG_ALIAS")
    s.api_key = env.get("LLAMA_API_KEY") or env.get("LLAMA_ARG_API_KEY") or None
    s.api_key_file = env.get("LLAMA_ARG_API_KEY_FILE") or None
    s.mode = env.get("FAKE_LLAMA_MODE", s.mode)
    load_time_given = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        takes = {
            "-m": "model", "--model": "model", "--host": "host", "--port": "port",
            "-a": "alias", "--alias": "alias", "--api-key": "api_key", "--mode": "mode",
            "--api-key-file": "api_key_file",
            "--load-time": "load_time", "--token-delay": "token_delay",
            "--keep-alive-timeout": "keep_alive_timeout", "--crash-after": "crash_after",
            "--hang-after": "hang_after",
        }  # fmt: skip
        if name in takes:
            if eq:
                value = inline
            else:
                i += 1
                value = argv[i] if i < len(argv) else ""
            attr = takes[name]
            load_time_given = load_time_given or attr == "load_time"
            current = getattr(s, attr)
            if isinstance(current, float):
                setattr(s, attr, float(value))
            elif isinstance(current, int) and not isinstance(current, bool):
                setattr(s, attr, int(value))
            else:
                setattr(s, attr, value)
        else:
            s.unknown.append(arg)
        i += 1
    if s.api_key_file:
        with open(s.api_key_file) as f:
            keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        s.api_key = ",".join(filter(None, [s.api_key, *keys]))
    if s.mode == "slow-start" and not load_time_given:
        s.load_time = 3.0
    return s


class FakeServer:
    """The server state and its request handlers."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.started = time.monotonic()
        self.created = int(time.time())
        self.stats = {
            "requests": 0,
            "connections_open": 0,
            "streams_started": 0,
            "streams_completed": 0,
            "streams_cancelled": 0,
            "dropped_reused": 0,
        }

    @property
    def model_id(self) -> str:
        return self.s.alias or os.path.basename(self.s.model)

    def loading(self) -> bool:
        return time.monotonic() - self.started < self.s.load_time

    def hung(self) -> bool:
        return time.monotonic() - self.started >= self.s.load_time + self.s.hang_after

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.stats["connections_open"] += 1
        served = 0
        try:
            while True:
                try:
                    head = await asyncio.wait_for(
                        reader.readuntil(b"\r\n\r\n"), self.s.keep_alive_timeout
                    )
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                    return
                if self.s.mode == "hang" and self.hung():
                    await asyncio.sleep(3600)
                    return
                if self.s.mode == "drop-reused" and served > 0:
                    self.stats["dropped_reused"] += 1
                    writer.transport.abort()
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers: list[tuple[str, str]] = []
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers.append((k.strip(), v.strip()))
                hmap = {k.lower(): v for k, v in headers}
                body = await self.read_body(reader, hmap)
                if hmap.get("x-fake-hang"):
                    await asyncio.sleep(3600)
                    return
                if self.s.mode == "busy-health" and self.hung() and target.startswith("/health"):
                    await asyncio.sleep(3600)  # a starved HTTP thread: other requests go on
                    return
                served += 1
                self.stats["requests"] += 1
                keep = await self.route(writer, method, target, version, headers, hmap, body)
                await writer.drain()
                if not keep or hmap.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.stats["connections_open"] -= 1
            writer.close()

    async def read_body(self, reader: asyncio.StreamReader, hmap: dict[str, str]) -> bytes:
        if "chunked" in hmap.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(parts)
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
        length = int(hmap.get("content-length", "0") or 0)
        return await reader.readexactly(length) if length else b""

    # responses

    def respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str = "application/json; charset=utf-8",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                   415: "Unsupported Media Type", 500: "Internal Server Error",
                   503: "Service Unavailable"}  # fmt: skip
        head = [f"HTTP/1.1 {status} {reasons.get(status, 'Status')}"]
        head.append("Server: llama.cpp")
        head.append("Access-Control-Allow-Origin: *")
        head.append(f"Content-Type: {ctype}")
        head.append(f"Content-Length: {len(body)}")
        head.append("Keep-Alive: timeout=5, max=100")
        for k, v in extra or []:
            head.append(f"{k}: {v}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    def error(self, writer: asyncio.StreamWriter, status: int, message: str, type_: str) -> None:
        payload = {"error": {"code": status, "message": message, "type": type_}}
        self.respond(writer, status, json.dumps(payload).encode())

    def authorized(self, path: str, method: str, hmap: dict[str, str]) -> bool:
        """llama-server's middleware: /health, /v1/health, the UI and OPTIONS are public."""
        if not self.s.api_key or path in ("/health", "/v1/health", "/", "/index.html"):
            return True
        if method == "OPTIONS":
            return True
        given = hmap.get("authorization") or hmap.get("x-api-key") or ""
        if given.startswith("Bearer "):
            given = given[7:]
        return given in self.s.api_key.split(",")

    async def route(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        hmap: dict[str, str],
        body: bytes,
    ) -> bool:
        url = urlsplit(target)
        path = url.path
        if path.startswith("/debug/"):
            return await self.debug(writer, method, target, version, headers, body)
        mode = self.s.mode
        if mode == "garbage" and path != "/health":
            writer.write(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
            await writer.drain()
            writer.transport.abort()
            return False
        loading = self.loading()
        if loading and path not in ("/", "/index.html"):
            self.error(writer, 503, "Loading model", "unavailable_error")
            return True
        if not self.authorized(path, method, hmap):
            self.error(writer, 401, "Invalid API Key", "authentication_error")
            return True
        if mode == "fail-requests" and path not in ("/health", "/v1/health"):
            self.error(writer, 500, "ggml_backend_sched_graph_compute failed", "server_error")
            return True
        if method == "OPTIONS":
            self.respond(writer, 200, b"", "text/html")
            return True
        if path in ("/health", "/v1/health"):
            self.respond(writer, 200, b'{"status":"ok"}')
            return True
        if path in ("/", "/index.html") and method in ("GET", "HEAD"):
            if "gzip" not in hmap.get("accept-encoding", ""):
                self.respond(
                    writer, 415, b"Error: gzip is not supported by this browser", "text/plain"
                )
                return True
            data = gzip.compress(INDEX_HTML, mtime=0)
            self.respond(writer, 200, data, "text/html", [("Content-Encoding", "gzip")])
            return True
        if path in ("/v1/models", "/models") and method == "GET":
            model = {"id": self.model_id, "object": "model", "owned_by": "llamacpp"}
            self.respond(writer, 200, json.dumps({"object": "list", "data": [model]}).encode())
            return True
        if path == "/props" and method == "GET":
            props = {"model_path": self.s.model, "total_slots": 1, "model_alias": self.model_id}
            self.respond(writer, 200, json.dumps(props).encode())
            return True
        if path == "/slots" and method == "GET":
            busy = self.stats["streams_started"] - self.stats["streams_completed"]
            busy -= self.stats["streams_cancelled"]
            self.respond(writer, 200, json.dumps([{"id": 0, "is_processing": busy > 0}]).encode())
            return True
        if method != "POST":
            self.error(writer, 404, "File Not Found", "not_found_error")
            return True
        try:
            data = json.loads(body) if body else {}
        except ValueError as exc:
            # llama-server answers malformed JSON with 500 (nlohmann parse_error).
            self.error(writer, 500, f"[json.exception.parse_error.101] {exc}", "server_error")
            return True
        if path == "/tokenize":
            content = str(data.get("content", ""))
            tokens = [sum(word.encode()) % 49152 for word in content.split()]
            self.respond(writer, 200, json.dumps({"tokens": tokens}).encode())
            return True
        if path == "/detokenize":
            text = " ".join(f"t{t}" for t in data.get("tokens", []))
            self.respond(writer, 200, json.dumps({"content": text}).encode())
            return True
        if path in ("/v1/chat/completions", "/chat/completions", "/completion", "/v1/completions"):
            return await self.complete(writer, path, data, hmap)
        self.error(writer, 404, "File Not Found", "not_found_error")
        return True

    async def complete(
        self, writer: asyncio.StreamWriter, path: str, data: dict, hmap: dict[str, str]
    ) -> bool:
        n = int(data.get("max_tokens") or data.get("n_predict") or 8)
        words = (ANSWER + " ") * (n // 6 + 1)
        tokens = [w + " " for w in words.split()][:n]
        drop_after = hmap.get("x-fake-drop-after")
        delay = float(hmap.get("x-fake-token-delay", self.s.token_delay))
        # Fixed per process, so that two identical requests get identical bytes.
        created = self.created
        if not data.get("stream"):
            if drop_after is not None:
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"partial')
                await writer.drain()
                writer.transport.abort()
                return False
            await asyncio.sleep(delay * len(tokens))
            text = "".join(tokens).strip()
            if path.startswith("/completion"):
                payload: dict = {"content": text, "tokens_predicted": len(tokens), "stop": True}
            else:
                payload = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": self.model_id,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "length" if n <= len(tokens) else "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": {"completion_tokens": len(tokens), "prompt_tokens": 10},
                }
            self.respond(writer, 200, json.dumps(payload).encode())
            return True
        self.stats["streams_started"] += 1
        writer.write(
            b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: *\r\n"
            b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n\r\n"
        )
        limit = int(drop_after) if drop_after is not None else None
        try:
            for i, tok in enumerate(tokens):
                if self.s.mode == "crash-mid-stream" and i == self.s.crash_after:
                    os._exit(1)
                if limit is not None and i == limit:
                    writer.transport.abort()
                    return False
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_id,
                    "choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": None}],
                }
                self.write_chunk(writer, b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await writer.drain()
                await asyncio.sleep(delay)
                if writer.transport.is_closing():
                    raise ConnectionResetError
            final = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
            }
            self.write_chunk(writer, b"data: " + json.dumps(final).encode() + b"\n\n")
            self.write_chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, RuntimeError):
            self.stats["streams_cancelled"] += 1
            return False
        self.stats["streams_completed"] += 1
        return True

    @staticmethod
    def write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def debug(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bool:
        path = urlsplit(target).path
        if path == "/debug/echo":
            payload = {
                "method": method,
                "target": target,
                "version": version,
                "headers": headers,
                "body_b64": base64.b64encode(body).decode(),
            }
            self.respond(writer, 200, json.dumps(payload).encode())
        elif path == "/debug/stats":
            self.respond(writer, 200, json.dumps(self.stats).encode())
        elif path == "/debug/big":
            n = int(parse_qs(urlsplit(target).query).get("n", ["1000000"])[0])
            head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            writer.write(f"{head}Content-Length: {n}\r\n\r\n".encode())
            block = b"x" * 65536
            sent = 0
            while sent < n:
                piece = block[: min(len(block), n - sent)]
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
        else:
            self.error(writer, 404, "File Not Found", "not_found_error")
        return True


async def main(argv: list[str]) -> int:
    s = parse_args(argv)
    server = FakeServer(s)
    print(f"build: fake llama-server, mode {s.mode}", file=sys.stderr, flush=True)
    print(f"llama_model_loader: loading model from {s.model}", file=sys.stderr, flush=True)
    if s.mode == "crash-on-start":
        await asyncio.sleep(min(s.load_time, 0.2))
        print(
            f"llama_model_load: error loading model: failed to open {s.model}\n"
            "main: exiting due to model loading error",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if s.mode == "hang-on-load-error":
        await asyncio.sleep(min(s.load_time, 0.2))
        print(
            f"gguf_init_from_file: failed to open GGUF file '{s.model}' (No such file or "
            f"directory)\nsrv    load_model: failed to load model, '{s.model}'",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()
    try:
        srv = await asyncio.start_server(server.handle_connection, s.host, s.port, limit=1 << 20)
    except OSError:
        # What llama-server does (server-http.cpp), before it loads the model.
        print(
            f"srv         start: couldn't bind HTTP server socket, hostname: {s.host}, "
            f"port: {s.port}\nsrv  llama_server: exiting due to HTTP server error",
            file=sys.stderr,
            flush=True,
        )
        return 1
    port = srv.sockets[0].getsockname()[1]
    print(
        f"main: server is listening on http://{s.host}:{port} - starting the main loop",
        file=sys.stderr,
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await asyncio.sleep(s.load_time)
    print("srv  update_slots: all slots are idle", file=sys.stderr, flush=True)
    await stop
    srv.close()
    print("srv    operator(): operator(): cleaning up before exit...", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
