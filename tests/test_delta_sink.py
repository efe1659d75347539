"""The Delta side of the exactly-once protocol, on real Delta tables on disk."""

from __future__ import annotations


import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from compute.prompts import dead_letter_table
from connectors.delta import DeltaSink, txn_app_id
from schemas.errors import PartitionFencedError, SinkError, SinkSchemaError
from schemas.records import RESULTS_SCHEMA
from tests.conftest import results_table

TP0, TP1 = ("t", 0), ("t", 1)


def results(offsets: list[int], partition: int = 0) -> pa.Table:
    return results_table(offsets, partition)


def dead(offsets: list[int], partition: int = 0) -> pa.Table:
    return dead_letter_table(
        [
            dict(stage="decode", error_class="invalid_json", error="e", source_topic="t",
                 source_partition=partition, source_offset=o, raw=b"\x00")
            for o in offsets
        ],
        "r",
    )  # fmt: skip


@pytest.fixture
def sink(tmp_path):
    s = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    s.open()
    return s


class AnswersLost:
    """Table writes that land and then fail, as a store whose answer was lost: the next `pending`
    of them raise `error` after landing (add more with `pending.append`). `real` is delta-rs's."""

    def __init__(self, monkeypatch, error: Exception, times: int = 1):
        import connectors.delta as delta

        self.real, self.error, self.pending = delta.write_deltalake, error, [1] * times
        monkeypatch.setattr(delta, "write_deltalake", self)

    def __call__(self, *args, **kwargs):
        self.real(*args, **kwargs)
        if self.pending:
            self.pending.pop()
            raise self.error


def test_tables_are_created_empty_with_the_contract_columns(sink, tmp_path):
    res = pl.read_delta(str(tmp_path / "res"))
    dl = pl.read_delta(str(tmp_path / "dl"))
    assert res.height == 0 and dl.height == 0
    for col in ("id", "status", "output_text", "model", "prompt_tokens", "completion_tokens", "latency_ms",
                "source_topic", "source_partition", "source_offset", "run_id", "processed_at"):  # fmt: skip
        assert col in res.columns
    for col in ("id", "stage", "error", "source_topic", "source_partition", "source_offset", "raw", "run_id"):
        assert col in dl.columns


def test_positions_live_in_the_same_commit_as_the_rows(sink, tmp_path):
    assert sink.load_positions([TP0, TP1]) == {TP0: None, TP1: None}
    sink.commit(results([0, 1, 3]), dead([2]), {TP0: 3})
    sink.commit(results([0], partition=1), dead([]), {TP1: 0})
    res = DeltaTable(str(tmp_path / "res"))
    dl = DeltaTable(str(tmp_path / "dl"))
    assert res.transaction_version(txn_app_id("job", TP0)) == 3
    assert res.transaction_version(txn_app_id("job", TP1)) == 0
    assert dl.transaction_version(txn_app_id("job", TP0)) == 3
    # No dead rows in the second commit: the dead-letter table was not touched.
    assert dl.version() == 1
    fresh = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    assert fresh.load_positions([TP0, TP1]) == {TP0: 3, TP1: 0}
    assert fresh.repair_window(TP0) == set()


def test_repair_window_after_a_crash_between_the_two_commits(sink, tmp_path):
    sink.load_positions([TP0])
    sink.commit(results([0, 1]), dead([]), {TP0: 1})
    # Simulate the crash: the dead-letter commit of offsets 2..9 lands, the results commit does not.
    sink.results.append = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        sink.commit(results([2, 4, 5]), dead([3, 7]), {TP0: 9})
    restarted = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    assert restarted.load_positions([TP0]) == {TP0: 1}
    assert restarted.repair_window(TP0) == {3, 7}
    # Re-processing the window: 3 and 7 are skipped by the job; the rest lands in results.
    restarted.commit(results([2, 4, 5, 6, 8, 9]), dead([]), {TP0: 9})
    res = pl.read_delta(str(tmp_path / "res"))
    dl = pl.read_delta(str(tmp_path / "dl"))
    assert sorted(res["source_offset"].to_list() + dl["source_offset"].to_list()) == list(range(10))


def test_dead_letter_position_never_goes_down(sink, tmp_path):
    sink.load_positions([TP0])
    # A crash left the dead-letter table ahead: its commit up to 20 landed, the results' did not.
    sink.results.append = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        sink.commit(results([]), dead([12]), {TP0: 20})
    restarted = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    restarted.load_positions([TP0])
    restarted.commit(results([0]), dead([1]), {TP0: 5})
    assert DeltaTable(str(tmp_path / "dl")).transaction_version(txn_app_id("job", TP0)) == 20


