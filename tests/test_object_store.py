"""Delta tables on S3 (#17), through S3-compatible servers on loopback: localbucket
(connectors/broker.py) and, where vacuum's batch delete is needed, moto (tests/moto_s3.py): the
sink's exactly-once commits and fencing, maintenance with vacuum, a job killed with -9 mid-run,
two job processes on one table, a dead-letter replay. Commits use S3 conditional writes
(`conditional_put: etag`): two writers of one table race safely."""

from __future__ import annotations

import re
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
from tests.azurite import KEY as AZURITE_KEY
from tests.azurite import Azurite
from tests.moto_s3 import MotoS3
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


@pytest.fixture
def moto(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tidegate")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with MotoS3() as server:
        server.bucket("lake")
        yield server


@pytest.fixture
def azurite(tmp_path, monkeypatch):
    with Azurite(tmp_path / "azurite") as server:
        for k, v in server.env().items():  # the endpoint and the account key: environment, not spec
            monkeypatch.setenv(k, v)
        server.container("lake")
        yield server


def table_count(uri: str, opts: dict) -> int:
    """Rows in a Delta table on a store; 0 while it does not exist yet."""
    try:
        return DeltaTable(uri, storage_options=opts).count()
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def final_run_id(log: str) -> str:
    m = re.search(r"run ([0-9a-f]{16}): reading", log)
    assert m is not None, log[-2000:]
    return m.group(1)


def options(server: LocalObjectStore | MotoS3) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}


def commits_and_a_fenced_stale_writer(res: str, dl: str, opts: dict, **sink_kw) -> pl.DataFrame:
    """Seven commits of one job; between the last two a second writer with the same job name (a
    stale replica) loads the positions, and its commit of the same offsets is fenced. Returns the
    results rows, checked: each offset once."""
    sink = DeltaSink("job", res, dl, opts, **sink_kw)
    sink.open()
    assert sink.load_positions([TP0]) == {TP0: None}
    for c in range(6):
        sink.commit(results([3 * c, 3 * c + 1]), dead([3 * c + 2]), {TP0: 3 * c + 2})
    stale = DeltaSink("job", res, dl, opts)
    stale.open()
    stale.load_positions([TP0])
    sink.commit(results([18]), dead([]), {TP0: 18})
    with pytest.raises(PartitionFencedError):
        stale.commit(results([18]), dead([]), {TP0: 18})
    rows = pl.read_delta(res, storage_options=opts).sort("source_offset")
    assert rows["source_offset"].to_list() == [o for o in range(19) if o % 3 != 2]
    return rows


def test_commits_positions_fencing_and_maintenance_on_s3(s3):
    opts = options(s3)
    res, dl = "s3://lake/job/results", "s3://lake/job/dead_letter"
    rows = commits_and_a_fenced_stale_writer(res, dl, opts)
    assert DeltaTable(res, storage_options=opts).transaction_version(txn_app_id("job", TP0)) == 18

    dt = DeltaTable(res, storage_options=opts)
    assert table_health(dt).files == 7
    report = maintain_table(dt, MaintenanceSpec(), vacuum=False)
    assert report.error is None and report.compacted == {"files_removed": 7, "files_added": 1}
    assert table_health(dt).files == 1
    assert pl.read_delta(res, storage_options=opts).sort("source_offset").equals(rows.sort("source_offset"))
    assert DeltaSink("job", res, dl, opts).load_positions([TP0]) == {TP0: 18}
    # A step the store refuses is reported, not raised, and leaves the table whole. (localbucket
    # answers S3's batch delete, which vacuum uses, with 501 Not Implemented; vacuum on S3 itself
    # runs against moto in the next test.)
    zero = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "vacuum_retention_hours": 0})
    failed = maintain_table(dt, zero, compact=False, checkpoint=False)
    assert failed.error is not None and failed.error.startswith("OSError")
    assert pl.read_delta(res, storage_options=opts).height == rows.height


