"""Table maintenance (connectors/maintenance.py, `tidegate maintain`, sink.maintenance in the job):
compaction, checkpoints and vacuum keep every row and every position, also while commits race it."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

import polars as pl
from deltalake import DeltaTable
from typer.testing import CliRunner

from actors.writer import CommitWriter
from connectors.delta import DeltaSink, txn_app_id
from connectors.maintenance import maintain_table, table_health
from jobs.cli import app
from schemas.spec import MaintenanceSpec, parse_spec
from tests.conftest import write_spec
from tests.test_delta_sink import TP0, TP1, dead, results


def commit_many(sink: DeltaSink, first_commit: int, commits: int, per_commit: int = 3) -> None:
    for c in range(first_commit, first_commit + commits):
        offsets = list(range(c * per_commit, (c + 1) * per_commit))
        sink.commit(results(offsets[:-1]), dead(offsets[-1:]), {TP0: offsets[-1]})


def test_compaction_checkpoint_and_vacuum_keep_every_row_and_position(tmp_path):
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {},
                     maintenance=MaintenanceSpec(vacuum_retention_hours=1))  # fmt: skip
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 40)
    res = DeltaTable(str(tmp_path / "res"))
    assert res.metadata().configuration["delta.checkpointInterval"] == "100"
    assert res.metadata().configuration["delta.logRetentionDuration"] == "interval 24 hours"
    # tombstones (removed files, in every checkpoint) outlive vacuum's window (by as much again here)
    assert res.metadata().configuration["delta.deletedFileRetentionDuration"] == "interval 7200 seconds"
    before_rows = pl.read_delta(str(tmp_path / "res")).sort("source_offset")
    before = table_health(res)
    assert before.files == 40

    report = maintain_table(res, MaintenanceSpec(vacuum_retention_hours=1), vacuum=False)
    assert report.error is None and report.compacted == {"files_removed": 40, "files_added": 1}
    after = table_health(res)
    assert after.files == 1 and after.version == before.version + 1
    assert pl.read_delta(str(tmp_path / "res")).sort("source_offset").equals(before_rows)
    assert res.transaction_version(txn_app_id("job", TP0)) == 119  # the position survives
    # a fresh sink resumes from the same position; the Delta log holds a checkpoint now
    again = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    assert again.load_positions([TP0]) == {TP0: 119}
    assert any(p.name.endswith(".checkpoint.parquet") for p in (tmp_path / "res" / "_delta_log").iterdir())

    # vacuum with a zero retention (tests only: the spec's minimum is an hour) deletes the 40 old files
    zero = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "vacuum_retention_hours": 0})
    assert maintain_table(res, zero, compact=False, checkpoint=False).vacuumed_files == 40
    assert pl.read_delta(str(tmp_path / "res")).sort("source_offset").equals(before_rows)


def test_the_runs_table_gets_the_maintenance_table_properties_too(tmp_path):
    """A runs-table row per commit is a log file per commit: its log retention and tombstones must
    be what the other two tables have, new or existing (before: Delta's defaults, 30 days of log)."""
    from connectors.runs import RunsTable, default_runs_uri

    policy = MaintenanceSpec(vacuum_retention_hours=1, log_retention_hours=2)
    now = datetime.now(timezone.utc)
    old = RunsTable(default_runs_uri(str(tmp_path / "res")))  # an older Tidegate's table, no properties
    old.append_commit(run_id="r0", job="job", commit_seq=1, started_at=now, ended_at=now, rows_ok=1)
    uri = default_runs_uri(str(tmp_path / "res"))
    assert "delta.logRetentionDuration" not in DeltaTable(uri).metadata().configuration
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, maintenance=policy)
    sink.history().append_commit(run_id="r1", job="job", commit_seq=1, started_at=now, ended_at=now, rows_ok=1)
    config = DeltaTable(uri).metadata().configuration
    for key, value in policy.table_properties().items():
        assert config[key] == value, key
    assert config["delta.logRetentionDuration"] == "interval 2 hours"
    assert pl.read_delta(uri)["run_id"].sort().to_list() == ["r0", "r1"]
    fresh = DeltaSink("job2", str(tmp_path / "new" / "res"), str(tmp_path / "new" / "dl"), {}, maintenance=policy)
    fresh.history().append_commit(run_id="r2", job="job2", commit_seq=1, started_at=now, ended_at=now, rows_ok=1)
    assert DeltaTable(default_runs_uri(str(tmp_path / "new" / "res"))).metadata().configuration[
        "delta.deletedFileRetentionDuration"] == policy.table_properties()["delta.deletedFileRetentionDuration"]


