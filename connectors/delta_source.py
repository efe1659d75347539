"""Delta source: a table's rows as work, streamed in chunks, resumable exactly once.

Positions use the same protocol as Kafka (docs/exactly-once.md) with these "partitions":

    topic     = the table URI
    partition = a table version;  offset = the row's ordinal within that version's rows
    partition MARKER (-1): the version this job is on (snapshot: the snapshot's version;
                           incremental: the newest version with committed rows)
    partition IDENTITY (-2), MODE (-3): which table, and which mode, the positions are of

A version's rows are read in a fixed order (data files sorted by path, rows in file order; change
feed rows sorted), so an ordinal names the same row on every run.

- snapshot:    one unit, every row of the table at `version` (default: the latest, remembered in
               the MARKER so a rerun finishes the same snapshot and then has nothing to do).
- incremental: one unit per version after the MARKER: rows added by appends. Versions that
               rewrite data (UPDATE, DELETE, MERGE, overwrite) are reported: with the change data
               feed, their inserted rows are processed and each updated/deleted row becomes a
               dead-letter row (stage `source`); without it, the version is logged and counted.
               OPTIMIZE-style versions (no data change) are skipped.

    out: SOURCE_SCHEMA tables, value = the row as JSON (what the prompt template sees).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, DeltaProtocolError, SchemaMismatchError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler

from connectors.source import (
    Lag, PartitionStatus, SourceContext, SourceStatus, identity_of, register_source, source_versions_behind,
)  # fmt: skip
from schemas.errors import SourceError, SpecError
from schemas.records import SOURCE_SCHEMA
from schemas.spec import DeltaSourceSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
MARKER = -1
# partition IDENTITY (-2): which table the positions are of (63 bits of a hash of its Delta table id),
# riding on every commit like the MARKER. A table deleted and created again at the same URI starts
# its versions at 0 again: without this the job read it from its old marker on, skipping rows.
IDENTITY = -2
# partition MODE (-3): how the positions were made (MODES: a version's ordinals mean other rows in a
# snapshot than in an incremental read), riding on every commit too. Before stop 47 a snapshot
# rerun as incremental (or the reverse) skipped or repeated rows without a word.
MODE = -3
MODES = {"incremental": 0, "snapshot": 1}
FOLLOW_GIVE_UP_S = 900.0  # --follow: a store error planning new versions for this long (3 tries at least) stops the job


def table_identity(dt: DeltaTable) -> int:
    """identity_of the table's Delta id (metadata.id: fixed when it was created)."""
    return identity_of(dt.metadata().id)
CDF_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")
# The change kind of a change-feed row, beside its columns until the row becomes an event. A name
# no table column has (NUL): a source column named `_change` was taken for it before stop 43 (and
# stopped a plain table's job: its values are not change kinds).
CHANGE_COLUMN = "\x00tidegate_change"


@dataclass
class _Unit:
    """The rows one table version contributes, in their fixed order."""

    version: int
    rows: int
    read: Callable[[int], Iterator[pa.Table]]  # start ordinal -> chunks from there
    check: Callable[[int], None] | None = None  # start ordinal -> SourceError if a file it needs is gone


@dataclass
class SourceReport:
    skipped_change_versions: list[int] = field(default_factory=list)  # rewrites without a change feed


