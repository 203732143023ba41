"""The proxy's express lane: express.c, compiled once per source and compiler into the cache,
loaded with ctypes, and the Python side of its contract (docs/proxy.md, "The express lane").

The lane is a thread with its own epoll loop that takes the proxy's TCP connections first and
serves, without Python, a plain POST /tokenize, /detokenize or /apply-template for a model the
proxy has already routed to a llama-server ("learned" routes). Anything else goes to the Python
proxy with the bytes already read; a connection handed over for a route the lane did not know
yet comes back to the lane after its answer. The provider (the supervisor, a fleet of models)
drops every learned route on any change of state, and folds the lane's finished exchanges into
its own accounting (`note`): metrics, last use, failures.

Linux only (epoll); set LLAMACTL_EXPRESS=0 to serve everything through Python."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import paths

if TYPE_CHECKING:
    from llamactl.serve.upstream import Upstream

log = logging.getLogger(__name__)

__all__ = ["EXPRESS_PATHS", "FAILED", "MISS", "Lane", "enabled", "library"]

SOURCE = Path(__file__).with_name("express.c")
#: The routes the lane serves itself (express.c's EXPRESS_PATHS): llama-server answers them
#: in its HTTP thread, without a slot, so they need no queue and no slot accounting.
EXPRESS_PATHS = frozenset({b"/tokenize", b"/detokenize", b"/apply-template"})
#: Why the lane handed a connection over (express.c): any other reason, a request it may
#: serve but for a route (or Host) it does not know yet, its llama-server failed it.
OTHER, MISS, FAILED = 0, 1, 2
_VERSION = 1
_JOURNAL_BATCH = 4096

_lib: ctypes.CDLL | None = None
_lib_tried = False
_lib_lock = threading.Lock()


def enabled() -> bool:
    """Whether serve may use the lane: Linux, and not switched off (LLAMACTL_EXPRESS=0)."""
    return sys.platform.startswith("linux") and os.environ.get("LLAMACTL_EXPRESS", "1") != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(quiet: bool = True) -> Path | None:
    """The compiled lane for this source and compiler, built into the cache when missing; None
    when it cannot be (no C compiler: serve then runs without it, and says so)."""
    cc = _compiler()
    if cc is None:
        return None
    source = SOURCE.read_bytes()
    # Keyed by the source and the compiler's binary (no process started per serve: a new
    # compiler makes a new file, the old one stays valid for the one it came from).
    found = shutil.which(cc)
    try:
        tool = Path(found).resolve() if found else None
        stamp = f"{tool}:{tool.stat().st_mtime_ns}" if tool else cc
    except OSError:
        stamp = cc
    digest = hashlib.sha256(source + stamp.encode()).hexdigest()[:16]
    target = paths.cache_dir() / "express" / f"libxl-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log.warning("the express lane did not compile (%s): %s", cc, done.stderr.strip()[-500:])
            return None
        os.replace(tmp, target)  # atomic: a serve starting meanwhile sees all or nothing
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the express lane did not compile: %s", exc)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def prebuild() -> None:
    """Build and load the lane in a thread (serve calls it once llama-server is loading its
    model, so that a first build costs no time to ready)."""
    if enabled():
        threading.Thread(target=library, name="express-build", daemon=True).start()


def library() -> ctypes.CDLL | None:
    """The lane's library, built and loaded once per process; None where it cannot be."""
    with _lib_lock:
        return _library()


