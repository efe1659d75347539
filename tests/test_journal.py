"""serve.ack journal: the audit journal file (connectors/journal.py) and its replay into real Delta
tables on disk (connectors/audit.py), exactly once whatever point a replica died at."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import uuid

import pyarrow as pa
import pytest

from connectors.journal import AuditJournal, app_id, orphans, read_records
from tests.conftest import make_spec


QUESTION_CANARY = "kz-canary-5521"  # in every question: never in the journal in clear


def _table(n: int, tag: str) -> pa.Table:
    return pa.table({"id": [f"{tag}-{i}" for i in range(n)], "value": pa.array(range(n), pa.int64())})


def test_records_round_trip_and_a_torn_tail_is_left_out(tmp_path):
    j = AuditJournal.create(tmp_path, "r1")
    j.append(1, _table(3, "a"), _table(0, "x"))
    j.append(2, _table(1, "b"), _table(2, "d"))
    size = j.path.stat().st_size
    j.append(3, _table(5, "c"), _table(1, "e"))
    recs = read_records(j.path)
    assert [r.seq for r in recs] == [1, 2, 3]
    assert recs[1].results.column("id").to_pylist() == ["b-0"] and recs[1].dead.num_rows == 2
    full = j.path.read_bytes()
    # A crash inside the third write: its request was never answered, the first two stand.
    for cut in (size + 10, len(full) - 1):
        j.path.write_bytes(full[:cut])
        assert [r.seq for r in read_records(j.path)] == [1, 2]
    # A flipped bit in the last record's body (a write that reached the disk only in part).
    bad = bytearray(full)
    bad[-5] ^= 0xFF
    j.path.write_bytes(bytes(bad))
    assert [r.seq for r in read_records(j.path)] == [1, 2]
    j.truncate()
    assert read_records(j.path) == []
    j.close()


def test_a_rewrite_keeps_only_the_uncommitted_records_and_the_lock(tmp_path):
    j = AuditJournal.create(tmp_path, "r1")
    for seq in (1, 2, 3):
        j.append(seq, _table(seq, f"g{seq}"), _table(0, "x"))
    third = read_records(j.path)[2]
    j.rewrite([third])
    assert [r.seq for r in read_records(j.path)] == [3]
    assert list(orphans(tmp_path)) == []  # still held: no replica replays a live journal
    j.append(4, _table(1, "g4"), _table(1, "d4"))
    assert [r.seq for r in read_records(j.path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.journal"]
    j.close()
    assert [o.name for o in orphans(tmp_path)] == ["r1"]


def test_a_journal_that_never_empties_is_rewritten_after_a_commit(audit_env, tmp_path, monkeypatch):
    """Under steady load a group arrives during every commit, so the journal is never empty when
    a commit ends: past JOURNAL_REWRITE_BYTES it is rewritten with the groups not committed yet."""
    import jobs.serve as serve_module
    from jobs.serve import _AuditBuffer

    env = audit_env
    spec, audit = env["spec"], env["audit"]
    monkeypatch.setattr(serve_module, "JOURNAL_REWRITE_BYTES", 0)
    journal = AuditJournal.create(tmp_path / "journals", "replica-r")
    buffer = _AuditBuffer(audit, "journal", 60.0, journal)
    for i in range(3):
        buffer._write(*env["group"](f"w{i}"))
    late = env["group"]("w3")
    real_replay = audit.replay

    def replay_while_a_request_arrives(records, name):
        buffer._write(*late)  # journaled during the commit: not in it
        return real_replay(records, name)

    audit.replay = replay_while_a_request_arrives
    assert buffer.commit_journaled() == 3
    assert [r.seq for r in read_records(journal.path)] == [4]
    audit.replay = real_replay
    assert buffer.commit_journaled() == 1
    assert read_records(journal.path) == []
    assert _ids(spec.sink.results, env["keyring"]) == ["w0", "w1", "w2", "w3"]
    journal.close(remove=True)


def test_a_failed_write_leaves_no_torn_record_before_the_next_ones(tmp_path, monkeypatch):
    """A full disk in the middle of a record: the part written is cut off, so the records that
    follow (answered requests) are still read back."""
    import errno

    import connectors.journal as journal_module

    j = AuditJournal.create(tmp_path, "r1")
    j.append(1, _table(2, "a"), _table(0, "x"))
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module.os, "write", half_then_full)
    with pytest.raises(OSError):
        j.append(2, _table(3, "b"), _table(1, "y"))
    monkeypatch.setattr(journal_module.os, "write", real_write)
    j.append(3, _table(1, "c"), _table(0, "z"))
    assert [r.seq for r in read_records(j.path)] == [1, 3]
    j.close(remove=True)


def test_orphans_are_the_journals_nobody_holds(tmp_path):
    live = AuditJournal.create(tmp_path, "alive")
    dead = AuditJournal.create(tmp_path, "dead")
    dead.append(1, _table(1, "a"), _table(0, "x"))
    os.close(dead.fd)  # its process is gone: the lock with it, the file stays
    found = list(orphans(tmp_path))
    assert [o.name for o in found] == ["dead"]
    assert list(orphans(tmp_path)) == []  # held by us while we replay it
    found[0].close(remove=True)
    assert not (tmp_path / "dead.journal").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["alive.journal"]
    assert oct(live.path.stat().st_mode & 0o777) == "0o600"
    live.close(remove=True)
    assert list(orphans(tmp_path / "missing")) == []


def test_a_live_journal_rewritten_under_a_replay_is_not_taken_for_an_orphan(tmp_path, monkeypatch):
    """A starting replica opens a live replica's journal just before that replica's rewrite()
    renames a new file over it and closes the old one: the replay's lock then goes through on the
    old, nameless file. It must not replay (nor remove) the live journal under the name."""
    import connectors.journal as journal_module

    live = AuditJournal.create(tmp_path, "live")
    live.append(1, _table(1, "a"), _table(0, "x"))
    real_open = os.open

    def open_then_rewrite(path, flags, *mode):  # the replay's open, then the live replica's rewrite
        fd = real_open(path, flags, *mode)
        if str(path).endswith("live.journal"):
            monkeypatch.setattr(journal_module.os, "open", real_open)
            live.rewrite(read_records(live.path))
        return fd

    monkeypatch.setattr(journal_module.os, "open", open_then_rewrite)
    assert [o.name for o in orphans(tmp_path)] == []
    assert live.path.exists() and [r.seq for r in read_records(live.path)] == [1]
    live.append(2, _table(1, "b"), _table(0, "x"))  # still its journal, under its name
    assert [r.seq for r in read_records(live.path)] == [1, 2]
    live.close(remove=True)


def test_a_journal_is_never_an_orphan_between_its_creation_and_its_lock(tmp_path, monkeypatch):
    """A replica replaying orphans while another creates its journal: the new journal is locked
    before it has the name orphans() looks for, so it is not taken (and removed) as an orphan."""
    import fcntl as real_fcntl

    import connectors.journal as journal_module

    seen = []
    real_flock = real_fcntl.flock

    def flock_after_a_replay(fd, op):  # another replica replays orphans just before our lock
        monkeypatch.setattr(journal_module.fcntl, "flock", real_flock)  # once
        for o in orphans(tmp_path):
            seen.append(o.name)
            o.close(remove=True)  # what a replay does with an orphan
        return real_flock(fd, op)

    monkeypatch.setattr(journal_module.fcntl, "flock", flock_after_a_replay)
    j = AuditJournal.create(tmp_path, "fresh")
    assert seen == [] and j.path.exists()
    assert list(orphans(tmp_path)) == []  # held
    j.append(1, _table(1, "a"), _table(0, "x"))
    assert [r.seq for r in read_records(j.path)] == [1]
    j.close(remove=True)


@pytest.fixture
def audit_env(tmp_path, monkeypatch):
    """A job with field encryption, its AuditLog on real Delta tables and its online guards."""
    from compute.lineage import lineage_columns
    from compute.online import OnlineGuards
    from connectors.audit import AuditLog
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from crypto.stage import EncryptionStage
    from schemas.spec import parse_spec
    from tests.serve_engines import EchoEngine

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    kr = Keyring.init(tmp_path / "keyring.json", LocalMasterKeyProvider())
    kr.create_tenant("acme")
    spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model", **{
        "source": {"kafka": {"topic": "t", "bootstrap_servers": ["127.0.0.1:9"]}},
        "encryption": {"keyring": str(tmp_path / "keyring.json"), "tenant": "acme", "output_fields": ["output_text"],
                       "dead_letter_raw": True},
        "validation": [{"rule": "deny_list", "phrases": ["forbidden"], "on_fail": "reject"}],
        "serve": {"ack": "journal", "journal_dir": str(tmp_path / "journals")},
    }))  # fmt: skip
    run_id = f"serve-{uuid.uuid4().hex[:12]}"

    def new_audit():
        enc = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        audit = AuditLog(spec, enc, run_id)
        audit.open()
        return audit, enc

    audit, enc = new_audit()
    engine = EchoEngine(spec.model, spec.sampling)
    guards = OnlineGuards(spec, run_id, engine, lineage_columns(spec, engine.model_revision()), enc)

    def group(*questions: str) -> tuple[pa.Table, pa.Table]:
        """Plain rows of one group of invoke requests (a forbidden one is a dead letter)."""
        results, dead = [], []
        for q in questions:
            body = json.dumps({"id": q.split()[0], "user": "dana", "question": f"{q} {QUESTION_CANARY}"}).encode()
            src = guards.event_source(body, "invoke", int.from_bytes(q.encode()[:7], "big"))
            out = asyncio.run(guards.run(src))
            results.append(out.results)
            dead.append(out.dead)
        return pa.concat_tables(results), pa.concat_tables(dead)

    return {"spec": spec, "audit": audit, "new_audit": new_audit, "group": group, "keyring": tmp_path / "keyring.json"}


def _ids(uri: str, keyring) -> list[str]:
    from crypto.reader import read_results

    return sorted(read_results(uri, keyring=str(keyring), backend="arrow").column("id").to_pylist())


def test_replay_appends_each_group_once_whatever_point_the_replica_died_at(audit_env, tmp_path):
    env = audit_env
    spec, audit = env["spec"], env["audit"]
    journal = AuditJournal.create(tmp_path / "journals", "replica-a")
    app = app_id(spec.name, "replica-a")
    groups = [env["group"]("q1", "q2"), env["group"]("q3 forbidden", "q4"), env["group"]("q5", "q6 forbidden")]
    for seq, (results, dead) in enumerate(groups, start=1):
        stored = audit.protect(results, dead)
        journal.append(seq, *stored)
    records = read_records(journal.path)
    # The journal holds stored rows: the output (it echoes the question) and a dead letter's raw
    # event are encrypted there as in the tables; the id, a field the spec does not protect, is not.
    data = journal.path.read_bytes()
    assert b"q1" in data and QUESTION_CANARY.encode() not in data and b"Answer for" not in data
    assert records[0].results.schema.field("output_text").type == pa.binary()
    # The replica committed the first two groups, then died before it truncated its journal.
    audit.replay(records[:2], "replica-a")
    assert _ids(spec.sink.results, env["keyring"]) == ["q1", "q2", "q4"]
    # ... and a replica died between the dead-letter commit and the results commit of group 3:
    audit.sink.append_unpositioned(records[2].results.slice(0, 0), records[2].dead, txn=(app, 3))
    os.close(journal.fd)
    # The next replica replays the orphan: only what each table lacks.
    fresh, _ = env["new_audit"]()
    from jobs.serve import replay_orphans

    assert replay_orphans(fresh, str(tmp_path / "journals")) == 1  # q5's result row
    assert _ids(spec.sink.results, env["keyring"]) == ["q1", "q2", "q4", "q5"]
    assert _ids(spec.sink.dead_letter, env["keyring"]) == ["q3", "q6"]
    assert not journal.path.exists()
    # Replaying the same records again (a second replayer that opened the file before its removal).
    assert fresh.replay(records, "replica-a") == 0
    assert _ids(spec.sink.results, env["keyring"]) == ["q1", "q2", "q4", "q5"]


def test_an_orphan_journal_of_rows_without_a_newer_column_is_replayed_with_it_null(audit_env, tmp_path):
    """A replica journaled rows, died; the deploy that followed added a column (a newer Tidegate,
    a new input field). The next replica replays the orphan: its rows get the column null. Before
    stop 44 the append raised KeyError, in every starting replica's __init__."""
    env = audit_env
    spec, audit = env["spec"], env["audit"]
    journal = AuditJournal.create(tmp_path / "journals", "replica-old")
    results, dead = env["group"]("q1", "q2 forbidden")
    stored_r, stored_d = audit.protect(results, dead)
    journal.append(1, stored_r.drop_columns(["model_revision"]), stored_d.drop_columns(["attempts"]))  # written before those
    os.close(journal.fd)
    fresh, _ = env["new_audit"]()
    from jobs.serve import replay_orphans

    assert replay_orphans(fresh, str(tmp_path / "journals")) == 2  # a result row and a dead letter
    assert _ids(spec.sink.results, env["keyring"]) == ["q1"] and _ids(spec.sink.dead_letter, env["keyring"]) == ["q2"]
    import polars as pl

    assert pl.read_delta(spec.sink.results)["model_revision"].to_list() == [None]
    assert not journal.path.exists()


