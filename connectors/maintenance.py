"""Delta table maintenance: compaction, checkpoints and log cleanup, vacuum; and a table's health.

    maintain_table(dt, policy, compact=, checkpoint=, vacuum=) -> MaintenanceReport
    table_health(dt) -> TableHealth (version, data files and bytes, log files and bytes)

    maintenance_round(maintain, commits, writer)  one logged round of a sink's maintain(); never raises

Used by the commit writer every `sink.maintenance.compact_every_commits` commits (between two of
its own commits, so it never races itself), by each online endpoint replica every as many audit
commits (beside its appends, on its own table handles: jobs/serve.py) and by `tidegate maintain SPEC`.

Exactly once is untouched: compaction (OPTIMIZE) rewrites files with dataChange=false and keeps
every application transaction (the positions and publish marks) in the log and its checkpoints;
a Delta source skips OPTIMIZE versions. A compaction that loses a race with another writer's
commit (CommitFailedError) is retried on a fresh snapshot, up to `attempts` times, then left for
the next round: it never removes a row (the other writer's files are not among those it read).
Vacuum deletes only files no version younger than `vacuum_retention_hours` references; the
default (168 h, Delta's own) keeps a week of time travel for readers and pinned snapshots.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError

from schemas.spec import MaintenanceSpec

log = logging.getLogger(__name__)


@dataclass
class TableHealth:
    version: int
    files: int  # data files of the current version
    data_bytes: int
    log_files: int | None  # files under _delta_log (local tables; None where the store is not a local path)
    log_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MaintenanceReport:
    compacted: dict[str, Any] | None = None  # files removed / added, or None if not run
    checkpoint_version: int | None = None
    vacuumed_files: int | None = None
    seconds: float = 0.0
    error: str | None = None  # a step that failed (logged; the next round tries again)


def table_health(dt: DeltaTable) -> TableHealth:
    actions = dt.get_add_actions(flatten=True)
    sizes = actions.column("size_bytes").to_pylist() if actions.num_rows else []
    log_files = log_bytes = None
    uri = dt.table_uri
    # delta-rs percent-encodes a local path's URI ("my%20lake"): before stop 44 a path with a space
    # or a non-ASCII letter failed here, and with it every maintenance round of the table.
    local = unquote(uri[len("file://"):]) if uri.startswith("file://") else uri if "://" not in uri else None
    if local is not None:
        log_dir = os.path.join(local, "_delta_log")
        entries = [e for e in os.scandir(log_dir) if e.is_file()]
        log_files, log_bytes = len(entries), sum(e.stat().st_size for e in entries)
    return TableHealth(dt.version(), len(sizes), int(sum(sizes)), log_files, log_bytes)


def maintain_table(
    dt: DeltaTable, policy: MaintenanceSpec, *, compact: bool = True, checkpoint: bool = True, vacuum: bool = True,
    attempts: int = 3, writer_properties: Any = None, full_vacuum: bool = False,
) -> MaintenanceReport:  # fmt: skip
    """Run the chosen steps on one table (its handle is left up to date). full_vacuum: list the
    table's directory for files no version references, not only those the log's tombstones name
    (files whose tombstones expired before a vacuum saw them; `tidegate maintain` does this)."""
    t0 = time.monotonic()
    report = MaintenanceReport()
    try:
        if compact:
            for attempt in range(1, attempts + 1):
                try:
                    metrics = dt.optimize.compact(target_size=policy.target_file_mb * 2**20,
                                                  writer_properties=writer_properties)
                    report.compacted = {"files_removed": metrics.get("numFilesRemoved", 0),
                                        "files_added": metrics.get("numFilesAdded", 0)}  # fmt: skip
                    break
                except CommitFailedError as e:  # another writer committed meanwhile: a fresh snapshot, again
                    log.info("compaction of %s lost a race (try %d of %d): %s", dt.table_uri, attempt, attempts, e)
                    dt.update_incremental()
            else:
                log.warning("compaction of %s gave up after %d conflicts; the next round tries again",
                            dt.table_uri, attempts)  # fmt: skip
        if checkpoint:
            dt.update_incremental()
            dt.create_checkpoint()
            # Log files older than delta.logRetentionDuration, before the checkpoint: as the table says
            # (delta.enableExpiredLogCleanup false keeps them, as the sink's own cleanup does).
            if dt.metadata().configuration.get("delta.enableExpiredLogCleanup", "true").lower() != "false":
                dt.cleanup_metadata()
            report.checkpoint_version = dt.version()
        if vacuum and policy.vacuum_retention_hours is not None:
            # The spec's retention is the policy, in whole hours (what delta-rs takes): rounded up,
            # never down (int() kept files up to an hour less than the spec said, before stop 44).
            hours = math.ceil(policy.vacuum_retention_hours)
            if full_vacuum:
                # A full vacuum takes every file under the table's folder that no version names: a
                # table nested in it (its data and its _delta_log) would go too. Looked at first, at
                # any age: a live nested table's log files are younger than the retention while its
                # data files are not (before stop 44 the look used the retention, found no log, and
                # the vacuum deleted the nested table's data).
                nested = [p for p in dt.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False,
                                               full=True) if "_delta_log" in p.replace("\\", "/").split("/")]  # fmt: skip
                if nested:
                    raise DeltaError(f"full vacuum refused: another table's log is inside this table's folder "
                                     f"({len(nested)} file(s) of it, e.g. {nested[0]})")  # fmt: skip
            removed = dt.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False, full=full_vacuum)
            report.vacuumed_files = len(removed)
        dt.update_incremental()
    except (OSError, DeltaError) as e:
        report.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("maintenance of %s stopped: %s (the next round tries again)", dt.table_uri, report.error)
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def maintenance_round(maintain, commits: int, writer: str) -> dict[str, Any] | None:
    """One round of a sink's `maintain()` (DeltaSink.maintain: role -> before/after/report), logged
    with each table's data files before and after; a failure is logged by its class and returns
    None: maintenance never stops the writer that runs it (the next round tries again)."""
    try:
        report = maintain()
    except Exception as e:  # noqa: BLE001 - maintenance must never stop a job or a replica
        log.warning("%s: table maintenance failed (the next round tries again): %s", writer, type(e).__name__)
        return None
    log.info("%s: table maintenance after %d commits: %s", writer, commits, {
        role: (r["before"]["files"], r["after"]["files"], r["report"]["seconds"]) for role, r in report.items()})  # fmt: skip
    return report
