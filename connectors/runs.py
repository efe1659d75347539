"""Run history: a Delta table with one row per commit and one per run, next to the results.

    kind = "commit"  written right after each results commit: what that commit added
    kind = "run"     written when a run ends: its totals, how it ended and why

The table is informational: it is NOT part of the exactly-once protocol (docs/exactly-once.md).
It is appended to after the results commit, so a crash between the two loses that commit's runs
row but never duplicates or loses a result; nothing reads it back for correctness.

Default location: the sibling `runs` of the results table (`default_runs_uri`), e.g.
s3://lake/triage/results -> s3://lake/triage/runs. Several jobs may share one runs table: rows
carry the job name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable

from connectors.delta import _Table

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
TIMESTAMP = pa.timestamp("us", tz="UTC")

POSITION_TYPE = pa.struct(
    [
        ("topic", pa.string()),  # Kafka topic, or the source table URI
        ("partition", pa.int32()),  # Kafka partition, or the source table version (-1: version marker)
        ("first_offset", pa.int64()),  # first offset of the rows this commit wrote, null if unknown
        ("last_offset", pa.int64()),  # the position committed (the Delta txn version)
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("job", pa.string()),  # spec name
        ("kind", pa.string()),  # "commit" | "run"
        ("commit_seq", pa.int64()),  # commit: 1, 2, ... within the run; run: number of commits
        ("started_at", TIMESTAMP),  # commit: end of the previous commit (or run start); run: run start
        ("ended_at", TIMESTAMP),  # commit: when the results commit landed; run: run end
        ("rows_ok", pa.int64()),  # result rows written (flagged included)
        ("rows_flagged", pa.int64()),
        ("rows_dead", pa.int64()),  # dead-letter rows written
        ("dead_by_class", pa.map_(pa.string(), pa.int64())),  # error_class -> rows
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("retries", pa.int64()),
        ("positions", pa.list_(POSITION_TYPE)),
        ("duration_s", pa.float64()),  # ended_at - started_at
        ("rows_per_s", pa.float64()),  # (rows_ok + rows_dead) / duration_s
        ("model_path", pa.string()),
        ("model_revision", pa.string()),
        ("spec_hash", pa.string()),
        ("status", pa.string()),  # run rows: finished | stopped | failed; null on commit rows
        ("error", pa.string()),  # run rows that failed: the error; else null
        # run rows, measured inside the engines (null on commit rows):
        ("engine_idle", pa.float64()),  # time with nothing in the engines / time since their first batch
        ("engine_occupancy", pa.float64()),  # mean running rows / max_num_seqs over the decode steps
        ("prefix_cache_hit_rate", pa.float64()),  # prompt tokens from the prefix cache / prompt tokens
        # model.pricing (compute/pricing.py) applied to the row's tokens when it was written; null without it
        ("cost", pa.float64()),
        ("currency", pa.string()),
    ]
)

RUN_STATUSES = ("finished", "stopped", "failed")


def default_runs_uri(results_uri: str) -> str:
    """`<results parent>/runs`: s3://lake/x/results -> s3://lake/x/runs, /data/results/ -> /data/runs."""
    base = results_uri.rstrip("/")
    head, sep, name = base.rpartition("/")
    if not sep:
        return "runs"  # a relative table name: the runs table sits in the same folder
    if head.endswith((":/", ":")):
        raise ValueError(f"results table {results_uri!r} has no parent folder to put the runs table in")
    if name == "runs":
        raise ValueError(f"results table {results_uri!r} is itself named 'runs': give the runs table a URI")
    return f"{head}/runs"