def test_pending_rows_are_found_for_an_idempotency_key(audit_env):
    env = audit_env
    audit = env["audit"]
    results, dead = env["group"]("q7", "q8 forbidden")
    stored_r, stored_d = audit.protect(results, dead)
    offset = results.column("source_offset")[0].as_py()
    r, d = audit.find_in(stored_r, stored_d, "invoke", offset)
    assert r.column("id").to_pylist() == ["q7"]  # decrypted and r.column("output_text")[0].as_py().startswith("Answer for dana")
    assert d.num_rows == 0
    assert audit.find_in(stored_r, stored_d, "chat/completions", offset)[0].num_rows == 0


@pytest.mark.parametrize("ack", ["durable", "journal"])
def test_an_endpoints_audit_compacts_its_tables_beside_its_appends(audit_env, tmp_path, ack):
    """sink.maintenance on the online path: every compact_every_commits commits to the tables the
    replica's audit buffer (jobs/serve.py) starts a maintenance round beside its appends; the file
    count stays bounded and every row is there once (the rounds raced the appends that followed)."""
    from deltalake import DeltaTable

    from jobs.serve import _AuditBuffer

    env = audit_env
    spec, audit = env["spec"], env["audit"]
    journal = AuditJournal.create(tmp_path / "journals", "replica-m") if ack == "journal" else None
    buffer = _AuditBuffer(audit, ack, 0.05, journal, compact_every_commits=3)
    groups = [env["group"](f"m{i}a", f"m{i}b", f"m{i}c forbidden") for i in range(9)]

    async def load():
        for results, dead in groups:
            before = buffer.commits
            await buffer.add(results, dead)
            if journal:  # each group its own commit round (a round takes every group stored by then)
                deadline = asyncio.get_running_loop().time() + 30
                while buffer.commits == before and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
        while buffer._maintaining is not None and not buffer._maintaining.done():
            await asyncio.sleep(0.05)
        await buffer.drain()

    asyncio.run(load())
    assert buffer.commits >= 6, buffer.commits
    dt = DeltaTable(spec.sink.results)
    assert "OPTIMIZE" in [h["operation"] for h in dt.history()]
    assert len(dt.file_uris()) < buffer.commits
    assert _ids(spec.sink.results, env["keyring"]) == sorted(f"m{i}{x}" for i in range(9) for x in "ab")
    assert _ids(spec.sink.dead_letter, env["keyring"]) == sorted(f"m{i}c" for i in range(9))


