"""One llama-server process: its argument list, launch, log capture, readiness, and stop.

Importing this module does not import asyncio: `llamactl serve` spawns llama-server before it
pays for asyncio, the proxy and rich, so that their import overlaps the model's load (time to
ready, docs/performance.md). The methods that need the event loop import it themselves."""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import proc
from llamactl.errors import ServerStartError
from llamactl.net import free_port
from llamactl.serve.backend import Vitals
from llamactl.serve.output import strip_colors

if TYPE_CHECKING:
    import asyncio

    from llamactl.serve.backend import InstanceConfig

log = logging.getLogger(__name__)

#: Flags that name what llama-server loads; when one is given, serve adds no default model.
MODEL_SOURCE_FLAGS = frozenset(
    {
        "-m",
        "--model",
        "-mu",
        "--model-url",
        "-hf",
        "-hfr",
        "--hf-repo",
        "-hff",
        "--hf-file",
        "-dr",
        "--docker-repo",
        "--models-dir",
        "--models-preset",
    }
)


@dataclass(frozen=True)
class ServerSpec:
    """How to run one llama-server."""

    binary: Path
    args: tuple[str, ...]  # the user's llama-server flags, unchanged, model flags included
    port: int
    log_path: Path
    api_key: str | None = None  # the private key, given through the environment
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"


def private_spec(binary: Path, args: Sequence[str], log_path: Path) -> ServerSpec:
    """A spec on a fresh loopback port, with a fresh private key."""
    return ServerSpec(
        binary=binary,
        args=tuple(args),
        port=free_port(),
        log_path=log_path,
        # secrets.token_urlsafe(24), without the ~8 ms import of secrets (hmac, random)
        api_key=base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
    )


def build_argv(spec: ServerSpec) -> list[str]:
    """The argument list: the user's flags, then host and port, which llamactl owns.

    The port is always explicit: upstream's default port is changing."""
    return [str(spec.binary), *spec.args, "--host", spec.host, "--port", str(spec.port)]


