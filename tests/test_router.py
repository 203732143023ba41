"""router.route() and router.expired(): tables of instance states in, decisions out, on a
given clock. No process, no loop."""

from __future__ import annotations

from typing import Any

import pytest

from llamactl.serve.router import FAILED_COOLDOWN_S, Gpu, Limits, Seen, expired, route

pytestmark = pytest.mark.unit

MIB = 1 << 20
NOW = 1000.0


def decide(model: str, seen: list[Seen], limits: Limits | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "replicas": 1,
        "need_bytes": 100 * MIB,
        "pinned": False,
        "groups": (),
        "instances": seen,
        "limits": limits or Limits(models_max=2),
        "now": NOW,
    }
    args.update(kw)
    return route(model, **args)


def test_a_ready_model_with_a_free_slot_is_used() -> None:
    d = decide("a", [Seen("a", "a", "ready", in_flight=1, slots=4)])
    assert (d.action, d.instance) == ("use", "a")


def test_an_unloaded_model_is_loaded_when_it_fits() -> None:
    d = decide("b", [Seen("a", "a", "ready")])
    assert (d.action, d.instance, d.evict) == ("load", "b", ())


def test_a_loading_model_is_waited_for_one_start_for_all() -> None:
    d = decide("a", [Seen("a", "a", "starting")])
    assert (d.action, d.instance) == ("wait", "a")
    assert decide("a", [Seen("a", "a", "backoff")]).action == "wait"


@pytest.mark.parametrize(
    ("seen", "evicted"),
    [
        # least recently used first
        ([Seen("a", "a", "ready", last_used=5), Seen("b", "b", "ready", last_used=9)], ("a",)),
        ([Seen("a", "a", "ready", last_used=9), Seen("b", "b", "ready", last_used=5)], ("b",)),
        # never a pinned one
        (
            [
                Seen("a", "a", "ready", last_used=1, pinned=True),
                Seen("b", "b", "ready", last_used=9),
            ],
            ("b",),
        ),
        # one still loading cannot be evicted: the other goes
        ([Seen("a", "a", "starting"), Seen("b", "b", "ready", last_used=9)], ("b",)),
        # a stopped one holds nothing
        ([Seen("a", "a", "stopped"), Seen("b", "b", "ready")], ()),
    ],
)
def test_eviction_by_count_is_lru_and_spares_pinned_and_loading(
    seen: list[Seen], evicted: tuple[str, ...]
) -> None:
    d = decide("c", seen)
    assert d.action == "load" and d.evict == evicted, d


def test_a_model_serving_a_request_is_never_evicted_an_idle_one_goes_instead() -> None:
    # Router mode's scheduler (upstream's test_router_queue_does_not_evict_busy_model).
    seen = [Seen("a", "a", "ready", in_flight=2, last_used=1), Seen("b", "b", "ready", last_used=9)]
    d = decide("c", seen)
    assert d.evict == ("b",)


def test_when_every_model_in_the_way_is_busy_the_newcomer_waits() -> None:
    seen = [Seen("a", "a", "ready", in_flight=1, last_used=1), Seen("b", "b", "ready", 2)]
    d = decide("c", seen)
    assert (d.action, d.instance, d.evict) == ("wait", None, ()), d


def test_a_model_that_requests_wait_for_is_not_evicted() -> None:
    seen = [Seen("a", "a", "ready", last_used=1), Seen("b", "b", "ready", last_used=9)]
    assert decide("c", seen, protected=frozenset({"a"})).evict == ("b",)
    assert decide("c", seen, protected=frozenset({"a", "b"})).action == "reject"


def test_loads_go_in_arrival_order() -> None:
    # Not its turn: it waits even with room, behind an earlier request for another model.
    d = decide("c", [], turn=False)
    assert (d.action, d.instance) == ("wait", None) and "queued" in d.reason
    # A loaded model is used whatever the line.
    assert decide("a", [Seen("a", "a", "ready")], turn=False).action == "use"


def test_a_model_still_loading_or_unloading_in_the_way_means_wait() -> None:
    seen = [Seen("a", "a", "starting"), Seen("b", "b", "backoff")]
    d = decide("c", seen)
    assert (d.action, d.instance) == ("wait", None) and "settle" in d.reason


def test_nothing_evictable_is_a_503_with_the_reason() -> None:
    seen = [Seen("a", "a", "ready", pinned=True), Seen("b", "b", "ready", pinned=True)]
    d = decide("c", seen)
    assert (d.action, d.status) == ("reject", 503) and d.retry_after
    assert "--models-max 2" in d.message


def test_memory_evicts_as_many_as_needed_lru_first() -> None:
    seen = [
        Seen("a", "a", "ready", last_used=1, bytes=300 * MIB),
        Seen("b", "b", "ready", last_used=2, bytes=300 * MIB),
        Seen("c", "c", "ready", last_used=3, bytes=300 * MIB),
    ]
    limits = Limits(models_max=0, free_bytes=100 * MIB)
    d = decide("d", seen, limits, need_bytes=650 * MIB)
    assert d.action == "load" and d.evict == ("a", "b"), d
    assert "free memory" in d.reason


