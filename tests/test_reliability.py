"""Broker and store faults (docs/reliability.md): a broker down at start or lost mid-run, a store
that fails writes for a while or for good. Real broker, real jobs, real Delta tables; the store
faults come from a sink that fails on cue (tests/job_runner.py)."""

from __future__ import annotations

import time

import polars as pl
import psutil
import pytest

from connectors.broker import EmbeddedBroker, free_port
from connectors.kafka import create_topic
from tests.conftest import event, make_spec, send, table_rows, wait_for, write_spec

pytestmark = pytest.mark.slow

RUNNER = "tests.job_runner"


def ids_once(uri: str, n: int) -> None:
    ids = pl.read_delta(uri)["id"].to_list()
    assert len(ids) == len(set(ids)) == n, (len(ids), len(set(ids)), n)


def test_store_errors_on_commit_are_retried_and_nothing_is_written_twice(tmp_path, broker, topic, tiny_model, job_processes):
    """Six table writes fail; three of them had landed before the error (the answer was lost):
    the retry sees its own marker in the table and does not write again."""
    n = 300
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"sink.write_backoff_s": 0.05, "sink.commit_max_rows": 64})
    job = job_processes(write_spec(tmp_path, spec), module=RUNNER, extra_args=("--instant-engine", "--flaky-writes", "6"))
    assert job.wait(300) == 0, job.log()[-4000:]
    ids_once(spec["sink"]["results"], n)
    log = job.log()
    assert log.count("table write failed (try 1 of 5)") >= 3 and "but the commit had landed" in log


def test_a_store_that_keeps_failing_stops_the_job_cleanly(tmp_path, broker, topic, tiny_model, job_processes):
    send(broker, topic, (event(i) for i in range(50)))
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"sink.write_attempts": 3, "sink.write_backoff_s": 0.05})
    job = job_processes(write_spec(tmp_path, spec), module=RUNNER, extra_args=("--instant-engine", "--broken-store"))
    assert job.wait(300) == 2, job.log()[-4000:]
    log = job.log()
    assert "failed 3 times (sink.write_attempts=3); last error: OSError" in log and "Traceback" not in log
    assert table_rows(spec["sink"]["results"]) == 0  # nothing half-written
    # The same job on a store that works again finishes the work, once.
    again = job_processes(write_spec(tmp_path, spec), module=RUNNER, extra_args=("--instant-engine",))
    assert again.wait(300) == 0, again.log()[-4000:]
    ids_once(spec["sink"]["results"], 50)


def test_a_broker_down_at_start_is_waited_for(tmp_path, tiny_model, job_processes):
    port = free_port()
    topic = "late"
    spec = make_spec(tmp_path, None, topic, tiny_model)
    spec["source"] = {"kafka": {"bootstrap_servers": f"127.0.0.1:{port}", "topic": topic, "connect_timeout_s": 60,
                                "poll_timeout_ms": 100}}  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module=RUNNER, extra_args=("--instant-engine",))
    wait_for(lambda: "no Kafka broker reachable yet" in job.log() or job.proc.poll() is not None, 60, what="a retry")
    with EmbeddedBroker(port=port, log_path=tmp_path / "late-broker.log") as late:
        create_topic(late.bootstrap_servers, topic, 2)
        send(late, topic, (event(i) for i in range(100)))
        assert job.wait(300) == 0, job.log()[-4000:]
    ids_once(spec["sink"]["results"], 100)


def test_a_broker_lost_mid_run_is_waited_for_without_spinning(tmp_path, tiny_model, job_processes):
    """The broker (durable storage on a local S3 server) dies mid-run and comes back 10 s later on
    the same port: the job neither dies nor spins while it waits, then finishes exactly once."""
    n = 4000
    # the durable embedded broker: topics in a local folder (connectors/broker.py data_dir)
    broker = EmbeddedBroker(port=free_port(), data_dir=tmp_path / "broker-data", log_path=tmp_path / "b.log")
    broker.start()
    try:
        create_topic(broker.bootstrap_servers, "lost", 4)
        send(broker, "lost", (event(i) for i in range(n)))
        spec = make_spec(tmp_path, broker, "lost", tiny_model, **{"pool.batch_size": 64, "sink.commit_max_rows": 64})
        job = job_processes(write_spec(tmp_path, spec), module=RUNNER, extra_args=("--instant-engine", "--slow-commit-s", "0.2"))
        res = spec["sink"]["results"]
        wait_for(lambda: table_rows(res) > 0 or job.proc.poll() is not None, 120, what="first commit")
        broker.kill()
        driver = psutil.Process(job.pid)
        cpu0, t0 = sum(driver.cpu_times()[:2]), time.monotonic()
        time.sleep(10)
        cpu = (sum(driver.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        assert job.proc.poll() is None, job.log()[-4000:]  # still waiting, not dead
        broker.start()
        assert job.wait(300) == 0, job.log()[-4000:]
    finally:
        broker.stop()
    ids_once(spec["sink"]["results"], n)
    assert cpu < 0.6, f"the driver used {cpu:.0%} of a core while the broker was away"
