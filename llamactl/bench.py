"""The proxy benchmark: llamactl against llama-server direct and llama-server's router mode, in
one run, on the same model: POST /tokenize throughput and latency (wrk, 4 connections), streamed
tokens/s with 8 concurrent streamed chat completions, and time from start to the first
successful request, with ratios against direct and router (`llamactl bench`,
scripts/bench_proxy.py; figures in docs/performance.md).

Targets: `direct` (llama-server -m MODEL), `router` (llama-server --models-dir DIR, DIR holding a
symlink to MODEL), `llamactl` (`llamactl serve` in front of llama-server: supervisor and proxy),
and `proxy` (the proxy alone, in front of a llama-server through a static provider: what the
proxy costs without the supervisor). Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamactl.net import free_port

TARGETS = ("direct", "router", "llamactl", "proxy", "router2", "many")
#: Targets that serve two names of the model (symlinks), loaded both, requests alternating.
TWO_MODELS = ("router2", "many")
TWO_NAMES = ("alpha", "beta")
PROMPT = "Write a short story about a llama who learns to code."


@dataclass
class Result:
    """One target's figures in one run."""

    target: str
    ready_s: float = 0.0
    tokenize_rps: float = 0.0
    tokenize_mean_ms: float = 0.0
    tokenize_p50_ms: float = 0.0
    tokenize_p99_ms: float = 0.0
    stream_tokens_per_s: float = 0.0
    stream_tokens: int = 0
    #: Median time to the first streamed token of the concurrent streams (ms).
    ttft_ms: float = 0.0
    #: Medians of the per-run ratios to direct (each run measures direct next to the target,
    #: which cancels most of the drift of a shared, noisy machine).
    tokenize_vs_direct: float = 0.0
    stream_vs_direct: float = 0.0
    #: Proxy alone: tokens/s of streams through the proxy over streams straight to the same
    #: llama-server, run side by side in the same batches (no drift between the two).
    paired_stream_ratio: float = 0.0
    errors: list[str] = field(default_factory=list)


def post(port: int, path: str, body: dict, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a target through llamactl.proc (own session, dies with the benchmark), its output
    to `log`."""
    from llamactl import proc as procs

    with open(log, "ab") as out:
        return procs.spawn(argv, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL after a grace period."""
    from llamactl import proc as procs

    procs.stop_group(proc.pid, grace=10, popen=proc)


def _names(name: str | None) -> list[str | None]:
    """The model names a target answers to: one (or none), or two, comma-separated."""
    return [n for n in name.split(",")] if name else [None]


def wait_first_success(
    port: int, model: Callable[[], str | None], proc: subprocess.Popen[bytes], t0: float
) -> float:
    """Seconds from t0 until POST /tokenize has answered 200 for every model name the target
    serves (polled every 5 ms)."""
    deadline = t0 + 180
    pending: list[str | None] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} while starting")
        try:
            if pending is None:
                pending = _names(model())
            name = pending[0]
            body = {"content": "hello"} if name is None else {"model": name, "content": "hello"}
            status, _ = post(port, "/tokenize", body, timeout=60)
            if status == 200:
                pending.pop(0)
                if not pending:
                    return time.monotonic() - t0
                continue
        except (OSError, http.client.HTTPException, LookupError, ValueError):
            pass
        time.sleep(0.005)
    raise TimeoutError("no successful request within 180 s")


def router_model_name(port: int, count: int = 1) -> str:
    status, data = get(port, "/v1/models")
    if status != 200:
        raise LookupError("router not up")
    return ",".join(str(m["id"]) for m in json.loads(data)["data"][:count])


def run_wrk(port: int, model: str | None, duration: float, connections: int, tmp: Path) -> dict:
    text = "Hello, world! The quick brown fox jumps over the lazy dog."
    bodies = [{"content": text, **({"model": n} if n else {})} for n in _names(model)]
    script = tmp / "tokenize.lua"
    if len(bodies) == 1:
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(bodies[0]))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    else:  # every other request names the other model: both stay in use
        quoted = ", ".join(json.dumps(json.dumps(b)) for b in bodies)
        script.write_text(
            f"local bodies = {{{quoted}}}\nlocal i = 0\n"
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            "request = function()\n  i = i + 1\n"
            "  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\nend\n"
        )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/tokenize",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    mean = ms(re.search(r"Latency\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "mean": mean,
        "p50": p50,
        "p99": p99,
        "non2xx": int(bad.group(1)) if bad else 0,
    }


