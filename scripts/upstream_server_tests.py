#!/usr/bin/env python3
"""Run llama.cpp's own server tests (vendor/llama.cpp/tools/server/tests) twice: against the
llama-server that llamactl built, and through `llamactl serve` (LLAMA_SERVER_BIN_PATH names a
script that runs `llamactl serve "$@"`). Print each file's pass counts on both sides and every
test that passes on one side only; exit 1 when a test passes direct but not through llamactl.

Models come from the local default model (scripts/upstream_plugin.py): nothing is downloaded.
A difference is run again (--retries) before it counts, as a few upstream tests are flaky.

    .venv/bin/python scripts/upstream_server_tests.py              # the files that need no network
    .venv/bin/python scripts/upstream_server_tests.py --set quick  # what tests/ runs of them
    .venv/bin/python scripts/upstream_server_tests.py --set all    # every file named below
    .venv/bin/python scripts/upstream_server_tests.py unit/test_basic.py -k health
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))

from llamactl import net, paths  # noqa: E402

#: The quick share of NO_NETWORK (40 tests: start-up, props, tokenizing, API keys, CORS, media
#: paths) that tests/test_upstream_real.py runs, so that the README's test command stays short.
QUICK = ("unit/test_basic.py", "unit/test_tokenize.py", "unit/test_security.py")
#: Files whose tests run on the default model here (no network, no other model).
NO_NETWORK = (
    "unit/test_basic.py",
    "unit/test_tokenize.py",
    "unit/test_security.py",
    "unit/test_chat_completion.py",
    "unit/test_completion.py",
    "unit/test_metrics.py",
)
#: Files that mostly want other models (embeddings, tool-calling templates...): run with
#: --set all; the tests that can run on the default model are compared all the same.
OTHERS = (
    "unit/test_compat_anthropic.py",
    "unit/test_compat_oai_responses.py",
    "unit/test_stream.py",
    "unit/test_ignore_eos.py",
    "unit/test_ctx_shift.py",
    "unit/test_sleep.py",
    "unit/test_slot_save.py",
    "unit/test_proxy.py",
    "unit/test_kv_keep_only_active.py",
    "unit/test_template.py",
    "unit/test_tool_call.py",
    "unit/test_infill.py",
)
#: Router mode's tests (llama-server with no model, --models-preset from the plugin): run with
#: --set router, apart from the rest, as their servers load several models each.
ROUTER = ("unit/test_router.py",)
#: The share of ROUTER that tests/test_upstream_real.py runs (router-level /props, streaming
#: to a named and an unknown model, load and unload, autoload off, API keys, reload, and two
#: of the scheduler's tests; and the resumable streams of a router, from the `all` set): about
#: a minute and a half where the whole file takes two or three.
ROUTER_QUICK = (
    *(
        f"unit/test_router.py::test_router_{name}"
        for name in (
            "props",
            "chat_completion_stream",
            "unload_model",
            "no_models_autoload",
            "api_key_required",
            "reload_models",
            "queue_does_not_evict_busy_model",
            "queue_client_disconnect_keeps_model",
        )
    ),
    # Resumable streams on a router: resume, stop, a stop during the model's load and a
    # client that leaves during it, routed by conversation id (serve/conversations.py).
    "unit/test_stream.py",
)
SIDES = ("direct", "llamactl")


@dataclass
class Side:
    """One run of the suite: its outcomes by test id, and how long it took."""

    name: str
    outcomes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def passed(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o == "passed"}


def mirror(tests: Path, into: Path) -> Path:
    """A copy of tools/server/tests laid out as in the tree, with the few files its relative
    paths reach (../../../models/templates, ../../../tools/mtmd's images): nothing is written
    into the vendored source (bytecode, LLAMA_CACHE, tmp/), and a run does not depend on it."""
    tree = tests.parent.parent.parent
    work = into / "tools" / "server" / "tests"
    shutil.copytree(tests, work, ignore=shutil.ignore_patterns("__pycache__", "tmp", ".pytest*"))
    # Upstream's tmp/ (its LLAMA_CACHE by default) exists once its models are downloaded;
    # test_router.py writes its presets there.
    (work / "tmp").mkdir()
    shutil.copytree(tree / "models" / "templates", into / "models" / "templates")
    images = into / "tools" / "mtmd"
    images.mkdir(parents=True)
    for pattern in ("*.jpeg", "*.jpg", "*.png"):
        for image in (tree / "tools" / "mtmd").glob(pattern):
            shutil.copy2(image, images / image.name)
    return work


def wrapper(into: Path) -> Path:
    """A llama-server stand-in: `llamactl serve "$@"` from this environment."""
    script = into / "llamactl-serve"
    entry = Path(sys.executable).with_name("llamactl")
    command = f'"{entry}"' if entry.is_file() else f'"{sys.executable}" -m llamactl'
    script.write_text(f'#!/bin/sh\nexec {command} serve "$@"\n')
    script.chmod(0o755)
    return script


def run_side(
    name: str,
    server: Path,
    work: Path,
    model: Path,
    targets: Sequence[str],
    *,
    keyword: str | None,
    scratch: Path,
    timeout_s: float,
    per_test_s: int,
    threads: int | None = None,
) -> Side:
    """One pytest session of upstream's suite with LLAMA_SERVER_BIN_PATH=server; `threads`:
    LLAMA_ARG_THREADS for its llama-servers (None: llama.cpp's default)."""
    results = scratch / f"{name}-{time.monotonic_ns()}.json"
    cache = scratch / "llama-cache"
    cache.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "LLAMA_SERVER_BIN_PATH": str(server),
        "LLAMACTL_UPSTREAM_MODEL": str(model),
        "LLAMACTL_UPSTREAM_RESULTS": str(results),
        # A free port: the suite's default 8080 is the port every serve starts on by default.
        "PORT": str(net.free_port()),
        "LLAMA_CACHE": str(cache),
        "LLAMACTL_CACHE_DIR": str(paths.cache_dir()),
        "LLAMACTL_STATE_DIR": str(scratch / f"state-{name}"),
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if threads is not None and "LLAMA_ARG_THREADS" not in os.environ:
        # Each side's llama-servers get their share of the cores: two generating at once with
        # every core each spin against each other (ggml's threads busy-wait), and on 2 cores a
        # test then took 109 s instead of 7 (docs/drop-in.md).
        env["LLAMA_ARG_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "pytest", "-p", "upstream_plugin", "-p", "no:cacheprovider"]
    argv += ["-q", "--no-header", "-rN", "--durations=20", f"--timeout={per_test_s}"]
    argv += ["-o", "addopts=", *(["-k", keyword] if keyword else []), *targets]
    log_path = scratch / f"{name}.log"
    started = time.monotonic()
    with open(log_path, "ab") as log:
        try:
            subprocess.run(
                argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            print(f"{name}: stopped after {timeout_s:g} s (log: {log_path})", file=sys.stderr)
    side = Side(name, seconds=time.monotonic() - started)
    try:
        side.outcomes = json.loads(results.read_text())
    except (OSError, ValueError):
        print(f"{name}: no results; the end of {log_path}:", file=sys.stderr)
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
    return side


def file_of(test_id: str) -> str:
    return test_id.split("::", 1)[0]


def report(files: Sequence[str], sides: dict[str, Side], only: dict[str, list[str]]) -> dict:
    """The per-file table on stdout, and the same as a JSON-ready dict."""
    files = list(dict.fromkeys(file_of(f) for f in files))  # node ids count in their file
    table: dict[str, dict[str, int]] = {}
    everything = set().union(*(s.outcomes for s in sides.values()))
    for f in files:
        ids = {t for t in everything if file_of(t) == f}
        table[f] = {"tests": len(ids)}
        for name, side in sides.items():
            table[f][name] = len(ids & side.passed())
    width = max(len(f) for f in files)
    print(f"{'file'.ljust(width)}  tests  " + "  ".join(f"{n:>8}" for n in sides))
    for f, row in table.items():
        print(f"{f.ljust(width)}  {row['tests']:5}  " + "  ".join(f"{row[n]:8}" for n in sides))
    total = {"tests": sum(r["tests"] for r in table.values())}
    total.update({n: sum(r[n] for r in table.values()) for n in sides})
    print(
        f"{'total'.ljust(width)}  {total['tests']:5}  " + "  ".join(f"{total[n]:8}" for n in sides)
    )
    for name, ids in only.items():
        print(f"\npassing {name} only ({len(ids)}):" + "".join(f"\n  {t}" for t in ids))
    seconds = {n: round(s.seconds, 1) for n, s in sides.items()}
    print("\nseconds: " + ", ".join(f"{n} {s}" for n, s in seconds.items()))
    return {"files": table, "total": total, "only": only, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="test files (unit/test_x.py) [default: --set]")
    parser.add_argument(
        "--set",
        choices=("quick", "no-network", "all", "router", "router-quick"),
        default="no-network",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--retries", type=int, default=1, help="runs again of each difference")
    parser.add_argument("--json", type=Path, help="write the counts and differences here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per side")
    parser.add_argument("--per-test", type=int, default=120, help="seconds per test")
    parser.add_argument("--keep", type=Path, help="keep the logs in this folder")
    parser.add_argument("--serial", action="store_true", help="one side after the other")
    args = parser.parse_args(argv)

    from llamactl.build.cache import find_server_binary
    from llamactl.models.default import default_model_path, default_model_present

    tests = paths.vendor_dir() / "llama.cpp" / "tools" / "server" / "tests"
    if not (tests / "utils.py").is_file():
        print(f"no upstream server tests at {tests}: run `llamactl source fetch`", file=sys.stderr)
        return 2
    if not default_model_present():
        print("the default model is missing: run `llamactl pull smollm2-135m-instruct`")
        return 2
    server = find_server_binary()
    model = default_model_path()
    sets = {
        "quick": QUICK,
        "no-network": NO_NETWORK,
        "all": (*NO_NETWORK, *OTHERS),
        "router": ROUTER,
        "router-quick": ROUTER_QUICK,
    }
    files = list(args.files) or list(sets[args.set])

    with tempfile.TemporaryDirectory(prefix="llamactl-upstream-") as tmp:
        scratch = args.keep or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        work = mirror(tests, Path(tmp) / "tree")
        servers = {"direct": server, "llamactl": wrapper(Path(tmp))}

        def run(name: str, targets: Sequence[str], keyword: str | None) -> Side:
            return run_side(
                name,
                servers[name],
                work,
                model,
                targets,
                keyword=keyword,
                scratch=scratch,
                timeout_s=args.timeout,
                per_test_s=args.per_test,
                threads=None if args.serial else max(1, len(os.sched_getaffinity(0)) // 2),
            )

        if args.serial:
            sides = {name: run(name, files, args.keyword) for name in SIDES}
        else:
            # The two sides at once, each on its own ports: half the wall time, and both see
            # the same load (timing-sensitive tests fail alike rather than on one side).
            with ThreadPoolExecutor(len(SIDES)) as pool:
                futures = {name: pool.submit(run, name, files, args.keyword) for name in SIDES}
                sides = {name: future.result() for name, future in futures.items()}
        print(f"llama-server: {server}\nmodel: {model}\n")
        only: dict[str, list[str]] = {}
        for name, other in (("direct", "llamactl"), ("llamactl", "direct")):
            # A test passing here but not there is run again there before it counts.
            differ = sorted(sides[name].passed() - sides[other].passed())
            for _ in range(args.retries):
                if not differ:
                    break
                again = run(other, differ, None)
                sides[other].outcomes.update(again.outcomes)
                differ = sorted(sides[name].passed() - sides[other].passed())
            only[name] = differ
        summary = report(files, sides, only)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if only["direct"] else 0


if __name__ == "__main__":
    sys.exit(main())
