"""The proxy's listening sockets, bound without an event loop, in every form llama-server's
`--host` takes: comma-separated addresses, IPv6 (`::1`, `[::]`), Unix sockets (a host that
ends in `.sock`), with `--reuse-port`; and the TLS context for `--ssl-key-file`.

`llamactl serve` binds before it spawns llama-server (a taken port fails before any model
loads) and before it imports asyncio and the proxy (those imports then overlap the model's
load); the proxy adopts the sockets once its loop runs. Connections that arrive in between
wait in the kernel's backlog."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llamactl.errors import LlamactlError

if TYPE_CHECKING:
    import ssl

#: Who may connect to a Unix socket when nothing else is asked: its owner only. llama-server
#: leaves the mode to the umask (often 0755: any local user can talk to the model).
DEFAULT_SOCKET_MODE = 0o600


class ProxyBindError(LlamactlError):
    """The proxy cannot listen on the address it was given."""

    exit_code = 6


def split_hosts(host: str) -> list[str]:
    """The addresses in a `--host` value, as llama-server reads it (common/arg.cpp): comma-
    separated, each stripped, empty ones dropped; `[::1]` is accepted for `::1`."""
    hosts = []
    for part in host.split(","):
        part = part.strip()
        if part.startswith("[") and part.endswith("]"):
            part = part[1:-1]
        if part:
            hosts.append(part)
    return hosts


def is_unix(host: str) -> bool:
    """llama-server serves a Unix socket when the host ends in `.sock` (server-http.cpp)."""
    return host.endswith(".sock")


def parse_mode(text: str) -> int:
    """'0660' or '660' -> 0o660; ValueError for anything that is not an octal file mode."""
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(text)
    return mode


def bind(
    host: str,
    port: int,
    backlog: int = 1024,
    *,
    reuse_port: bool = False,
    socket_mode: int = DEFAULT_SOCKET_MODE,
) -> list[socket.socket]:
    """Listening sockets for every address in `host` (see split_hosts), all on one port: the
    one bound first when `port` is 0. TCP as asyncio's create_server binds them
    (SO_REUSEADDR); IPv6 sockets are IPv6-only when there is more than one socket, so that
    `[::]` does not also claim 0.0.0.0 (llama-server does the same)."""
    hosts = split_hosts(host)
    if not hosts:
        raise ProxyBindError("--host needs at least one address")
    plan: list[tuple[int, int, int, Any]] = []  # family, type, proto, address
    for name in hosts:
        if is_unix(name):
            plan.append((socket.AF_UNIX, socket.SOCK_STREAM, 0, name))
            continue
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ProxyBindError(f"cannot listen on {name}:{port}: {exc.strerror}") from None
        for info in infos:
            if not any(p[0] == info[0] and p[3] == info[4] for p in plan):
                plan.append((info[0], info[1], info[2], info[4]))
    several = len(plan) > 1
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in plan:
            if family == socket.AF_UNIX:
                assert isinstance(address, str)
                sockets.append(_bind_unix(address, backlog, socket_mode))
                continue
            assert isinstance(address, tuple)
            if port == 0 and sockets:  # one port for every address, as llama-server has
                tcp = [s for s in sockets if s.family != socket.AF_UNIX]
                if tcp:
                    address = (address[0], tcp[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(several))
            where = _display(str(address[0]), int(address[1]))
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ProxyBindError(
                        f"cannot listen on {where}: the address is already in use",
                        hint="choose another --port, or stop the program that holds it",
                    ) from None
                raise ProxyBindError(f"cannot listen on {where}: {exc.strerror or exc}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        close(sockets)
        raise
    return sockets


def _bind_unix(path: str, backlog: int, mode: int) -> socket.socket:
    """A listening Unix socket at `path` with `mode`; a stale socket file left by a process
    that died is replaced, a live one or any other file is an error."""
    where = f"unix://{path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ProxyBindError(f"cannot listen on {where}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ProxyBindError(
                f"cannot listen on {where}: the path exists and is not a socket",
                hint="choose another path, or remove that file",
            )
        if _socket_answers(path):
            raise ProxyBindError(
                f"cannot listen on {where}: another program is listening on it",
                hint="choose another path, or stop the program that holds it",
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left behind by a server that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes bind() create the file with no more than `mode`: a chmod afterwards
    # would leave a moment in which other users could connect. serve binds before it starts
    # any thread, so the process-wide umask is safe to change here.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ProxyBindError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    try:
        os.chmod(path, mode)  # the umask can only take bits away; asked-for bits come back
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ProxyBindError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    _unix_files[sock] = (path, os.stat(path).st_ino)
    return sock


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


#: The path and inode of each Unix socket bound here: close() removes the file only while it
#: is still ours (another serve may have replaced it since). Kept apart from the socket, which
#: the event loop may have closed by then.
_unix_files: dict[socket.socket, tuple[str, int]] = {}


def close(sockets: list[socket.socket]) -> None:
    """Close listening sockets; a Unix socket's file is removed (llama-server leaves it)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
        path, inode = _unix_files.pop(sock, ("", 0))
        if path:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)


@dataclass(frozen=True)
class Address:
    """One address serve listens on, for people: `http://127.0.0.1:8080`, `unix:///x.sock`."""

    host: str
    port: int | None  # None for a Unix socket
    tls: bool = False

    @property
    def url(self) -> str:
        if self.port is None:
            return f"unix://{self.host}"
        return f"{'https' if self.tls else 'http'}://{_display(self.host, self.port)}"


