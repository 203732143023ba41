"""Which instance serves a request, and what must happen first: pure functions of the request's
model, the instances' states, memory and the clock. The fleet (serve/fleet.py) carries the
decisions out: starts, drains and stops, waits; it owns every state change.

Nothing here touches a process, a socket or the event loop: tests feed tables of states in and
read decisions out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Decision", "Gpu", "Limits", "Seen", "expired", "route"]

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
    gpu: int | None = None  # the GPU llamactl placed it on; None: not placed by llamactl


@dataclass(frozen=True)
class Gpu:
    """One GPU as placement sees it: its memory free for a new model now (measured, less what
    the instances still loading on it are about to take)."""

    index: int
    free_bytes: int
    total_bytes: int = 0  # 0: unknown


@dataclass(frozen=True)
class Limits:
    """The bounds of the whole serve."""

    models_max: int = 4  # loaded models at once; 0: no limit by count
    free_bytes: int | None = None  # memory free for new models now; None: unknown
    exclusive_groups: frozenset[str] = frozenset()
    autoload: bool = True
    #: Per-GPU placement (a CUDA build): each placeable model goes on one GPU that fits it;
    #: empty: off, and free_bytes (then the sum over the GPUs) decides alone.
    gpus: tuple[Gpu, ...] = ()


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
    gpu: int | None = None  # load it on this GPU (its --device); None: where llama.cpp puts it
    free_bytes: int | None = None  # what its GPU has free once the evictions are done


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def size(n: int) -> str:
    """Bytes for people: GiB with one decimal from 1 GiB on, else MiB."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else _mib(n)


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
    placeable: bool = True,
    protected: frozenset[str] = frozenset(),
    turn: bool = True,
) -> Decision:
    """The decision for one request for `model` (already resolved from names and aliases).
    `placeable`: llamactl may choose its GPU (the user did not pick devices for it).

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
    gpu: int | None = None
    free: int | None = None
    largest = max((g.total_bytes or g.free_bytes for g in limits.gpus), default=0)
    if limits.gpus and placeable and need_bytes <= largest:
        victims, why, gpu, free = _place(model, need_bytes, groups, everyone, limits, protected)
    else:
        # No GPUs, devices the user chose, or a model larger than any one GPU: llama.cpp
        # splits it over every visible GPU (-sm layer), so their sum decides.
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
    return Decision("load", target, evict=tuple(victims), reason=why, gpu=gpu, free_bytes=free)


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
    found = _exclusive(model, groups, live, limits)
    if isinstance(found, str):
        return None, found
    victims, reasons = found
    evictable = _evictable(model, live, protected)

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


def _exclusive(
    model: str, groups: Sequence[str], live: Sequence[Seen], limits: Limits
) -> tuple[list[Seen], list[str]] | str:
    """The instances that share an exclusive group with `model` (they go first), and why;
    or why it cannot load (such a peer is pinned)."""
    victims: list[Seen] = []
    reasons: list[str] = []
    exclusive = set(groups) & limits.exclusive_groups
    for s in live:
        if s.model != model and exclusive & set(s.groups):
            if s.pinned:
                return f"{s.model!r} is pinned and shares an exclusive group with it"
            victims.append(s)
            reasons.append(f"{s.model} shares the exclusive group {sorted(exclusive)[0]}")
    return victims, reasons


def _evictable(
    model: str, live: Sequence[Seen], protected: frozenset[str] = frozenset()
) -> list[tuple[str, list[Seen]]]:
    """Other models that may be evicted, least recently used first (a model's last use is its
    most recent instance's): never a pinned one, one still loading, one serving a request,
    or one that `protected` requests wait for."""
    by_model: dict[str, list[Seen]] = {}
    for s in live:
        if s.model != model:
            by_model.setdefault(s.model, []).append(s)
    order = sorted(by_model.items(), key=lambda kv: max(s.last_used for s in kv[1]))
    return [
        (m, ss)
        for m, ss in order
        if m not in protected
        and not any(s.pinned for s in ss)
        and all(s.state == "stopping" or (s.state == "ready" and not s.in_flight) for s in ss)
    ]


def _place(
    model: str,
    need: int,
    groups: Sequence[str],
    everyone: Sequence[Seen],
    limits: Limits,
    protected: frozenset[str] = frozenset(),
) -> tuple[list[str] | None, str, int | None, int | None]:
    """The GPU for a new instance of `model` and what to evict first: (victims, why, GPU,
    free on it once they are gone); victims None (and why) when no GPU can take it.

    Each GPU is tried alone: first the least recently used evictable models on that GPU until
    the model fits there (never one on another GPU: that frees nothing here), then, while
    --models-max is exceeded, the least recently used anywhere. The GPU with the fewest
    evictions wins, then the one with the most memory left; with no eviction that is the GPU
    with the most free memory that fits."""
    live = [s for s in everyone if s.state in _LIVE]
    found = _exclusive(model, groups, live, limits)
    if isinstance(found, str):
        return None, found, None, None
    evictable = _evictable(model, live, protected)
    best: tuple[tuple[int, int, int], list[Seen], list[str], Gpu, int] | None = None
    most = (0, limits.gpus[0])  # the most any GPU could free, for the refusal

    def count_after(victims: list[Seen]) -> int:
        gone = {s.model for s in victims}
        return len(({s.model for s in live} - gone) | {model})

    for gpu in limits.gpus:
        victims, reasons = list(found[0]), list(found[1])

        def free_on(victims: list[Seen], gpu: Gpu = gpu) -> int:
            # A stopping instance's memory is on its way back already: measured when it is.
            back = sum(s.bytes for s in victims if s.gpu == gpu.index and s.state != "stopping")
            return gpu.free_bytes + back

        could = free_on(victims + [s for _, ss in evictable for s in ss])
        if could > most[0]:
            most = (could, gpu)
        for m, ss in evictable:
            if need <= free_on(victims):
                break
            if any(v.model == m for v in victims) or not any(s.gpu == gpu.index for s in ss):
                continue
            victims.extend(ss)
            reasons.append(
                f"{m} from GPU{gpu.index} (least recently used) to free memory: need "
                f"{size(need)}, free {size(free_on(victims[: -len(ss)]))}"
            )
        if need > free_on(victims):
            continue
        for m, ss in evictable:
            if limits.models_max <= 0 or count_after(victims) <= limits.models_max:
                break
            if any(v.model == m for v in victims):
                continue
            victims.extend(ss)
            reasons.append(
                f"{m} (least recently used) to stay within --models-max {limits.models_max}"
            )
        if limits.models_max > 0 and count_after(victims) > limits.models_max:
            continue
        free = free_on(victims)
        key = (len({v.model for v in victims}), -free, gpu.index)
        if best is None or key < best[0]:
            best = (key, victims, reasons, gpu, free)
    if best is None:
        if (
            limits.models_max > 0
            and count_after([s for _, ss in evictable for s in ss]) > limits.models_max
        ):
            return (
                None,
                (
                    f"--models-max {limits.models_max} models are loaded and none can be unloaded "
                    "(pinned or still loading)"
                ),
                None,
                None,
            )
        return (
            None,
            (
                f"not enough memory on any GPU: it needs about {size(need)}, and the most one GPU "
                f"could have free is {size(most[0])} (GPU{most[1].index})"
            ),
            None,
            None,
        )
    _, victims, reasons, gpu, free = best
    names = list(dict.fromkeys(v.name for v in victims))
    where = f"GPU{gpu.index}: "
    if names:
        return names, where + "evicting " + "; ".join(reasons), gpu.index, free
    return names, where + f"fits: needs about {size(need)}, {size(free)} free", gpu.index, free


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
