"""Delta tables as a source: the reader on real tables (fast), and whole jobs over them (slow)."""

from __future__ import annotations

import json
import signal
import time

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from connectors.delta_source import IDENTITY, MARKER, MODE, MODES, DeltaSource
from schemas.errors import SourceError
from schemas.spec import DeltaSourceSpec
from tests.conftest import make_spec, source_context, table_rows, wait_for, write_spec


def rows(start: int, n: int, region: str = "eu") -> pa.Table:
    return pa.table(
        {
            "id": [f"r{i:06d}" for i in range(start, start + n)],
            "user": [f"user-{i % 7}" for i in range(start, start + n)],
            "question": [f"what about order {i}?" for i in range(start, start + n)],
            "region": [region] * n,
        }
    )


def read_all(src: DeltaSource, batch: int = 7) -> pa.Table:
    parts = []
    while (t := src.poll(batch, 0)) is not None:
        parts.append(t)
    assert src.drained()
    return pa.concat_tables(parts) if parts else None


def source(uri: str, positions: dict | None = None, **spec) -> DeltaSource:
    positions = positions or {}
    return DeltaSource(DeltaSourceSpec(uri=uri, **spec), source_context(positions, batch_rows=5))


def test_snapshot_reads_every_row_once_in_a_fixed_order_and_resumes(tmp_path):
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 20, "eu"), partition_by=["region"])
    write_deltalake(uri, rows(20, 13, "us"), mode="append", partition_by=["region"])
    first = source(uri)
    first.start()
    assert first.total_rows == 33
    out = read_all(first)
    assert out.column("partition").to_pylist() == [1] * 33  # the snapshot's version
    assert out.column("offset").to_pylist() == list(range(33))
    events = [json.loads(v) for v in out.column("value").to_pylist()]
    assert sorted(e["id"] for e in events) == [f"r{i:06d}" for i in range(33)]
    assert {e["region"] for e in events} == {"eu", "us"}  # partition columns are part of the row

    again = source(uri)
    again.start()
    assert read_all(again).column("value").to_pylist() == out.column("value").to_pylist()

    resumed = source(uri, {(uri, MARKER): 1, (uri, 1): 16})
    resumed.start()
    rest = read_all(resumed)
    assert rest.column("offset").to_pylist() == list(range(17, 33))
    assert rest.column("value").to_pylist() == out.column("value").to_pylist()[17:]

    done = source(uri, {(uri, MARKER): 1, (uri, 1): 32})
    done.start()
    assert read_all(done) is None and done.total_rows == 0


def test_snapshot_marker_keeps_the_snapshot_a_rerun_started(tmp_path):
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 10))
    write_deltalake(uri, rows(10, 5), mode="append")  # version 1 appears after the first run began
    src = source(uri, {(uri, MARKER): 0, (uri, 0): 3})
    src.start()
    assert read_all(src).column("offset").to_pylist() == list(range(4, 10))
    pinned = source(uri, version=0)
    pinned.start()
    assert pinned.total_rows == 10


