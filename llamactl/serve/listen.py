"""The proxy's listening sockets, bound without an event loop.

`llamactl serve` binds before it spawns llama-server (a taken port fails before any model
loads) and before it imports asyncio and the proxy (those imports then overlap the model's
load); the proxy adopts the sockets once its loop runs. Connections that arrive in between
wait in the kernel's backlog."""

from __future__ import annotations

import contextlib
import errno
import socket

from llamactl.errors import LlamactlError


class ProxyBindError(LlamactlError):
    """The proxy cannot listen on the address it was given."""

    exit_code = 6


def bind(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening TCP sockets for every address `host` resolves to (as asyncio's
    create_server binds them: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ProxyBindError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return sockets
