"""llama.cpp's RPC protocol as llamactl speaks it: worker endpoints, the hello probe, and the
check a head makes of its workers before it starts llama-server with `--rpc`.

Only the first exchange of the protocol is spoken here, never the tensor commands: enough to
tell a worker that is down from one that is busy or of another llama.cpp commit.

Wire format of the vendored ggml/src/ggml-rpc/ggml-rpc.cpp (all integers little-endian):
a request is `cmd (1 byte) | size (8 bytes) | payload`; a reply is `size (8 bytes) | payload`.
RPC_CMD_HELLO is 14 (a static_assert there keeps it so across versions); its payload is the
client's 24 bytes of transport capabilities (all zero: plain TCP, no upgrade asked), and the
reply is `major, minor, patch, padding (1 byte each) | the server's 24 capability bytes`.
A server hears the hello only as the first command of a connection, and serves one client at
a time (its accept loop calls rpc_serve_client inline): while a head is connected, a probe's
TCP connect succeeds (the kernel's backlog) but the hello waits unanswered.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

RPC_CMD_HELLO = 14
CONN_CAPS_SIZE = 24
_SIZE = struct.Struct("<Q")
HELLO_REPLY_SIZE = 4 + CONN_CAPS_SIZE
#: The protocol version of the pinned llama.cpp (ggml/include/ggml-rpc.h), used when the
#: vendored header is not at hand (an installed wheel); tests/test_rpc.py keeps it in step.
PINNED_VERSION = (7, 0, 0)
DEFAULT_WORKER_PORT = 50052  # ggml-rpc-server's own default


@dataclass(frozen=True, order=True)
class RpcVersion:
    """An RPC protocol version as a worker announces it."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class Endpoint:
    """One worker address as llama-server's --rpc takes it: an IPv4 address (or name) and
    a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Probe:
    """What a hello probe found: `version` when the worker answered, else `problem`."""

    endpoint: Endpoint
    version: RpcVersion | None = None
    problem: str | None = None
    #: The TCP connect succeeded but the hello was not answered in time: the worker serves
    #: one head at a time, so another head is most likely connected to it.
    busy: bool = False

    @property
    def ok(self) -> bool:
        return self.version is not None and self.problem is None


# -- pure: bytes and decisions ----------------------------------------------------------------


def hello_request() -> bytes:
    """The bytes of an RPC_CMD_HELLO that asks for no transport upgrade."""
    return bytes([RPC_CMD_HELLO]) + _SIZE.pack(CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE)


def parse_hello_reply(data: bytes) -> RpcVersion:
    """The version in a hello reply (size prefix included); ValueError when it is not one."""
    if len(data) < _SIZE.size + HELLO_REPLY_SIZE:
        raise ValueError(f"short hello reply ({len(data)} bytes)")
    (size,) = _SIZE.unpack_from(data)
    if size != HELLO_REPLY_SIZE:
        raise ValueError(f"hello reply of {size} bytes, expected {HELLO_REPLY_SIZE}")
    major, minor, patch = data[_SIZE.size], data[_SIZE.size + 1], data[_SIZE.size + 2]
    return RpcVersion(major, minor, patch)


def version_problem(found: RpcVersion, expected: RpcVersion) -> str | None:
    """Why a worker of protocol `found` cannot serve a head of `expected`, or None.

    Stricter than llama.cpp's own check (same major, worker minor not newer): the patch number
    moves whenever ggml's operator list changes, and a worker missing an operator fails in the
    middle of a generation, so the versions must be equal (same pinned commit on every host)."""
    if found == expected:
        return None
    return (
        f"speaks RPC protocol {found}, this llamactl's llama.cpp speaks {expected}: "
        "run the same llamactl version (same llama.cpp commit) on every host"
    )


_ENDPOINT = re.compile(r"^(?P<host>[^:\s,]+):(?P<port>\d{1,5})$")


def parse_endpoints(text: str | Iterable[str]) -> tuple[Endpoint, ...]:
    """'h1:p1,h2:p2' (llama-server's --rpc form) or a list of 'host:port' -> endpoints."""
    items = text.split(",") if isinstance(text, str) else list(text)
    found: list[Endpoint] = []
    for raw in items:
        item = raw.strip()
        m = _ENDPOINT.match(item)
        if not m or not 0 < int(m.group("port")) < 65536:
            raise UsageError(
                f"not an RPC worker address: {item!r} (expected HOST:PORT, e.g. 127.0.0.1:50052)"
            )
        endpoint = Endpoint(m.group("host"), int(m.group("port")))
        if endpoint in found:
            raise UsageError(f"RPC worker {endpoint} is named twice")
        found.append(endpoint)
    if not found:
        raise UsageError("--rpc needs at least one HOST:PORT")
    return tuple(found)


def rpc_endpoints_in(args: Sequence[str]) -> tuple[Endpoint, ...]:
    """The workers named by a --rpc flag in llama-server arguments (none: empty)."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag == "--rpc":
            if eq:
                return parse_endpoints(value)
            if i + 1 < len(args):
                return parse_endpoints(args[i + 1])
            raise UsageError("--rpc needs a value: HOST:PORT[,HOST:PORT...]")
    return ()


def expected_version(vendor_dir: Path | None = None) -> RpcVersion:
    """The protocol version the head's llama.cpp speaks: read from the vendored header when
    it is there (so a new pin needs no code change), else the pinned constant."""
    if vendor_dir is None:
        from llamactl import paths

        vendor_dir = paths.vendor_dir()
    header = vendor_dir / "llama.cpp" / "ggml" / "include" / "ggml-rpc.h"
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return RpcVersion(*PINNED_VERSION)
    numbers = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define\s+RPC_PROTO_{part}_VERSION\s+(\d+)", text)
        if m is None:
            return RpcVersion(*PINNED_VERSION)
        numbers.append(int(m.group(1)))
    return RpcVersion(*numbers)


def describe_unready(probes: Sequence[Probe], expected: RpcVersion) -> str | None:
    """One message naming every worker that cannot serve the head now, or None when all can."""
    lines = []
    for p in probes:
        if p.problem is not None:
            lines.append(f"RPC worker {p.endpoint} {p.problem}")
        elif p.version is not None:
            wrong = version_problem(p.version, expected)
            if wrong:
                lines.append(f"RPC worker {p.endpoint} {wrong}")
    return "\n".join(lines) or None


# -- effects: the probe ------------------------------------------------------------------------


def _problem_for(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refuses connections: is `llamactl worker` running there, on that port?"
    if isinstance(exc, socket.gaierror):
        return f"has an address that does not resolve ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return (
            "does not accept connections (timed out): a firewall, the host is down, or its "
            "queue is full while another head holds it"
        )
    return f"cannot be reached: {exc.strerror or exc}"


# -- what a local head's own connections show ------------------------------------------------

#: /proc/net/tcp's state codes that matter here (include/net/tcp_states.h).
TCP_ESTABLISHED = "01"
TCP_CLOSE_WAIT = "08"


def _address(hex_addr: str) -> str:
    """An address as /proc/net/tcp{,6} prints it (32-bit words in host order) as text."""
    words = [int(hex_addr[i : i + 8], 16) for i in range(0, len(hex_addr), 8)]
    raw = b"".join(struct.pack("=I", w) for w in words)
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        raw = raw[12:]  # an IPv4-mapped IPv6 address
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def parse_proc_tcp(text: str, inodes: set[str]) -> list[tuple[str, int, str]]:
    """(remote address, remote port, state code) of each socket in `inodes` that a
    /proc/PID/net/tcp or tcp6 table lists."""
    links = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[9] not in inodes:
            continue
        host, _, port = fields[2].partition(":")
        with contextlib.suppress(ValueError, OSError):
            links.append((_address(host), int(port, 16), fields[3]))
    return links


def process_links(pid: int) -> list[tuple[str, int, str]] | None:
    """The TCP connections of a local process (remote address, port, state code), from /proc;
    None when /proc cannot tell (not Linux, or not allowed)."""
    proc = Path(f"/proc/{pid}")
    try:
        inodes = set()
        for fd in (proc / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        links = []
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError):
                links += parse_proc_tcp((proc / "net" / table).read_text(), inodes)
        return links
    except OSError:
        return None


def lost_links(
    links: Sequence[tuple[str, int, str]], workers: dict[tuple[str, int], Endpoint]
) -> list[Endpoint]:
    """The workers whose end of a connection to the head has closed (the head's side waits in
    CLOSE_WAIT: the worker was restarted or stopped), from a head's `process_links`."""
    lost = []
    for host, port, state in links:
        worker = workers.get((host, port))
        if worker is not None and state == TCP_CLOSE_WAIT and worker not in lost:
            lost.append(worker)
    return lost


_BUSY = (
    "accepts connections but does not answer the RPC hello: a worker serves one head at a "
    "time, so another head is most likely connected to it"
)


def _reset_on_close(sock: socket.socket) -> None:
    """Make close() send a reset instead of an orderly FIN.

    A probe given up while the worker is busy leaves its connection, hello sent, in the
    worker's accept queue. After an orderly close, the worker would later read that hello and
    write its reply to a closed peer: its second write then raises SIGPIPE (ggml's transport
    sends with no MSG_NOSIGNAL), which kills ggml-rpc-server. After a reset, its first read
    fails and it goes back to accept()."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def probe(endpoint: Endpoint, timeout: float = 3.0) -> Probe:
    """Connect and exchange the hello (blocking, bounded by `timeout` in all)."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as exc:
        return Probe(endpoint, problem=_problem_for(exc))
    data = b""
    with sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(hello_request())
            want = _SIZE.size + HELLO_REPLY_SIZE
            while len(data) < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(want - len(data))
                if not chunk:
                    return Probe(endpoint, problem=_closed(data))
                data += chunk
        except TimeoutError:
            _reset_on_close(sock)
            return Probe(endpoint, problem=_BUSY, busy=True)
        except OSError as exc:
            _reset_on_close(sock)
            return Probe(endpoint, problem=_problem_for(exc))
    return _parsed(endpoint, data)


async def probe_async(endpoint: Endpoint, timeout: float = 3.0) -> Probe:
    """The same probe in the event loop."""
    import asyncio

    writer = None
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), timeout=timeout
            )
        except asyncio.TimeoutError:
            return Probe(endpoint, problem=_problem_for(TimeoutError()))
        except OSError as exc:
            return Probe(endpoint, problem=_problem_for(exc))
        try:
            writer.write(hello_request())
            data = await asyncio.wait_for(
                reader.readexactly(_SIZE.size + HELLO_REPLY_SIZE), timeout=timeout
            )
        except asyncio.TimeoutError:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                _reset_on_close(sock)
            writer.transport.abort()
            return Probe(endpoint, problem=_BUSY, busy=True)
        except asyncio.IncompleteReadError as exc:
            return Probe(endpoint, problem=_closed(exc.partial))
        except OSError as exc:
            return Probe(endpoint, problem=_problem_for(exc))
        return _parsed(endpoint, data)
    finally:
        if writer is not None:
            writer.close()