def test_a_snapshot_whose_first_commit_landed_only_its_dead_letters_is_finished_not_planned_anew(tmp_path):
    """Snapshot mode, version not pinned. The first commit wrote its dead letters (and the MARKER
    with them), then stopped before the results; meanwhile the table got an append. The rerun
    must finish that snapshot (its dead-lettered rows skipped), not plan the latest version,
    whose rows would get new ordinals: each of the first snapshot's rows in the output twice."""
    from compute.prompts import dead_letter_table
    from connectors.delta import DeltaSink
    from connectors.source import SourceContext
    from tests.conftest import results_table

    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 10))
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    sink.open()

    class SinkPositions:  # what the job's pipeline answers, over a real sink
        def resume(self, tps):
            positions = sink.load_positions(tps)
            self.windows = {tp: sink.repair_window(tp) for tp in tps}
            return positions

        def furthest(self, tps):
            both = sink.read_positions(tps)
            return {tp: max((p for p in both[tp] if p is not None), default=None) for tp in tps}

        def release(self, tps, lost=False, within_s=None):
            pass

    positions = SinkPositions()
    first = DeltaSource(DeltaSourceSpec(uri=uri), SourceContext("job", positions, batch_rows=5))
    first.start()
    read_all(first)
    dead = dead_letter_table([dict(stage="decode", error_class="invalid_json", error="e", source_topic=uri,
                                   source_partition=0, source_offset=o, raw=b"x") for o in (3, 4)], "r")  # fmt: skip
    results = results_table([0, 1, 2, 5, 6, 7, 8, 9], topic=uri)

    def stopped(table, *args, **kwargs):
        if table is sink.results:
            raise OSError("the job was killed here")
        return real(table, *args, **kwargs)

    real, sink._append = sink._append, stopped
    with pytest.raises(OSError):
        sink.commit(results, dead, {(uri, 0): 9, (uri, MARKER): 0})
    sink._append = real
    write_deltalake(uri, rows(10, 5), mode="append")  # version 1

    rerun = DeltaSource(first.spec, SourceContext("job", positions, batch_rows=5))
    rerun.start()
    out = read_all(rerun)
    assert set(out.column("partition").to_pylist()) == {0}  # the first snapshot's version, its ordinals
    assert out.column("offset").to_pylist() == list(range(10))
    assert positions.windows[(uri, 0)] == {3, 4}  # the job skips what the dead letters hold


def test_a_table_deleted_and_created_again_at_the_uri_is_refused_not_read_from_the_old_marker(tmp_path):
    """Before, positions were only versions and ordinals: a table deleted and created again at the
    same URI (versions from 0 again) was read from the old table's marker on, its earlier rows
    skipped. Every commit now records which table its positions are of (a hash of the Delta
    table id), and a start on another table stops naming the URI."""
    import shutil

    from connectors.delta import DeltaSink
    from connectors.delta_source import table_identity
    from connectors.source import SourceContext
    from tests.conftest import results_table

    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 4))
    write_deltalake(uri, rows(4, 4), mode="append")
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    sink.open()

    class SinkPositions:
        def resume(self, tps):
            return sink.load_positions(tps)

        def release(self, tps, lost=False, within_s=None):
            pass

    spec = DeltaSourceSpec(uri=uri, mode="incremental")
    first = DeltaSource(spec, SourceContext("job", SinkPositions(), batch_rows=4))
    first.start()
    read_all(first)
    done = {(uri, 0): 3, (uri, 1): 3}
    extra = first.extra_positions(done)
    assert extra == {(uri, MARKER): 1, (uri, IDENTITY): table_identity(DeltaTable(uri)), (uri, MODE): MODES["incremental"]}
    sink.commit(results_table([0, 1, 2, 3], topic=uri), sink.dead_letter.schema.empty_table(), {**done, **extra})
    again = DeltaSource(spec, SourceContext("job", SinkPositions(), batch_rows=4))
    again.start()  # the same table: nothing left to read, no complaint
    assert read_all(again) is None

    shutil.rmtree(uri)
    for v in range(3):  # a new table, grown past the old marker
        write_deltalake(uri, rows(10 * v, 3), mode="append" if v else "error")
    recreated = DeltaSource(spec, SourceContext("job", SinkPositions(), batch_rows=4))
    with pytest.raises(SourceError, match="the table there is not the one this job's positions are of"):
        recreated.start()


