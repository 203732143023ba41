#!/usr/bin/env python3
"""Measure llamactl's proxy against llama-server direct and llama-server's router mode, in one
run, on the same model (the same as `llamactl bench`; see llamactl/bench.py and
docs/performance.md).

    .venv/bin/python scripts/bench_proxy.py --server-bin PATH --model PATH [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamactl import bench


def main(argv: list[str]) -> int:
    server, model = bench.default_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-bin", type=Path, default=server, required=server is None)
    parser.add_argument("--model", type=Path, default=model, required=model is None)
    parser.add_argument("--targets", default=",".join(bench.TARGETS))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--duration", type=float, default=6.0, help="wrk seconds")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ready-rounds", type=int, default=10,
                        help="starts of direct and llamactl, for time to ready")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    spec = bench.BenchSpec(
        server_bin=args.server_bin,
        model=args.model,
        targets=tuple(t for t in args.targets.split(",") if t),
        runs=args.runs,
        duration=args.duration,
        connections=args.connections,
        streams=args.streams,
        max_tokens=args.max_tokens,
        ready_rounds=args.ready_rounds,
    )
    results = bench.run(spec, progress=lambda line: print(line, flush=True))
    ready = {}
    if spec.ready_rounds > 0 and {"direct", "llamactl"} <= set(spec.targets):
        ready = bench.run_ready(spec, progress=lambda line: print(line, flush=True))
    print()
    print(bench.report(bench.medians(results), spec.runs))
    if ready:
        print(bench.report_ready(ready))
    if args.json:
        args.json.write_text(bench.to_json(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
