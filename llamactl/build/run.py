"""Carrying a build out: resolve the plan (probes, source), take the configuration's lock,
install the CUDA toolkit wheels when the plan uses them, run CMake and Ninja with their output
in build.log and progress through a `Reporter`, stop the whole process group on Ctrl-C or
SIGTERM, quote the errors that matter when it fails, verify the result and write its manifest
(last, so a reader sees a whole build or none)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import __version__, locks
from llamactl.build.buildlog import error_lines, failure_hint, included_backends, parse_devices
from llamactl.build.cache import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    remember_preferred,
    write_manifest,
)
from llamactl.build.plan import BACKEND_CMAKE_NAMES, BuildPlan, BuildSpec, plan
from llamactl.build.progress import Reporter, Step, parse_progress
from llamactl.errors import BuildError, SourceError

if TYPE_CHECKING:
    from llamactl.build.decision import Decision
    from llamactl.build.detection import Detection
    from llamactl.build.source import SourceTree


def _detect() -> Detection:
    from llamactl.build.hardware import detect

    return detect()


def _decide(detection: Detection, requested: str) -> Decision:
    from llamactl.build.decision import decide

    return decide(detection, requested)


def _pinned_source() -> SourceTree:
    """The pinned tree as it will be once fetched (dry runs plan against it)."""
    from llamactl.build.source import SourceTree, default_tree_path, load_pin

    pin = load_pin()
    return SourceTree(path=default_tree_path(), commit=pin.commit, origin="pin", pinned=True)


def resolve_plan(
    spec: BuildSpec,
    *,
    fetch: bool = True,
    report: Reporter | None = None,
    detection: Detection | None = None,
) -> BuildPlan:
    """Detect, decide, find (or fetch) the source, and plan."""
    # Without `fetch` (and in dry runs) a missing pinned tree is planned at the pinned commit.
    from llamactl.build.source import ensure_source, resolve_source

    if spec.dry_run or not fetch:
        try:
            source = resolve_source(spec.source)
        except SourceError:
            if spec.source is not None or os.environ.get("LLAMACTL_SOURCE"):
                raise
            source = _pinned_source()
    else:
        source = ensure_source(spec.source, report=report)
    detection = detection if detection is not None else _detect()
    decision = _decide(detection, spec.backend)
    backend = decision.backend if spec.backend == "auto" else spec.backend
    from llamactl.build.toolchain import probe_toolchain

    toolchain = probe_toolchain(detection, backend, cuda_toolkit=spec.cuda_toolkit)
    return plan(spec, detection, decision, source, toolchain)


@dataclass(frozen=True)
class BuildOutcome:
    """What `llamactl build` did: planned only, found it up to date, or built it."""

    plan: BuildPlan
    state: str  # dry-run | up-to-date | built
    manifest: Manifest | None = None


def build_llama(spec: BuildSpec, *, report: Reporter | None = None) -> BuildOutcome:
    """`llamactl build`: plan, return at once when that build exists, else fetch and build."""
    outcome = _build_llama(spec, report=report)
    if outcome.manifest is not None:
        # serve picks among several builds by what `llamactl build` last chose, without
        # running the probes (llamactl.build.cache.find_server_binary).
        with contextlib.suppress(OSError):
            remember_preferred(
                outcome.manifest.commit,
                outcome.manifest.key,
                outcome.manifest.backend,
                plain=spec.backend == "auto",
            )
    return outcome


def _build_llama(spec: BuildSpec, *, report: Reporter | None = None) -> BuildOutcome:
    # `report` is only called when a build really runs: the no-op path prints nothing.
    detection = _detect()
    the_plan = resolve_plan(spec, fetch=False, detection=detection)
    if spec.dry_run:
        return BuildOutcome(the_plan, "dry-run")
    if not spec.clean:
        existing = load_manifest(the_plan.build_dir)
        if existing is not None and existing.server_binary.is_file():
            return BuildOutcome(the_plan, "up-to-date", existing)
    preflight(the_plan)
    say = report or _stderr_lines

    def waiting() -> None:
        say(Step(0, 0, f"waiting for another llamactl building {the_plan.key} ...", "message"))

    # Two builds of one configuration at once would share (and wreck) one build directory.
    with locks.held(the_plan.build_dir.with_name(f".{the_plan.key}.lock"), on_wait=waiting):
        if spec.clean:
            if the_plan.build_dir.exists():
                shutil.rmtree(the_plan.build_dir)
        else:
            existing = load_manifest(the_plan.build_dir)  # the other one may have built it
            if existing is not None and existing.server_binary.is_file():
                return BuildOutcome(the_plan, "up-to-date", existing)
        return _build_locked(spec, the_plan, detection, report)


def _stderr_lines(step: Step) -> None:
    import sys

    if step.phase == "message":
        print(step.description, file=sys.stderr)


def _build_locked(
    spec: BuildSpec,
    the_plan: BuildPlan,
    detection: Detection,
    report: Reporter | None,
) -> BuildOutcome:
    from llamactl.build.source import ensure_source

    tree = ensure_source(spec.source, report=report)
    if (tree.path.resolve(), tree.commit) != (the_plan.source, the_plan.commit):
        the_plan = resolve_plan(replace(spec, clean=False), fetch=False, detection=detection)
        the_plan = replace(the_plan, clean=spec.clean)
    if the_plan.cuda_wheels is not None:
        install_cuda_wheels(the_plan.cuda_wheels, report)
    manifest = run_build(the_plan, on_step=report)
    return BuildOutcome(the_plan, "built", manifest)


def install_cuda_wheels(version: str, report: Reporter | None) -> Path:
    """Unpack the CUDA toolkit wheels the plan names (downloading them first when missing)."""
    from llamactl.build import cuda_wheels

    wheel_set = next((s for s in cuda_wheels.WHEEL_SETS if s.version == version), None)
    if wheel_set is None:
        raise BuildError(f"no pinned CUDA wheel set {version}")
    root = cuda_wheels.toolkit_dir(wheel_set)
    if cuda_wheels.is_installed(root):
        return root
    say = report or _stderr_lines
    say(
        Step(
            0,
            0,
            f"installing the CUDA toolkit {version} from PyPI wheels into {root} "
            f"(about {wheel_set.size // (1 << 20)} MiB to download)",
            "message",
        )
    )

    def progress(done: int, total: int | None, what: str) -> None:
        if report is not None:
            report(Step(done, total or 0, what, "download"))

    return cuda_wheels.install(wheel_set, progress=progress)


def preflight(the_plan: BuildPlan) -> None:
    """Refuse a plan that is sure to fail, before fetching or compiling anything."""
    if the_plan.problems:
        first = the_plan.problems[0]
        extra = "".join(f"\n  also: {p.message}" for p in the_plan.problems[1:])
        message = f"cannot build {the_plan.backend}: {first.message}{extra}"
        raise BuildError(message, hint=first.hint)


class BuildInterrupted(BuildError):
    """The user pressed Ctrl-C during a build."""

    exit_code = 130


def _reset_stale_cache(build_dir: Path, source: Path, generator: str | None) -> None:
    """Drop a half-done configuration made from another tree or with another generator."""
    # CMake refuses to reuse those, and another clone of the same commit shares the build dir.
    cache = build_dir / "CMakeCache.txt"
    try:
        text = cache.read_text(errors="replace")
    except OSError:
        return
    home = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", text, re.MULTILINE)
    gen = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", text, re.MULTILINE)
    stale = home is not None and Path(home.group(1)).resolve() != source.resolve()
    wanted = generator or ("Unix Makefiles" if os.name != "nt" else None)
    if gen is not None and wanted is not None and gen.group(1) != wanted:
        stale = True
    if stale:
        cache.unlink(missing_ok=True)
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


Spawn = Callable[..., "subprocess.Popen[bytes]"]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _stream(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Any,
    on_line: Callable[[str], None],
    spawn: Spawn,
) -> int:
    """Run one command, copy its output to the log line by line, return its exit code."""
    # Ctrl-C stops the command's whole process group (CMake, Ninja and the compilers).
    from llamactl import proc

    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    child = spawn(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with _terminate_raises():
            assert child.stdout is not None
            for raw in child.stdout:
                # Compilers colour their diagnostics even into a pipe (ccache asks them to).
                line = _ANSI.sub("", raw.decode(errors="replace"))
                log.write(line)
                on_line(line)
            return child.wait()
    except BaseException as exc:
        # Ctrl-C, SIGTERM (a `serve` that is stopped while it builds) or any error: CMake,
        # Ninja and the compilers go too; the parent-death signal alone would reach CMake only.
        proc.stop_group(child.pid, grace=5.0, popen=child)
        why = "by the user" if isinstance(exc, KeyboardInterrupt) else f"({exc!r})"
        log.write(f"\n[llamactl] interrupted {why}\n")
        raise
    finally:
        log.flush()


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """While a build runs in the main thread, SIGTERM and SIGHUP raise SystemExit (128 + signal)
    instead of ending Python at once, so that the build's process group is stopped first."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to restore
                signal.signal(sig, handler)


