"""Remote upstreams: other `llamactl serve`s or bare llama-servers, used as replicas behind
this one's proxy. Health-checked, balanced by free slots, taken out after failures (a circuit
breaker) and put back on recovery.

Pure parts (URL parsing, the breaker, the choice of a replica) are functions of their inputs
and a clock; `RemotePool` carries them out and is the proxy's upstream provider for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.errors import UsageError

if TYPE_CHECKING:
    import ssl

    from llamactl.serve.upstream import Upstream

log = logging.getLogger(__name__)

#: Where `--remote URL` finds the API key of the remotes named on the command line.
REMOTE_KEY_ENV = "LLAMACTL_REMOTE_API_KEY"


@dataclass(frozen=True)
class RemoteSpec:
    """One remote upstream as configured: its base URL, key, models and TLS rule."""

    url: str
    api_key: str | None = None
    #: The models it serves; empty: read from its /v1/models (and kept current).
    models: tuple[str, ...] = ()
    verify_tls: bool = True
    #: A CA bundle to verify its certificate with, instead of the system's.
    ca_file: str | None = None


@dataclass(frozen=True)
class Address:
    """A remote's base URL, taken apart."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> bytes:
        """The Host header for it: the name, and the port unless it is the scheme's."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return (host if self.port == default else f"{host}:{self.port}").encode()

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> Address:
    """'http://host:8080' (a trailing /v1 or / is dropped) -> its parts; UsageError if the
    URL is not an http(s) server's base address."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--remote {url!r}: give the server's base URL, e.g. http://10.0.0.2:8080 "
            "or https://models.example.com"
        )
    if parts.query or parts.fragment or parts.path.rstrip("/") not in ("", "/v1"):
        raise UsageError(
            f"--remote {url!r}: a path prefix is not supported; give the server's base URL"
        )
    if parts.username or parts.password:
        raise UsageError(f"--remote {url!r}: put the key in {REMOTE_KEY_ENV}, not in the URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"--remote {url!r}: not a valid port") from None
    return Address(parts.scheme, parts.hostname, port)


def remotes_from_args(urls: Sequence[str], environ: dict[str, str]) -> tuple[RemoteSpec, ...]:
    """The remotes of `serve --remote URL ...`: each URL checked, the key from the environment
    (one key for all of them), TLS verified."""
    key = environ.get(REMOTE_KEY_ENV) or None
    seen: set[str] = set()
    specs = []
    for url in urls:
        base = parse_url(url).base
        if base in seen:
            raise UsageError(f"--remote {url} is named twice")
        seen.add(base)
        specs.append(RemoteSpec(url=base, api_key=key))
    return tuple(specs)


_REMOTE_KEYS: dict[str, type] = {
    "url": str,
    "models": list,
    "api_key": str,
    "api_key_env": str,
    "api_key_file": str,
    "verify_tls": bool,
    "ca_file": str,
}


def remotes_from_toml(path: Path, environ: dict[str, str]) -> tuple[tuple[RemoteSpec, ...], bool]:
    """The `[remotes.NAME]` tables of a serve TOML file (url, models, api_key / api_key_env /
    api_key_file, verify_tls, ca_file), and whether the file declares local models too.
    ConfigError with the file, table and key when one is wrong."""
    from llamactl.serve.config import ConfigError, _load_toml, _toml_line

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    data = _load_toml(text, path)
    tables = data.get("remotes", {})

    def fail(table: str, key: str | None, what: str) -> ConfigError:
        line = _toml_line(text, table, key)
        at = f"{path}:{line}" if line else str(path)
        return ConfigError(f"{at}: [{table}]" + (f" {key}" if key else "") + f": {what}")

    if not isinstance(tables, dict):
        raise fail("remotes", None, "expected tables: [remotes.NAME] url = ...")
    specs = []
    for name, values in tables.items():
        table = f"remotes.{name}"
        if not isinstance(values, dict):
            raise fail(table, None, "expected a table")
        for key, value in values.items():
            kind = _REMOTE_KEYS.get(key)
            if kind is None:
                raise fail(table, key, f"unknown key (known: {', '.join(sorted(_REMOTE_KEYS))})")
            if not isinstance(value, kind):
                raise fail(table, key, f"expected {kind.__name__}")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise fail(table, key, "expected a list of strings")
        if "url" not in values:
            raise fail(table, None, "url = BASE_URL is required")
        try:
            base = parse_url(values["url"]).base
        except UsageError as exc:
            raise fail(table, "url", exc.message) from None
        key = values.get("api_key")
        if "api_key_env" in values:
            key = environ.get(values["api_key_env"])
            if not key:
                raise fail(table, "api_key_env", f"{values['api_key_env']} is not set")
        if "api_key_file" in values:
            key_path = (path.parent / Path(values["api_key_file"]).expanduser()).resolve()
            try:
                key = key_path.read_text().strip().splitlines()[0].strip()
            except (OSError, IndexError):
                raise fail(table, "api_key_file", f"cannot read a key from {key_path}") from None
        ca_file = values.get("ca_file")
        if ca_file is not None:
            ca_file = str((path.parent / Path(ca_file).expanduser()).resolve())
        specs.append(
            RemoteSpec(
                url=base,
                api_key=key,
                models=tuple(values.get("models", ())),
                verify_tls=bool(values.get("verify_tls", True)),
                ca_file=ca_file,
            )
        )
    return tuple(specs), bool(data.get("models"))


def models_in(payload: Any) -> tuple[str, ...]:
    """The model ids of an OpenAI /v1/models answer (llama-server's and llamactl's); ()
    for anything else."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return ()
    ids = []
    for item in payload["data"]:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            ids.append(item["id"])
    return tuple(ids)


def total_slots_in(payload: Any) -> int | None:
    """`total_slots` of a llama-server /props answer, when it is a positive number."""
    if isinstance(payload, dict):
        value = payload.get("total_slots")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# -- the circuit breaker (pure, on a clock) ----------------------------------------------------


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # in use
    OPEN = "open"  # taken out after failures; not used until the cool-down ends
    HALF_OPEN = "half-open"  # cool-down over: one trial request decides


@dataclass
class Breaker:
    """Consecutive failures open it for `cooldown` seconds (doubling while trials fail, up to
    `max_cooldown`); then one trial request is let through; a success closes it."""

    threshold: int = 3
    cooldown: float = 2.0
    max_cooldown: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    current_cooldown: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float) -> bool:
        """May a request go to this replica now (a trial counts as taken)?"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.current_cooldown:
            self.state = BreakerState.HALF_OPEN
            self.trial_in_flight = False
        return self.state is BreakerState.HALF_OPEN and not self.trial_in_flight

    def on_trial(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.trial_in_flight = True

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.current_cooldown = 0.0
        self.trial_in_flight = False

    def failure(self, now: float) -> bool:
        """Count a failure; True when it opened (or re-opened) the breaker."""
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._open(now, min(self.max_cooldown, max(self.cooldown, self.current_cooldown * 2)))
            return True
        if self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self._open(now, self.cooldown)
            return True
        return False

    def trip(self, now: float) -> None:
        """Open at once (its health check failed: no need to wait for requests to fail)."""
        if self.state is not BreakerState.OPEN:
            self._open(now, self.cooldown)

    def _open(self, now: float, cooldown: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.current_cooldown = cooldown
        self.trial_in_flight = False


# -- replicas and the choice of one ------------------------------------------------------------


@dataclass
class Replica:
    """One remote upstream and what is known of it now."""

    spec: RemoteSpec
    address: Address
    name: str
    breaker: Breaker = field(default_factory=Breaker)
    healthy: bool = False  # its last health check answered 200
    checked: bool = False  # a health check has completed at least once
    models: tuple[str, ...] = ()
    total_slots: int = 1
    in_flight: int = 0
    generation: int = 1
    served: int = 0
    failed: int = 0
    last_error: str | None = None

    @property
    def free_slots(self) -> int:
        return self.total_slots - self.in_flight

    def serves(self, model: str | None) -> bool:
        """A request names no model, or one this replica lists (or it lists none: a bare
        llama-server answers any name)."""
        return model is None or not self.models or model in self.models

    @property
    def state(self) -> str:
        """For ps and /metrics: ready, unhealthy, open (taken out), half-open, checking."""
        if not self.checked:
            return "checking"
        if self.breaker.state is not BreakerState.CLOSED:
            return self.breaker.state.value
        return "ready" if self.healthy else "unhealthy"


def choose(
    replicas: Sequence[Replica],
    model: str | None,
    now: float,
    *,
    avoid: Iterable[str] = (),
    turn: int = 0,
) -> Replica | None:
    """The replica for a request: among the healthy ones serving `model` whose breaker lets a
    request through, the one with the most free slots (fewest requests in flight on ties),
    rotating by `turn` among equals; one in `avoid` (just failed this request) only if no
    other will do. None: no replica can take it now."""
    avoided = set(avoid)
    candidates = [r for r in replicas if r.healthy and r.serves(model) and r.breaker.allows(now)]
    preferred = [r for r in candidates if r.name not in avoided] or candidates
    if not preferred:
        return None
    best = max(r.free_slots for r in preferred)
    tied = [r for r in preferred if r.free_slots == best]
    return tied[turn % len(tied)]


# -- the pool: health checks, acquire / release ------------------------------------------------


@dataclass(frozen=True)
class PoolPolicy:
    health_interval: float = 2.0
    health_timeout: float = 3.0
    models_interval: float = 30.0  # how often a remote's /v1/models is read again
    #: How long a request waits for some replica to become usable before a 503.
    queue_timeout: float = 30.0
    breaker_threshold: int = 3
    breaker_cooldown: float = 2.0


def _tls_context(spec: RemoteSpec) -> ssl.SSLContext:
    import ssl

    if not spec.verify_tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=spec.ca_file)


class RemotePool:
    """Remote replicas as the proxy's upstream provider (acquire / release)."""

    def __init__(
        self,
        specs: Sequence[RemoteSpec],
        policy: PoolPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[RemotePool], None] | None = None,
    ) -> None:
        self.policy = policy or PoolPolicy()
        self._clock = clock
        self._on_change = on_change
        self.replicas: list[Replica] = []
        for i, spec in enumerate(specs):
            address = parse_url(spec.url)
            self.replicas.append(
                Replica(
                    spec=spec,
                    address=address,
                    name=f"remote{i + 1}",
                    models=spec.models,
                    breaker=Breaker(
                        threshold=self.policy.breaker_threshold,
                        cooldown=self.policy.breaker_cooldown,
                    ),
                )
            )
        self._by_name = {r.name: r for r in self.replicas}
        self.names = frozenset(self._by_name)
        #: A local model beside the replicas (serve/front.py's Mixed): its /v1/models entry
        #: and whether it is ready, for the front's own answers.
        self.extra_models: Callable[[], dict[str, Any] | None] = lambda: None
        self.extra_health: Callable[[], bool] = lambda: False
        self._turn = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tls: dict[str, ssl.SSLContext] = {}
        from llamactl.serve.control import ControlServer

        self.control = ControlServer(self.handle_control)

    # -- lifecycle

    async def start(self, *, wait: float = 0.0) -> None:
        """Start the health checks; wait up to `wait` seconds for a first usable replica."""
        loop = asyncio.get_running_loop()
        await self.control.start()
        for replica in self.replicas:
            self._tasks.append(loop.create_task(self._check_loop(replica)))
        if wait > 0:
            deadline = self._clock() + wait
            while not any(r.healthy for r in self.replicas) and self._clock() < deadline:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=0.25)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.control.close()

    def is_ready(self, model: str | None = None) -> bool:
        return any(r.healthy and r.serves(model) for r in self.replicas)

    # -- the proxy's side

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        """A replica for the request, waiting (bounded) while none is usable."""
        from llamactl.serve.upstream import ProxyError

        if path in CONTROL_PATHS and method in (b"GET", b"HEAD"):
            return self.control.upstream  # the front's own answers (handle_control)
        deadline = self._clock() + self.policy.queue_timeout
        while True:
            now = self._clock()
            replica = choose(self.replicas, model, now, turn=self._turn)
            if replica is not None:
                self._turn += 1
                return self.lease(replica)
            if model is not None and not any(r.serves(model) for r in self.replicas):
                raise ProxyError(
                    404,
                    f"model {model!r} is not served here (see /v1/models)",
                    "not_found_error",
                    "model_not_found",
                )
            left = deadline - now
            if left <= 0:
                raise ProxyError(
                    503,
                    "no remote server can take the request now: "
                    + "; ".join(f"{r.address.base} {r.state}" for r in self.replicas),
                    "unavailable_error",
                    "no_replica",
                    retry_after=5,
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.25))

    def lease(self, replica: Replica) -> Upstream:
        from llamactl.serve.upstream import Upstream

        replica.breaker.on_trial()
        replica.in_flight += 1
        key = replica.spec.api_key
        address = replica.address
        tls = None
        if address.tls:
            tls = self._tls.get(replica.name)
            if tls is None:
                tls = self._tls[replica.name] = _tls_context(replica.spec)
        return Upstream(
            name=replica.name,
            host=address.host,
            port=address.port,
            auth=f"Bearer {key}".encode() if key else None,
            generation=replica.generation,
            replicated=len(self.replicas) > 1,
            tls=tls,
            host_header=address.host_header,
        )

    def replayable(self, upstream: Upstream) -> bool:
        """Never the supervisor's replay after a hang: a replica's dropped request is moved to
        another replica by the proxy instead (Upstream.replicated), counted as its failure."""
        return False

    def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        """Count the outcome: a transport failure or a 5xx (but a 503, which is the remote's
        own back-pressure) is a failure for the breaker; anything else a success."""
        replica = self._by_name.get(upstream.name)
        if replica is None:  # the control server's
            return
        replica.in_flight = max(0, replica.in_flight - 1)
        if outcome == 499:  # the client left: says nothing about the replica
            replica.breaker.trial_in_flight = False
        elif outcome == 0 or (outcome >= 500 and outcome != 503):
            replica.failed += 1
            if outcome == 0 and replica.breaker.state is BreakerState.CLOSED:
                # No answer at all (refused, reset, cut): out at once, so that the request
                # sent again (the proxy retries one that got no byte) goes to another replica;
                # its next good health check lets a trial request through.
                replica.breaker.failures = replica.breaker.threshold - 1
            if replica.breaker.failure(self._clock()):
                log.warning(
                    "remote %s (%s): taken out after %d failures in a row",
                    replica.name,
                    replica.address.base,
                    replica.breaker.failures,
                )
                self._notify()
        else:
            replica.served += 1
            if replica.breaker.state is not BreakerState.CLOSED:
                log.warning("remote %s (%s): back in use", replica.name, replica.address.base)
                replica.breaker.success()
                self._notify()
            else:
                replica.breaker.failures = 0
        self._changed.set()

    # -- health checks

    async def _check_loop(self, replica: Replica) -> None:
        import httpx

        verify: Any = True
        if replica.address.tls:
            verify = self._tls.setdefault(replica.name, _tls_context(replica.spec))
        headers = (
            {"Authorization": f"Bearer {replica.spec.api_key}"} if replica.spec.api_key else {}
        )
        models_at = -1e9
        async with httpx.AsyncClient(
            base_url=replica.address.base,
            headers=headers,
            verify=verify,
            timeout=self.policy.health_timeout,
            trust_env=False,
        ) as client:
            while True:
                now = self._clock()
                want_models = not replica.spec.models and (
                    now - models_at >= self.policy.models_interval or not replica.models
                )
                await self._check(replica, client, want_models)
                if want_models and replica.models:
                    models_at = now
                await asyncio.sleep(self.policy.health_interval)

    async def _check(self, replica: Replica, client: Any, want_models: bool) -> None:
        import httpx

        was = replica.state
        try:
            health = await client.get("/health")
            ok = health.status_code == 200
            if ok:
                props = await client.get("/props")
                if props.status_code == 200:
                    slots = total_slots_in(_json(props))
                    if slots is not None:
                        replica.total_slots = slots
                if want_models:
                    listed = await client.get("/v1/models")
                    if listed.status_code == 200:
                        replica.models = models_in(_json(listed))
                    elif listed.status_code in (401, 403):
                        ok = False
                        replica.last_error = (
                            f"/v1/models answered {listed.status_code}: check the API key "
                            f"({REMOTE_KEY_ENV})"
                        )
            else:
                replica.last_error = f"/health answered {health.status_code}"
        except httpx.HTTPError as exc:
            ok = False
            replica.last_error = _describe(exc)
        replica.checked = True
        if ok:
            replica.healthy = True
            replica.last_error = None
            if replica.breaker.state is BreakerState.OPEN:
                # Answers again: let the next request be the trial, without the cool-down.
                replica.breaker.opened_at = -1e9
        else:
            if replica.healthy or not was.startswith("un"):
                log.warning(
                    "remote %s (%s): %s", replica.name, replica.address.base, replica.last_error
                )
            replica.healthy = False
            replica.breaker.trip(self._clock())
            replica.generation += 1  # its pooled connections are of no use any more
        if replica.state != was:
            self._notify()
        self._changed.set()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self)
            except Exception:
                log.exception("state record update failed")

    # -- the front's own answers

    def models_json(self) -> dict[str, Any]:
        """/v1/models of the front: every model, with where it runs (the local instance
        beside remote replicas, when there is one: serve/front.py's Mixed)."""
        now = int(time.time())
        where: dict[str, list[dict[str, Any]]] = {}
        local = self.extra_models()
        if local is not None:
            entry = {k: v for k, v in local.items() if k != "model"}
            where.setdefault(local["model"], []).append(entry)
        for r in self.replicas:
            for model in r.models:
                where.setdefault(model, []).append(
                    {
                        "url": r.address.base,
                        "state": r.state,
                        "in_flight": r.in_flight,
                        "total_slots": r.total_slots,
                    }
                )
        data = [
            {
                "id": model,
                "object": "model",
                "owned_by": "llamactl",
                "created": now,
                "status": {
                    "value": "loaded" if any(p["state"] == "ready" for p in places) else "unloaded"
                },
                "replicas": places,
            }
            for model, places in where.items()
        ]
        return {"object": "list", "data": data}

    def metrics_text(self) -> str:
        """Prometheus series of each replica, labelled with its URL."""
        out: list[str] = []

        def series(name: str, kind: str, text: str, value: Callable[[Replica], float]) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for r in self.replicas:
                models = ",".join(r.models)
                out.append(f'{name}{{remote="{r.address.base}",models="{models}"}} {value(r):g}')

        series("llamactl_remote_up", "gauge", "1 when the replica takes requests", _usable)
        series("llamactl_remote_in_flight", "gauge", "requests in flight", lambda r: r.in_flight)
        series("llamactl_remote_slots", "gauge", "its total_slots", lambda r: r.total_slots)
        series("llamactl_remote_requests_total", "counter", "answered", lambda r: r.served)
        series("llamactl_remote_failures_total", "counter", "failed", lambda r: r.failed)
        return "\n".join(out) + "\n"

    async def handle_control(self, method: str, path: str, query: str, body: bytes) -> Any:
        from llamactl.serve.control import Reply
        from llamactl.serve.upstream import ProxyError

        if path in ("/health", "/v1/health"):
            ready = [r.address.base for r in self.replicas if _usable(r)]
            if self.extra_health():
                ready.insert(0, "local")
            if ready:
                return Reply.json(200, {"status": "ok", "replicas": ready})
            raise ProxyError(
                503,
                "no remote server can take the request now: "
                + "; ".join(f"{r.address.base} {r.state}" for r in self.replicas),
                "unavailable_error",
                "no_replica",
            )
        if path in ("/models", "/v1/models"):
            return Reply.json(200, self.models_json())
        if path == "/metrics":
            return Reply(200, self.metrics_text().encode(), "text/plain; version=0.0.4")
        raise ProxyError(404, "File Not Found", "not_found_error")

    def rows(self) -> list[dict[str, Any]]:
        """What ps, /models and /metrics say of each replica."""
        return [
            {
                "name": r.name,
                "url": r.address.base,
                "state": r.state,
                "models": list(r.models),
                "total_slots": r.total_slots,
                "in_flight": r.in_flight,
                "served": r.served,
                "failed": r.failed,
                "last_error": r.last_error,
            }
            for r in self.replicas
        ]


#: What the front answers itself (GET/HEAD): health, the models and where they run, metrics.
CONTROL_PATHS = frozenset({b"/health", b"/v1/health", b"/models", b"/v1/models", b"/metrics"})


def _usable(replica: Replica) -> float:
    return 1.0 if replica.healthy and replica.breaker.state is BreakerState.CLOSED else 0.0


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"TLS certificate not trusted ({text}); give its CA with ca_file in the config, "
            "or verify_tls = false for a test server"
        )
    return text
