"""Delta Lake sink (`sink.kind: delta`, the default): results and dead-letter tables with the
source positions in the same commits.

Implements the sink interface (connectors/sink.py) with the protocol of docs/exactly-once.md:
- `positions(tps)` reads each partition's committed position from the results table's
  application transactions (the resume point);
- `repair_window(tp)` returns the dead-letter offsets a crash may have left above that point;
- `commit(results, dead, positions)` writes the dead-letter table first, then the results table,
  each commit carrying one `txn` action per topic-partition.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import (
    ColumnProperties, CommitProperties, DeltaTable, Field, PostCommitHookProperties, QueryBuilder, Transaction,
    WriterProperties, write_deltalake,
)  # fmt: skip
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from connectors.sink import register_sink
from crypto.binding import Binding, binding_of, new_table_description
from schemas.errors import PartitionFencedError, SinkError, SinkSchemaError
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA, STATS_SAFE_COLUMNS
from schemas.spec import JobSpec, MaintenanceSpec, ParquetSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


def txn_app_id(job_name: str, tp: TopicPartition, source_kind: str = "kafka") -> str:
    return f"tidegate/{job_name}/{source_kind}/{tp[0]}/{tp[1]}"


# A DeltaTable handle kept across commits carries every commit it made or read since it was loaded,
# and each commit on it costs more for them (~0.15 ms of CPU per commit carried, on a local disk:
# a commit 100 commits after the handle's load costs ~3x one right after it; the handle's memory
# grew too, ~0.1 MB per commit in the soak); a fresh handle loads from the last checkpoint in a
# few ms (~6 ms for the results table right after one, more for each commit after it it must
# replay). So a handle is replaced once the table has a checkpoint newer than the handle's load
# (every delta.checkpointInterval commits: sink.maintenance.checkpoint_interval), or after this
# many commits through it when checkpoints are rarer (bench/delta_commits.py, docs/performance.md).
REOPEN_AFTER_COMMITS = 100
# The commitInfo field where an append records its write marker (DeltaSink._write_marker): how a
# write whose answer was lost is recognised as landed.
WRITE_MARKER_KEY = "tidegate.write"

# delta-rs's post-commit hook, left to its default, searches the log for expired files after *every*
# commit, listing the whole `_delta_log` (on a local disk: a stat of every file in it) even when
# nothing can expire. Delta's own writers clean up after checkpoints; an append here asks for the
# cleanup on its table's first commit in this process and every this many after, and the table's
# properties (delta.logRetentionDuration, delta.enableExpiredLogCleanup) still decide what goes;
# a maintenance round (connectors/maintenance.py) cleans up after its checkpoint too. With the
# handle refresh a blind append no longer makes, each log file costs a commit half what it did
# (bench/delta_commits.py, docs/performance.md).
LOG_CLEANUP_EVERY_COMMITS = 100


class _Table:
    """One Delta table with a fixed schema, created on first use."""

    def __init__(self, uri: str, schema: pa.Schema, storage_options: dict[str, str], role: str,
                 binding_role: str | None = None):  # fmt: skip
        self.uri = uri
        self.schema = schema
        self.storage_options = storage_options or None
        self.role = role
        self.binding_role = binding_role  # results | dead_letter: tables whose values are bound (crypto/binding.py)
        self._dt: DeltaTable | None = None
        self._commits = 0  # appends through the current handle
        self._loaded_version = 0  # the table version the current handle was loaded at
        self._checkpoint_every = 100  # the table's delta.checkpointInterval, read at each load
        self._appends = 0  # appends through this object, every handle (for the log cleanup)
        self.configuration: dict[str, str] = {}  # table properties a new table is created with
        self.partition_by: list[str] = []
        self.writer_properties: WriterProperties | None = None
        # True: an append never writes the table's checkpoint, it marks it due (write_checkpoint)
        self.defer_checkpoints = False
        self.checkpoint_due = False
        self._cleaned_at: int | None = None  # self._appends at write_checkpoint's last log cleanup
        # The handle's version when the last append's write began; None while an append has not
        # got that far (nothing of it can have landed).
        self.version_before_write: int | None = None

    def open(self, refresh: bool = True) -> DeltaTable:
        """The table's handle, brought up to its latest version unless `refresh` is False (an append
        that needs no newer view of the table: delta-rs checks a commit against every commit it
        did not see, as it would those landing during the write)."""
        if self._dt is not None and refresh and not self._worn():  # a worn handle is replaced by the latest anyway
            self._dt.update_incremental()
        if self._dt is not None and self._worn():  # worn already, or other writers' commits passed a checkpoint
            # Dropped at an open, never between a refreshed read and the append after it (that
            # append's open has refresh False, and nothing moved the handle since the read). A
            # checkpoint this handle's append made due is written first (a read, such as an
            # Idempotency-Key lookup, may come before the writer's own write_checkpoint): a fresh
            # handle then loads from it, not from the one before.
            if self.checkpoint_due:
                try:
                    self.write_checkpoint()
                except Exception as e:  # noqa: BLE001 - rows are unaffected; the next interval's is written
                    log.warning("%s table: checkpoint not written (%s)", self.role, type(e).__name__)
            self._dt = None
        if self._dt is None:
            try:
                self._dt = DeltaTable(self.uri, storage_options=self.storage_options)
            except TableNotFoundError:
                # A new table records how its values are bound (its Delta id is its label).
                description = new_table_description(self.binding_role) if self.binding_role else None
                self._dt = DeltaTable.create(self.uri, schema=self.schema, mode="ignore",
                                             storage_options=self.storage_options, description=description,
                                             configuration=self.configuration or None,
                                             partition_by=self.partition_by or None)  # fmt: skip
            have = list(self._dt.metadata().partition_columns)
            if have != self.partition_by:
                raise SinkSchemaError(f"{self.role} table {self.uri} is partitioned by {have or 'nothing'}, the spec "
                                      f"says {self.partition_by or 'nothing'} (partitioning is fixed at creation)")  # fmt: skip
            self._check_schema(self._dt)
            self._commits, self._loaded_version = 0, self._dt.version()
            self._checkpoint_every = int(self._dt.metadata().configuration.get("delta.checkpointInterval") or 100)
        return self._dt

    def _worn(self) -> bool:
        """The handle has passed a checkpoint since its load (a fresh one starts from it), or has
        made REOPEN_AFTER_COMMITS commits."""
        return _checkpoints_between(self._loaded_version, self._dt.version(), self._checkpoint_every) or (
            self._commits >= REOPEN_AFTER_COMMITS
        )

    def _check_schema(self, dt: DeltaTable) -> None:
        have = {f.name: f.type for f in pa.schema(dt.schema().to_arrow())}
        problems = [
            f"column {f.name!r} is {have[f.name]}, expected {f.type}"
            for f in self.schema
            if f.name in have and not _same_type(have[f.name], f.type)
        ]
        required = [f.name for f in pa.schema(dt.schema().to_arrow()) if f.name not in self.schema.names and not f.nullable]
        problems += [f"column {name!r} is not written by this job and takes no null" for name in required]
        if problems:
            raise SinkSchemaError(f"{self.role} table {self.uri} cannot take this job's rows: " + "; ".join(problems))
        added = [f for f in self.schema if f.name not in have]
        if added:
            # A table written by an older Tidegate: columns are only ever added (nullable), so the
            # upgrade is one add-columns commit; old rows read them as null.
            log.info("%s table %s: adding column(s) %s", self.role, self.uri, ", ".join(f.name for f in added))
            dt.alter.add_columns([Field.from_arrow(f) for f in added])
            dt.update_incremental()
        # Columns that may now hold inline PII tokens say so (the reader reveals tokens there only).
        marked = {f.name: f.metadata for f in pa.schema(dt.schema().to_arrow())}
        for f in self.schema:
            if f.metadata and f.metadata.get(b"tidegate.pii") and not (marked.get(f.name) or {}).get(b"tidegate.pii"):
                dt.alter.set_column_metadata(f.name, {k.decode(): v.decode() for k, v in f.metadata.items()})
                dt.update_incremental()

    def binding(self) -> Binding:
        dt = self.open()
        return binding_of(dt.metadata(), pa.schema(dt.schema().to_arrow()), self.uri)

    def txn_versions(self, app_ids: Iterable[str]) -> dict[str, int | None]:
        dt = self.open()  # one refresh of the log for all lookups
        return {app: dt.transaction_version(app) for app in app_ids}

    def rows_between(self, tp: TopicPartition, low: int, high: int, columns: str = "*") -> pa.Table:
        """Rows of source partition tp with low < source_offset <= high (the query holds only the
        topic name, quotes doubled, and integers)."""
        where = "source_topic = '{}' AND source_partition = {} AND source_offset > {} AND source_offset <= {}".format(
            tp[0].replace("'", "''"), int(tp[1]), int(low), int(high))  # fmt: skip
        return pa.table(QueryBuilder().register("t", self.open()).execute(f"SELECT {columns} FROM t WHERE {where}").read_all())

    def append(self, rows: pa.Table, txns: list[Transaction], refresh: bool = True, marker: str | None = None) -> None:
        """One commit of `rows`. `refresh=False`: a blind append (rows no source position covers),
        written on the handle as it is; a commit it did not see still fails a conflicting one.
        `marker`: recorded in the commit's commitInfo (WRITE_MARKER_KEY), where marked() finds it."""
        if "processed_date" in self.schema.names and "processed_date" not in rows.column_names:
            rows = rows.append_column("processed_date", pc.cast(rows.column("processed_at"), pa.date32()))
        clean_log = self._appends % LOG_CLEANUP_EVERY_COMMITS == 0
        self.version_before_write = None
        dt = self.open(refresh=refresh)
        self.version_before_write = dt.version()
        write_deltalake(
            dt,
            self._as_table_rows(dt, rows.select(self.schema.names).cast(self.schema)),
            mode="append",
            commit_properties=CommitProperties(
                app_transactions=txns, custom_metadata={WRITE_MARKER_KEY: marker} if marker else None
            ),
            writer_properties=self.writer_properties,
            # None: the table's delta.enableExpiredLogCleanup decides (delta-rs's default)
            # deferred checkpoints: write_checkpoint cleans up after them
            post_commithook_properties=PostCommitHookProperties(
                create_checkpoint=not self.defer_checkpoints,
                cleanup_expired_logs=None if clean_log and not self.defer_checkpoints else False,
            ),
        )
        # The commit of the version delta-rs would have checkpointed, as delta-rs decides it: of
        # several writers (replicas) only the one that made that version writes it.
        version = dt.version()
        self._counted(version - 1, version)

    def _as_table_rows(self, dt: DeltaTable, rows: pa.Table) -> pa.Table:
        """The rows in the table's own columns: a nullable column the table has and this job does
        not write is null (a newer Tidegate's column added by a replica that upgraded first, an
        `input_*` column of a field no longer in encryption.input_fields). Before stop 44 every
        append to such a table failed (a schema mismatch), on every restart."""
        table = pa.schema(dt.schema().to_arrow())
        extra = [f for f in table if f.name not in rows.column_names]
        if not extra:
            return rows
        required = [f.name for f in extra if not f.nullable]
        if required:
            raise SinkSchemaError(f"{self.role} table {self.uri}: column(s) {', '.join(required)} are not written by "
                                  "this job and take no null")  # fmt: skip
        for f in extra:
            rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
        return rows.select(table.names)

    def marked(self, marker: str, since: int) -> bool:
        """Whether a commit after version `since` carries `marker` in its commitInfo (a fresh
        handle: one listing of the log, then the commits since `since`). Every commit history()
        lists is looked at, not only those its version labels put after `since`: it labels them
        counting down from the handle's version, and lists the commits that landed after the
        handle was loaded too, so with another writer's commit in between the labels are off
        (the review of this change found this write's own commit dropped by such a filter)."""
        self._dt = None  # reopen: the cached snapshot may be the failed write's
        dt = self.open()
        newer = dt.version() - since
        return newer > 0 and any(c.get(WRITE_MARKER_KEY) == marker for c in dt.history(newer))

    def landed(self, since: int) -> None:
        """The last append landed though its answer was lost (found by its marker, on a handle
        loaded again, after version `since`): counted as append counts it, and with deferred
        checkpoints, one is due if a checkpoint version passed since that append began (append
        would have marked it; at worst this writes one more checkpoint than delta-rs would)."""
        self._counted(since, self._dt.version() if self._dt is not None else since)

    def _counted(self, low: int, high: int) -> None:
        """An append of ours landed at a version in (low, high]: counted, and with deferred
        checkpoints marked due if a checkpoint version is among them."""
        self._commits += 1
        self._appends += 1
        if self.defer_checkpoints and _checkpoints_between(low, high, self._checkpoint_every):
            self.checkpoint_due = True

    def write_checkpoint(self) -> int | None:
        """The checkpoint an append marked due (defer_checkpoints), at the handle's version, then
        (on the first and then every LOG_CLEANUP_EVERY_COMMITS appends, as appends ask delta-rs
        for it) the log files it lets go: the table's delta.enableExpiredLogCleanup and
        delta.logRetentionDuration decide. Returns the checkpoint's version, None if none was
        due. The next open loads a handle from it."""
        if not self.checkpoint_due or self._dt is None:
            return None
        self.checkpoint_due = False  # a failed one is not retried: the next interval's is
        dt = self._dt
        dt.create_checkpoint()
        if self._cleaned_at is None or self._appends - self._cleaned_at >= LOG_CLEANUP_EVERY_COMMITS:
            self._cleaned_at = self._appends
            if dt.metadata().configuration.get("delta.enableExpiredLogCleanup", "true").lower() != "false":
                dt.cleanup_metadata()
        return dt.version()