def test_a_buffered_append_that_failed_half_way_is_finished_not_repeated(audit_env, monkeypatch):
    """serve.ack buffered: a group's rows are stored once as a record; a commit whose dead letters
    landed but whose results failed (after the sink's retries) is finished by the next interval,
    and the dead letters are not written again."""
    from connectors.delta import DeltaSink
    from jobs.serve import _AuditBuffer
    from schemas.errors import SinkError

    env = audit_env
    spec, audit = env["spec"], env["audit"]
    failures = {"results": 2}  # the results table's next two appends fail, as after their retries
    real = DeltaSink._append

    def flaky(self, table, rows, txns, positions, refresh=True):
        if table.role == "results" and failures["results"]:
            failures["results"] -= 1
            raise SinkError("results table write failed (injected)")
        return real(self, table, rows, txns, positions, refresh)

    monkeypatch.setattr(DeltaSink, "_append", flaky)
    buffer = _AuditBuffer(audit, "buffered", 0.05)
    results, dead = env["group"]("h1", "h2 forbidden", "h3")

    async def load():
        await buffer.add(results, dead)
        while failures["results"] or buffer.journaled() is not None:
            await asyncio.sleep(0.05)
        await buffer.drain()

    asyncio.run(asyncio.wait_for(load(), 60))
    assert _ids(spec.sink.results, env["keyring"]) == ["h1", "h3"]
    assert _ids(spec.sink.dead_letter, env["keyring"]) == ["h2"]  # once, though its commit was retried twice


