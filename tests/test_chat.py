"""`llamactl chat`: the SSE parser, the client's errors, the slash commands, one-shot output,
the interactive mode through a pseudo-terminal, and (marked real) the real llama-server."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner

from llamactl import proc
from llamactl.chat import client as chat_client
from llamactl.chat import session as chat
from llamactl.chat.client import ChatClient, Message, Reply, ReplyStream, Settings
from llamactl.chat.session import ChatSession, ChatSpec, PlainOutput
from llamactl.chat.sse import SSEDecoder, SSEEvent
from llamactl.cli import cli
from llamactl.errors import ServerError, ServerStartError, UsageError

URL = "http://llama.test"
COMPLETIONS = f"{URL}/v1/chat/completions"
MODELS = f"{URL}/v1/models"
ESC = "\x1b["
TIMINGS = {
    "prompt_n": 12,
    "prompt_ms": 30.0,
    "predicted_n": 42,
    "predicted_ms": 350.0,
    "predicted_per_second": 120.0,
}


# --- helpers --------------------------------------------------------------------------------


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """One OpenAI chat.completion.chunk, shaped like llama-server's."""
    delta = {"content": content} if content is not None else {}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def sse(*objs: Any, done: bool = True) -> bytes:
    """A text/event-stream body."""
    parts = [f"data: {json.dumps(o, ensure_ascii=False)}\n\n" for o in objs]
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def reply_body(*pieces: str) -> bytes:
    return sse(*(chunk(p) for p in pieces), chunk(finish="stop", timings=TIMINGS))


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


def stream_response(chunks: list[bytes] | Iterator[bytes]) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "timings": TIMINGS,
    }


def sent(route: respx.Route, i: int = -1) -> dict[str, Any]:
    return json.loads(route.calls[i].request.content)


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    """A mocked OpenAI server at URL that lists one model."""
    with respx.mock(assert_all_called=False) as router:
        router.get(MODELS).respond(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        yield router


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session(out: io.StringIO, err: io.StringIO, **settings: Any) -> ChatSession:
    client = ChatClient(URL)
    return ChatSession(client, PlainOutput(out, err), Settings(model="fake-model", **settings))


# --- SSE parsing ----------------------------------------------------------------------------

TRICKY = "Ça va? 日本語 🦙 naïve"


@pytest.mark.unit
def test_sse_events_survive_any_chunking_including_split_utf8() -> None:
    body = (
        ": ping\r\n\r\n"
        f"data: {json.dumps({'t': TRICKY}, ensure_ascii=False)}\r\n\r\n"
        "event: error\ndata: line one\ndata: line two\n\n"
        "data: [DONE]\n\n"
    ).encode()
    expected = [
        SSEEvent("message", json.dumps({"t": TRICKY}, ensure_ascii=False)),
        SSEEvent("error", "line one\nline two"),
        SSEEvent("message", "[DONE]"),
    ]
    for size in (1, 2, 3, 5, 7, len(body)):
        decoder = SSEDecoder()
        events = [e for part in split_every(body, size) for e in decoder.feed(part)]
        assert events + decoder.close() == expected, f"chunk size {size}"


@pytest.mark.unit
def test_sse_cr_lf_split_across_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\ndata: b\n\n") == [SSEEvent("message", "a"), SSEEvent("message", "b")]


@pytest.mark.unit
def test_sse_last_event_without_blank_line_is_kept_at_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.close() == [SSEEvent("message", "[DONE]")]


@pytest.mark.unit
def test_sse_old_llama_server_error_field_becomes_error_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'error: {"message": "boom"}\n\n') == [
        SSEEvent("error", '{"message": "boom"}')
    ]


# --- the client against mocked streams ------------------------------------------------------