def build_env(spec: ServerSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment: the caller's, minus any key of its own, plus the private key.

    llama-server reads LLAMA_API_KEY like --api-key (common/arg.cpp); an environment is
    readable only by the process owner, unlike argv, which every local user can list."""
    env = dict(os.environ if base is None else base)
    env.pop("LLAMA_API_KEY", None)
    env.pop("LLAMA_ARG_API_KEY_FILE", None)
    # llama-server's own --host/--port env values would fight the explicit flags.
    env.pop("LLAMA_ARG_HOST", None)
    env.pop("LLAMA_ARG_PORT", None)
    # The proxy terminates TLS and owns the listening socket: a llama-server that read these
    # would speak TLS to the proxy's plain HTTP on loopback.
    for name in ("LLAMA_ARG_SSL_KEY_FILE", "LLAMA_ARG_SSL_CERT_FILE", "LLAMA_ARG_REUSE_PORT"):
        env.pop(name, None)
    env.update(spec.env)
    if spec.api_key:
        env["LLAMA_API_KEY"] = spec.api_key
    return env


#: The diagnosis of a llama-server that could not listen on its port: the supervisor starts it
#: again at once on another port (free_port's answer can be taken before llama-server binds it).
PORT_IN_USE = "its port is already in use"

# What the last log lines of a llama-server that died while starting most often mean.
_DIAGNOSES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), text)
    for pattern, text in (
        # server-http.cpp: "couldn't bind HTTP server socket, hostname: H, port: P", exit 1,
        # before the model loads.
        (r"couldn't bind|address already in use|failed to bind|bind\(\) failed", PORT_IN_USE),
        (
            r"invalid argument|unknown argument|error while handling argument|"
            r"unrecognized option|invalid value",
            "llama-server rejected a flag (see `llama-server --help`)",
        ),
        (
            r"failed to open.*(no such file|not found)|No such file or directory|"
            r"model file not found|does not exist",
            "the model file does not exist",
        ),
        (
            r"invalid magic|not a gguf|failed to read magic|failed to read key-value|"
            r"failed to read tensor|truncated|unexpectedly reached end of file",
            "the model file is not a valid GGUF file (wrong format, or truncated)",
        ),
        (
            r"out of memory|failed to allocate|cudaMalloc failed|unable to allocate|"
            r"ErrorOutOfDeviceMemory|std::bad_alloc",
            "out of memory: try fewer GPU layers (-ngl) or a smaller context (-c)",
        ),
        # ggml-rpc.cpp aborts (SIGABRT) with these when a --rpc worker is missing at start, or
        # lost (killed, its host gone) while the model was loading or generating.
        (
            r"Failed to connect to \S+:\d+",
            "an RPC worker (--rpc) does not answer: is `llamactl worker` running there?",
        ),
        (
            r"Remote RPC server crashed or returned malformed response",
            "an RPC worker (--rpc) was lost: killed, or its host is unreachable",
        ),
        (r"error loading model|failed to load model", "llama-server could not load the model"),
    )
)


#: llama-server's own line when the model did not load; it exits right after, unless its HTTP
#: thread started listening after the stop meant for it (server.cpp: clean_up(), then a join that
#: never returns; seen once in a CI run and once here, a missing model file): then serve stops
#: waiting LOAD_FAILED_GRACE seconds after the line.
_LOAD_FAILED = re.compile(r"load_model: failed to load model")
LOAD_FAILED_GRACE = 3.0


def diagnose(lines: Sequence[str]) -> str | None:
    """A one-line reason for a failed start, from the log's last lines."""
    text = "\n".join(lines)
    for pattern, reason in _DIAGNOSES:
        if pattern.search(text):
            return reason
    return None


# What a llama-server killed by a signal most often means: it logs nothing first.
_SIGNAL_DIAGNOSES = {
    # llama.cpp maps the model file (mmap): pages past a truncated file's new end fault.
    signal.SIGBUS: "the model file was truncated or rewritten while in use",
    # Nothing in llama-server sends SIGKILL: another program did, or the kernel's OOM killer.
    signal.SIGKILL: "sent by another program or by the kernel's out-of-memory killer, see dmesg",
    signal.SIGSEGV: "a crash, see its log",
    signal.SIGABRT: "an abort, see its log",
}


def describe_exit(code: int) -> str:
    """How a process ended, for people: 'code 1', or 'killed by SIGBUS: what that means'."""
    if code >= 0:
        return f"code {code}"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"killed by signal {-code}"
    reason = _SIGNAL_DIAGNOSES.get(sig)
    return f"killed by {sig.name}" + (f": {reason}" if reason else "")


_ERRORISH = re.compile(r"error|fail|invalid|unknown|cannot|couldn't|abort|exception", re.I)


def relevant_lines(lines: Sequence[str], limit: int = 8) -> list[str]:
    """The log lines worth quoting: error-like lines first, else the last few."""
    picked = [line for line in lines if _ERRORISH.search(line)]
    return (picked or list(lines))[-limit:]


def poll_interval(elapsed: float) -> float:
    """How long to wait before the next /health poll of a starting server.

    A small model is ready in about 0.4 s: every 5 ms early on puts the ready moment within
    5 ms of the truth (a refused connect or a 503 costs ~0.1 ms); big models, then gentler."""
    if elapsed < 3.0:
        return 0.005
    if elapsed < 10.0:
        return 0.05
    return 0.25


async def http_status(host: str, port: int, path: str, *, timeout: float = 3.0) -> int | None:
    """GET `path` on a fresh connection: the status code, or None when nothing answers.

    A dozen lines instead of an HTTP client: health checks run before, and without, httpx."""
    import asyncio

    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout=timeout
        )
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), timeout=timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def read_vitals(pid: int, proc_root: str = "/proc") -> Vitals | None:
    """The process's Vitals, or None where /proc cannot tell (not Linux, gone)."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        states = set()
        for task in os.listdir(f"{proc_root}/{pid}/task"):
            with (
                contextlib.suppress(OSError, IndexError),
                open(f"{proc_root}/{pid}/task/{task}/stat", "rb") as fh,
            ):
                states.add(fh.read().rsplit(b")", 1)[1].split()[0])
    except (OSError, IndexError):
        return None
    # After the ")" that ends the name: state is field 3, utime 14, stime 15 (proc(5)).
    state = fields[0]
    return Vitals(
        cpu_ticks=int(fields[11]) + int(fields[12]),
        stopped=state in (b"T", b"t"),
        active=bool(states & {b"R", b"D"}),
    )


def probe_request(args: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The broken-server probe's request, (path, JSON body): a one-token job on an endpoint
    that this llama-server offers. An embedding server answers /completion with 501, a
    reranking one too: probing that would restart a healthy server (common/arg.cpp:
    --embedding, --rerank; --pooling other than none makes an embedding server as well)."""
    env = os.environ if env is None else env
    flags = {a.split("=", 1)[0] for a in args}
    pooling = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--pooling"), None)
    if flags & {"--rerank", "--reranking"} or env.get("LLAMA_ARG_RERANKING"):
        return "/rerank", '{"query": "a", "documents": ["a"]}'
    embedding = flags & {"--embedding", "--embeddings"} or env.get("LLAMA_ARG_EMBEDDINGS")
    if embedding or (pooling is not None and pooling != "none"):
        return "/embedding", '{"content": "a"}'
    return "/completion", '{"prompt": "a", "n_predict": 1}'


