"""Which instance serves a request, and what must happen first: pure functions of the request's
model, the instances' states, memory and the clock. The fleet (serve/fleet.py) carries the
decisions out: starts, drains and stops, waits; it owns every state change.

Nothing here touches a process, a socket or the event loop: tests feed tables of states in and
read decisions out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Decision", "Limits", "Seen", "expired", "route"]

#: States in which an instance holds (or is about to hold) its memory.
_LIVE = frozenset({"starting", "ready", "backoff", "stopping"})
#: How long a model whose load failed answers with the diagnosis before a new request may
#: try again (so that a client retrying in a loop does not spawn a failing server each time).
FAILED_COOLDOWN_S = 5.0


@dataclass(frozen=True)
class Seen:
    """One instance as the router sees it."""

    name: str  # the instance (model name, `name#2` for a second replica)
    model: str
    state: str  # starting, ready, backoff, stopping, stopped, failed
    in_flight: int = 0
    last_used: float = 0.0
    pinned: bool = False
    bytes: int = 0  # estimated memory
    slots: int = 1 << 30  # parallel slots (llama-server's /props total_slots); unknown: many
    groups: tuple[str, ...] = ()
    failed_at: float | None = None


@dataclass(frozen=True)
class Limits:
    """The bounds of the whole serve."""

    models_max: int = 4  # loaded models at once; 0: no limit by count
    free_bytes: int | None = None  # memory free for new models now; None: unknown
    exclusive_groups: frozenset[str] = frozenset()
    autoload: bool = True


@dataclass(frozen=True)
class Decision:
    """What to do with a request: `use` an instance, `wait` for one (loading), `load` one
    (after evicting `evict`, drained first), or `reject` it."""

    action: str
    instance: str | None = None
    evict: tuple[str, ...] = ()
    status: int = 0
    message: str = ""
    code: str = ""
    retry_after: int | None = None
    reason: str = ""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def route(
    model: str,
    *,
    replicas: int,
    need_bytes: int,
    pinned: bool,
    groups: Sequence[str],
    instances: Iterable[Seen],
    limits: Limits,
    now: float,
    queued: int = 0,
    queue_limit: int = 256,
    protected: frozenset[str] = frozenset(),
    turn: bool = True,
) -> Decision:
    """The decision for one request for `model` (already resolved from names and aliases).

    As router mode's scheduler does (tools/server/server-models.cpp, server_lru_sched): a
    model serving a request is never evicted (the newcomer waits until it is idle), nor one
    that `protected` requests are waiting for, and loads go in arrival order: a model whose
    `turn` it is not waits behind the earlier requests for other models."""
    everyone = list(instances)
    mine = [s for s in everyone if s.model == model]
    ready = [s for s in mine if s.state == "ready"]
    live_mine = [s for s in mine if s.state in _LIVE]
    if ready:
        best = min(ready, key=lambda s: s.in_flight / max(1, s.slots))
        if best.in_flight < best.slots:
            return Decision("use", best.name, reason="a free slot")
        if len(live_mine) >= replicas:
            # Every slot of every replica busy: llama-server queues what it cannot run yet;
            # llamactl bounds how much may wait there (and here, for a load) per model.
            overflow = queued + sum(max(0, s.in_flight - s.slots) for s in ready)
            if overflow >= queue_limit:
                return Decision(
                    "reject",
                    status=429,
                    message=f"model {model!r} is busy: {overflow} requests are waiting for it",
                    code="queue_full",
                    retry_after=1,
                    reason="queue limit",
                )
            return Decision("use", best.name, reason="every slot is busy: queued upstream")
        # Every slot busy and a replica is not running: start it (below).
    else:
        starting = [s for s in mine if s.state in ("starting", "backoff")]
        if starting:
            return Decision("wait", starting[0].name, reason="loading")
    failed = [s for s in mine if s.state == "failed" and s.failed_at is not None]
    if not ready and failed and now - max(s.failed_at or 0.0 for s in failed) < FAILED_COOLDOWN_S:
        return Decision(
            "reject",
            status=503,
            message=f"model {model!r} failed to load",
            code="model_failed",
            retry_after=int(FAILED_COOLDOWN_S),
            reason="failed a moment ago",
        )
    if not ready and not limits.autoload:
        return Decision(
            "reject",
            status=400,
            message=f"model {model!r} is not loaded (autoload is off: POST /models/load first)",
            code="model_not_loaded",
            reason="autoload off",
        )
    if not turn:
        return Decision("wait", None, reason="queued behind earlier requests for other models")
    # A new instance: the next free replica name.
    names = {s.name for s in mine if s.state in _LIVE}
    target = next(
        n
        for n in (model if i == 1 else f"{model}#{i}" for i in range(1, replicas + 2))
        if n not in names
    )
    victims, why = _victims(model, need_bytes, groups, everyone, limits, protected)
    if victims is None and any(
        s.model != model
        and (s.state in ("starting", "backoff", "stopping") or (s.state == "ready" and s.in_flight))
        for s in everyone
    ):
        # Another model is loading, unloading or serving a request: once it settles or goes
        # idle there may be room (or one more to evict). Wait for that, bounded by the queue
        # timeout, rather than refuse.
        return Decision("wait", None, reason=f"waiting for other models to settle: {why}")
    if victims is None:
        return Decision(
            "reject",
            status=503,
            message=f"cannot load model {model!r}: {why}",
            code="no_room",
            retry_after=10,
            reason=why,
        )
    return Decision("load", target, evict=tuple(victims), reason=why)


def _victims(
    model: str,
    need: int,
    groups: Sequence[str],
    everyone: Sequence[Seen],
    limits: Limits,
    protected: frozenset[str] = frozenset(),
) -> tuple[list[str] | None, str]:
    """Instances to unload so that `model` fits: exclusive-group peers first, then least
    recently used first; never a pinned one, one serving a request or one that `protected`
    requests wait for. None (and why) when it cannot fit."""
    live = [s for s in everyone if s.state in _LIVE]
    victims: list[Seen] = []
    reasons: list[str] = []
    exclusive = set(groups) & limits.exclusive_groups
    for s in live:
        if s.model != model and exclusive & set(s.groups):
            if s.pinned:
                return None, f"{s.model!r} is pinned and shares an exclusive group with it"
            victims.append(s)
            reasons.append(f"{s.model} shares the exclusive group {sorted(exclusive)[0]}")
    # LRU by model: a model's last use is its most recent instance's.
    by_model: dict[str, list[Seen]] = {}
    for s in live:
        if s.model != model:
            by_model.setdefault(s.model, []).append(s)
    order = sorted(by_model.items(), key=lambda kv: max(s.last_used for s in kv[1]))
    evictable = [
        (m, ss)
        for m, ss in order
        if m not in protected
        and not any(s.pinned for s in ss)
        and all(s.state == "stopping" or (s.state == "ready" and not s.in_flight) for s in ss)
    ]

    def models_after() -> int:
        gone = {s.model for s in victims}
        loaded = {s.model for s in live} - gone
        return len(loaded | {model})

    def free_after() -> int | None:
        if limits.free_bytes is None:
            return None
        return limits.free_bytes + sum(s.bytes for s in victims if s.state != "stopping")

    for m, ss in evictable:
        over_count = limits.models_max > 0 and models_after() > limits.models_max
        free = free_after()
        short = free is not None and need > free
        if not over_count and not short:
            break
        if any(v.model == m for v in victims):
            continue
        victims.extend(ss)
        reasons.append(
            f"{m} (least recently used) to stay within --models-max {limits.models_max}"
            if over_count
            else f"{m} (least recently used) to free memory: need {_mib(need)}, "
            f"free {_mib(free or 0)}"
        )
    if limits.models_max > 0 and models_after() > limits.models_max:
        return None, (
            f"--models-max {limits.models_max} models are loaded and none can be unloaded "
            "(pinned, busy or still loading)"
        )
    free = free_after()
    if free is not None and need > free:
        return None, f"not enough memory: it needs about {_mib(need)}, {_mib(free)} is free"
    names = list(dict.fromkeys(v.name for v in victims))
    if names:
        return names, "evicting " + "; ".join(reasons)
    if free is not None:
        return names, f"fits: needs about {_mib(need)}, {_mib(free)} free"
    return names, "fits"


def expired(instances: Iterable[Seen], ttl: dict[str, float], now: float) -> list[Seen]:
    """Ready, idle instances whose model's idle TTL has passed since their last use."""
    return [
        s
        for s in instances
        if s.state == "ready"
        and s.in_flight == 0
        and s.model in ttl
        and now - s.last_used >= ttl[s.model]
    ]
