"""Router mode's control answers of a ModelFleet (serve/fleet.py): GET /models with each
model's state, POST /models/load and /models/unload, GET /props of the router, and /metrics
(llamactl's own series, then each ready instance's, labelled with its model). Apart from the
fleet so that it stays one screenful of decisions and effects; `fleet` is a ModelFleet (typed
Any: this module is below it)."""

from __future__ import annotations

import collections
import json
import time
from typing import Any

from llamactl.serve.control import Reply
from llamactl.serve.conversations import lookup_answer
from llamactl.serve.metrics import label_instance_metrics
from llamactl.serve.supervisor import State
from llamactl.serve.upstream import ProxyError

__all__ = [
    "first_line",
    "handle_control",
    "metrics_text",
    "model_state",
    "models_json",
    "props_json",
]


def first_line(text: str | None) -> str:
    """The first line of an error, for clients and /models (the rest is in the log)."""
    return (text or "unknown reason").splitlines()[0]


def model_state(fleet: Any, name: str) -> str:
    """Router mode's status value of a model: loaded, loading, unloading, unloaded."""
    states = [i.state for i in fleet.supervisor.instances.values() if i.config.model == name]
    for state, value in (
        (State.READY, "loaded"),
        (State.STARTING, "loading"),
        (State.BACKOFF, "loading"),
        (State.STOPPING, "unloading"),
    ):
        if state in states:
            return value
    return "unloaded"


def models_json(fleet: Any) -> dict[str, Any]:
    """Router mode's GET /models (also /v1/models): every model with its state."""
    now = int(time.time())
    data = []
    for decl in fleet.fleet.models:
        instances = [i for i in fleet.supervisor.instances.values() if i.config.model == decl.name]
        status: dict[str, Any] = {
            "value": model_state(fleet, decl.name),
            "args": list(instances[0].config.args) if instances else [],
        }
        failed = [i for i in instances if i.state is State.FAILED]
        if failed and status["value"] == "unloaded":
            status["failed"] = True
            status["exit_code"] = failed[0].last_exit if failed[0].last_exit is not None else 1
            status["error"] = first_line(failed[0].last_error)
        data.append(
            {
                "id": decl.name,
                "aliases": list(decl.aliases),
                "tags": list(decl.groups),
                "object": "model",
                "owned_by": "llamactl",
                "created": now,
                "status": status,
                "pinned": decl.pinned,
                "replicas": decl.replicas,
                "memory_estimate": fleet._need.get(decl.name),
                "instances": [
                    {
                        "name": i.name,
                        "state": i.state.value,
                        "port": i.upstream.port if i.upstream else None,
                        "in_flight": i.in_flight,
                        "restarts": i.restarts,
                        "gpu": i.config.gpu,
                    }
                    for i in instances
                ],
            }
        )
    return {"data": data, "object": "list"}


def props_json(fleet: Any) -> dict[str, Any]:
    """Router mode's GET /props without a model (the web UI reads it)."""
    return {
        "role": "router",
        "max_instances": fleet.fleet.models_max,
        "models_autoload": fleet.fleet.autoload,
        "model_alias": "llamactl",
        "model_path": "none",
        "default_generation_settings": {"params": {}, "n_ctx": 0},
        "build_info": fleet._build_info(),
    }


async def metrics_text(fleet: Any) -> str:
    """llamactl's series, then each ready instance's own, labelled with its model."""
    models = [d.name for d in fleet.fleet.models]
    if fleet._lane is not None:
        fleet._lane.sync()  # the express lane's requests, counted up to now
    restarts: dict[str, int] = collections.Counter()
    in_flight: dict[str, int] = collections.Counter()
    for inst in fleet.supervisor.instances.values():
        model = inst.config.model or inst.name
        restarts[model] += inst.restarts
        in_flight[model] += inst.in_flight + fleet._lane_in_flight(inst.name)
    text = fleet.metrics.render(
        models, {m: model_state(fleet, m) for m in models}, dict(restarts), dict(in_flight)
    )
    seen_meta: set[str] = set()
    lines: list[str] = []
    for inst in list(fleet.supervisor.instances.values()):
        up = inst.upstream
        if inst.state is not State.READY or up is None:
            continue
        status, body = await fleet._fetch(up.host, up.port, "/metrics", up.auth)
        if status == 200:
            lines += label_instance_metrics(
                body.decode(errors="replace"), inst.config.model or inst.name, seen_meta
            )
    if fleet._lane is not None:
        lines += express_series(fleet._lane.stats())
    return text + ("\n".join(lines) + "\n" if lines else "")


def express_series(stats: dict[str, int]) -> list[str]:
    """The express lane's counters (serve/express.py) in Prometheus text."""
    out = []
    for key, kind, text in (
        ("requests", "counter", "Requests the express lane served without Python."),
        ("handed", "counter", "Connections the express lane handed to the Python proxy."),
        ("taken_back", "counter", "Connections the Python proxy handed back to the lane."),
        ("connections", "gauge", "Client connections the express lane holds."),
    ):
        name = f"llamactl_express_{key}" + ("_total" if kind == "counter" else "")
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
    return out


async def handle_control(fleet: Any, method: str, path: str, query: str, body: bytes) -> Reply:
    """The control server's handler."""
    if path in ("/health", "/v1/health"):
        return Reply.json(200, {"status": "ok"})
    if path in ("/models", "/v1/models") and method in ("GET", "HEAD"):
        if any(p.startswith("reload=") and p != "reload=" for p in query.split("&")):
            fleet.reload()
        return Reply.json(200, models_json(fleet))
    if path in ("/models/load", "/models/unload") and method == "POST":
        try:
            name = json.loads(body or b"{}").get("model")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str) or not name:
            raise ProxyError(400, "model name is missing from the request")
        if path == "/models/load":
            fleet.request_load(name)
        else:
            fleet.request_unload(name)
        return Reply.json(200, {"success": True})
    if path == "/props" and method in ("GET", "HEAD"):
        return Reply.json(200, props_json(fleet))
    if path == "/metrics" and method in ("GET", "HEAD"):
        text = await metrics_text(fleet)
        return Reply(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
    if path == "/v1/stream" and method == "DELETE":
        # No instance owned the conversation, or its model still loads (conversations.py has
        # forgotten it, which cancels a request waiting for that load): nothing more to stop.
        return Reply(204, b"", "application/json")
    if path == "/v1/streams/lookup" and method == "POST":
        return Reply.json(200, await lookup_answer(fleet, body))
    raise ProxyError(404, "File Not Found", "not_found_error")
