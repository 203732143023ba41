"""`llamactl chat`: the conversation loop (interactive with history and slash commands, or
one-shot with the plain answer on stdout), and the server a session starts for itself. The
HTTP client is client.py, the SSE parser sse.py; drawing on a terminal comes in through the
Renderer protocol (llamactl.cli.chat_render)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TextIO

import httpx

from llamactl import net, paths, proc
from llamactl.chat.client import (
    ChatClient,
    Message,
    Reply,
    ReplyStream,
    Settings,
    api_base,
    reply_from_body,
    resolve_api_key,
)
from llamactl.errors import LlamactlError, ServerStartError, UsageError

DEFAULT_URL = "http://127.0.0.1:8080"
#: A 7B model from a cold disk can take a minute or two to load before /health says ok.
START_DEADLINE_S = 300.0
#: Sent when --system is not given. Small instruct models answer far worse with the chat
#: template's own default (SmolLM2-135M: "What is the capital of France?" gets no "Paris"
#: without it); llama-cli's conversation mode used the same default.
DEFAULT_SYSTEM = "You are a helpful assistant."
PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
ROLES = ("system", "user", "assistant")


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSpec:
    """What the command line asked for."""

    url: str | None = None
    api_key: str | None = None
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    model: str | None = None
    stream: bool = True
    json_output: bool = False
    prompt: str | None = None
    model_file: str | None = None


@dataclass(frozen=True)
class Terminal:
    """The streams a chat talks through, and whether each is a terminal."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    stdin_tty: bool
    stdout_tty: bool

    @classmethod
    def from_streams(cls, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> Terminal:
        """Describe these streams."""
        return cls(stdin, stdout, stderr, _isatty(stdin), _isatty(stdout))


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stats_line(reply: Reply) -> str:
    """`42 tokens · 120.3 tokens/s · first token 0.08 s`, from what the server reported."""
    parts = []
    if reply.timings is not None:
        parts.append(f"{reply.timings.predicted_n} tokens")
        parts.append(f"{reply.timings.predicted_per_second:.1f} tokens/s")
    elif reply.completion_tokens is not None:
        # Servers other than llama-server send no timings; usage plus our clock is the best guess.
        parts.append(f"{reply.completion_tokens} tokens")
        if reply.elapsed_s and reply.first_token_s is not None:
            gen_s = reply.elapsed_s - reply.first_token_s
            if gen_s > 0 and reply.completion_tokens > 1:
                parts.append(f"{(reply.completion_tokens - 1) / gen_s:.1f} tokens/s")
    if reply.first_token_s is not None:
        parts.append(f"first token {reply.first_token_s:.2f} s")
    return " · ".join(parts)


# --- conversation and slash commands --------------------------------------------------------


@dataclass
class Conversation:
    """The system prompt and the turns so far."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        """What is sent: the system prompt first, then the turns."""
        head = [Message("system", self.system)] if self.system else []
        return head + list(self.turns)

    def to_json(self, settings: Settings) -> dict[str, Any]:
        """The conversation as a JSON document for /save."""
        return {
            "model": settings.model,
            "messages": [dataclasses.asdict(m) for m in self.messages()],
        }

    @classmethod
    def from_json(cls, data: Any) -> Conversation:
        """Read a /save document, or a bare OpenAI `messages` list."""
        items = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise UsageError("not a saved conversation: expected {'messages': [...]} or a list")
        conv = cls()
        for i, item in enumerate(items):
            role = item.get("role") if isinstance(item, dict) else None
            content = item.get("content") if isinstance(item, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise UsageError(f"message {i + 1} needs a role ({', '.join(ROLES)}) and text")
            if role == "system":
                conv.system = content
            else:
                conv.turns.append(Message(role, content))
        return conv


COMMANDS: dict[str, str] = {
    "/help": "show this list",
    "/system TEXT": "set the system prompt (no TEXT: show it)",
    "/model [NAME]": "use model NAME (no NAME: list the server's models)",
    "/clear": "forget the conversation (the system prompt stays)",
    "/retry": "ask for the last reply again",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a conversation saved with /save",
    "/set NAME VALUE": "set temperature, top_p or max_tokens (no VALUE: server default)",
    "/bye": "leave (Ctrl-D does too)",
}
_SETTABLE: dict[str, Callable[[str], float | int]] = {
    "temperature": float,
    "top_p": float,
    "max_tokens": int,
}


def help_text() -> str:
    """The slash commands, one a line."""
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {cmd.ljust(width)}  {what}" for cmd, what in COMMANDS.items()]
    lines.append(f"  {FENCE} … {FENCE}".ljust(width + 2) + "  write a message over several lines")
    return "\n".join(lines)


def parse_setting(name: str, value: str) -> float | int | None:
    """Check a /set value: temperature ≥ 0, 0 < top_p ≤ 1, max_tokens a positive integer."""
    if name not in _SETTABLE:
        raise UsageError(f"/set knows {', '.join(_SETTABLE)}, not {name!r}")
    if not value:
        return None
    try:
        parsed = _SETTABLE[name](value)
    except ValueError:
        raise UsageError(f"{name} needs a number, got {value!r}") from None
    if name == "temperature" and not parsed >= 0:
        raise UsageError("temperature must be 0 or more")
    if name == "top_p" and not 0 < parsed <= 1:
        raise UsageError("top_p must be above 0 and at most 1")
    if name == "max_tokens" and parsed <= 0:
        raise UsageError("max_tokens must be a positive integer")
    return parsed


class Output(Protocol):
    """Where a chat writes: replies, notes, errors, stats."""

    def reply(self, stream: ReplyStream) -> Reply:
        """Show a reply as it streams; return it."""
        ...

    def info(self, text: str) -> None:
        """A note for the person."""
        ...

    def error(self, text: str) -> None:
        """One error line."""
        ...

    def stats(self, reply: Reply) -> None:
        """The stats line after a reply."""
        ...

    def aside(self, text: str) -> None:
        """A line that should not draw the eye (dim on a terminal): the chat's banner."""
        ...


class Renderer(Protocol):
    """Draws a chat on a terminal. The chat core never imports a terminal library: the CLI
    passes one in (llamactl.cli.chat_render.RichRenderer: Markdown as it streams)."""

    def terminal_output(self, term: Terminal, *, show_stats: bool, input_fd: int | None) -> Output:
        """An Output drawing on `term`'s stdout; `input_fd` is the keyboard while a reply
        streams (interactive), None for a one-shot answer."""
        ...


class PlainOutput:
    """Plain text, flushed as it arrives: no terminal codes (pipes, files, tests)."""

    def __init__(self, out: TextIO, err: TextIO, *, show_stats: bool = True) -> None:
        self.out, self.err, self.show_stats = out, err, show_stats

    def reply(self, stream: ReplyStream) -> Reply:
        last = ""
        try:
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
                last = piece
        finally:
            if last and not last.endswith("\n"):
                self.out.write("\n")
                self.out.flush()
        return stream.result()

    def info(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.err.write(f"error: {text}\n")
        self.err.flush()

    def stats(self, reply: Reply) -> None:
        line = stats_line(reply)
        if self.show_stats and line:
            self.err.write(line + "\n")
            self.err.flush()

    def aside(self, text: str) -> None:
        self.info(text)


class ChatSession:
    """A conversation with one server: sends turns, runs slash commands."""

    def __init__(
        self,
        client: ChatClient,
        output: Output,
        settings: Settings,
        conversation: Conversation | None = None,
    ) -> None:
        self.client, self.output, self.settings = client, output, settings
        self.conversation = conversation or Conversation()

    def handle(self, line: str) -> bool:
        """Run one input line (a message or a slash command); False means leave."""
        if not line.strip():
            return True
        if line.startswith("/"):
            return self.command(line)
        self.ask(line)
        return True

    def ask(self, text: str) -> Reply | None:
        """Send a user message and show the reply; errors become one line, the chat goes on."""
        turns = self.conversation.turns
        if turns and turns[-1].role == "user":
            turns.pop()  # the unanswered message of a failed turn: this one replaces it
        turns.append(Message("user", text))
        return self._answer()

    def _answer(self) -> Reply | None:
        stream = self.client.stream(self.conversation.messages(), self.settings)
        try:
            reply = self.output.reply(stream)
        except KeyboardInterrupt:
            stream.close()
            partial = stream.text
            if partial:
                # Keep what was shown, so roles still alternate (some chat templates insist).
                self.conversation.turns.append(Message("assistant", partial))
            self.output.info("[interrupted]")
            return None
        except LlamactlError as exc:
            stream.close()
            self.output.error(exc.format_message())
            return None
        self.conversation.turns.append(Message("assistant", reply.text))
        self.output.stats(reply)
        return reply

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            return self._command(name.lower(), arg)
        except LlamactlError as exc:
            self.output.error(exc.format_message())
            return True

    def _command(self, name: str, arg: str) -> bool:
        out = self.output
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            out.info(help_text())
        elif name == "/system":
            if arg:
                self.conversation.system = arg
                out.info("system prompt set")
            else:
                out.info(f"system prompt: {self.conversation.system or '(none)'}")
        elif name == "/model":
            self._model(arg)
        elif name == "/clear":
            self.conversation.turns.clear()
            out.info("conversation cleared")
        elif name == "/retry":
            self._retry()
        elif name == "/save":
            self._save(arg)
        elif name == "/load":
            self._load(arg)
        elif name == "/set":
            self._set(arg)
        else:
            out.error(f"unknown command {name}; the commands are:\n{help_text()}")
        return True

    def _model(self, arg: str) -> None:
        if arg:
            self.settings = dataclasses.replace(self.settings, model=arg)
            self.output.info(f"model: {arg}")
            return
        names = self.client.models()
        if not names:
            self.output.info("the server lists no models")
        for name in names:
            mark = "*" if name == self.settings.model else " "
            self.output.info(f"{mark} {name}")

    def _retry(self) -> None:
        turns = self.conversation.turns
        while turns and turns[-1].role == "assistant":
            turns.pop()
        if not turns:
            self.output.error("nothing to retry yet")
            return
        self._answer()

    def _save(self, arg: str) -> None:
        if not arg:
            raise UsageError("/save needs a file name")
        target = Path(arg).expanduser()
        document = self.conversation.to_json(self.settings)
        try:
            target.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None
        self.output.info(f"saved {len(document['messages'])} messages to {target}")

    def _load(self, arg: str) -> None:
        if not arg:
            raise UsageError("/load needs a file name")
        source = Path(arg).expanduser()
        try:
            data = json.loads(source.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"{source} is not JSON: {exc}") from None
        self.conversation = Conversation.from_json(data)
        n = len(self.conversation.messages())
        self.output.info(f"loaded {n} messages from {source}")

    def _set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            shown = ", ".join(f"{k}={getattr(self.settings, k)}" for k in _SETTABLE)
            self.output.info(f"{shown} (None: the server's default)")
            return
        parsed = parse_setting(name, value.strip())
        changes: dict[str, Any] = {name: parsed}
        self.settings = dataclasses.replace(self.settings, **changes)
        self.output.info(f"{name} = {parsed if parsed is not None else '(server default)'}")


# --- input ----------------------------------------------------------------------------------


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, or the lines between two `\"\"\"` lines (EOFError at the end)."""
    line = read_line(PROMPT)
    if not line.lstrip().startswith(FENCE):
        return line
    first = line.lstrip()[len(FENCE) :]
    if first.rstrip().endswith(FENCE):  # """all on one line"""
        return first.rstrip()[: -len(FENCE)]
    parts = [first] if first.strip() else []
    while True:
        line = read_line(CONTINUATION)
        if line.rstrip().endswith(FENCE):
            tail = line.rstrip()[: -len(FENCE)]
            if tail:
                parts.append(tail)
            return "\n".join(parts)
        parts.append(line)


@contextlib.contextmanager
def line_history(path: Path) -> Iterator[None]:
    """readline editing with history kept in `path` across sessions."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows has no readline; plain input() still works
        yield
        return
    paths.ensure_private_dir(path.parent)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(2000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(path)
            path.chmod(0o600)  # the history holds prompts


def history_path() -> Path:
    """Where interactive input history lives."""
    return paths.state_dir() / "chat_history"


def run_interactive(session: ChatSession, read_line: Callable[[str], str]) -> None:
    """The chat loop: until /bye or Ctrl-D; Ctrl-C at the prompt drops the line."""
    while True:
        try:
            text = read_message(read_line)
        except EOFError:
            session.output.info("")
            return
        except KeyboardInterrupt:
            session.output.info("\n(Ctrl-D or /bye leaves)")
            continue
        try:
            if not session.handle(text):
                return
        except KeyboardInterrupt:  # during a slash command's request (replies handle their own)
            session.output.info("[interrupted]")


# --- which server ---------------------------------------------------------------------------


def running_serve_url() -> str | None:
    """The newest running `llamactl serve`, from its state records."""
    try:
        from llamactl.serve.records import live_records
    except ImportError:  # records arrive with `serve`; until then only --url and the default
        return None
    for record in live_records():
        url = getattr(record, "url", None)
        if url:
            return str(url)
    return None


def default_model_path() -> Path | None:
    """The default model when it is in the cache (so a chat can start a server for it)."""
    try:
        from llamactl.models.default import DEFAULT_MODEL
    except ImportError:  # the models module may not be there yet
        return None
    path = paths.models_dir() / DEFAULT_MODEL.filename
    return path if path.is_file() else None


def reachable(url: str, *, timeout: float = 1.0) -> bool:
    """True when anything answers HTTP at `url`."""
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError:
        return False
    return True


@dataclass(frozen=True)
class ServerPlan:
    """Talk to `url`, or start a server for `model` first."""

    url: str | None = None
    model: str | None = None
    start: bool = False


def plan_server(
    spec: ChatSpec,
    *,
    serve_url: Callable[[], str | None] = running_serve_url,
    is_reachable: Callable[[str], bool] = reachable,
    default_model: Callable[[], Path | None] = default_model_path,
) -> ServerPlan:
    """Decide which server this chat uses: -m starts one, --url wins, then a running serve,
    then the default address, then (with nothing there) a server for the default model."""
    if spec.model_file:
        return ServerPlan(model=spec.model_file, start=True)
    if spec.url:
        return ServerPlan(url=spec.url)
    url = serve_url()
    if url:
        return ServerPlan(url=url)
    if not is_reachable(DEFAULT_URL):
        model = default_model()
        if model is not None:
            return ServerPlan(model=str(model), start=True)
    return ServerPlan(url=DEFAULT_URL)


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_server(
    port: int,
    popen: subprocess.Popen[bytes],
    log_path: Path,
    *,
    deadline_s: float = START_DEADLINE_S,
) -> None:
    """Wait until the server on 127.0.0.1:`port` answers /health with 200; ServerStartError,
    quoting its log, when it exits first or the deadline passes."""
    try:
        net.wait_ready("127.0.0.1", port, deadline_s=deadline_s, exited=popen.poll)
    except net.NotReady as exc:
        if exc.exit_code is not None:
            what = f"exited with code {exc.exit_code}"
        else:
            what = f"was not healthy after {deadline_s:g} s"
        raise ServerStartError(
            f"the server for this chat {what}:\n{_log_tail(log_path)}",
            hint=f"full log: {log_path}",
        ) from None


@contextlib.contextmanager
def session_server(model: str, say: TextIO) -> Iterator[str]:
    """Start `llamactl serve -m MODEL` on a free port for this chat; stop it at the end."""
    port = net.free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = paths.ensure_private_dir(paths.logs_dir()) / f"chat-serve-{port}.log"
    argv = [sys.executable, "-m", "llamactl", "serve", "-m", model, "--port", str(port)]
    say.write(f"starting a server for this chat: {model} at {url} (log: {log_path})\n")
    say.flush()
    with _exit_on_term():
        with open(log_path, "ab") as log:
            popen = proc.spawn(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_server(port, popen, log_path)
            yield url
        finally:
            say.write("stopping the server started for this chat\n")
            say.flush()
            proc.stop_group(popen.pid, popen=popen)


@contextlib.contextmanager
def _exit_on_term() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while a session server runs, so that `finally`
    stops it gracefully: the parent-death SIGKILL alone would leave what serve itself started
    (a first build's compilers, for one) running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    saved = {sig: signal.signal(sig, _exit) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# --- the command ----------------------------------------------------------------------------


def system_prompt(spec: ChatSpec) -> str | None:
    """--system, else the default; `--system ""` sends none."""
    return DEFAULT_SYSTEM if spec.system is None else (spec.system or None)


def _one_shot_question(spec: ChatSpec, term: Terminal) -> str:
    # -p never reads stdin: a script's inherited stdin may be a pipe that never closes.
    if spec.prompt is not None:
        question = spec.prompt
    else:
        # sys.stdin is None when the shell closed it (`<&-`): that is an empty question.
        question = term.stdin.read() if term.stdin is not None else ""
    if not question.strip():
        raise UsageError("nothing to ask: pass -p TEXT or pipe a question on stdin")
    return question.strip()


def one_shot(
    client: ChatClient,
    spec: ChatSpec,
    settings: Settings,
    term: Terminal,
    question: str,
    renderer: Renderer | None = None,
) -> None:
    """Answer one question on stdout: plain when piped, Markdown on a terminal, or --json."""
    conversation = Conversation(system=system_prompt(spec), turns=[Message("user", question)])
    messages = conversation.messages()
    if spec.json_output or not spec.stream:
        body = client.complete(messages, settings)
        if spec.json_output:
            text = json.dumps(body, indent=2, ensure_ascii=False)
        else:
            text = reply_from_body(body, url=client.url, model=settings.model).text
        term.stdout.write(text if text.endswith("\n") else text + "\n")
        term.stdout.flush()
        return
    output: Output
    if term.stdout_tty and renderer is not None:
        output = renderer.terminal_output(term, show_stats=False, input_fd=None)
    else:
        output = PlainOutput(term.stdout, term.stderr, show_stats=False)
    stream = client.stream(messages, settings)
    try:
        output.reply(stream)
    finally:
        stream.close()


def interactive(
    client: ChatClient,
    spec: ChatSpec,
    settings: Settings,
    term: Terminal,
    renderer: Renderer | None = None,
) -> None:
    """The terminal chat."""
    output: Output
    if renderer is not None:
        output = renderer.terminal_output(term, show_stats=True, input_fd=term.stdin.fileno())
    else:
        output = PlainOutput(term.stdout, term.stderr)
    session = ChatSession(client, output, settings, Conversation(system=system_prompt(spec)))
    model = settings.model or "the server's model"
    output.aside(
        f"chatting with {model} at {client.url} · /help for commands · Ctrl-D or /bye to leave"
    )
    with line_history(history_path()):
        run_interactive(session, input)


def run(
    spec: ChatSpec,
    term: Terminal,
    *,
    env: Mapping[str, str] | None = None,
    renderer: Renderer | None = None,
) -> None:
    """Run `llamactl chat`: pick or start the server, then chat or answer once (drawn by
    `renderer` on a terminal, plain text otherwise)."""
    env = os.environ if env is None else env
    if spec.url and spec.model_file:
        raise UsageError("--url and -m contradict: -m starts a server of its own")
    if spec.url:
        api_base(spec.url)  # a malformed --url is a usage error before anything starts
    for name in ("temperature", "top_p", "max_tokens"):
        value = getattr(spec, name)
        if value is not None:
            parse_setting(name, str(value))
    is_interactive = spec.prompt is None and term.stdin_tty and term.stdout_tty
    if is_interactive and spec.json_output:
        raise UsageError("--json needs a question: pass -p TEXT or pipe it on stdin")
    # The question first: an empty one is a usage error before any server is reached or started.
    question = None if is_interactive else _one_shot_question(spec, term)
    plan = plan_server(spec)
    with contextlib.ExitStack() as stack:
        url = plan.url
        if plan.start:
            assert plan.model is not None
            url = stack.enter_context(session_server(plan.model, term.stderr))
        assert url is not None
        client = ChatClient(url, api_key=resolve_api_key(spec.api_key, env))
        stack.callback(client.close)
        model = spec.model or client.default_model()
        settings = Settings(
            model=model,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_tokens,
        )
        if question is None:
            interactive(client, spec, settings, term, renderer)
        else:
            one_shot(client, spec, settings, term, question, renderer)
