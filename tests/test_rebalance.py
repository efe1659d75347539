"""Replicas of one job sharing a topic through its consumer group, with members joining, leaving,
killed -9 and timed out mid-stream: after it all, every event is in exactly one table once, and
each partition's position is at its end (real tansu broker, real jobs, real Delta tables)."""

from __future__ import annotations

import re
import signal
import time
import uuid

import polars as pl
import pytest

from connectors.kafka import create_topic
from tests.conftest import event, living, make_spec, table_rows, wait_for, write_spec

pytestmark = pytest.mark.slow

PARTITIONS = 8


def replica_spec(tmp_path, broker, topic, tiny_model, **over) -> dict:
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"sampling.max_tokens": 4, "pool.batch_size": 16, "validation": [], "sink.commit_interval_s": 0.3,
           "source.kafka.session_timeout_ms": 6000, "source.kafka.heartbeat_interval_ms": 1000},
    )  # fmt: skip
    spec["source"]["kafka"]["group_id"] = f"g-{uuid.uuid4().hex[:8]}"
    for k, v in over.items():
        spec[k] = v
    return spec


def committed_rows(spec) -> int:
    return table_rows(spec["sink"]["results"]) + table_rows(spec["sink"]["dead_letter"])


def committed_by(spec, job) -> bool:
    """Whether the results table holds rows of `job`'s run (its run id is in its log)."""
    m = re.search(r"run ([0-9a-f]{16}): reading", job.log())
    if m is None or not table_rows(spec["sink"]["results"]):
        return False
    return m.group(1) in set(pl.read_delta(spec["sink"]["results"], columns=["run_id"])["run_id"])


def check_exactly_once(spec, n: int, per_partition: dict[int, int]) -> pl.DataFrame:
    res = pl.read_delta(spec["sink"]["results"])
    ids = res["id"].to_list()
    assert len(ids) == len(set(ids)) == n, (len(ids), len(set(ids)), n)
    assert table_rows(spec["sink"]["dead_letter"]) == 0
    # Each partition's committed position is its last offset: nothing skipped, nothing left.
    from deltalake import DeltaTable

    from connectors.delta import txn_app_id

    dt = DeltaTable(spec["sink"]["results"])
    topic = spec["source"]["kafka"]["topic"]
    for p, count in per_partition.items():
        assert dt.transaction_version(txn_app_id(spec["name"], (topic, p))) == count - 1, p
    return res


def produce(broker, n: int, topic: str | None = None, start: int = 0, counts: dict[int, int] | None = None
            ) -> tuple[str, dict[int, int]]:  # fmt: skip
    """n events (ids start..start+n-1) to `topic` (default: a new one); `counts` is updated in place."""
    if topic is None:
        topic = f"r-{uuid.uuid4().hex[:10]}"
        create_topic(broker.bootstrap_servers, topic, partitions=PARTITIONS)
    # Unkeyed, round robin over the partitions by explicit partition: known counts per partition.
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    counts = {} if counts is None else counts
    for i in range(start, start + n):
        key, value = event(i)
        p = i % PARTITIONS
        producer.send(topic, key=key, value=value, partition=p)
        counts[p] = counts.get(p, 0) + 1
    producer.flush()
    producer.close()
    return topic, counts


def owns_partitions(job) -> bool:
    """Whether `job`'s last rebalance event (its log) gave it partitions."""
    log = job.log()
    last = log.rfind("partitions assigned")
    return last > log.rfind("partitions revoked") and not log[last:].startswith("partitions assigned: []")


def stop_all(jobs) -> None:
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGTERM)
    for job in jobs:
        assert job.wait(180) == 0, job.log()[-4000:]


def test_three_replicas_one_killed_one_added_one_leaving(tmp_path, broker, tiny_model, job_processes):
    """3 replicas on 8 partitions; mid-run one is killed -9, a fourth joins, and one leaves with
    SIGTERM. Every join and leave is a rebalance that revokes partitions with work in flight.
    The instant engine (bench/instant_engine.py): with four vLLM engines on two cores this was the
    longest test (130 s, 69 s without them) and the engines paced nothing it checks; the
    session-timeout test below keeps the real engine in a rebalance."""
    n = 2400
    topic, counts = produce(broker, n)
    spec = replica_spec(tmp_path, broker, topic, tiny_model)
    path = write_spec(tmp_path, spec)
    instant = {"until_drained": False, "module": "tests.job_runner", "extra_args": ("--instant-engine",)}
    a, b, c = (job_processes(path, **instant) for _ in range(3))
    wait_for(lambda: committed_rows(spec) >= 200 or any(j.proc.poll() is not None for j in (a, b, c)), 300,
             what="first commits")  # fmt: skip
    assert all(j.proc.poll() is None for j in (a, b, c)), a.log()[-3000:]
    family = [a.pid] + [p.pid for p in a.descendants()]

    def assignments() -> int:
        return b.log().count("partitions assigned") + c.log().count("partitions assigned")

    before = assignments()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    # The group takes A's partitions away once A's session expires (session_timeout_ms). Nobody may
    # leave before that: tansu, on a member leaving while a dead member's session is still open,
    # starts a rebalance that waits for the dead member to rejoin (seen here: C and D stuck in the
    # join for over 6.5 minutes). Apache Kafka expires it. So B leaves after the takeover.
    wait_for(lambda: assignments() >= before + 2, 120, what="A's partitions taken over by B and C")

    def keep_work_left() -> None:  # a fast machine may finish before D is up: the scenario needs work left
        nonlocal n
        if committed_rows(spec) > n - 400:
            produce(broker, 800, topic=topic, start=n, counts=counts)
            n += 800

    d = job_processes(path, **instant)  # joins: a rebalance with work in flight
    deadline = time.monotonic() + 300
    while not owns_partitions(d):
        assert d.proc.poll() is None and b.proc.poll() is None and c.proc.poll() is None, d.log()[-3000:]
        assert time.monotonic() < deadline, "D never got partitions:\n" + d.log()[-3000:]
        keep_work_left()
        time.sleep(1)
    keep_work_left()
    b.proc.send_signal(signal.SIGTERM)  # leaves cleanly mid-stream: its work in flight is committed
    assert b.wait(180) == 0, b.log()[-4000:]
    wait_for(lambda: committed_rows(spec) >= n or c.proc.poll() is not None or d.proc.poll() is not None, 400,
             what="every event committed")  # fmt: skip
    stop_all([c, d])
    check_exactly_once(spec, n, counts)
    logs = "".join(j.log() for j in (b, c, d))
    assert "partitions revoked" in logs and "partitions assigned" in logs
    assert "User rebalance callback throws an error" not in logs and "Cannot block on net.run()" not in logs
    # No orphans of the killed replica: its local Ray went with it (the reaper).
    wait_for(lambda: not living(family), 60, what="the killed replica's processes to exit")  # fmt: skip


