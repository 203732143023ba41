"""`llamactl serve --remote URL ...` (or a config of `[remotes.NAME]` tables) with no local
model: llamactl's proxy in front of remote replicas only (serve/remote.py's RemotePool),
until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from llamactl.serve.remote import PoolPolicy, RemotePool, RemoteSpec

log = logging.getLogger(__name__)


def serve_remote_only(spec: Any, remotes: Sequence[RemoteSpec]) -> int:
    """`llamactl serve --remote URL ...` with no local model: the proxy in front of the remotes
    only, until Ctrl-C or SIGTERM; the exit code."""
    from llamactl.serve import listen
    from llamactl.serve.runner import run

    front = listen.open_spec_front(spec)
    try:
        return int(run(_serve_remote_async(spec, remotes, front)))
    except KeyboardInterrupt:
        return 130
    finally:
        front.close()  # removes a Unix socket's file


async def _serve_remote_async(spec: Any, remotes: Sequence[RemoteSpec], front: Any) -> int:
    import sys

    from llamactl.errors import ServerStartError
    from llamactl.serve import records
    from llamactl.serve.proxy import Proxy, proxy_config
    from llamactl.serve.runner import stop_on_signals

    stop, received = stop_on_signals()
    record = records.serve_record(records.new_id(), spec, front)

    def write_record(pool: RemotePool) -> None:
        record.instances = records.replica_records(pool.replicas)
        try:
            records.write(record)
        except OSError as exc:
            log.warning("cannot write the state record: %s", exc)

    pool = RemotePool(
        remotes,
        PoolPolicy(queue_timeout=spec.queue_timeout),
        on_change=write_record,
    )

    proxy = Proxy(proxy_config(spec), pool)
    write_record(pool)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await proxy.start(front.sockets, ssl=front.tls)
        starting = asyncio.ensure_future(pool.start(wait=spec.start_timeout))
        await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 128 + received[0] if received else 0
        if not pool.is_ready():
            raise ServerStartError(
                f"no remote server answered /health within {spec.start_timeout:g} s:\n"
                + "\n".join(f"  {r.address.base}: {r.last_error or r.state}" for r in pool.replicas)
            )
        ready = [r.address.base for r in pool.replicas if r.healthy]
        print(
            f"llamactl: ready: {len(ready)} of {len(pool.replicas)} remote servers answer "
            f"({', '.join(ready)}); no local model",
            file=sys.stderr,
            flush=True,
        )
        print(front.listening_line(), flush=True)
        await waiter
        return 128 + received[0] if received else 0
    finally:
        waiter.cancel()
        await proxy.close()
        await pool.close()
        records.remove(record.id)


class Mixed:
    """One local model (its supervised llama-server) and remote replicas behind one proxy: a
    request goes to whichever has the most free slots among those that serve its model; the
    front's own answers (/health, /v1/models, /models, /metrics) cover both."""

    def __init__(self, local: Any, pool: RemotePool, local_model: str | None) -> None:
        self.local = local  # the Supervisor, with its one instance "default"
        self.pool = pool
        self.local_model = local_model
        self.local_slots = 1
        self._turn = 0
        pool.extra_models = self._local_entry
        pool.extra_health = self._local_ready

    def _instance(self) -> Any:
        return next(iter(self.local.instances.values()), None)

    def _local_ready(self) -> bool:
        from llamactl.serve.supervisor import State

        inst = self._instance()
        return inst is not None and inst.state is State.READY

    def _local_entry(self) -> dict[str, Any] | None:
        inst = self._instance()
        if inst is None or self.local_model is None:
            return None
        return {
            "url": "local",
            "state": inst.state.value,
            "in_flight": inst.in_flight,
            "total_slots": self.local_slots,
            "model": self.local_model,
        }

    def _serves_locally(self, model: str | None) -> bool:
        return model is None or model == self.local_model

    async def acquire(self, model: str | None, method: bytes = b"GET", path: bytes = b"/") -> Any:
        from llamactl.serve.remote import CONTROL_PATHS, choose

        if path in CONTROL_PATHS and method in (b"GET", b"HEAD"):
            return self.pool.control.upstream
        replica = choose(self.pool.replicas, model, time.monotonic(), turn=self._turn)
        inst = self._instance()
        local_free = -(1 << 30)
        if self._serves_locally(model) and self._local_ready() and inst is not None:
            local_free = self.local_slots - inst.in_flight
        # The remote replica when it has more free slots than the local instance, or when the
        # local one cannot take the request now (not ready, full, another model).
        if replica is not None and (replica.free_slots > local_free or local_free <= 0):
            self._turn += 1
            return self.pool.lease(replica)
        if self._serves_locally(model):
            return await self.local.acquire(model, method, path)
        return await self.pool.acquire(model, method, path)

    def release(self, upstream: Any, outcome: int, elapsed: float = 0.0) -> None:
        if upstream.name in self.pool.names:
            self.pool.release(upstream, outcome, elapsed)
        else:
            self.local.release(upstream, outcome, elapsed)

    def replayable(self, upstream: Any) -> bool:
        if upstream.name in self.pool.names:
            return False
        return bool(self.local.replayable(upstream))

    async def read_local_slots(self) -> None:
        """llama-server's parallel slots (GET /props total_slots), for the balance."""
        import httpx

        inst = self._instance()
        up = inst.upstream if inst is not None else None
        if up is None:
            return
        headers = {"Authorization": up.auth.decode()} if up.auth else {}
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                r = await client.get(f"http://{up.host}:{up.port}/props", headers=headers)
            slots = r.json().get("total_slots") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return
        if isinstance(slots, int) and slots > 0:
            self.local_slots = slots


