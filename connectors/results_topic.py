"""Results to Kafka (`sink.topic`): every committed result and dead letter, published once, after its commit.

    publish(results, dead, positions)    after the sink committed these rows (stored form: encrypted
                                         columns stay encrypted): one message per row, flushed
                                         (acks=all); returns the marks for the next commit
    resume(sink, committed)              after a (re)start: rows committed but not known published
                                         are looked up in the topic and only the missing ones sent

Exactly once (docs/exactly-once.md, "Results to Kafka"), without trusting the broker's
transactions: every message carries its row's source position in headers, and the writer records
two marks per source partition in the Delta log, riding on its next commit like the source
positions themselves:

    tidegate/<job>/topic/<name>/<source topic>/<p>/published   the source offset published through
    tidegate/<job>/topic/<name>/<source topic>/<p>/scan_from   the topic offset after which this
                                                               partition's unrecorded messages lie

The rows of source partition p go to topic partition p mod N (keyed by id), so one offset bounds
that partition's messages. On resume, rows above `published` are candidates; the topic partition
is read from `scan_from` to its end (read_committed) and the candidates whose positions are there
are not sent again. A kill between the commit and the publish, or in the middle of one, therefore
neither loses nor repeats a row. With `transactional: true` each publish is one Kafka transaction
too, so read_committed consumers never see a half-published commit on brokers that implement them.

Messages: key = id (UTF-8; its SHA-256 when the id alone is over max_message_bytes); value = the row (JSON object, or Avro in the Confluent wire format:
a union of the result and dead-letter records); headers run_id, status ("ok" | "flagged" |
"dead_letter"), error_class, and tidegate.source_topic / .source_partition / .source_offset.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import pyarrow as pa

from connectors.schema_registry import open_registry
from schemas.errors import SinkError
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
H_TOPIC, H_PARTITION, H_OFFSET = "tidegate.source_topic", "tidegate.source_partition", "tidegate.source_offset"
H_OMITTED = "tidegate.omitted"  # columns left out (null) because the row's message was over max_message_bytes
# What identifies a row and says what became of it: never left out of a message.
_NEVER_OMITTED = frozenset({"id", "status", "stage", "error_class", "source_topic", "source_partition",
                            "source_offset", "run_id", "tenant"})  # fmt: skip
# Reading the topic back at a restart fails the writer's resume when for this long no record came,
# no position moved and no partition answered its first fetch, or one is below the end offset the
# broker reports (the broker is gone, a partition has no leader).
_SCAN_STALL_S = 120.0
# ... and ends when the partitions are below their fetch high watermark only, with no progress for
# this long: read_committed stops at another producer's open transaction, whose records this read
# cannot see yet (nor could the resume's ListOffsets end, which is that last stable offset).
_SCAN_OPEN_TRANSACTION_S = 30.0
_RECORD_OVERHEAD = 128  # a record's own framing in its batch, and the batch's header, with room to spare


def _size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    return _RECORD_OVERHEAD + len(key or b"") + len(value) + sum(len(k) + len(v) for k, v in headers)


def _json_value(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode("ascii")  # encrypted columns and raw bytes: as stored
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return str(v)


class ResultsTopic:
    """The publisher of sink.topic; lives in the commit writer next to the sink (actors/writer.py)."""

    def __init__(self, spec: JobSpec, results_schema: pa.Schema, dead_schema: pa.Schema):
        self.settings = spec.sink.topic
        assert self.settings is not None
        self.job = spec.name
        self.topic = self.settings.name
        self.brokers, self.security = spec.topic_client_settings()
        include = self.settings.include
        known = set(results_schema.names) | set(dead_schema.names)
        if include is not None:
            unknown = sorted(set(include) - known)
            if unknown:
                raise SinkError(f"sink.topic.include: no such column: {', '.join(unknown)}")
        self.results_columns = [c for c in results_schema.names if include is None or c in include]
        self.dead_columns = [c for c in dead_schema.names if include is None or c in include]
        self.results_schema, self.dead_schema = results_schema, dead_schema
        self._encode_result = self._encode_dead = None
        self.producer = None
        self.partitions = 0
        self._next_offset: dict[int, int] = {}  # topic partition -> after the last message we delivered there

    # -- setup -------------------------------------------------------------------------------------

    def _client_config(self) -> dict[str, Any]:
        config = self.security.client_config()
        config["bootstrap_servers"] = self.brokers
        return config

    def open(self) -> None:
        from kafka import KafkaProducer

        from connectors.kafka import try_create_topic

        failed = try_create_topic(self.brokers, self.topic, self.settings.partitions)
        if failed:  # the metadata check below says whether it exists
            log.info("sink.topic %s: not created (%s); expecting it to exist", self.topic, failed)
        config = self._client_config()
        config.update(acks="all", enable_idempotence=True, linger_ms=5, max_request_size=16 * 2**20)
        if self.settings.transactional:
            # One id per job and topic: a restarted writer fences the old one and aborts what it left open.
            config["transactional_id"] = f"tidegate-{self.job}-{self.topic}"
        self.producer = KafkaProducer(**config)
        if self.settings.transactional:
            self.producer.init_transactions()
        deadline = time.monotonic() + 30
        parts = self.producer.partitions_for(self.topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = self.producer.partitions_for(self.topic)
        if not parts:
            raise SinkError(f"sink.topic {self.topic!r}: no partitions known (metadata)")
        self.partitions = len(parts)
        self._encoders()

    def _encoders(self) -> None:
        if self.settings.format == "json":
            def encoder(columns: list[str]):
                def encode(row: dict) -> bytes:
                    return json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False,
                                      separators=(",", ":"), default=_json_value).encode("utf-8")  # fmt: skip
                return encode

            self._encode_result = encoder(self.results_columns)
            self._encode_dead = encoder(self.dead_columns)
            return
        import fastavro

        from connectors.avro_rows import avro_record, confluent_encoder

        result = avro_record("Result", self.results_schema, self.results_columns)
        dead = avro_record("DeadLetter", self.dead_schema, self.dead_columns)
        schema = [result, dead]
        namespace = "tidegate." + "".join(ch if ch.isalnum() else "_" for ch in self.job)
        schema = [{**s, "namespace": namespace} for s in schema]
        schema_id = open_registry(self.settings.schema_registry).id_of(f"{self.topic}-value", schema)
        parsed = fastavro.parse_schema(schema)
        self._encode_result = confluent_encoder(parsed, schema_id, f"{namespace}.Result", self.results_columns)
        self._encode_dead = confluent_encoder(parsed, schema_id, f"{namespace}.DeadLetter", self.dead_columns)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
            self.producer = None

    # -- marks -------------------------------------------------------------------------------------

    def mark_names(self, tp: TopicPartition) -> tuple[str, str]:
        base = f"tidegate/{self.job}/topic/{self.topic}/{tp[0]}/{tp[1]}"
        return f"{base}/published", f"{base}/scan_from"

    def route(self, tp: TopicPartition) -> int:
        return tp[1] % self.partitions

    # -- publish -----------------------------------------------------------------------------------

    def _messages(self, results: pa.Table, dead: pa.Table, keep: Mapping[TopicPartition, set[int]] | None = None,
                  also_dead: pa.Table | None = None):  # fmt: skip
        """(tp, source offset, key, value, headers) per row, in source-offset order per partition."""
        out = []
        tables = [(results, self._encode_result, self.results_columns, False),
                  (dead, self._encode_dead, self.dead_columns, True)]  # fmt: skip
        if also_dead is not None:
            tables.append((also_dead, self._encode_dead, self.dead_columns, True))
        for table, encode, columns, is_dead in tables:
            if table.num_rows == 0:
                continue
            for row in table.to_pylist():
                tp = (row["source_topic"], row["source_partition"])
                if keep is not None and row["source_offset"] not in keep.get(tp, ()):
                    continue
                status = "dead_letter" if is_dead else (row.get("status") or "ok")
                headers = [("run_id", (row.get("run_id") or "").encode()), ("status", status.encode()),
                           ("error_class", (row.get("error_class") or "").encode() if is_dead else b""),
                           (H_TOPIC, tp[0].encode()), (H_PARTITION, str(tp[1]).encode()),
                           (H_OFFSET, str(row["source_offset"]).encode())]  # fmt: skip
                key = row["id"].encode("utf-8") if row.get("id") is not None else None
                value = encode(row)
                if _size(key, value, headers) > self.settings.max_message_bytes:
                    key, value, omitted = self._shrunk(row, encode, columns, key, headers)
                    headers.append((H_OMITTED, ",".join(omitted).encode()))
                    log.warning("topic %s: the row at %s/%d/%d is over sink.topic.max_message_bytes (%d); published "
                                "without %s (the tables hold it whole)", self.topic, tp[0], tp[1], row["source_offset"],
                                self.settings.max_message_bytes, ", ".join(omitted))  # fmt: skip
                out.append((tp, row["source_offset"], key, value, headers))
        out.sort(key=lambda m: (m[0], m[1]))
        return out

    def _shrunk(self, row: dict, encode, columns: list[str], key: bytes | None,
                headers: list) -> tuple[bytes | None, bytes, list[str]]:  # fmt: skip
        """The row's message without its largest published columns, largest first, until it fits
        max_message_bytes; the identifying columns are kept, unless the id itself is what is too
        large (an event's id is the producer's): then it is left out too, and the key is its
        SHA-256 (hex). Returns (key, value, omitted)."""
        sizes = {c: len(json.dumps(row.get(c), default=_json_value)) for c in columns
                 if c not in _NEVER_OMITTED and row.get(c) is not None}  # fmt: skip
        omitted: list[str] = []
        thinner = dict(row)
        # headers will carry tidegate.omitted too: count a name list as long as all candidates'
        budget = self.settings.max_message_bytes - len(H_OMITTED) - sum(len(c) + 1 for c in sizes) - len("id,")
        bare = encode({**row, **{c: None for c in sizes}})
        if _size(key, bare, headers) > budget and row.get("id") is not None:  # the id is what is too large
            import hashlib

            key = hashlib.sha256(key or b"").hexdigest().encode()
            thinner["id"] = None
            omitted.append("id")
        value = encode(thinner)
        for c in sorted(sizes, key=lambda c: (-sizes[c], c)):
            if _size(key, value, headers) <= budget:
                break
            thinner[c] = None
            omitted.append(c)
            value = encode(thinner)
        return key, value, sorted(omitted)

    def publish(self, results: pa.Table, dead: pa.Table, positions: Mapping[TopicPartition, int],
                keep: Mapping[TopicPartition, set[int]] | None = None, also_dead: pa.Table | None = None,
                ) -> tuple[int, dict[TopicPartition, dict[str, int]]]:  # fmt: skip
        """Send these committed rows (all of them, or only the `keep` offsets) and wait for the
        broker; returns (messages sent, the marks to record with the next commit). Raises SinkError
        if the broker does not take them (the job stops; the restart publishes what is missing).
        also_dead: dead letters committed earlier that these positions now cover (a repair window)."""
        from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

        messages = self._messages(results, dead, keep, also_dead)
        tx = self.settings.transactional and bool(messages)
        try:
            if tx:
                self.producer.begin_transaction()
            futures = [
                (self.route(tp), self.producer.send(self.topic, key=key, value=value, headers=headers,
                                                    partition=self.route(tp)))
                for tp, _, key, value, headers in messages
            ]  # fmt: skip
            self.producer.flush()
            for k, fut in futures:
                md = fut.get(timeout=60)
                self._next_offset[k] = max(self._next_offset.get(k, 0), md.offset + 1)
            if tx:
                self.producer.commit_transaction()
        except (MessageSizeTooLargeError, RecordListTooLargeError) as e:
            raise SinkError(f"publishing to topic {self.topic!r} failed: the broker refused a message as too large "
                            f"({type(e).__name__}): set sink.topic.max_message_bytes below the topic's "
                            "max.message.bytes") from None  # fmt: skip
        except KafkaError as e:
            raise SinkError(f"publishing to topic {self.topic!r} failed: {type(e).__name__}: {e}") from None
        marks: dict[TopicPartition, dict[str, int]] = {}
        for tp, last in positions.items():
            published, scan_from = self.mark_names(tp)
            marks[tp] = {published: last}
            nxt = self._next_offset.get(self.route(tp))
            if nxt is not None:
                marks[tp][scan_from] = nxt
        return len(messages), marks

    # -- resume ------------------------------------------------------------------------------------

    def resume(self, sink: Any, committed: Mapping[TopicPartition, int | None]
               ) -> tuple[int, dict[TopicPartition, dict[str, int]]]:  # fmt: skip
        """Publish the committed rows of these partitions that the topic does not hold yet.
        Returns (rows sent, marks for the next commit)."""
        names = {tp: self.mark_names(tp) for tp, c in committed.items() if c is not None}
        recorded = sink.read_marks([n for pair in names.values() for n in pair]) if names else {}
        todo: dict[TopicPartition, tuple[pa.Table, pa.Table, set[int]]] = {}
        scans: dict[int, int] = {}  # topic partition -> offset to read from
        for tp, (published_name, scan_name) in names.items():
            low = recorded.get(published_name)
            low = -1 if low is None else low
            if committed[tp] <= low:
                continue
            results, dead = sink.rows_above(tp, low, committed[tp])
            want = set(results.column("source_offset").to_pylist()) | set(dead.column("source_offset").to_pylist())
            todo[tp] = (results, dead, want)
            if want:
                k = self.route(tp)
                scans[k] = min(scans.get(k, 1 << 62), recorded.get(scan_name) or 0)
        seen = self._published_offsets(scans, set(todo)) if scans else {}
        sent, marks = 0, {}
        for tp, (results, dead, want) in todo.items():
            missing = want - seen.get(tp, set())
            if want:
                log.info("topic %s, source partition %s: %d committed row(s) above the publish mark, %d already "
                         "in the topic, %d to send", self.topic, tp, len(want), len(want) - len(missing), len(missing))  # fmt: skip
            n, tp_marks = self.publish(results, dead, {tp: committed[tp]}, keep={tp: missing})
            marks.update(tp_marks)
            sent += n
        return sent, marks

    def _published_offsets(self, scans: Mapping[int, int], tps: set[TopicPartition]) -> dict[TopicPartition, set[int]]:
        """Source offsets of `tps` found in the topic partitions `scans` names, each read from its
        offset to the end. The end is the high watermark of the partition's last fetch response
        (or the reported end offset, if higher: brokers such as tansu report wrong ones), and the
        read ends once every partition has answered a fetch, none is below its end, and no record
        came for sink.topic.scan_idle_ms. Before stop 45 idleness counted from the start: a first
        fetch slower than scan_idle_ms (a busy broker) ended the read with nothing seen, and every
        row read back was sent again."""
        from kafka import KafkaConsumer, TopicPartition as KTP

        config = self._client_config()
        config.update(enable_auto_commit=False, group_id=None, isolation_level="read_committed",
                      auto_offset_reset="earliest",  # retention past scan_from: read what is left, not jump to the end
                      client_id=f"tidegate-scan-{uuid.uuid4().hex[:8]}")  # fmt: skip
        consumer = KafkaConsumer(**config)
        ktps = [KTP(self.topic, k) for k in sorted(scans)]
        wanted = {(tp[0].encode(), str(tp[1]).encode()): tp for tp in tps}
        seen: dict[TopicPartition, set[int]] = {}
        try:
            consumer.assign(ktps)
            for ktp in ktps:
                consumer.seek(ktp, scans[ktp.partition])
            try:
                ends = consumer.end_offsets(ktps)
            except Exception:  # noqa: BLE001 - end offsets are only a hint here
                ends = {}
            idle_since = progress_at = time.monotonic()
            answered, positions = 0, None
            while True:
                batch = consumer.poll(timeout_ms=200)
                if any(batch.values()):
                    idle_since = progress_at = time.monotonic()
                for ktp, records in batch.items():
                    for r in records:
                        h = dict(r.headers or [])
                        tp = wanted.get((h.get(H_TOPIC), h.get(H_PARTITION)))
                        if tp is not None:
                            seen.setdefault(tp, set()).add(int(h[H_OFFSET]))
                        self._next_offset[ktp.partition] = max(self._next_offset.get(ktp.partition, 0), r.offset + 1)
                highwater = {k: consumer.highwater(k) for k in ktps}
                unanswered = [k for k in ktps if highwater[k] is None]
                now_at = [consumer.position(k) for k in ktps]  # (aborted records advance it, none returned)
                if len(ktps) - len(unanswered) > answered or now_at != positions:
                    answered, positions, progress_at = len(ktps) - len(unanswered), now_at, time.monotonic()
                if unanswered:  # idleness counts once every partition has answered a fetch
                    idle_since = time.monotonic()
                behind_end = [k for k, at in zip(ktps, now_at) if at < (ends.get(k) or 0)]
                behind = [k for k, at in zip(ktps, now_at) if at < max(ends.get(k) or 0, highwater[k] or 0)]
                stalled = time.monotonic() - progress_at
                if behind and not behind_end and not unanswered and stalled >= _SCAN_OPEN_TRANSACTION_S:
                    behind = []  # at their last stable offset: what read_committed can see now
                if (time.monotonic() - idle_since) * 1000 >= self.settings.scan_idle_ms and not behind and not unanswered:
                    if stalled >= _SCAN_OPEN_TRANSACTION_S:
                        log.info("topic %s: read back to the last stable offsets, short of the high watermarks (a "
                                 "transaction still open)", self.topic)  # fmt: skip
                    break
                if stalled > _SCAN_STALL_S and (behind_end or unanswered):
                    raise SinkError(f"sink.topic {self.topic!r}: reading partitions "
                                    f"{sorted({k.partition for k in behind_end + unanswered})} back to their end made no "
                                    f"progress for {_SCAN_STALL_S:.0f} s ({len(unanswered)} never answered a fetch)")  # fmt: skip
        finally:
            consumer.close()
        return seen