def test_the_audit_writer_outlives_a_rust_panic(audit_env):
    """delta-rs raises a Rust panic as pyo3's PanicException, a BaseException: the durable
    request whose commit panicked is answered with the error, and the next requests are written
    (before, the writer's task ended and every later durable request waited for ever)."""
    from jobs.serve import _AuditBuffer

    env = audit_env
    spec, audit = env["spec"], env["audit"]

    class PanicException(BaseException):  # what pyo3 raises: not an Exception
        pass

    real, panics = audit.write, [1]

    def write(results, dead):
        if panics:
            panics.pop()
            raise PanicException("called `Option::unwrap()` on a `None` value")
        real(results, dead)

    audit.write = write
    buffer = _AuditBuffer(audit, "durable", 1.0)
    first, second = env["group"]("p1"), env["group"]("p2")

    async def requests():
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(buffer.add(*first), 30)
        assert type(e.value).__name__ == "SinkError"
        await asyncio.wait_for(buffer.add(*second), 30)
        await buffer.drain()

    asyncio.run(requests())
    assert _ids(spec.sink.results, env["keyring"]) == ["p2"]


@pytest.mark.parametrize("ack", ["buffered", "journal"])
def test_a_full_audit_backlog_refuses_until_the_commits_catch_up(audit_env, tmp_path, monkeypatch, ack):
    """While the store is down the rows held for it (buffered rows, stored records) grow; at the
    bound `full()` says so (the endpoint answers 503 audit_backlog_full), and once the store is
    back the commits empty the backlog and every held row is in the tables once."""
    from connectors.delta import DeltaSink
    from connectors.journal import AuditJournal
    from jobs.serve import _AuditBuffer
    from schemas.errors import SinkError

    env = audit_env
    spec, audit = env["spec"], env["audit"]
    down = {"now": True}
    real = DeltaSink._append

    def outage(self, table, rows, txns, positions, refresh=True):
        if down["now"]:
            raise SinkError("store unreachable (injected)")
        return real(self, table, rows, txns, positions, refresh)

    monkeypatch.setattr(DeltaSink, "_append", outage)
    groups = [env["group"](f"b{i}", f"b{i}x forbidden") for i in range(12)]
    one = sum(t.nbytes for t in groups[0])
    journal = AuditJournal.create(tmp_path / "journals", "replica-b") if ack == "journal" else None
    buffer = _AuditBuffer(audit, ack, 0.05, journal, backlog_max_bytes=4 * one)
    gauge = []  # what the replica's backlog gauge is set to after each commit
    buffer.on_backlog = gauge.append
    added = []

    async def load():
        for i, (results, dead) in enumerate(groups):
            if buffer.full():
                break
            await buffer.add(results, dead)
            added.append(f"b{i}")
            await asyncio.sleep(0.08)  # an interval: buffered rows become stored records
        assert buffer.full() and buffer.backlog_bytes() >= 4 * one
        down["now"] = False
        deadline = asyncio.get_running_loop().time() + 30
        # The gauge is set by the commit's thread just after it empties the backlog.
        while buffer.backlog_bytes() or not gauge or gauge[-1]:
            assert asyncio.get_running_loop().time() < deadline, (buffer.backlog_bytes(), gauge[-3:])
            await asyncio.sleep(0.05)
        assert not buffer.full()
        await buffer.drain()

    asyncio.run(asyncio.wait_for(load(), 60))
    assert 3 <= len(added) < len(groups)  # refused before the outage's rows had no bound
    assert _ids(spec.sink.results, env["keyring"]) == sorted(added)
    assert _ids(spec.sink.dead_letter, env["keyring"]) == sorted(f"{i}x" for i in added)


