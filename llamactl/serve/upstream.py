"""The contract between the proxy and whatever provides upstreams (the supervisor): the
`Upstream` a request is sent to (also the lease handed back on release), the provider protocol,
and `ProxyError`, an error the proxy answers itself.

Imports nothing of llamactl: the proxy and the supervisor both depend on it, never on each
other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ERROR_TYPES", "ProxyError", "Upstream", "UpstreamProvider"]


@dataclass(frozen=True)
class Upstream:
    """One llama-server the proxy may send a request to, as leased by `acquire`.

    It is the lease too: `release` gets it back, and its `generation` says which start of the
    instance it came from, so that an outcome reported after a restart is not counted against
    the successor (and pooled connections of an older generation are dropped)."""

    name: str
    host: str
    port: int
    #: Full Authorization header value of the private llama-server key, e.g. b"Bearer abc".
    auth: bytes | None = None
    #: Changes when the instance restarts.
    generation: int = 0
    #: Another replica can take a request this one dropped before its first byte of answer
    #: (a remote server): the proxy then asks for an upstream again, once.
    replicated: bool = False
    #: An ssl.SSLContext for an https upstream (a remote server); None: plain TCP.
    tls: Any = None
    #: The Host header to send instead of the client's (a remote server behind a name-based
    #: TLS front wants its own name).
    host_header: bytes | None = None


class UpstreamProvider(Protocol):
    """What the proxy needs from the supervisor.

    A provider may also offer `acquire_nowait(model, method, path) -> Upstream | None`: the
    lease when it is at hand without waiting, else None (then the proxy awaits `acquire`). The
    proxy calls it first: a ready instance then costs no coroutine per request.

    A provider that routes resumable streams itself (a fleet of models) also offers
    `acquire_conversation(model, method, path, url, conv)`, a coroutine the proxy awaits
    instead of `acquire` for a request with an X-Conversation-Id (`conv`) or on a stream route
    (`/v1/stream`, `/v1/streams/lookup`); the proxy then still sends such a request when its
    client leaves while it waits (serve/conversations.py).

    A provider that can keep the express lane's routes (serve/express.py: the supervisor, a
    fleet) offers `attach_lane(lane)` (it calls `lane.clear()` on any change of state and
    counts `lane.in_flight(name)` where requests under way matter), `express_route(model)`
    (the ready local upstream a slot-free request naming `model` may go to, no lease) and
    `note(upstream, outcome, elapsed)` (an exchange the lane served, counted as `release`
    counts one). The proxy starts the lane only for such a provider."""

    async def acquire(
        self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
    ) -> Upstream:
        """The upstream for a request (`path` without the query); waits while it starts (its
        own bound); raises ProxyError for an answer the proxy gives itself (404, 503, ...)."""
        ...

    def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
        """Called once per acquire with the lease: the upstream's HTTP status, 0 for a
        transport failure, 499 when the client went away before the upstream answered; and
        the seconds since the request was dispatched (for latency metrics)."""
        ...

    def replayable(self, upstream: Upstream) -> bool:
        """Whether a request that got no byte of an answer from `upstream` before its
        connection failed may be sent again (acquired anew): true when the supervisor killed
        that upstream as hung, so the request cannot have been what broke it."""
        ...


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


class ProxyError(Exception):
    """An error the proxy answers itself, in the OpenAI shape {"error": {message, type, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.code = code
        self.retry_after = retry_after