def test_vacuum_on_s3_deletes_only_what_no_version_references(moto):
    """The job's own maintenance round (DeltaSink.maintain: compact, checkpoint, vacuum) on S3:
    the objects left under each table are its live files and its log, the rows and the
    positions are unchanged, and fencing holds on this store too."""
    opts = options(moto)
    res, dl = "s3://lake/vac/results", "s3://lake/vac/dead_letter"
    # Retention 0 (below what a spec may set) stands for "the retention has passed".
    zero = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "vacuum_retention_hours": 0})
    sink = DeltaSink("job", res, dl, opts, maintenance=zero)
    sink.open()
    sink.load_positions([TP0])
    for c in range(8):
        sink.commit(results([3 * c, 3 * c + 1]), dead([3 * c + 2]), {TP0: 3 * c + 2})
    before = pl.read_delta(res, storage_options=opts).sort("source_offset")
    dead_before = pl.read_delta(dl, storage_options=opts).sort("source_offset")

    def data_keys(prefix: str) -> list[str]:
        return [k for k in moto.keys("lake", prefix) if "/_delta_log/" not in k]

    assert len(data_keys("vac/results/")) == 8 and len(data_keys("vac/dead_letter/")) == 8
    report = sink.maintain()
    for role, table_prefix in (("results", "vac/results/"), ("dead_letter", "vac/dead_letter/")):
        assert report[role]["report"]["error"] is None, report[role]
        assert report[role]["report"]["vacuumed_files"] == 8, report[role]
        live = DeltaTable(f"s3://lake/{table_prefix}", storage_options=opts).file_uris()
        assert len(live) == 1
        assert sorted(u.removeprefix("s3://lake/") for u in live) == data_keys(table_prefix)
    assert any(k.endswith(".checkpoint.parquet") for k in moto.keys("lake", "vac/results/_delta_log/"))
    assert pl.read_delta(res, storage_options=opts).sort("source_offset").equals(before)
    assert pl.read_delta(dl, storage_options=opts).sort("source_offset").equals(dead_before)
    assert DeltaSink("job", res, dl, opts).load_positions([TP0]) == {TP0: 23}

    stale = DeltaSink("job", res, dl, opts)
    stale.open()
    stale.load_positions([TP0])
    sink.commit(results([24]), dead([]), {TP0: 24})
    with pytest.raises(PartitionFencedError):
        stale.commit(results([24]), dead([]), {TP0: 24})
    assert pl.read_delta(res, storage_options=opts)["source_offset"].to_list().count(24) == 1


def test_commits_fencing_and_maintenance_on_azure_blob(azurite):
    """The same contract on Azure Blob (Azurite): positions, a stale writer fenced (delta-rs
    creates a commit with `If-None-Match: *` there), and the job's maintenance round with vacuum."""
    opts = Azurite.storage_options()
    res, dl = "az://lake/job/results", "az://lake/job/dead_letter"
    zero = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "vacuum_retention_hours": 0})
    rows = commits_and_a_fenced_stale_writer(res, dl, opts, maintenance=zero)

    report = DeltaSink("job", res, dl, opts, maintenance=zero).maintain()
    assert report["results"]["report"]["error"] is None, report
    assert report["results"]["report"]["compacted"] == {"files_removed": 7, "files_added": 1}
    assert report["results"]["report"]["vacuumed_files"] == 7
    assert report["dead_letter"]["report"]["vacuumed_files"] == 6
    assert pl.read_delta(res, storage_options=opts).sort("source_offset").equals(rows)
    assert DeltaSink("job", res, dl, opts).load_positions([TP0]) == {TP0: 18}
    assert table_health(DeltaTable(res, storage_options=opts)).files == 1


@pytest.fixture(params=["s3", "azure"])
def store(request) -> tuple[str, dict[str, str], str]:
    """(table root URI, storage_options, the credential no log may show) on S3 or Azure Blob."""
    if request.param == "s3":
        return "s3://lake", options(request.getfixturevalue("s3")), SECRET_KEY
    request.getfixturevalue("azurite")
    return "az://lake", Azurite.storage_options(), AZURITE_KEY


@pytest.mark.slow
def test_a_job_killed_mid_run_writes_every_input_once_to_the_object_store(
    tmp_path, broker, topic, tiny_model, job_processes, store
):  # fmt: skip
    root, opts, secret = store
    n = 2000
    send(broker, topic, [event(i) for i in range(n)])
    # small commits: object store commits take several round trips, so the run is still going when it is killed
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"pool.batch_size": 32, "sink.commit_max_rows": 64})
    spec["sink"].update(results=f"{root}/kill/results", dead_letter=f"{root}/kill/dead_letter",
                        storage_options=opts)  # fmt: skip
    path = write_spec(tmp_path, spec)

    def committed() -> int:
        return table_count(spec["sink"]["results"], opts)

    # The engine plays no part in what this checks: the instant stand-in (bench/instant_engine.py).
    instant = {"module": "tests.job_runner", "extra_args": ("--instant-engine",)}
    job = job_processes(path, **instant)
    wait_for(lambda: committed() > 0 or job.proc.poll() is not None, 240, what="a first commit")
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
    runs = pl.read_delta(f"{root}/kill/runs", storage_options=opts)  # the runs table beside the results
    assert runs.filter(pl.col("kind") == "run")["run_id"].to_list() == [final_run_id(final.log())]
    for log in (job.log(), final.log()):
        assert secret not in log


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


