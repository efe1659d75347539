"""The engine pool under failure: a killed engine actor, resources that can never be satisfied."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
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


@pytest.mark.parametrize("actor", ["StageWorker", "CommitWriter"])
def test_killed_stage_actor_is_replaced_and_nothing_is_lost(tmp_path, broker, topic, tiny_model, job_processes, actor):
    """The CPU stages run in their own actors: killing one costs a retry (a stage worker's calls
    re-run) or a re-read from the table's positions (the commit writer), never a row."""
    n = 800
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": 32, "sink.commit_interval_s": 0, "sink.commit_max_rows": 32},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec))
    res_uri = spec["sink"]["results"]
    wait_for(lambda: table_rows(res_uri) > 0 or job.proc.poll() is not None, 240, what="first commit")
    names = [p.name() for p in job.descendants()]
    # A busy actor's process is titled ray::Class.method.
    for cls in ("StageWorker", "CommitWriter"):
        assert [name for name in names if name.startswith(f"ray::{cls}")], names
    victims = [p for p in job.descendants() if p.name().startswith(f"ray::{actor}")]
    assert len(victims) == 1, names
    victims[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert job.wait(600) == 0, job.log()[-4000:]
    assert time.monotonic() - killed_at > 1  # the job really lived through it

    ids = pl.read_delta(res_uri)["id"].to_list()
    assert len(ids) == len(set(ids)) == n
    assert pl.read_delta(spec["sink"]["dead_letter"]).height == 0
    if actor == "CommitWriter":
        # Its positions are re-read from the table: the job dropped what was not committed.
        assert "re-reading from the table's positions" in job.log(), job.log()[-4000:]


@pytest.mark.parametrize(
    "pool,message",
    [
        ({"pool.num_gpus": 1}, "no node can ever hold an engine actor: pool.num_cpus=1, pool.num_gpus=1 per actor"),
        ({"pool.num_gpus": 2, "pool.tensor_parallel_size": 2},
         "pool.num_gpus=2 (tensor_parallel_size=2, one node) per actor, but the largest node"),
        ({"pool.min_actors": os.cpu_count() + 1, "pool.max_actors": os.cpu_count() + 2},
         f"pool.min_actors={os.cpu_count() + 1} engine actors need CPU={os.cpu_count() + 1}"),
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
    tmp_path, broker, topic, tiny_model, job_processes
):
    """Fault injection (tests/job_runner.py): the engine process exits whenever its batch holds the
    poison prompt. The instant engine: what is tested is the pool's isolation, and each of the
    restarts would otherwise reload vLLM (test_killed_engine_actor_... restarts the real one)."""
    n = 60
    records = [event(i) for i in range(n)]
    records.insert(37, event(999, question="POISON-PILL"))
    send(broker, topic, records)
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"pool.batch_size": 4, "pool.max_attempts": 2})
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--crash-on", "POISON-PILL", "--instant-engine"))
    assert job.wait(900) == 0, job.log()[-4000:]

    res = pl.read_delta(spec["sink"]["results"])
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n and "e000999" not in ids
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert dead.select("id", "stage", "error_class").rows() == [("e000999", "engine", "engine_crash")]
    assert "failed on this row 2 times" in dead["error"][0]


def test_a_row_that_hangs_the_engine_is_isolated_and_dead_lettered(tmp_path, broker, topic, tiny_model, job_processes):
    """Fault injection (tests/job_runner.py): the engine blocks forever on the poison prompt;
    pool.batch_timeout_s catches it. The instant engine, as in the test above."""
    n = 12
    records = [event(i) for i in range(n)]
    records.insert(5, event(777, question="STUCK-PILL"))
    send(broker, topic, records)
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": 2, "pool.max_attempts": 2, "pool.batch_timeout_s": 4, "pool.stuck_after_s": 3},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--hang-on", "STUCK-PILL", "--instant-engine"))
    assert job.wait(900) == 0, job.log()[-4000:]

    res = pl.read_delta(spec["sink"]["results"])
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n and "e000777" not in ids
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert dead.select("id", "stage", "error_class").rows() == [("e000777", "engine", "engine_hang")]
    assert "hung on this row 2 times" in dead["error"][0]
    log = job.log()
    assert "ran over pool.batch_timeout_s=4s: cancelled" in log
    # The stuck engine answered no ping after the cancel: it was restarted (a slow row alone is
    # only aborted, the engine goes on).
    assert re.search(r"an engine did not answer for \d+s: restarting it", log)