def _library() -> ctypes.CDLL | None:
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    _lib_tried = True
    if not enabled():
        return None
    path = build()
    if path is None:
        log.warning("no C compiler for the express lane: every request goes through Python")
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("the express lane did not load: %s", exc)
        return None
    lib.xl_version.restype = ctypes.c_int
    if lib.xl_version() != _VERSION:
        return None
    vp, c_int, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    lib.xl_create.restype = vp
    lib.xl_create.argtypes = [c_int, c_int, c_int, c_int, c_int]
    lib.xl_listen.argtypes = [vp, c_int]
    lib.xl_key.argtypes = [vp, c_char_p, c_int]
    lib.xl_host.argtypes = [vp, c_char_p, c_int, c_int]
    lib.xl_start.argtypes = [vp]
    lib.xl_upstream.argtypes = [vp, c_char_p, c_int, c_char_p, c_int]
    lib.xl_name.argtypes = [vp, c_char_p, c_int, c_int]
    lib.xl_slot_gen.argtypes = [vp, c_int]
    lib.xl_python_conns.argtypes = [vp, c_int, c_int]
    lib.xl_python_conns.restype = None
    lib.xl_clear.argtypes = [vp]
    lib.xl_clear.restype = None
    lib.xl_drain.argtypes = [vp, ctypes.POINTER(ctypes.c_uint32), c_int]
    lib.xl_in_flight.argtypes = [vp, c_int]
    lib.xl_stats.argtypes = [vp, ctypes.POINTER(ctypes.c_int64)]
    lib.xl_stats.restype = None
    lib.xl_take.restype = ctypes.c_long
    lib.xl_take.argtypes = [
        vp,
        ctypes.POINTER(c_int),
        ctypes.POINTER(c_int),
        ctypes.c_char_p,
        ctypes.c_long,
    ]
    lib.xl_take_max.restype = c_int
    lib.xl_give.argtypes = [vp, c_int]
    lib.xl_stop.argtypes = [vp]
    lib.xl_stop.restype = None
    lib.xl_destroy.argtypes = [vp]
    lib.xl_destroy.restype = None
    _lib = lib
    return lib