def addresses(sockets: list[socket.socket], tls: bool = False) -> list[Address]:
    """Where the bound sockets listen (the real port when 0 was asked for)."""
    found = []
    for sock in sockets:
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            found.append(Address(str(name), None, tls))
        else:
            found.append(Address(str(name[0]), int(name[1]), tls))
    return found


@dataclass
class Front:
    """Where a serve listens: its bound sockets, the TLS context (None: plain HTTP) and their
    addresses. One for every kind of serve (one model, several, remotes only)."""

    sockets: list[socket.socket]
    tls: ssl.SSLContext | None
    addresses: list[Address]

    @property
    def port(self) -> int:
        """The TCP port (the real one when 0 was asked for); 0 for Unix sockets only."""
        return next((a.port for a in self.addresses if a.port is not None), 0)

    @property
    def urls(self) -> list[str]:
        return [a.url for a in self.addresses]

    def listening_line(self) -> str:
        """The line serve prints on stdout once ready (scripts wait for it)."""
        return "listening at " + ", ".join(self.urls)

    def close(self) -> None:
        close(self.sockets)


def open_front(
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    socket_mode: int = DEFAULT_SOCKET_MODE,
    ssl_key_file: str | None = None,
    ssl_cert_file: str | None = None,
) -> Front:
    """Load the TLS context (when both files are given), then bind: a bad certificate or a
    taken address fails before anything else starts."""
    tls = tls_context(ssl_key_file, ssl_cert_file) if ssl_key_file and ssl_cert_file else None
    sockets = bind(host, port, reuse_port=reuse_port, socket_mode=socket_mode)
    return Front(sockets, tls, addresses(sockets, tls=tls is not None))


def open_spec_front(spec: Any) -> Front:
    """open_front with serve's listening flags (serve/args.py's ServeSpec): the one mapping
    for serve with one model, several, or remote servers only."""
    return open_front(
        spec.host,
        spec.port,
        reuse_port=spec.reuse_port,
        socket_mode=spec.socket_mode,
        ssl_key_file=spec.ssl_key_file,
        ssl_cert_file=spec.ssl_cert_file,
    )


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tls_context(key_file: str, cert_file: str) -> ssl.SSLContext:
    """The server-side TLS context for llama-server's `--ssl-key-file` / `--ssl-cert-file`
    (PEM files, as llama-server reads them); a clear error when they cannot be used."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except FileNotFoundError as exc:
        raise ProxyBindError(f"cannot use TLS: {exc.filename or cert_file}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ProxyBindError(
            f"cannot use TLS: --ssl-cert-file {cert_file} and --ssl-key-file {key_file} are "
            f"not a PEM certificate and its unencrypted private key (OpenSSL: {reason})",
            hint="check that the key belongs to the certificate and has no passphrase",
        ) from None
    # HTTP/1.1 only: the proxy speaks nothing else, and a client offered h2 would fail.
    context.set_alpn_protocols(["http/1.1"])
    return context


def connection_bound(reserve: int = 128, cap: int = 1 << 16) -> int:
    """The default bound on client connections, sized to this process's descriptors.

    Raises the soft RLIMIT_NOFILE to the hard limit first (up to `cap`): Linux's soft default
    of 1024 is far below what the machine allows. Each client connection can hold two
    descriptors (itself and a connection to llama-server), and `reserve` stay for everything
    else (log files, the pool's idle connections, health checks)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = cap
    return max(8, (soft - reserve) // 2)


def exposed(host: str) -> list[str]:
    """The addresses in `host` that other machines may reach (not loopback, not a socket):
    without an API key, serve warns about each."""
    return [
        h
        for h in split_hosts(host)
        if h not in ("127.0.0.1", "localhost", "::1") and not is_unix(h)
    ]


def guarded_names(host: str, allowed: tuple[str, ...]) -> frozenset[bytes] | None:
    """ProxyConfig.host_names for serve: local_names(host) and the --allowed-hosts names;
    None (no Host rule) when `*` is among them."""
    if "*" in allowed:
        return None
    return local_names(host) | {h.encode() for h in allowed}


def local_names(host: str) -> frozenset[bytes]:
    """The host names (lower case, no port) under which a browser may reach a server that
    listens on `host` without being a DNS-rebinding attack (docs/security.md): localhost,
    the names given to --host, and the machine's own name when it listens on every address.
    IP literals are always accepted by the Host rule itself (see host_allowed)."""
    import ipaddress  # not on serve's path to spawning llama-server

    names = {"localhost"}
    wildcard = False
    for name in split_hosts(host):
        if is_unix(name):
            continue
        names.add(name.lower())
        with contextlib.suppress(ValueError):
            wildcard |= ipaddress.ip_address(name).is_unspecified
    if wildcard:
        with contextlib.suppress(OSError):
            hostname = socket.gethostname().lower()
            names.add(hostname)
            names.add(hostname.split(".", 1)[0])
    return frozenset(n.encode() for n in names)


def host_allowed(value: bytes, names: frozenset[bytes]) -> bool:
    """Whether a request's Host header names this server (see local_names): an IP literal
    (a rebinding attack needs a name the attacker controls), localhost or a name under
    `.localhost` (RFC 6761: always loopback), or one of `names`. Vite and Jupyter decide
    the same way."""
    import ipaddress

    host = value.strip().lower()
    if host.startswith(b"["):  # [v6]:port
        end = host.find(b"]")
        if end < 0:
            return False
        try:
            ipaddress.IPv6Address(host[1:end].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return False
        return True
    name, _, port = host.partition(b":")
    if port and not port.isdigit():
        return False
    name = name.rstrip(b".")  # "localhost." is the same name
    if b"*" in names or name in names or name.endswith(b".localhost"):
        return True
    try:
        ipaddress.IPv4Address(name.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True