def _checkpoints_between(low: int, high: int, every: int) -> bool:
    """Whether a version in (low, high] is one delta-rs checkpoints at: (version + 1) divisible by
    the table's delta.checkpointInterval (versions 99, 199, ... at the default 100)."""
    every = max(every, 1)
    return (high + 1) // every > (low + 1) // every


def writer_properties(parquet: ParquetSpec, stats_columns: list[str]) -> WriterProperties:
    """sink.parquet as delta-rs writer properties: statistics only on `stats_columns` (see
    schemas/records.py STATS_SAFE_COLUMNS), none on text, ids, raw bytes or encrypted columns."""
    codec = "UNCOMPRESSED" if parquet.compression == "none" else parquet.compression.upper()
    level = parquet.compression_level if parquet.compression in ("zstd", "gzip") else None
    return WriterProperties(
        compression=codec, compression_level=level, max_row_group_size=parquet.max_row_group_rows,
        default_column_properties=ColumnProperties(statistics_enabled="NONE"),
        column_properties={c: ColumnProperties(statistics_enabled="CHUNK") for c in stats_columns},
    )  # fmt: skip


def safe_writer_properties(parquet: ParquetSpec, names: Iterable[str]) -> WriterProperties:
    """writer_properties with statistics on those of `names` that are STATS_SAFE_COLUMNS: how every
    file of a job's tables is written (appends, compaction, a replay's updates, re-encryption)."""
    return writer_properties(parquet, [c for c in names if c in STATS_SAFE_COLUMNS])


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    # Delta stores strings/binaries without Arrow's size variants; compare the logical type.
    def norm(t: pa.DataType) -> str:
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return "string"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
            return "binary"
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
            return f"list<{norm(t.value_type)}>"  # Delta names the item field "element", Arrow "item"
        if pa.types.is_struct(t):
            return "struct<" + ",".join(f"{f.name}:{norm(f.type)}" for f in t) + ">"
        return str(t)

    return norm(a) == norm(b)