def test_a_late_dead_letter_commit_of_the_old_owner_fences_the_new_one(sink, tmp_path):
    """A writer that lost its partitions lands the dead-letter half of a commit after the new
    owner resumed (then its results half is fenced). The new owner's next commit, even one with no
    dead letters, is fenced; reading the positions again, it finds those dead letters in its
    repair window and skips them: every offset once in the two tables together."""
    sink.load_positions([TP0])
    sink.commit(results([0, 1]), dead([]), {TP0: 1})
    new_owner = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    assert new_owner.load_positions([TP0]) == {TP0: 1}
    sink.results.append = lambda *a, **k: (_ for _ in ()).throw(PartitionFencedError("fenced", [TP0]))
    with pytest.raises(PartitionFencedError):
        sink.commit(results([2, 4]), dead([3]), {TP0: 4})  # the old owner's late commit: only its dead letters land
    with pytest.raises(PartitionFencedError, match="in the dead-letter table"):
        new_owner.commit(results([2, 3, 4]), dead([]), {TP0: 4})
    assert new_owner.load_positions([TP0]) == {TP0: 1} and new_owner.repair_window(TP0) == {3}
    new_owner.commit(results([2, 4]), dead([]), {TP0: 4})  # 3 skipped: it is in the window
    res = pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()
    dl = pl.read_delta(str(tmp_path / "dl"))["source_offset"].to_list()
    assert sorted(res + dl) == [0, 1, 2, 3, 4]


def test_another_writer_fences_this_one(sink, tmp_path):
    sink.load_positions([TP0])
    sink.commit(results([0]), dead([]), {TP0: 0})
    other = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    other.load_positions([TP0])
    other.commit(results([1]), dead([]), {TP0: 1})
    with pytest.raises(PartitionFencedError) as e:
        sink.commit(results([1]), dead([]), {TP0: 1})
    assert e.value.partitions == [TP0]
    assert pl.read_delta(str(tmp_path / "res")).height == 2


def test_a_write_retried_after_another_writer_took_the_partition_to_the_same_position_is_fenced(tmp_path, monkeypatch):
    """A's write of offsets 1-2 fails without landing (the store timed out); while A backs off,
    B takes the partition over, resumes at A's last position and commits up to the same offset 2
    (both stopped at the end of a quiet partition). Before stop 44 A's check took "the position is
    this write's own target" for "not moved" and wrote again: offsets 1-2 twice."""
    import connectors.delta as delta

    a = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01)
    a.open()
    a.load_positions([TP0])
    a.commit(results([0]), dead([]), {TP0: 0})
    real = delta.write_deltalake
    calls = []

    def write_deltalake(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # A's first try: the store fails it; meanwhile B commits offsets 1-2
            b = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
            b.open()
            b.load_positions([TP0])
            monkeypatch.setattr(delta, "write_deltalake", real)
            b.commit(results([1, 2]), dead([]), {TP0: 2})
            monkeypatch.setattr(delta, "write_deltalake", write_deltalake)
            raise OSError("injected: the store timed out, nothing written")
        return real(*args, **kwargs)

    monkeypatch.setattr(delta, "write_deltalake", write_deltalake)
    with pytest.raises(PartitionFencedError) as e:
        a.commit(results([1, 2]), dead([]), {TP0: 2})
    assert e.value.partitions == [TP0]
    assert sorted(pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()) == [0, 1, 2]


def test_a_conflict_with_the_writes_own_landed_commit_is_not_a_fence(tmp_path, monkeypatch):
    """An object store's conditional PUT whose answer was lost, retried inside delta-rs, meets the
    first try's commit: CommitFailedError, though this write landed. Before stop 44 that was a
    fence (the batch dropped and read again by nobody's fault; an online request answered with an
    error though its audit rows were stored). Its marker says it landed: done."""
    import connectors.delta as delta
    from deltalake.exceptions import CommitFailedError

    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01)
    sink.open()
    sink.load_positions([TP0])
    lost = AnswersLost(monkeypatch, CommitFailedError("injected: the retried PUT found the commit already there"), 2)
    sink.commit(results([0, 1]), dead([2]), {TP0: 2})
    sink.append_unpositioned(results([7]), dead([]))  # the audit's kind of write
    monkeypatch.setattr(delta, "write_deltalake", lost.real)
    assert sorted(pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()) == [0, 1, 7]
    assert pl.read_delta(str(tmp_path / "dl"))["source_offset"].to_list() == [2]
    sink.commit(results([3]), dead([]), {TP0: 3})  # not fenced: its positions are its own
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP0)) == 3


