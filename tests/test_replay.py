"""`tidegate dlq replay`: dead-lettered rows re-processed after a fix, exactly once, even when the
replay itself is killed (real tansu, Ray, vLLM, Delta)."""

from __future__ import annotations

import json
import signal

import polars as pl
import pytest

from tests.conftest import make_spec, send, wait_for, write_spec

pytestmark = pytest.mark.slow


def test_replay_after_a_fix_exactly_once_through_a_crash(tmp_path, broker, topic, tiny_model, job_processes):
    n_good, n_fixable = 40, 300
    records = [(f"g{i}".encode(), json.dumps({"id": f"g{i:04d}", "user": "u", "question": f"q{i}"}).encode())
               for i in range(n_good)]  # fmt: skip
    # No `user` field: the template fails on these (missing_variable) until the spec is fixed.
    records += [(f"f{i}".encode(), json.dumps({"id": f"f{i:04d}", "question": f"q{i}"}).encode())
                for i in range(n_fixable)]  # fmt: skip
    records += [(b"bad", b'{"id": "broken", ')]  # invalid JSON: no fix helps it
    send(broker, topic, records)
    spec = make_spec(tmp_path, broker, topic, tiny_model, validation=[], **{"pool.batch_size": 16})
    # This run only fills the dead-letter table: the instant engine; the replays run vLLM.
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--instant-engine",))
    assert job.wait(300) == 0, job.log()[-3000:]
    res_uri, dl_uri = spec["sink"]["results"], spec["sink"]["dead_letter"]
    dead = pl.read_delta(dl_uri)
    assert dead["error_class"].value_counts().sort("error_class").rows() == [("invalid_json", 1), ("missing_variable", n_fixable)]

    # The fix: a default for the missing field. Replay only what the fix can help, with small
    # commits, and kill -9 the replay after its first commit.
    spec["prompt"]["template"] = "Answer for {{ user | default('anonymous') }}: {{ question }}"
    spec["sink"]["commit_max_rows"] = 16
    spec["sink"]["commit_interval_s"] = 0
    spec_path = write_spec(tmp_path, spec)
    where = ("--where", "error_class = 'missing_variable'")
    replay = job_processes(spec_path, module="jobs.replay", extra_args=where)

    def replayed_rows():
        return pl.read_delta(res_uri).filter(pl.col("id").str.starts_with("f")).height

    wait_for(lambda: replayed_rows() > 0 or replay.proc.poll() is not None, 300, what="first replay commit")
    assert replay.proc.poll() is None, replay.log()[-3000:]
    replay.proc.send_signal(signal.SIGKILL)
    replay.wait(60)
    partial = replayed_rows()
    assert 0 < partial < n_fixable
    marked = pl.read_delta(dl_uri).filter(pl.col("replayed_by").is_not_null())
    assert marked.height == n_fixable and marked["replayed_at"].null_count() == n_fixable  # planned, not finished

    # A rerun stopped by SIGTERM as it resumes (before stop 44 no handler: Ray's sys.exit, exit 15,
    # and a stop reaching PipelineJob.run between its plan's batches would have marked every row
    # replayed): it ends unfinished, exit 3, marking nothing; what it had in flight is committed.
    stopped = job_processes(spec_path, module="jobs.replay", extra_args=where)
    wait_for(lambda: "dead-lettered row(s) (resumed)" in stopped.log() or stopped.proc.poll() is not None, 300,
             what="the replay resuming")  # fmt: skip
    stopped.proc.send_signal(signal.SIGTERM)
    assert stopped.wait(300) == 3, stopped.log()[-3000:]
    assert "stopped before the end: replay" in stopped.log() and "Traceback" not in stopped.log()
    still = pl.read_delta(dl_uri).filter(pl.col("replayed_by").is_not_null())
    assert still["replayed_at"].null_count() == n_fixable  # nothing marked replayed
    ids = pl.read_delta(res_uri)["id"].to_list()
    assert len(ids) == len(set(ids))

    # Rerun: the unfinished replay resumes under its own id and finishes; nothing new to plan.
    again = job_processes(spec_path, module="jobs.replay", extra_args=where)
    assert again.wait(300) == 0, again.log()[-3000:]
    res = pl.read_delta(res_uri)
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n_good + n_fixable  # every fixed row once, nothing twice
    fixed = res.filter(pl.col("id").str.starts_with("f"))
    replay_id = marked["replayed_by"][0]
    assert (marked["replayed_by"] == replay_id).all() and (fixed["run_id"] == replay_id).all()
    # Replayed results sit at the events' original positions.
    orig = marked.select("id", "source_partition", "source_offset").sort("id")
    assert fixed.select("id", "source_partition", "source_offset").sort("id").equals(orig)
    dead = pl.read_delta(dl_uri)
    assert dead.height == n_fixable + 1  # no new dead letters; the dead-letter rows themselves stay
    done = dead.filter(pl.col("error_class") == "missing_variable")
    assert done["replayed_by"].null_count() == 0 and done["replayed_at"].null_count() == 0
    broken = dead.filter(pl.col("error_class") == "invalid_json")
    assert broken["replayed_by"].null_count() == 1  # not matched by --where: untouched
    # The rerun resumed R's plan (jobs/replay.py logs "replay R: N dead-lettered row(s) (resumed)") and
    # planned nothing new. ("resumed" alone proves nothing: it is a column header of the summary.)
    log = again.log()
    assert f"replay {replay_id}: {n_fixable} dead-lettered row(s) (resumed)" in log, log[-3000:]
    assert log.count("dead-lettered row(s)") == 1, log[-3000:]

    # A third run has nothing left to do.
    third = job_processes(spec_path, module="jobs.replay", extra_args=where)
    assert third.wait(300) == 0, third.log()[-3000:]
    assert "nothing to replay" in third.log()
    assert pl.read_delta(res_uri).height == n_good + n_fixable


