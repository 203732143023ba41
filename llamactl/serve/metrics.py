"""llamactl's own Prometheus metrics when it serves several models: per model requests, errors,
latency and queue-wait histograms, loads, unloads, evictions, restarts; and each instance's own
llama-server metrics with a `model` label added. Counting is a few dict updates per request,
done on release, off the proxy's per-byte path."""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Iterable

__all__ = ["Histogram", "Metrics", "label_instance_metrics"]

#: Seconds: from sub-millisecond (/tokenize) to minutes (long generations, big loads).
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus expects."""

    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.total = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.total += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = []
        running = 0
        for bound, count in zip(BUCKETS, self.counts, strict=False):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.total}")
        return out


#: The status class of an outcome, by its hundreds (no string formatting per request).
_KINDS = tuple(f"{i}xx" for i in range(10))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The counters of one serve, by model."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (model, status class)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.queue_wait: dict[str, Histogram] = defaultdict(Histogram)
        self.loads: dict[str, int] = defaultdict(int)
        self.load_failures: dict[str, int] = defaultdict(int)
        self.load_seconds: dict[str, Histogram] = defaultdict(Histogram)
        self.unloads: dict[str, int] = defaultdict(int)
        self.evictions: dict[str, int] = defaultdict(int)
        self.rejected: dict[tuple[str, int], int] = defaultdict(int)

    def request_done(self, model: str, outcome: int, elapsed: float) -> None:
        """One request answered (its upstream status; 0: transport failure; 499: client gone)."""
        kind = _KINDS[outcome // 100] if 0 < outcome < 1000 else "error"
        self.requests[(model, kind)] += 1
        if outcome == 0 or outcome >= 500:
            self.errors[model] += 1
        if elapsed > 0:
            self.latency[model].observe(elapsed)

    def render(
        self,
        models: Iterable[str],
        states: dict[str, str],
        restarts: dict[str, int],
        in_flight: dict[str, int],
    ) -> str:
        """The exposition text of llamactl's own series."""
        out: list[str] = []

        def series(name: str, kind: str, text: str, values: dict[str, float | int]) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for model, value in sorted(values.items()):
                out.append(f'{name}{{model="{_escape(model)}"}} {value}')

        names = sorted(set(models))
        out.append("# HELP llamactl_requests_total Requests answered, by model and status class.")
        out.append("# TYPE llamactl_requests_total counter")
        for (model, kind), count in sorted(self.requests.items()):
            out.append(
                f'llamactl_requests_total{{model="{_escape(model)}",status="{kind}"}} {count}'
            )
        out.append("# HELP llamactl_rejected_total Requests llamactl refused itself, by status.")
        out.append("# TYPE llamactl_rejected_total counter")
        for (model, status), count in sorted(self.rejected.items()):
            out.append(
                f'llamactl_rejected_total{{model="{_escape(model)}",status="{status}"}} {count}'
            )
        series(
            "llamactl_request_errors_total",
            "counter",
            "Requests that failed upstream (5xx or transport).",
            {m: self.errors.get(m, 0) for m in names},
        )
        histograms = (
            ("llamactl_request_seconds", "Time from dispatch to the end of the answer."),
            ("llamactl_queue_wait_seconds", "Time waiting for a model to load or a free slot."),
            ("llamactl_load_seconds", "Time to load a model until it answers /health."),
        )
        for (name, text), hists in zip(
            histograms, (self.latency, self.queue_wait, self.load_seconds), strict=True
        ):
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} histogram")
            for model in sorted(hists):
                out.extend(hists[model].lines(name, f'model="{_escape(model)}"'))
        for name, text, values in (
            ("llamactl_loads_total", "Successful loads.", self.loads),
            ("llamactl_load_failures_total", "Loads that failed.", self.load_failures),
            ("llamactl_unloads_total", "Unloads (asked, idle TTL or eviction).", self.unloads),
            ("llamactl_evictions_total", "Unloads to make room for another model.", self.evictions),
        ):
            series(name, "counter", text, {m: values.get(m, 0) for m in names})
        series("llamactl_restarts_total", "counter", "Restarts after a crash.", dict(restarts))
        series(
            "llamactl_model_loaded",
            "gauge",
            "1 when the model has a ready instance.",
            {m: int(states.get(m) == "loaded") for m in names},
        )
        series("llamactl_in_flight", "gauge", "Requests in flight.", dict(in_flight))
        return "\n".join(out) + "\n"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def label_instance_metrics(text: str, model: str, seen_meta: set[str]) -> list[str]:
    """An instance's /metrics with `model="..."` added to every sample; HELP/TYPE lines once
    per metric name across instances (`seen_meta` remembers them)."""
    label = f'model="{_escape(model)}"'
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            key = " ".join(parts[:3])
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                if key in seen_meta:
                    continue
                seen_meta.add(key)
            out.append(line)
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, rest = m.groups()
        inner = labels[1:-1] if labels else ""
        out.append(f"{name}{{{label}{',' + inner if inner else ''}}}{rest}")
    return out
