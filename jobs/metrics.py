"""Prometheus metrics of a job run, through Ray's metrics API (`ray.util.metrics`).

Ray exports every metric a process records on its node's metrics export port, with a `ray_`
prefix: `tidegate_rows_in_total` is scraped as `ray_tidegate_rows_in_total`, a histogram
`tidegate_batch_latency_seconds` as `ray_tidegate_batch_latency_seconds_bucket|_sum|_count`.
Prometheus finds those ports through Ray's service discovery file (deploy/prometheus/prometheus.yml);
the Grafana dashboard is deploy/grafana/tidegate.json. docs/operations.md lists every metric.

`JobMetrics` creates the Ray metric objects lazily, on the first record made while Ray is
initialised. Without Ray (unit tests, a plain script) it is a recorder that only keeps in-memory
totals, readable with `value()` and `histogram()`; it keeps those totals with Ray too. Recording
never raises into the job: a failure in Ray's metrics is logged once and ignored.

Pure helper: `dashboard_metric_names` (the metric names a Grafana dashboard queries). Lag is measured by each
source (`connectors.source.Source.lag`) and recorded with `lag()`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

# name -> (kind, description, extra tag keys, histogram boundaries or None). Every metric also has
# the tags `job` (spec name), `run_id` and `source` (kafka|delta).
_DEFS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "tidegate_rows_in_total": ("counter", "Source rows (events) handed to the pipeline.", (), None),
    "tidegate_rows_out_total": ("counter", "Result rows committed to the results table, by status (ok|flagged).", ("status",), None),
    "tidegate_dead_letters_total": ("counter", "Rows committed to the dead-letter table, by stage and error class.", ("stage", "error_class"), None),
    "tidegate_validation_failures_total": ("counter", "Failed rule checks of generated outputs (retries included), by rule.", ("rule",), None),
    "tidegate_prompt_tokens_total": ("counter", "Prompt tokens of every generation, retries included.", (), None),
    "tidegate_completion_tokens_total": ("counter", "Completion tokens of every generation, retries included.", (), None),
    "tidegate_retries_total": ("counter", "Generations re-run after a failed rule.", (), None),
    "tidegate_published_rows_total": (
        "counter", "sink.topic: committed rows (results and dead letters) sent to the results topic, a restart's catch-up included.",
        (), None,
    ),
    "tidegate_batch_latency_seconds": (
        "histogram", "Engine time of a batch: submit to the pool -> completions collected.", (),
        (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    ),
    "tidegate_e2e_latency_seconds": (
        "histogram", "Per committed result row: event read by the job -> its Delta commit.", (),
        (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
    ),
    "tidegate_commit_latency_seconds": (
        "histogram", "Duration of one commit (dead-letter table, then results table).", (),
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    ),
    "tidegate_engine_queue_depth": ("gauge", "Batches in flight at the engine pool.", (), None),
    "tidegate_live_actors": ("gauge", "Engine actors alive in the pool.", (), None),
    "tidegate_engine_occupancy_ratio": (
        "gauge", "Mean running rows / max_num_seqs over the engines' decode steps (how full each step ran).", (), None,
    ),
    "tidegate_engine_idle_ratio": ("gauge", "Time with nothing in the engines / time since their first batch.", (), None),
    "tidegate_prefix_cache_hit_ratio": ("gauge", "Prompt tokens served from the engines' prefix cache / prompt tokens.", (), None),
    "tidegate_partition_lag": (
        "gauge", "Kafka: partition end offset (fetch high watermark) minus the next offset committed in Delta.",
        ("topic", "partition"), None,
    ),
    "tidegate_source_versions_behind": (
        "gauge", "Delta sources: latest source table version minus the last processed version.", (), None,
    ),
}  # fmt: skip

METRIC_NAMES: tuple[str, ...] = tuple(_DEFS)
BASE_TAG_KEYS = ("job", "run_id", "source")
EXPORT_PREFIX = "ray_"  # what Ray puts in front of every application metric it exports

# At most this many e2e latencies go to Ray per call (an evenly spaced sample of the sorted
# values, which keeps the quantiles); the in-memory totals always take every value.
E2E_MAX_OBSERVATIONS = 512


@dataclass
class HistogramTotals:
    boundaries: tuple[float, ...]
    count: int = 0
    sum: float = 0.0
    buckets: list[int] = field(default_factory=list)  # per boundary (non-cumulative) + the +Inf bucket

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = [0] * (len(self.boundaries) + 1)

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.buckets[bisect_left(self.boundaries, value)] += 1  # le-buckets: value <= boundary

    def observe_many(self, values) -> None:
        """observe() for each of a numpy array's values, at once."""
        import numpy as np

        self.count += int(values.size)
        self.sum += float(values.sum())
        # le-buckets, as bisect_left: the first boundary >= value
        counts = np.bincount(np.searchsorted(self.boundaries, values, side="left"), minlength=len(self.buckets))
        self.buckets = [a + int(b) for a, b in zip(self.buckets, counts)]

    def merge(self, other: HistogramTotals) -> None:
        self.count += other.count
        self.sum += other.sum
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]