@pytest.mark.slow
def test_two_job_processes_on_one_s3_table_write_every_event_once(tmp_path, broker, tiny_model, job_processes, s3):
    """Two processes of one job (same name, same tables on S3) share the topic's partitions; the
    second joins while the first has work in flight, so partitions move with commits racing on S3:
    every event lands once and every partition's position ends at its last offset."""
    from connectors.delta import txn_app_id
    from tests.test_rebalance import PARTITIONS, owns_partitions, produce, replica_spec, stop_all

    opts = options(s3)
    n = 2000
    topic, counts = produce(broker, n)
    spec = replica_spec(tmp_path, broker, topic, tiny_model)
    spec["pool"]["batch_size"] = 32
    spec["sink"].update(results="s3://lake/two/results", dead_letter="s3://lake/two/dead_letter",
                        storage_options=opts, commit_max_rows=64)  # fmt: skip
    path = write_spec(tmp_path, spec)

    def committed() -> int:
        return table_count(spec["sink"]["results"], opts)

    instant = {"module": "tests.job_runner", "extra_args": ("--instant-engine",), "until_drained": False}
    a = job_processes(path, **instant)
    wait_for(lambda: committed() > 0 or a.proc.poll() is not None, 240, what="a first commit on S3")
    assert a.proc.poll() is None, a.log()[-3000:]
    b = job_processes(path, **instant)
    deadline = time.monotonic() + 300
    while not owns_partitions(b):  # keep A busy until B's join has moved partitions
        assert a.proc.poll() is None and b.proc.poll() is None, (a.log() + b.log())[-4000:]
        assert time.monotonic() < deadline, "B never got partitions:\n" + b.log()[-3000:]
        if committed() > n - 500:
            produce(broker, 500, topic=topic, start=n, counts=counts)
            n += 500
        time.sleep(0.5)
    # A may have drained its backlog before the move; events produced now land on every partition,
    # B's included, so B commits rows of its own whatever the timing was.
    produce(broker, 2 * PARTITIONS, topic=topic, start=n, counts=counts)
    n += 2 * PARTITIONS
    wait_for(lambda: committed() >= n or a.proc.poll() is not None or b.proc.poll() is not None, 400,
             what="every event committed")  # fmt: skip
    stop_all([a, b])
    res = pl.read_delta(spec["sink"]["results"], storage_options=opts)
    assert res.height == n and res["id"].n_unique() == n
    assert res["run_id"].n_unique() == 2  # both processes committed rows
    dt = DeltaTable(spec["sink"]["results"], storage_options=opts)
    for p, count in counts.items():
        assert dt.transaction_version(txn_app_id(spec["name"], (topic, p))) == count - 1, p
    assert "partitions revoked" in a.log()
    for log in (a.log(), b.log()):
        assert SECRET_KEY not in log


@pytest.mark.slow
def test_dead_letter_replay_on_s3(tmp_path, broker, topic, tiny_model, job_processes, s3):
    """`tidegate dlq replay` with both tables on S3: its plan and finish are Delta UPDATEs there."""
    import json

    opts = options(s3)
    records = [(f"g{i}".encode(), json.dumps({"id": f"g{i:03d}", "user": "u", "question": f"q{i}"}).encode())
               for i in range(30)]  # fmt: skip
    # No `user` field: the template fails on these until the spec is fixed.
    records += [(f"f{i}".encode(), json.dumps({"id": f"f{i:03d}", "question": f"q{i}"}).encode()) for i in range(40)]
    send(broker, topic, records)
    spec = make_spec(tmp_path, broker, topic, tiny_model, validation=[], **{"pool.batch_size": 16})
    spec["sink"].update(results="s3://lake/dlq/results", dead_letter="s3://lake/dlq/dead_letter",
                        storage_options=opts)  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--instant-engine",))
    assert job.wait(300) == 0, job.log()[-3000:]
    dead = pl.read_delta(spec["sink"]["dead_letter"], storage_options=opts)
    assert dead["error_class"].to_list() == ["missing_variable"] * 40

    spec["prompt"]["template"] = "Answer for {{ user | default('anonymous') }}: {{ question }}"
    spec["sink"]["commit_max_rows"] = 16
    replay = job_processes(write_spec(tmp_path, spec), module="jobs.replay")
    assert replay.wait(300) == 0, replay.log()[-3000:]
    res = pl.read_delta(spec["sink"]["results"], storage_options=opts)
    assert res.height == res["id"].n_unique() == 70
    dead = pl.read_delta(spec["sink"]["dead_letter"], storage_options=opts)
    assert dead.height == 40 and dead["replayed_by"].null_count() == 0 and dead["replayed_at"].null_count() == 0
    fixed = res.filter(pl.col("id").str.starts_with("f"))
    assert (fixed["run_id"] == dead["replayed_by"][0]).all()
    for log in (job.log(), replay.log()):
        assert SECRET_KEY not in log