class MixedFleet:
    """Several local models (serve/fleet.py's ModelFleet) and remote replicas behind one
    proxy: a model declared here goes to its ready local instance while it has a free slot,
    else to a remote replica that lists it and has one, else to the fleet (which loads it or
    waits); a model only remotes list goes to them. Router mode's control answers stay the
    fleet's, with the remotes' models added to /models and /v1/models."""

    def __init__(self, fleet: Any, pool: RemotePool) -> None:
        self.fleet = fleet
        self.pool = pool
        self._turn = 0
        fleet_handler = fleet.control.handler

        async def handler(method: str, path: str, query: str, body: bytes) -> Any:
            reply = await fleet_handler(method, path, query, body)
            if path in ("/models", "/v1/models") and method in ("GET", "HEAD"):
                from llamactl.serve.control import Reply

                local = fleet.models_json()
                known = {m["id"] for m in local["data"]}
                remote = self.pool.models_json()["data"]
                for entry in local["data"]:
                    entry["replicas"] = [
                        {"url": "local", "state": entry["status"]["value"]},
                        *next((r["replicas"] for r in remote if r["id"] == entry["id"]), []),
                    ]
                local["data"] += [r for r in remote if r["id"] not in known]
                return Reply.json(200, local)
            return reply

        fleet.control.handler = handler

    def _local_free(self, name: str) -> bool:
        from llamactl.serve.supervisor import State

        return any(
            i.config.model == name and i.state is State.READY and i.in_flight < i.slots
            for i in self.fleet.supervisor.instances.values()
        )

    async def acquire(self, model: str | None, method: bytes = b"GET", path: bytes = b"/") -> Any:
        from llamactl.serve.fleet import CONTROL_PATHS, CONTROL_UNNAMED
        from llamactl.serve.remote import choose
        from llamactl.serve.upstream import ProxyError

        if path in CONTROL_PATHS or (model is None and path in CONTROL_UNNAMED):
            return await self.fleet.acquire(model, method, path)
        try:
            decl = self.fleet.resolve(model)
        except ProxyError:
            return await self.pool.acquire(model, method, path)
        if not self._local_free(decl.name):
            for name in {decl.name, *decl.aliases, *([model] if model else [])}:
                replica = choose(self.pool.replicas, name, time.monotonic(), turn=self._turn)
                if replica is not None and replica.free_slots > 0:
                    self._turn += 1
                    return self.pool.lease(replica)
        return await self.fleet.acquire(model, method, path)

    async def acquire_conversation(
        self, model: str | None, method: bytes, path: bytes, url: bytes, conv: bytes | None
    ) -> Any:
        """A resumable stream stays with the local models, whose instances own their stream
        sessions (serve/conversations.py): no spill to a remote replica, where a resume could
        not find it. A model that only remote replicas list goes to them, as any request."""
        from llamactl.serve.http import STREAM_PATHS
        from llamactl.serve.upstream import ProxyError

        if not (path in STREAM_PATHS and model is None):
            try:
                self.fleet.resolve(model)
            except ProxyError:
                return await self.pool.acquire(model, method, path)
        return await self.fleet.acquire_conversation(model, method, path, url, conv)

    def release(self, upstream: Any, outcome: int, elapsed: float = 0.0) -> None:
        if upstream.name in self.pool.names:
            self.pool.release(upstream, outcome, elapsed)
        else:
            self.fleet.release(upstream, outcome, elapsed)

    def replayable(self, upstream: Any) -> bool:
        if upstream.name in self.pool.names:
            return False
        return bool(self.fleet.replayable(upstream))