def test_a_source_column_named_change_is_data_not_the_change_marker(tmp_path):
    """Before, a column `_change` was taken for the change feed's marker: a plain table's job
    stopped on its first row (its values are no change kind)."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 3).append_column("_change", pa.array(["price", "owner", "insert"])))
    src = source(uri, mode="incremental")
    src.start()
    out = read_all(src)
    assert [json.loads(v)["_change"] for v in out.column("value").to_pylist()] == ["price", "owner", "insert"]
    assert out.column("source_change").to_pylist() == [None] * 3


def test_incremental_reads_appended_versions_and_reports_rewrites(tmp_path):
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 6))
    write_deltalake(uri, rows(6, 4), mode="append")
    src = source(uri, mode="incremental")
    src.start()
    out = read_all(src)
    assert out.column("partition").to_pylist() == [0] * 6 + [1] * 4
    assert [json.loads(v)["id"] for v in out.column("value").to_pylist()] == [f"r{i:06d}" for i in range(10)]

    DeltaTable(uri).delete("id = 'r000001'")  # version 2: a rewrite, no change data feed
    write_deltalake(uri, rows(10, 3), mode="append")  # version 3
    later = source(uri, {(uri, MARKER): 1, (uri, 1): 3}, mode="incremental")
    later.start()
    out = read_all(later)
    assert out.column("partition").to_pylist() == [3] * 3
    assert later.report.skipped_change_versions == [2]


def test_an_append_is_read_when_a_compaction_lands_while_the_plan_is_made(tmp_path, monkeypatch):
    """Before stop 47 a version's operation came from delta-rs's history(), which lists the commits
    that landed after the handle was loaded too and numbers them down from the handle's version:
    an OPTIMIZE committed between the plan's load and its listing labelled the append before it
    OPTIMIZE, and the append's rows were skipped for good (4 of these 10 rows lost). Now each
    version's own commit file says what it did. The compaction lands on the real table right after
    the source's second table load (the old plan's load before its listing)."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 6))
    write_deltalake(uri, rows(6, 4), mode="append")  # version 1: the append
    src = source(uri, mode="incremental")
    load, loads, landed = src._table, [], []

    def table(version=None):
        dt = load(version)
        loads.append(version)
        if len(loads) == 2:  # version 2: a compaction of both files, by another writer
            landed.append(DeltaTable(uri).optimize.compact())
        return dt

    monkeypatch.setattr(src, "_table", table)
    src.start()
    out = read_all(src)
    assert landed and DeltaTable(uri).version() == 2
    assert [json.loads(v)["id"] for v in out.column("value").to_pylist()] == [f"r{i:06d}" for i in range(10)]
    assert out.column("partition").to_pylist() == [0] * 6 + [1] * 4 and src.report.skipped_change_versions == []


def following(uri: str) -> tuple[DeltaSource, list[int]]:
    """An incremental source with --follow on `uri`, started, its rows so far handed out (not
    committed): (the source, the partitions of the rows handed out)."""
    src = DeltaSource(DeltaSourceSpec(uri=uri, mode="incremental", poll_interval_s=0.01),
                      source_context({}, batch_rows=5, follow=True))  # fmt: skip
    src.start()
    handed = []
    while (t := src.poll(4, 0)) is not None:
        handed += t.column("partition").to_pylist()
    return src, handed


def hand_out_until(src: DeltaSource, handed: list[int], version: int, rows_of_it: int) -> None:
    """Poll until `rows_of_it` rows of `version` are handed out (a new version is seen at the next
    poll_interval_s; a loaded machine may take a while), adding their partitions to `handed`."""
    deadline = time.monotonic() + 30
    while handed.count(version) < rows_of_it and time.monotonic() < deadline:
        t = src.poll(4, 0)
        if t is not None:
            handed += t.column("partition").to_pylist()
        time.sleep(0.005)


