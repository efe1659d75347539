"""Kafka source: reads request events in batches of Arrow rows (SOURCE_SCHEMA).

Positions come from the sink, not from Kafka: on every assignment the source asks its
`resume_positions` callback (the Delta sink) where each partition stands and seeks there.
Kafka's group offsets are written after each Delta commit for lag tooling only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import pyarrow as pa
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from schemas.errors import SourceError
from schemas.records import SOURCE_SCHEMA
from schemas.spec import KafkaSourceSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
ResumeCallback = Callable[[list[TopicPartition]], Mapping[TopicPartition, int | None]]
RevokeCallback = Callable[[list[TopicPartition]], None]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource):
        self.source = source

    def on_partitions_revoked(self, revoked):
        if self.source.closing:  # the job committed what it could before closing
            return
        tps = sorted((tp.topic, tp.partition) for tp in revoked)
        if tps:
            log.info("partitions revoked: %s", tps)
            self.source.on_revoke(tps)

    def on_partitions_assigned(self, assigned):
        tps = sorted((tp.topic, tp.partition) for tp in assigned)
        log.info("partitions assigned: %s", tps)
        self.source._seek_to_resume(tps)


class KafkaSource:
    def __init__(
        self,
        spec: KafkaSourceSpec,
        bootstrap_servers: list[str],
        group_id: str,
        resume_positions: ResumeCallback,
        on_revoke: RevokeCallback,
    ):
        self.spec = spec
        self.topic = spec.topic
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.resume_positions = resume_positions
        self.on_revoke = on_revoke
        self.consumer: KafkaConsumer | None = None
        self.closing = False

    def start(self, metadata_timeout_s: float = 30.0) -> None:
        config = dict(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self.spec.start_from,
            session_timeout_ms=self.spec.session_timeout_ms,
            heartbeat_interval_ms=self.spec.heartbeat_interval_ms,
            # Oversized records must reach us to be dead-lettered, not stall the partition.
            max_partition_fetch_bytes=max(1_048_576, self.spec.max_message_bytes * 2),
            fetch_max_bytes=max(52_428_800, self.spec.max_message_bytes * 4),
        )
        config.update(self.spec.security.client_config())
        config.update(self.spec.consumer_config)
        try:
            self.consumer = KafkaConsumer(**config)
        except KafkaError as e:
            raise SourceError(f"no Kafka broker reachable at {','.join(self.bootstrap_servers)}: {e}") from None
        deadline = time.monotonic() + metadata_timeout_s
        while self.consumer.partitions_for_topic(self.topic) is None:
            if time.monotonic() > deadline:
                self.close()
                raise SourceError(f"Kafka topic {self.topic!r} does not exist (waited {metadata_timeout_s:.0f}s)")
            time.sleep(0.2)
        self.consumer.subscribe([self.topic], listener=_Listener(self))

    def _seek_to_resume(self, tps: list[TopicPartition]) -> None:
        positions = self.resume_positions(tps)
        for tp in tps:
            ktp = KafkaTP(*tp)
            last = positions.get(tp)
            if last is None:
                if self.spec.start_from == "earliest":
                    self.consumer.seek_to_beginning(ktp)
                else:
                    self.consumer.seek_to_end(ktp)
            else:
                self.consumer.seek(ktp, last + 1)
        log.info("resuming from Delta positions %s", {f"{t}/{p}": positions.get((t, p)) for t, p in tps})

    def reseek(self, tps: Iterable[TopicPartition]) -> None:
        """Seek partitions back to the sink's positions (after a fence or dropped work)."""
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        self._seek_to_resume([tp for tp in tps if tp in owned])

    def poll_batch(self, max_records: int, timeout_ms: int) -> pa.Table | None:
        """Up to `max_records` records as a SOURCE_SCHEMA table, or None when nothing arrived."""
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if not polled:
            return None
        now = time.monotonic_ns()
        cols: dict[str, list] = {name: [] for name in SOURCE_SCHEMA.names}
        for ktp, records in polled.items():
            for r in records:
                cols["topic"].append(ktp.topic)
                cols["partition"].append(ktp.partition)
                cols["offset"].append(r.offset)
                cols["key"].append(r.key)
                cols["value"].append(r.value)
                cols["timestamp_ms"].append(r.timestamp)
                cols["received_ns"].append(now)
                cols["source_change"].append(None)
        return pa.table(cols, schema=SOURCE_SCHEMA)

    # Kafka has no schema to check, no extra positions and no known total: the interface's no-ops.
    total_rows = None

    def check_columns(self, required: dict[str, str]) -> None:
        pass

    def extra_positions(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def drained(self) -> bool:
        """True when every assigned partition has been read up to its high watermark.

        Uses the high watermark from fetch responses: some brokers (tansu) answer ListOffsets
        (end_offsets) wrongly, fetch responses are right.
        """
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        for ktp in assigned:
            hw = self.consumer.highwater(ktp)
            if hw is None or self.consumer.position(ktp) < hw:
                return False
        return True

    def end_offsets(self) -> dict[TopicPartition, int]:
        """Fetch high watermark of each assigned partition the consumer has fetched from (for lag)."""
        out = {}
        for ktp in self.consumer.assignment():
            hw = self.consumer.highwater(ktp)
            if hw is not None:
                out[(ktp.topic, ktp.partition)] = hw
        return out

    def backlog(self) -> int | None:
        """Records in the assigned partitions not read yet (fetch high watermark - position)."""
        ends = self.end_offsets()
        if not ends:
            return None
        return sum(max(0, hw - self.consumer.position(KafkaTP(*tp))) for tp, hw in ends.items())

    def commit_offsets(self, positions: Mapping[TopicPartition, int]) -> None:
        """Best effort: mirror Delta positions into the consumer group for lag tools."""
        owned = self.assignment()
        offsets = {
            KafkaTP(*tp): OffsetAndMetadata(last + 1, "", -1) for tp, last in positions.items() if tp in owned
        }
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except KafkaError as e:
            log.warning("could not mirror positions to the consumer group (harmless): %s", e)

    def close(self) -> None:
        if self.consumer is None:
            return
        self.closing = True
        try:
            self.consumer.close(autocommit=False)
        except Exception as e:  # closing must never mask the real outcome
            log.warning("error closing the Kafka consumer: %s", e)
        self.consumer = None


def create_topic(bootstrap_servers: str | list[str], topic: str, partitions: int) -> None:
    """Create a topic if it does not exist (admin API)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def produce(bootstrap_servers: str | list[str], topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Send (key, value) records with acks=all; returns how many were sent."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", max_request_size=16 * 2**20)
    n = 0
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
            n += 1
        producer.flush()
    finally:
        producer.close()
    return n
