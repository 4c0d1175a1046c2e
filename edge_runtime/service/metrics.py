"""A small Prometheus registry (text exposition format 0.0.4) and the edge service's metrics.

Dependency-free on purpose: the edge image stays small and the few metric types needed here (counters, gauges,
fixed-bucket histograms, labels) fit in a page.  Everything is thread-safe: the camera, inference, publisher and
HTTP threads update and render concurrently.
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

#: latency buckets in milliseconds (upper bounds; ``+Inf`` is implicit)
LATENCY_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
#: camera states exported by ``weakrest_camera_state`` from the start (those of
#: ``edge_runtime.acquisition.worker``); other states seen at run time are added
CAMERA_STATES: tuple[str, ...] = ("idle", "connecting", "streaming", "waiting_trigger", "lost", "finished", "stopped")

#: verdict and reload-result label values created (at 0) up front; other values still work
VERDICTS: tuple[str, ...] = ("pass", "fail", "error")
RELOAD_RESULTS: tuple[str, ...] = ("ok", "failed")
#: the states of ``/health`` (``edge_runtime.service.health.HEALTH_STATES``), one series each
HEALTH_STATES: tuple[str, ...] = ("ok", "degraded", "failing")

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelValues = tuple[str, ...]


def format_value(v: float) -> str:
    """Sample value as Prometheus writes it: ``+Inf``/``-Inf``/``NaN``, integers without exponent noise."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _format_le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))  # 1 -> "1.0", like the Go/Python clients


def escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{escape_label_value(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for ln in labelnames:
            if not _LABEL_NAME.fullmatch(ln) or ln.startswith("__"):
                raise ValueError(f"invalid label name {ln!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}: {labelnames}")
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labelvalues: Sequence[object], labelkw: Mapping[str, object]) -> LabelValues:
        if labelvalues and labelkw:
            raise ValueError("give label values by position or by name, not both")
        if labelkw:
            if set(labelkw) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labelkw)}")
            return tuple(str(labelkw[n]) for n in self.labelnames)
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {len(labelvalues)} values")
        return tuple(str(v) for v in labelvalues)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        lines.extend(self._samples())
        return lines

    def _samples(self) -> list[str]:
        raise NotImplementedError


class _ValueMetric(_Metric):
    """Counter and gauge: one float per label set (the unlabelled one exported as 0 from the start)."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def _add(self, key: LabelValues, amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, *labelvalues: object, **labelkw: object) -> float:
        key = self._key(labelvalues, labelkw)
        with self._lock:
            return self._values.get(key, 0.0)

    def remove(self, *labelvalues: object, **labelkw: object) -> None:
        key = self._key(labelvalues, labelkw)
        with self._lock:
            self._values.pop(key, None)

    def clear(self) -> None:
        """Forget every label set (e.g. the old bundle's info series after a reload)."""
        with self._lock:
            self._values = {} if self.labelnames else {(): 0.0}

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}" for k, v in items]