def test_follow_keeps_earlier_versions_planned_for_work_dropped_in_flight(tmp_path):
    """--follow: version 0's rows are handed out (at the engines, not committed) when version 1
    appears. If that work is then dropped (a fence, the commit writer lost), reseek must read
    version 0 again from its positions, not only version 1: a commit of version 1 would move the
    MARKER past version 0 and a restart would skip its rows for good."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 6))
    src, handed = following(uri)
    assert handed == [0] * 6  # all of version 0 handed out; nothing committed
    write_deltalake(uri, rows(6, 3), mode="append")  # version 1
    hand_out_until(src, handed, 1, 3)
    assert handed == [0] * 6 + [1] * 3  # only the new version was read on
    src.reseek(sorted(src.assignment()))  # the work in flight was dropped
    again = []
    while (t := src.poll(4, 0)) is not None:
        again += [(p, json.loads(v)["id"]) for p, v in zip(t.column("partition").to_pylist(), t.column("value").to_pylist())]
    assert again == [(0, f"r{i:06d}") for i in range(6)] + [(1, f"r{i:06d}") for i in range(6, 9)]
    src.committed({(uri, 0): 5, (uri, 1): 1, (uri, MARKER): 1})  # version 0 done, version 1 not
    assert sorted(src.assignment()) == [(uri, MODE), (uri, IDENTITY), (uri, MARKER), (uri, 1)]  # a finished version leaves the plan


def test_follow_outlives_a_store_error_while_it_plans_new_versions(tmp_path, monkeypatch):
    """--follow plans new versions on its polls; one store error there (an S3 timeout, a
    throttled listing) ended a job that had followed the table for days. Now it is logged and the
    next poll_interval_s tries again. The error is raised by the table load, once, as an object
    store's client raises it (OSError)."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 3))
    src, handed = following(uri)
    write_deltalake(uri, rows(3, 2), mode="append")  # version 1
    load, failures = src._table, []

    def flaky(version=None):
        if not failures:
            failures.append(version)
            raise OSError("the store timed out")
        return load(version)

    monkeypatch.setattr(src, "_table", flaky)
    hand_out_until(src, handed, 1, 2)
    assert failures == [None] and handed == [0, 0, 0, 1, 1]
    # An error that does not clear stops the job after FOLLOW_GIVE_UP_S (here 0.2 s), naming its class.
    import connectors.delta_source as delta_source

    monkeypatch.setattr(delta_source, "FOLLOW_GIVE_UP_S", 0.2)
    monkeypatch.setattr(src, "_table", lambda version=None: (_ for _ in ()).throw(OSError("still down")))
    with pytest.raises(SourceError, match=r"new versions could not be planned for 0 s \(OSError\)"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            src.poll(4, 0)
            time.sleep(0.02)


def test_a_restore_is_reported_not_read_as_an_append(tmp_path):
    """RESTORE puts files of an earlier version back: rows the job read at that version. A
    restore that only added files was planned as an append, and its rows processed twice."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 3), partition_by=["region"])
    write_deltalake(uri, rows(3, 2, region="us"), mode="append", partition_by=["region"])  # version 1
    DeltaTable(uri).delete("region = 'us'")  # version 2: files removed only
    DeltaTable(uri).restore(1)  # version 3: version 1's file back
    src = source(uri, mode="incremental")
    src.start()
    out = read_all(src)
    assert [json.loads(v)["id"] for v in out.column("value").to_pylist()] == [f"r{i:06d}" for i in range(5)]
    assert out.column("partition").to_pylist() == [0, 0, 0, 1, 1] and src.report.skipped_change_versions == [2, 3]


def test_incremental_over_a_table_whose_early_log_is_cleaned(tmp_path):
    """A table older than its log retention cannot be loaded at its first versions: an incremental
    run that needs them (a first run from version 0, a restart that fell behind) stops naming the
    version and the oldest one that can be read, rather than skip rows (it said "no Delta table
    there"); one whose versions are still there goes on."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 4), configuration={"delta.logRetentionDuration": "interval 1 seconds"})
    for v in range(1, 4):
        write_deltalake(uri, rows(4 * v, 4), mode="append")
    time.sleep(1.5)
    dt = DeltaTable(uri)
    dt.create_checkpoint()
    dt.cleanup_metadata()  # versions 0-2 can no longer be loaded
    write_deltalake(uri, rows(16, 4), mode="append")  # version 4
    for positions, version in (({}, 0), ({(uri, MARKER): 2}, 1)):
        with pytest.raises(SourceError, match=f"version {version} can no longer be read .* the oldest version that can is 3"):
            source(uri, positions, mode="incremental").start()
    caught_up = source(uri, {(uri, MARKER): 4, (uri, 4): 1}, mode="incremental")
    caught_up.start()
    out = read_all(caught_up)
    assert out.column("partition").to_pylist() == [4, 4] and out.column("offset").to_pylist() == [2, 3]


@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_a_version_whose_data_files_were_vacuumed_stops_naming_the_version(tmp_path, mode):
    """A job stopped longer than the source table's vacuum retention: the version's log is there,
    its files are not. One SourceError naming the version and the likely cause (never the file:
    a partitioned table's paths hold row values). Before: pyarrow's FileNotFoundError, a traceback."""
    import os

    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 6), partition_by=["region"])
    for path in DeltaTable(uri).file_uris():
        os.remove(path)  # what a vacuum after a compaction leaves of version 0
    with pytest.raises(SourceError, match=r"a data file of version 0 is gone \(vacuumed since\?\)") as e:
        source(uri, mode=mode).start()
    assert "region=" not in str(e.value)