def test_a_replica_whose_session_timed_out_rejoins_without_duplicates(tmp_path, broker, tiny_model, job_processes):
    """Replica A is frozen (SIGSTOP) past the session timeout: the group hands its partitions to B
    while A still holds work in flight. When A wakes up its partitions are lost: what it had is
    dropped or fenced, never written twice."""
    n = 1600
    topic, counts = produce(broker, n)
    spec = replica_spec(tmp_path, broker, topic, tiny_model)
    path = write_spec(tmp_path, spec)
    a, b = job_processes(path, until_drained=False), job_processes(path, until_drained=False)
    # A must own partitions, with work left, when it freezes. On a loaded machine its engines may
    # come up after B has read everything: then more events are sent until A has committed some.
    # And it must own them at that moment (owns_partitions), not be between a revoke and the next
    # assignment (a rebalance in progress): frozen then, it has nothing to lose and the test checks nothing.
    deadline = time.monotonic() + 300
    while not committed_by(spec, a) or committed_rows(spec) > n - 400 or not owns_partitions(a):
        assert a.proc.poll() is None and b.proc.poll() is None, (a.log() + b.log())[-4000:]
        assert time.monotonic() < deadline, "replica A never committed anything:\n" + a.log()[-3000:]
        if committed_rows(spec) > n - 400:
            produce(broker, 800, topic=topic, start=n, counts=counts)
            n += 800
        time.sleep(1)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(15)  # 2.5 session timeouts: B owns every partition now
    finally:
        a.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: committed_rows(spec) >= n or a.proc.poll() is not None or b.proc.poll() is not None, 400,
             what="every event committed")  # fmt: skip
    stop_all([a, b])
    check_exactly_once(spec, n, counts)
    assert "partitions lost" in a.log() or "moved under this job" in a.log(), a.log()[-4000:]


def test_replicas_beyond_the_partitions_all_end_when_drained(tmp_path, broker, tiny_model, job_processes):
    """Two --until-drained replicas on a topic of one partition: B joins while A reads it, and one
    of them holds no partition (here the group moves it to B). The one holding it drains it and
    leaves; the group then gives it to the other, which finds it committed to its end and ends too
    (README: a replica holding no partition waits for one). Both exit 0, every event once."""
    from kafka import KafkaProducer

    topic = f"r-{uuid.uuid4().hex[:10]}"
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    n = 0

    def send(count: int) -> None:
        nonlocal n
        for i in range(n, n + count):
            key, value = event(i)
            producer.send(topic, key=key, value=value, partition=0)
        producer.flush()
        n += count

    send(2000)
    spec = replica_spec(tmp_path, broker, topic, tiny_model)
    path = write_spec(tmp_path, spec)
    # A on the real engine (paced: B must join while A still reads), B on the instant one
    a = job_processes(path, until_drained=True)
    wait_for(lambda: committed_rows(spec) > 0 or a.proc.poll() is not None, 300, what="A's first commit")
    b = job_processes(path, until_drained=True, module="tests.job_runner", extra_args=("--instant-engine",))
    deadline = time.monotonic() + 300
    # B joins while A still reads: one of them (the assignor may move the partition to B) holds none
    while "partitions assigned: []" not in a.log() + b.log():
        assert a.proc.poll() is None and b.proc.poll() is None, (a.log() + b.log())[-4000:]
        assert time.monotonic() < deadline, "no replica was ever without a partition:\n" + b.log()[-3000:]
        if committed_rows(spec) > n - 1500:  # keep A busy until B is in (well ahead of it: A must not drain)
            send(2000)
        time.sleep(0.5)
    producer.close()
    for job in (a, b):
        assert job.wait(400) == 0, job.log()[-4000:]
    check_exactly_once(spec, n, {0: n})
