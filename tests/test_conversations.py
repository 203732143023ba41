"""Resumable streams behind several models (serve/conversations.py): the conversation map with
its tickets, and the fleet's routing of `/v1/stream` and `/v1/streams/lookup` by conversation,
on fake backends and a fake clock, as router mode routes them. No process, no socket."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_fleet import World, decl, drive

from llamactl.serve.control import CONTROL
from llamactl.serve.conversations import Conversations, conv_of_query
from llamactl.serve.upstream import ProxyError, Upstream

pytestmark = pytest.mark.unit

CHAT = b"/v1/chat/completions"


def test_tickets_die_with_a_stop_or_a_newer_request_and_the_map_is_bounded() -> None:
    book = Conversations(limit=3)
    t1 = book.remember("c1", "a")
    assert book.alive("c1", t1) and book.lookup("c1") == ("a", t1, None)
    book.taken("c1", t1, "a#0")
    assert book.lookup("c1") == ("a", t1, "a#0")
    t2 = book.remember("c1", "b")  # the same conversation, now on another model
    assert not book.alive("c1", t1) and book.alive("c1", t2)
    book.taken("c1", t1, "a#0")  # a late report of the replaced request changes nothing
    assert book.lookup("c1") == ("b", t2, None)
    book.forget("c1")
    assert not book.alive("c1", t2) and book.lookup("c1") is None
    book.forget("never")  # idempotent, as a stop is
    for i in range(5):
        book.remember(f"k{i}", "a")
    assert len(book) == 3 and book.lookup("k0") is None and book.lookup("k4") is not None


@pytest.mark.parametrize(
    ("url", "conv"),
    [
        (
            b"/v1/stream?conv_id=conv-stream-test%3A%3Aggml-org%2Ftiny%3AQ8_0&from=0",
            "conv-stream-test::ggml-org/tiny:Q8_0",
        ),
        (b"/v1/stream?from=3&conv_id=abc", "abc"),
        (b"/v1/stream?conv_id=", ""),
        (b"/v1/stream", ""),
    ],
)
def test_conv_id_comes_from_the_query_decoded(url: bytes, conv: str) -> None:
    assert conv_of_query(url) == conv


async def conv_acquire(
    w: World, model: str | None, method: bytes, url: bytes, conv: bytes | None = None
) -> Upstream:
    path = url.partition(b"?")[0]
    task = asyncio.ensure_future(w.fleet.acquire_conversation(model, method, path, url, conv))
    await w.clock.run_until(task.done)
    return task.result()


async def conv_error(
    w: World, model: str | None, method: bytes, url: bytes, conv: bytes | None = None
) -> ProxyError:
    with pytest.raises(ProxyError) as err:
        await conv_acquire(w, model, method, url, conv)
    return err.value


def test_resume_and_stop_reach_the_instance_that_took_the_conversation() -> None:
    async def body(w: World) -> None:
        w.fleet.release(await w.get("a"), 200)
        up = await conv_acquire(w, "b", b"POST", CHAT, b"conv-1")
        assert up.name == "b"
        w.fleet.release(up, 200)
        got = await conv_acquire(w, None, b"GET", b"/v1/stream?conv_id=conv-1&from=0")
        assert got == up and w.sup.instances["b"].in_flight == 1
        w.fleet.release(got, 200)
        stop = await conv_acquire(w, None, b"DELETE", b"/v1/stream?conv_id=conv-1")
        assert stop == up  # the owner's llama-server evicts its session and answers 204
        w.fleet.release(stop, 204)
        err = await conv_error(w, None, b"GET", b"/v1/stream?conv_id=conv-1&from=0")
        assert err.status == 404 and "not found" in err.message
        # A conversation nobody took, and a route without one.
        assert (await conv_error(w, None, b"GET", b"/v1/stream?conv_id=zz")).status == 404
        assert (await conv_error(w, None, b"GET", b"/v1/stream?from=0")).status == 400
        # A stop of an unknown conversation is llamactl's to answer (204, as router mode).
        assert (await conv_acquire(w, None, b"DELETE", b"/v1/stream?conv_id=zz")).name == CONTROL
        reply = await w.fleet.handle_control("DELETE", "/v1/stream", "conv_id=zz", b"")
        assert reply.status == 204 and reply.body == b""
        assert all(i.in_flight == 0 for i in w.sup.instances.values())

    drive(body, [decl("a"), decl("b")], models_max=2)


def test_a_stop_while_the_model_loads_cancels_the_waiting_request() -> None:
    async def body(w: World) -> None:
        w.backends.script.load_time = 5.0
        post = asyncio.ensure_future(
            w.fleet.acquire_conversation("b", b"POST", CHAT, CHAT, b"conv-2")
        )
        await w.clock.run_until(lambda: w.state("b") == "loading")
        err = await conv_error(w, None, b"GET", b"/v1/stream?conv_id=conv-2&from=0")
        assert err.status == 503 and err.retry_after  # the owner loads: retry later
        stop = await conv_acquire(w, None, b"DELETE", b"/v1/stream?conv_id=conv-2")
        assert stop.name == CONTROL  # nothing to forward to: forgotten here
        await w.clock.run_until(post.done)
        cancelled = post.exception()
        assert isinstance(cancelled, ProxyError) and cancelled.status == 400
        assert "cancelled" in cancelled.message
        assert w.state("b") == "loaded" and w.sup.instances["b"].in_flight == 0
        err = await conv_error(w, None, b"GET", b"/v1/stream?conv_id=conv-2&from=0")
        assert err.status == 404

    drive(body, [decl("a"), decl("b")], models_max=2)


def test_requests_without_a_conversation_or_for_unknown_models_keep_their_answers() -> None:
    async def body(w: World) -> None:
        assert (await conv_error(w, "nope", b"POST", CHAT, b"c")).status == 404
        assert len(w.fleet.conversations) == 0  # nothing registered for a refused request
        up = await conv_acquire(w, "a", b"POST", CHAT, None)
        assert up.name == "a" and len(w.fleet.conversations) == 0
        w.fleet.release(up, 200)
        # A named model on a stream route goes to that model, as any GET with ?model=.
        up = await conv_acquire(w, "a", b"GET", b"/v1/stream?conv_id=x&model=a")
        assert up.name == "a"
        w.fleet.release(up, 200)

    drive(body, [decl("a"), decl("b")], models_max=2)


def test_lookup_asks_each_owner_once_for_its_own_ids() -> None:
    async def body(w: World) -> None:
        asked: list[tuple[int, list[str]]] = []

        async def post(
            host: str, port: int, path: str, auth: bytes | None, data: bytes, timeout: float
        ) -> tuple[int, bytes]:
            assert path == "/v1/streams/lookup" and timeout <= 0.25
            ids = json.loads(data)["conversation_ids"]
            asked.append((port, ids))
            return 200, json.dumps([{"conversation_id": i, "port": port} for i in ids]).encode()

        w.fleet._post = post
        for conv, model in (("x", "a"), ("y", "b"), ("z", "a")):
            up = await conv_acquire(w, model, b"POST", CHAT, conv.encode())
            w.fleet.release(up, 200)
        assert (await conv_acquire(w, None, b"POST", b"/v1/streams/lookup")).name == CONTROL
        body_ = json.dumps({"conversation_ids": ["x", "y", "z", "unknown", 7, ""]}).encode()
        reply = await w.fleet.handle_control("POST", "/v1/streams/lookup", "", body_)
        found = json.loads(reply.body)
        assert reply.status == 200
        assert sorted(e["conversation_id"] for e in found) == ["x", "y", "z"]
        assert sorted(len(ids) for _, ids in asked) == [1, 2]  # one request per owner
        bad = await w.fleet.handle_control("POST", "/v1/streams/lookup", "", b"not json")
        assert bad.status == 200 and json.loads(bad.body) == []

    drive(body, [decl("a"), decl("b")], models_max=2)


class FakePool:
    """The remote side of a MixedFleet: lists one model, `remote-only`."""

    def __init__(self) -> None:
        self.names = {"remote"}
        self.replicas: list[object] = []
        self.asked: list[str | None] = []

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        self.asked.append(model)
        if model != "remote-only":
            raise ProxyError(404, f"model {model!r} not found")
        return Upstream("remote", "10.0.0.2", 8080)

    def models_json(self) -> dict[str, list[object]]:
        return {"data": []}


def test_with_remote_replicas_conversations_stay_with_the_local_models() -> None:
    from llamactl.serve.front import MixedFleet

    async def body(w: World) -> None:
        pool = FakePool()
        mixed = MixedFleet(w.fleet, pool)  # type: ignore[arg-type]

        async def conv(model: str | None, method: bytes, url: bytes, c: bytes | None) -> Upstream:
            path = url.partition(b"?")[0]
            task = asyncio.ensure_future(mixed.acquire_conversation(model, method, path, url, c))
            await w.clock.run_until(task.done)
            return task.result()

        up = await conv("a", b"POST", CHAT, b"conv-9")
        assert up.name == "a" and pool.asked == []
        mixed.release(up, 200)
        resumed = await conv(None, b"GET", b"/v1/stream?conv_id=conv-9", None)
        assert resumed == up
        mixed.release(resumed, 200)
        remote = await conv("remote-only", b"POST", CHAT, b"conv-10")
        assert remote.name == "remote" and pool.asked == ["remote-only"]

    drive(body, [decl("a")], models_max=1)