class Counter(_ValueMetric):
    """Monotonic count; ``inc`` refuses negative amounts (a counter that goes down breaks ``rate()``)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, *labelvalues: object, **labelkw: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        self._add(self._key(labelvalues, labelkw), float(amount))

    def labels(self, *labelvalues: object, **labelkw: object) -> _CounterChild:
        return _CounterChild(self, self._key(labelvalues, labelkw))

    def set_total(self, total: float, *labelvalues: object, **labelkw: object) -> None:
        """Mirror a count kept elsewhere (e.g. the acquisition worker's stats), refreshed at scrape time.

        A smaller total than before is taken as a reset of that count, which Prometheus' ``rate()`` handles.
        """
        if total < 0:
            raise ValueError(f"{self.name}: a counter total cannot be negative ({total})")
        key = self._key(labelvalues, labelkw)
        with self._lock:
            self._values[key] = float(total)


class _CounterChild:
    def __init__(self, parent: Counter, key: LabelValues) -> None:
        self._parent, self._key = parent, key
        parent._add(key, 0.0)  # the series exists (at 0) as soon as it is named

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self._parent.name}: a counter cannot decrease (inc by {amount})")
        self._parent._add(self._key, float(amount))


class Gauge(_ValueMetric):
    """A value that goes up and down (queue depth, connection flags, state one-hots)."""

    kind = "gauge"

    def set(self, value: float, *labelvalues: object, **labelkw: object) -> None:
        key = self._key(labelvalues, labelkw)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, *labelvalues: object, **labelkw: object) -> None:
        self._add(self._key(labelvalues, labelkw), float(amount))

    def dec(self, amount: float = 1.0, *labelvalues: object, **labelkw: object) -> None:
        self._add(self._key(labelvalues, labelkw), -float(amount))

    def labels(self, *labelvalues: object, **labelkw: object) -> _GaugeChild:
        return _GaugeChild(self, self._key(labelvalues, labelkw))


class _GaugeChild:
    def __init__(self, parent: Gauge, key: LabelValues) -> None:
        self._parent, self._key = parent, key

    def set(self, value: float) -> None:
        self._parent.set(value, *self._key)

    def inc(self, amount: float = 1.0) -> None:
        self._parent._add(self._key, float(amount))

    def dec(self, amount: float = 1.0) -> None:
        self._parent._add(self._key, -float(amount))


class StateGauge(Gauge):
    """One label, one-hot: 1 for the current state, 0 for every other known one (Prometheus "stateset").

    Calling it (``g("lost")``) is :meth:`state`.  States not given up front are added when first set.
    """

    def __init__(self, name: str, help: str, label: str = "state", states: Sequence[str] = ()) -> None:
        super().__init__(name, help, [label])
        self._states: list[str] = []
        for st in states:
            self._add_state(st)

    def _add_state(self, st: str) -> None:
        if st not in self._states:
            self._states.append(st)
            self._add((st,), 0.0)

    def state(self, current: str) -> None:
        with self._lock:
            if current not in self._states:
                self._states.append(current)
            for st in self._states:
                self._values[(st,)] = 1.0 if st == current else 0.0

    def __call__(self, current: str) -> None:
        self.state(current)


class InfoGauge(Gauge):
    """A constant-1 series whose labels carry the information (``*_info``); setting new labels drops the old.

    Calling it (``g("texture", "3")`` or ``g(product="texture", version="3")``) is :meth:`info`.
    """

    def info(self, *labelvalues: object, **labelkw: object) -> None:
        key = self._key(labelvalues, labelkw)
        with self._lock:
            self._values = {key: 1.0}

    def __call__(self, *labelvalues: object, **labelkw: object) -> None:
        self.info(*labelvalues, **labelkw)


class Histogram(_Metric):
    """Fixed-bucket histogram: ``_bucket{le=...}`` cumulative counts, ``_sum`` and ``_count`` per label set."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS_MS, window: QuantileWindow | None = None) -> None:
        """``window``, when given, also receives every observation (all label sets), for exact p50/p99."""
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        super().__init__(name, help, labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds) or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be distinct numbers, got {list(buckets)}")
        if not math.isinf(bounds[-1]):
            bounds.append(math.inf)
        self.buckets: tuple[float, ...] = tuple(bounds)
        self.window = window
        # per label set: [per-bucket (non-cumulative) counts..., sum]
        self._data: dict[LabelValues, list[float]] = {} if labelnames else {(): self._empty()}

    def _empty(self) -> list[float]:
        return [0.0] * (len(self.buckets) + 1)

    def _observe(self, key: LabelValues, value: float) -> None:
        value = float(value)
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets) - 1)  # NaN: +Inf
        with self._lock:
            row = self._data.get(key)
            if row is None:
                row = self._data[key] = self._empty()
            row[i] += 1
            row[-1] += value
        if self.window is not None:
            self.window.add(value)

    def observe(self, value: float, *labelvalues: object, **labelkw: object) -> None:
        self._observe(self._key(labelvalues, labelkw), value)

    def labels(self, *labelvalues: object, **labelkw: object) -> _HistogramChild:
        return _HistogramChild(self, self._key(labelvalues, labelkw))

    def snapshot(self, *labelvalues: object, **labelkw: object) -> tuple[list[float], float, float]:
        """(cumulative bucket counts, sum, count) of one label set."""
        key = self._key(labelvalues, labelkw)
        with self._lock:
            row = list(self._data.get(key) or self._empty())
        cum, acc = [], 0.0
        for c in row[:-1]:
            acc += c
            cum.append(acc)
        return cum, row[-1], acc

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        lines = []
        for key, row in items:
            acc = 0.0
            for bound, c in zip(self.buckets, row[:-1], strict=True):
                acc += c
                lines.append(f"{self.name}_bucket{_labels_text(self.labelnames, key, ('le', _format_le(bound)))} "
                             f"{format_value(acc)}")
            labels = _labels_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {format_value(row[-1])}")
            lines.append(f"{self.name}_count{labels} {format_value(acc)}")
        return lines


class _HistogramChild:
    def __init__(self, parent: Histogram, key: LabelValues) -> None:
        self._parent, self._key = parent, key

    def observe(self, value: float) -> None:
        self._parent._observe(self._key, value)


class Registry:
    """Metrics in registration order; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        m = Counter(name, help, labelnames)
        self.register(m)
        return m

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        m = Gauge(name, help, labelnames)
        self.register(m)
        return m

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Iterable[float] = LATENCY_BUCKETS_MS, window: QuantileWindow | None = None) -> Histogram:
        m = Histogram(name, help, labelnames, buckets, window)
        self.register(m)
        return m

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for m in metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class QuantileWindow:
    """The last ``size`` observations, for p50/p99 in the health JSON (histograms are for Prometheus)."""

    def __init__(self, size: int = 1000) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(float(value))

    def __len__(self) -> int:
        return len(self._values)

    def quantile(self, q: float) -> float | None:
        """Linearly interpolated quantile (numpy's default method); None when empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        with self._lock:
            data = sorted(self._values)
        out: list[float | None] = []
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q}")
            if not data:
                out.append(None)
                continue
            pos = q * (len(data) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(data) - 1)
            out.append(data[lo] + (data[hi] - data[lo]) * (pos - lo))
        return out

    def summary(self) -> dict[str, float | int | None]:
        p50, p99 = self.quantiles((0.5, 0.99))
        return {"p50": p50, "p99": p99, "n": len(self)}