def _positions_value(positions) -> list[dict] | None:
    if positions is None:
        return None
    out = []
    for (topic, partition), pos in sorted(positions.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        first, last = pos if isinstance(pos, tuple) else (None, pos)
        out.append({"topic": topic, "partition": int(partition), "first_offset": first, "last_offset": int(last)})
    return out


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return ts.astimezone(timezone.utc)


class RunsTable:
    def __init__(self, uri: str, storage_options: dict[str, str] | None = None,
                 properties: Mapping[str, str] | None = None):  # fmt: skip
        """properties: table properties it is created with, or set on an existing table at its
        first append (sink.maintenance's: a row per commit is a log file per commit, and the
        log's retention and the tombstones' must be what the other two tables have)."""
        self.uri = uri
        self.storage_options = storage_options or None
        # Opened (or created) once, then only refreshed: a row per commit must not replay the log.
        self._table = _Table(uri, RUNS_SCHEMA, storage_options or {}, "runs")
        self._table.configuration = dict(properties or {})
        self._configured = not properties

    @classmethod
    def for_results(cls, results_uri: str, storage_options: dict[str, str] | None = None,
                    properties: Mapping[str, str] | None = None) -> RunsTable:  # fmt: skip
        return cls(default_runs_uri(results_uri), storage_options, properties)

    def _row(
        self,
        *,
        run_id: str,
        job: str,
        kind: str,
        commit_seq: int,
        started_at: datetime,
        ended_at: datetime,
        rows_ok: int,
        rows_flagged: int,
        rows_dead: int,
        dead_by_class: Mapping[str, int] | None,
        prompt_tokens: int,
        completion_tokens: int,
        retries: int,
        positions,
        lineage: Mapping[str, str | None] | None,
        status: str | None,
        error: str | None,
        engine: Mapping[str, float | None] | None = None,
        cost: float | None = None,
        currency: str | None = None,
    ) -> dict:
        started_at, ended_at = _utc(started_at), _utc(ended_at)
        duration = max(0.0, (ended_at - started_at).total_seconds())
        lineage = lineage or {}
        return dict(
            run_id=run_id, job=job, kind=kind, commit_seq=commit_seq, started_at=started_at, ended_at=ended_at,
            rows_ok=rows_ok, rows_flagged=rows_flagged, rows_dead=rows_dead,
            dead_by_class=sorted((str(k), int(v)) for k, v in (dead_by_class or {}).items()),
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, retries=retries,
            positions=_positions_value(positions), duration_s=duration,
            rows_per_s=(rows_ok + rows_dead) / duration if duration > 0 else None,
            model_path=lineage.get("model_path"), model_revision=lineage.get("model_revision"),
            spec_hash=lineage.get("spec_hash"), status=status, error=error,
            engine_idle=(engine or {}).get("engine_idle"), engine_occupancy=(engine or {}).get("engine_occupancy"),
            prefix_cache_hit_rate=(engine or {}).get("prefix_cache_hit_rate"), cost=cost, currency=currency,
        )  # fmt: skip

    def _append(self, row: dict) -> None:
        if not self._configured:
            self._configure()
        self._table.append(pa.Table.from_pylist([row], schema=RUNS_SCHEMA), [])

    def _configure(self) -> None:
        """An existing table (an older Tidegate's, or another spec's) gets the properties once."""
        from deltalake.exceptions import CommitFailedError, DeltaError

        self._configured = True
        want = self._table.configuration
        dt = self._table.open()  # created with them if new
        if all(dt.metadata().configuration.get(k) == v for k, v in want.items()):
            return
        try:
            dt.alter.set_table_properties(want)
        except (CommitFailedError, DeltaError) as e:  # another writer committed meanwhile: the next run sets them
            log.warning("runs table %s: table properties not updated now (%s)", self.uri, type(e).__name__)
        self._table._dt = None  # loaded again with the properties as they are now

    def append_commit(
        self,
        *,
        run_id: str,
        job: str,
        commit_seq: int,
        started_at: datetime,
        ended_at: datetime,
        rows_ok: int,
        rows_flagged: int = 0,
        rows_dead: int = 0,
        dead_by_class: Mapping[str, int] | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        retries: int = 0,
        positions: Mapping[TopicPartition, int | tuple[int | None, int]] | None = None,
        lineage: Mapping[str, str | None] | None = None,
        cost: float | None = None,
        currency: str | None = None,
    ) -> None:
        """One row for one results commit (call it after DeltaSink.commit returned).

        positions: committed position per partition, or (first offset, position) (compute.totals.span_positions).
        lineage: a mapping with model_path, model_revision, spec_hash (compute.lineage.lineage_columns).
        """
        row = self._row(
            run_id=run_id, job=job, kind="commit", commit_seq=commit_seq, started_at=started_at,
            ended_at=ended_at, rows_ok=rows_ok, rows_flagged=rows_flagged, rows_dead=rows_dead,
            dead_by_class=dead_by_class, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            retries=retries, positions=positions, lineage=lineage, status=None, error=None, cost=cost,
            currency=currency,
        )  # fmt: skip
        self._append(row)

    def append_run(
        self,
        *,
        run_id: str,
        job: str,
        started_at: datetime,
        ended_at: datetime,
        status: str,
        commits: int,
        rows_ok: int,
        rows_flagged: int = 0,
        rows_dead: int = 0,
        dead_by_class: Mapping[str, int] | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        retries: int = 0,
        positions: Mapping[TopicPartition, int | tuple[int | None, int]] | None = None,
        lineage: Mapping[str, str | None] | None = None,
        error: str | None = None,
        engine: Mapping[str, float | None] | None = None,
        cost: float | None = None,
        currency: str | None = None,
    ) -> None:
        """One row when a run ends. status: finished (drained / source done), stopped (signal),
        failed (an exception; pass its text as `error`). positions: where the run left each
        partition, optional."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        row = self._row(
            run_id=run_id, job=job, kind="run", commit_seq=commits, started_at=started_at, ended_at=ended_at,
            rows_ok=rows_ok, rows_flagged=rows_flagged, rows_dead=rows_dead, dead_by_class=dead_by_class,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, retries=retries,
            positions=positions, lineage=lineage, status=status, error=error, engine=engine, cost=cost,
            currency=currency,
        )  # fmt: skip
        self._append(row)

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options)

    def read(self, run_id: str | None = None, job: str | None = None) -> pl.DataFrame:
        """The table's rows (of one run and/or one job), ordered by ended_at, kind, commit_seq.
        An empty frame with the table's columns when the table does not exist yet."""
        if not self.exists():
            return pl.from_arrow(RUNS_SCHEMA.empty_table())
        lf = pl.scan_delta(self.uri, storage_options=self.storage_options)
        if run_id is not None:
            lf = lf.filter(pl.col("run_id") == run_id)
        if job is not None:
            lf = lf.filter(pl.col("job") == job)
        return lf.sort(["ended_at", "kind", "commit_seq"]).collect()


def dead_by_class_json(value) -> str:
    """A dead_by_class cell (dict, list of pairs or None) as sorted JSON, for display."""
    if value is None:
        return "{}"
    if isinstance(value, list):
        value = {k: v for k, v in value}
    return json.dumps(dict(sorted(value.items())))