def test_a_replaced_files_tombstone_outlives_the_vacuum_window(tmp_path):
    """A round's vacuum reads the log only: it deletes a file compaction replaced while the file's
    tombstone is still there once the vacuum window has passed. Tombstones kept exactly as long as
    the window left the next checkpoint as they came due, so those files were never deleted."""
    window_s = 10.0  # tombstones kept 2 x this: the compaction and checkpoint below must fit in the other half
    policy = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "vacuum_retention_hours": window_s / 3600})
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, maintenance=policy)
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 12)
    res = DeltaTable(str(tmp_path / "res"))
    assert maintain_table(res, policy, checkpoint=False, vacuum=False).compacted["files_removed"] == 12
    time.sleep(window_s + 0.5)  # the replaced files are past the window: due for the vacuum
    maintain_table(res, policy, compact=False, vacuum=False)  # the round's checkpoint
    fresh = DeltaTable(str(tmp_path / "res"))  # loaded from that checkpoint, as the next round's handle
    assert len(fresh.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False)) == 12


def test_maintain_by_hand_also_deletes_files_whose_tombstones_are_gone(tmp_path):
    """Tables written before the margin: their replaced files' tombstones expired unseen. The full
    vacuum `tidegate maintain` runs lists the directory and finds them."""
    policy = MaintenanceSpec(vacuum_retention_hours=1)
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, maintenance=policy)
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 6)
    orphan = tmp_path / "res" / "part-00000-orphaned-by-an-expired-tombstone.parquet"
    orphan.write_bytes(next((tmp_path / "res").glob("*.parquet")).read_bytes())
    old = time.time() - 3 * 3600
    os.utime(orphan, (old, old))
    res = DeltaTable(str(tmp_path / "res"))
    assert maintain_table(res, policy, compact=False, checkpoint=False).vacuumed_files == 0  # the log's view
    assert maintain_table(res, policy, compact=False, checkpoint=False, full_vacuum=True).vacuumed_files == 1
    assert not orphan.exists() and pl.read_delta(str(tmp_path / "res")).height == 12


def test_a_full_vacuum_is_refused_over_a_table_nested_in_the_folder(tmp_path):
    """A full vacuum deletes every file under the folder that no version names: a table nested
    there (its data and its log) would go. It is refused, the nested table intact."""
    policy = MaintenanceSpec(vacuum_retention_hours=1)
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "res" / "dl"), {}, maintenance=policy)
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 3)  # dead letters land in res/dl, inside the results table's folder
    old = time.time() - 3 * 3600
    # First its data files alone older than the retention, its log young (a live table whose log
    # cleanup keeps a day against a week's vacuum): before stop 44 the look for a nested log used
    # the retention, found none, and the vacuum deleted the nested table's data. Then all of it.
    for backdated in ([p for p in (tmp_path / "res" / "dl").glob("*.parquet")], (tmp_path / "res" / "dl").rglob("*")):
        for p in backdated:
            os.utime(p, (old, old))
        report = maintain_table(DeltaTable(str(tmp_path / "res")), policy, compact=False, checkpoint=False,
                                full_vacuum=True)  # fmt: skip
        assert report.error is not None and "another table's log is inside" in report.error
        assert pl.read_delta(str(tmp_path / "res" / "dl")).height == 3