@pytest.mark.unit
def test_stream_split_utf8_gives_exact_text_and_stats(api: respx.MockRouter) -> None:
    body = reply_body("Ça ", "va? ", "日本語 ", "🦙")
    api.post(COMPLETIONS).mock(return_value=stream_response(split_every(body, 3)))
    stream = ChatClient(URL).stream([Message("user", "hi")], Settings())
    assert "".join(stream) == "Ça va? 日本語 🦙"
    reply = stream.result()
    assert reply.finish_reason == "stop"
    assert reply.timings is not None and reply.timings.predicted_n == 42
    line = chat.stats_line(reply)
    assert line.startswith("42 tokens · 120.0 tokens/s · first token ")


@pytest.mark.unit
def test_stream_stops_reading_at_done(api: respx.MockRouter) -> None:
    body = sse(chunk("yes")) + sse(chunk(" and more"), done=False)
    api.post(COMPLETIONS).mock(return_value=stream_response([body]))
    assert "".join(ChatClient(URL).stream([Message("user", "hi")], Settings())) == "yes"


@pytest.mark.unit
def test_stream_error_event_is_a_server_error_with_its_message(api: respx.MockRouter) -> None:
    err = {"error": {"code": 500, "message": "model crashed", "type": "server_error"}}
    api.post(COMPLETIONS).mock(return_value=stream_response([sse(chunk("Par"), err, done=False)]))
    stream = ChatClient(URL).stream([Message("user", "hi")], Settings())
    with pytest.raises(ServerError, match="model crashed"):
        list(stream)
    assert stream.text == "Par"


@pytest.mark.unit
def test_stream_ending_without_done_or_finish_is_a_cut(api: respx.MockRouter) -> None:
    api.post(COMPLETIONS).mock(return_value=stream_response([sse(chunk("Par"), done=False)]))
    with pytest.raises(ServerError, match="closed the stream mid-reply after 3 characters"):
        list(ChatClient(URL).stream([Message("user", "hi")], Settings()))


@pytest.mark.unit
def test_stream_broken_connection_is_a_cut(api: respx.MockRouter) -> None:
    def broken() -> Iterator[bytes]:
        yield sse(chunk("Par"), done=False)
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    api.post(COMPLETIONS).mock(return_value=stream_response(broken()))
    with pytest.raises(ServerError, match=r"mid-reply.*RemoteProtocolError"):
        list(ChatClient(URL).stream([Message("user", "hi")], Settings()))


@pytest.mark.unit
def test_stream_finish_reason_without_done_is_complete(api: respx.MockRouter) -> None:
    api.post(COMPLETIONS).mock(
        return_value=stream_response([sse(chunk("ok"), chunk(finish="length"), done=False)])
    )
    stream = ChatClient(URL).stream([Message("user", "hi")], Settings())
    assert "".join(stream) == "ok"
    assert stream.result().finish_reason == "length"


@pytest.mark.unit
def test_401_says_the_key_was_refused_and_the_key_is_sent(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).respond(
        401,
        json={"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}},
    )
    with pytest.raises(ServerError, match="refused the request: Invalid API Key") as info:
        list(ChatClient(URL, api_key="sekrit").stream([Message("user", "hi")], Settings()))
    assert "--api-key" in info.value.format_message()
    assert route.calls[0].request.headers["authorization"] == "Bearer sekrit"


@pytest.mark.unit
def test_context_overflow_is_one_clear_line(api: respx.MockRouter) -> None:
    api.post(COMPLETIONS).respond(
        400,
        json={
            "error": {
                "code": 400,
                "message": "request (9000 tokens) exceeds the available context size (8192 tokens)",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 9000,
                "n_ctx": 8192,
            }
        },
    )
    with pytest.raises(ServerError) as info:
        list(ChatClient(URL).stream([Message("user", "hi")], Settings()))
    assert info.value.message == (
        "the conversation no longer fits in the model's context (9000 tokens, context size 8192)"
    )


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"error": {"message": "The model `nope` does not exist"}}, "has no model 'nope'"),
        (400, {"error": {"message": "model 'nope' not found"}}, "has no model 'nope'"),
        (404, {"error": 'model "nope" not found, try pulling it first'}, "has no model 'nope'"),
        (404, "File Not Found", "no OpenAI chat endpoint"),
        (500, {"error": {"message": "boom"}}, "answered HTTP 500: boom"),
    ],
)
@pytest.mark.unit
def test_error_bodies(status: int, body: Any, expected: str) -> None:
    model = "nope" if "nope" in str(body) else None
    assert expected in chat_client.error_from_body(status, body, url=URL, model=model).message