def test_memory_that_cannot_be_freed_is_refused() -> None:
    limits = Limits(models_max=0, free_bytes=100 * MIB)
    d = decide("b", [Seen("a", "a", "ready", pinned=True, bytes=MIB)], limits, need_bytes=GIB)
    assert (d.action, d.status) == ("reject", 503) and "not enough memory" in d.message


GIB = 1 << 30


def test_unknown_memory_decides_by_count_only() -> None:
    d = decide("b", [Seen("a", "a", "ready")], Limits(models_max=0), need_bytes=100 * GIB)
    assert (d.action, d.evict) == ("load", ())


def test_exclusive_group_peers_are_evicted() -> None:
    seen = [Seen("a", "a", "ready", groups=("gpu",)), Seen("b", "b", "ready")]
    limits = Limits(models_max=0, exclusive_groups=frozenset({"gpu"}))
    d = decide("c", seen, limits, groups=("gpu",))
    assert d.evict == ("a",) and "exclusive" in d.reason
    # not exclusive: nothing to evict
    assert decide("c", seen, Limits(models_max=0), groups=("gpu",)).evict == ()


def test_replicas_spread_by_free_slots_then_start_another_then_429() -> None:
    one = [Seen("a", "a", "ready", in_flight=1, slots=1)]
    d = decide("a", one, replicas=2)
    assert (d.action, d.instance) == ("load", "a#2")
    two = [*one, Seen("a#2", "a", "ready", in_flight=0, slots=1)]
    assert decide("a", two, replicas=2).instance == "a#2"
    # Every slot busy: to the least loaded, queued upstream, until the queue limit.
    busy = [Seen("a", "a", "ready", in_flight=2, slots=1), Seen("a#2", "a", "ready", 1, slots=1)]
    d = decide("a", busy, replicas=2, queue_limit=2)
    assert (d.action, d.instance) == ("use", "a#2")
    fuller = [busy[0], Seen("a#2", "a", "ready", in_flight=2, slots=1)]
    full = decide("a", fuller, replicas=2, queue_limit=2)
    assert (full.action, full.status, full.retry_after) == ("reject", 429, 1)
    # waiting for a load counts too
    assert decide("a", busy, replicas=2, queued=1, queue_limit=2).status == 429


def test_a_failed_load_is_refused_for_a_moment_then_tried_again() -> None:
    failed = [Seen("a", "a", "failed", failed_at=NOW - 1)]
    d = decide("a", failed)
    assert (d.action, d.status, d.code) == ("reject", 503, "model_failed")
    later = [Seen("a", "a", "failed", failed_at=NOW - FAILED_COOLDOWN_S - 1)]
    assert decide("a", later).action == "load"


def test_no_autoload_refuses_an_unloaded_model() -> None:
    d = decide("a", [], Limits(autoload=False))
    assert (d.action, d.status, d.code) == ("reject", 400, "model_not_loaded")
    assert decide("a", [Seen("a", "a", "ready")], Limits(autoload=False)).action == "use"


def test_idle_ttl_expiry_only_for_idle_ready_instances() -> None:
    seen = [
        Seen("a", "a", "ready", last_used=NOW - 61),
        Seen("b", "b", "ready", last_used=NOW - 61, in_flight=1),
        Seen("c", "c", "ready", last_used=NOW - 10),
        Seen("d", "d", "starting", last_used=0),
        Seen("e", "e", "ready", last_used=0),  # no TTL
    ]
    ttl = {"a": 60.0, "b": 60.0, "c": 60.0, "d": 60.0}
    assert [s.name for s in expired(seen, ttl, NOW)] == ["a"]


# -- per-GPU placement: each placeable model on one GPU that fits it ------------------------

GIB = 1 << 30


def gpus(*free_gib: float) -> Limits:
    return Limits(
        models_max=0,
        gpus=tuple(Gpu(i, int(f * GIB), 24 * GIB) for i, f in enumerate(free_gib)),
    )


