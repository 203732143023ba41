"""`llamactl load NAME` and `llamactl unload NAME`: router mode's POST /models/load and
/models/unload on a running serve that routes several models, waiting (bounded) until the
model is loaded or unloaded."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from llamactl.cli import Command
from llamactl.errors import ServerError, UsageError


def _call(serve_id: str | None, api_key: str | None, method: str, path: str, body: Any) -> Any:
    import httpx

    from llamactl.cli.ps import _pick

    rec = _pick(serve_id)
    key = api_key or os.environ.get("LLAMACTL_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.request(
            method, rec.url + path, json=body, headers=headers, timeout=30.0, trust_env=False
        )
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach the serve at {rec.url}: {exc}") from None
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code == 401:
        raise UsageError("the serve needs an API key", hint="pass --api-key or LLAMACTL_API_KEY")
    if resp.status_code >= 400:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        raise ServerError(message or f"{method} {path} answered {resp.status_code}")
    return data


def _state(serve_id: str | None, api_key: str | None, name: str) -> dict[str, Any]:
    data = _call(serve_id, api_key, "GET", "/models", None)
    for model in data.get("data", []):
        if name == model.get("id") or name in model.get("aliases", []):
            return dict(model.get("status") or {})
    raise UsageError(f"the serve has no model {name!r}")


def _wait(serve_id: str | None, api_key: str | None, name: str, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = _state(serve_id, api_key, name)
        if status.get("value") == want:
            return
        if want == "loaded" and status.get("failed"):
            raise ServerError(f"{name} failed to load: {status.get('error', 'see llamactl logs')}")
        if time.monotonic() > deadline:
            raise ServerError(f"{name} is still {status.get('value')} after {timeout:g} s")
        time.sleep(0.2)


_serve_opt = click.option("--serve", "serve_id", help="The serve's id or port (see `llamactl ps`).")
_key_opt = click.option("--api-key", help="The serve's API key (env LLAMACTL_API_KEY).")
_timeout_opt = click.option(
    "--timeout", default=600.0, show_default=True, help="Seconds to wait for it."
)


@click.command(cls=Command)
@click.argument("name")
@_serve_opt
@_key_opt
@_timeout_opt
def load(name: str, serve_id: str | None, api_key: str | None, timeout: float) -> None:
    """Load a model on a running serve that routes several models, and wait until it is."""
    started = time.monotonic()
    _call(serve_id, api_key, "POST", "/models/load", {"model": name})
    _wait(serve_id, api_key, name, "loaded", timeout)
    click.echo(f"{name} loaded in {time.monotonic() - started:.1f} s")


@click.command(cls=Command)
@click.argument("name")
@_serve_opt
@_key_opt
@_timeout_opt
def unload(name: str, serve_id: str | None, api_key: str | None, timeout: float) -> None:
    """Unload a model from a running serve (after its requests in flight end, bounded)."""
    _call(serve_id, api_key, "POST", "/models/unload", {"model": name})
    _wait(serve_id, api_key, name, "unloaded", timeout)
    click.echo(f"{name} unloaded")