@pytest.mark.fake
def test_connection_refused_is_one_clear_line() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ServerError, match=f"cannot reach a server at {url}: connection refused"):
        list(ChatClient(url).stream([Message("user", "hi")], Settings()))


@pytest.mark.unit
def test_non_streaming_answer_to_a_stream_request_is_accepted(api: respx.MockRouter) -> None:
    api.post(COMPLETIONS).respond(200, json=completion("whole"))
    assert "".join(ChatClient(URL).stream([Message("user", "hi")], Settings())) == "whole"


@pytest.mark.unit
def test_request_body_carries_only_set_options() -> None:
    body = chat_client.build_request(
        [Message("system", "be brief"), Message("user", "hi")],
        Settings(model="m", temperature=0.0, max_tokens=8),
        stream=True,
    )
    assert body == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "stream": True,
        "model": "m",
        "temperature": 0.0,
        "max_tokens": 8,
    }


@pytest.mark.unit
def test_api_base_and_key_resolution() -> None:
    assert chat_client.api_base("http://h:1/") == "http://h:1/v1"
    assert chat_client.api_base("http://h:1/v1") == "http://h:1/v1"
    with pytest.raises(UsageError):
        chat_client.api_base("h:1")
    env = {"OPENAI_API_KEY": "o", "LLAMACTL_API_KEY": "l"}
    assert chat_client.resolve_api_key("given", env) == "given"
    assert chat_client.resolve_api_key(None, env) == "l"
    assert chat_client.resolve_api_key(None, {"OPENAI_API_KEY": "o"}) == "o"
    assert chat_client.resolve_api_key(None, {}) is None


# --- conversation and slash commands --------------------------------------------------------