def test_an_audit_append_on_an_old_handle_after_another_writers_table_change_is_written_again(tmp_path):
    """An online replica's blind append (rows no position covers) on a handle loaded before another
    writer changed the table's metadata (a replica of a newer version adding a column) conflicts:
    "Metadata changed since last commit". Before stop 44 that was a fence, and the request failed;
    there are no positions to be fenced from: it is written again on a fresh handle."""
    from deltalake import Field as DeltaField
    from deltalake.schema import PrimitiveType

    replica = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01)
    replica.open()
    replica.append_unpositioned(results([0]), dead([]))
    DeltaTable(str(tmp_path / "res")).alter.add_columns([DeltaField("newer", PrimitiveType("string"), nullable=True)])
    replica.append_unpositioned(results([1]), dead([]))
    got = pl.read_delta(str(tmp_path / "res")).sort("source_offset")
    assert got["source_offset"].to_list() == [0, 1] and got["newer"].to_list() == [None, None]


def test_incompatible_existing_table_fails_before_any_work(tmp_path):
    write_deltalake(str(tmp_path / "res"), pa.table({"id": [1], "status": ["x"]}))
    with pytest.raises(SinkSchemaError) as e:
        DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}).open()
    assert "results table" in str(e.value) and "column 'id' is int64, expected string" in str(e.value)
    assert DeltaTable(str(tmp_path / "res")).version() == 0  # an incompatible table is left as it was


def test_table_of_an_older_version_gains_the_new_columns(tmp_path):
    old_schema = pa.schema([f for f in RESULTS_SCHEMA if f.name not in ("output_json", "attempts", "rule_results")])
    write_deltalake(str(tmp_path / "res"), results([0]).select(old_schema.names).cast(old_schema))
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    sink.open()
    sink.load_positions([TP0])
    sink.commit(results([1]), dead([]), {TP0: 1})
    got = pl.read_delta(str(tmp_path / "res")).sort("source_offset")
    assert got.height == 2 and got["attempts"].to_list() == [None, 1]


def test_a_table_with_a_column_this_job_does_not_write_takes_its_rows_with_nulls_there(tmp_path):
    """A replica of a newer Tidegate (or a spec that had one more encryption.input_fields entry)
    added a nullable column: an older replica, or a rollback, writes null there. Before stop 44
    `open` passed and every commit failed with a schema mismatch, on every restart. Also when the
    column is added while this writer runs. A column that takes no null is refused at open, by name."""
    from deltalake import Field as DeltaField
    from deltalake.schema import PrimitiveType

    newer = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    newer.open()
    DeltaTable(str(tmp_path / "res")).alter.add_columns([DeltaField("input_email", PrimitiveType("string"), nullable=True)])
    older = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    older.open()
    older.load_positions([TP0])
    older.commit(results([0]), dead([]), {TP0: 0})
    DeltaTable(str(tmp_path / "res")).alter.add_columns([DeltaField("model_card", PrimitiveType("string"), nullable=True)])
    older.commit(results([1]), dead([]), {TP0: 1})  # added while it runs
    got = pl.read_delta(str(tmp_path / "res")).sort("source_offset")
    assert got["source_offset"].to_list() == [0, 1]
    assert got["input_email"].to_list() == [None, None] and got["model_card"].to_list() == [None, None]

    strict = pa.schema([*RESULTS_SCHEMA, pa.field("must", pa.string(), nullable=False)])
    DeltaTable.create(str(tmp_path / "strict"), schema=strict)
    with pytest.raises(SinkSchemaError, match="column 'must' is not written by this job and takes no null"):
        DeltaSink("job", str(tmp_path / "strict"), str(tmp_path / "dl2"), {}).open()


def test_a_restarted_commit_writer_refuses_to_commit_until_it_has_read_the_positions(tmp_path):
    """The commit writer actor (actors/writer.py) as a plain object: Ray re-runs its constructor
    when it restarts, which forgets the positions its fencing compares against. Say the repair
    window is open (dead letters committed up to offset 5, results to nothing): a commit from a
    writer that has not read the positions again could pass the fence and move the dead-letter
    position back to 3."""
    from actors.writer import CommitWriter, WriterRestarted

    spec = writer_spec(tmp_path)
    first = CommitWriter(spec)
    first.open()
    first.resume([TP0])
    first.sink._append(first.sink.dead_letter, dead([4, 5]), [txn(TP0, 5)], {TP0: 5})  # a crash right after

    restarted = CommitWriter(spec)  # what Ray does after the process died
    with pytest.raises(WriterRestarted):
        restarted.write_tables(results([0, 1, 2, 3]), dead([]), {TP0: 3}, None)
    assert DeltaTable(str(tmp_path / "res")).version() == 0  # nothing written

    positions, windows = restarted.resume([TP0])  # the job's recovery: positions read again
    assert positions == {TP0: None} and windows == {TP0: {4, 5}}
    report = restarted.write_tables(results([0, 1, 2, 3]), dead([]), {TP0: 3}, None)
    assert report.totals.rows_ok == 4
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP0)) == 3