def _fail(message: str, the_plan: BuildPlan, log_text: str, hint: str | None = None) -> BuildError:
    lines = error_lines(log_text)
    body = message
    if lines:
        body += "\n" + "\n".join(f"  {line}" for line in lines)
    body += f"\nfull log: {the_plan.log_path}"
    return BuildError(body, hint=hint or failure_hint(log_text))


def run_build(
    the_plan: BuildPlan,
    *,
    on_step: Reporter | None = None,
    spawn: Spawn | None = None,
    runner: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Manifest:
    """Configure and compile, verify the binaries and the backend, then write the manifest."""
    from llamactl import proc

    spawn = spawn or proc.spawn
    runner = runner or proc.run
    preflight(the_plan)
    if not (the_plan.source / "CMakeLists.txt").is_file():
        raise BuildError(
            f"no llama.cpp source at {the_plan.source}", hint="run `llamactl source fetch`"
        )
    step = on_step or (lambda _s: None)
    the_plan.build_dir.mkdir(parents=True, exist_ok=True)
    (the_plan.build_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _reset_stale_cache(the_plan.build_dir, the_plan.source, the_plan.generator)
    env = {**os.environ, **dict(the_plan.env)}
    # Ninja prints one "[n/m] ..." line per step when its output is not a terminal.
    env.setdefault("NINJA_STATUS", "[%f/%t] ")
    env.pop("CLICOLOR_FORCE", None)
    started = clock()
    configure_lines: list[str] = []

    with open(the_plan.log_path, "w", encoding="utf-8", buffering=1) as log:
        # Line-buffered: `tail -f build.log` follows a running build.
        log.write(f"# llamactl {__version__} build {the_plan.key}\n")
        for k, v in the_plan.env:
            log.write(f"# env {k}={v}\n")
        step(Step(0, 0, "configuring", "configure"))

        def on_configure(line: str) -> None:
            configure_lines.append(line)
            if line.startswith("-- "):
                step(Step(0, 0, f"configuring: {line[3:].strip()[:50]}", "configure"))

        try:
            rc = _stream(the_plan.configure, env=env, log=log, on_line=on_configure, spawn=spawn)
        except KeyboardInterrupt:
            raise BuildInterrupted("build interrupted while configuring") from None
        if rc != 0:
            log.flush()
            raise _fail(f"cmake configure failed (exit {rc})", the_plan, "".join(configure_lines))

        def on_build(line: str) -> None:
            parsed = parse_progress(line)
            if parsed is not None:
                step(parsed)

        try:
            rc = _stream(the_plan.build, env=env, log=log, on_line=on_build, spawn=spawn)
        except KeyboardInterrupt:
            raise BuildInterrupted(
                "build interrupted; the next `llamactl build` continues where it stopped",
            ) from None
    log_text = the_plan.log_path.read_text(errors="replace")
    if rc != 0:
        raise _fail(f"the build failed (exit {rc})", the_plan, log_text)
    duration = clock() - started
    return _verify_and_record(the_plan, log_text, "".join(configure_lines), duration, runner)


def _verify_and_record(
    the_plan: BuildPlan,
    log_text: str,
    configure_log: str,
    duration: float,
    runner: Callable[..., Any],
) -> Manifest:
    """Check the binaries and the compiled-in backend, then write the manifest (last)."""
    binaries: dict[str, str] = {}
    missing: list[str] = []
    for target in the_plan.targets:
        rel = Path("bin") / target
        if (the_plan.build_dir / rel).is_file():
            binaries[target] = str(rel)
        else:
            missing.append(target)
    if missing:
        raise _fail(f"the build finished but {', '.join(missing)} is missing", the_plan, log_text)

    warnings: list[str] = []
    included = included_backends(configure_log)
    wanted = BACKEND_CMAKE_NAMES[the_plan.backend]
    if the_plan.backend != "cpu" and wanted.lower() not in {b.lower() for b in included}:
        # A GPU request must never end silently in a CPU-only build.
        raise _fail(
            f"asked for {the_plan.backend} but the configure step did not include the {wanted} "
            f"backend (included: {', '.join(included) or 'none'})",
            the_plan,
            configure_log,
        )
    if the_plan.ui and re.search(
        r"UI: no assets available|UI: npm (?:ci|run build) failed", log_text
    ):
        raise _fail(
            "the web UI was asked for but npm did not build it",
            the_plan,
            log_text,
            hint="fix npm/node (see the log), or build without it: `llamactl build --no-ui`",
        )

    server = the_plan.build_dir / binaries["llama-server"]
    version = runner([str(server), "--version"], timeout=30)
    server_version = (version.stdout + version.stderr).strip()
    if not version.ok:
        raise BuildError(
            f"the built llama-server does not run: {server} --version exited {version.returncode}"
            f"\n{server_version[-2000:]}",
            hint=f"see {the_plan.log_path}; `llamactl build --clean` starts over",
        )
    listed = runner([str(server), "--list-devices"], timeout=60)
    devices = parse_devices(listed.stdout + listed.stderr)
    if the_plan.backend not in ("cpu", "metal") and not any(
        d.lower().startswith(wanted.lower()) for d in devices
    ):
        warnings.append(
            f"llama-server --list-devices shows no {wanted} device on this machine "
            "(the backend is compiled in; a GPU or driver is missing here)"
        )

    manifest = Manifest(
        key=the_plan.key,
        commit=the_plan.commit,
        backend=the_plan.backend,
        cmake_args=the_plan.cmake_args,
        env=the_plan.env,
        targets=the_plan.targets,
        binaries=binaries,
        toolchain=dict(the_plan.toolchain),
        duration_s=duration,
        created=time.time(),
        llamactl_version=__version__,
        source=str(the_plan.source),
        generator=the_plan.generator,
        jobs=the_plan.jobs,
        ui=the_plan.ui,
        rpc=the_plan.rpc,
        native=the_plan.native,
        server_version=server_version,
        backends_included=included,
        devices=devices,
        warnings=tuple(warnings),
        path=the_plan.build_dir,
    )
    write_manifest(manifest)
    return manifest