def test_vacuum_keeps_a_fractional_retention_whole(tmp_path):
    """vacuum_retention_hours 1.5 keeps a file no version names that is 1.2 hours old (before stop
    44 the retention became 1 hour, and such files went early); delta-rs takes whole hours, so 1.5
    is kept as 2: a file 2.2 hours old goes."""
    policy = MaintenanceSpec(vacuum_retention_hours=1.5)
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, maintenance=policy)
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 2)
    rows = pl.read_delta(str(tmp_path / "res")).height
    orphan = tmp_path / "res" / "part-00000-not-in-any-version.parquet"
    orphan.write_bytes(next((tmp_path / "res").glob("*.parquet")).read_bytes())
    res = DeltaTable(str(tmp_path / "res"))
    for hours, kept in ((1.2, True), (2.2, False)):
        then = time.time() - hours * 3600
        os.utime(orphan, (then, then))
        report = maintain_table(res, policy, compact=False, checkpoint=False, full_vacuum=True)
        assert report.error is None and orphan.exists() is kept, (hours, report)
    assert pl.read_delta(str(tmp_path / "res")).height == rows


def test_table_health_reads_a_local_table_whose_uri_delta_rs_percent_encodes(tmp_path):
    """Specs refuse such paths (polars cannot read those tables: tests/test_units.py); a sink opened
    on one by hand still gets its maintenance rounds: before stop 44 table_health took the URI's
    "%20" for the folder's name and every round failed."""
    sink = DeltaSink("job", str(tmp_path / "my lake" / "res"), str(tmp_path / "my lake" / "dl"), {})
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 2)
    dt = DeltaTable(str(tmp_path / "my lake" / "res"))
    assert "%20" in dt.table_uri
    assert table_health(dt).log_files == 3


def test_a_compaction_racing_commits_loses_nothing(tmp_path):
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    sink.open()
    sink.load_positions([TP0, TP1])
    commit_many(sink, 0, 10)
    errors: list[BaseException] = []

    def writer():
        try:
            for c in range(10, 70):
                offsets = list(range(c * 3, (c + 1) * 3))
                sink.commit(results(offsets), dead([]), {TP0: offsets[-1]})
                sink.commit(results([c], partition=1), dead([]), {TP1: c})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    other = DeltaTable(str(tmp_path / "res"))  # a separate handle, as `tidegate maintain` has
    rounds = 0
    while thread.is_alive():
        other.update_incremental()
        assert maintain_table(other, MaintenanceSpec(), vacuum=False).error is None
        rounds += 1
    thread.join()
    assert not errors, errors
    assert rounds >= 2
    rows = pl.read_delta(str(tmp_path / "res"))
    p0 = rows.filter(pl.col("source_partition") == 0)["source_offset"]
    assert p0.n_unique() == p0.len() == 10 * 2 + 60 * 3  # every row once (first 10 commits: 2 results each)
    assert rows.filter(pl.col("source_partition") == 1).height == 60
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP1)) == 69


def _spec(tmp_path, **maintenance) -> dict:
    return {
        "name": "job",
        "source": {"kafka": {"topic": "t"}},
        "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"},
        "sink": {"results": str(tmp_path / "res"), "dead_letter": str(tmp_path / "dl"), "maintenance": maintenance},
    }


def test_the_job_compacts_every_so_many_commits(tmp_path):
    writer = CommitWriter(parse_spec(_spec(tmp_path, compact_every_commits=5)))
    writer.open()
    writer.resume([TP0])
    for c in range(12):
        writer.write_tables(results([c]), dead([]), {TP0: c}, None)
    health = table_health(DeltaTable(str(tmp_path / "res")))
    assert health.files == 3  # compacted to one after commits 5 and 10, then two more
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP0)) == 11
    assert pl.read_delta(str(tmp_path / "res"))["source_offset"].sort().to_list() == list(range(12))


