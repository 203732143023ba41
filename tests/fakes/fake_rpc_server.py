#!/usr/bin/env python3
"""A fake ggml-rpc-server for fast tests: stdlib only; speaks the RPC hello and nothing more.

    python3 tests/fakes/fake_rpc_server.py [--host H] [--port N] [ggml-rpc-server flags...]

Like the real one it serves one client at a time: the hello, then it reads until the client
hangs up. Environment knobs:
  FAKE_RPC_VERSION=7.0.0      the version its hello reply announces
  FAKE_RPC_BIND_FAILS=N       the first N starts print "Failed to create server socket" and exit
                              0 (needs FAKE_RPC_COUNTER=FILE to count starts across processes)
  FAKE_RPC_MODE=unknown-device  print ggml-rpc-server's unknown-device error and exit 1
  FAKE_RPC_MODE=crash-after   exit 1 this many seconds after it started (FAKE_RPC_CRASH_AFTER)
  FAKE_RPC_MODE=silent        accept connections and never answer the hello
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time


def _arg(argv: list[str], names: tuple[str, ...], default: str) -> str:
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
    return default


def _count_start() -> int:
    path = os.environ.get("FAKE_RPC_COUNTER")
    if not path:
        return 1
    try:
        with open(path) as fh:
            n = int(fh.read() or 0) + 1
    except (OSError, ValueError):
        n = 1
    with open(path, "w") as fh:
        fh.write(str(n))
    return n


def _serve_client(conn: socket.socket, version: tuple[int, int, int], silent: bool) -> None:
    with conn:
        if silent:
            while conn.recv(4096):
                pass
            return
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return
            head += chunk
        cmd, size = head[0], struct.unpack("<Q", head[1:9])[0]
        if cmd != 14 or size != 24:
            print("Expected HELLO command, update client", flush=True)
            return
        got = 0
        while got < size:
            chunk = conn.recv(size - got)
            if not chunk:
                return
            got += len(chunk)
        reply = bytes([*version, 0]) + bytes(24)
        conn.sendall(struct.pack("<Q", len(reply)) + reply)
        while conn.recv(4096):  # a head stays connected; commands are not spoken here
            pass


def main(argv: list[str]) -> int:
    host = _arg(argv, ("-H", "--host"), "127.0.0.1")
    port = int(_arg(argv, ("-p", "--port"), "50052"))
    version = tuple(int(x) for x in os.environ.get("FAKE_RPC_VERSION", "7.0.0").split("."))
    mode = os.environ.get("FAKE_RPC_MODE", "")
    print("Starting RPC server v{}.{}.{}".format(*version), flush=True)
    print(f"  endpoint       : {host}:{port}", flush=True)
    if mode == "unknown-device":
        print("error: unknown device: NOPE0", file=sys.stderr, flush=True)
        return 1
    if _count_start() <= int(os.environ.get("FAKE_RPC_BIND_FAILS", "0")):
        print("Failed to create server socket", file=sys.stderr, flush=True)
        return 0
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((host, port))
    except OSError:
        print("Failed to create server socket", file=sys.stderr, flush=True)
        return 0
    srv.listen(1)
    if mode == "crash-after":
        delay = float(os.environ.get("FAKE_RPC_CRASH_AFTER", "0.5"))
        threading.Timer(delay, lambda: os._exit(1)).start()
    while True:
        conn, _ = srv.accept()
        print("Accepted client connection", flush=True)
        _serve_client(conn, version, mode == "silent")  # type: ignore[arg-type]
        time.sleep(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