def _closed(data: bytes) -> str:
    return (
        f"closed the connection after {len(data)} bytes of the hello reply: not a "
        "ggml-rpc-server, or one of a much older llama.cpp (before the hello command)"
    )


def _parsed(endpoint: Endpoint, data: bytes) -> Probe:
    try:
        return Probe(endpoint, version=parse_hello_reply(data))
    except ValueError as exc:
        return Probe(endpoint, problem=f"answered something that is not an RPC hello: {exc}")


def probe_all(endpoints: Sequence[Endpoint], timeout: float = 3.0) -> list[Probe]:
    """Probe each worker (one after another: a handful, each answers in a millisecond)."""
    return [probe(e, timeout=timeout) for e in endpoints]


def wait_for_workers(
    endpoints: Sequence[Endpoint],
    *,
    deadline_s: float,
    expected: RpcVersion | None = None,
    say: Callable[[str], None] = lambda line: None,
    probe_one: Callable[[Endpoint, float], Probe] = probe,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Before a head starts llama-server with --rpc: wait until every worker answers the hello
    (the workers may be starting at the same moment), up to `deadline_s`; a worker of another
    protocol version fails at once. ServerStartError names each worker that does not answer."""
    from llamactl.errors import ServerStartError

    expected = expected or expected_version()
    deadline = clock() + deadline_s
    announced: set[Endpoint] = set()
    while True:
        probes = [probe_one(e, min(3.0, max(0.2, deadline - clock()))) for e in endpoints]
        wrong = [
            p for p in probes if p.version is not None and version_problem(p.version, expected)
        ]
        if wrong:
            raise ServerStartError(describe_unready(wrong, expected) or "")
        missing = [p for p in probes if not p.ok]
        if not missing:
            return
        for p in missing:
            if p.endpoint not in announced:
                announced.add(p.endpoint)
                say(f"waiting for RPC worker {p.endpoint}: it {p.problem}")
        if clock() >= deadline:
            raise ServerStartError(
                f"{describe_unready(missing, expected)}\n(waited {deadline_s:g} s)",
                hint="start one on each host with `llamactl worker --port PORT` (a host other "
                "than this one needs `--host ADDRESS --i-understand-no-auth`)",
            )
        sleep(min(0.25, max(0.0, deadline - clock())))


async def wait_for_workers_async(
    endpoints: Sequence[Endpoint],
    *,
    deadline_s: float,
    expected: RpcVersion | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """wait_for_workers in the event loop (a model loaded on demand by a running serve)."""
    import asyncio

    from llamactl.errors import ServerStartError

    expected = expected or expected_version()
    deadline = clock() + deadline_s
    while True:
        probes = await asyncio.gather(
            *(probe_async(e, timeout=min(3.0, max(0.2, deadline - clock()))) for e in endpoints)
        )
        wrong = [
            p for p in probes if p.version is not None and version_problem(p.version, expected)
        ]
        if wrong:
            raise ServerStartError(describe_unready(wrong, expected) or "")
        missing = [p for p in probes if not p.ok]
        if not missing:
            return
        if clock() >= deadline:
            raise ServerStartError(
                f"{describe_unready(missing, expected)}\n(waited {deadline_s:g} s)",
                hint="start one on each host with `llamactl worker --port PORT`",
            )
        await asyncio.sleep(min(0.25, max(0.0, deadline - clock())))