@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_a_job_that_read_everything_restarts_after_the_table_is_compacted_and_vacuumed(tmp_path, mode):
    """The job read all of versions 0-1; the table was then compacted and vacuumed (routine
    maintenance), nothing appended. A restart planned the marker's version again from its files'
    footers and stopped: "a data file of version 1 is gone", with no way on but a new job name
    (every row again). Now a version's rows are counted from the log: nothing to do, and the next
    append is read. A file still to be read that is gone stops the job before any work, as before
    (test_a_version_whose_data_files_were_vacuumed_stops_naming_the_version)."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 6), partition_by=["region"])
    write_deltalake(uri, rows(6, 4), mode="append", partition_by=["region"])
    done = {(uri, MARKER): 1, (uri, 1): 9} if mode == "snapshot" else {(uri, MARKER): 1, (uri, 1): 3}
    DeltaTable(uri).optimize.compact()  # version 2
    DeltaTable(uri).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    src = source(uri, done, mode=mode)
    src.start()
    assert read_all(src) is None
    if mode == "incremental":
        write_deltalake(uri, rows(10, 2), mode="append", partition_by=["region"])  # after the vacuum's commits
        later = source(uri, done, mode=mode)
        later.start()
        out = read_all(later)
        v = DeltaTable(uri).version()
        assert out.column("partition").to_pylist() == [v, v] and out.column("offset").to_pylist() == [0, 1]


def test_positions_of_the_other_mode_or_of_another_snapshot_are_refused(tmp_path):
    """A snapshot killed halfway and rerun as incremental read nothing of it (its rows lost), a
    finished incremental job rerun as snapshot read version 1's snapshot ordinals again, and a
    changed source.delta.version restarted at another snapshot: rows repeated. The mode rides on
    every commit now (partition MODE), and both changes are refused at start, before any work."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 6))
    write_deltalake(uri, rows(6, 4), mode="append")  # version 1
    snapshot_made = {(uri, MARKER): 1, (uri, 1): 1, (uri, MODE): MODES["snapshot"]}
    incremental_made = {(uri, MARKER): 1, (uri, 1): 3, (uri, MODE): MODES["incremental"]}
    with pytest.raises(SourceError, match="positions were made reading the table in snapshot mode"):
        source(uri, snapshot_made, mode="incremental").start()
    with pytest.raises(SourceError, match="positions were made reading the table in incremental mode"):
        source(uri, incremental_made, mode="snapshot").start()
    with pytest.raises(SourceError, match="positions are of the snapshot at version 1"):
        source(uri, snapshot_made, mode="snapshot", version=0).start()
    # The same mode and snapshot go on; positions from before the record are taken as they are.
    same = source(uri, snapshot_made, mode="snapshot", version=1)
    same.start()
    assert read_all(same).column("offset").to_pylist() == list(range(2, 10))
    assert same.extra_positions({(uri, 1): 9})[(uri, MODE)] == MODES["snapshot"]
    older = source(uri, {(uri, MARKER): 1, (uri, 1): 1}, mode="incremental")
    older.start()
    assert read_all(older).column("offset").to_pylist() == [2, 3]
    assert older.extra_positions({(uri, 1): 3})[(uri, MODE)] == MODES["incremental"]


