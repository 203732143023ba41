#!/usr/bin/env python3
"""Soak `llamactl serve`: many concurrent clients, streamed and plain chat completions plus
/tokenize, /health and /v1/models, for a bounded time; every answer validated; serve's RSS and
open fds sampled (see tests/support/soak.py and docs/reliability.md).

    .venv/bin/python scripts/soak.py --duration 300 [--clients 64] [--json out.json]
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8080 [--pid PID]

Exit 0 when every answer was complete and valid and serve's memory and fds stayed flat;
1 otherwise; 2 when serve could not be started.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the soak's client machinery lives in tests/support

from support import serve as serving  # noqa: E402
from support import soak  # noqa: E402  (after the path set-up above)

from llamactl import bench  # noqa: E402

#: llama-server's own default of 4 slots (-np auto on one model), so that 64 clients queue
#: inside it; 2048 context tokens split over 4 slots leaves 512 per request, ten times what a
#: soak request needs, and keeps the KV cache small; one compute thread: on a small machine
#: shared with the clients and the proxy, llama.cpp's threads wait for each other whenever one
#: is descheduled (2 cores, 2 threads: 4 times fewer tokens/s than 1 thread, measured).
DEFAULT_SERVE_ARGS = "-np 4 -c 2048 -t 1"


def main(argv: list[str]) -> int:
    server, model = bench.default_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--stream-ratio", type=float, default=0.5,
                        help="share of chat completions that stream")  # fmt: skip
    parser.add_argument("--small-ratio", type=float, default=0.2,
                        help="share of /tokenize, /health, /v1/models requests")  # fmt: skip
    parser.add_argument("--close-ratio", type=float, default=0.1,
                        help="share of requests sent with Connection: close")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="tokens per chat completion: from half of this to this")  # fmt: skip
    parser.add_argument("--server-bin", type=Path, default=server)
    parser.add_argument("--model", type=Path, default=model)
    parser.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS,
                        help=f"more flags for serve (default {DEFAULT_SERVE_ARGS!r})")  # fmt: skip
    parser.add_argument("--url", help="soak this running server instead of starting one")
    parser.add_argument("--pid", type=int,
                        help="with --url: the pid to sample (default: the listener)")  # fmt: skip
    parser.add_argument("--warmup", type=float, help="seconds not judged for growth")
    parser.add_argument("--rss-slack-mib", type=float, default=16.0)
    parser.add_argument("--fd-slack", type=int, default=16, help="fd growth under load")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report and samples here")
    args = parser.parse_args(argv)

    limits = soak.Limits(
        warmup_s=soak.default_warmup(args.duration) if args.warmup is None else args.warmup,
        rss_slack_bytes=int(args.rss_slack_mib * soak.MIB),
        fd_slack_running=args.fd_slack,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    served = None
    serve_args = args.serve_args.split()
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        if pid is None:
            import httpx

            port = httpx.URL(url).port
            pid = soak.find_listener(port) if port else None
            if pid is None:
                progress("note: no process found listening there: resources not sampled")
        serve_args = []
    else:
        if args.server_bin is None or args.model is None:
            parser.error("--server-bin and --model are needed (no build or model found)")
        log_dir = Path(tempfile.mkdtemp(prefix="llamactl-soak-"))
        progress(f"starting llamactl serve {' '.join(serve_args)} (logs in {log_dir})")
        try:
            # serve's home (state record, llama-server's log) goes next to serve's own output.
            served = serving.start(args.server_bin, args.model, log_dir / "home", *serve_args)
        except AssertionError as exc:  # serve did not start: its stderr is in the message
            print(exc, file=sys.stderr)
            return 2
        url, pid = served.url, served.proc.pid
    spec = soak.SoakSpec(
        url=url,
        clients=args.clients,
        duration=args.duration,
        stream_ratio=args.stream_ratio,
        small_ratio=args.small_ratio,
        close_ratio=args.close_ratio,
        max_tokens=args.max_tokens,
        limits=limits,
        seed=args.seed,
    )
    try:
        report = soak.run_soak(spec, pid=pid, progress=progress)
    finally:
        if served is not None:
            serving.stop(served)
            code = served.proc.returncode
            if code not in (0, 143, -15):
                progress(f"warning: serve exited with {code} (logs in {log_dir})")
    report.serve_args = serve_args
    print(soak.format_report(report))
    if args.json:
        args.json.write_text(report.to_json())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