class JobMetrics:
    """One job run's metrics. Call the recording methods from the driver loop.

    >>> m = JobMetrics("triage", "run1", "kafka")
    >>> m.rows_in(3); m.rows_out("ok", 2)
    >>> m.value("tidegate_rows_out_total", status="ok")
    2.0
    """

    def __init__(self, job_name: str, run_id: str, source_kind: str):
        self.job_name = job_name
        self.run_id = run_id
        self.source_kind = source_kind
        self.default_tags = {"job": job_name, "run_id": run_id, "source": source_kind}
        self._lock = threading.Lock()
        self._ray_metrics: dict[str, object] | None = None  # name -> ray.util.metrics object
        self._ray_failed = False
        # In-memory totals: name -> {frozenset(extra tags): value}
        self._counters: dict[str, dict[frozenset, float]] = {}
        self._gauges: dict[str, dict[frozenset, float]] = {}
        self._histograms: dict[str, dict[frozenset, HistogramTotals]] = {}

    # -- Ray side --------------------------------------------------------------------------------

    @property
    def exporting(self) -> bool:
        """True once the metrics exist in Ray (recorded values then reach Prometheus)."""
        return self._ray() is not None

    def _ray(self) -> dict[str, object] | None:
        if self._ray_metrics is not None or self._ray_failed:
            return self._ray_metrics
        try:
            self._ray_metrics = _ray_metric_objects()
        except Exception as e:  # metrics must never break a job
            self._ray_failed = True
            log.warning("Prometheus metrics disabled: could not create Ray metrics: %s", e)
        return self._ray_metrics

    def _send(self, name: str, value: float, tags: dict[str, str]) -> None:
        metrics = self._ray()
        if metrics is None:
            return
        metric = metrics[name]
        full = {**self.default_tags, **tags}
        try:
            kind = _DEFS[name][0]
            if kind == "counter":
                metric.inc(value, tags=full)
            elif kind == "gauge":
                metric.set(value, tags=full)
            else:
                metric.observe(value, tags=full)
        except Exception as e:
            if not self._ray_failed:
                log.warning("Prometheus metrics disabled: recording %s failed: %s", name, e)
            self._ray_failed = True
            self._ray_metrics = None

    # -- generic recording -----------------------------------------------------------------------

    @staticmethod
    def _tags(name: str, tags: Mapping[str, object]) -> dict[str, str]:
        keys = _DEFS[name][2]
        if set(tags) != set(keys):
            raise ValueError(f"{name} takes tags {keys}, got {sorted(tags)}")
        return {k: str(v) for k, v in tags.items()}

    def _inc(self, name: str, n: float, **tags) -> None:
        if n is None or n <= 0:
            return  # Prometheus counters only go up; nothing to add
        t = self._tags(name, tags)
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = frozenset(t.items())
            series[key] = series.get(key, 0.0) + float(n)
        self._send(name, float(n), t)

    def _set(self, name: str, value: float, **tags) -> None:
        t = self._tags(name, tags)
        with self._lock:
            self._gauges.setdefault(name, {})[frozenset(t.items())] = float(value)
        self._send(name, float(value), t)

    def _observe(self, name: str, values: Iterable[float], **tags) -> None:
        import numpy as np

        t = self._tags(name, tags)
        vals = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
        if not vals.size:
            return
        with self._lock:
            h = self._histograms.setdefault(name, {}).setdefault(frozenset(t.items()), HistogramTotals(_DEFS[name][3]))
            h.observe_many(vals)
        for v in _sample_sorted(vals, E2E_MAX_OBSERVATIONS) if len(vals) > E2E_MAX_OBSERVATIONS else vals.tolist():
            self._send(name, v, t)

    # -- the job's recording methods -------------------------------------------------------------

    def rows_in(self, n: int) -> None:
        self._inc("tidegate_rows_in_total", n)

    def rows_out(self, status: str, n: int) -> None:
        self._inc("tidegate_rows_out_total", n, status=status)

    def dead_letters(self, stage: str, error_class: str, n: int = 1) -> None:
        self._inc("tidegate_dead_letters_total", n, stage=stage, error_class=error_class)

    def validation_failures(self, rule: str, n: int = 1) -> None:
        self._inc("tidegate_validation_failures_total", n, rule=rule)

    def tokens(self, prompt: int, completion: int) -> None:
        self._inc("tidegate_prompt_tokens_total", prompt)
        self._inc("tidegate_completion_tokens_total", completion)

    def retries(self, n: int) -> None:
        self._inc("tidegate_retries_total", n)

    def published(self, n: int) -> None:
        self._inc("tidegate_published_rows_total", n)

    def batch_latency(self, seconds: float) -> None:
        self._observe("tidegate_batch_latency_seconds", [seconds])

    def e2e_latency(self, values_s: Iterable[float]) -> None:
        """Read -> commit latencies of the rows of one commit (see `e2e_latencies_s`)."""
        self._observe("tidegate_e2e_latency_seconds", values_s)

    def commit_latency(self, seconds: float) -> None:
        self._observe("tidegate_commit_latency_seconds", [seconds])

    def queue_depth(self, n: int) -> None:
        self._set("tidegate_engine_queue_depth", n)

    def live_actors(self, n: int) -> None:
        self._set("tidegate_live_actors", n)

    def partition_lag(self, topic: str, partition: int, lag: int) -> None:
        self._set("tidegate_partition_lag", lag, topic=topic, partition=partition)

    def partition_lags(self, lags: Mapping[TopicPartition, int]) -> None:
        """Record the lag of every partition (connectors.source.partition_lag)."""
        for (topic, partition), lag in lags.items():
            self.partition_lag(topic, partition, lag)

    def versions_behind(self, n: int) -> None:
        self._set("tidegate_source_versions_behind", n)

    def engine_usage(self, idle: float | None, occupancy: float | None, prefix_hits: float | None) -> None:
        for name, value in (("tidegate_engine_idle_ratio", idle), ("tidegate_engine_occupancy_ratio", occupancy),
                            ("tidegate_prefix_cache_hit_ratio", prefix_hits)):  # fmt: skip
            if value is not None:
                self._set(name, value)

    def lag(self, lag) -> None:
        """A source's connectors.source.Lag: per-partition lag and/or versions behind."""
        if lag.partitions:
            self.partition_lags(lag.partitions)
        if lag.versions_behind is not None:
            self.versions_behind(lag.versions_behind)

    def committed(self, totals) -> None:
        """Count a commit from its compute.totals.CommitTotals: rows out by status, dead letters
        by stage and error class, and each result row's read -> commit latency."""
        if totals.rows_ok - totals.rows_flagged:
            self.rows_out("ok", totals.rows_ok - totals.rows_flagged)
        if totals.rows_flagged:
            self.rows_out("flagged", totals.rows_flagged)
        for (stage, cls), n in totals.dead_by.items():
            self.dead_letters(stage, cls, n)
        self.e2e_latency(totals.e2e_s)

    # -- in-memory totals (tests, summaries) -----------------------------------------------------

    def value(self, name: str, **tags) -> float:
        """Counters: the sum over the series matching `tags`; gauges: the sum of the matching
        series' current values (0 when none); histograms: the number of matching observations."""
        want = {k: str(v) for k, v in tags.items()}
        with self._lock:
            kind = _DEFS[name][0]
            if kind == "histogram":
                return float(sum(h.count for k, h in self._histograms.get(name, {}).items() if _matches(k, want)))
            store = self._counters if kind == "counter" else self._gauges
            return sum(v for k, v in store.get(name, {}).items() if _matches(k, want))

    def gauge(self, name: str, **tags) -> float | None:
        """The current value of the one gauge series with exactly these tags, or None."""
        key = frozenset((k, str(v)) for k, v in tags.items())
        with self._lock:
            return self._gauges.get(name, {}).get(key)

    def histogram(self, name: str, **tags) -> HistogramTotals:
        """Count, sum and buckets of the observations matching `tags`, merged."""
        want = {k: str(v) for k, v in tags.items()}
        out = HistogramTotals(_DEFS[name][3])
        with self._lock:
            for k, h in self._histograms.get(name, {}).items():
                if _matches(k, want):
                    out.merge(h)
        return out