class ServiceMetrics:
    """The edge service's metrics (``weakrest_*``) plus a bounded end-to-end latency window for ``/health``.

    Counters the service keeps elsewhere (acquisition stats, queue drops) can be mirrored at scrape time with
    :meth:`Counter.set_total`.  ``camera_state("lost")``, ``health_state("degraded")`` and
    ``bundle_info(product, version)`` are callable gauges (one-hot state sets, info series); the service sets
    the health state at every ``/health`` and ``/metrics`` request, so a scrape never shows a stale one.
    """

    def __init__(self, window: int = 1000, registry: Registry | None = None) -> None:
        r = self.registry = registry or Registry()
        self.end_to_end_window = QuantileWindow(window)
        self.frames_total = r.counter("weakrest_frames_total", "Frames inspected")
        self.verdicts_total = r.counter("weakrest_verdicts_total", "Inspection verdicts", ["verdict"])
        self.dropped_frames_total = r.counter("weakrest_dropped_frames_total",
                                              "Frames replaced before inference took them (inference busy)")
        self.incomplete_frames_total = r.counter("weakrest_incomplete_frames_total",
                                                 "Incomplete frames reported by the camera transport")
        self.fetch_timeouts_total = r.counter("weakrest_fetch_timeouts_total", "Camera buffer fetch timeouts")
        self.camera_reconnects_total = r.counter("weakrest_camera_reconnects_total",
                                                 "Camera re-opened after a loss")
        self.stage_latency_ms = r.histogram("weakrest_stage_latency_ms", "Pipeline stage latency in milliseconds",
                                            ["stage"])
        self.end_to_end_latency_ms = r.histogram("weakrest_end_to_end_latency_ms",
                                                 "Frame capture to result handed to the publisher, in milliseconds",
                                                 window=self.end_to_end_window)
        self.over_budget_total = r.counter("weakrest_over_budget_total", "Frames over the latency budget")
        self.queue_depth = r.gauge("weakrest_queue_depth", "Results waiting in the on-disk queue")
        self.queue_held = r.gauge("weakrest_queue_held", "Results held in memory because the queue's disk refused "
                                  "them (full); not durable until written")
        self.queue_dropped_total = r.counter("weakrest_queue_dropped_total",
                                             "Queued results dropped because the queue was full")
        self.mqtt_connected = r.gauge("weakrest_mqtt_connected", "1 while connected to the MQTT broker")
        self.camera_state = StateGauge("weakrest_camera_state", "1 for the camera's current state, 0 for the others",
                                       "state", CAMERA_STATES)
        r.register(self.camera_state)
        self.bundle_info = InfoGauge("weakrest_bundle_info", "The bundle being served (value always 1)",
                                     ["product", "version"])
        r.register(self.bundle_info)
        self.engine_info = InfoGauge("weakrest_engine_info", "The inference engine running the bundle's graphs "
                                     "(value always 1; requested is the config's switch, e.g. auto)",
                                     ["engine", "requested"])
        r.register(self.engine_info)
        self.reloads_total = r.counter("weakrest_reloads_total", "Bundle reloads and switches", ["result"])
        self.health_state = StateGauge("weakrest_health_state", "1 for the current /health state (ok; degraded: "
                                       "verdicts may not reach the MES; failing: inference dead), 0 for the others",
                                       "state", HEALTH_STATES)
        r.register(self.health_state)
        for verdict in VERDICTS:  # the series exist at 0 from the start, so rate()/increase() see the first one
            self.verdicts_total.labels(verdict=verdict)
        for result in RELOAD_RESULTS:
            self.reloads_total.labels(result=result)
        self.camera_state("idle")

    def set_camera_state(self, state: str) -> None:
        """Same as ``camera_state(state)``."""
        self.camera_state.state(state)

    def set_bundle(self, product: str, version: str) -> None:
        """Same as ``bundle_info(product, version)``: the old bundle's series is dropped."""
        self.bundle_info.info(product=product, version=version)

    def record_result(self, verdict: str, stage_ms: Mapping[str, float], end_to_end_ms: float,
                      over_budget: bool = False) -> None:
        """One inspected frame: frame and verdict counts, every stage latency given, end-to-end latency."""
        self.frames_total.inc()
        self.verdicts_total.inc(1, verdict=verdict)
        for stage, ms in stage_ms.items():
            self.stage_latency_ms.observe(ms, stage=stage)
        self.end_to_end_latency_ms.observe(end_to_end_ms)
        if over_budget:
            self.over_budget_total.inc()

    def latency_summary(self) -> dict[str, float | int | None]:
        """``{"p50", "p99", "n"}`` of the end-to-end latency (ms) over the last ``window`` frames."""
        return self.end_to_end_window.summary()

    def render(self) -> str:
        return self.registry.render()
