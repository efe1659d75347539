"""The engine pool under failure: a killed engine actor, resources that can never be satisfied."""

from __future__ import annotations

import os
import re
import signal
import time

import polars as pl
import psutil
import pytest

from tests.conftest import event, make_spec, send, table_rows, wait_for, write_spec

pytestmark = pytest.mark.slow


def test_killed_engine_actor_is_replaced_and_nothing_is_lost(tmp_path, broker, topic, tiny_model, job_processes):
    n = 1500
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"pool.batch_size": 64})
    job = job_processes(write_spec(tmp_path, spec))
    res_uri = spec["sink"]["results"]
    wait_for(lambda: table_rows(res_uri) > 0 or job.proc.poll() is not None, 240, what="first commit")
    engines = [p for p in job.descendants() if p.name().startswith("ray::EngineWorker")]
    assert len(engines) == 1, [p.name() for p in job.descendants()]
    engines[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert job.wait(600) == 0, job.log()[-4000:]
    assert time.monotonic() - killed_at > 1  # the job really lived through it
    replacement = [p for p in job.descendants()]  # the job has exited: nothing of it is left
    assert not [p for p in replacement if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    res = pl.read_delta(res_uri)
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n
    assert pl.read_delta(spec["sink"]["dead_letter"]).height == 0


@pytest.mark.parametrize(
    "pool,message",
    [
        ({"pool.num_gpus": 1}, "no node can ever hold an engine actor: pool.num_cpus=1, pool.num_gpus=1 per actor"),
        ({"pool.actors": os.cpu_count() + 1},
         f"pool.actors={os.cpu_count() + 1} engine actors need CPU={os.cpu_count() + 1}, GPU=0 in all; "
         f"the cluster has CPU={os.cpu_count()}"),
    ],
)
def test_impossible_resources_fail_fast_with_what_was_asked(tmp_path, broker, topic, tiny_model, job_processes, pool, message):
    spec = make_spec(tmp_path, broker, topic, tiny_model, **pool)
    started = time.monotonic()
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(120) == 2, job.log()[-3000:]
    assert message in job.log()
    assert time.monotonic() - started < 60  # not the 300 s actor start timeout


def test_a_row_that_keeps_killing_the_engine_is_isolated_and_dead_lettered(
    tmp_path, broker, topic, tiny_model, job_processes, monkeypatch
):
    """Fault injection: the engine process exits whenever its batch holds the poison prompt."""
    monkeypatch.setenv("TIDEGATE_FAULT_CRASH_ON", "POISON-PILL")
    n = 60
    records = [event(i) for i in range(n)]
    records.insert(37, event(999, question="POISON-PILL"))
    send(broker, topic, records)
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"pool.batch_size": 4, "pool.max_attempts": 2})
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(900) == 0, job.log()[-4000:]

    res = pl.read_delta(spec["sink"]["results"])
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n and "e000999" not in ids
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert dead.select("id", "stage", "error_class").rows() == [("e000999", "engine", "engine_crash")]
    assert "failed on this row 2 times" in dead["error"][0]


def test_a_row_that_hangs_the_engine_is_isolated_and_dead_lettered(
    tmp_path, broker, topic, tiny_model, job_processes, monkeypatch
):
    """Fault injection: the engine blocks forever on the poison prompt; pool.batch_timeout_s catches it."""
    monkeypatch.setenv("TIDEGATE_FAULT_HANG_ON", "STUCK-PILL")
    n = 12
    records = [event(i) for i in range(n)]
    records.insert(5, event(777, question="STUCK-PILL"))
    send(broker, topic, records)
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": 2, "pool.max_attempts": 2, "pool.batch_timeout_s": 4},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(900) == 0, job.log()[-4000:]

    res = pl.read_delta(spec["sink"]["results"])
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n and "e000777" not in ids
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert dead.select("id", "stage", "error_class").rows() == [("e000777", "engine", "engine_hang")]
    assert "hung on this row 2 times" in dead["error"][0]
    assert "ran over pool.batch_timeout_s=4s: restarting its engine" in job.log()


def test_a_slow_sink_slows_consumption_and_bounds_what_is_in_flight(
    tmp_path, broker, topic, tiny_model, job_processes, monkeypatch
):
    """Backpressure: with every commit taking 1 s, the job reads only as fast as it commits."""
    monkeypatch.setenv("TIDEGATE_FAULT_SLOW_COMMIT_S", "1.0")
    n, batch = 600, 32
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": batch, "sink.commit_max_rows": 64, "sink.commit_interval_s": 0},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(600) == 0, job.log()[-4000:]

    ids = pl.read_delta(spec["sink"]["results"])["id"].to_list()
    assert len(ids) == len(set(ids)) == n
    log = job.log()
    peak = int(re.search(r"peak rows read, not committed\s*│\s*([\d,]+)", log).group(1).replace(",", ""))
    commits = int(re.search(r"commits\s*│\s*([\d,]+)", log).group(1).replace(",", ""))
    # In flight at most: the pool's queued batches (1 actor x 2), one batch waiting behind them,
    # the ready-to-commit bound (2 x commit_max_rows) plus one batch over it, and the poll buffer.
    bound = (2 + 1) * batch + 2 * 64 + batch + batch
    assert batch <= peak <= bound, (peak, bound)
    assert commits >= n // bound  # the sink, not the source, set the pace