# Ray metric objects are per Ray session of this process (one registration per name), shared by
# every JobMetrics; made again when the process joins another session (a notebook's ray.shutdown()
# then a new run): objects of a session that ended must not be used, nor make a job think it exports.
_RAY_METRICS: dict[str, object] = {}
_RAY_SESSION: str | None = None
_RAY_LOCK = threading.Lock()


def _ray_metric_objects() -> dict[str, object] | None:
    """The process's Ray metric objects, created on first use; None while Ray is not initialised."""
    global _RAY_SESSION
    ray = sys.modules.get("ray")  # not imported: certainly not initialised (and no import cost)
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    session = f"{context.get_node_id()}/{context.get_job_id()}"
    from ray.util.metrics import Counter, Gauge, Histogram

    with _RAY_LOCK:
        if _RAY_SESSION != session:
            made: dict[str, object] = {}
            for name, (kind, desc, keys, bounds) in _DEFS.items():
                tag_keys = BASE_TAG_KEYS + keys
                if kind == "counter":
                    made[name] = Counter(name, description=desc, tag_keys=tag_keys)
                elif kind == "gauge":
                    made[name] = Gauge(name, description=desc, tag_keys=tag_keys)
                else:
                    made[name] = Histogram(name, description=desc, boundaries=list(bounds), tag_keys=tag_keys)
            _RAY_METRICS.clear()
            _RAY_METRICS.update(made)
            _RAY_SESSION = session
    return _RAY_METRICS