def run_streams(
    port: int, model: str | None, streams: int, max_tokens: int
) -> tuple[int, float, float]:
    """Total streamed tokens, seconds, and the median time to first token (s) of `streams`
    concurrent streamed chat completions (alternating between the target's model names)."""
    counts = [0] * streams
    firsts: list[float] = []
    errors: list[str] = []
    body: dict = {
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    names = _names(model)
    payloads = [json.dumps({**body, **({"model": n} if n else {})}) for n in names]
    barrier = threading.Barrier(streams + 1)

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        barrier.wait()
        start = time.monotonic()
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=payloads[i % len(payloads)],
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                errors.append(f"status {resp.status}: {resp.read()[:200]!r}")
                return
            for line in resp:
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        if counts[i] == 0:
                            firsts.append(time.monotonic() - start)
                        counts[i] += 1
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[0]}")
    return sum(counts), elapsed, statistics.median(firsts) if firsts else 0.0


def paired_streams(direct_port: int, proxy_port: int, rounds: int, max_tokens: int) -> float:
    """Streams straight to llama-server and through the proxy at the same time, two of each
    per round (llama-server's default 4 slots: one batch), alternated: the ratio of their mean
    tokens/s. Load on the machine hits both sides alike."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
    )
    rates: dict[int, list[float]] = {direct_port: [], proxy_port: []}
    errors: list[str] = []

    def one(port: int, barrier: threading.Barrier) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        tokens = 0
        try:
            barrier.wait()
            start = time.monotonic()
            conn.request("POST", "/v1/chat/completions", body=body)
            resp = conn.getresponse()
            for line in resp:
                if line.startswith(b"data: {") and b'"content"' in line:
                    tokens += 1
            rates[port].append(tokens / (time.monotonic() - start))
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    for round_no in range(rounds):
        order = [direct_port, proxy_port] * 2
        if round_no % 2:
            order.reverse()
        barrier = threading.Barrier(len(order))
        threads = [threading.Thread(target=one, args=(p, barrier)) for p in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} paired streams failed: {errors[0]}")
    return statistics.mean(rates[proxy_port]) / statistics.mean(rates[direct_port])


def _launcher() -> list[str]:
    """The console command, as a user starts it (python -m adds runpy's few milliseconds)."""
    command = Path(sys.executable).parent / "llamactl"
    return [str(command)] if command.is_file() else [sys.executable, "-m", "llamactl"]


def start_target(
    target: str, spec: BenchSpec, tmp: Path
) -> tuple[list[subprocess.Popen[bytes]], int, Callable[[], str | None], int | None]:
    """Start a target; return its processes, its port, how to name the model and, for the
    proxy alone, the port of the llama-server behind it."""
    port = free_port()
    log = tmp / f"{target}.log"
    server = str(spec.server_bin)
    model = str(spec.model)
    if target == "direct":
        proc = spawn([server, "-m", model, "--host", "127.0.0.1", "--port", str(port)], log)
        return [proc], port, lambda: None, None
    if target == "router":
        models_dir = tmp / "models"
        models_dir.mkdir(exist_ok=True)
        link = models_dir / Path(model).name
        if not link.exists():
            link.symlink_to(Path(model).resolve())
        proc = spawn(
            [server, "--models-dir", str(models_dir), "--host", "127.0.0.1", "--port", str(port)],
            log,
        )
        return [proc], port, lambda: router_model_name(port), None
    if target in TWO_MODELS:
        models_dir = tmp / "two-models"
        models_dir.mkdir(exist_ok=True)
        for n in TWO_NAMES:
            link = models_dir / f"{n}.gguf"
            if not link.exists():
                link.symlink_to(Path(model).resolve())
        if target == "router2":
            proc = spawn(
                [server, "--models-dir", str(models_dir), "--host", "127.0.0.1",
                 "--port", str(port)],
                log,
            )  # fmt: skip
            return [proc], port, lambda: router_model_name(port, 2), None
        proc = spawn(
            [*_launcher(), "serve", "--server-bin", server, "--models-dir", str(models_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            log,
        )  # fmt: skip
        return [proc], port, lambda: ",".join(TWO_NAMES), None
    if target == "llamactl":
        proc = spawn(
            [
                *_launcher(),
                "serve",
                "--server-bin",
                server,
                "-m",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            log,
        )
        return [proc], port, lambda: None, None
    if target == "proxy":
        upstream_port = free_port()
        proc = spawn(
            [
                sys.executable,
                "-m",
                "llamactl.bench",
                "_static-proxy",
                server,
                model,
                str(port),
                str(upstream_port),
            ],
            log,
        )
        return [proc], port, lambda: None, upstream_port
    raise ValueError(target)


def measure(target: str, spec: BenchSpec, tmp: Path) -> Result:
    result = Result(target)
    t0 = time.monotonic()
    procs, port, model_name, upstream_port = start_target(target, spec, tmp)
    try:
        result.ready_s = wait_first_success(port, model_name, procs[0], t0)
        name = model_name()
        for i in range(50):  # warm the connections and caches
            n = _names(name)[i % len(_names(name))]
            post(port, "/tokenize", {"content": "warm up", **({"model": n} if n else {})})
        wrk = run_wrk(port, name, spec.duration, spec.connections, tmp)
        if wrk["non2xx"]:
            result.errors.append(f"{wrk['non2xx']} non-2xx answers to /tokenize")
        result.tokenize_rps = wrk["rps"]
        result.tokenize_mean_ms = wrk["mean"]
        result.tokenize_p50_ms = wrk["p50"]
        result.tokenize_p99_ms = wrk["p99"]
        tokens, elapsed, ttft = run_streams(port, name, spec.streams, spec.max_tokens)
        result.ttft_ms = ttft * 1000
        result.stream_tokens = tokens
        result.stream_tokens_per_s = tokens / elapsed
        if upstream_port is not None:
            result.paired_stream_ratio = paired_streams(
                upstream_port, port, spec.paired_rounds, spec.max_tokens
            )
    except Exception as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        for proc in procs:
            stop(proc)
    return result


# -- the proxy alone, behind a static provider (a hidden sub-command) ----------------------------


def static_proxy(server: str, model: str, port: int, upstream_port: int) -> int:
    """Start llama-server and the proxy in front of it; serve until SIGTERM."""
    # llama-server first: its load overlaps the proxy's imports, as it would in a serve that
    # starts the model before anything else.
    from llamactl import net
    from llamactl import proc as procs

    proc = procs.spawn(
        [server, "-m", model, "--host", "127.0.0.1", "--port", str(upstream_port)],
        stdout=None,
        stderr=None,
    )
    from llamactl.serve.proxy import Proxy, ProxyConfig, Upstream
    from llamactl.serve.runner import run as run_loop

    class Static:
        def __init__(self) -> None:
            self.upstream = Upstream("bench", "127.0.0.1", upstream_port, None, 1)
            self.ready = asyncio.Event()

        async def acquire(
            self, model: str | None, method: bytes = b"GET", path: bytes = b"/"
        ) -> Upstream:
            if not self.ready.is_set():
                await self.ready.wait()
            return self.upstream

        def release(self, upstream: Upstream, outcome: int, elapsed: float = 0.0) -> None:
            pass

        def replayable(self, upstream: Upstream) -> bool:
            return False

    async def main() -> None:
        provider = Static()
        proxy = Proxy(ProxyConfig(port=port), provider)
        await proxy.start()
        # The one readiness loop (llamactl.net), in a thread: the proxy already listens.
        await asyncio.to_thread(
            net.wait_ready,
            "127.0.0.1",
            upstream_port,
            deadline_s=180,
            exited=proc.poll,
            interval_s=0.005,
        )
        provider.ready.set()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        await proxy.close(grace=0)

    try:
        run_loop(main())
    finally:
        procs.stop_group(proc.pid, grace=10, popen=proc)
    return 0


# -- report --------------------------------------------------------------------------------------


def median_result(target: str, results: list[Result]) -> Result:
    ok = [r for r in results if not r.errors] or results
    med = Result(target)
    for name in (
        "ready_s",
        "tokenize_rps",
        "tokenize_mean_ms",
        "tokenize_p50_ms",
        "tokenize_p99_ms",
        "stream_tokens_per_s",
        "paired_stream_ratio",
        "ttft_ms",
    ):
        setattr(med, name, statistics.median(getattr(r, name) for r in ok))
    med.stream_tokens = ok[0].stream_tokens
    med.errors = [e for r in results for e in r.errors]
    return med


def report(med: dict[str, Result], runs: int) -> str:
    lines = [
        f"medians of {runs} run(s); /tokenize: wrk -t1 -c4; streams: concurrent streamed chats;"
        " ratios to direct: medians of per-run ratios",
        "",
        f"{'target':<9} {'ready s':>8} {'req/s':>9} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'tok/s':>7} {'ttft ms':>8}  vs direct (req/s, tok/s, ready)   vs router (req/s)",
    ]
    direct = med.get("direct")
    for target, r in med.items():
        # Two models are compared with router mode serving the same two.
        router = med.get("router2" if target in TWO_MODELS else "router")
        vs_direct = vs_router = ""
        if direct and target != "direct" and direct.tokenize_rps:
            req_ratio = r.tokenize_vs_direct or r.tokenize_rps / direct.tokenize_rps
            tok_ratio = r.stream_vs_direct or r.stream_tokens_per_s / max(
                direct.stream_tokens_per_s, 1e-9
            )
            vs_direct = (
                f"{req_ratio:.2f}x, {tok_ratio * 100:.1f}%, "
                f"{(r.ready_s - direct.ready_s) * 1000:+.0f} ms"
            )
        if router and target not in ("router", "router2") and router.tokenize_rps:
            vs_router = f"{r.tokenize_rps / router.tokenize_rps:.2f}x ({router.target})"
        lines.append(
            f"{target:<9} {r.ready_s:8.3f} {r.tokenize_rps:9.0f} {r.tokenize_mean_ms:8.3f}"
            f" {r.tokenize_p50_ms:7.3f} {r.tokenize_p99_ms:7.2f} {r.stream_tokens_per_s:7.1f}"
            f" {r.ttft_ms:8.1f}  {vs_direct:<33} {vs_router}"
        )
    if direct:
        for target in ("llamactl", "proxy"):
            other = med.get(target)
            if other:
                added = other.tokenize_p50_ms - direct.tokenize_p50_ms
                lines.append(f"added median latency ({target}): {added:.3f} ms")
    alone = med.get("proxy")
    if alone and alone.paired_stream_ratio:
        lines.append(
            "streamed tokens/s through the proxy vs straight to the same llama-server, side by"
            f" side: {alone.paired_stream_ratio * 100:.1f}%"
        )
    for target, r in med.items():
        for err in r.errors:
            lines.append(f"error ({target}): {err}")
    return "\n".join(lines)


def default_paths() -> tuple[Path | None, Path | None]:
    """llamactl's own llama-server build and the default model, when they exist."""
    server = model = None
    try:
        from llamactl.build.cache import find_server_binary

        server = find_server_binary()
    except Exception:  # no build yet: the caller must name one
        pass
    try:
        from llamactl import paths
        from llamactl.models.catalog import DEFAULT_MODEL

        candidate = paths.cache_dir() / "models" / DEFAULT_MODEL.filename
        model = candidate if candidate.is_file() else None
    except Exception:  # no default model yet: the caller must name one
        pass
    return server, model


@dataclass(frozen=True)
class BenchSpec:
    """What to measure and how long."""

    server_bin: Path
    model: Path
    targets: tuple[str, ...] = TARGETS
    runs: int = 1
    duration: float = 6.0
    connections: int = 4
    streams: int = 8
    max_tokens: int = 64
    paired_rounds: int = 4
    ready_rounds: int = 10  # alternating starts of direct and llamactl for time to ready
    swap_rounds: int = 3  # forced swaps between two models under --models-max 1


def run(spec: BenchSpec, progress: Callable[[str], None] = print) -> dict[str, list[Result]]:
    """Measure every target `spec.runs` times, in turn; each run's results as they come."""
    if shutil.which("wrk") is None:
        from llamactl.errors import UsageError

        raise UsageError("the benchmark needs wrk", hint="apt-get install wrk")
    results: dict[str, list[Result]] = {t: [] for t in spec.targets}
    with tempfile.TemporaryDirectory(prefix="llamactl-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for run_no in range(spec.runs):
            # Each run starts with another target, so that a machine that drifts during a
            # run does not always favour the same one.
            shift = run_no % len(spec.targets)
            for target in spec.targets[shift:] + spec.targets[:shift]:
                r = measure(target, spec, tmp)
                results[target].append(r)
                progress(
                    f"run {run_no + 1} {target}: ready {r.ready_s:.3f} s, "
                    f"{r.tokenize_rps:.0f} req/s (p50 {r.tokenize_p50_ms:.3f} ms), "
                    f"{r.stream_tokens_per_s:.1f} tok/s {'; '.join(r.errors)}"
                )
    return results


def run_ready(spec: BenchSpec, progress: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Time to the first successful request, `spec.ready_rounds` starts of direct and of
    llamactl, alternating which goes first: one start per target per run is too few for a
    figure of a few hundred milliseconds on a noisy machine."""
    ready: dict[str, list[float]] = {"direct": [], "llamactl": []}
    with tempfile.TemporaryDirectory(prefix="llamactl-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for round_no in range(spec.ready_rounds):
            order = ("direct", "llamactl") if round_no % 2 == 0 else ("llamactl", "direct")
            for target in order:
                t0 = time.monotonic()
                procs, port, model_name, _ = start_target(target, spec, tmp)
                try:
                    ready[target].append(wait_first_success(port, model_name, procs[0], t0))
                finally:
                    for proc in procs:
                        stop(proc)
            progress(
                f"ready round {round_no + 1}: direct {ready['direct'][-1]:.3f} s, "
                f"llamactl {ready['llamactl'][-1]:.3f} s"
            )
    return ready


def run_swap(spec: BenchSpec, progress: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Forced swaps: `llamactl serve --models-dir` (two names) `--models-max 1` with one
    model loaded, then a request for the other, timed to its answer; next to it, direct
    llama-server's own time from start to its first answer (the load a swap cannot avoid)."""
    out: dict[str, list[float]] = {"swap": [], "load": []}
    with tempfile.TemporaryDirectory(prefix="llamactl-bench-") as tmpdir:
        tmp = Path(tmpdir)
        models_dir = tmp / "two-models"
        models_dir.mkdir()
        for n in TWO_NAMES:
            (models_dir / f"{n}.gguf").symlink_to(Path(spec.model).resolve())
        port = free_port()
        proc = spawn(
            [*_launcher(), "serve", "--server-bin", str(spec.server_bin), "--models-dir",
             str(models_dir), "--models-max", "1", "--host", "127.0.0.1", "--port", str(port)],
            tmp / "swap.log",
        )  # fmt: skip
        try:
            wait_first_success(port, lambda: TWO_NAMES[0], proc, time.monotonic())
            for round_no in range(spec.swap_rounds):
                other: str = TWO_NAMES[(round_no + 1) % 2]
                t0 = time.monotonic()
                out["swap"].append(
                    wait_first_success(port, functools.partial(str, other), proc, t0)
                )
                d0 = time.monotonic()
                procs, dport, name, _ = start_target("direct", spec, tmp)
                try:
                    out["load"].append(wait_first_success(dport, name, procs[0], d0))
                finally:
                    for p in procs:
                        stop(p)
                progress(
                    f"swap round {round_no + 1}: swap {out['swap'][-1]:.3f} s, "
                    f"direct load {out['load'][-1]:.3f} s"
                )
        finally:
            stop(proc)
    return out


def report_swap(swap: dict[str, list[float]]) -> str:
    if not swap.get("swap"):
        return ""
    extra = [(s - d) * 1000 for s, d in zip(swap["swap"], swap["load"], strict=False)]
    return (
        f"forced swap (--models-max 1), {len(extra)} rounds: median "
        f"{statistics.median(swap['swap']):.3f} s; "
        f"direct load median {statistics.median(swap['load']):.3f} s; swap - load per round: "
        f"median {statistics.median(extra):+.0f} ms (min {min(extra):+.0f}, max {max(extra):+.0f})"
    )


def report_ready(ready: dict[str, list[float]]) -> str:
    direct, ours = ready["direct"], ready["llamactl"]
    if not direct or not ours:
        return ""
    diffs = [(b - a) * 1000 for a, b in zip(direct, ours, strict=False)]
    return (
        f"time to ready, {len(direct)} alternating starts each: direct median "
        f"{statistics.median(direct):.3f} s, llamactl median {statistics.median(ours):.3f} s; "
        f"llamactl - direct per round: median {statistics.median(diffs):+.0f} ms "
        f"(min {min(diffs):+.0f}, max {max(diffs):+.0f})"
    )


def medians(results: dict[str, list[Result]]) -> dict[str, Result]:
    """The median of each figure per target, and of its per-run ratios to direct."""
    med = {t: median_result(t, rs) for t, rs in results.items()}
    direct = results.get("direct")
    if direct:
        for target, rs in results.items():
            pairs = [
                (r, d)
                for r, d in zip(rs, direct, strict=False)
                if not r.errors and not d.errors and d.tokenize_rps and d.stream_tokens_per_s
            ]
            if pairs:
                med[target].tokenize_vs_direct = statistics.median(
                    r.tokenize_rps / d.tokenize_rps for r, d in pairs
                )
                med[target].stream_vs_direct = statistics.median(
                    r.stream_tokens_per_s / d.stream_tokens_per_s for r, d in pairs
                )
    return med


def to_json(results: dict[str, list[Result]]) -> str:
    return json.dumps({t: [asdict(r) for r in rs] for t, rs in results.items()}, indent=2)


if __name__ == "__main__":
    # `python -m llamactl.bench _static-proxy SERVER MODEL PORT UPSTREAM_PORT` (the proxy target)
    if sys.argv[1:2] == ["_static-proxy"]:
        sys.exit(static_proxy(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    sys.exit("usage: llamactl bench, or scripts/bench_proxy.py")