def test_a_request_fingerprint_is_stored_only_encrypted_and_its_type_never_changes(tmp_path, monkeypatch):
    """The audit's request_fingerprint (an Idempotency-Key request's body hash) is ciphertext
    under the tenant's key, or null where the spec has no keys (`pii: redact` alone, or no
    encryption): never a hash in clear that a reader who guesses the key could check a guessed
    body against. Binary in every table, so an endpoint whose spec switches encryption on or off
    still opens the tables it wrote (a first cut typed it by the spec: the next start failed on
    a schema error)."""
    from compute.idempotency import request_fingerprint
    from compute.lineage import lineage_columns
    from compute.online import OnlineGuards
    from connectors.audit import AuditLog
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from crypto.stage import EncryptionStage
    from deltalake import DeltaTable
    from schemas.spec import parse_spec
    from tests.serve_engines import EchoEngine

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    Keyring.init(tmp_path / "keyring.json", LocalMasterKeyProvider()).create_tenant("acme")
    keyed = {"keyring": str(tmp_path / "keyring.json"), "tenant": "acme", "dead_letter_raw": True}
    fingerprints = {}
    for n, encryption in enumerate([{}, keyed, {"pii": "redact", "tenant": "acme"}]):
        spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model", **{
            "source": {"kafka": {"topic": "t", "bootstrap_servers": ["127.0.0.1:9"]}}, "encryption": encryption,
            "validation": [{"rule": "deny_list", "phrases": ["forbidden"], "on_fail": "reject"}]}))  # fmt: skip
        enc = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        audit = AuditLog(spec, enc, f"serve-{n}")
        audit.open()  # the second and third specs open tables the first one created
        engine = EchoEngine(spec.model, spec.sampling)
        guards = OnlineGuards(spec, f"serve-{n}", engine, lineage_columns(spec, engine.model_revision()), enc)
        for question, offset in ((f"q{n}", 10 * n + 1), (f"q{n} forbidden", 10 * n + 2)):
            body = json.dumps({"id": f"{n}-{offset}", "user": "dana", "question": question}).encode()
            out = asyncio.run(guards.run(guards.event_source(body, "invoke", offset)))
            fp = fingerprints[offset] = request_fingerprint("acme", "invoke", f"key-{offset}", body)
            tag = lambda t: t.append_column("request_fingerprint", pa.array([fp] * t.num_rows, pa.string()))  # noqa: E731
            tenant = lambda t: t.set_column(t.column_names.index("tenant"), "tenant",  # noqa: E731
                                            pa.array(["acme"] * t.num_rows, pa.string()))
            audit.write(tenant(tag(out.results)), tenant(tag(out.dead)))
        if encryption is keyed:  # read back for the key's retries: the hash itself
            assert audit.find("invoke", 11)[0].column("request_fingerprint").to_pylist() == [fingerprints[11]]
            assert audit.find("invoke", 12)[1].column("request_fingerprint").to_pylist() == [fingerprints[12]]
    for uri in (spec.sink.results, spec.sink.dead_letter):
        table = DeltaTable(uri).to_pyarrow_table(columns=["source_offset", "request_fingerprint"])
        assert table.schema.field("request_fingerprint").type == pa.binary()
        cells = dict(zip(table.column("source_offset").to_pylist(), table.column("request_fingerprint").to_pylist()))
        assert len(cells) == 3, cells  # one row per spec in each table
        for offset, cell in cells.items():
            if offset in (11, 12):  # the keyed spec's: ciphertext holding no copy of the hash
                assert isinstance(cell, bytes) and fingerprints[offset].encode() not in cell
            else:
                assert cell is None
