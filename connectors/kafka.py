"""Kafka source: a topic's records as SOURCE_SCHEMA batches, read through a consumer group.

Positions come from the sink, not from Kafka: whenever the group gives this consumer partitions
it asks the job (`SourcePositions.resume`) where each stands and seeks there; before the group
takes partitions away it lets the job commit or drop its work on them (`release`). Kafka's group
offsets are written after each commit for lag tooling only (docs/exactly-once.md).

Rebalances (kafka-python 3): the rebalance listener runs on the consumer's IO thread, where no
blocking consumer call may run (they would wait for the IO thread itself). It is therefore an
AsyncConsumerRebalanceListener that hands `resume` / `release` (which wait for engines and Delta
commits) to a worker thread and awaits it, so heartbeats go on meanwhile. While it runs the job's
own thread is inside `poll`, so the job's state has one user at a time. Group offsets are
mirrored from the job's thread, in `poll`, never from inside a rebalance.

With no `bootstrap_servers` the source starts the embedded broker (connectors/broker.py) for
the run and stops it when closed (in memory, or durable in `embedded_data_dir`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import CorruptRecordError, KafkaConfigurationError, KafkaError
from kafka.future import Future
from kafka.net.selector import KernelEvent  # kafka-python 3's sleep on its IO loop (pinned 3.0.x)
from kafka.structs import OffsetAndMetadata

from connectors.source import (
    Lag, PartitionStatus, SourceContext, SourceStatus, identity_of, partition_lag, register_source,
)  # fmt: skip
from schemas.errors import PartitionFencedError, SourceError, SpecError, StageError
from schemas.records import SOURCE_SCHEMA
from schemas.spec import KafkaSourceSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


def client_config(settings: KafkaSourceSpec) -> dict[str, Any]:
    """kafka-python client settings from the spec: consumer_config, then the security settings
    (secrets read from the environment now). One order for every client Tidegate makes."""
    config = dict(settings.consumer_config)
    config.update(settings.security.client_config())
    return config


class _Listener(AsyncConsumerRebalanceListener):
    def __init__(self, source: KafkaSource):
        self.source = source

    async def on_partitions_revoked(self, revoked):
        tps = _tps(revoked)
        if set(revoked) & self.source.consumer.assignment():
            # Eager rebalancing: the partitions stay in assignment() with their old positions until
            # the join ends (on_partitions_assigned), while the work on them is dropped: drained()
            # must not read them as consumed meanwhile (before stop 44 --until-drained could end
            # there). Under cooperative rebalancing they have left assignment() by now.
            self.source._settled = False
        if tps and not self.source.closing:  # on close the job committed what it could already
            log.info("partitions revoked: %s", tps)
            await self.source.off_loop(self.source.ctx.positions.release, tps, False, self.source.spec.revoke_timeout_s)

    async def on_partitions_lost(self, lost):
        tps = _tps(lost)
        if tps and not self.source.closing:
            log.warning("partitions lost (the group moved on without this consumer): %s", tps)
            await self.source.off_loop(self.source.ctx.positions.release, tps, True)

    async def on_partitions_assigned(self, assigned):
        tps = _tps(assigned)
        log.info("partitions assigned: %s", tps)
        if tps:
            positions = await self.source.off_loop(self.source.start_positions, tps)
            self.source.seek_to(tps, positions)  # seeks only set state: fine on the IO thread
        self.source._settled = True  # the join has ended (an empty assignment too)


def _tps(ktps) -> list[TopicPartition]:
    return sorted((tp.topic, tp.partition) for tp in ktps)


# Position "partition" TOPIC_IDENTITY (-2): which topic the positions are of (63 bits of a hash of
# its Kafka topic id, KIP-516), recorded once, like the Delta source's table identity. A topic
# deleted and created again under the same name starts its offsets at 0 again: without this the
# job read it from its old positions on (skipping records, or from the start after a reset).
TOPIC_IDENTITY = -2


def topic_identity(topic_id) -> int | None:
    """identity_of a Kafka topic id (a UUID, or its text); None for none (a broker without topic
    ids answers the zero UUID)."""
    text = str(topic_id or "").lower()
    return None if set(text.replace("-", "")) <= {"0"} else identity_of(text)


# A poll at least this often while the job reads nothing (KafkaSource.keepalive).
KEEPALIVE_S = 5.0
# start_from latest: tries to record where new partitions start (KafkaSource.start_positions).
ANCHOR_ATTEMPTS = 3


@register_source
class KafkaSource:
    kind = "kafka"
    settings = KafkaSourceSpec
    bounded = False
    total_rows = None  # a topic has no end

    def __init__(self, settings: KafkaSourceSpec, ctx: SourceContext):
        self.spec = settings
        self.ctx = ctx
        self.topic = settings.topic
        self.group_id = settings.group(ctx.job_name)
        self.consumer: KafkaConsumer | None = None
        self.broker = None  # the embedded broker this source started, if any
        self.closing = False
        self._to_mirror: dict[TopicPartition, int] = {}
        self._listener_error: BaseException | None = None
        self._last_poll = time.monotonic()  # of the consumer: kafka-python's max_poll_interval_ms clock
        # Records the client could not read, skipped by the last poll: (topic, partition, offset, kind),
        # handed out as rows of their own by the next poll (they come before anything later).
        self._unreadable: list[tuple[str, int, int, str]] = []
        self._settled = True  # False from an eager rebalance's revocation to its assignment (drained())
        self._identity_to_record: int | None = None  # the topic's identity, until a commit records it

    @property
    def bootstrap_servers(self) -> list[str]:
        if self.spec.bootstrap_servers:
            return self.spec.bootstrap_servers
        return [self.broker.bootstrap_servers] if self.broker is not None else []

    def check(self, required: Mapping[str, str]) -> None:
        pass  # events are checked one by one as they are decoded

    def start(self, metadata_timeout_s: float = 30.0) -> None:
        if not self.spec.bootstrap_servers:
            from connectors.broker import EmbeddedBroker

            self.broker = EmbeddedBroker(data_dir=self.spec.embedded_data_dir).start()
            log.info("embedded Kafka broker listening on %s", self.broker.bootstrap_servers)
        config = client_config(self.spec)
        # Records of aborted producer transactions are not requests (a transactional upstream job,
        # sink.topic transactional: true, that crashed mid-publish sends them again): skipped, as
        # Kafka Streams and Flink read (kafka-python's default is read_uncommitted). consumer_config
        # may say otherwise. (tansu, the embedded broker, shows aborted records either way.)
        config.setdefault("isolation_level", "read_committed")
        config.update(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            # Every assigned partition is sought explicitly (start_positions): the reset policy only
            # acts on a position that fell out of range (retention removed records past it while
            # the job was down). Then the oldest record kept, never the end: "latest" there would
            # skip every retained record silently (and on tansu re-reads old ones).
            auto_offset_reset="earliest",
            session_timeout_ms=self.spec.session_timeout_ms,
            heartbeat_interval_ms=self.spec.heartbeat_interval_ms,
            # Oversized records must reach us to be dead-lettered, not stall the partition.
            max_partition_fetch_bytes=max(1_048_576, self.spec.max_message_bytes * 2),
            fetch_max_bytes=max(52_428_800, self.spec.max_message_bytes * 4),
        )
        self.consumer = self._connect(config)
        deadline = time.monotonic() + metadata_timeout_s
        while self.consumer.partitions_for_topic(self.topic) is None:
            if time.monotonic() > deadline:
                self.close()
                raise SourceError(f"Kafka topic {self.topic!r} does not exist (waited {metadata_timeout_s:.0f}s)")
            time.sleep(0.2)
        self.consumer.subscribe([self.topic], listener=_Listener(self))

    def _connect(self, config: dict[str, Any]) -> KafkaConsumer:
        """A consumer, retried with backoff (0.5 s doubling to 5 s) for source.kafka.connect_timeout_s:
        brokers that come up a little after the job are fine, ones that never do are one clear error."""
        deadline = time.monotonic() + self.spec.connect_timeout_s
        wait, tries = 0.5, 0
        while True:
            tries += 1
            # One try lasts at most 5 s and never past the deadline: kafka-python's own bootstrap
            # would otherwise wait 30 s in a try, whatever the spec says, and say nothing meanwhile.
            try_ms = max(100, int(min(5.0, deadline - time.monotonic()) * 1000))
            try:
                return KafkaConsumer(**{**config, "bootstrap_timeout_ms": try_ms})
            except KafkaConfigurationError as e:  # a setting kafka-python refuses: no retry makes it right
                text = str(e)  # names the keys; a value it refuses is not quoted here
                what = text.split("Unrecognized configs:", 1)[1].strip() if "Unrecognized configs:" in text else None
                raise SpecError("source.kafka.consumer_config: " + (f"not kafka-python KafkaConsumer settings: {what}"
                                if what else "kafka-python refuses one of its settings")) from None  # fmt: skip
            except KafkaError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SourceError(
                        f"no Kafka broker reachable at {','.join(self.bootstrap_servers)} "
                        f"(tried {tries} time(s) in source.kafka.connect_timeout_s={self.spec.connect_timeout_s:g}s): "
                        f"{type(e).__name__}"
                    ) from None
                log.warning("no Kafka broker reachable yet (%s); trying again in %.1fs", type(e).__name__, min(wait, left))
                time.sleep(min(wait, left))
                wait = min(wait * 2, 5.0)

    # -- rebalances ------------------------------------------------------------------------------

    async def off_loop(self, fn, *args):
        """Run fn(*args) on a worker thread and await it from the consumer's IO loop."""
        future = Future()

        def work() -> None:
            try:
                future.success(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to poll(), which raises it
                self._listener_error = self._listener_error or e
                future.failure(e)

        threading.Thread(target=work, name="tidegate-rebalance", daemon=True).start()
        # Not `await future`: a Future resolved on another thread resumes its awaiter through the
        # loop's (not thread-safe) call_soon, at its next tick. Short sleeps on the loop notice it
        # within 20 ms, and heartbeats run in between.
        while not future.is_done:
            await KernelEvent("_sleep", 0.02)
        if future.exception is not None:
            raise future.exception
        return future.value

    def start_positions(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Where each partition stands in the sink (`SourcePositions.resume`). With `start_from:
        latest`, a partition with no position gets one: its end now, recorded by the job
        (`SourcePositions.anchor`, a commit of positions and no rows) before anything is read.
        Otherwise a job stopped before its first commit on the partition would start again at a
        later end and skip what came in between. Blocking: never on the consumer's IO thread."""
        identity_tp = (self.topic, TOPIC_IDENTITY)
        identity = self._topic_identity()
        for attempt in range(1, ANCHOR_ATTEMPTS + 1):
            positions = dict(self.ctx.positions.resume(tps + ([identity_tp] if identity is not None else [])))
            recorded = positions.pop(identity_tp, None)
            if identity is not None and recorded is not None and recorded != identity:
                embedded = "" if self.spec.bootstrap_servers else (
                    " The embedded broker keeps its topics only with source.kafka.embedded_data_dir: in memory, "
                    "each run's topic is a new one.")  # fmt: skip
                raise SourceError(
                    f"topic {self.topic}: this job's positions are of another topic of that name (its Kafka topic id "
                    "changed: it was deleted and created again). Reading on from them would skip or repeat records: "
                    "give the job new tables (sink.results, sink.dead_letter) or a new name to read the new topic "
                    "from its start." + embedded)  # fmt: skip
            new = [tp for tp in tps if positions.get(tp) is None]
            # Recorded with the next commit's positions (extra_positions), not by a commit of its own
            # here: this runs inside the group's rebalance, which a commit's time holds up.
            self._identity_to_record = identity if identity is not None and recorded is None else None
            latest = self.spec.start_from == "latest" and new
            anchors = {tp: end - 1 for tp, end in self._ends(new).items()} if latest else {}
            if not anchors:
                return positions
            anchor = getattr(self.ctx.positions, "anchor", None)
            try:
                if anchor is not None:
                    anchor(anchors)
            except (PartitionFencedError, StageError) as e:
                # Another member recorded a position first (two rebalances raced), or the commit
                # writer died (Ray restarts it; resume waits for it): read the positions again.
                if attempt == ANCHOR_ATTEMPTS:
                    raise
                log.warning("start_from latest: recording where %s start failed (%s); reading the positions again",
                            [f"{t}/{p}" for t, p in new], type(e).__name__)  # fmt: skip
                continue
            positions.update(anchors)
            log.info("start_from latest: partitions %s start at their ends %s",
                     [f"{t}/{p}" for t, p in new], [anchors[tp] + 1 for tp in new])  # fmt: skip
            return positions
        raise AssertionError("unreachable")

    def _topic_identity(self) -> int | None:
        """The topic's identity (topic_identity) from the consumer's metadata (kafka-python 3's
        ClusterMetadata.topic_id, pinned 3.0.x); None where the broker gives no topic id."""
        cluster = getattr(getattr(self.consumer, "_client", None), "cluster", None)
        topic_id = getattr(cluster, "topic_id", None)
        return topic_identity(topic_id(self.topic)) if callable(topic_id) else None

    def _ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """End offsets read from fetch responses by a consumer of its own (no group), never
        ListOffsets: tansu answers that wrongly (kafka_end_offsets), which made `seek_to_end` land
        on old records."""
        ends = kafka_end_offsets(self.bootstrap_servers, self.topic, client_config(self.spec),
                                 timeout_s=max(10.0, self.spec.connect_timeout_s),
                                 partitions=[p for _, p in tps])  # fmt: skip
        unknown = [f"{t}/{p}" for t, p in tps if ends.get((t, p)) is None]
        if unknown:
            raise SourceError(f"source.kafka.start_from: latest: the end offset of partition(s) {unknown} "
                              "could not be read from the brokers")  # fmt: skip
        return {tp: ends[tp] for tp in tps}

    def seek_to(self, tps: list[TopicPartition], positions: Mapping[TopicPartition, int | None]) -> None:
        """Seek to just after each partition's position; none (start_from: earliest): its beginning."""
        owned = self.consumer.assignment()
        sought = set(tps)  # an unreadable record not handed out yet is met again from the new position
        self._unreadable = [u for u in self._unreadable if (u[0], u[1]) not in sought]
        for tp in tps:
            ktp = KafkaTP(*tp)
            if ktp not in owned:
                continue
            last = positions.get(tp)
            if last is not None:
                self.consumer.seek(ktp, last + 1)
            else:
                self.consumer.seek_to_beginning(ktp)
        log.info("resuming from Delta positions %s", {f"{t}/{p}": positions.get((t, p)) for t, p in tps})

    def reseek(self, tps: Iterable[TopicPartition]) -> None:
        """Seek partitions back to the sink's positions (after a fence or dropped work)."""
        owned = self.assignment()
        tps = [tp for tp in tps if tp in owned]
        if tps:
            self.seek_to(tps, self.start_positions(tps))

    # -- reading ---------------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_ms: int) -> pa.Table | None:
        """Up to `max_records` records as a SOURCE_SCHEMA table, or None when nothing arrived."""
        self._mirror_positions()
        if self._unreadable:  # before anything polled now: each is at its partition's position, the rest after it
            return self._unreadable_rows()
        polled = self._consumer_poll(timeout_ms, max_records)
        if not polled:
            return None
        now = time.monotonic_ns()
        topics, partitions, offsets, keys, values, stamps = [], [], [], [], [], []
        for ktp, records in polled.items():  # column by column: a list comprehension each, no per-field appends
            topics += [ktp.topic] * len(records)
            partitions += [ktp.partition] * len(records)
            offsets += [r.offset for r in records]
            keys += [r.key for r in records]
            values += [r.value for r in records]
            stamps += [r.timestamp for r in records]
        n = len(offsets)
        return pa.Table.from_arrays(
            [pa.array(topics, pa.string()), pa.array(partitions, pa.int32()), pa.array(offsets, pa.int64()),
             pa.array(keys, pa.binary()), pa.array(values, pa.binary()), pa.array(stamps, pa.int64()),
             pa.repeat(pa.scalar(now, pa.int64()), n), pa.nulls(n, pa.string())],
            schema=SOURCE_SCHEMA,
        )  # fmt: skip

    def _consumer_poll(self, timeout_ms: int, max_records: int) -> dict:
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as e:
            if self._listener_error is not None:  # what our rebalance listener raised, as it was
                err, self._listener_error = self._listener_error, None
                raise err from None
            if isinstance(e, CorruptRecordError):
                self._skip_unreadable(e)
                return {}
            raise
        finally:
            self._last_poll = time.monotonic()
        if self._listener_error is not None:
            err, self._listener_error = self._listener_error, None
            raise err
        return polled

    def _skip_unreadable(self, error: CorruptRecordError) -> None:
        """A record kafka-python cannot parse (a header name that is not UTF-8, a failed CRC):
        before stop 44 it stopped the job, at the same offset on every restart. It becomes a row of
        its own (source_change "unreadable", no key or value: dead-lettered at the source stage)
        and the partition is read on from the next offset.

        Which partition: kafka-python's exception does not say, and its fetcher keeps the dead
        parse in `_next_partition_records` (private; kafka-python 3.0.x is pinned), whose next
        poll spins forever at 100 % CPU unless the position moves past it: the seek below does.
        kafka-python parses a producer batch from its start, so the records after a corrupt one
        in the same batch cannot be read either: each comes here in turn ("unreadable_batch")."""
        part = _dead_parse(self.consumer)
        ktp = getattr(part, "topic_partition", None)
        if ktp is None or ktp not in self.consumer.assignment():
            # Not a record's parse: the broker's own CORRUPT_MESSAGE for a fetch, or a partition
            # kafka-python does not name. Nothing to skip safely.
            raise SourceError(f"topic {self.topic}: a record the Kafka client cannot read ({type(error).__name__}), "
                              "in a partition it does not name") from None  # fmt: skip
        offset = self.consumer.position(ktp)
        kind = "unreadable" if getattr(part, "next_fetch_offset", offset) >= offset else "unreadable_batch"
        log.warning("partition %d offset %d: the Kafka client cannot read this record (%s%s): dead-lettered",
                    ktp.partition, offset, type(error).__name__,
                    "" if kind == "unreadable" else ", after an unreadable one in its batch")  # fmt: skip
        self.consumer.seek(ktp, offset + 1)
        self._unreadable.append((ktp.topic, ktp.partition, offset, kind))

    def _unreadable_rows(self) -> pa.Table | None:
        owned = self.assignment()  # a partition revoked since: its new owner meets the record itself
        rows, self._unreadable = [u for u in self._unreadable if (u[0], u[1]) in owned], []
        n = len(rows)
        if not n:
            return None
        return pa.Table.from_arrays(
            [pa.array([r[0] for r in rows], pa.string()), pa.array([r[1] for r in rows], pa.int32()),
             pa.array([r[2] for r in rows], pa.int64()), pa.nulls(n, pa.binary()), pa.nulls(n, pa.binary()),
             pa.nulls(n, pa.int64()), pa.repeat(pa.scalar(time.monotonic_ns(), pa.int64()), n),
             pa.array([r[3] for r in rows], pa.string())],
            schema=SOURCE_SCHEMA,
        )  # fmt: skip

    def keepalive(self) -> None:
        """Keep this consumer in its group while the job reads nothing (its engines or its sink
        have no room for more rows). kafka-python's heartbeat thread leaves the group when poll()
        is not called within max_poll_interval_ms (default 300 s): the partitions would be lost,
        the work in flight dropped and read again, and whatever holds the engines that long (a
        row that hangs one, isolated alone for up to pool.batch_timeout_s, 600 s by default) would
        do it again, forever. Every few seconds without a poll, a poll with every partition paused:
        the group's business (heartbeats, a rebalance's callbacks) and no record, no position moved
        (kafka-python keeps records fetched for a paused partition until it is resumed)."""
        if self.consumer is None:
            return
        # Also well within the session: after a rebalance in the background, heartbeats start
        # again only once a poll has seen the join end.
        config = self.consumer.config
        every = min(KEEPALIVE_S, config["max_poll_interval_ms"] / 4000, config["session_timeout_ms"] / 3000)
        if time.monotonic() - self._last_poll < every:
            return
        # A parse error kafka-python holds for its next poll (it returned other partitions' records
        # first) is dropped by a poll with that partition paused, and the poll after it then spins
        # on the dead parse forever: handled now, as a poll would have raised it.
        fetcher = getattr(self.consumer, "_fetcher", None)
        held = getattr(fetcher, "_next_in_line_exception_metadata", None)
        if held is not None and isinstance(held.exception, CorruptRecordError):
            fetcher._next_in_line_exception_metadata = None
            if held.partition in self.consumer.assignment() and self.consumer.position(held.partition) == held.fetched_offset:
                self._skip_unreadable(held.exception)
        paused = self.consumer.assignment()
        self.consumer.pause(*paused)
        try:
            # A partition assigned during this poll is not paused: what it returned is read again.
            for ktp, records in self._consumer_poll(0, 1).items():
                self.consumer.seek(ktp, records[0].offset)
        finally:
            owned = self.consumer.assignment()
            self.consumer.resume(*(tp for tp in paused if tp in owned))

    def assignment(self) -> set[TopicPartition]:
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def drained(self) -> bool:
        """True when every assigned partition has been read up to its high watermark.

        Uses the high watermark from fetch responses: some brokers (tansu) answer ListOffsets
        (end_offsets) wrongly, fetch responses are right.
        """
        assigned = self.consumer.assignment()
        # Not while a rebalance is between its revocation and its assignment; nor while an
        # unreadable record's row is still to be handed out.
        if not assigned or not self._settled or self._unreadable:
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

    def lag(self, committed: Mapping[TopicPartition, int | None]) -> Lag:
        ends = self.end_offsets()
        return Lag(partitions=partition_lag(ends, committed))

    # -- positions -------------------------------------------------------------------------------

    def extra_positions(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The topic's identity, with the commits until one has landed, when the tables have none
        (start_positions): two replicas racing to record it fence one of them once, which reads the
        positions again and finds it."""
        identity = self._identity_to_record
        return {(self.topic, TOPIC_IDENTITY): identity} if identity is not None and positions else {}

    def committed(self, positions: Mapping[TopicPartition, int]) -> None:
        """Mirror committed positions to the consumer group (for lag tools), from poll."""
        self._to_mirror.update(positions)
        self._identity_to_record = None  # a commit landed: with it, the identity

    def _mirror_positions(self, wait: bool = False) -> None:
        """Best effort (nothing reads these offsets back for correctness): not awaited while the
        job runs, awaited once when the source closes."""
        if not self._to_mirror:
            return
        owned = self.assignment()
        offsets = {KafkaTP(*tp): OffsetAndMetadata(last + 1, "", -1) for tp, last in self._to_mirror.items() if tp in owned}
        self._to_mirror = {}
        if not offsets:
            return
        if not wait:
            self.consumer.commit_async(offsets, callback=_log_mirror_failure)
            return
        try:
            self.consumer.commit(offsets)
        except KafkaError as e:
            _log_mirror_failure(offsets, e)

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        if self.consumer is not None:
            self.closing = True
            try:
                self._mirror_positions(wait=True)
                self.consumer.close(autocommit=False)
            except Exception as e:  # closing must never mask the real outcome
                log.warning("error closing the Kafka consumer: %s", e)
            self.consumer = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    # -- status ----------------------------------------------------------------------------------

    @classmethod
    def status(cls, settings: KafkaSourceSpec, job_name: str, stored) -> SourceStatus:
        """Partitions from the topic's metadata (or, without a broker, those the tables hold rows
        of), their committed positions from the sink, their ends from fetch high watermarks."""
        brokers = ",".join(settings.bootstrap_servers or ["(embedded)"])
        out = SourceStatus(
            {"kind": cls.kind, "topic": settings.topic, "bootstrap_servers": settings.bootstrap_servers},
            summary=f"kafka topic {settings.topic} @ {brokers}",
        )
        ends: dict[TopicPartition, int | None] = {}
        if not settings.bootstrap_servers:
            out.errors.append(
                "source.kafka.bootstrap_servers is empty: the job's embedded broker lives only while the job "
                "runs, so there are no end offsets (lag) to read"
            )
        else:
            try:
                ends = dict(kafka_end_offsets(settings.bootstrap_servers, settings.topic, client_config(settings)))
            except Exception as e:  # an unreachable broker must not hide the sink's side
                out.errors.append(f"Kafka end offsets unavailable: {e}")
        tps = sorted(ends) or [(settings.topic, p) for p in sorted(stored.partitions_seen(settings.topic))]
        positions = stored.read_positions(tps)
        for tp in tps:
            committed, dead = positions.get(tp, (None, None))
            out.partitions.append(PartitionStatus(tp[0], tp[1], committed, dead, end=ends.get(tp)))
        return out


def _log_mirror_failure(offsets, response) -> None:
    if isinstance(response, Exception):
        # During a rebalance the group refuses commits: expected, and the next commit mirrors again.
        level = logging.INFO if "Rebalance" in type(response).__name__ else logging.WARNING
        log.log(level, "could not mirror positions to the consumer group (harmless): %s", type(response).__name__)


def kafka_end_offsets(
    bootstrap: str | list[str],
    topic: str,
    consumer_config: Mapping[str, Any] | None = None,
    timeout_s: float = 10.0,
    partitions: Iterable[int] | None = None,
) -> dict[TopicPartition, int | None]:
    """End offset (high watermark) of every partition of `topic` (or of `partitions`), from topic
    metadata and fetches.

    Partitions come from the topic's metadata. The high watermark comes from a fetch response:
    the partitions are assigned (no group), sought to their beginning and polled (a small fetch,
    at most one record batch each). ListOffsets (`end_offsets`, `seek_to_end` + `position`) is not
    used: tansu answers it wrongly (measured: 1 for a partition holding 5 records). A partition
    whose watermark did not arrive within `timeout_s` maps to None.
    """
    config = dict(consumer_config or {})
    config.update(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=1024,  # the broker still returns one whole batch (KIP-74)
        max_poll_records=1,
        bootstrap_timeout_ms=int(timeout_s * 1000),
    )
    try:
        consumer = KafkaConsumer(**config)
    except KafkaError as e:
        raise SourceError(f"no Kafka broker reachable at {bootstrap}: {e}") from None
    try:
        deadline = time.monotonic() + timeout_s
        parts = consumer.partitions_for_topic(topic)
        while parts is None and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        if not parts:  # None: no metadata; empty: a broker that knows no partitions of it
            raise SourceError(f"Kafka topic {topic!r} does not exist (or no metadata within {timeout_s:.0f}s)")
        wanted = set(parts) if partitions is None else set(parts) & set(partitions)
        ktps = [KafkaTP(topic, p) for p in sorted(wanted)]
        consumer.assign(ktps)
        consumer.seek_to_beginning(*ktps)
        while time.monotonic() < deadline and any(consumer.highwater(k) is None for k in ktps):
            try:
                consumer.poll(timeout_ms=100, max_records=1)
            except CorruptRecordError:  # its fetch's high watermark is known; step past the record
                part = _dead_parse(consumer)
                if part is None:
                    raise
                consumer.seek(part.topic_partition, consumer.position(part.topic_partition) + 1)
        return {(topic, k.partition): consumer.highwater(k) for k in ktps}
    finally:
        consumer.close(autocommit=False)


def _dead_parse(consumer):
    """The partition records kafka-python's fetcher was parsing when a record failed to parse
    (its `_next_partition_records`, private: kafka-python 3.0.x is pinned), or None. Only a live
    one: a fetch the broker answered with an error (CORRUPT_MESSAGE) fails before it is parsed,
    and what is there then is an earlier partition's, finished (falsy)."""
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    return part if part else None


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


def try_create_topic(bootstrap_servers: str | list[str], topic: str, partitions: int) -> str | None:
    """create_topic, best effort: None once the topic exists, else the error's class name. The
    admin call is plaintext: on secured clusters creating topics is the operator's job."""
    try:
        create_topic(bootstrap_servers, topic, partitions)
        return None
    except Exception as e:  # noqa: BLE001 - the caller's next call says whether the topic is usable
        return type(e).__name__


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