def test_replay_into_partitioned_tables_with_encrypted_columns(tmp_path, broker, topic, tiny_model, job_processes,
                                                               monkeypatch):  # fmt: skip
    """A replay opens the job's tables as the job does: partitioned (sink.partition_by), with the
    encrypted columns binary (the dead letters' output_text and raw as stored) and the job's table
    properties; each fixed row lands once, encrypted, and decrypts. Rows whose raw event the
    keyring cannot open are left out and given back, not replayed as ciphertext."""
    import base64
    import os

    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from crypto.reader import read_results

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    keyring = tmp_path / "keyring.json"
    kr = Keyring.init(keyring, LocalMasterKeyProvider())
    kr.create_tenant("acme")
    kr.create_tenant("globex")
    records = [(f"f{i}".encode(), json.dumps({"id": f"f{i:03d}", "question": f"q{i}", "email": f"u{i}@x.example",
                                              "customer": "globex" if i >= 10 else "acme"}).encode())
               for i in range(12)]  # fmt: skip
    send(broker, topic, records)
    spec = make_spec(tmp_path, broker, topic, tiny_model, validation=[], **{
        "pool.batch_size": 8, "sink.partition_by": ["tenant"], "sink.maintenance.checkpoint_interval": 20,
        "encryption": {"keyring": str(keyring), "tenant": "acme", "tenant_field": "customer",
                       "input_fields": ["email"], "output_fields": ["output_text"]},
    })  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--instant-engine",))
    assert job.wait(300) == 0, job.log()[-3000:]
    res_uri, dl_uri = spec["sink"]["results"], spec["sink"]["dead_letter"]
    assert pl.read_delta(dl_uri).height == 12  # no `user`: missing_variable, every one

    # globex's key is revoked: its two rows' raw events cannot be read back. The replay leaves
    # them out and gives them back (a later replay, with a key that opens them, plans them).
    kr.rotate("globex")
    kr.revoke("globex", 1)
    spec["prompt"]["template"] = "Answer for {{ user | default('anonymous') }}: {{ question }}"
    # A replay that planned and was stopped before its first commit: the rerun resumes that plan,
    # and may still leave rows out (none of its ordinals is in use yet).
    from jobs.replay import mark_plan

    assert mark_plan(dl_uri, None, "0123456789abcdef", None) == 12
    replay = job_processes(write_spec(tmp_path, spec), module="jobs.replay")
    assert replay.wait(300) == 0, replay.log()[-3000:]
    assert "replay 0123456789abcdef: 2 row(s) left out and given back" in replay.log(), replay.log()[-3000:]
    res = read_results(res_uri, keyring, backend="arrow")
    assert sorted(res.column("id").to_pylist()) == [f"f{i:03d}" for i in range(10)]
    dl = pl.read_delta(dl_uri)
    assert dl.filter(pl.col("tenant") == "globex")["replayed_by"].null_count() == 2
    assert dl.filter(pl.col("tenant") == "acme")["replayed_at"].null_count() == 0
    assert res.column("input_email").to_pylist().count("u3@x.example") == 1
    from deltalake import DeltaTable

    dt = DeltaTable(res_uri)
    assert dt.metadata().partition_columns == ["tenant"]
    assert dt.metadata().configuration["delta.checkpointInterval"] == "20"
    assert pl.read_delta(res_uri)["output_text"].dtype == pl.Binary