def test_a_change_feed_version_whose_change_files_were_vacuumed_stops_naming_the_version(tmp_path):
    """A change-feed version still to be read whose change files were vacuumed: delta-rs raises
    ArrowInvalid naming the file (a partitioned table's path holds row values). Before stop 47
    that escaped as it was; now it is the SourceError naming the version, as for data files."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 4), partition_by=["region"], configuration={"delta.enableChangeDataFeed": "true"})
    DeltaTable(uri).update(updates={"question": "'changed'"}, predicate="id = 'r000002'")  # version 1
    DeltaTable(uri).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    import glob
    import shutil

    for d in glob.glob(f"{uri}/_change_data"):
        shutil.rmtree(d)  # what a vacuum past the change files' retention leaves
    with pytest.raises(SourceError, match="a data file of version 1 is gone") as e:
        source(uri, {(uri, MARKER): 0, (uri, 0): 3}, mode="incremental").start()
    assert "region=" not in str(e.value) and "mode: snapshot" in str(e.value)


def test_incremental_with_change_data_feed_reports_updates_and_deletes_row_by_row(tmp_path):
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 5), configuration={"delta.enableChangeDataFeed": "true"})
    DeltaTable(uri).update(updates={"question": "'changed'"}, predicate="id = 'r000002'")
    DeltaTable(uri).delete("id = 'r000004'")
    src = source(uri, {(uri, MARKER): 0, (uri, 0): 4}, mode="incremental")
    src.start()
    out = read_all(src)
    got = sorted(zip(out.column("partition").to_pylist(), out.column("source_change").to_pylist(),
                     [json.loads(v)["id"] for v in out.column("value").to_pylist()]))  # fmt: skip
    assert got == [(1, "update", "r000002"), (2, "delete", "r000004")]


def test_the_change_feed_is_used_for_the_versions_written_with_it_on(tmp_path):
    """A DELETE while the table had no change feed, then the feed switched on, then an UPDATE.
    Before, the table's setting now decided for every version: the DELETE's version went through
    load_cdf, which has no change files for it, and the job stopped there."""
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 5))
    DeltaTable(uri).delete("id = 'r000004'")  # version 1: no change feed yet
    DeltaTable(uri).alter.set_table_properties({"delta.enableChangeDataFeed": "true"})  # version 2
    DeltaTable(uri).update(updates={"question": "'changed'"}, predicate="id = 'r000002'")  # version 3
    src = source(uri, {(uri, MARKER): 0, (uri, 0): 4}, mode="incremental")
    src.start()
    out = read_all(src)
    got = sorted(zip(out.column("partition").to_pylist(), out.column("source_change").to_pylist(),
                     [json.loads(v)["id"] for v in out.column("value").to_pylist()]))  # fmt: skip
    assert got == [(3, "update", "r000002")]
    assert src.report.skipped_change_versions == [1]


def test_missing_columns_are_named_before_any_work(tmp_path):
    uri = str(tmp_path / "src")
    write_deltalake(uri, rows(0, 3))
    src = source(uri)
    with pytest.raises(SourceError) as e:
        src.check({"ticket_id": "prompt.id_field", "question": "used by prompt.template", "body": "used by prompt.template"})
    assert "lacks column(s) 'ticket_id' (prompt.id_field), 'body' (used by prompt.template)" in str(e.value)
    with pytest.raises(SourceError, match="no Delta table there"):
        source(str(tmp_path / "nothing")).columns()
    # A snapshot pinned before a column was added is checked against its own columns.
    write_deltalake(uri, rows(3, 2).append_column("body", pa.array(["b", "b"])), mode="append", schema_mode="merge")
    source(uri, mode="snapshot", version=1).check({"body": "used by prompt.template"})
    with pytest.raises(SourceError, match="lacks column\\(s\\) 'body'"):
        source(uri, mode="snapshot", version=0).check({"body": "used by prompt.template"})


# -- whole jobs: real local Ray, real vLLM, real Delta ----------------------------------------------


def delta_spec(tmp_path, src_uri: str, tiny_model, **overrides) -> dict:
    spec = make_spec(tmp_path, None, "", tiny_model, **overrides)
    spec["source"] = {"delta": {"uri": src_uri}}
    return spec


@pytest.mark.slow
def test_snapshot_job_exactly_once_across_kill_and_rerun(tmp_path, tiny_model, job_processes):
    src_uri = str(tmp_path / "src")
    n = 1200
    write_deltalake(src_uri, rows(0, n // 2, "eu"), partition_by=["region"])
    write_deltalake(src_uri, rows(n // 2, n // 2, "us"), mode="append", partition_by=["region"])
    spec = delta_spec(tmp_path, src_uri, tiny_model, **{"pool.batch_size": 64})
    spec_path = write_spec(tmp_path, spec)
    res_uri = spec["sink"]["results"]

    job = job_processes(spec_path, until_drained=False)  # a table source ends by itself
    wait_for(lambda: table_rows(res_uri) > 0 or job.proc.poll() is not None, 240, what="first commit")
    assert job.proc.poll() is None
    job.proc.send_signal(signal.SIGKILL)
    job.proc.wait()
    partial = table_rows(res_uri)
    assert 0 < partial < n

    rerun = job_processes(spec_path, until_drained=False)
    assert rerun.wait(600) == 0, rerun.log()[-4000:]
    res = pl.read_delta(res_uri)
    assert sorted(res["id"].to_list()) == [f"r{i:06d}" for i in range(n)]
    assert (res["source_topic"] == src_uri).all() and (res["source_partition"] == 1).all()
    assert res["run_id"].n_unique() == 2

    # A rerun of a finished snapshot has nothing to do, even after the table moved on.
    write_deltalake(src_uri, rows(n, 10, "eu"), mode="append", partition_by=["region"])
    third = job_processes(spec_path, until_drained=False, module="tests.job_runner",
                          extra_args=("--instant-engine",))  # reads nothing: no vLLM to load for it
    assert third.wait(300) == 0, third.log()[-3000:]
    assert table_rows(res_uri) == n


@pytest.mark.slow
def test_incremental_job_processes_only_new_versions(tmp_path, tiny_model, job_processes):
    src_uri = str(tmp_path / "src")
    write_deltalake(src_uri, rows(0, 40), configuration={"delta.enableChangeDataFeed": "true"})
    spec = delta_spec(tmp_path, src_uri, tiny_model)
    spec["source"]["delta"]["mode"] = "incremental"
    spec_path = write_spec(tmp_path, spec)
    # The engine plays no part in what this checks: the instant stand-in (bench/instant_engine.py).
    instant = {"until_drained": False, "module": "tests.job_runner", "extra_args": ("--instant-engine",)}
    first = job_processes(spec_path, **instant)
    assert first.wait(300) == 0, first.log()[-3000:]
    assert table_rows(spec["sink"]["results"]) == 40

    write_deltalake(src_uri, rows(40, 25), mode="append")
    DeltaTable(src_uri).update(updates={"question": "'edited'"}, predicate="id = 'r000003'")
    second = job_processes(spec_path, **instant)
    assert second.wait(300) == 0, second.log()[-3000:]
    res = pl.read_delta(spec["sink"]["results"])
    assert sorted(res["id"].to_list()) == [f"r{i:06d}" for i in range(65)]
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert dead.select("id", "stage", "error_class").rows() == [("r000003", "source", "source_update")]


@pytest.mark.slow
def test_follow_picks_up_new_versions_until_sigterm(tmp_path, tiny_model, job_processes):
    src_uri = str(tmp_path / "src")
    write_deltalake(src_uri, rows(0, 10))
    spec = delta_spec(tmp_path, src_uri, tiny_model)
    spec["source"]["delta"].update(mode="incremental", poll_interval_s=0.5)
    spec_path = write_spec(tmp_path, spec)
    res_uri = spec["sink"]["results"]
    job = job_processes(spec_path, until_drained=False, extra_args=("--follow",))
    wait_for(lambda: table_rows(res_uri) == 10, 240, what="the first version")
    write_deltalake(src_uri, rows(10, 7), mode="append")
    wait_for(lambda: table_rows(res_uri) == 17, 120, what="the new version")
    assert job.proc.poll() is None  # still following
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(120) == 0, job.log()[-3000:]
    assert sorted(pl.read_delta(res_uri)["id"].to_list()) == [f"r{i:06d}" for i in range(17)]


@pytest.mark.slow
def test_template_column_missing_from_the_table_fails_before_any_work(tmp_path, tiny_model, job_processes):
    src_uri = str(tmp_path / "src")
    write_deltalake(src_uri, rows(0, 3).drop_columns(["user"]))
    spec = delta_spec(tmp_path, src_uri, tiny_model)
    job = job_processes(write_spec(tmp_path, spec), until_drained=False)
    assert job.wait(120) == 2, job.log()[-3000:]
    assert "lacks column(s) 'user' (used by prompt.template)" in job.log()
    assert "engine actor(s) ready" not in job.log()