def test_a_stop_commits_the_finished_batches_while_a_straggler_outlives_the_deadline(tmp_path, broker, topic,
                                                                                      tiny_model, job_processes):  # fmt: skip
    """SIGTERM while the last batch hangs at the engine, and no commit due (commit_interval_s 600):
    the drain waits for it up to run.shutdown_timeout_s. Before, the finished batches were only
    committed after the drain, whose deadline had passed by then, so none was: every rebalance or
    stop with one straggler redid the whole window. Now they are committed while it waits."""
    n = 20
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": 2, "sink.commit_interval_s": 600, "run.shutdown_timeout_s": 6},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", until_drained=False,
                        extra_args=("--hang-on", "STUCK-PILL", "--instant-engine"))  # fmt: skip
    wait_for(lambda: "partitions assigned" in job.log() or job.proc.poll() is not None, 300, what="the job reading")
    assert job.proc.poll() is None, job.log()[-3000:]
    time.sleep(15)  # the instant engine answers the 20 events in well under a second once they are read
    send(broker, topic, [event(777, question="STUCK-PILL")])
    time.sleep(10)  # read and at the engine within a second here; the log check below says it was
    assert table_rows(spec["sink"]["results"]) == 0  # no commit due yet
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(180) == 0, job.log()[-4000:]
    ids = pl.read_delta(spec["sink"]["results"])["id"].to_list()
    assert sorted(ids) == sorted(f"e{i:06d}" for i in range(n)), job.log()[-3000:]
    assert "abandoning 1 batch(es) still in flight" in job.log()


def test_a_second_signal_stops_at_once_with_one_line_and_a_stopped_run_row(tmp_path, broker, topic, tiny_model,
                                                                            job_processes):  # fmt: skip
    """SIGTERM starts the drain, which waits for a batch hung at the engine (up to
    run.shutdown_timeout_s, 300 s here); a second signal stops the job at once: exit 130, one line
    saying what it means, no traceback (before stop 44: a KeyboardInterrupt traceback, exit 1),
    and the runs table says stopped, not failed."""
    from connectors.runs import RunsTable

    send(broker, topic, [event(0), event(777, question="STUCK-PILL")])
    spec = make_spec(tmp_path, broker, topic, tiny_model,
                     **{"pool.batch_size": 1, "sink.commit_interval_s": 600, "run.shutdown_timeout_s": 300})  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", until_drained=False,
                        extra_args=("--hang-on", "STUCK-PILL", "--instant-engine"))  # fmt: skip
    wait_for(lambda: "partitions assigned" in job.log() or job.proc.poll() is not None, 300, what="the job reading")
    time.sleep(10)  # both read and at the engine well within that (the instant engine)
    job.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in job.log() or job.proc.poll() is not None, 60, what="the first signal")
    assert job.proc.poll() is None, job.log()[-3000:]  # draining: the hung batch holds it
    job.proc.send_signal(signal.SIGINT)
    assert job.wait(120) == 130, job.log()[-4000:]
    log = job.log()
    assert "stopped at once: batches in flight were not committed; the next run reads them again" in log
    assert "Traceback" not in log, log[-4000:]
    runs = RunsTable.for_results(spec["sink"]["results"]).read()
    (row,) = runs.filter(runs["kind"] == "run").to_dicts()
    assert row["status"] == "stopped" and "second signal" in row["error"], row