@register_sink
class DeltaSink:
    kind = "delta"

    @classmethod
    def from_spec(cls, spec: JobSpec) -> DeltaSink:
        return cls(spec.name, spec.sink.results, spec.sink.dead_letter, spec.sink.storage_options, spec.source.kind,
                   write_attempts=spec.sink.write_attempts, write_backoff_s=spec.sink.write_backoff_s,
                   maintenance=spec.sink.maintenance, partition_by=spec.sink.partition_by,
                   parquet=spec.sink.parquet)  # fmt: skip

    def __init__(
        self,
        job_name: str,
        results_uri: str,
        dead_letter_uri: str,
        storage_options: dict[str, str],
        source_kind: str = "kafka",
        write_attempts: int = 5,
        write_backoff_s: float = 0.5,
        maintenance: MaintenanceSpec | None = None,
        partition_by: list[str] | None = None,
        parquet: ParquetSpec | None = None,
    ):
        self.job_name = job_name
        self.maintenance = maintenance or MaintenanceSpec()
        self.partition_by = list(partition_by or [])
        self.parquet = parquet or ParquetSpec()
        self.source_kind = source_kind
        self.results = _Table(results_uri, RESULTS_SCHEMA, storage_options, "results", "results")
        self.dead_letter = _Table(dead_letter_uri, DEAD_LETTER_SCHEMA, storage_options, "dead-letter", "dead_letter")
        self.write_attempts = write_attempts
        self.write_backoff_s = write_backoff_s
        self._writer_id: str | None = None
        self._writes = 0
        # What this process believes each table holds, to fence off other writers and to keep the
        # dead-letter positions monotonic.
        self._results_pos: dict[TopicPartition, int | None] = {}
        self._dl_pos: dict[TopicPartition, int | None] = {}
        self._marks: dict[str, int] = {}  # sink.topic's publish marks, for the next results commit

    def defer_checkpoints(self) -> None:
        """Appends stop writing checkpoints themselves; the writer calls write_checkpoints() when it
        is out of a caller's way (the online audit: after the requests it committed are answered).
        A checkpoint costs its commit more the larger the table (~20 ms for a few hundred files)."""
        for table in (self.results, self.dead_letter):
            table.defer_checkpoints = True

    def checkpoints_due(self) -> bool:
        return self.results.checkpoint_due or self.dead_letter.checkpoint_due

    def write_checkpoints(self) -> dict[str, int]:
        """The checkpoints appends marked due (defer_checkpoints): role -> checkpoint version. A
        failed one is logged (its type only) and left to the next interval or maintenance round:
        a checkpoint only makes later reads and commits cheaper."""
        written = {}
        for table in (self.results, self.dead_letter):
            try:
                version = table.write_checkpoint()
            except (OSError, DeltaError) as e:
                log.warning("%s table: checkpoint not written now (%s)", table.role, type(e).__name__)
                continue
            if version is not None:
                written[table.role] = version
        return written

    def stored_table_schemas(self) -> tuple[pa.Schema | None, pa.Schema | None]:
        """(results, dead letters) as the tables store them now; None for one that does not exist.
        Read only (EncryptionStage.keep_twin_as_stored asks before the stored schemas are taken)."""

        def schema(table: _Table) -> pa.Schema | None:
            try:
                dt = DeltaTable(table.uri, storage_options=table.storage_options)
            except TableNotFoundError:
                return None
            return pa.schema(dt.schema().to_arrow())

        return schema(self.results), schema(self.dead_letter)

    def use_schemas(self, results: pa.Schema, dead_letter: pa.Schema) -> None:
        """The tables' schemas when the job stores more or other columns (encryption: carried
        input fields, binary encrypted columns). Call before open()."""
        self.results.schema = results
        self.dead_letter.schema = dead_letter

    def prepare(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Rows as they will be stored, before the last stages (encryption) see them."""
        return results, dead

    def _app(self, tp: TopicPartition) -> str:
        return txn_app_id(self.job_name, tp, self.source_kind)

    def open(self) -> None:
        """Create the tables if needed and check their schemas (fails before any work)."""
        if "processed_date" in self.partition_by and "processed_date" not in self.results.schema.names:
            self.results.schema = self.results.schema.append(pa.field("processed_date", pa.date32()))
        self.results.partition_by = self.partition_by
        for table in (self.results, self.dead_letter):
            safe = [c for c in table.schema.names if c in STATS_SAFE_COLUMNS]
            config = {**self.maintenance.table_properties(), "delta.dataSkippingStatsColumns": ",".join(safe)}
            table.configuration = config
            table.writer_properties = writer_properties(self.parquet, safe)
            # Retried like a commit's reads: a writer Ray restarted opens its tables mid-run (resume),
            # where one object-store 503 would otherwise stop the job.
            dt = self._read(table, table.open)
            if any(dt.metadata().configuration.get(k) != v for k, v in config.items()):  # an older table
                try:
                    dt.alter.set_table_properties(config)
                except (CommitFailedError, DeltaError) as e:  # another writer committed meanwhile: not needed for correctness
                    log.warning("%s table %s: table properties not updated now (%s)", table.role, table.uri,
                                type(e).__name__)  # fmt: skip
                table._dt = None  # loaded again at the next use, with the table's properties as they are now

    def maintain(self, compact: bool = True, checkpoint: bool = True, vacuum: bool = True,
                 full_vacuum: bool = False) -> dict[str, Any]:  # fmt: skip
        """sink.maintenance's steps on the results, dead-letter and runs tables (connectors/maintenance.py):
        role -> {before, after: TableHealth, report: MaintenanceReport}."""
        from dataclasses import asdict

        from connectors.maintenance import maintain_table, table_health

        handles = {"results": self.results.open(), "dead_letter": self.dead_letter.open()}
        runs = self.history()
        if runs is not None and runs.exists():
            handles["runs"] = DeltaTable(runs.uri, storage_options=runs.storage_options)
        out = {}
        for role, dt in handles.items():
            before = table_health(dt)
            props = {"results": self.results, "dead_letter": self.dead_letter}.get(role)
            report = maintain_table(dt, self.maintenance, compact=compact, checkpoint=checkpoint, vacuum=vacuum,
                                    full_vacuum=full_vacuum,
                                    writer_properties=props.writer_properties if props is not None else None)  # fmt: skip
            out[role] = {"before": before.as_dict(), "after": table_health(dt).as_dict(), "report": asdict(report)}
        return out

    def bindings(self) -> tuple[Binding, Binding]:
        """How the results and dead-letter tables bind encrypted values (crypto/binding.py)."""
        return self.results.binding(), self.dead_letter.binding()

    def load_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Committed positions (last offset covered) per partition, read from the results table."""
        apps = {tp: self._app(tp) for tp in tps}
        res = self._read(self.results, partial(self.results.txn_versions, apps.values()))
        dl = self._read(self.dead_letter, partial(self.dead_letter.txn_versions, apps.values()))
        for tp, app in apps.items():
            self._results_pos[tp] = res[app]
            self._dl_pos[tp] = dl[app]
        return {tp: res[app] for tp, app in apps.items()}

    def repair_window(self, tp: TopicPartition) -> set[int]:
        """Offsets above the results position that the dead-letter table already holds.

        Non-empty only when a crash hit between the dead-letter commit and the results commit.
        """
        res, dl = self._results_pos.get(tp), self._dl_pos.get(tp)
        if dl is None or (res is not None and dl <= res):
            return set()
        low = -1 if res is None else res
        table = self.dead_letter.rows_between(tp, low, dl, "source_offset")
        offsets = set(table.column("source_offset").to_pylist()) if table.num_rows else set()
        log.info("partition %s: %d dead-lettered offsets above the results position %s", tp, len(offsets), res)
        return offsets

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._results_pos.pop(tp, None)
            self._dl_pos.pop(tp, None)

    def commit(self, results: pa.Table, dead: pa.Table, positions: Mapping[TopicPartition, int]) -> None:
        """Atomically (per table) append rows and advance positions. Dead letters first."""
        if not positions:
            return
        # sink.topic's marks staged for this commit, whatever becomes of it: a commit that fails
        # (fenced, say) leaves none behind to ride on a later commit (the writer keeps them).
        marks, self._marks = self._marks, {}
        self._fence(positions)
        if dead.num_rows:
            dl_txns = []
            for tp, last in positions.items():
                version = max(last, self._dl_pos.get(tp) or -1)
                dl_txns.append(Transaction(self._app(tp), version))
            self._append(self.dead_letter, dead, dl_txns, positions)
            for txn, tp in zip(dl_txns, positions):
                self._dl_pos[tp] = txn.version
        res_txns = [Transaction(self._app(tp), last) for tp, last in positions.items()]
        res_txns += [Transaction(app, version) for app, version in marks.items()]
        # The fence has just read the results table: the commit's own check covers what lands after.
        self._append(self.results, results, res_txns, positions, refresh=False)
        for tp, last in positions.items():
            self._results_pos[tp] = last

    def append_unpositioned(self, results: pa.Table, dead: pa.Table, txn: tuple[str, int] | None = None) -> None:
        """Append rows that no source position covers (the online endpoint's audit rows): each
        table's write is retried like a commit's (its marker tells whether a lost answer landed).
        `txn` (app id, version): recorded with each table's rows (an audit journal's progress)."""
        txns = [Transaction(*txn)] if txn is not None else []
        if dead.num_rows:
            self._append(self.dead_letter, dead, txns, {}, refresh=False)
        if results.num_rows:
            self._append(self.results, results, txns, {}, refresh=False)

    def audit_versions(self, app_id: str) -> tuple[int | None, int | None]:
        """(results, dead letters) version of application transaction `app_id`, as the tables are now."""
        out = []
        for table in (self.results, self.dead_letter):
            dt = table.open()  # brought up to the table's latest version (one listing of its log)
            out.append(dt.transaction_version(app_id))
        return out[0], out[1]

    def _append(self, table: _Table, rows: pa.Table, txns: list[Transaction], positions, refresh: bool = True) -> None:
        """One table's commit, retried on store errors (OSError, DeltaError) with backoff.

        A try whose answer was lost may have landed, so before each new try the table is read
        again: the write is over if a commit since it began carries its marker (`_write_marker`:
        the positions alone cannot tell, a dead-letter position may not move in a repair
        window); the partitions are fenced if their positions moved to anything else (another
        writer took over while we waited); only otherwise is it written again. A table that
        cannot be read either is never written blind: after sink.write_attempts the job stops."""
        writer_id, count = self._write_marker()
        marker = f"{writer_id}/{count}"
        marker_txn = None
        if not txns:
            # No transaction rides on this write (an online replica's audit append without a
            # journal): its marker is one too, or an object store's conditional PUT retried inside
            # delta-rs after its answer was lost would meet the write's own commit, conflict with
            # nothing in it and land the rows a second time (delta-rs rebases such an append; the
            # review of stop 46's change found it). One such id per writer process stays in the
            # table's state (docs/exactly-once.md).
            marker_txn = Transaction(f"tidegate/{self.job_name}/write/{writer_id}", count)
            txns = [marker_txn]
        since: int | None = None  # the table's version before this write's first try that got to writing
        expected = self._results_pos if table is self.results else self._dl_pos
        wait = self.write_backoff_s
        last: BaseException | None = None
        for attempt in range(1, self.write_attempts + 1):
            if last is not None:  # a try failed: find out what it left behind before trying again
                log.warning("%s table write failed (try %d of %d), checking it in %.1fs: %s", table.role,
                            attempt - 1, self.write_attempts, wait, _first_line(last))  # fmt: skip
                time.sleep(wait)
                wait *= 2
                try:
                    if self._landed_or_fenced(table, txns, marker, marker_txn, since, expected, positions):
                        log.warning("%s table write: the answer was lost, but the commit had landed", table.role)
                        table.landed(since)
                        return
                except PartitionFencedError:
                    raise
                except (OSError, DeltaError) as e:  # cannot tell yet: no write until it can
                    last = e
                    continue
            try:
                self._write(table, rows, txns, refresh, marker)
                return
            except CommitFailedError as e:
                since = table.version_before_write if since is None else since
                seen = self._carried_versions(table, txns)  # as this write's handle saw them (no I/O)
                # A concurrent commit of the same application transaction: someone else owns it now.
                # Unless it was this write's own (an object store's conditional PUT retried inside
                # delta-rs after its answer was lost: the second try finds the first's commit):
                # then its marker is there, and the write is done, not fenced.
                try:
                    if self._landed_or_fenced(table, txns, marker, marker_txn, since, expected, positions):
                        log.warning("%s table write: a conflict with its own landed commit", table.role)
                        table.landed(since)
                        return
                except (OSError, DeltaError):
                    pass  # cannot tell: fenced, as before (the next owner's positions decide)
                if not positions and seen is not None and self._carried_unchanged(table, txns, seen):
                    # Rows no position covers (an online replica's audit), and no other writer has
                    # committed the transactions this write carries (an audit journal's): what
                    # conflicted was another writer's change of the table (its metadata: a replica
                    # of a newer version adding a column), seen by this blind append's old handle.
                    # Tried again on a fresh one (before stop 44: the request failed).
                    table._dt = None
                    last = e
                    continue
                raise PartitionFencedError(
                    f"concurrent commit to the {table.role} table for these partitions: {_first_line(e)}", list(positions)
                ) from None
            except (OSError, DeltaError) as e:  # the store failed (network, throttling, ...)
                since = table.version_before_write if since is None else since
                last = e
        raise SinkError(
            f"writing the {table.role} table {table.uri} failed {self.write_attempts} times "
            f"(sink.write_attempts={self.write_attempts}); last error: {_first_line(last)}"
        ) from None

    def _write(self, table: _Table, rows: pa.Table, txns: list[Transaction], refresh: bool = True,
               marker: str | None = None) -> None:  # fmt: skip
        table.append(rows, txns, refresh, marker)

    def _read(self, table: _Table, read):
        """A read the commit protocol needs (positions, the fence), retried on store errors (an
        object store's 503) with the writes' attempts and backoff: one failed read stopped the job."""
        wait = self.write_backoff_s
        for attempt in range(1, self.write_attempts + 1):
            try:
                return read()
            except (OSError, DeltaError) as e:
                if attempt == self.write_attempts:
                    raise SinkError(f"reading the {table.role} table {table.uri} failed {self.write_attempts} times "
                                    f"(sink.write_attempts={self.write_attempts}); last error: {_first_line(e)}") from None  # fmt: skip
                log.warning("%s table read failed (try %d of %d), again in %.1fs: %s", table.role, attempt,
                            self.write_attempts, wait, _first_line(e))  # fmt: skip
                time.sleep(wait)
                wait *= 2

    def _write_marker(self) -> tuple[str, int]:
        """(id of this writer process's sink, its write count): "<id>/<count>" is recorded in the
        write's commitInfo (WRITE_MARKER_KEY). Before stop 46 every write carried it as an
        application transaction (tidegate/<job>/write/<id>), and every process that ever wrote a
        table (each run, restarted writer, replica, replay) left one in the table's state for good:
        every checkpoint and every load carried them all (Delta has no way to remove one; its
        transaction retention would expire quiet partitions' positions too). Now only a write that
        carries no other transaction does (_append says why). A table written before keeps its."""
        if self._writer_id is None:  # per process: a restarted writer gets a new one
            self._writer_id = uuid.uuid4().hex
        self._writes += 1
        return self._writer_id, self._writes

    @staticmethod
    def _carried_versions(table: _Table, txns: list[Transaction]) -> dict | None:
        """The versions of the transactions a write carries in the handle it was written on; None
        without one."""
        dt = table._dt
        if dt is None:
            return None
        try:
            return {t.app_id: dt.transaction_version(t.app_id) for t in txns}
        except (OSError, DeltaError):
            return None

    @staticmethod
    def _carried_unchanged(table: _Table, txns: list[Transaction], seen: dict) -> bool:
        """Nobody else committed the transactions this write carries since its handle was loaded
        (the table now holds the versions that handle saw). False when that cannot be read."""
        try:
            return table.txn_versions(list(seen)) == seen if seen else True
        except (OSError, DeltaError):
            return False

    def _landed_or_fenced(self, table: _Table, txns: list[Transaction], marker: str, marker_txn: Transaction | None,
                          since: int | None, expected, positions) -> bool:  # fmt: skip
        """True if this write (its marker) is in the table; raises PartitionFencedError if a
        position is not the one before this write; False: not landed, safe to write again. Store
        errors propagate (cannot tell).

        The marker lands with the positions in one commit, so without it a position at this
        write's own target was put there by another writer (it took the partition over and
        committed up to the same offset, the usual end on a quiet partition): fenced. Before
        stop 44 that counted as "not moved" and the rows were written a second time."""
        table._dt = None  # reopen: the cached snapshot may be the failed write's
        if since is not None and table.marked(marker, since):  # (None: no try got as far as writing)
            return True
        # The positions on the snapshot marked() listed the log from, not a newer one: a commit of
        # this write's landing after the listing would show its own positions there, taken for
        # another writer's (a fence for nothing); on the retry it is a conflict, found then.
        dt = table.open(refresh=False)
        have = {t.app_id: dt.transaction_version(t.app_id) for t in txns}
        if marker_txn is not None and have.get(marker_txn.app_id) == marker_txn.version:
            return True  # a write that carries only its marker: kept in the table's state (log cleanup cannot hide it)
        moved = [tp for tp, t in zip(positions, txns) if have.get(t.app_id) != expected.get(tp)]
        if moved:
            raise PartitionFencedError(
                f"positions of {moved} moved under this job while a {table.role} write was retried", moved
            )
        return False

    def _fence(self, positions: Mapping[TopicPartition, int]) -> None:
        """PartitionFencedError unless both tables' positions are what this writer last knew.
        The dead-letter table too: a writer that lost its partitions (a rebalance past
        revoke_timeout_s, a frozen member) may still land the dead-letter half of a commit after
        the new owner resumed. The new owner's next commit, dead letters or not, is then fenced;
        it reads the positions again, and those dead letters are its repair window, not rows it
        writes a second time. (What lands between this read and the append is not seen: the
        window is this commit's, not the old owner's whole delay.)"""
        apps = {tp: self._app(tp) for tp in positions}
        for table, known in ((self.results, self._results_pos), (self.dead_letter, self._dl_pos)):
            actual = self._read(table, partial(table.txn_versions, apps.values()))
            moved = [tp for tp, app in apps.items() if actual[app] != known.get(tp)]
            if moved:
                raise PartitionFencedError(
                    f"positions of {moved} moved under this job in the {table.role} table (another writer took "
                    "over)", moved
                )  # fmt: skip

    # -- sink.topic (connectors/results_topic.py) ---------------------------------------------------

    def stage_marks(self, marks: Mapping[str, int]) -> None:
        """Application transactions to record with the next results commit (sink.topic's marks);
        the next commit takes them, whether it lands or not."""
        self._marks.update(marks)

    def read_marks(self, names: Iterable[str]) -> dict[str, int | None]:
        return self.results.txn_versions(names)

    def rows_above(self, tp: TopicPartition, low: int, high: int) -> tuple[pa.Table, pa.Table]:
        """(results, dead letters) stored for source partition tp with low < offset <= high."""
        out = []
        for table in (self.results, self.dead_letter):
            rows = table.rows_between(tp, low, high)
            out.append(rows.select(table.schema.names).cast(table.schema) if rows.num_rows else table.schema.empty_table())
        return out[0], out[1]

    # -- read only: status, history ----------------------------------------------------------------

    def read_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int | None, int | None]]:
        """(results position, dead-letter position) per partition, without arming the fence."""
        apps = {tp: self._app(tp) for tp in tps}

        def read():
            res = _existing(self.results)
            dl = _existing(self.dead_letter)
            return {
                tp: (res.transaction_version(app) if res else None, dl.transaction_version(app) if dl else None)
                for tp, app in apps.items()
            }

        return self._read(self.results, read)

    def partitions_seen(self, topic: str) -> set[int]:
        """Source partitions of `topic` that stored rows come from."""
        import polars as pl

        found: set[int] = set()
        for table in (self.results, self.dead_letter):
            if _existing(table) is None:
                continue
            df = (
                pl.scan_delta(table.uri, storage_options=table.storage_options)
                .filter(pl.col("source_topic") == topic)
                .select(pl.col("source_partition").unique())
                .collect()
            )
            found |= set(df.get_column("source_partition").to_list())
        return found

    def history(self):
        """The runs table beside the results table (connectors/runs.py)."""
        from connectors.runs import RunsTable

        return RunsTable.for_results(self.results.uri, self.results.storage_options,
                                     self.maintenance.table_properties())  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The tables (uri, exists, version, rows, last commit) and the dead letters by stage and class."""
        tables = {"results": _table_info(self.results), "dead_letter": _table_info(self.dead_letter)}
        dead = {"total": 0, "by_stage_class": []}
        if tables["dead_letter"]["exists"]:
            dead = _dead_letter_counts(self.dead_letter)
        return {"tables": tables, "dead_letters": dead}


def _existing(table: _Table) -> DeltaTable | None:
    try:
        return DeltaTable(table.uri, storage_options=table.storage_options)
    except TableNotFoundError:
        return None


def iso_utc(ts: datetime | None) -> str | None:
    """A timestamp as ISO 8601 in UTC (a naive one is taken as UTC); None stays None."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).isoformat()


def _table_info(table: _Table) -> dict[str, Any]:
    import polars as pl

    dt = _existing(table)
    info: dict[str, Any] = {"uri": table.uri, "exists": dt is not None}
    if dt is None:
        return info
    last = dt.history(1)
    info["version"] = dt.version()
    info["last_commit_at"] = iso_utc(datetime.fromtimestamp(last[0]["timestamp"] / 1000, timezone.utc)) if last else None
    info["last_operation"] = last[0].get("operation") if last else None
    info["rows"] = int(pl.scan_delta(table.uri, storage_options=table.storage_options).select(pl.len()).collect().item())
    return info


def _dead_letter_counts(table: _Table) -> dict[str, Any]:
    import polars as pl

    df = (
        pl.scan_delta(table.uri, storage_options=table.storage_options)
        .group_by(["stage", "error_class"])
        .agg(pl.len().alias("count"))
        .sort(["count", "stage", "error_class"], descending=[True, False, False])
        .collect()
    )
    rows = [{"stage": r["stage"], "error_class": r["error_class"], "count": int(r["count"])} for r in df.to_dicts()]
    return {"total": sum(r["count"] for r in rows), "by_stage_class": rows}


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
