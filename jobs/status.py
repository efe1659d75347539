"""`tidegate status SPEC.yaml [--json]`: where a job stands, read from its tables (never written).

    collect_status(spec)  -> a JSON-serialisable dict:
        job, collected_at, source, tables (results / dead_letter / runs: uri, exists, version,
        rows, last_commit_at), last_commit_at,
        partitions: one entry per Kafka partition (or per Delta source version):
            topic, partition, committed (last offset in the results table's Delta txn, or null),
            next, end (Kafka: fetch high watermark; Delta snapshot: the version's row count),
            lag, dead_letter_position, repair_pending
        lag_total, versions_behind (Delta sources), dead_letters (total, by stage/error_class),
        runs (last run's throughput and status, recent runs), errors (what could not be read)
    render_status(status, console)  -> rich tables

Positions come from the results table's application transactions (docs/exactly-once.md); Kafka's
end offsets from a fetch's high watermark (`kafka_end_offsets`): tansu answers ListOffsets (and so
`seek_to_end` + `position`) wrongly, fetch responses rightly (connectors/kafka.py `drained`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from connectors.delta import txn_app_id
from connectors.runs import RunsTable, dead_by_class_json, default_runs_uri
from jobs.metrics import partition_lag, source_versions_behind
from schemas.errors import SourceError
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
MARKER = -1  # connectors.delta_source.MARKER: the Delta source's version marker
MAX_DELTA_VERSIONS = 100  # incremental sources: versions listed at most (the newest ones)
RECENT_RUNS = 5

EndOffsets = Callable[..., Mapping[TopicPartition, int | None]]


# -- Kafka end offsets -----------------------------------------------------------------------------


def kafka_end_offsets(
    bootstrap: str | list[str],
    topic: str,
    consumer_config: Mapping[str, Any] | None = None,
    timeout_s: float = 10.0,
) -> dict[TopicPartition, int | None]:
    """End offset (high watermark) of every partition of `topic`, from topic metadata and fetches.

    Partitions come from the topic's metadata. The high watermark comes from a fetch response:
    the partitions are assigned (no group), sought to their beginning and polled (a small fetch,
    at most one record batch each). ListOffsets (`end_offsets`, `seek_to_end` + `position`) is not
    used: tansu answers it wrongly (measured: 1 for a partition holding 5 records). A partition
    whose watermark did not arrive within `timeout_s` maps to None.
    """
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KafkaTP
    from kafka.errors import KafkaError

    config = dict(consumer_config or {})
    config.update(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=1024,  # the broker still returns one whole batch (KIP-74)
        max_poll_records=1,
    )
    try:
        consumer = KafkaConsumer(**config)
    except KafkaError as e:
        raise SourceError(f"no Kafka broker reachable at {bootstrap}: {e}") from None
    try:
        deadline = time.monotonic() + timeout_s
        parts = consumer.partitions_for_topic(topic)
        while parts is None and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        if not parts:  # None: no metadata; empty: a broker that knows no partitions of it
            raise SourceError(f"Kafka topic {topic!r} does not exist (or no metadata within {timeout_s:.0f}s)")
        ktps = [KafkaTP(topic, p) for p in sorted(parts)]
        consumer.assign(ktps)
        consumer.seek_to_beginning(*ktps)
        while time.monotonic() < deadline and any(consumer.highwater(k) is None for k in ktps):
            consumer.poll(timeout_ms=100, max_records=1)
        return {(topic, k.partition): consumer.highwater(k) for k in ktps}
    finally:
        consumer.close(autocommit=False)


def _real_end_offsets(bootstrap, topic, consumer_config=None):
    # Looked up at call time, so tests may replace the module's `kafka_end_offsets`.
    return globals()["kafka_end_offsets"](bootstrap, topic, consumer_config=consumer_config)


# -- reading the tables ----------------------------------------------------------------------------


def _open(uri: str, storage_options: dict[str, str] | None) -> DeltaTable | None:
    try:
        return DeltaTable(uri, storage_options=storage_options or None)
    except TableNotFoundError:
        return None


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).isoformat()


def _table_info(dt: DeltaTable | None, uri: str, storage_options) -> dict:
    info: dict[str, Any] = {"uri": uri, "exists": dt is not None}
    if dt is None:
        return info
    last = dt.history(1)
    info["version"] = dt.version()
    info["last_commit_at"] = (
        _iso(datetime.fromtimestamp(last[0]["timestamp"] / 1000, timezone.utc)) if last else None
    )
    info["last_operation"] = last[0].get("operation") if last else None
    info["rows"] = int(pl.scan_delta(uri, storage_options=storage_options or None).select(pl.len()).collect().item())
    return info


def _partitions_in_tables(uris: list[str], topic: str, storage_options) -> set[int]:
    """Source partitions that rows of these tables come from (when topic metadata is unavailable)."""
    found: set[int] = set()
    for uri in uris:
        df = (
            pl.scan_delta(uri, storage_options=storage_options or None)
            .filter(pl.col("source_topic") == topic)
            .select(pl.col("source_partition").unique())
            .collect()
        )
        found |= set(df.get_column("source_partition").to_list())
    return found


def _dead_letter_counts(uri: str, storage_options) -> dict:
    df = (
        pl.scan_delta(uri, storage_options=storage_options or None)
        .group_by(["stage", "error_class"])
        .agg(pl.len().alias("count"))
        .sort(["count", "stage", "error_class"], descending=[True, False, False])
        .collect()
    )
    rows = [{"stage": r["stage"], "error_class": r["error_class"], "count": int(r["count"])} for r in df.to_dicts()]
    return {"total": sum(r["count"] for r in rows), "by_stage_class": rows}


def _runs_summary(runs: pl.DataFrame) -> dict:
    """The last run (by its latest row) in detail, and the recent runs in brief."""
    if runs.height == 0:
        return {"last": None, "recent": []}
    order = (
        runs.group_by("run_id")
        .agg(pl.col("ended_at").max().alias("last_at"))
        .sort("last_at", descending=True)
        .get_column("run_id")
        .to_list()
    )
    summaries = [_run_summary(runs.filter(pl.col("run_id") == rid)) for rid in order[:RECENT_RUNS]]
    return {"last": summaries[0], "recent": summaries}


def _run_summary(rows: pl.DataFrame) -> dict:
    commits = rows.filter(pl.col("kind") == "commit")
    end_row = rows.filter(pl.col("kind") == "run")
    if end_row.height:
        r = end_row.sort("ended_at").tail(1).to_dicts()[0]
        started, ended = r["started_at"], r["ended_at"]
        totals = {k: int(r[k] or 0) for k in ("rows_ok", "rows_flagged", "rows_dead", "prompt_tokens",
                                              "completion_tokens", "retries")}  # fmt: skip
        n_commits, status, error, dead_by_class = int(r["commit_seq"] or 0), r["status"], r["error"], r["dead_by_class"]
    else:
        started = commits.get_column("started_at").min()
        ended = commits.get_column("ended_at").max()
        totals = {k: int(commits.get_column(k).sum() or 0) for k in ("rows_ok", "rows_flagged", "rows_dead",
                                                                     "prompt_tokens", "completion_tokens", "retries")}  # fmt: skip
        merged: dict[str, int] = {}
        for cell in commits.get_column("dead_by_class").to_list():
            for k, v in (cell.items() if isinstance(cell, dict) else (cell or [])):
                merged[k] = merged.get(k, 0) + int(v)
        # No run row: the run is still going, or ended without writing one (killed).
        n_commits, status, error, dead_by_class = commits.height, "unfinished", None, merged
    first = rows.row(0, named=True)
    duration = (ended - started).total_seconds() if started is not None and ended is not None else None
    done = totals["rows_ok"] + totals["rows_dead"]
    return {
        "run_id": first["run_id"],
        "status": status,
        "error": error,
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "commits": n_commits,
        **totals,
        "dead_by_class": dead_by_class_json(dead_by_class),
        "duration_s": duration,
        "rows_per_s": done / duration if duration else None,
        "model_revision": first["model_revision"],
        "spec_hash": first["spec_hash"],
    }


# -- positions per partition -----------------------------------------------------------------------


def _position(dt: DeltaTable | None, app: str) -> int | None:
    return dt.transaction_version(app) if dt is not None else None


def _partition_entry(tp: TopicPartition, committed, dl_pos, end, lag) -> dict:
    return {
        "topic": tp[0],
        "partition": tp[1],
        "committed": committed,
        "next": None if committed is None else committed + 1,
        "end": end,
        "lag": lag,
        "dead_letter_position": dl_pos,
        # A crash between the dead-letter and the results commit: the next run repairs it.
        "repair_pending": dl_pos is not None and (committed is None or dl_pos > committed),
    }


def _kafka_partitions(spec, results, dead, end_fn, errors, so) -> list[dict]:
    kafka = spec.source.kafka
    ends: dict[TopicPartition, int | None] = {}
    if not kafka.bootstrap_servers:
        errors.append(
            "source.kafka.bootstrap_servers is empty: the job's embedded broker lives only while the job "
            "runs, so there are no end offsets (lag) to read"
        )
    else:
        try:
            if end_fn is None:
                config = dict(kafka.consumer_config)
                security = getattr(kafka, "security", None)  # TLS / SASL settings, secrets from the environment
                if security is not None:
                    config.update(security.client_config())
                ends = dict(_real_end_offsets(kafka.bootstrap_servers, kafka.topic, config))
            else:
                ends = dict(end_fn(kafka.bootstrap_servers, kafka.topic))
        except Exception as e:  # an unreachable broker must not hide the Delta side
            errors.append(f"Kafka end offsets unavailable: {e}")
    if ends:
        tps = sorted(ends)
    else:  # no topic metadata: the partitions the tables have rows from
        uris = [u for u, dt in ((spec.sink.results, results), (spec.sink.dead_letter, dead)) if dt is not None]
        tps = [(kafka.topic, p) for p in sorted(_partitions_in_tables(uris, kafka.topic, so))]
    out = []
    for tp in tps:
        app = txn_app_id(spec.name, tp, "kafka")
        committed, dl_pos = _position(results, app), _position(dead, app)
        end = ends.get(tp)
        lag = partition_lag({tp: end}, {tp: committed})[tp] if end is not None else None
        out.append(_partition_entry(tp, committed, dl_pos, end, lag))
    return out


def _delta_partitions(spec, results, dead, errors) -> tuple[list[dict], int | None]:
    src = spec.source.delta
    uri = src.uri

    def app(v: int) -> str:
        return txn_app_id(spec.name, (uri, v), "delta")

    marker = _position(results, app(MARKER))
    try:
        latest = DeltaTable(uri, storage_options=src.storage_options or None).version()
    except TableNotFoundError:
        errors.append(f"source table {uri} does not exist")
        return [], None
    behind = source_versions_behind(latest, marker)
    out = []
    if src.mode == "snapshot":
        version = src.version if src.version is not None else (marker if marker is not None else latest)
        committed = _position(results, app(version))
        try:
            total = int(
                pl.scan_delta(uri, version=version, storage_options=src.storage_options or None)
                .select(pl.len()).collect().item()
            )  # row counts from the Parquet footers
        except Exception as e:
            errors.append(f"source table {uri} version {version}: cannot count its rows: {e}")
            total = None
        done = 0 if committed is None else committed + 1
        lag = max(0, total - done) if total is not None else None
        out.append(_partition_entry((uri, version), committed, _position(dead, app(version)), total, lag))
    else:
        first = max(0, marker if marker is not None else 0, latest - MAX_DELTA_VERSIONS + 1)
        for v in range(first, latest + 1):
            committed = _position(results, app(v))
            out.append(_partition_entry((uri, v), committed, _position(dead, app(v)), None, None))
    return out, behind


# -- the status ------------------------------------------------------------------------------------


def collect_status(spec: JobSpec, kafka_end_offsets: EndOffsets | None = None) -> dict:
    """A job's status from its tables (read only) and, for Kafka, the topic's end offsets.

    kafka_end_offsets: callable(bootstrap_servers, topic) -> {(topic, partition): end offset or
    None}; default: this module's `kafka_end_offsets` with the spec's consumer_config.
    """
    so = spec.sink.storage_options or None
    errors: list[str] = []
    results = _open(spec.sink.results, so)
    dead = _open(spec.sink.dead_letter, so)
    runs = RunsTable(default_runs_uri(spec.sink.results), so)
    tables = {
        "results": _table_info(results, spec.sink.results, so),
        "dead_letter": _table_info(dead, spec.sink.dead_letter, so),
        "runs": {"uri": runs.uri, "exists": runs.exists()},
    }
    versions_behind = None
    if spec.source.kind == "kafka":
        source = {"kind": "kafka", "topic": spec.source.kafka.topic, "bootstrap_servers": spec.source.kafka.bootstrap_servers}
        partitions = _kafka_partitions(spec, results, dead, kafka_end_offsets, errors, so)
    else:
        source = {"kind": "delta", "uri": spec.source.delta.uri, "mode": spec.source.delta.mode}
        partitions, versions_behind = _delta_partitions(spec, results, dead, errors)
    lags = [p["lag"] for p in partitions]
    dl = _dead_letter_counts(spec.sink.dead_letter, so) if dead is not None else {"total": 0, "by_stage_class": []}
    return {
        "job": spec.name,
        "collected_at": _iso(datetime.now(timezone.utc)),
        "source": source,
        "tables": tables,
        "last_commit_at": tables["results"].get("last_commit_at"),
        "partitions": partitions,
        "lag_total": sum(lags) if lags and all(x is not None for x in lags) else None,
        "versions_behind": versions_behind,
        "dead_letters": dl,
        "runs": _runs_summary(runs.read(job=spec.name)) if tables["runs"]["exists"] else {"last": None, "recent": []},
        "errors": errors,
    }


# -- rendering -------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_status(status: dict, console) -> None:
    """Print a status dict (from `collect_status`) as rich tables."""
    from rich.table import Table

    src = status["source"]
    head = Table(title=f"tidegate status: {status['job']}", show_header=False)
    head.add_column("what")
    head.add_column("value")
    if src["kind"] == "kafka":
        head.add_row("source", f"kafka topic {src['topic']} @ {','.join(src['bootstrap_servers'] or ['(embedded)'])}")
    else:
        head.add_row("source", f"delta table {src['uri']} ({src['mode']})")
        head.add_row("source versions behind", _fmt(status["versions_behind"]))
    for role, info in status["tables"].items():
        state = (f"version {info['version']}, {_fmt(info.get('rows'))} rows" if info.get("version") is not None
                 else ("exists" if info["exists"] else "not created yet"))  # fmt: skip
        head.add_row(f"{role.replace('_', '-')} table", f"{info['uri']} ({state})")
    head.add_row("last commit", _fmt(status["last_commit_at"]))
    head.add_row("total lag", _fmt(status["lag_total"]))
    console.print(head)

    parts = Table(title="positions (Delta) and lag", show_header=True)
    unit = "partition" if src["kind"] == "kafka" else "source version"
    for col in (unit, "committed", "next", "end", "lag", "dead-letter pos", "repair pending"):
        parts.add_column(col, justify="right")
    for p in status["partitions"]:
        parts.add_row(
            str(p["partition"]), _fmt(p["committed"]), _fmt(p["next"]), _fmt(p["end"]), _fmt(p["lag"]),
            _fmt(p["dead_letter_position"]), _fmt(p["repair_pending"]),
        )  # fmt: skip
    console.print(parts)

    dl = status["dead_letters"]
    dead = Table(title=f"dead letters: {dl['total']:,}", show_header=True)
    dead.add_column("stage")
    dead.add_column("error class")
    dead.add_column("rows", justify="right")
    for r in dl["by_stage_class"]:
        dead.add_row(r["stage"] or "-", r["error_class"] or "-", f"{r['count']:,}")
    console.print(dead)

    runs = Table(title="runs (newest first)", show_header=True)
    for col in ("run", "status", "started", "ended", "commits", "ok", "flagged", "dead", "rows/s"):
        runs.add_column(col, justify="right" if col in ("commits", "ok", "flagged", "dead", "rows/s") else "left")
    for r in status["runs"]["recent"]:
        runs.add_row(
            r["run_id"], r["status"] + (f": {r['error']}" if r.get("error") else ""), _fmt(r["started_at"]),
            _fmt(r["ended_at"]), _fmt(r["commits"]), _fmt(r["rows_ok"]), _fmt(r["rows_flagged"]),
            _fmt(r["rows_dead"]), _fmt(r["rows_per_s"]),
        )  # fmt: skip
    console.print(runs)
    for err in status["errors"]:
        console.print(f"[yellow]note:[/] {err}")