def _matches(key: frozenset, want: dict[str, str]) -> bool:
    have = dict(key)
    return all(have.get(k) == v for k, v in want.items())


def _sample_sorted(values, k: int) -> list[float]:
    """k evenly spaced order statistics of `values` (min and max included)."""
    s = sorted(values)
    if k <= 1:
        return [float(s[len(s) // 2])]
    return [float(s[round(i * (len(s) - 1) / (k - 1))]) for i in range(k)]


# -- pure helpers ----------------------------------------------------------------------------------



# -- dashboard check -------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan", "atan2",
}  # fmt: skip
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, label matchers, ranges, grouping
    clauses, keywords, strings and numbers removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-zA-Z$_]+", " ", s)
    s = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_:]*\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        start, end = m.span()
        if start and (s[start - 1].isdigit() or s[start - 1] == "."):
            continue  # part of a number such as 1e3 or 0.95
        if re.match(r"\s*\(", s[end:]) or word.lower() in _PROMQL_KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def _base_name(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL `expr` of a Grafana dashboard's panels (rows' nested panels included)."""
    out: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            expr = node.get("expr")
            if isinstance(expr, str) and expr.strip():
                out.append(expr)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard.get("panels", []))
    return out


def dashboard_metric_names(path: str | Path) -> set[str]:
    """The metric names (histogram suffixes stripped) that a Grafana dashboard JSON queries."""
    dashboard = json.loads(Path(path).read_text())
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        names |= {_base_name(n) for n in promql_metric_names(expr)}
    return names
