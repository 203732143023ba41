"""The soak: many concurrent clients (streamed and plain chat completions, /tokenize, /health,
/v1/models) against `llamactl serve` for a bounded time; every answer is validated, and serve's
own RSS, open fds and TCP connections are sampled to show that they stay flat
(scripts/soak.py, tests/test_soak.py).

Not on serve's import path: only the soak driver and its tests import this module.

The load generator is one asyncio loop (uvloop when installed) with one coroutine per client
over httpx: on a 2-core machine shared with llama-server and the proxy, 64 threads would spend
their time fighting over the GIL and the CPU, while one loop costs one core at most, and the
client's own CPU use is measured and reported so that a starved generator shows.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psutil

KINDS = ("chat", "stream", "tokenize", "health", "models")
SMALL_KINDS = ("tokenize", "health", "models")
PROMPTS = (
    "Write a haiku about the sea.",
    "Name three colours.",
    "What is the capital of France?",
    "Tell me a short story about a robot.",
    "Count from one to ten.",
)
#: How many examples of each kind of failure the report shows (the counts are always exact).
EXAMPLES_PER_KIND = 3
MIB = 1 << 20


# -- validation: pure functions of one answer ---------------------------------------------------


@dataclass(frozen=True)
class Check:
    """The verdict on one answer: `problem` is None when the answer is complete and valid."""

    problem: str | None = None
    tokens: int = 0


def _json_object(text: str | bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"JSON but not an object: {type(value).__name__}"
    return value, None


def _first_choice(obj: dict[str, Any]) -> dict[str, Any] | None:
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _status_problem(status: int, content_type: str, expected_type: str, body: bytes) -> str | None:
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    if not content_type.startswith(expected_type):
        return f"content-type {content_type!r}, expected {expected_type}"
    return None


def check_chat(
    status: int, content_type: str, body: bytes, expected_tokens: int | None = None
) -> Check:
    """A non-streamed chat completion: complete JSON with choices[0].message.content, a
    finish_reason and, when `expected_tokens` is given (requests sent with ignore_eos), exactly
    that many completion tokens, so an answer meant for another request shows."""
    problem = _status_problem(status, content_type, "application/json", body)
    if problem:
        return Check(problem)
    obj, problem = _json_object(body)
    if obj is None:
        return Check(problem)
    if "error" in obj:
        return Check(f"error answer: {str(obj['error'])[:200]}")
    choice = _first_choice(obj)
    if choice is None:
        return Check("no choices[0]")
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        return Check("no choices[0].message.content")
    if not choice.get("finish_reason"):
        return Check("no finish_reason")
    usage = obj.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int):
        return Check("no usage.completion_tokens")
    if expected_tokens is not None and tokens != expected_tokens:
        return Check(f"{tokens} completion tokens, asked for {expected_tokens}")
    return Check(None, tokens)


def parse_sse(text: str) -> tuple[list[str], str | None]:
    """The `data` payloads of a complete SSE body, and the first framing problem.

    Comment lines (":", llama-server's keep-alive ping) and blank lines are legal; any other
    line (another field, a fragment of an event, bytes from another response) is not. The body
    must end at an event boundary: a body cut mid-event is truncated."""
    if not text:
        return [], "empty stream"
    if not text.endswith("\n\n"):
        return [], f"truncated: the stream ends mid-event ({text[-80:]!r})"
    payloads: list[str] = []
    for block in text[:-2].split("\n\n"):
        data: list[str] = []
        for line in block.split("\n"):
            if line == "" or line.startswith(":"):
                continue
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
            else:
                return payloads, f"garbage between events: {line[:120]!r}"
        if data:
            payloads.append("\n".join(data))
    return payloads, None


def check_stream(
    status: int, content_type: str, body: bytes, expected_tokens: int | None = None
) -> Check:
    """A streamed chat completion: well-formed SSE, every event a JSON chunk with
    choices[0].delta and one id, finish_reason on the last chunk only, then `data: [DONE]` and
    nothing after it; with `expected_tokens`, the final chunk's timings.predicted_n must match."""
    problem = _status_problem(status, content_type, "text/event-stream", body)
    if problem:
        return Check(problem)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Check(f"not UTF-8: {exc}")
    payloads, problem = parse_sse(text)
    if problem:
        return Check(problem)
    if not payloads or payloads[-1] != "[DONE]":
        last = payloads[-1][:120] if payloads else ""
        return Check(f"no data: [DONE] at the end (last event {last!r})")
    chunks = payloads[:-1]
    if not chunks:
        return Check("[DONE] without any chunk")
    ids: set[Any] = set()
    tokens = 0
    for n, payload in enumerate(chunks):
        if payload == "[DONE]":
            return Check(f"data: [DONE] at event {n}, before the end")
        obj, problem = _json_object(payload)
        if obj is None:
            return Check(f"event {n}: {problem}: {payload[:120]!r}")
        if "error" in obj:
            return Check(f"event {n}: error event: {str(obj['error'])[:200]}")
        choice = _first_choice(obj)
        if choice is None or not isinstance(choice.get("delta"), dict):
            return Check(f"event {n}: no choices[0].delta: {payload[:120]!r}")
        ids.add(obj.get("id"))
        is_last = n == len(chunks) - 1
        if bool(choice.get("finish_reason")) != is_last:
            where = "missing on the last chunk" if is_last else f"on chunk {n} of {len(chunks)}"
            return Check(f"finish_reason {where}")
        content = choice["delta"].get("content")
        if isinstance(content, str) and content:
            tokens += 1
    if len(ids) != 1:
        return Check(
            f"chunks of {len(ids)} different completions in one stream: {sorted(map(str, ids))[:4]}"
        )
    if expected_tokens is not None:
        final, _ = _json_object(chunks[-1])
        timings = (final or {}).get("timings")
        predicted = timings.get("predicted_n") if isinstance(timings, dict) else None
        if predicted is not None and predicted != expected_tokens:
            return Check(f"{predicted} tokens predicted, asked for {expected_tokens}")
        if isinstance(predicted, int):
            tokens = predicted
    return Check(None, tokens)


def check_tokenize(status: int, content_type: str, body: bytes, content: str) -> Check:
    """/tokenize with pieces: the pieces must spell `content` back, so an answer to another
    request shows."""
    problem = _status_problem(status, content_type, "application/json", body)
    if problem:
        return Check(problem)
    obj, problem = _json_object(body)
    if obj is None:
        return Check(problem)
    tokens = obj.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        return Check("no tokens")
    pieces = [t.get("piece") if isinstance(t, dict) else None for t in tokens]
    if not all(isinstance(p, str) for p in pieces):
        return Check("a token without a text piece")
    spelled = "".join(p for p in pieces if isinstance(p, str))
    if spelled != content:
        return Check(f"pieces spell {spelled[:80]!r}, sent {content[:80]!r}")
    return Check(None)


def check_health(status: int, content_type: str, body: bytes) -> Check:
    """/health of a ready server: 200 {"status": "ok"}."""
    problem = _status_problem(status, content_type, "application/json", body)
    if problem:
        return Check(problem)
    obj, problem = _json_object(body)
    if obj is None:
        return Check(problem)
    if obj.get("status") != "ok":
        return Check(f"status {obj.get('status')!r}, expected 'ok'")
    return Check(None)


def check_models(status: int, content_type: str, body: bytes) -> Check:
    """/v1/models: a list with at least one model id."""
    problem = _status_problem(status, content_type, "application/json", body)
    if problem:
        return Check(problem)
    obj, problem = _json_object(body)
    if obj is None:
        return Check(problem)
    data = obj.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return Check("no data[0]")
    if not isinstance(data[0].get("id"), str):
        return Check("no data[0].id")
    return Check(None)


# -- resource samples and the stability verdict (pure) ------------------------------------------


@dataclass(frozen=True)
class Sample:
    """serve's resources at one moment (t: seconds since the load began)."""

    t: float
    rss: int
    fds: int
    client_conns: int = 0
    upstream_conns: int = 0


@dataclass(frozen=True)
class Limits:
    """How much growth still counts as stable: generous, so that only a leak fails."""

    warmup_s: float = 5.0
    rss_slack_bytes: int = 16 * MIB
    rss_slack_ratio: float = 0.25
    fd_slack_running: int = 16
    fd_slack_end: int = 4


def default_warmup(duration: float) -> float:
    """A quarter of the run, at least 2 s and at most 30 s: the allocator's arenas and the
    connection pools fill during the first seconds of load."""
    return min(30.0, max(2.0, duration / 4))


def stability_problems(
    samples: Sequence[Sample], baseline_fds: int, end_fds: int | None, limits: Limits
) -> tuple[list[str], dict[str, float]]:
    """Problems with serve's resources, and the figures they were judged on.

    After warm-up, the median of the last third of the samples must not exceed the median of
    the first third by more than the slack (RSS: the larger of the absolute and the relative
    slack; fds: a count); after the clients closed, fds must be back to the baseline within
    `fd_slack_end`. Fewer than six samples after warm-up: growth is not judged."""
    problems: list[str] = []
    figures: dict[str, float] = {}
    steady = [s for s in samples if s.t >= limits.warmup_s]
    if len(steady) >= 6:
        third = len(steady) // 3
        first, last = steady[:third], steady[-third:]
        rss0 = statistics.median(s.rss for s in first)
        rss1 = statistics.median(s.rss for s in last)
        fd0 = statistics.median(s.fds for s in first)
        fd1 = statistics.median(s.fds for s in last)
        figures.update(rss_first_third=rss0, rss_last_third=rss1, fd_first_third=fd0)
        figures["fd_last_third"] = fd1
        if len(steady) >= 2 and steady[-1].t > steady[0].t:
            slope = statistics.linear_regression([s.t for s in steady], [s.rss for s in steady])
            figures["rss_slope_mib_per_min"] = slope.slope * 60 / MIB
        allowed = max(limits.rss_slack_bytes, limits.rss_slack_ratio * rss0)
        if rss1 - rss0 > allowed:
            problems.append(
                f"RSS grew from {rss0 / MIB:.1f} MiB to {rss1 / MIB:.1f} MiB (medians of the "
                f"first and last thirds after warm-up; allowed +{allowed / MIB:.1f} MiB)"
            )
        if fd1 - fd0 > limits.fd_slack_running:
            problems.append(
                f"open fds grew from {fd0:g} to {fd1:g} under steady load "
                f"(allowed +{limits.fd_slack_running})"
            )
    if end_fds is not None and end_fds > baseline_fds + limits.fd_slack_end:
        problems.append(
            f"{end_fds} fds open after every client closed, {baseline_fds} before the load "
            f"(allowed +{limits.fd_slack_end})"
        )
    return problems, figures


class Sampler:
    """Samples one process's RSS, fds and TCP connections from a thread (psutil), off the
    load generator's event loop."""

    def __init__(self, pid: int, port: int | None, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.port = port
        self.interval = interval
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> Sample:
        """One sample now (raises psutil.NoSuchProcess when the process is gone)."""
        p = self.process
        clients = upstream = 0
        for conn in p.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr:
                continue
            if self.port is not None and conn.laddr.port == self.port:
                clients += 1
            else:
                upstream += 1
        return Sample(
            round(time.monotonic() - self.t0, 3),
            p.memory_info().rss,
            p.num_fds(),
            clients,
            upstream,
        )

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def settle_fds(self, target: int, timeout: float) -> tuple[int, float]:
        """Poll the fd count until it is at most `target` or `timeout` passes: the count and
        the seconds it took. The proxy keeps idle upstream connections pooled until
        llama-server closes them (cpp-httplib's keep-alive timeout: 5 s)."""
        t0 = time.monotonic()
        while True:
            fds = self.process.num_fds()
            waited = time.monotonic() - t0
            if fds <= target or waited >= timeout:
                return fds, waited
            time.sleep(0.1)


# -- the load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakSpec:
    """One soak run against a serve at `url`."""

    url: str
    clients: int = 64
    duration: float = 20.0
    #: Share of chat completions that stream.
    stream_ratio: float = 0.5
    #: Share of all requests that are small ones (/tokenize, /health, /v1/models, evenly).
    small_ratio: float = 0.2
    #: Completion tokens per chat request: each asks for a number from max_tokens/2 to
    #: max_tokens with ignore_eos, and its answer must carry exactly that many.
    max_tokens: int = 16
    #: Share of requests sent with `Connection: close`: connection churn on the proxy.
    close_ratio: float = 0.1
    #: Longest wait for one answer (queued requests wait for a slot inside llama-server).
    request_timeout: float = 300.0
    #: After `duration`, how long requests in flight may take to finish before they count lost.
    drain_timeout: float = 300.0
    sample_interval: float = 0.5
    #: After the clients closed, how long serve's fds may take to return to the baseline.
    settle_timeout: float = 20.0
    limits: Limits | None = None  # None: defaults, with warm-up from default_warmup(duration)
    seed: int = 1


@dataclass
class KindStats:
    """Figures of one kind of request."""

    requests: int = 0
    ok: int = 0
    lost: int = 0  # no complete answer: a transport error, a timeout, a cut connection
    failed: int = 0  # a complete answer with an error status
    corrupted: int = 0  # a 200 whose body is not a complete, valid answer
    tokens: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    first_byte_p50_ms: float = 0.0
    first_byte_p99_ms: float = 0.0

    @property
    def errors(self) -> int:
        return self.lost + self.failed + self.corrupted


@dataclass
class SoakReport:
    """Everything one soak run measured, and its verdict."""

    spec: dict[str, Any]
    serve_args: list[str] = field(default_factory=list)
    load_s: float = 0.0
    kinds: dict[str, KindStats] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    client_cpu_s: float = 0.0
    serve_cpu_s: float | None = None
    baseline_rss: int | None = None
    baseline_fds: int | None = None
    peak_rss: int | None = None
    peak_fds: int | None = None
    peak_client_conns: int | None = None
    peak_upstream_conns: int | None = None
    end_rss: int | None = None
    end_fds: int | None = None
    fd_settle_s: float | None = None
    stability: dict[str, float] = field(default_factory=dict)
    stability_problems: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(k.requests for k in self.kinds.values())

    @property
    def errors(self) -> int:
        return sum(k.errors for k in self.kinds.values())

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.errors == 0 and not self.stability_problems

    def to_json(self) -> str:
        data = asdict(self)
        data["requests"] = self.requests
        data["errors"] = self.errors
        data["ok"] = self.ok
        return json.dumps(data, indent=2)


@dataclass
class _Outcome:
    kind: str
    verdict: str  # ok, lost, failed or corrupted (see KindStats)
    latency: float
    first_byte: float | None = None
    check: Check = field(default_factory=Check)
    problem: str | None = None


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class _Load:
    """The clients: each picks a request, sends it, validates the answer, and starts over
    until the run's end; the request in flight at the end is always finished."""

    def __init__(self, spec: SoakSpec, progress: Callable[[str], None]) -> None:
        self.spec = spec
        self.progress = progress
        self.outcomes: list[_Outcome] = []
        self.stop_at = 0.0

    def _pick(self, rng: random.Random) -> str:
        spec = self.spec
        if rng.random() < spec.small_ratio:
            return rng.choice(SMALL_KINDS)
        return "stream" if rng.random() < spec.stream_ratio else "chat"

    async def _one(self, http: httpx.AsyncClient, rng: random.Random, cid: int, n: int) -> None:
        spec = self.spec
        kind = self._pick(rng)
        headers = {"Connection": "close"} if rng.random() < spec.close_ratio else {}
        expected = rng.randint(max(1, spec.max_tokens // 2), max(1, spec.max_tokens))
        chat = {
            "messages": [{"role": "user", "content": f"{rng.choice(PROMPTS)} (client {cid})"}],
            "max_tokens": expected,
            "ignore_eos": True,  # exactly `expected` tokens: the answer's own count proves it
        }
        content = f"soak client {cid} request {n}: the quick brown fox"
        method, path, body = {
            "chat": ("POST", "/v1/chat/completions", chat),
            "stream": ("POST", "/v1/chat/completions", {**chat, "stream": True}),
            "tokenize": ("POST", "/tokenize", {"content": content, "with_pieces": True}),
            "health": ("GET", "/health", None),
            "models": ("GET", "/v1/models", None),
        }[kind]
        t0 = time.monotonic()
        first: float | None = None
        try:
            async with http.stream(method, path, json=body, headers=headers) as resp:
                parts = []
                async for part in resp.aiter_raw():
                    if first is None:
                        first = time.monotonic() - t0
                    parts.append(part)
                raw = b"".join(parts)
                status, ctype = resp.status_code, resp.headers.get("content-type", "")
        except (httpx.TransportError, httpx.StreamError) as exc:
            lost = f"{type(exc).__name__}: {exc}"
            self.outcomes.append(_Outcome(kind, "lost", time.monotonic() - t0, first, problem=lost))
            return
        latency = time.monotonic() - t0
        if status != 200:
            failed = f"status {status}: {raw[:200]!r}"
            self.outcomes.append(_Outcome(kind, "failed", latency, first, problem=failed))
            return
        if kind == "chat":
            check = check_chat(status, ctype, raw, expected)
        elif kind == "stream":
            check = check_stream(status, ctype, raw, expected)
        elif kind == "tokenize":
            check = check_tokenize(status, ctype, raw, content)
        elif kind == "health":
            check = check_health(status, ctype, raw)
        else:
            check = check_models(status, ctype, raw)
        verdict = "corrupted" if check.problem else "ok"
        self.outcomes.append(_Outcome(kind, verdict, latency, first, check, check.problem))

    async def _client(self, http: httpx.AsyncClient, cid: int) -> None:
        rng = random.Random(self.spec.seed * 100_003 + cid)
        n = 0
        while time.monotonic() < self.stop_at:
            await self._one(http, rng, cid, n)
            n += 1

    async def run(self) -> float:
        """Run the clients for the spec's duration and drain them; the seconds it took."""
        spec = self.spec
        limits = httpx.Limits(max_connections=spec.clients, max_keepalive_connections=spec.clients)
        timeout = httpx.Timeout(spec.request_timeout, connect=30.0)
        async with httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=timeout) as http:
            t0 = time.monotonic()
            self.stop_at = t0 + spec.duration
            tasks = [asyncio.ensure_future(self._client(http, i)) for i in range(spec.clients)]
            ticker = asyncio.ensure_future(self._tick(t0))
            done, pending = await asyncio.wait(tasks, timeout=spec.duration + spec.drain_timeout)
            ticker.cancel()
            for task in pending:  # still no answer after the drain: lost
                task.cancel()
                late = f"no answer within {spec.drain_timeout:g} s after the run's end"
                self.outcomes.append(
                    _Outcome("unfinished", "lost", time.monotonic() - t0, problem=late)
                )
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()  # a bug in the load generator: let it crash loudly
            return time.monotonic() - t0

    async def _tick(self, t0: float) -> None:
        while True:
            await asyncio.sleep(5.0)
            bad = sum(1 for o in self.outcomes if o.verdict != "ok")
            self.progress(
                f"{time.monotonic() - t0:5.0f} s: {len(self.outcomes)} answers, {bad} errors"
            )


def _summarise(outcomes: list[_Outcome], report: SoakReport) -> None:
    for kind in (*KINDS, "unfinished"):
        mine = [o for o in outcomes if o.kind == kind]
        if not mine and kind == "unfinished":
            continue
        stats = KindStats(requests=len(mine))
        good = []
        shown: dict[str, int] = {}
        for o in mine:
            setattr(stats, o.verdict, getattr(stats, o.verdict) + 1)
            if o.verdict == "ok":
                stats.tokens += o.check.tokens
                good.append(o)
            else:
                shown[o.verdict] = shown.get(o.verdict, 0) + 1
                if shown[o.verdict] <= EXAMPLES_PER_KIND:
                    report.examples.append(f"{kind} {o.verdict}: {o.problem}")
        latencies = [o.latency * 1000 for o in good]
        firsts = [o.first_byte * 1000 for o in good if o.first_byte is not None]
        stats.p50_ms, stats.p99_ms = _percentile(latencies, 50), _percentile(latencies, 99)
        stats.first_byte_p50_ms = _percentile(firsts, 50)
        stats.first_byte_p99_ms = _percentile(firsts, 99)
        report.kinds[kind] = stats


def _new_loop_runner() -> Callable[[Any], Any]:
    from llamactl.serve.runner import run

    return run


def run_soak(
    spec: SoakSpec,
    pid: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> SoakReport:
    """Soak the serve at spec.url; sample process `pid` (serve itself) when given."""
    limits = spec.limits or Limits(warmup_s=default_warmup(spec.duration))
    report = SoakReport(spec={**asdict(spec), "limits": asdict(limits)})
    port = httpx.URL(spec.url).port
    sampler = Sampler(pid, port, spec.sample_interval) if pid is not None else None
    if sampler is not None:
        before = sampler.sample()
        report.baseline_rss, report.baseline_fds = before.rss, before.fds
        cpu0 = sampler.cpu_seconds()
        sampler.start()
    load = _Load(spec, progress)
    clock0 = time.process_time()
    report.load_s = _new_loop_runner()(load.run())
    report.client_cpu_s = time.process_time() - clock0
    _summarise(load.outcomes, report)
    ok_tokens = sum(k.tokens for k in report.kinds.values())
    report.tokens_per_s = ok_tokens / report.load_s if report.load_s else 0.0
    report.requests_per_s = report.requests / report.load_s if report.load_s else 0.0
    if sampler is not None:
        sampler.stop()
        report.serve_cpu_s = sampler.cpu_seconds() - cpu0
        samples = sampler.samples
        report.samples = samples
        assert report.baseline_fds is not None
        report.peak_rss = max((s.rss for s in samples), default=report.baseline_rss)
        report.peak_fds = max((s.fds for s in samples), default=report.baseline_fds)
        report.peak_client_conns = max((s.client_conns for s in samples), default=0)
        report.peak_upstream_conns = max((s.upstream_conns for s in samples), default=0)
        progress("load done; waiting for serve's fds to return to the baseline")
        end_fds, waited = sampler.settle_fds(
            report.baseline_fds + limits.fd_slack_end, spec.settle_timeout
        )
        report.end_fds, report.fd_settle_s = end_fds, round(waited, 2)
        report.end_rss = sampler.process.memory_info().rss
        # Judge only samples taken while the load ran: the drain's tail is not steady load.
        steady = [s for s in samples if s.t <= spec.duration]
        report.stability_problems, report.stability = stability_problems(
            steady, report.baseline_fds, end_fds, limits
        )
    return report


def format_report(report: SoakReport) -> str:
    """The report as text: per kind, then serve's resources, then the verdict."""
    spec = report.spec
    lines = [
        f"soak: {spec['clients']} clients for {spec['duration']:g} s against {spec['url']}"
        f" (stream ratio {spec['stream_ratio']:g}, small requests {spec['small_ratio']:g},"
        f" max_tokens {spec['max_tokens']}, Connection: close {spec['close_ratio']:g})",
    ]
    if report.serve_args:
        lines.append("serve: llamactl serve " + " ".join(report.serve_args))
    lines += [
        "",
        f"{'kind':<10} {'requests':>8} {'ok':>7} {'lost':>5} {'failed':>6} {'corrupt':>7}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'1st byte p50/p99 ms':>20}",
    ]
    for kind, k in report.kinds.items():
        lines.append(
            f"{kind:<10} {k.requests:>8} {k.ok:>7} {k.lost:>5} {k.failed:>6} {k.corrupted:>7}"
            f" {k.p50_ms:>8.0f} {k.p99_ms:>8.0f} "
            f"{f'{k.first_byte_p50_ms:.0f}/{k.first_byte_p99_ms:.0f}':>20}"
        )
    lines.append(
        f"{'total':<10} {report.requests:>8}  errors {report.errors};"
        f" {report.requests_per_s:.1f} requests/s, {report.tokens_per_s:.1f} tokens/s"
        f" over {report.load_s:.1f} s (run + drain); load generator CPU {report.client_cpu_s:.1f} s"
    )
    for example in report.examples:
        lines.append(f"  ! {example}")
    if report.baseline_rss is not None:
        lines += [
            "",
            "serve process     start      peak       end",
            f"RSS MiB      {_mib(report.baseline_rss):>9} {_mib(report.peak_rss):>9}"
            f" {_mib(report.end_rss):>9}",
            f"open fds     {report.baseline_fds:>9} {report.peak_fds:>9} {report.end_fds:>9}"
            f"   (end: {report.fd_settle_s:g} s after the clients closed)",
            f"TCP conns    peak {report.peak_client_conns} from clients, "
            f"{report.peak_upstream_conns} to llama-server; serve CPU {report.serve_cpu_s:.1f} s"
            f" ({1000 * (report.serve_cpu_s or 0) / max(report.requests, 1):.2f} ms/request)",
        ]
        st = report.stability
        if "rss_first_third" in st:
            lines.append(
                f"after warm-up ({spec['limits']['warmup_s']:g} s): RSS median "
                f"{st['rss_first_third'] / MIB:.1f} -> {st['rss_last_third'] / MIB:.1f} MiB"
                f" (slope {st.get('rss_slope_mib_per_min', 0.0):+.2f} MiB/min), fds median "
                f"{st['fd_first_third']:g} -> {st['fd_last_third']:g}"
            )
        else:
            lines.append("too few samples after warm-up to judge growth")
    else:
        lines.append("serve's resources not sampled (no process to watch)")
    for problem in report.stability_problems:
        lines.append(f"  ! {problem}")
    lines += ["", f"verdict: {'PASS' if report.ok else 'FAIL'}"]
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


# -- serve itself is started by tests/support/serve.py ----------------------------------------


def find_listener(port: int) -> int | None:
    """The pid of the process listening on this TCP port, when it can be seen."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None