def test_a_slow_sink_slows_consumption_and_bounds_what_is_in_flight(tmp_path, broker, topic, tiny_model, job_processes):
    """Backpressure: with every commit taking 1 s (tests/job_runner.py), the job reads only as fast as it commits."""
    n, batch = 600, 32
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": batch, "sink.commit_max_rows": 64, "sink.commit_interval_s": 0},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--slow-commit-s", "1.0"))
    assert job.wait(600) == 0, job.log()[-4000:]

    ids = pl.read_delta(spec["sink"]["results"])["id"].to_list()
    assert len(ids) == len(set(ids)) == n
    log = job.log()
    peak = int(re.search(r"peak rows read, not committed\s*│\s*([\d,]+)", log).group(1).replace(",", ""))
    commits = int(re.search(r"commits\s*│\s*([\d,]+)", log).group(1).replace(",", ""))
    # In flight at most: the batches at the engine or a stage worker (1 actor x 2), one batch
    # waiting behind them, the ready-to-commit bound (2 x commit_max_rows, the commit being
    # written included) plus one batch over it, and the poll buffer.
    bound = (2 + 1) * batch + 2 * 64 + batch + batch
    assert batch <= peak <= bound, (peak, bound)
    assert commits >= n // bound  # the sink, not the source, set the pace


def test_a_consumer_that_cannot_read_for_long_stays_in_its_group(tmp_path, broker, topic, tiny_model, job_processes):
    """Each commit takes 8 s (a slow store) and the job has no room for rows meanwhile; kafka-python
    leaves the group when poll() is not called within max_poll_interval_ms (here 6 s, default
    300 s, against pool.batch_timeout_s's 600 s for a hanging row). The source's keepalive (a poll
    with its partitions paused) keeps the membership: no partition is lost, no work dropped and
    read again, every event once."""
    n, batch = 160, 32
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.batch_size": batch, "sink.commit_max_rows": 64, "sink.commit_interval_s": 0,
           "source.kafka.consumer_config": {"max_poll_interval_ms": 6000}},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner",
                        extra_args=("--slow-commit-s", "8.0", "--instant-engine"))  # fmt: skip
    assert job.wait(600) == 0, job.log()[-4000:]
    ids = pl.read_delta(spec["sink"]["results"])["id"].to_list()
    assert len(ids) == len(set(ids)) == n
    log = job.log()
    # kafka-python's heartbeat thread says so when it leaves the group (seen without the keepalive).
    assert "Consumer poll timeout has expired" not in log, log[-3000:]
    assert "partitions lost" not in log and "partitions revoked" not in log, log[-3000:]
    assert "resuming from Delta positions" in log and log.count("partitions assigned") == 1


def engine_processes(job) -> list[psutil.Process]:
    alive = []
    for p in job.descendants():
        try:  # a process listed may be gone before it is asked its name (a scale-down's engine)
            if p.name().startswith("ray::EngineWorker") and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def test_pool_scales_up_under_backlog_and_down_when_idle(tmp_path, broker, topic, tiny_model, job_processes):
    n = 4000
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"pool.min_actors": 1, "pool.max_actors": 2, "pool.scale_up_after_s": 2, "pool.scale_down_after_s": 6,
           "pool.num_cpus": 0.5, "pool.batch_size": 32, "validation": []},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec), until_drained=False)
    res_uri = spec["sink"]["results"]
    wait_for(lambda: table_rows(res_uri) > 0 or job.proc.poll() is not None, 240, what="first commit")
    assert len(engine_processes(job)) == 1
    wait_for(lambda: len(engine_processes(job)) == 2 or job.proc.poll() is not None, 120, what="a second engine")
    assert job.proc.poll() is None, job.log()[-3000:]
    assert "starting engine 2 of at most 2" in job.log()
    wait_for(lambda: table_rows(res_uri) == n or job.proc.poll() is not None, 300, what="every row committed")
    # Idle now: back down to min_actors.
    wait_for(lambda: len(engine_processes(job)) == 1 or job.proc.poll() is not None, 60, what="scale down")
    assert "idle for 6s, down to 1 engine(s)" in job.log()
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(120) == 0, job.log()[-3000:]
    ids = pl.read_delta(res_uri)["id"].to_list()
    assert len(ids) == len(set(ids)) == n
    assert re.search(r"engines \(peak\)\s*│\s*2", job.log())


