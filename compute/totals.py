"""What one commit stored, counted once (pure logic over RESULTS_SCHEMA / DEAD_LETTER_SCHEMA tables).

    CommitTotals.of(results, dead, positions, now) -> CommitTotals
        rows_ok, rows_flagged, rows_dead, dead_by (stage, error_class) -> rows,
        prompt_tokens / completion_tokens (of the committed rows' final generations),
        retries (generations beyond the first), spans (first offset written, position) per
        partition, e2e_s (read -> commit seconds of each result row)

The commit writer counts the plain rows of each commit it lands (actors/writer.py); the job books
the same object into its run stats, its metrics and the runs table (jobs/pipeline.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TopicPartition = tuple[str, int]


@dataclass
class CommitTotals:
    rows_ok: int = 0  # result rows, flagged included
    rows_flagged: int = 0
    rows_dead: int = 0
    dead_by: dict[tuple[str, str], int] = field(default_factory=dict)  # (stage, error_class) -> rows
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    spans: dict[TopicPartition, tuple[int | None, int]] = field(default_factory=dict)
    e2e_s: Any = field(default_factory=list)  # seconds per result row (a numpy array from `of`)

    @property
    def dead_by_class(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, cls), n in self.dead_by.items():
            out[cls] += n
        return dict(out)

    def runs_fields(self) -> dict:
        """The per-commit fields of connectors.runs.RunsTable.append_commit."""
        return dict(
            rows_ok=self.rows_ok, rows_flagged=self.rows_flagged, rows_dead=self.rows_dead,
            dead_by_class=self.dead_by_class, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, retries=self.retries, positions=self.spans,
        )  # fmt: skip

    @classmethod
    def of(
        cls, results: pa.Table, dead: pa.Table, positions: Mapping[TopicPartition, int], now: datetime | None = None
    ) -> CommitTotals:
        pairs = zip(dead.column("stage").to_pylist(), dead.column("error_class").to_pylist())
        # retries: generations beyond the first, over the rows that went to the engine
        retries = sum((pc.sum(a).as_py() or 0) - (len(a) - a.null_count) for a in (results["attempts"], dead["attempts"]))
        return cls(
            rows_ok=results.num_rows,
            rows_flagged=pc.sum(pc.equal(results.column("status"), "flagged")).as_py() or 0,
            rows_dead=dead.num_rows,
            dead_by={(s or "unknown", c or "unknown"): n for (s, c), n in Counter(pairs).items()},
            prompt_tokens=pc.sum(results.column("prompt_tokens")).as_py() or 0,
            completion_tokens=pc.sum(results.column("completion_tokens")).as_py() or 0,
            retries=retries,
            spans=span_positions(results, dead, positions),
            e2e_s=_e2e_seconds(results, now),
        )


def span_positions(
    results: pa.Table, dead: pa.Table, positions: Mapping[TopicPartition, int]
) -> dict[TopicPartition, tuple[int | None, int]]:
    """(first offset written, committed position) per partition of a commit: the first offset is
    the smallest source_offset of that partition among the committed results and dead rows
    (None when the commit wrote none there, e.g. a Delta source's version marker)."""
    firsts: dict[TopicPartition, int] = {}
    for table in (results, dead):
        if not table.num_rows:
            continue
        grouped = table.group_by(["source_topic", "source_partition"]).aggregate([("source_offset", "min")])
        for t, p, o in zip(
            grouped.column("source_topic").to_pylist(),
            grouped.column("source_partition").to_pylist(),
            grouped.column("source_offset_min").to_pylist(),
        ):
            tp = (t, p)
            firsts[tp] = o if tp not in firsts else min(firsts[tp], o)
    return {tp: (firsts.get(tp), last) for tp, last in positions.items()}


def e2e_latencies_s(results: pa.Table, now: datetime | None = None) -> list[float]:
    """Read -> commit latency in seconds of each row of a RESULTS_SCHEMA table about to be (or
    just) committed: `latency_ms` (read -> completion, monotonic clock) plus the time since
    `processed_at` (completion, wall clock) until `now` (default: the current time)."""
    return _e2e_seconds(results, now).tolist()


def _e2e_seconds(results: pa.Table, now: datetime | None = None) -> np.ndarray:
    if results.num_rows == 0:
        return np.zeros(0)
    now = now or datetime.now(timezone.utc)
    since = pc.subtract(pa.scalar(now, results.schema.field("processed_at").type), results.column("processed_at"))
    since_s = pc.divide(since.cast(pa.int64()).cast(pa.float64()), 1e6)  # timestamp("us") durations
    total = pc.add(pc.divide(pc.fill_null(results.column("latency_ms"), 0.0), 1e3), since_s)
    values = total.to_numpy(zero_copy_only=False)
    return np.maximum(values[~np.isnan(values)], 0.0)