class Lane:
    """One running lane: owns the listening descriptors it was given and the connections it
    holds; the proxy (serve/proxy.py) adopts what it hands over."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        max_connections: int,
        keepalive_timeout: float,
        upstream_timeout: float,
        connect_timeout: float,
        keys: tuple[bytes, ...],
        hosts_any: bool,
    ) -> None:
        self._lib = lib
        #: Written by the lane when a connection waits in xl_take (the proxy's loop reads it).
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ptr = lib.xl_create(
            self.notify_fd,
            max_connections,
            int(keepalive_timeout * 1000),
            int(upstream_timeout * 1000),
            int(connect_timeout * 1000),
        )
        if not ptr:
            os.close(self.notify_fd)
            raise OSError("the express lane could not be created")
        self._ptr = ctypes.c_void_p(ptr)
        for key in keys:
            lib.xl_key(self._ptr, key, len(key))
        if hosts_any:
            lib.xl_host(self._ptr, None, 0, 1)
        self._hosts: set[bytes] = set()
        self._buf = ctypes.create_string_buffer(lib.xl_take_max())
        self._fd = ctypes.c_int()
        self._reason = ctypes.c_int()
        self._journal = (ctypes.c_uint32 * (3 * _JOURNAL_BATCH))()
        self._stats = (ctypes.c_int64 * 6)()
        #: slot -> the Upstream it stands for (kept after a clear, for the slot's records).
        self._slot_upstream: dict[int, Upstream] = {}
        #: Upstream -> (slot, the slot's generation when it was registered).
        self._upstream_slot: dict[Upstream, tuple[int, int]] = {}
        self._closed = False
        #: Called with (upstream, status, seconds) for each exchange the lane finished (sync).
        self.fold: Callable[[Upstream, int, float], None] = lambda upstream, status, elapsed: None

    def listen(self, fd: int) -> None:
        """Accept on `fd` (a listening TCP socket's descriptor, now the lane's)."""
        if self._lib.xl_listen(self._ptr, fd) != 0:
            raise OSError("the express lane takes at most 16 listening sockets")

    def start(self) -> None:
        if self._lib.xl_start(self._ptr) != 0:
            raise OSError("the express lane's thread did not start")

    def allow_host(self, host: bytes) -> None:
        """A Host header value the proxy has found good (its DNS-rebinding guard)."""
        if host not in self._hosts and len(self._hosts) < 64:
            self._hosts.add(host)
            self._lib.xl_host(self._ptr, host, len(host), 0)

    def learn(self, model: str | None, upstream: Upstream) -> bool:
        """Requests naming `model` (None: naming none) go to `upstream`, the local
        llama-server the provider routes it to without a wait (its `express_route`); False
        when the lane cannot take the route (its tables are full)."""
        if self._closed:
            return False
        lib, ptr = self._lib, self._ptr
        known = self._upstream_slot.get(upstream)
        # The lane retires a slot by itself when its llama-server fails a request, and may give
        # it to another upstream afterwards: the generation tells.
        if known is not None and lib.xl_slot_gen(ptr, known[0]) != known[1]:
            known = None
        if known is None:
            auth = upstream.auth or b""
            slot = lib.xl_upstream(ptr, upstream.host.encode(), upstream.port, auth, len(auth))
            gen = lib.xl_slot_gen(ptr, slot) if slot >= 0 else -1
            if gen < 0:
                return False
            known = (slot, gen)
            self._slot_upstream[slot] = upstream
            self._upstream_slot[upstream] = known
        raw = model.encode() if model is not None else b""
        # (A name the lane already has leads to a live slot: the lane drops the names of a slot
        # it retires.)
        return lib.xl_name(ptr, raw, len(raw) if model is not None else -1, known[0]) == 0

    def clear(self) -> None:
        """Forget every route (the provider's state changed): requests go through Python until
        it routes them again."""
        if self._closed:
            return
        self._lib.xl_clear(self._ptr)
        self._upstream_slot.clear()

    def drain(self) -> list[tuple[Upstream, int, float]]:
        """Exchanges the lane finished since the last call: (upstream, status, seconds)."""
        done: list[tuple[Upstream, int, float]] = []
        if self._closed:
            return done
        journal = self._journal
        while True:
            n = self._lib.xl_drain(self._ptr, journal, _JOURNAL_BATCH)
            for i in range(n):
                upstream = self._slot_upstream.get(journal[3 * i])
                if upstream is not None:
                    done.append((upstream, journal[3 * i + 1], journal[3 * i + 2] / 1e6))
            if n < _JOURNAL_BATCH:
                return done

    def sync(self) -> None:
        """Fold the exchanges the lane finished into the proxy's and provider's accounting."""
        for upstream, status, elapsed in self.drain():
            self.fold(upstream, status, elapsed)

    def in_flight(self, name: str) -> int:
        """Exchanges under way in the lane to the instance called `name`."""
        if self._closed:
            return 0
        return sum(
            self._lib.xl_in_flight(self._ptr, slot)
            for slot, upstream in self._slot_upstream.items()
            if upstream.name == name
        )

    def stats(self) -> dict[str, int]:
        """requests, in_flight, connections, handed (to Python), taken_back, lost (journal)."""
        if self._closed:
            return dict.fromkeys(
                ("requests", "in_flight", "connections", "handed", "taken_back", "lost"), 0
            )
        self._lib.xl_stats(self._ptr, self._stats)
        s = self._stats
        return {
            "requests": s[0],
            "in_flight": s[1],
            "connections": s[2],
            "handed": s[3],
            "taken_back": s[4],
            "lost": s[5],
        }

    def python_connections(self, count: int, refusing: int) -> None:
        """How many client connections the Python proxy holds (the bound counts both), and how
        many it is turning away (the lane closes more at once past 64 with its own queue)."""
        if not self._closed:
            self._lib.xl_python_conns(self._ptr, count, refusing)

    def take(self) -> tuple[int, int, bytes] | None:
        """The next connection handed to Python: (descriptor, reason, bytes read), or None."""
        if self._closed:
            return None
        n = self._lib.xl_take(self._ptr, self._fd, self._reason, self._buf, len(self._buf))
        if n < 0:
            return None
        return self._fd.value, self._reason.value, self._buf.raw[:n]

    def give(self, fd: int) -> bool:
        """Hand an idle connection back (the lane owns `fd` when this says True)."""
        return not self._closed and self._lib.xl_give(self._ptr, fd) == 0

    def stop(self) -> None:
        """Stop accepting; idle connections close, exchanges under way finish."""
        if not self._closed:
            self._lib.xl_stop(self._ptr)

    def close(self) -> None:
        """End the thread and close everything it still holds."""
        if self._closed:
            return
        self._closed = True
        self._lib.xl_destroy(self._ptr)
        os.close(self.notify_fd)


def describe() -> str:
    """One line for the log."""
    return "express lane on (POST " + ", ".join(sorted(p.decode() for p in EXPRESS_PATHS)) + ")"
