"""`tidegate status SPEC.yaml [--json]`: where a job stands, read from its tables (never written).

    collect_status(spec)  -> a JSON-serialisable dict:
        job, collected_at, source (kind and where), tables (results / dead_letter / runs: uri,
        exists, version, rows, last_commit_at), last_commit_at,
        partitions: one entry per source partition (Kafka partition, Delta source version):
            topic, partition, committed (the sink's position, or null), next, end, lag,
            dead_letter_position, repair_pending
        lag_total, versions_behind (table sources), dead_letters (total, by stage/error_class),
        runs (last run's throughput and status, recent runs), errors (what could not be read)
    render_status(status, console)  -> rich tables

The source says where its partitions end (`Source.status`), the sink what it has committed
(`Sink.read_positions`, `Sink.describe`) and the runs table how the runs went: this module only
puts the answers together.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import polars as pl

from connectors.delta import iso_utc
from connectors.runs import dead_by_class_json
from connectors.sink import open_sink
from connectors.source import source_class
from jobs.formatting import format_value
from jobs.logs import reading_store, redact_text, redact_value
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

RECENT_RUNS = 5


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
        "started_at": iso_utc(started),
        "ended_at": iso_utc(ended),
        "commits": n_commits,
        **totals,
        "dead_by_class": dead_by_class_json(dead_by_class),
        "duration_s": duration,
        "rows_per_s": done / duration if duration else None,
        "model_revision": first["model_revision"],
        "spec_hash": first["spec_hash"],
    }


# -- the status ------------------------------------------------------------------------------------


def collect_status(spec: JobSpec) -> dict:
    """A job's status: the source's partitions and ends, the sink's positions and tables, the runs.
    Every text in it has URI credentials and secret keys' values masked (it is printed as JSON,
    and scraped): before stop 44 only the rendered table masked them."""
    with reading_store(f"the job's tables (results table {spec.sink.results})"):
        sink = open_sink(spec)
    with reading_store(f"the job's {spec.source.kind} source and its positions"):
        source = source_class(spec.source.kind).status(spec.source.settings, spec.name, sink)
    with reading_store(f"the job's tables (results table {spec.sink.results})"):
        described = sink.describe()
        tables = described["tables"]
        runs = sink.history()
        tables["runs"] = {"uri": runs.uri, "exists": runs.exists()} if runs is not None else {"uri": None, "exists": False}
        recent = _runs_summary(runs.read(job=spec.name)) if tables["runs"]["exists"] else {"last": None, "recent": []}
    partitions = [p.as_dict() for p in source.partitions]
    lags = [p["lag"] for p in partitions]
    return redact_value({
        "job": spec.name,
        "collected_at": iso_utc(datetime.now(timezone.utc)),
        "source": source.description,
        "source_summary": source.summary,
        "partition_unit": source.unit,
        "tables": tables,
        "last_commit_at": tables["results"].get("last_commit_at"),
        "partitions": partitions,
        "lag_total": sum(lags) if lags and all(x is not None for x in lags) else None,
        "versions_behind": source.versions_behind,
        "dead_letters": described["dead_letters"],
        "runs": recent,
        "errors": source.errors,
    })


# -- rendering -------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return format_value(v)


def render_status(status: dict, console) -> None:
    """Print a status dict (from `collect_status`) as rich tables."""
    from rich.table import Table

    head = Table(title=f"tidegate status: {status['job']}", show_header=False)
    head.add_column("what")
    head.add_column("value")
    head.add_row("source", redact_text(status["source_summary"]))
    if status["versions_behind"] is not None:
        head.add_row("source versions behind", _fmt(status["versions_behind"]))
    for role, info in status["tables"].items():
        state = (f"version {info['version']}, {_fmt(info.get('rows'))} rows" if info.get("version") is not None
                 else ("exists" if info["exists"] else "not created yet"))  # fmt: skip
        head.add_row(f"{role.replace('_', '-')} table", f"{redact_text(info['uri'])} ({state})")
    head.add_row("last commit", _fmt(status["last_commit_at"]))
    head.add_row("total lag", _fmt(status["lag_total"]))
    console.print(head)

    parts = Table(title="positions (Delta) and lag", show_header=True)
    for col in (status["partition_unit"], "committed", "next", "end", "lag", "dead-letter pos", "repair pending"):
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
