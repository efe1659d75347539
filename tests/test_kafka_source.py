"""KafkaSource against a real tansu broker: seeks to the sink's positions, drains, fails clearly."""

from __future__ import annotations

import json
import time

import pytest

from connectors.kafka import KafkaSource, kafka_end_offsets
from schemas.records import SOURCE_SCHEMA
from schemas.spec import KafkaSourceSpec
from tests.conftest import event, send, source_context


def _source(broker, topic, positions):
    spec = KafkaSourceSpec(bootstrap_servers=[broker.bootstrap_servers], topic=topic, poll_timeout_ms=100,
                           group_id=f"g-{topic}")  # fmt: skip
    return KafkaSource(spec, source_context(positions))


def _read_all(src: KafkaSource, timeout: float = 30.0):
    rows, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = src.poll(50, 200)
        if batch is not None:
            assert batch.schema == SOURCE_SCHEMA
            rows += batch.to_pylist()
        if src.assignment() and src.drained():
            return rows
    raise AssertionError("source never drained")


def test_resumes_after_the_sink_positions_and_detects_drained(broker, topic):
    send(broker, topic, (event(i) for i in range(200)))
    first = _source(broker, topic, {})
    first.start()
    try:
        rows = _read_all(first)
    finally:
        first.close()
    assert len(rows) == 200
    by_partition: dict[int, list[int]] = {}
    for r in rows:
        by_partition.setdefault(r["partition"], []).append(r["offset"])
    # Pretend the sink committed up to offset 9 of each partition (or to its end if smaller).
    positions = {(topic, p): min(9, max(offs)) for p, offs in by_partition.items()}
    again = _source(broker, topic, positions)
    again.start()
    try:
        rest = _read_all(again)
    finally:
        again.close()
    expected = sorted((p, o) for p, offs in by_partition.items() for o in offs if o > positions[(topic, p)])
    assert sorted((r["partition"], r["offset"]) for r in rest) == expected