def writer_spec(tmp_path):
    from schemas.spec import parse_spec

    return parse_spec(
        {
            "name": "job",
            "source": {"kafka": {"topic": "t"}},
            "prompt": {"template": "{{ q }}", "id_field": "id"},
            "model": {"path": "m"},
            "sink": {"results": str(tmp_path / "res"), "dead_letter": str(tmp_path / "dl")},
        }
    )


def test_a_fenced_commit_leaves_no_topic_marks_to_ride_on_the_next_commit(tmp_path):
    """sink.topic's publish marks of a partition go with the commit writer's next commit. When
    that commit is fenced (another job took the partition), the partition's marks are forgotten
    with it: before stop 46 they stayed staged in the sink and rode on the writer's next commit of
    another partition, moving the new owner's marks back."""
    from actors.writer import CommitWriter

    writer = CommitWriter(writer_spec(tmp_path))
    writer.open()
    writer.resume([TP0, TP1])
    other = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    other.load_positions([TP0])
    other.stage_marks({"mark/t/0": 7})
    other.commit(results([0, 1]), dead([]), {TP0: 1})  # the partition's new owner, its mark at 7
    writer._marks = {TP0: {"mark/t/0": 3}, TP1: {"mark/t/1": 5}}  # what this writer published before
    with pytest.raises(PartitionFencedError):
        writer.write_tables(results([0, 1]), dead([]), {TP0: 1, TP1: 0}, None)
    # (the job's recovery forgets TP0; a fence met while finishing a revoke may not: not needed)
    writer.write_tables(results([0], partition=1), dead([]), {TP1: 0}, None)
    table = DeltaTable(str(tmp_path / "res"))
    assert table.transaction_version("mark/t/0") == 7  # the new owner's, not moved back to 3
    assert table.transaction_version("mark/t/1") == 5  # the kept partition's marks still recorded


def txn(tp, version):
    from deltalake import Transaction

    return Transaction(txn_app_id("job", tp), version)


def test_the_table_handle_is_reopened_every_so_many_commits(sink, tmp_path, monkeypatch):
    # A handle kept forever grows with each incremental update (the soak's commit writer did);
    # a fresh one loads from the last checkpoint. Positions and rows are unaffected.
    import connectors.delta as delta

    monkeypatch.setattr(delta, "REOPEN_AFTER_COMMITS", 3)
    handles = []
    for offset in range(7):
        sink.commit(results([offset]), dead([]), {TP0: offset})
        handles.append(sink.results.open())  # kept alive, so ids are not reused
    assert len({id(h) for h in handles}) >= 3  # reopened at least twice in 7 commits
    assert sink.load_positions([TP0]) == {TP0: 6}
    assert pl.read_delta(str(tmp_path / "res")).height == 7


def test_the_table_handle_is_loaded_again_from_each_new_checkpoint(tmp_path, monkeypatch):
    """A handle's commits cost more the more commits it carries; a fresh one starts from the last
    checkpoint. With a checkpoint every 4 versions (delta-rs writes them at versions 3, 7, 11, ...)
    the writer's results handle is replaced once per checkpoint, loaded at it; a writer that took
    the partition over meanwhile still fences this one, rows and positions are unaffected."""
    import connectors.delta as delta
    from schemas.spec import MaintenanceSpec

    monkeypatch.setattr(delta, "REOPEN_AFTER_COMMITS", 1000)  # only the checkpoints decide here
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {},
                     maintenance=MaintenanceSpec(checkpoint_interval=4))  # fmt: skip
    sink.open()
    sink.load_positions([TP0])
    loads: dict[int, int] = {}  # id of a handle -> the version it was loaded at
    handles = []
    for offset in range(13):  # results versions 1-13: checkpoints at 3, 7 and 11
        sink.commit(results([offset]), dead([]), {TP0: offset})
        h = sink.results.open(refresh=False)
        handles.append(h)  # kept alive, so ids are not reused
        loads.setdefault(id(h), sink.results._loaded_version)
    assert _checkpoint_versions(tmp_path / "res") == [3, 7, 11]
    assert sorted(loads.values()) == [0, 3, 7, 11]  # each loaded at the first open after a checkpoint, from it
    assert sink.load_positions([TP0]) == {TP0: 12}
    other = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {},
                      maintenance=MaintenanceSpec(checkpoint_interval=4))  # fmt: skip
    other.load_positions([TP0])
    for offset in (13, 14, 15):  # versions 14-16: a checkpoint at 15
        other.commit(results([offset]), dead([]), {TP0: offset})
    stale = sink.results.open(refresh=False)
    with pytest.raises(PartitionFencedError):  # its fence read passes the checkpoint at 15: a fresh handle, still fenced
        sink.commit(results([13]), dead([]), {TP0: 13})
    assert sink.results.open(refresh=False) is not stale and sink.results._loaded_version == 16
    got = pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()
    assert sorted(got) == list(range(16))