def test_tidegate_maintain_reports_before_and_after(tmp_path):
    spec = _spec(tmp_path)
    sink = DeltaSink("job", spec["sink"]["results"], spec["sink"]["dead_letter"], {})
    sink.open()
    sink.load_positions([TP0])
    commit_many(sink, 0, 8)
    out = CliRunner().invoke(app, ["maintain", str(write_spec(tmp_path, spec)), "--optimize"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "results" in out.output and "8 -> 1" in out.output
    assert table_health(DeltaTable(spec["sink"]["dead_letter"])).files == 1


def test_maintain_by_hand_opens_encrypted_partitioned_tables_without_the_master_key(tmp_path, monkeypatch):
    """`tidegate maintain` on a job whose tables hold encrypted (binary) columns and are
    partitioned: it opens them with the job's stored schemas (no SinkSchemaError) and needs no
    key, and it leaves the tables' properties as the job set them."""
    import base64
    import os as _os

    from crypto.keyring import Keyring, LocalMasterKeyProvider

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(_os.urandom(32)).decode())
    Keyring.init(tmp_path / "k.json", LocalMasterKeyProvider()).create_tenant("acme")
    spec = _spec(tmp_path, checkpoint_interval=20)
    spec["sink"]["partition_by"] = ["tenant"]
    spec["encryption"] = {"keyring": str(tmp_path / "k.json"), "tenant": "acme", "output_fields": ["output_text"]}
    writer = CommitWriter(parse_spec(spec))
    writer.open()
    writer.resume([TP0])
    from tests.conftest import results_table

    for c in range(4):
        writer.write_tables(results_table([c], output_text=[f"answer {c}"], tenant=["acme"]), dead([]), {TP0: c}, None)
    monkeypatch.delenv("TIDEGATE_MASTER_KEY")
    out = CliRunner().invoke(app, ["maintain", str(write_spec(tmp_path, spec)), "--optimize"], terminal_width=200)
    assert out.exit_code == 0, out.output
    res = DeltaTable(spec["sink"]["results"])
    assert res.metadata().configuration["delta.checkpointInterval"] == "20"
    assert pl.read_delta(spec["sink"]["results"]).height == 4


def test_a_log_retention_of_a_fraction_of_an_hour_is_what_delta_rs_cleans_by(tmp_path):
    """sink.maintenance.log_retention_hours below an hour is written in seconds, a form delta-rs
    parses (an interval it could not parse would leave the log to Delta's 30 days): with two
    seconds (below what a spec may set, as bench/maintenance.py does), the log files before an
    expired checkpoint are gone after the next round, the positions and rows stay."""
    import os
    import time

    import pytest
    from pydantic import ValidationError

    assert MaintenanceSpec(log_retention_hours=0.25).table_properties()["delta.logRetentionDuration"] == "interval 900 seconds"
    assert MaintenanceSpec(log_retention_hours=2).table_properties()["delta.logRetentionDuration"] == "interval 2 hours"
    with pytest.raises(ValidationError, match="log_retention_hours"):
        MaintenanceSpec(log_retention_hours=0.01)
    policy = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "log_retention_hours": 2 / 3600})
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, maintenance=policy)
    sink.open()
    sink.load_positions([TP0])
    assert DeltaTable(str(tmp_path / "res")).metadata().configuration["delta.logRetentionDuration"] == "interval 2 seconds"
    commit_many(sink, 0, 20)
    sink.maintain(compact=False, vacuum=False)  # a checkpoint at version 20
    time.sleep(3)  # ... which expires
    commit_many(sink, 20, 5)
    sink.maintain(compact=False, vacuum=False)
    log_dir = tmp_path / "res" / "_delta_log"
    assert sorted(f for f in os.listdir(log_dir) if f.endswith(".json"))[0] >= f"{20:020d}.json"
    assert pl.read_delta(str(tmp_path / "res")).height == 25 * 2
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP0)) == 25 * 3 - 1
