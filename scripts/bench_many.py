#!/usr/bin/env python3
"""Figures for docs/performance.md (many machines), in one run on the same model:

- tokens/s (prompt, generation) of llama-bench locally, of llama-bench --rpc over two loopback
  `llamactl worker`s, and through `llamactl serve --rpc` over the same two workers (and
  through a local `llamactl serve`, for the same request), from llama-server's own timings;
- requests/s through a `llamactl serve --remote` front over one and over two remote serves.

    .venv/bin/python scripts/bench_many.py [--runs 3] [--threads 1] [--json out.json]

Everything on 127.0.0.1; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from support.serve import Serve, launch, stop  # noqa: E402
from support.workers import Worker  # noqa: E402
from support.workers import launch as launch_worker  # noqa: E402

from llamactl.build.cache import find_server_binary  # noqa: E402
from llamactl.models.default import default_model_path  # noqa: E402
from llamactl.net import free_port  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper and a storm. " * 4


def llama_bench(bench: Path, model: Path, threads: int, rpc: str | None, runs: int) -> dict:
    argv = [str(bench), "-m", str(model), "-p", "64", "-n", "32", "-t", str(threads)]
    argv += ["-r", str(runs), "-o", "json"]
    if rpc:
        argv += ["--rpc", rpc, "-ngl", "999"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True)
    rows = json.loads(out.stdout)
    figures = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        figures[kind] = round(float(row["avg_ts"]), 1)
    return figures


def through(serve: Serve, runs: int) -> dict:
    """Median prompt and generation tokens/s of one request, from llama-server's timings."""
    pp, tg = [], []
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 32,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    httpx.post(f"{serve.url}/v1/chat/completions", json=body, timeout=600)  # warm-up
    for _ in range(runs):
        r = httpx.post(f"{serve.url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        t = r.json()["timings"]
        pp.append(float(t["prompt_per_second"]))
        tg.append(float(t["predicted_per_second"]))
    return {"pp": round(statistics.median(pp), 1), "tg": round(statistics.median(tg), 1)}


def requests_per_second(url: str, seconds: float, clients: int) -> float:
    """Chat requests (8 tokens each) answered per second by `clients` threads."""
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    done = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal done
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < deadline:
                if c.post(f"{url}/v1/chat/completions", json=body).status_code == 200:
                    with lock:
                        done += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(done / (time.monotonic() - t0), 2)


@contextlib.contextmanager
def front(home: Path, urls: list[str]) -> Iterator[str]:
    port = free_port()
    args = [a for u in urls for a in ("--remote", u)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "LLAMACTL_HOME": str(home)},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening at"), line
        yield f"http://127.0.0.1:{port}"
    finally:
        from llamactl.proc import stop_group

        stop_group(proc.pid, grace=10, popen=proc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of each worker")
    parser.add_argument("--seconds", type=float, default=20.0, help="per requests/s figure")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    server = find_server_binary()
    bench_bin = server.with_name("llama-bench")
    rpc_bin = server.with_name("ggml-rpc-server")
    model = default_model_path()
    out: dict[str, Any] = {"model": model.name, "threads": args.threads}
    # A shared machine's load changes every figure: say what it was.
    out["load_before"] = [round(x, 1) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-many-"))
    workers: list[Worker] = []
    serves: list[Serve] = []
    try:
        print("llama-bench, local ...", file=sys.stderr)
        out["llama_bench_local"] = llama_bench(bench_bin, model, args.threads, None, args.runs)
        for i in range(2):
            w = launch_worker(tmp / f"w{i}", "--threads", str(args.threads), rpc_bin=rpc_bin)
            workers.append(w)
            w.wait_for("worker ready at")
        rpc = ",".join(w.endpoint for w in workers)
        print("llama-bench --rpc over two workers ...", file=sys.stderr)
        out["llama_bench_rpc2"] = llama_bench(bench_bin, model, args.threads, rpc, args.runs)
        print("llamactl serve --rpc over the same workers ...", file=sys.stderr)
        s = launch(server, model, tmp / "head", "--rpc", rpc, "-ngl", "999")
        serves.append(s)
        s.wait_listening()
        out["llamactl_rpc2"] = through(s, args.runs)
        stop(serves.pop())
        for w in workers:
            w.stop()
        workers.clear()
        print("llamactl serve, local ...", file=sys.stderr)
        s = launch(server, model, tmp / "local", "-t", str(args.threads))
        serves.append(s)
        s.wait_listening()
        out["llamactl_local"] = through(s, args.runs)
        stop(serves.pop())

        print("remote replicas ...", file=sys.stderr)
        for i in range(2):
            s = launch(server, model, tmp / f"replica{i}", "-t", "1")
            serves.append(s)
            s.wait_listening()
        with front(tmp / "front1", [serves[0].url]) as url:
            out["remote_1_rps"] = requests_per_second(url, args.seconds, args.clients)
        with front(tmp / "front2", [s.url for s in serves]) as url:
            out["remote_2_rps"] = requests_per_second(url, args.seconds, args.clients)
    finally:
        for s in serves:
            stop(s)
        for w in workers:
            w.stop()
    out["load_after"] = [round(x, 1) for x in os.getloadavg()]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
