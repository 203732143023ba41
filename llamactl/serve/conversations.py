"""Resumable streams behind a fleet of models: which model, and which of its instances, owns
each conversation, so that `GET /v1/stream?conv_id=`, `DELETE /v1/stream?conv_id=` and
`POST /v1/streams/lookup`, which name no model, reach the llama-server that holds the
conversation's stream session, as router mode routes them (tools/server/server-models.cpp).

A request that carries `X-Conversation-Id` and names a model registers the conversation
before it waits for the model (`remember`, which hands out a ticket); a stop (`DELETE`) while
it waits erases the entry, and the request, once its model is ready, finds its ticket dead and
is answered 400 instead of starting an orphan generation. The instance that takes the request
becomes the owner. The map is best effort, as router mode's: a stale entry makes the
llama-server answer 404 and the client starts again; it is bounded (the oldest entries go
first), where router mode's grows for ever.

`acquire` is the fleet's provider call for such requests; `lookup_answer` its control answer
to `POST /v1/streams/lookup`. `fleet` is a ModelFleet (typed Any: this module is below it)."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any, NamedTuple
from urllib.parse import parse_qs

from llamactl.serve.http import STREAM_PATHS
from llamactl.serve.supervisor import State
from llamactl.serve.upstream import ProxyError, Upstream

__all__ = ["STREAM_PATHS", "Conversations", "acquire", "lookup_answer"]

#: Conversations remembered at most (the oldest are forgotten first).
LIMIT = 4096
#: Router mode's bound on each llama-server's answer to a lookup (STREAM_LOOKUP_TIMEOUT_MS).
LOOKUP_TIMEOUT_S = 0.25
_LOADING = (State.STARTING, State.BACKOFF)


class Owner(NamedTuple):
    model: str
    ticket: int
    #: The instance that took the conversation's request; None while it waits for its model.
    instance: str | None


class Conversations:
    """conversation id -> its owner, with tickets that a stop or a newer request voids."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._owners: OrderedDict[str, Owner] = OrderedDict()
        self._next = 1

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, conv: str, model: str) -> int:
        """Register `conv` as `model`'s (replacing any earlier owner); its ticket."""
        ticket = self._next
        self._next += 1
        self._owners.pop(conv, None)
        self._owners[conv] = Owner(model, ticket, None)
        while len(self._owners) > self.limit:
            self._owners.popitem(last=False)
        return ticket

    def alive(self, conv: str, ticket: int) -> bool:
        """False when a stop erased the entry or a newer request replaced it."""
        owner = self._owners.get(conv)
        return owner is not None and owner.ticket == ticket

    def taken(self, conv: str, ticket: int, instance: str) -> None:
        """The request of `ticket` went to `instance`: it owns the stream session now."""
        owner = self._owners.get(conv)
        if owner is not None and owner.ticket == ticket:
            self._owners[conv] = owner._replace(instance=instance)

    def lookup(self, conv: str) -> Owner | None:
        return self._owners.get(conv)

    def forget(self, conv: str) -> None:
        self._owners.pop(conv, None)


def conv_of_query(url: bytes) -> str:
    """The `conv_id` of a request target (percent-decoded), "" when absent."""
    query = url.partition(b"?")[2].decode("latin-1")
    values = parse_qs(query, keep_blank_values=True).get("conv_id")
    return values[0] if values else ""


def _model_loading(fleet: Any, model: str) -> bool:
    return any(
        i.config.model == model and i.state in _LOADING for i in fleet.supervisor.instances.values()
    )


def _owner_upstream(fleet: Any, owner: Owner | None) -> Upstream | None:
    """A lease on the owning instance when it is ready (no slot needed: a resume reads the
    session's buffer, a stop cancels), else None."""
    if owner is None or owner.instance is None:
        return None
    inst = fleet.supervisor.instances.get(owner.instance)
    if inst is None or inst.state is not State.READY or inst.upstream is None:
        return None
    inst.in_flight += 1
    inst.last_used = fleet._clock()
    return inst.upstream


async def acquire(
    fleet: Any, model: str | None, method: bytes, path: bytes, url: bytes, conv: bytes | None
) -> Upstream:
    """The upstream of a request that carries a conversation (the proxy's call instead of the
    fleet's acquire): a stream route by its conv_id, else by its model, registering the
    conversation."""
    book: Conversations = fleet.conversations
    if path in STREAM_PATHS and model is None:
        if path == b"/v1/streams/lookup":
            return fleet._control_upstream
        conv_id = conv_of_query(url)
        if not conv_id:
            raise ProxyError(400, "Missing conversation id in path", code="missing_conv_id")
        owner = book.lookup(conv_id)
        upstream = _owner_upstream(fleet, owner)
        if method == b"DELETE":
            # Forgetting the entry voids the ticket of a request still waiting for its model:
            # it is answered 400 when the model is ready, and no generation starts.
            book.forget(conv_id)
            return upstream if upstream is not None else fleet._control_upstream
        if upstream is not None:
            return upstream
        if owner is not None and _model_loading(fleet, owner.model):
            raise ProxyError(
                503,
                "Stream owner model is loading, retry later",
                code="model_loading",
                retry_after=1,
            )
        raise ProxyError(404, "Stream not found or expired", "not_found_error", "stream_not_found")
    if conv is None or not conv or fleet._controls(model, method, path):
        return await fleet.acquire(model, method, path)
    conv_id = conv.decode("latin-1")
    decl = fleet.resolve(model)
    ticket = book.remember(conv_id, decl.name)
    upstream = await fleet.acquire(model, method, path)
    if not book.alive(conv_id, ticket):
        fleet.release(upstream, 499)
        raise ProxyError(
            400, "request cancelled by a stop while the model was loading", code="cancelled"
        )
    book.taken(conv_id, ticket, upstream.name)
    return upstream


async def lookup_answer(fleet: Any, body: bytes) -> list[Any]:
    """POST /v1/streams/lookup without a model: each id asked of the instance that owns it
    (one request per instance), the answers put together; ids that map to nothing, and
    instances that do not answer in time, are left out, as router mode does."""
    try:
        ids = json.loads(body or b"{}").get("conversation_ids")
    except (ValueError, AttributeError):
        return []
    per_instance: dict[str, list[str]] = {}
    book: Conversations = fleet.conversations
    for conv_id in ids if isinstance(ids, list) else []:
        if not isinstance(conv_id, str) or not conv_id:
            continue
        owner = book.lookup(conv_id)
        inst = fleet.supervisor.instances.get(owner.instance) if owner and owner.instance else None
        if inst is not None and inst.state is State.READY and inst.upstream is not None:
            per_instance.setdefault(inst.name, []).append(conv_id)

    async def ask(name: str, wanted: list[str]) -> list[Any]:
        up = fleet.supervisor.instances[name].upstream
        status, answer = await fleet._post(
            up.host,
            up.port,
            "/v1/streams/lookup",
            up.auth,
            json.dumps({"conversation_ids": wanted}).encode(),
            LOOKUP_TIMEOUT_S,
        )
        if status != 200:
            return []
        try:
            entries = json.loads(answer)
        except ValueError:
            return []
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    found = await asyncio.gather(*(ask(n, w) for n, w in per_instance.items()))
    return [entry for entries in found for entry in entries]