def test_tensor_parallel_engines_get_a_packed_placement_group_each(tmp_path):
    """Placement only (no GPUs here): one STRICT_PACK group of tensor_parallel_size GPU bundles per
    engine, on a local Ray with logical GPUs; the engine actor itself holds no GPU."""
    import ray
    from ray.util.placement_group import placement_group_table

    from actors.pool import EnginePool
    from schemas.spec import parse_spec

    spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model",
                                **{"source": {"kafka": {"topic": "t"}}, "pool.num_gpus": 2, "pool.num_cpus": 1,
                                   "pool.tensor_parallel_size": 2}))  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="tgray", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=ray_tmp, object_store_memory=80 * 2**20)
    try:
        pool = EnginePool(spec)
        pool._actor_options = {"num_cpus": 0, "num_gpus": 0, "max_restarts": 0}
        actor, pg = pool._new_actor()
        assert ray.get(pg.ready(), timeout=60)
        table = placement_group_table(pg)
        assert table["strategy"] == "STRICT_PACK"
        assert list(table["bundles"].values()) == [{"GPU": 1.0, "CPU": 0.5}, {"GPU": 1.0, "CPU": 0.5}]
        EnginePool._kill(type("S", (), {"actor": actor, "pg": pg})())
        wait_for(lambda: placement_group_table(pg)["state"] == "REMOVED", 30, what="group removed")
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_engine_ray_restarts_after_a_crash_is_given_its_reload_not_cancelled_as_hung(tmp_path):
    """A crash Ray restarts an engine from (its calls run again, max_task_retries): the pool did
    not know, so the model's reload counted against pool.batch_timeout_s, and the calls were
    cancelled as hung (and their rows quarantined) while the engine was still loading. The pool now
    reads the actor's restarts from Ray's actor table when a call is over its time: a restart
    starts the calls' clocks again. An actor whose constructor sleeps stands in for the reload."""
    import ray

    from actors.pool import EnginePool, _Call, _Slot
    from actors.remote import actor_restarts
    from schemas.spec import parse_spec

    marker = tmp_path / "started-once"

    @ray.remote(max_restarts=-1, num_cpus=0)
    class Reloading:
        def __init__(self, marker: str):
            if os.path.exists(marker):
                time.sleep(8)  # the reload after a crash
            open(marker, "w").close()

        def ping(self) -> int:
            return os.getpid()

        def crash(self) -> None:
            os._exit(70)

    spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model", **{"source": {"kafka": {"topic": "t"}},
                                                                              "pool.batch_timeout_s": 2}))  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="tgray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, object_store_memory=80 * 2**20)
    try:
        pool = EnginePool(spec)
        actor = Reloading.remote(str(marker))
        ray.get(actor.ping.remote(), timeout=60)
        slot = _Slot(actor)
        pool.slots = [slot]
        assert actor_restarts(actor) == (False, 0)
        actor.crash.remote()
        wait_for(lambda: actor_restarts(actor) == (True, 1), 20, interval=0.2, what="the actor restarting")
        # A call sent 10 s ago (over the 2 s limit), the engine reloading since its crash:
        ref = actor.ping.remote()
        pool._pending[ref] = _Call(slot, part=None, counts=ref, sent=time.monotonic() - 10)
        pool._check_hangs()
        assert ref in pool._pending  # not cancelled as hung
        assert slot.restarts == 1 and slot.ready_at > time.monotonic() - 5  # its clock starts again
        pool._check_hangs()  # seen: the next check within the limit asks nothing
        assert ref in pool._pending
        pool._pending.clear()
        # Restarting for longer than a reload takes (a hung model load, an actor Ray cannot place):
        # a hang again, not waited on for good (the reload here takes 8 s, the grace is set to 1 s).
        pool._restart_grace_s = 1.0
        since = slot.restarting_since
        assert since is not None and pool._reloading(slot, since + 0.5)  # restarting, within the grace
        assert actor_restarts(actor) == (True, 1)  # still reloading
        assert not pool._reloading(slot, since + 1.5)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
