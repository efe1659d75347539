"""Delta tables on S3 (#17), through an S3-compatible server on loopback (localbucket, tests/s3.py):
the sink's exactly-once commits and fencing, maintenance, and a job killed with -9 mid-run.
Commits use S3 conditional writes (`conditional_put: etag`): two writers of one table race safely."""

from __future__ import annotations

import signal
import time
import uuid

import polars as pl
import pytest
from deltalake import DeltaTable

from connectors.delta import DeltaSink, txn_app_id
from connectors.maintenance import maintain_table, table_health
from schemas.errors import PartitionFencedError
from schemas.spec import MaintenanceSpec
from tests.conftest import event, make_spec, send, wait_for, write_spec
from connectors.broker import LocalObjectStore
from tests.test_delta_sink import TP0, dead, results

SECRET_KEY = f"s3-secret-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    # Credentials come from the environment (what delta-rs and the job read), never from a spec.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tidegate")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with LocalObjectStore(tmp_path / "s3") as server:
        server.bucket("lake")
        yield server


def options(server: LocalObjectStore) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}


def test_commits_positions_fencing_and_maintenance_on_s3(s3):
    opts = options(s3)
    res, dl = "s3://lake/job/results", "s3://lake/job/dead_letter"
    sink = DeltaSink("job", res, dl, opts)
    sink.open()
    assert sink.load_positions([TP0]) == {TP0: None}
    for c in range(6):
        sink.commit(results([3 * c, 3 * c + 1]), dead([3 * c + 2]), {TP0: 3 * c + 2})
    # a second writer with the same job name (a stale replica) is fenced: nothing duplicated
    stale = DeltaSink("job", res, dl, opts)
    stale.open()
    stale.load_positions([TP0])
    sink.commit(results([18]), dead([]), {TP0: 18})
    with pytest.raises(PartitionFencedError):
        stale.commit(results([18]), dead([]), {TP0: 18})
    rows = pl.read_delta(res, storage_options=opts)
    assert sorted(rows["source_offset"]) == [o for o in range(19) if o % 3 != 2]
    assert DeltaTable(res, storage_options=opts).transaction_version(txn_app_id("job", TP0)) == 18

    dt = DeltaTable(res, storage_options=opts)
    assert table_health(dt).files == 7
    report = maintain_table(dt, MaintenanceSpec(), vacuum=False)
    assert report.error is None and report.compacted == {"files_removed": 7, "files_added": 1}
    assert table_health(dt).files == 1
    assert pl.read_delta(res, storage_options=opts).sort("source_offset").equals(rows.sort("source_offset"))
    assert DeltaSink("job", res, dl, opts).load_positions([TP0]) == {TP0: 18}
    # A step the store refuses is reported, not raised, and leaves the table whole. (localbucket
    # answers S3's batch delete, which vacuum uses, with 501 Not Implemented: vacuum on S3 itself
    # is not exercised here.)
    zero = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "vacuum_retention_hours": 0})
    failed = maintain_table(dt, zero, compact=False, checkpoint=False)
    assert failed.error is not None and failed.error.startswith("OSError")
    assert pl.read_delta(res, storage_options=opts).height == rows.height


@pytest.mark.slow
def test_a_job_killed_mid_run_writes_every_input_once_to_s3(tmp_path, broker, topic, tiny_model, job_processes, s3):
    n = 2000
    send(broker, topic, [event(i) for i in range(n)])
    # small commits: S3 commits take several round trips, so the run is still going when it is killed
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"pool.batch_size": 32, "sink.commit_max_rows": 64})
    spec["sink"].update(results="s3://lake/kill/results", dead_letter="s3://lake/kill/dead_letter",
                        storage_options=options(s3))  # fmt: skip
    path = write_spec(tmp_path, spec)
    opts = options(s3)

    def committed() -> int:
        try:
            return DeltaTable(spec["sink"]["results"], storage_options=opts).count()
        except Exception:  # noqa: BLE001 - not created yet
            return 0

    # The engine plays no part in what this checks: the instant stand-in (bench/instant_engine.py).
    instant = {"module": "tests.job_runner", "extra_args": ("--instant-engine",)}
    job = job_processes(path, **instant)
    wait_for(lambda: committed() > 0 or job.proc.poll() is not None, 240, what="a first commit on S3")
    assert job.proc.poll() is None, job.log()[-3000:]
    time.sleep(1.0)
    job.proc.send_signal(signal.SIGKILL)
    job.proc.wait()
    partial = committed()
    assert 0 < partial < n

    final = job_processes(path, **instant)
    assert final.wait(600) == 0, final.log()[-4000:]
    res = pl.read_delta(spec["sink"]["results"], storage_options=opts)
    assert res.height == n and res["id"].n_unique() == n and res["run_id"].n_unique() == 2
    for log in (job.log(), final.log()):
        assert SECRET_KEY not in log


def test_a_delta_source_on_s3_reads_every_row_once_and_resumes(s3):
    from deltalake import write_deltalake

    from tests.test_delta_source import read_all, rows, source_context
    from connectors.delta_source import MARKER, DeltaSource
    from schemas.spec import DeltaSourceSpec

    opts = options(s3)
    uri = "s3://lake/src"
    write_deltalake(uri, rows(0, 20, "eu"), partition_by=["region"], storage_options=opts)
    write_deltalake(uri, rows(20, 13, "us"), mode="append", partition_by=["region"], storage_options=opts)

    def source(positions=None):
        src = DeltaSource(DeltaSourceSpec(uri=uri, storage_options=opts), source_context(positions or {}, batch_rows=5))
        src.start()
        return src

    out = read_all(source())
    assert out.column("offset").to_pylist() == list(range(33))
    rest = read_all(source({(uri, MARKER): 1, (uri, 1): 16}))
    assert rest.column("value").to_pylist() == out.column("value").to_pylist()[17:]