def test_deferred_checkpoints_are_written_when_the_writer_asks(tmp_path):
    """defer_checkpoints (the online audit): an append that reaches a checkpoint version commits
    without writing it and marks it due; write_checkpoints() writes it at that version, and the
    next append's handle is loaded from it. Without the deferral the append writes it itself."""
    from schemas.spec import MaintenanceSpec

    deferred = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {},
                         maintenance=MaintenanceSpec(checkpoint_interval=4))  # fmt: skip
    deferred.defer_checkpoints()
    deferred.open()
    for offset in range(3):  # results versions 1-3: 3 is a checkpoint version
        assert not deferred.checkpoints_due()
        deferred.append_unpositioned(results([offset]), dead([]))
    assert _checkpoint_versions(tmp_path / "res") == [] and deferred.checkpoints_due()
    assert deferred.write_checkpoints() == {"results": 3}
    assert _checkpoint_versions(tmp_path / "res") == [3] and not deferred.checkpoints_due()
    assert deferred.write_checkpoints() == {}  # nothing due: nothing written
    deferred.append_unpositioned(results([3]), dead([]))  # version 4
    assert deferred.results._loaded_version == 3 and deferred.results._commits == 1
    assert sorted(pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()) == [0, 1, 2, 3]

    inline = DeltaSink("job", str(tmp_path / "res2"), str(tmp_path / "dl2"), {},
                       maintenance=MaintenanceSpec(checkpoint_interval=4))  # fmt: skip
    inline.open()
    for offset in range(3):
        inline.append_unpositioned(results([offset]), dead([]))
    assert _checkpoint_versions(tmp_path / "res2") == [3] and not inline.checkpoints_due()
    assert inline.write_checkpoints() == {}


def test_a_read_before_the_deferred_checkpoint_writes_it_first(tmp_path):
    """A read (the endpoint's Idempotency-Key lookup) may open the table between the append that
    made a checkpoint due and the writer's write_checkpoints(): the worn handle writes it before
    it goes, so the new handle loads from it (not from the one before, carrying a whole interval)."""
    from schemas.spec import MaintenanceSpec

    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {},
                     maintenance=MaintenanceSpec(checkpoint_interval=4))  # fmt: skip
    sink.defer_checkpoints()
    sink.open()
    for offset in range(3):  # results version 3 is a checkpoint version
        sink.append_unpositioned(results([offset]), dead([]))
    assert sink.checkpoints_due() and _checkpoint_versions(tmp_path / "res") == []
    sink.results.open()  # the read
    assert _checkpoint_versions(tmp_path / "res") == [3] and not sink.checkpoints_due()
    assert sink.results._loaded_version == 3
    assert sink.write_checkpoints() == {}


def test_a_landed_append_whose_answer_was_lost_still_makes_its_checkpoint_due(tmp_path, monkeypatch):
    """The store's answer to the append of a checkpoint version is lost (delta-rs raises after the
    commit landed): the retry finds its marker and does not write again, and the deferred
    checkpoint is still due."""
    from schemas.spec import MaintenanceSpec

    lost = AnswersLost(monkeypatch, OSError("injected: the store's answer was lost"), 0)
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01,
                     maintenance=MaintenanceSpec(checkpoint_interval=4))  # fmt: skip
    sink.defer_checkpoints()
    sink.open()
    for offset in range(2):
        sink.append_unpositioned(results([offset]), dead([]))
    lost.pending.append(1)
    sink.append_unpositioned(results([2]), dead([]))  # version 3, a checkpoint version
    assert sorted(pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()) == [0, 1, 2]
    assert sink.checkpoints_due()
    assert sink.write_checkpoints() == {"results": 3}
    assert _checkpoint_versions(tmp_path / "res") == [3]


def _checkpoint_versions(table_dir) -> list[int]:
    return _log_versions(table_dir, ".checkpoint.parquet")


def _log_versions(table_dir, suffix: str = ".json") -> list[int]:
    import os

    return sorted(int(f.split(".")[0]) for f in os.listdir(table_dir / "_delta_log") if f.endswith(suffix))


