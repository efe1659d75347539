"""KafkaSource against a real tansu broker: seeks to the sink's positions, drains, fails clearly."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest

from connectors.kafka import TOPIC_IDENTITY, KafkaSource, kafka_end_offsets
from schemas.errors import SourceError
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


def _read_from_start(broker, topic) -> list[dict]:
    """Every record of `topic` through a KafkaSource with no positions, then closed."""
    src = _source(broker, topic, {})
    src.start()
    try:
        return _read_all(src)
    finally:
        src.close()


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
    rows = _read_from_start(broker, topic)
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


def send_with_a_corrupt_header(broker, topic: str, records, partition: int = 0) -> None:
    """Produce `records` ((key, value, corrupt?) to `partition`) through kafka-python; the header
    name of each record marked corrupt is rewritten on the wire to bytes that are not UTF-8 (what a
    librdkafka or Go producer can send), the batch CRC recomputed: the broker stores it as sent.
    Records sent in one call share producer batches (linger)."""
    import struct

    import crc32c
    from kafka import KafkaProducer
    from kafka.producer import sender as sender_module

    produce_request = sender_module.Sender._produce_request

    def corrupting(self, node_id, acks, timeout, batches):
        request = produce_request(self, node_id, acks, timeout, batches)
        for topic_data in request.topic_data:
            for part in topic_data.partition_data:
                buf = bytearray(part.records)
                while (at := buf.find(b"CORRUPT")) >= 0:
                    buf[at:at + 2] = b"\xff\xfe"
                buf[17:21] = struct.pack(">I", crc32c.crc32c(bytes(buf[21:])))  # v2 batch CRC: attributes..end
                part.records = bytes(buf)
        return request

    sender_module.Sender._produce_request = corrupting
    try:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", linger_ms=200)
        try:
            for key, value, corrupt in records:
                producer.send(topic, key=key, value=value, partition=partition,
                              headers=[("CORRUPT-h", b"x")] if corrupt else [("trace", b"x")])  # fmt: skip
            producer.flush()
        finally:
            producer.close()
    finally:
        sender_module.Sender._produce_request = produce_request


def test_a_record_the_client_cannot_read_becomes_a_row_of_its_own_and_reading_goes_on(broker, topic):
    """Before stop 44 a header name that is not UTF-8 raised CorruptRecordError out of the
    consumer's poll: the job stopped, and did again at the same offset on every restart (and
    kafka-python's next poll would have spun at 100 % CPU). Now that offset is a row with no key or
    value, source_change "unreadable" (dead-lettered by the job); the records after it in the same
    producer batch, which kafka-python cannot reach past it, are "unreadable_batch"; a later batch
    is read as usual."""
    good = lambda i: (f"k{i}".encode(), json.dumps({"id": f"e{i}", "q": "x"}).encode(), False)  # noqa: E731
    send_with_a_corrupt_header(broker, topic, [good(0)])
    send_with_a_corrupt_header(broker, topic, [(b"k1", b'{"id": "e1"}', True)])
    send_with_a_corrupt_header(broker, topic, [good(2), (b"k3", b'{"id": "e3"}', True), good(4), good(5)])
    send_with_a_corrupt_header(broker, topic, [good(6)])
    rows = _read_from_start(broker, topic)
    got = {r["offset"]: (r["source_change"], r["value"] is None) for r in rows if r["partition"] == 0}
    assert got == {0: (None, False), 1: ("unreadable", True), 2: (None, False), 3: ("unreadable", True),
                   4: ("unreadable_batch", True), 5: ("unreadable_batch", True), 6: (None, False)}, got


def test_an_unreadable_row_is_dead_lettered_at_the_source_stage():
    from compute.prompts import PromptRenderer
    from schemas.records import UNREADABLE
    from schemas.spec import PromptSpec

    rows = pa.table({"topic": ["t", "t"], "partition": [0, 0], "offset": [7, 8], "key": [None, b"k"],
                     "value": [None, b'{"id": "e8", "q": "hi"}'], "timestamp_ms": [None, 1], "received_ns": [1, 1],
                     "source_change": ["unreadable", None]}, schema=SOURCE_SCHEMA)  # fmt: skip
    out = PromptRenderer(PromptSpec(template="{{ q }}", id_field="id"), 1 << 20, "run-1").render(rows)
    assert out.requests.column("id").to_pylist() == ["e8"]
    (dead,) = out.dead.to_pylist()
    assert (dead["stage"], dead["error_class"], dead["source_offset"], dead["raw"]) == ("source", "unreadable_record", 7, None)
    assert dead["error"] == UNREADABLE["unreadable"]


def test_a_partition_between_its_revocation_and_the_joins_end_is_not_drained(broker, topic):
    """Eager rebalancing keeps the revoked partitions in assignment(), at their old positions,
    until the join ends, while the job has dropped its work on them: before stop 44 drained() read
    them as consumed, and --until-drained could end the run in that gap. Here a second member
    joins the group; at the revocation the first must not say drained, and once its new
    assignment is settled (and read to the end) it may again."""
    from kafka import KafkaConsumer

    send(broker, topic, (event(i) for i in range(40)))
    src = _source(broker, topic, {})
    seen: list[bool] = []
    release = src.ctx.positions.release
    src.ctx.positions.release = lambda tps, lost=False, within_s=None: (seen.append(src.drained()),
                                                                         release(tps, lost, within_s))  # fmt: skip
    src.start()
    other = None
    try:
        _read_all(src)
        assert src.drained()
        other = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap_servers, group_id=f"g-{topic}",
                              enable_auto_commit=False)  # fmt: skip
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:  # both poll: the group rebalances
            src.poll(50, 100)
            other.poll(timeout_ms=100)
        assert seen == [False], seen
        while not (src._settled and src.assignment()) and time.monotonic() < deadline:
            src.poll(50, 100)
            other.poll(timeout_ms=100)
        assert src._settled and len(src.assignment()) < 4
        _read_all(src)
        assert src.drained()
    finally:
        if other is not None:
            other.close()
        src.close()


def test_positions_of_a_topic_deleted_and_created_again_are_refused_not_read_from(broker, topic):
    """The topic's identity (a hash of its Kafka topic id) rides with the commits' positions until
    one has landed (not a commit of its own inside the rebalance: a slow store held the group's
    join up past max_poll_interval_ms). A topic of the same name with another id (deleted and
    created again: its offsets start at 0 again) is refused, naming what to do. Before stop 44 the
    job read the new topic from the old positions: records below them skipped."""
    send(broker, topic, (event(i) for i in range(10)))
    src = _source(broker, topic, {})
    src.start()
    try:
        assert len(_read_all(src)) == 10
        assert src.ctx.positions.anchored == {}  # nothing committed inside the rebalance
        recorded = src.extra_positions({(topic, 0): 9})[(topic, TOPIC_IDENTITY)]
        assert recorded == src._topic_identity() and recorded > 0
        src.committed({(topic, 0): 9})
        assert src.extra_positions({(topic, 0): 10}) == {}  # recorded with that commit
    finally:
        src.close()
    other = _source(broker, topic, {(topic, 0): 2, (topic, TOPIC_IDENTITY): recorded ^ 1})  # another topic's
    other.start()
    try:
        with pytest.raises(SourceError, match=rf"topic {topic}: this job's positions are of another topic of that name"):
            _read_all(other, timeout=20)
    finally:
        other.close()


def test_an_unreadable_record_held_back_by_kafka_python_survives_a_keepalive(broker, topic):
    """kafka-python holds a parse error for its next poll when the same poll returned another
    partition's records first; the job's keepalive (a poll with every partition paused, while the
    engines are full) dropped it, and the poll after that spun forever at 100 % CPU on the dead
    parse. The keepalive handles it now: the record becomes its row, and reading goes on."""
    import threading

    _send_to_partitions(broker, topic, range(30), 1)  # partition 0: 30 readable records
    send_with_a_corrupt_header(broker, topic, [(b"bad", b'{"id": "bad"}', True)], partition=1)
    src = _source(broker, topic, {})
    src.start()
    rows: list = []
    try:
        for _ in range(40):  # reads with keepalives in between (as while the engines are full)
            src._last_poll = 0.0
            src.keepalive()
            done = threading.Event()

            def read():
                batch = src.poll(500, 200)
                rows.extend(batch.to_pylist() if batch is not None else [])
                done.set()

            threading.Thread(target=read, daemon=True).start()
            assert done.wait(30), "a poll spun on a dead parse"
            if len({(r["partition"], r["offset"]) for r in rows}) == 31:
                break
    finally:
        src.close()
    got = {(r["partition"], r["offset"]): r["source_change"] for r in rows}
    assert got.get((1, 0)) == "unreadable" and sum(1 for (p, _) in got if p == 0) == 30, got


def test_end_offsets_are_read_past_an_unreadable_oldest_record(broker, topic):
    """start_from latest reads each new partition's end from a fetch of its beginning: an
    unreadable record there raised CorruptRecordError out of it (the job failed at every start)."""
    send_with_a_corrupt_header(broker, topic, [(b"bad", b'{"id": "bad"}', True), (b"k", b'{"id": "ok"}', False)],
                               partition=1)  # fmt: skip
    ends = kafka_end_offsets(broker.bootstrap_servers, topic)
    assert ends[(topic, 1)] == 2 and ends[(topic, 0)] == 0