@pytest.mark.unit
def test_a_turn_streams_keeps_history_and_prints_stats(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(
        side_effect=[
            stream_response([reply_body("Paris.")]),
            stream_response([reply_body("Lyon.")]),
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    s = session(out, err)
    assert s.handle("Capital of France?")
    assert s.handle("And the second city?")
    assert out.getvalue() == "Paris.\nLyon.\n"
    assert "42 tokens · 120.0 tokens/s" in err.getvalue()
    assert [m["role"] for m in sent(route)["messages"]] == ["user", "assistant", "user"]


@pytest.mark.unit
def test_help_and_unknown_command_list_every_command() -> None:
    out, err = io.StringIO(), io.StringIO()
    s = session(out, err)
    s.handle("/help")
    s.handle("/frobnicate")
    for name in (
        "/help",
        "/system",
        "/model",
        "/clear",
        "/retry",
        "/save",
        "/load",
        "/set",
        "/bye",
    ):
        assert name in out.getvalue()
        assert name in err.getvalue()
    assert "unknown command /frobnicate" in err.getvalue()


@pytest.mark.unit
def test_bye_leaves() -> None:
    assert session(io.StringIO(), io.StringIO()).handle("/bye") is False


@pytest.mark.unit
def test_system_sets_the_first_message(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(return_value=stream_response([reply_body("ok")]))
    out = io.StringIO()
    s = session(out, io.StringIO())
    s.handle("/system You answer in French.")
    s.handle("/system")
    s.handle("hi")
    assert "system prompt: You answer in French." in out.getvalue()
    assert sent(route)["messages"][0] == {"role": "system", "content": "You answer in French."}


@pytest.mark.unit
def test_model_lists_then_switches(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(return_value=stream_response([reply_body("ok")]))
    out = io.StringIO()
    s = session(out, io.StringIO())
    s.handle("/model")
    assert "* fake-model" in out.getvalue()
    s.handle("/model other")
    s.handle("hi")
    assert sent(route)["model"] == "other"


@pytest.mark.unit
def test_clear_forgets_turns_but_keeps_system(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(
        side_effect=[stream_response([reply_body("a")]), stream_response([reply_body("b")])]
    )
    s = session(io.StringIO(), io.StringIO())
    s.handle("/system sys")
    s.handle("one")
    s.handle("/clear")
    s.handle("two")
    assert [m["content"] for m in sent(route)["messages"]] == ["sys", "two"]


@pytest.mark.unit
def test_retry_resends_the_last_question(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(
        side_effect=[stream_response([reply_body("bad")]), stream_response([reply_body("good")])]
    )
    out = io.StringIO()
    s = session(out, io.StringIO())
    s.handle("q")
    s.handle("/retry")
    assert (
        sent(route, 0)["messages"]
        == sent(route, 1)["messages"]
        == [{"role": "user", "content": "q"}]
    )
    assert s.conversation.turns == [Message("user", "q"), Message("assistant", "good")]


@pytest.mark.unit
def test_retry_with_nothing_says_so() -> None:
    err = io.StringIO()
    session(io.StringIO(), err).handle("/retry")
    assert "nothing to retry" in err.getvalue()


@pytest.mark.unit
def test_save_then_load_round_trips(api: respx.MockRouter, tmp_path: Path) -> None:
    api.post(COMPLETIONS).mock(return_value=stream_response([reply_body("Paris.")]))
    out = io.StringIO()
    s = session(out, io.StringIO())
    s.handle("/system brief")
    s.handle("Capital of France?")
    target = tmp_path / "conv.json"
    s.handle(f"/save {target}")
    saved = json.loads(target.read_text())
    assert saved["messages"] == [
        {"role": "system", "content": "brief"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    fresh = session(out, io.StringIO())
    fresh.handle(f"/load {target}")
    assert fresh.conversation == s.conversation
    assert "loaded 3 messages" in out.getvalue()


@pytest.mark.unit
def test_load_rejects_a_bad_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "wizard", "content": "x"}]')
    err = io.StringIO()
    s = session(io.StringIO(), err)
    s.handle(f"/load {bad}")
    s.handle(f"/load {tmp_path / 'missing.json'}")
    assert "message 1 needs a role" in err.getvalue()
    assert "cannot read" in err.getvalue()


@pytest.mark.unit
def test_set_changes_the_request_and_checks_values(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(return_value=stream_response([reply_body("ok")]))
    err = io.StringIO()
    s = session(io.StringIO(), err)
    s.handle("/set temperature 0.2")
    s.handle("/set top_p 0.9")
    s.handle("/set max_tokens 16")
    s.handle("/set max_tokens -3")
    s.handle("/set top_p 2")
    s.handle("/set seed 1")
    s.handle("hi")
    body = sent(route)
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.9, 16)
    assert "max_tokens must be a positive integer" in err.getvalue()
    assert "top_p must be above 0" in err.getvalue()
    assert "/set knows temperature, top_p, max_tokens" in err.getvalue()


@pytest.mark.unit
def test_error_in_a_turn_is_one_line_and_the_chat_goes_on(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(
        side_effect=[
            httpx.Response(
                400, json={"error": {"message": "x", "type": "exceed_context_size_error"}}
            ),
            stream_response([reply_body("ok")]),
        ]
    )
    err = io.StringIO()
    s = session(io.StringIO(), err)
    assert s.handle("too long")
    assert err.getvalue().startswith("error: the conversation no longer fits")
    assert "Traceback" not in err.getvalue()
    s.handle("shorter")
    # The failed question is replaced, so roles still alternate.
    assert sent(route)["messages"] == [{"role": "user", "content": "shorter"}]


class _InterruptingOutput(PlainOutput):
    """Shows two pieces, then behaves as if Ctrl-C arrived."""

    def reply(self, stream: ReplyStream) -> Reply:
        pieces = iter(stream)
        next(pieces), next(pieces)
        raise KeyboardInterrupt


@pytest.mark.unit
def test_ctrl_c_during_a_reply_keeps_the_partial_and_closes_the_stream(
    api: respx.MockRouter,
) -> None:
    api.post(COMPLETIONS).mock(return_value=stream_response([reply_body("Par", "is", " is")]))
    out = io.StringIO()
    s = ChatSession(ChatClient(URL), _InterruptingOutput(out, io.StringIO()), Settings())
    s.handle("q")
    assert "[interrupted]" in out.getvalue()
    assert s.conversation.turns[-1] == Message("assistant", "Paris")


@pytest.mark.unit
def test_read_message_joins_triple_quoted_lines() -> None:
    lines = iter(['"""', "first", "", "second", '"""', '"""one line"""', "plain"])

    def read(_prompt: str) -> str:
        return next(lines)

    assert chat.read_message(read) == "first\n\nsecond"
    assert chat.read_message(read) == "one line"
    assert chat.read_message(read) == "plain"


@pytest.mark.unit
def test_run_interactive_stops_at_eof() -> None:
    out = io.StringIO()
    s = session(out, io.StringIO())
    lines = iter(["/help"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat.run_interactive(s, read)
    assert "/retry" in out.getvalue()


# --- which server ---------------------------------------------------------------------------


@pytest.mark.unit
def test_plan_server_order() -> None:
    none = lambda: None  # noqa: E731
    model = Path("/m.gguf")
    down = lambda _u: False  # noqa: E731
    plan = chat.plan_server
    assert plan(ChatSpec(model_file="x.gguf", url="http://u")) == chat.ServerPlan(
        model="x.gguf", start=True
    )
    assert plan(ChatSpec(url="http://u"), serve_url=lambda: "http://s") == chat.ServerPlan(
        url="http://u"
    )
    assert plan(ChatSpec(), serve_url=lambda: "http://s") == chat.ServerPlan(url="http://s")
    assert plan(
        ChatSpec(), serve_url=none, is_reachable=lambda _u: True, default_model=lambda: model
    ) == chat.ServerPlan(url=chat.DEFAULT_URL)
    assert plan(
        ChatSpec(), serve_url=none, is_reachable=down, default_model=lambda: model
    ) == chat.ServerPlan(model=str(model), start=True)
    assert plan(ChatSpec(), serve_url=none, is_reachable=down, default_model=none) == (
        chat.ServerPlan(url=chat.DEFAULT_URL)
    )


@pytest.mark.fake
def test_session_server_starts_waits_healthy_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[list[str]] = []
    real_spawn = proc.spawn

    def fake_spawn(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        spawned.append(list(argv))
        port = argv[argv.index("--port") + 1]
        return real_spawn([sys.executable, __file__, "fake-server", port], **kw)

    monkeypatch.setattr(proc, "spawn", fake_spawn)
    say = io.StringIO()
    with chat.session_server("tiny.gguf", say) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        pid = int(httpx.get(f"{url}/pid").text)
    assert spawned[0][1:6] == ["-m", "llamactl", "serve", "-m", "tiny.gguf"]
    assert "starting a server for this chat: tiny.gguf" in say.getvalue()
    assert not proc.pid_alive(pid)


@pytest.mark.fake
def test_sigterm_stops_the_session_server_gracefully() -> None:
    script = f"""
import sys, time
from llamactl import proc
from llamactl.chat import session as chat
real = proc.spawn
def spawn(argv, **kw):
    port = argv[argv.index("--port") + 1]
    return real([sys.executable, {__file__!r}, "fake-server", port], **kw)
proc.spawn = spawn
with chat.session_server("m.gguf", sys.stderr) as url:
    print(url, flush=True)
    time.sleep(60)
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        pid = int(httpx.get(f"{url}/pid").text)
        child.terminate()
        _, err = child.communicate(timeout=15)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM
    assert "stopping the server started for this chat" in err
    assert not proc.pid_alive(pid)


@pytest.mark.fake
def test_session_server_that_dies_quotes_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    real_spawn = proc.spawn

    def dying(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        code = "print('error: model file is corrupt'); raise SystemExit(3)"
        return real_spawn([sys.executable, "-c", code], **kw)

    monkeypatch.setattr(proc, "spawn", dying)
    expected = "exited with code 3:\nerror: model file is corrupt"
    with pytest.raises(ServerStartError, match=expected), chat.session_server("x", io.StringIO()):
        pass


# --- the command, one-shot ------------------------------------------------------------------


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["chat", "--url", URL, *args], input=input)


@pytest.mark.unit
def test_one_shot_prints_only_the_answer_plain(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(
        return_value=stream_response(split_every(reply_body("**Paris** ", "is the capital."), 4))
    )
    result = invoke("-p", "Capital of France?", "--system", "brief", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == "**Paris** is the capital.\n"
    assert ESC not in result.output
    body = sent(route)
    assert body["messages"][0] == {"role": "system", "content": "brief"}
    assert body["temperature"] == 0.0 and body["model"] == "fake-model"


@pytest.mark.unit
def test_one_shot_reads_the_question_from_piped_stdin(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).mock(return_value=stream_response([reply_body("Paris.")]))
    result = invoke("--max-tokens", "32", input="What is the capital of France?\n")
    assert result.exit_code == 0
    assert result.stdout == "Paris.\n"
    assert sent(route)["messages"] == [
        {"role": "system", "content": chat.DEFAULT_SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert sent(route)["max_tokens"] == 32


@pytest.mark.unit
def test_json_prints_the_whole_response(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).respond(200, json=completion("Paris."))
    result = invoke("--json", "-p", "q")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == completion("Paris.")
    assert sent(route)["stream"] is False


@pytest.mark.unit
def test_no_stream_prints_the_text_and_empty_system_sends_none(api: respx.MockRouter) -> None:
    route = api.post(COMPLETIONS).respond(200, json=completion("Paris."))
    result = invoke("--no-stream", "--system", "", "-p", "q")
    assert (result.exit_code, result.stdout) == (0, "Paris.\n")
    assert sent(route)["messages"] == [{"role": "user", "content": "q"}]


@pytest.mark.unit
def test_api_key_from_env(api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    route = api.post(COMPLETIONS).mock(side_effect=lambda _r: stream_response([reply_body("ok")]))
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai")
    assert invoke("-p", "q").exit_code == 0
    monkeypatch.setenv("LLAMACTL_API_KEY", "from-llamactl")
    assert invoke("-p", "q").exit_code == 0
    keys = [c.request.headers["authorization"] for c in route.calls]
    assert keys == ["Bearer from-openai", "Bearer from-llamactl"]


@pytest.mark.unit
def test_one_shot_errors_exit_non_zero_with_one_line(api: respx.MockRouter) -> None:
    api.post(COMPLETIONS).respond(401, json={"error": {"message": "Invalid API Key"}})
    result = invoke("-p", "q")
    assert result.exit_code == ServerError.exit_code
    assert result.stderr.startswith("Error: the server at http://llama.test refused")
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_one_shot_stream_cut_exits_non_zero(api: respx.MockRouter) -> None:
    api.post(COMPLETIONS).mock(return_value=stream_response([sse(chunk("Par"), done=False)]))
    result = invoke("-p", "q")
    assert result.exit_code != 0
    assert result.stdout == "Par\n"
    assert "closed the stream mid-reply" in result.stderr


@pytest.mark.fake
def test_dead_server_exits_non_zero_without_traceback() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(cli, ["chat", "--url", url, "-p", "hi"])
    assert result.exit_code == ServerError.exit_code
    assert "connection refused" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.unit
def test_empty_question_and_bad_options_are_usage_errors() -> None:
    assert invoke(input="  \n").exit_code == UsageError.exit_code
    assert invoke("-p", "q", "--top-p", "3").exit_code == UsageError.exit_code
    result = CliRunner().invoke(cli, ["chat", "--url", "nohttp", "-p", "q"])
    assert result.exit_code == UsageError.exit_code
    assert invoke("-m", "x.gguf", "-p", "q").exit_code == UsageError.exit_code


# --- a tiny OpenAI-like server for the pseudo-terminal test ----------------------------------


class _FakeHandler(BaseHTTPRequestHandler):
    """Streams "Hello from the fake server." or, for "slow", ticks until the client leaves."""

    server: _FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/pid":
            self._json(200, os.getpid())
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-model"}]})
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        question = body["messages"][-1]["content"]
        if not body.get("stream"):
            self._json(200, completion("Hello from the fake server."))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        slow = question == "slow"
        pieces = (
            [f"tick{i} " for i in range(400)] if slow else ["Hello", " from the", " fake server."]
        )
        try:
            for piece in pieces:
                self.wfile.write(sse(chunk(piece), done=False))
                self.wfile.flush()
                if slow:
                    self.server.streaming.set()
                    time.sleep(0.05)
            self.wfile.write(sse(chunk(finish="stop", timings=TIMINGS)))
        except (BrokenPipeError, ConnectionResetError):
            self.server.cancelled.set()


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _FakeHandler)
        self.requests: list[dict[str, Any]] = []
        self.streaming = threading.Event()
        self.cancelled = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def fake_server() -> Iterator[_FakeServer]:
    server = _FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Pty:
    """A program on a pseudo-terminal, driven like a person would (a small pexpect)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import fcntl
        import struct
        import termios

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.execve(argv[0], argv, env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.output = ""
        self._seen = 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            if exc.errno != errno.EIO:
                raise
            return False
        if not data:
            return False
        self.output += data.decode(errors="replace")
        return True

    def expect(self, pattern: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.output, self._seen)
            if match:
                self._seen = match.end()
                return
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"no {pattern!r} in:\n{self.output[-3000:]!r}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"still running:\n{self.output[-2000:]!r}")

    def kill(self) -> None:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.mark.fake
def test_interactive_chat_through_a_pseudo_terminal(
    fake_server: _FakeServer, llamactl_home: Path
) -> None:
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    term = Pty([sys.executable, "-m", "llamactl", "chat", "--url", fake_server.url], env)
    try:
        term.expect(r"chatting with fake-model")
        term.expect(r">>> ")
        term.send("hello\r")
        term.expect(r"fake server\.")
        term.expect(r"42 tokens · 120\.0 tokens/s · first token")
        term.expect(r">>> ")
        term.send("/help\r")
        term.expect(r"/retry")
        term.expect(r">>> ")
        term.send("slow\r")
        assert fake_server.streaming.wait(10), term.output[-1000:]
        term.expect(r"tick\d")
        term.send("typed-ahead")  # echo is off while a reply streams: it must not garble it
        term.expect(r"tick\d")
        term.send("\x03")  # Ctrl-C during the reply
        term.expect(r"\[interrupted\]")
        assert "typed-ahead" not in term.output
        term.expect(r">>> ")
        # Closing the response is what makes llama-server stop generating.
        assert fake_server.cancelled.wait(5)
        term.send('"""\r')
        term.send("two\r")
        term.send('lines"""\r')
        term.expect(r"fake server\.")
        term.expect(r">>> ")
        term.send("\x04")  # Ctrl-D leaves
        assert term.wait() == 0
    finally:
        term.kill()
    assert [r["messages"][-1]["content"] for r in fake_server.requests] == [
        "hello",
        "slow",
        "two\nlines",
    ]
    # The interrupted reply stays in the conversation, so roles keep alternating.
    assert [m["role"] for m in fake_server.requests[-1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    history = (llamactl_home / "state" / "chat_history").read_text()
    assert "hello" in history and "/help" in history


# --- the real llama-server ------------------------------------------------------------------


@dataclass(frozen=True)
class RealServer:
    """A running llama-server and its log."""

    url: str
    log: Path


@pytest.fixture(scope="module")
def real(
    server_bin: Path, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealServer]:
    """The real llama-server with the default model on a free port."""
    port = closed_port()
    log_path = tmp_path_factory.mktemp("chat-real") / "llama-server.log"
    argv = [str(server_bin), "-m", str(default_model), "--port", str(port), "--ctx-size", "2048"]
    with open(log_path, "ab") as log:
        popen = proc.spawn(argv, stdout=log)
    url = f"http://127.0.0.1:{port}"
    try:
        chat.wait_for_server(port, popen, log_path, deadline_s=120)
        yield RealServer(url, log_path)
    finally:
        proc.stop_group(popen.pid, popen=popen)


def _llamactl(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamactl", "chat", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.real
def test_real_one_shot_answers_paris(real: RealServer) -> None:
    q = "What is the capital of France?"
    result = _llamactl("--url", real.url, "--temperature", "0", "--max-tokens", "32", "-p", q)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert ESC not in result.stdout


@pytest.mark.real
def test_real_piped_stdin_answers_paris(real: RealServer) -> None:
    q = "What is the capital of France?\n"
    result = _llamactl("--url", real.url, "--temperature", "0", "--max-tokens", "32", input=q)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert ESC not in result.stdout + result.stderr


@pytest.mark.real
def test_real_stream_reports_timings(real: RealServer) -> None:
    client = ChatClient(real.url)
    stream = client.stream([Message("user", "Say hi.")], Settings(max_tokens=8, temperature=0))
    assert "".join(stream)
    reply = stream.result()
    assert reply.timings is not None and reply.timings.predicted_n > 0
    assert reply.first_token_s is not None


@pytest.mark.real
def test_real_context_overflow_is_one_clear_line(real: RealServer) -> None:
    result = _llamactl("--url", real.url, "--max-tokens", "4", "-p", "hello " * 3000)
    assert result.returncode == ServerError.exit_code
    assert "no longer fits in the model's context" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.real
def test_real_json_is_the_servers_response(real: RealServer) -> None:
    result = _llamactl("--url", real.url, "--max-tokens", "4", "--json", "-p", "hi")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["object"] == "chat.completion" and "timings" in body


@pytest.mark.real
def test_real_ctrl_c_in_a_chat_cancels_the_generation(real: RealServer) -> None:
    env = {**os.environ, "TERM": "xterm-256color"}
    argv = [sys.executable, "-m", "llamactl", "chat", "--url", real.url, "--max-tokens", "1500"]
    term = Pty(argv, env)
    try:
        term.expect(r">>> ", timeout=30)

        def count(what: str) -> int:  # the log is shared with the module's other tests
            return real.log.read_text(errors="replace").count(what)

        launched, cancelled = count("processing task"), count("cancel task")
        term.send("Write a very long story about a robot who learns to paint.\r")
        # The reply has started when llama-server says so (the terminal echoes the prompt, so
        # text on it proves nothing), and a little of it has reached the screen.
        deadline = time.monotonic() + 60
        while count("processing task") == launched:
            assert time.monotonic() < deadline, "the chat's request never reached llama-server"
            time.sleep(0.05)
        time.sleep(0.5)
        term.send("\x03")
        term.expect(r"\[interrupted\]")
        # llama-server notices the closed connection and cancels the task.
        deadline = time.monotonic() + 10
        while count("cancel task") == cancelled:
            assert time.monotonic() < deadline, real.log.read_text()[-2000:]
            time.sleep(0.1)
        term.expect(r">>> ")
        term.send("/bye\r")
        assert term.wait() == 0
    finally:
        term.kill()


if __name__ == "__main__":  # `python tests/test_chat.py fake-server PORT`: a stand-in serve
    if sys.argv[1:2] == ["fake-server"]:
        _FakeServer(int(sys.argv[2])).serve_forever()