def test_expired_log_files_go_every_so_many_appends_not_after_each(tmp_path, monkeypatch):
    """delta-rs's default post-commit hook lists the whole log after every commit to clean it up;
    an append asks for the cleanup on its first commit and every LOG_CLEANUP_EVERY_COMMITS after
    (docs/lakehouse.md). The table's retention still decides what goes: here 1 second, with a
    checkpoint every 5 versions (a table's properties, set as an operator would)."""
    import time

    import connectors.delta as delta

    monkeypatch.setattr(delta, "LOG_CLEANUP_EVERY_COMMITS", 10)
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    sink.results.configuration = {"delta.logRetentionDuration": "interval 1 seconds", "delta.checkpointInterval": "5"}
    sink.results.open()  # version 0
    res = tmp_path / "res"

    def appends(first: int, n: int) -> None:
        for o in range(first, first + n):
            sink.append_unpositioned(results([o]), dead([]))

    appends(0, 10)  # versions 1-10, checkpoints at 4 and 9; the first append's cleanup found nothing expired
    assert _log_versions(res)[0] == 0
    time.sleep(1.5)
    appends(10, 4)  # the 11th append cleans up to the last checkpoint (9); the next three do not
    assert _log_versions(res)[0] == 9
    time.sleep(1.5)  # versions 9-14 expire, a checkpoint was made at 14
    appends(14, 5)  # appends 15-19 (versions 15-19, a checkpoint at 19): no cleanup
    assert _log_versions(res)[0] == 9
    time.sleep(1.5)
    appends(19, 2)  # the 21st cleans again, to the checkpoint at 19
    assert _log_versions(res)[0] == 19
    assert sorted(pl.read_delta(str(res))["source_offset"].to_list()) == list(range(21))


def test_blind_appends_of_two_writers_on_stale_handles_land_every_row_once(tmp_path):
    """The online endpoint's audit (append_unpositioned) writes on its handle as it is, without
    reading the log first: another replica's commits in between are checked at commit time, as
    commits landing during the write would be. Both writers' rows land once each, and a commit
    carrying an application transaction another writer committed meanwhile still fails."""
    a = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    b = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    a.open()
    b.open()
    for i in range(6):  # a writes 3 in a row, then b (3 versions behind), ...
        writer = a if (i // 3) % 2 == 0 else b
        for j in range(3):
            o = i * 3 + j
            writer.append_unpositioned(results([o]), dead([o + 1000]))
    got = pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()
    assert sorted(got) == list(range(18))
    assert sorted(pl.read_delta(str(tmp_path / "dl"))["source_offset"].to_list()) == [o + 1000 for o in range(18)]
    a.append_unpositioned(results([100]), dead([]), txn=("tidegate/job/journal/x", 1))
    with pytest.raises(PartitionFencedError):  # b has not seen a's transaction; its commit's check has
        b.append_unpositioned(results([101]), dead([]), txn=("tidegate/job/journal/x", 2))
    assert 101 not in pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()


def test_a_store_error_reading_positions_or_the_fence_is_retried_like_a_write(tmp_path, monkeypatch):
    """An object store's 503 while the positions or the fence are read: read again with the
    writes' backoff (one failed read stopped the job); past sink.write_attempts, a SinkError."""
    from schemas.errors import SinkError

    s = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_attempts=3, write_backoff_s=0.01)
    s.open()
    failures = {"left": 0}
    real = type(s.results).txn_versions

    def flaky(self, app_ids):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("503 Slow Down")
        return real(self, app_ids)

    monkeypatch.setattr(type(s.results), "txn_versions", flaky)
    failures["left"] = 2  # the results read twice, then it answers
    assert s.load_positions([TP0]) == {TP0: None}
    failures["left"] = 1  # the fence's first read
    s.commit(results([0, 1]), dead([]), {TP0: 1})
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP0)) == 1
    failures["left"] = 3
    with pytest.raises(SinkError, match=r"reading the results table .* failed 3 times .*503 Slow Down"):
        s.load_positions([TP0])


def test_a_commit_of_positions_and_no_rows_records_them_even_minus_one(tmp_path):
    """What start_from: latest's anchor writes (an empty partition's start is -1): the positions
    are read back as they were committed, fence the next writer, and the next commit goes on from them."""
    s = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    s.open()
    assert s.load_positions([TP0, TP1]) == {TP0: None, TP1: None}
    s.commit(results([]), dead([]), {TP0: -1, TP1: 41})
    again = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
    again.open()
    assert again.load_positions([TP0, TP1]) == {TP0: -1, TP1: 41}
    assert again.repair_window(TP0) == set()
    with pytest.raises(PartitionFencedError):  # a writer that never read the positions expects none
        stale = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
        stale.open()
        stale.commit(results([0]), dead([]), {TP0: 0})
    again.commit(results([0]), dead([]), {TP0: 0})
    assert pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list() == [0]