@pytest.mark.parametrize(
    ("seen", "limits", "need_gib", "gpu", "evicted"),
    [
        # the GPU with the most free memory that fits
        ([], gpus(10, 20), 5, 1, ()),
        ([], gpus(20, 10), 5, 0, ()),
        # fits on one without evicting: no eviction on the other
        ([Seen("a", "a", "ready", bytes=8 * GIB, gpu=0)], gpus(2, 6), 5, 1, ()),
        # fits nowhere: the LRU model on the GPU where it then fits goes, not one elsewhere
        (
            [
                Seen("a", "a", "ready", bytes=8 * GIB, gpu=0, last_used=1),
                Seen("b", "b", "ready", bytes=8 * GIB, gpu=1, last_used=9),
            ],
            gpus(2, 2),
            5,
            0,
            ("a",),
        ),
        # the older model is pinned: evict on the other GPU
        (
            [
                Seen("a", "a", "ready", bytes=8 * GIB, gpu=0, last_used=1, pinned=True),
                Seen("b", "b", "ready", bytes=8 * GIB, gpu=1, last_used=9),
            ],
            gpus(2, 2),
            5,
            1,
            ("b",),
        ),
        # one still loading on a GPU is never evicted
        (
            [
                Seen("a", "a", "starting", bytes=8 * GIB, gpu=0, last_used=1),
                Seen("b", "b", "ready", bytes=8 * GIB, gpu=1, last_used=9),
            ],
            gpus(2, 2),
            5,
            1,
            ("b",),
        ),
        # fewest evictions wins: one big model on GPU1 rather than two small ones on GPU0
        (
            [
                Seen("a", "a", "ready", bytes=3 * GIB, gpu=0, last_used=1),
                Seen("b", "b", "ready", bytes=3 * GIB, gpu=0, last_used=2),
                Seen("c", "c", "ready", bytes=9 * GIB, gpu=1, last_used=5),
            ],
            gpus(1, 1),
            6,
            1,
            ("c",),
        ),
    ],
)
def test_placement_chooses_a_gpu_and_evicts_only_there(
    seen: list[Seen], limits: Limits, need_gib: float, gpu: int, evicted: tuple[str, ...]
) -> None:
    d = decide("new", seen, limits, need_bytes=int(need_gib * GIB))
    assert (d.action, d.gpu, d.evict) == ("load", gpu, evicted), d
    assert d.reason.startswith(f"GPU{gpu}: ")
    assert d.free_bytes is not None and d.free_bytes >= need_gib * GIB


def test_placement_within_models_max_evicts_on_the_chosen_gpu_first() -> None:
    seen = [
        Seen("a", "a", "ready", bytes=8 * GIB, gpu=0, last_used=1),
        Seen("b", "b", "ready", bytes=8 * GIB, gpu=1, last_used=9),
    ]
    # Memory is short on both GPUs and one model must go anyway (--models-max 2): the one
    # whose memory makes room is the LRU on the GPU chosen, and it also makes the count.
    limits = Limits(models_max=2, gpus=(Gpu(0, 2 * GIB, 24 * GIB), Gpu(1, 2 * GIB, 24 * GIB)))
    d = decide("new", seen, limits, need_bytes=5 * GIB)
    assert (d.gpu, d.evict) == (0, ("a",))
    # Room on GPU1 without eviction, but --models-max 2 still takes the LRU model, from GPU0;
    # GPU1 keeps the most room after that (12 GiB against 2 + 8).
    limits = Limits(models_max=2, gpus=(Gpu(0, 2 * GIB, 24 * GIB), Gpu(1, 12 * GIB, 24 * GIB)))
    d = decide("new", seen, limits, need_bytes=5 * GIB)
    assert (d.gpu, d.evict) == (1, ("a",))
    assert "--models-max 2" in d.reason
    # With 9 GiB on GPU1, evicting a leaves GPU0 with more (10 GiB): it goes there.
    limits = Limits(models_max=2, gpus=(Gpu(0, 2 * GIB, 24 * GIB), Gpu(1, 9 * GIB, 24 * GIB)))
    assert decide("new", seen, limits, need_bytes=5 * GIB).gpu == 0


def test_no_gpu_can_take_it_names_the_most_one_could_free() -> None:
    seen = [Seen("a", "a", "ready", bytes=4 * GIB, gpu=1, pinned=True)]
    d = decide("new", seen, gpus(3, 5), need_bytes=12 * GIB)
    assert (d.action, d.status, d.code) == ("reject", 503, "no_room")
    assert "not enough memory on any GPU" in d.message and "5.0 GiB (GPU1)" in d.message


def test_a_model_the_user_placed_or_too_big_for_one_gpu_is_decided_by_the_sum() -> None:
    # --device given (placeable False): no GPU chosen, the sum of free memory decides.
    limits = Limits(models_max=0, free_bytes=30 * GIB, gpus=gpus(15, 15).gpus)
    d = decide("new", [], limits, need_bytes=5 * GIB, placeable=False)
    assert (d.action, d.gpu) == ("load", None)
    # Larger than any one GPU: llama.cpp splits it over all of them.
    d = decide("new", [], limits, need_bytes=28 * GIB)
    assert (d.action, d.gpu) == ("load", None)
    assert decide("new", [], limits, need_bytes=40 * GIB).action == "reject"


def test_without_gpus_nothing_is_placed() -> None:
    d = decide("b", [Seen("a", "a", "ready")], Limits(models_max=2, free_bytes=GIB))
    assert (d.action, d.gpu) == ("load", None)