def _json_default(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    raise TypeError(f"cannot encode {type(v).__name__}")


def _plain_types(table: pa.Table) -> pa.Table:
    """The change feed returns string_view/binary_view columns that some Arrow kernels reject."""
    fields = []
    for f in table.schema:
        t = pa.string() if pa.types.is_string_view(f.type) else pa.binary() if pa.types.is_binary_view(f.type) else f.type
        fields.append(pa.field(f.name, t, f.nullable))
    return table.cast(pa.schema(fields))


def _records_of(dt: DeltaTable) -> dict[str, int]:
    """Rows per data file of this snapshot, from the log's statistics (numRecords), by the path
    the dataset's fragments have (the log's is percent-encoded once more). A file without the
    statistic is left out: its footer counts it."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if "num_records" not in adds.column_names:
        return {}
    return {unquote(p): n for p, n in zip(adds.column("path").to_pylist(), adds.column("num_records").to_pylist())
            if n is not None}  # fmt: skip


@register_source
class DeltaSource:
    kind = "delta"
    settings = DeltaSourceSpec
    bounded = True  # a run ends once the rows are committed, unless it follows new versions

    def __init__(self, spec: DeltaSourceSpec, ctx: SourceContext):
        if ctx.follow and spec.mode != "incremental":
            raise SpecError("--follow needs source.delta.mode: incremental")
        self.spec = spec
        self.topic = spec.uri
        self.resume_positions = ctx.positions.resume
        self.furthest_positions = getattr(ctx.positions, "furthest", None)
        self.chunk_rows = ctx.batch_rows
        self.follow = ctx.follow
        self.report = SourceReport()
        self._storage = spec.storage_options or None
        self._units: list[_Unit] = []
        self._rows: Iterator[tuple[int, int, pa.Table]] | None = None
        self._pending: pa.Table | None = None  # rows read beyond the last batch handed out
        self._exhausted = False
        self._last_planned: int | None = None
        self._next_check = 0.0
        self._failing_since: float | None = None  # --follow: when planning new versions began failing
        self._failures = 0  # ... and how many tries failed since
        self.total_rows = 0  # rows still to do when the plan was made (for progress)
        self._identity: int | None = None  # table_identity() of the table start() found
        self._handed = 0  # rows handed out since the plan was made

    # -- checks and planning ---------------------------------------------------------------------

    def _table(self, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(self.spec.uri, version=version, storage_options=self._storage)
        except TableNotFoundError:
            if version is not None and self._loadable(None):
                raise SourceError(
                    f"source.delta.uri {self.spec.uri!r}: version {version} can no longer be read (its log is past "
                    f"the table's delta.logRetentionDuration); the oldest version that can is "
                    f"{self._oldest_loadable(version)}"
                ) from None
            raise SourceError(f"source.delta.uri {self.spec.uri!r}: no Delta table there") from None

    def _loadable(self, version: int | None) -> bool:
        try:
            DeltaTable(self.spec.uri, version=version, storage_options=self._storage)
        except TableNotFoundError:
            return False
        return True

    def _oldest_loadable(self, low: int) -> int:
        """The oldest version from `low` on whose log is still there (the log is cleaned from the
        oldest end, so loadability is monotone: a binary search, a few loads)."""
        high = DeltaTable(self.spec.uri, storage_options=self._storage).version()
        while low < high:
            mid = (low + high) // 2
            if self._loadable(mid):
                high = mid
            else:
                low = mid + 1
        return low

    def _filesystem(self):
        # An explicit filesystem for local tables: reading through delta-rs's default one made
        # 10-25 % of processes crash at exit (stack facts); object stores use delta-rs's.
        if "://" not in self.spec.uri or self.spec.uri.startswith("file://"):
            return pafs.SubTreeFileSystem(self.spec.uri.removeprefix("file://"), pafs.LocalFileSystem())
        return None

    def columns(self) -> list[str]:
        """The columns of the rows the job will read: a pinned snapshot's own (before stop 47 the
        latest version's: a template column added later passed the check, and every row of the
        older snapshot was then dead-lettered missing_variable)."""
        pinned = self.spec.version if self.spec.mode == "snapshot" else None
        return [f.name for f in pa.schema(self._table(pinned).schema().to_arrow())]

    def check(self, required: Mapping[str, str]) -> None:
        """required: column -> why it is needed. Fails naming every missing column."""
        have = set(self.columns())
        missing = [f"{col!r} ({why})" for col, why in required.items() if col not in have]
        if missing:
            raise SourceError(
                f"source table {self.spec.uri} lacks column(s) {', '.join(missing)}; it has: {', '.join(sorted(have))}"
            )

    def start(self) -> None:
        table = self._table()
        latest = table.version()
        self._identity = table_identity(table)
        recorded = self.resume_positions([(self.topic, IDENTITY)]).get((self.topic, IDENTITY))
        if recorded is not None and recorded != self._identity:
            raise SourceError(
                f"source.delta.uri {self.spec.uri!r}: the table there is not the one this job's positions are of (its "
                "Delta table id changed: deleted and created again?); reading on would skip or repeat rows. Give the "
                "job a new name to read this table from its start, or point it at the table it read"
            )  # fmt: skip
        marker = self.resume_positions([(self.topic, MARKER)]).get((self.topic, MARKER))
        self._check_mode(marker)
        if self.spec.mode == "snapshot":
            if marker is None and self.furthest_positions is not None:
                # No results commit yet, but a first commit may have landed its dead letters (and
                # their MARKER) before it stopped: that snapshot's version is the one to finish (the
                # latest, planned anew, would give its rows new ordinals: twice in the output).
                marker = self.furthest_positions([(self.topic, MARKER)]).get((self.topic, MARKER))
            if self.spec.version is not None and marker is not None and marker != self.spec.version:
                raise SourceError(
                    f"source.delta.version {self.spec.version}: this job's positions are of the snapshot at version "
                    f"{marker}; reading another snapshot on from them would skip or repeat rows. Give the job a new "
                    "name to read another version, or set source.delta.version back"
                )  # fmt: skip
            version = self.spec.version if self.spec.version is not None else (marker if marker is not None else latest)
            if version > latest:
                raise SourceError(f"source.delta.version {version}: the table's latest version is {latest}")
            self._units = [self._snapshot_unit(version)]
            self._last_planned = version
        else:
            first = 0 if marker is None else marker
            # A version past the table's log retention cannot be read: _table stops, naming the
            # oldest version that can be (reading that one's snapshot instead would give its rows
            # ordinals a restart could not plan again, without a record of having done so).
            self._units, skipped = self._incremental_units(first, latest)
            self.report.skipped_change_versions += skipped
            self._last_planned = latest
        self._resume()

    def _check_mode(self, marker: int | None) -> None:
        """Refuses positions made in the other mode (a version's ordinals are other rows there).
        Positions from before the record (stop 47) are taken as they are, and get it with the
        next commit."""
        tp = (self.topic, MODE)
        recorded = self.resume_positions([tp]).get(tp)
        if recorded is None and self.furthest_positions is not None:  # a first commit of dead letters only
            recorded = self.furthest_positions([tp]).get(tp)
        if recorded is None or recorded == MODES[self.spec.mode]:
            return
        was = next((m for m, n in MODES.items() if n == recorded), f"unknown ({recorded})")
        raise SourceError(
            f"source.delta.mode {self.spec.mode}: this job's positions were made reading the table in {was} mode (on "
            f"version {marker}); reading on in another mode would skip or repeat rows. Give the job a new name to read "
            f"the table in {self.spec.mode} mode, or set the mode back"
        )  # fmt: skip

    def _snapshot_unit(self, version: int) -> _Unit:
        dt = self._table(version)
        return self._files_unit(version, self._dataset(dt), records=_records_of(dt))

    def _dataset(self, dt: DeltaTable):
        return dt.to_pyarrow_dataset(filesystem=self._filesystem())

    def _files_unit(self, version: int, dataset, paths: set[str] | None = None,
                    records: Mapping[str, int] | None = None) -> _Unit:  # fmt: skip
        """The rows of `dataset`'s files (only those in `paths`, when given), files sorted by path.
        `records`: rows per file as the log has them (_records_of); a file the log has no count of
        is counted from its footer. From the log, a version already processed is planned without
        opening its files: compacted and vacuumed since, it no longer stops a restart."""
        fragments = sorted(
            (f for f in dataset.get_fragments() if paths is None or f.path in paths), key=lambda f: f.path
        )
        records = records or {}
        try:
            counts = [n if (n := records.get(f.path)) is not None else f.count_rows() for f in fragments]
        except FileNotFoundError:
            raise self._files_gone(version) from None

        def needed(start: int) -> Iterator[tuple[object, int, int]]:
            """(fragment, its rows, rows of it to skip) for the fragments holding rows from `start`."""
            skip = start
            for frag, n in zip(fragments, counts):
                if skip >= n:
                    skip -= n
                    continue
                yield frag, n, skip
                skip = 0

        def read(start: int) -> Iterator[pa.Table]:
            try:
                for frag, _, skip in needed(start):
                    for batch in frag.to_batches(schema=dataset.schema, batch_size=self.chunk_rows):
                        t = pa.Table.from_batches([batch])
                        if skip:
                            cut = min(skip, t.num_rows)
                            t, skip = t.slice(cut), skip - cut
                        if t.num_rows:
                            yield t
            except FileNotFoundError:  # vacuumed while read
                raise self._files_gone(version) from None

        def check(start: int) -> None:  # before any work: each file still to read is there
            try:
                for frag, _, _ in needed(start):
                    frag.count_rows()
            except FileNotFoundError:
                raise self._files_gone(version) from None

        return _Unit(version, sum(counts), read, check)

    def _commit(self, version: int) -> tuple[str, bool] | None:
        """(operation, whether it changes data) of the commit that made `version`, read from its own
        log file: its commitInfo, and the add/remove actions' dataChange flags (an OPTIMIZE's are
        false). None when the file is gone (the log was cleaned up; the version still loads from a
        checkpoint). Before stop 47 this came from delta-rs's history(), which numbers the commits
        down from the handle's version while listing those after it too, and drops the commits
        without commitInfo: a commit landing while the plan was made shifted every label, and an
        append read as the OPTIMIZE after it was skipped for good."""
        fs = self._filesystem() or pafs.PyFileSystem(DeltaStorageHandler(self.spec.uri, self._storage))
        try:
            with fs.open_input_stream(f"_delta_log/{version:020d}.json") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return None
        operation, changes = "", False
        for line in lines:
            if not line.strip():
                continue
            action = json.loads(line)
            if "commitInfo" in action:
                operation = action["commitInfo"].get("operation") or ""
            changes = changes or any(action[k].get("dataChange", True) for k in ("add", "remove") if k in action)
        return operation, changes

    def _incremental_units(self, first: int, latest: int) -> tuple[list[_Unit], list[int]]:
        """(The units of versions first..latest, the versions skipped: rewrites without a change
        feed, restores). The caller adds the skipped ones to the run summary once the plan is
        made (a plan that failed half-way and is made again lists them once)."""
        units, skipped = [], []
        prev_files = {f.path for f in self._dataset(self._table(first - 1)).get_fragments()} if first > 0 else set()
        for v in range(first, latest + 1):
            at_v = self._table(v)
            dataset = self._dataset(at_v)  # one snapshot per version, for the diff and the read
            # The change feed as it was at this version: one switched on later has no change files
            # for it (before stop 43 the table's setting now decided, and such a version failed).
            config = at_v.metadata().configuration or {}
            cdf = str(config.get("delta.enableChangeDataFeed", "false")).lower() == "true"
            files = {f.path for f in dataset.get_fragments()}
            added, removed = files - prev_files, prev_files - files
            prev_files = files
            if not added and not removed:
                continue
            # Its log file gone (a cleaned-up log): taken as a change, never skipped as none.
            op, changes = self._commit(v) or ("", True)
            if not changes:  # files rearranged (OPTIMIZE, Z-order): the same rows
                continue
            if op == "RESTORE":  # files of earlier versions back (or away): no row the job has not read
                log.warning("source version %d restores an earlier version of the table: its files are not read "
                            "again", v)  # fmt: skip
                skipped.append(v)
                continue
            if not removed:
                units.append(self._files_unit(v, dataset, added, records=_records_of(at_v)))
            elif cdf:
                units.append(self._cdf_unit(v))
            else:
                log.warning(
                    "source version %d (%s) rewrites data and the table has no change data feed: its rows are "
                    "not processed (enable delta.enableChangeDataFeed to get them row by row)", v, op,
                )  # fmt: skip
                skipped.append(v)
        return units, skipped

    def _files_gone(self, version: int) -> SourceError:
        """A version whose log is there and whose data files are not: vacuumed since (a job stopped
        longer than the table's vacuum retention while it was compacted). The file is not named:
        a partitioned table's paths hold row values."""
        way_on = ("rerun with a later source.delta.version" if self.spec.mode == "snapshot"
                  else "its rows can no longer be read (incremental mode cannot go past them): a job with a new name "
                       "and mode: snapshot reads the table as it is now")  # fmt: skip
        return SourceError(f"source.delta.uri {self.spec.uri!r}: a data file of version {version} is gone (vacuumed "
                           f"since?); {way_on}; keep vacuum retention longer than a job stays stopped")  # fmt: skip

    def _cdf_unit(self, version: int) -> _Unit:
        try:
            cdf = self._table().load_cdf(starting_version=version, ending_version=version)
            changes = _plain_types(pa.table(cdf))
        except FileNotFoundError:
            raise self._files_gone(version) from None
        except pa.ArrowInvalid as e:  # how delta-rs reports a store error on a change file (its message names it: not kept)
            text = str(e)
            if "Failed to fetch metadata" in text and "not found" in text:
                raise self._files_gone(version) from None
            if "Object Store error" in text:  # another store error (throttled, timed out): an OSError, retried by --follow
                raise OSError(f"the store failed reading the change files of source version {version}") from None
            raise
        changes = changes.filter(pc.is_in(changes["_change_type"], pa.array(["insert", "update_postimage", "delete"])))
        data_cols = [c for c in changes.column_names if c not in CDF_COLUMNS]
        # A fixed order: by change type, then by the row's JSON.
        rows = sorted(
            zip(changes["_change_type"].to_pylist(), changes.select(data_cols).to_pylist()),
            key=lambda r: (r[0], json.dumps(r[1], sort_keys=True, default=_json_default)),
        )
        kinds = [k for k, _ in rows]
        table = pa.Table.from_pylist([r for _, r in rows], schema=changes.select(data_cols).schema)
        table = table.append_column(CHANGE_COLUMN, pa.array(kinds, pa.string()))

        def read(start: int) -> Iterator[pa.Table]:
            for off in range(start, table.num_rows, self.chunk_rows):
                yield table.slice(off, self.chunk_rows)

        return _Unit(version, table.num_rows, read)

    def _resume(self) -> None:
        tps = [(self.topic, u.version) for u in self._units]
        positions = self.resume_positions(tps + [(self.topic, p) for p in (MARKER, IDENTITY, MODE)]) if tps else {}
        starts = []
        for u in self._units:
            last = positions.get((self.topic, u.version))
            start = 0 if last is None else last + 1
            if start < u.rows:
                starts.append((u, start))
        if self.spec.mode == "incremental":  # versions whose rows are all committed need no plan any more
            self._units = [u for u, _ in starts]
        self._begin(starts)

    def _begin(self, starts: list[tuple[_Unit, int]], checked: bool = False) -> None:
        """Read these units from these row ordinals on (`checked`: their files are known to be
        there, _Unit.check)."""
        for u, s in starts:
            if u.check is not None and not checked:
                u.check(s)
        self.total_rows = sum(u.rows - s for u, s in starts)
        self._handed = 0
        log.info(
            "Delta source %s (%s): %d row(s) to do in version(s) %s",
            self.spec.uri, self.spec.mode, self.total_rows, [u.version for u, _ in starts],
        )  # fmt: skip
        self._rows = self._iterate(starts)
        self._pending = None
        self._exhausted = False

    def _iterate(self, starts: list[tuple[_Unit, int]]) -> Iterator[tuple[int, int, pa.Table]]:
        for unit, start in starts:
            ordinal = start
            for chunk in unit.read(start):
                yield unit.version, ordinal, chunk
                ordinal += chunk.num_rows

    # -- the Source interface used by the job loop -----------------------------------------------

    def poll(self, max_records: int, timeout_ms: int) -> pa.Table | None:
        parts, n = [], 0
        while n < max_records:
            if self._pending is not None:
                t, self._pending = self._pending, None
            else:
                nxt = next(self._rows, None) if self._rows is not None else None
                if nxt is None:
                    self._exhausted = True
                    break
                t = self._to_source(*nxt)
            if n + t.num_rows > max_records:
                t, self._pending = t.slice(0, max_records - n), t.slice(max_records - n)
            parts.append(t)
            n += t.num_rows
        if parts:
            self._handed += n
            return pa.concat_tables(parts)
        if self.follow:
            self._maybe_extend()
            time.sleep(min(timeout_ms / 1000, 0.2))
        return None

    def _to_source(self, version: int, first_ordinal: int, chunk: pa.Table) -> pa.Table:
        n = chunk.num_rows
        change = [None] * n
        if CHANGE_COLUMN in chunk.column_names:
            change = [{"insert": None, "update_postimage": "update", "delete": "delete"}[k] for k in chunk[CHANGE_COLUMN].to_pylist()]
            chunk = chunk.drop_columns([CHANGE_COLUMN])
        values = [json.dumps(r, default=_json_default).encode() for r in chunk.to_pylist()]
        now = time.monotonic_ns()
        return pa.table(
            {
                "topic": [self.topic] * n,
                "partition": [version] * n,
                "offset": list(range(first_ordinal, first_ordinal + n)),
                "key": [None] * n,
                "value": values,
                "timestamp_ms": [None] * n,
                "received_ns": [now] * n,
                "source_change": change,
            },
            schema=SOURCE_SCHEMA,
        )

    def _maybe_extend(self) -> None:
        """--follow: plan the versions that appeared since the last plan."""
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.spec.poll_interval_s
        try:
            latest = self._table().version()
            new, skipped = self._incremental_units(self._last_planned + 1, latest) if (
                self._last_planned is not None and latest > self._last_planned) else (None, [])  # fmt: skip
            for u in new or []:
                if u.check is not None:
                    u.check(0)
        except (SourceError, DeltaProtocolError, SchemaMismatchError):  # the table gone, unreadable: stops, as at start
            raise
        except (OSError, DeltaError) as e:  # a store error (a timeout, throttling): nothing planned yet
            # Before stop 47 one such error ended a job that had followed the table for days; one
            # that does not clear in FOLLOW_GIVE_UP_S still does (a job that looks alive, reading nothing).
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            self._failures += 1
            if now - self._failing_since > FOLLOW_GIVE_UP_S and self._failures >= 3:
                raise SourceError(f"source.delta.uri {self.spec.uri!r}: new versions could not be planned for "
                                  f"{FOLLOW_GIVE_UP_S:.0f} s ({type(e).__name__})") from None  # fmt: skip
            log.warning("Delta source %s: new versions not planned (%s); trying again in %.1fs", self.spec.uri,
                        type(e).__name__, self.spec.poll_interval_s)  # fmt: skip
            return
        self._failing_since, self._failures = None, 0
        self.report.skipped_change_versions += skipped
        if new is not None:
            self._last_planned = latest
            # The earlier versions stay planned: rows of theirs may still be in flight, and if that
            # work is dropped (a fence, the commit writer lost) reseek reads them again from their
            # positions; dropped from the plan, they would be skipped for good once a commit of the
            # new versions moved the MARKER past them. Now only the new ones are read, from their
            # first row (none of it was handed out).
            self._units = self._units + [u for u in new if u.rows]
            self._begin([(u, 0) for u in new], checked=True)

    def drained(self) -> bool:
        return self._exhausted and self._pending is None

    def backlog(self) -> int | None:
        """Rows of the current plan not handed out yet."""
        return max(0, self.total_rows - self._handed)

    def lag(self, committed: Mapping[TopicPartition, int | None]) -> Lag:
        """Source versions behind: the table's newest version against the version marker."""
        return Lag(versions_behind=source_versions_behind(self._table().version(), committed.get((self.topic, MARKER))))

    def keepalive(self) -> None:
        pass  # a table holds no membership between reads

    def notes(self) -> list[str]:
        if not self.report.skipped_change_versions:
            return []
        return [
            f"source versions {self.report.skipped_change_versions} rewrote data (update/delete/merge) with no "
            "change data feed, or restored an earlier version: not processed"
        ]

    def assignment(self) -> set[TopicPartition]:
        return {(self.topic, u.version) for u in self._units} | {(self.topic, p) for p in (MARKER, IDENTITY, MODE)}

    def extra_positions(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The MARKER rides along with every commit (the newest version it covers), and the table's
        IDENTITY and the MODE (start() refuses positions of another table, or of the other mode)."""
        versions = [p for (t, p) in positions if t == self.topic and p >= 0]
        if not versions:
            return {}
        return {(self.topic, MARKER): max(versions), (self.topic, IDENTITY): self._identity,
                (self.topic, MODE): MODES[self.spec.mode]}  # fmt: skip

    def committed(self, positions: Mapping[TopicPartition, int]) -> None:
        """A version whose last row is committed leaves the plan (with --follow the plan would
        otherwise grow by every version the run sees, change tables included)."""
        done = {p for (t, p), last in positions.items() if t == self.topic and p >= 0}
        if done:
            self._units = [u for u in self._units if not (u.version in done and positions[(self.topic, u.version)] >= u.rows - 1)]

    def reseek(self, tps) -> None:
        self._resume()

    def close(self) -> None:
        self._rows = None

    # -- status ----------------------------------------------------------------------------------

    MAX_STATUS_VERSIONS = 100  # incremental sources: versions listed at most (the newest ones)

    @classmethod
    def status(cls, settings: DeltaSourceSpec, job_name: str, stored) -> SourceStatus:
        """snapshot: the snapshot's version with its row count as the end; incremental: the
        versions from the marker on (at most MAX_STATUS_VERSIONS), without ends."""
        uri, so = settings.uri, settings.storage_options or None
        out = SourceStatus(
            {"kind": cls.kind, "uri": uri, "mode": settings.mode},
            summary=f"delta table {uri} ({settings.mode})",
            unit="source version",
        )
        marker = stored.read_positions([(uri, MARKER)]).get((uri, MARKER), (None, None))[0]
        try:
            latest = DeltaTable(uri, storage_options=so).version()
        except TableNotFoundError:
            out.errors.append(f"source table {uri} does not exist")
            return out
        out.versions_behind = source_versions_behind(latest, marker)
        if settings.mode == "snapshot":
            version = settings.version if settings.version is not None else (marker if marker is not None else latest)
            try:  # row counts from the Parquet footers
                import polars as pl

                total = int(pl.scan_delta(uri, version=version, storage_options=so).select(pl.len()).collect().item())
            except Exception as e:
                out.errors.append(f"source table {uri} version {version}: cannot count its rows: {e}")
                total = None
            versions, ends = [version], {version: total}
        else:
            first = max(0, marker if marker is not None else 0, latest - cls.MAX_STATUS_VERSIONS + 1)
            versions, ends = list(range(first, latest + 1)), {}
        positions = stored.read_positions([(uri, v) for v in versions])
        for v in versions:
            committed, dead = positions.get((uri, v), (None, None))
            out.partitions.append(PartitionStatus(uri, v, committed, dead, end=ends.get(v)))
        return out