def test_a_store_error_opening_the_tables_is_retried_like_a_write(tmp_path, monkeypatch):
    """A commit writer Ray restarted opens its tables mid-run (CommitWriter.resume): a 503 then
    is read again with the writes' backoff, not the end of the job; past sink.write_attempts, a SinkError."""
    import connectors.delta
    from schemas.errors import SinkError

    def sink_():
        return DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_attempts=3, write_backoff_s=0.01)

    sink_().open()  # the tables exist

    class Flaky(DeltaTable):
        left = 0

        def __init__(self, *args, **kwargs):
            if Flaky.left:
                Flaky.left -= 1
                raise OSError("503 Slow Down")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(connectors.delta, "DeltaTable", Flaky)
    Flaky.left = 2
    restarted = sink_()
    restarted.open()
    assert Flaky.left == 0
    restarted.commit(results([0]), dead([]), {TP0: 0})
    Flaky.left = 3
    with pytest.raises(SinkError, match=r"reading the results table .* failed 3 times .*503 Slow Down"):
        sink_().open()


class _TopicThatFails:
    """sink.topic's publisher with a broker that refuses the publish after the commit."""

    topic = "out"

    def publish(self, results, dead, positions, also_dead=None):
        raise SinkError("publishing to topic 'out' failed: KafkaTimeoutError")


def test_a_publish_that_fails_after_the_commit_still_reports_the_commit(tmp_path):
    """sink.topic publishes after the Delta commit. When the publish fails, the commit has landed:
    the writer reports it with its totals and the error, and the driver books it, then stops with
    the error (before stop 46 the report was lost with the exception: the failed run's totals,
    positions and runs rows left the commit out)."""
    from unittest import mock

    from actors.writer import CommitWriter
    from jobs.pipeline import CommitTag, PipelineJob
    from jobs.stats import JobStats

    writer = CommitWriter(writer_spec(tmp_path))
    writer.open()
    writer.resume([TP0])
    writer.topic = _TopicThatFails()
    report = writer.write_tables(results([0, 1, 2]), dead([3]), {TP0: 3}, None)
    assert isinstance(report.publish_error, SinkError)
    assert (report.totals.rows_ok, report.totals.rows_dead) == (3, 1)
    assert DeltaTable(str(tmp_path / "res")).transaction_version(txn_app_id("job", TP0)) == 3

    # The driver's side (PipelineJob._land_commit, its collaborators stubbed): booked, then raised.
    driver = mock.MagicMock()
    driver._skip, driver._committed, driver.progress = {}, {}, None
    driver.stats = JobStats("r")
    driver.writer.finished.return_value = (CommitTag(1, 4, {TP0: 3}, {TP0: 3}), report)
    with pytest.raises(SinkError, match="KafkaTimeoutError"):
        PipelineJob._land_commit(driver)
    assert (driver.stats.ok, driver.stats.dead_lettered, driver.stats.commits) == (3, 1, 1)
    driver.source.committed.assert_called_once_with({TP0: 3})
    driver.writer.append_runs_row.assert_called_once()
    assert driver._committed == {TP0: 3}


def test_a_commit_still_at_the_writer_after_the_shutdown_deadline_is_booked_in_the_run():
    """The shutdown's deadline can pass while a commit is at the writer: it lands anyway, and the
    run's record must count it (before stop 46 nothing booked it after the deadline)."""
    from unittest import mock

    from actors.writer import CommitReport
    from compute.totals import CommitTotals
    from jobs.pipeline import CommitTag, PipelineJob
    from jobs.stats import JobStats

    driver = mock.MagicMock()
    driver._skip, driver._committed, driver.progress, driver._ready = {}, {}, None, None
    driver.stats = JobStats("r")
    driver._land_commit = lambda timeout_s=0.0: PipelineJob._land_commit(driver, timeout_s)
    totals = CommitTotals.of(results([0, 1]), dead([]), {TP0: 1}, None)
    landed = (CommitTag(1, 2, {TP0: 1}, {TP0: 1}), CommitReport(totals, 0.1, None))
    driver.writer.busy = True
    driver.writer.finished.side_effect = lambda timeout_s, ready: landed if timeout_s >= 1 else None
    PipelineJob._land_last_commit(driver)
    assert driver.stats.commits == 1 and driver.stats.ok == 2 and driver._committed == {TP0: 1}