class LocalServer:
    """A llama-server on this machine, the first `Backend` (serve/backend.py): spawned from an
    argument list in its own process group, its output copied to a log file and a ring buffer,
    its health polled, stopped for sure."""

    def __init__(
        self,
        spec: ServerSpec,
        *,
        ring_size: int = 200,
        echo: Callable[[bytes], None] | None = None,
    ) -> None:
        self.spec = spec
        #: Where each output line goes besides the log file (serve's stderr: serve/output.py).
        self.echo = echo
        self.popen: subprocess.Popen[bytes] | None = None
        self.ring: collections.deque[str] = collections.deque(maxlen=ring_size)
        self.lines_seen = 0
        self.last_line_at = 0.0
        self.started_at = 0.0
        self._reader: asyncio.Task[None] | None = None
        self._exited: asyncio.Event | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        """The exit status, None while it runs. Once attached, a server whose output is still
        open is running (its output closes when it dies, and the supervisor hears of that at
        once): no waitpid system call, which the proxy would otherwise make per request."""
        if self.popen is None:
            return None
        if self.popen.returncode is None and self._exited is not None and not self._exited.is_set():
            return None
        return self.popen.poll()

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def host(self) -> str:
        return self.spec.host

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def api_key(self) -> str | None:
        return self.spec.api_key

    @property
    def log_path(self) -> str:
        return str(self.spec.log_path)

    def describe_exit(self, code: int) -> str:
        return describe_exit(code)

    async def probe(self, auth: bytes | None) -> bool:
        """One tiny real job on an endpoint this server offers (probe_request): True when it
        answers like a working server, anything below 500 or a 501. httpx, imported here: only
        a server that failed many requests in a row is probed."""
        import httpx

        path, body = probe_request(self.spec.args, {**os.environ, **self.spec.env})
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = auth.decode()
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                resp = await client.post(
                    f"{self.url}{path}", content=body, headers=headers, timeout=60.0
                )
        except httpx.HTTPError:
            return False
        return resp.status_code < 500 or resp.status_code == 501

    @property
    def attached(self) -> bool:
        return self._reader is not None

    def start(self) -> None:
        """Spawn llama-server and follow its output (in the event loop's thread)."""
        if self.popen is None:
            self.spawn()
        self.attach()

    def spawn(self) -> None:
        """Spawn llama-server; no event loop needed (call from the main thread: see
        proc.spawn). Its output waits in the pipe until `attach`."""
        with contextlib.suppress(OSError):  # an unwritable log directory is reported by _pump
            self.spec.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.popen = proc.spawn(
            build_argv(self.spec),
            env=build_env(self.spec),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.started_at = time.monotonic()
        self.last_line_at = self.started_at

    def attach(self) -> None:
        """Start copying the output of a spawned llama-server (in the running loop)."""
        import asyncio

        assert self.popen is not None and self._reader is None
        self._exited = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        """Copy the child's output to its log file and the ring buffer, line by line."""
        import asyncio

        assert self.popen is not None and self.popen.stdout is not None
        assert self._exited is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.popen.stdout
        )
        logfile = None
        try:
            fd = os.open(self.spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            logfile = os.fdopen(fd, "ab", buffering=0)
        except OSError as exc:
            # An unwritable log directory must not stop the server: the ring buffer remains.
            self.ring.append(f"[llamactl] cannot write log {self.spec.log_path}: {exc}")
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # a line over the limit: keep going with what we have
                    raw = await reader.read(1 << 16)
                if not raw:
                    break
                if self.echo is not None:
                    self.echo(raw)  # unchanged, colors included, as llama-server wrote it
                plain = strip_colors(raw)
                if logfile is not None:
                    try:
                        logfile.write(plain)
                    except OSError:
                        pass
                self.ring.append(plain.decode(errors="replace").rstrip())
                self.lines_seen += 1
                self.last_line_at = time.monotonic()
        finally:
            transport.close()
            if logfile is not None:
                logfile.close()
            self._exited.set()

    async def wait_exit(self) -> int | None:
        """Wait until the process has exited; its exit code."""
        import asyncio

        assert self._exited is not None, "attach() first"
        await self._exited.wait()
        assert self.popen is not None
        for _ in range(200):  # output closed: the exit status follows within moments
            code = self.popen.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.01)
        return self.popen.poll()

    def tail(self, n: int = 20) -> list[str]:
        return list(self.ring)[-n:]

    async def health(self, timeout: float = 3.0) -> int | None:
        """GET /health: its status code, or None when it does not answer."""
        return await http_status(self.spec.host, self.spec.port, "/health", timeout=timeout)

    async def wait_ready(
        self,
        *,
        stall_timeout: float = 120.0,
        max_timeout: float = 3600.0,
    ) -> float:
        """Poll /health until 200; fail at once if the process exits.

        A big model takes minutes to load: the deadline moves on while the log shows progress,
        and only `stall_timeout` seconds without a new log line (or `max_timeout` in all) fail.
        Returns the seconds it took."""
        import asyncio

        assert self.popen is not None and self._exited is not None
        load_failed_at: float | None = None
        while True:
            code = self.returncode
            if code is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._exited.wait(), timeout=5.0)
                what = f"llama-server exited with code {code} while starting"
                if code < 0:
                    what = f"llama-server exited while starting ({describe_exit(code)})"
                raise self.start_error(what)
            status = await self._health_unless_exit(timeout=2.0)
            if status == 200:
                return time.monotonic() - self.started_at
            now = time.monotonic()
            if load_failed_at is None:
                if _LOAD_FAILED.search("\n".join(self.tail(8))):
                    load_failed_at = now
            elif now - load_failed_at > LOAD_FAILED_GRACE and self.returncode is None:
                raise self.start_error(
                    "llama-server could not load the model and did not exit (stopped)"
                )
            if now - self.last_line_at > stall_timeout:
                raise self.start_error(
                    f"llama-server made no progress for {stall_timeout:g} s while starting"
                )
            if now - self.started_at > max_timeout:
                raise self.start_error(f"llama-server was not ready after {max_timeout:g} s")
            await asyncio.sleep(poll_interval(now - self.started_at))

    async def _health_unless_exit(self, timeout: float) -> int | None:
        """GET /health, given up as soon as the process exits: a port taken by another program
        that accepts but never answers must not hold up the exit's diagnosis."""
        import asyncio

        assert self._exited is not None
        if self._exited.is_set():
            return await self.health(timeout=timeout)
        probe = asyncio.ensure_future(self.health(timeout=timeout))
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait({probe, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not probe.done():
                probe.cancel()
        return probe.result() if probe.done() and not probe.cancelled() else None

    def port_clash(self) -> bool:
        """True when llama-server exited because its port was taken (see PORT_IN_USE)."""
        return self.returncode is not None and diagnose(self.tail(60)) == PORT_IN_USE

    def start_error(self, what: str) -> ServerStartError:
        lines = self.tail(60)
        reason = diagnose(lines)
        quoted = "\n".join(f"  | {line}" for line in relevant_lines(lines))
        message = f"{what}: {reason}" if reason else what
        if quoted:
            message += f"\nlast lines of {self.spec.log_path}:\n{quoted}"
        return ServerStartError(message)

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM to the group, up to `grace` seconds, then SIGKILL; gone already is fine."""
        import asyncio

        if self.popen is None:
            return None
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(
            None,
            lambda: proc.stop_group(self.popen.pid, grace=grace, popen=self.popen),  # type: ignore[union-attr]
        )
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=2.0)
        return code

    def vitals(self) -> Vitals | None:
        """Its signs of life now (see Vitals); None once it has exited or off Linux."""
        if self.popen is None or self.popen.poll() is not None:
            return None
        return read_vitals(self.popen.pid)

    def kill_now(self) -> None:
        """SIGKILL the group at once (a hung server gets no grace)."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, 9)
            except ProcessLookupError:
                pass


#: The name serve and the tests used before the Backend protocol existed.
ServerProcess = LocalServer


def local_backend(config: InstanceConfig) -> LocalServer:
    """The supervisor's default BackendFactory: a fresh llama-server spec (new private port and
    key) for the instance."""
    spec = private_spec(config.binary, config.args, config.log_path)
    if config.env:
        spec = replace(spec, env=dict(config.env))
    return LocalServer(spec, echo=config.echo)
