"""The proxy's pure HTTP rules (serve/http.py): the `model` of a body, public paths, error
answers."""

from __future__ import annotations

import json

import pytest

from llamactl.serve.http import Cors, cors_headers, cors_of, error_response, is_public, model_of
from llamactl.serve.upstream import ProxyError

pytestmark = pytest.mark.unit


def test_model_of_accepts_objects_and_string_models() -> None:
    assert model_of(b'{"model": "smol", "x": [1]}') == "smol"
    assert model_of(b'{"messages": []}') is None
    assert model_of(b'{"model": null}') is None


@pytest.mark.parametrize(
    "body",
    [b"{", b"\xff\xfe{}", b"[1, 2]", b'"text"', b'{"model": 3}', b'{"a": NaN}', b"[" * 100000],
)
def test_model_of_rejects_bad_bodies_with_400(body: bytes) -> None:
    with pytest.raises(ProxyError) as info:
        model_of(body)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"


def test_public_paths_follow_llama_server() -> None:
    assert is_public(b"GET", b"/health")
    assert is_public(b"POST", b"/v1/health")
    assert is_public(b"GET", b"/")
    assert is_public(b"GET", b"/_app/immutable/entry/start.abc.js")
    assert is_public(b"GET", b"/sw.js")
    assert is_public(b"OPTIONS", b"/v1/chat/completions")
    assert not is_public(b"POST", b"/")
    assert not is_public(b"GET", b"/v1/models")
    assert not is_public(b"GET", b"/props")
    assert not is_public(b"GET", b"/slots")
    assert not is_public(b"GET", b"/_app/../slots")
    assert not is_public(b"GET", b"/x/%2e%2e/metrics.js")


def test_error_response_is_openai_shaped_with_retry_after() -> None:
    raw = error_response(ProxyError(429, "too many", code="queue_full", retry_after=3))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nRetry-After: 3" in head
    assert json.loads(body) == {
        "error": {"message": "too many", "type": "rate_limit_error", "code": "queue_full"}
    }


def test_cors_settings_as_llama_server_takes_them() -> None:
    assert cors_of([], {}) == Cors()
    assert cors_of(["--cors-origins", "localhost"], {}).origins == "localhost"
    assert cors_of(["--cors-origins=https://a.example"], {}).origins == "https://a.example"
    assert cors_of([], {"LLAMA_ARG_CORS_ORIGINS": "https://b.example"}).origins == (
        "https://b.example"
    )
    # Server tools or MCP servers without --cors-origins: localhost only (common/arg.cpp).
    assert cors_of(["--tools", "all"], {}).origins == "localhost"
    assert cors_of(["--tools", "all", "--cors-origins", "*"], {}).origins == "*"
    assert cors_of(["--no-cors-credentials"], {}).credentials is False
    assert cors_of(["--cors-methods", "GET"], {}).methods == "GET"


def test_cors_headers_as_llama_server_writes_them() -> None:
    # Default (*, credentials): the Origin echoed.
    assert cors_headers(Cors(), "http://x.example", preflight=False) == [
        ("Access-Control-Allow-Origin", "http://x.example")
    ]
    local = Cors(origins="localhost")
    assert cors_headers(local, "http://[::1]:3000", preflight=False) == [
        ("Access-Control-Allow-Origin", "http://[::1]:3000")
    ]
    assert cors_headers(local, "http://localhost.evil.com", preflight=False) == []
    listed = Cors(origins="https://a.example,https://b.example", credentials=False)
    assert dict(cors_headers(listed, "https://c.example", preflight=True)) == {
        "Access-Control-Allow-Origin": "https://a.example,https://b.example",
        "Access-Control-Allow-Credentials": "false",
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "*",
    }