def test_write_markers_live_in_commit_info_not_in_the_tables_transactions(tmp_path):
    """Every writer process (a run, a restarted writer, an online replica) marks its appends, to
    recognise one whose answer was lost. Before stop 46 each marker was an application
    transaction of its own, kept in the table's state for good: every checkpoint and load carried
    one per process that ever wrote. Now a commit's marker is in its commitInfo, and only an
    append that carries no other transaction (an audit append without a journal) still makes its
    marker a transaction too: one per process, not per write."""
    import json
    import os

    for run, offset in enumerate(range(3)):  # three runs of the job, one after the other
        sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {})
        sink.open()
        sink.load_positions([TP0])
        sink.commit(results([offset]), dead([]), {TP0: offset})
        sink.append_unpositioned(results([100 + run]), dead([]))
        sink.append_unpositioned(results([200 + run]), dead([]))
    apps, marked = set(), 0
    log_dir = tmp_path / "res" / "_delta_log"
    for name in sorted(os.listdir(log_dir)):
        if name.endswith(".json"):
            for line in (log_dir / name).read_text().splitlines():
                action = json.loads(line)
                apps |= {action["txn"]["appId"]} if "txn" in action else set()
                marked += "tidegate.write" in action.get("commitInfo", {})
    assert txn_app_id("job", TP0) in apps
    assert len([a for a in apps if a.startswith("tidegate/job/write/")]) == 3  # one per process, not per write
    assert len(apps) == 4
    assert marked == 9  # every append carries its marker, in its commitInfo


def test_a_lost_answer_is_found_when_another_writer_commits_during_the_check(tmp_path, monkeypatch):
    """The check for a write whose answer was lost reads the log and the commits since the write
    began; another writer's commit landing between the two (online replicas append all the time)
    must not hide the write's own commit (the review of stop 46's first cut: history() labels the
    commits it lists counting down from the handle's version, so a filter on those labels
    dropped it, and the audit rows were written twice)."""
    import connectors.delta as delta

    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01)
    sink.open()
    lost = AnswersLost(monkeypatch, OSError("injected: the store's answer was lost"))
    real_open, intrude = delta._Table.open, [1]

    def open_(self, refresh=True):
        dt = real_open(self, refresh)
        if intrude and not lost.pending and self is sink.results:  # the check's fresh handle is loaded: another replica appends
            intrude.pop()
            lost.real(str(tmp_path / "res"), results([999]).select(dt.schema().to_arrow().names)
                      .cast(pa.schema(dt.schema().to_arrow())), mode="append")  # fmt: skip
        return dt

    monkeypatch.setattr(delta._Table, "open", open_)
    sink.append_unpositioned(results([7]), dead([]))
    offsets = pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list()
    assert sorted(offsets) == [7, 999] and not intrude  # once, and the other writer did commit in between


def test_a_blind_append_retried_inside_delta_rs_after_its_own_commit_is_not_written_twice(tmp_path, monkeypatch):
    """An object store's conditional PUT whose answer was lost is retried inside delta-rs: the
    retry meets the write's own commit. An append that carries no transaction (an online
    replica's audit without a journal) must conflict with it, not be rebased and land again."""
    import connectors.delta as delta

    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01)
    sink.open()
    real, retried = delta.write_deltalake, []

    def write_deltalake(table_or_uri, *a, **kw):
        stale = DeltaTable(table_or_uri.table_uri, version=table_or_uri.version())
        real(table_or_uri, *a, **kw)  # landed; its answer lost, and the PUT tried again:
        if not retried:
            retried.append(1)
            real(stale, *a, **kw)  # as delta-rs's own retry would, from the version before

    monkeypatch.setattr(delta, "write_deltalake", write_deltalake)
    sink.append_unpositioned(results([7]), dead([]))
    assert retried and pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list() == [7]


def test_a_markers_only_write_is_found_landed_even_when_its_commit_file_is_gone(tmp_path, monkeypatch):
    """An append that carries only its marker transaction (an audit append without a journal),
    its answer lost, checked after log cleanup removed its commit file (retries spanning a short
    sink.maintenance.log_retention_hours): the transaction is in the table's state, so it is found
    landed, not written again (the review of stop 46's change)."""
    import connectors.delta as delta

    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, write_backoff_s=0.01)
    sink.open()
    AnswersLost(monkeypatch, OSError("injected: the store's answer was lost"))
    monkeypatch.setattr(delta._Table, "marked", lambda self, marker, since: False)  # its commit file cleaned up
    sink.append_unpositioned(results([7]), dead([]))
    assert pl.read_delta(str(tmp_path / "res"))["source_offset"].to_list() == [7]