def _send_to_partitions(broker, topic: str, ids, partitions: int) -> None:
    """Events with ids `ids`, event i to partition i % partitions."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    try:
        for i in ids:
            key, value = event(i)
            producer.send(topic, key=key, value=value, partition=i % partitions)
        producer.flush()
    finally:
        producer.close()


def test_start_from_latest_records_each_new_partitions_end_before_reading_and_starts_there_again(broker, topic):
    """A partition with no position starts at its end, and that end is anchored (recorded by the
    job as a position) before anything is read: a run that stops before its first commit, and
    the next one, lose nothing produced in between. Before, the restart took the later end (and on
    tansu, whose ListOffsets answer is wrong, `seek_to_end` even read old records)."""
    _send_to_partitions(broker, topic, range(40), 3)  # partition 3 stays empty: its start is -1
    ends = kafka_end_offsets(broker.bootstrap_servers, topic)
    assert sum(ends.values()) == 40 and len(ends) == 4 and ends[(topic, 3)] == 0
    spec = KafkaSourceSpec(bootstrap_servers=[broker.bootstrap_servers], topic=topic, poll_timeout_ms=100,
                           group_id=f"g-{topic}", start_from="latest")  # fmt: skip
    ctx = source_context({})
    first = KafkaSource(spec, ctx)
    first.start()
    try:
        assert _read_all(first) == []  # the old records are not read
    finally:
        first.close()  # a run that ends (or is killed) before its first commit
    assert ctx.positions.anchored == {tp: end - 1 for tp, end in ends.items()}

    _send_to_partitions(broker, topic, range(40, 70), 4)
    again = KafkaSource(spec, ctx)  # the positions the first run anchored, as the sink would hold them
    again.start()
    try:
        rows = _read_all(again)
    finally:
        again.close()
    assert sorted(json.loads(r["value"])["id"] for r in rows) == [f"e{i:06d}" for i in range(40, 70)]
    assert ctx.positions.anchored == {tp: end - 1 for tp, end in ends.items()}  # not anchored twice


@pytest.mark.parametrize("race", ["another member anchored first", "the commit writer died"])
def test_start_from_latest_reads_the_positions_again_when_recording_its_start_fails(broker, topic, race):
    """The anchor is a fenced commit: when another member's landed first (two rebalances raced),
    its positions are the ones to start from; when the writer died, the next try records them.
    Before, either stopped the job (the listener's error is raised from poll)."""
    from connectors.source import SourceContext
    from schemas.errors import PartitionFencedError, StageError
    from tests.conftest import FixedPositions

    class Racing(FixedPositions):
        failed = False

        def anchor(self, positions):
            if not self.failed:
                self.failed = True
                if race.startswith("another"):
                    self.positions.update({tp: 0 for tp in positions})  # the other member's record
                    raise PartitionFencedError("positions moved", list(positions))
                raise StageError("the commit writer died while recording start positions")
            super().anchor(positions)

    send(broker, topic, (event(i) for i in range(20)))
    spec = KafkaSourceSpec(bootstrap_servers=[broker.bootstrap_servers], topic=topic, start_from="latest")
    positions = Racing()
    tps = [(topic, p) for p in range(4)]
    got = KafkaSource(spec, SourceContext(job_name="job", positions=positions)).start_positions(tps)
    if race.startswith("another"):
        assert got == {tp: 0 for tp in tps} and positions.anchored == {}
    else:
        ends = kafka_end_offsets(broker.bootstrap_servers, topic)
        assert got == positions.anchored == {tp: ends[tp] - 1 for tp in tps}


def test_a_consumer_config_key_kafka_python_does_not_know_is_one_error_naming_it_at_once():
    """Before, kafka-python's KafkaConfigurationError was taken for an unreachable broker: retried
    for connect_timeout_s, then "no Kafka broker reachable"."""
    from schemas.errors import SpecError

    spec = KafkaSourceSpec(bootstrap_servers=["127.0.0.1:1"], topic="t", connect_timeout_s=60,
                           consumer_config={"fetch_max_wait": 3})  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(SpecError, match=r"consumer_config: not kafka-python KafkaConsumer settings: .*fetch_max_wait"):
        KafkaSource(spec, source_context()).start()
    assert time.monotonic() - t0 < 30  # not retried for connect_timeout_s (60 s)


def test_the_durable_embedded_broker_keeps_its_topics_across_a_kill(tmp_path):
    from connectors.broker import EmbeddedBroker
    from connectors.kafka import create_topic, produce
    from tests.test_results_topic import consume_all

    broker = EmbeddedBroker(data_dir=tmp_path / "data").start()
    try:
        create_topic(broker.bootstrap_servers, "kept", 2)
        produce(broker.bootstrap_servers, "kept", ((f"k{i}".encode(), f"v{i}".encode()) for i in range(50)))
        broker.kill()  # SIGKILL: nothing flushed on the way out
        broker.start()  # same port, same folder
        values = sorted(m.value() for m in consume_all(broker.bootstrap_servers, "kept", idle_s=2))
        assert values == sorted(f"v{i}".encode() for i in range(50))
    finally:
        broker.stop()
    assert broker.store.process is None  # stop() stopped its object store too


def test_an_unreachable_broker_is_given_up_on_after_connect_timeout_s():
    """connect_timeout_s bounds the whole wait: kafka-python's own bootstrap would otherwise wait 30 s
    in its first try whatever the spec says (a job with 3 s and no broker exited after 41 s, Ray's
    start included, before this was mended; 14.7 s after)."""
    import pytest

    from schemas.errors import SourceError
    from tests.conftest import closed_port

    with closed_port() as port:
        spec = KafkaSourceSpec(bootstrap_servers=[f"127.0.0.1:{port}"], topic="t", connect_timeout_s=1)
        src = KafkaSource(spec, source_context({}))
        started = time.monotonic()
        with pytest.raises(SourceError, match="no Kafka broker reachable at 127.0.0.1:.*connect_timeout_s=1s"):
            src.start()
    assert time.monotonic() - started < 15  # 1 s and a try's wind-down; the old wait was 30 s or more


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_batches_compressed_with_every_kafka_codec_are_read(broker, topic, codec):
    """Producers compress (compression.type lz4 and zstd are common): before stop 44 only gzip's
    library was installed, and the first lz4, snappy or zstd batch stopped the job with
    UnsupportedCodecError at the same offset on every restart. Both sides here are kafka-python:
    the producer compresses with the library the consumer decompresses with."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", compression_type=codec,
                             linger_ms=50)  # fmt: skip
    try:
        for i in range(60):
            key, value = event(i)
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()
    src = _source(broker, topic, {})
    src.start()
    try:
        rows = _read_all(src)
    finally:
        src.close()
    assert sorted(json.loads(r["value"])["id"] for r in rows) == sorted(f"e{i:06d}" for i in range(60))


def test_the_consumer_reads_committed_records_only_unless_consumer_config_says_otherwise(broker, topic):
    """isolation_level read_committed by default (stop 44): a transactional upstream that crashed
    mid-publish sends its rows again, and read_uncommitted (kafka-python's default) processed the
    aborted copies too. tansu shows aborted records under read_committed as well, so this checks
    the setting the consumer runs with; docs/exactly-once.md says what it gives on other brokers."""
    send(broker, topic, (event(i) for i in range(5)))
    src = _source(broker, topic, {})
    src.start()
    try:
        assert src.consumer.config["isolation_level"] == "read_committed"
        assert len(_read_all(src)) == 5
    finally:
        src.close()
    spec = KafkaSourceSpec(bootstrap_servers=[broker.bootstrap_servers], topic=topic, poll_timeout_ms=100,
                           group_id=f"g2-{topic}", consumer_config={"isolation_level": "read_uncommitted"})  # fmt: skip
    src = KafkaSource(spec, source_context({}))
    src.start()
    try:
        assert src.consumer.config["isolation_level"] == "read_uncommitted"
    finally:
        src.close()
