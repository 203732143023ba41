"""Hosts of their own for tests: a network namespace joined to this one by a veth pair, each
end with an address of the test's own (10.213.N.1 here, 10.213.N.2 there). Traffic stays on
the pair; the namespace and its link are removed after. Where namespaces cannot be made (not
root, no iproute2), `host_namespace` yields None and the test falls back to loopback ports.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

_COUNTER = itertools.count()


@dataclass(frozen=True)
class NetNs:
    """A namespace, its address, and ours on the link to it."""

    name: str
    address: str  # inside the namespace
    peer: str  # this side of the link

    def prefix(self) -> list[str]:
        """The argv prefix that runs a program inside the namespace (ip execs it: same pid)."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextlib.contextmanager
def host_namespace() -> Iterator[NetNs | None]:
    """A namespace with an address of its own, or None when namespaces are unavailable."""
    if not available():
        yield None
        return
    n = next(_COUNTER)
    tag = f"{os.getpid() % 10000}x{n}"
    name, host_if, ns_if = f"llmm{tag}", f"llmh{tag}", f"llmn{tag}"
    subnet = (os.getpid() + n * 7) % 250 + 1
    peer, address = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    steps = [
        ("netns", "add", name),
        ("link", "add", host_if, "type", "veth", "peer", "name", ns_if),
        ("link", "set", ns_if, "netns", name),
        ("addr", "add", f"{peer}/30", "dev", host_if),
        ("link", "set", host_if, "up"),
        ("-n", name, "addr", "add", f"{address}/30", "dev", ns_if),
        ("-n", name, "link", "set", ns_if, "up"),
        ("-n", name, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                yield None
                return
        yield NetNs(name, address, peer)
    finally:
        _ip("link", "del", host_if)  # deletes both ends
        _ip("netns", "del", name)
