"""Dead-letter replay: the dead-letter table as a source, and a sink that writes replay results
back under the events' original positions, exactly once (protocol: docs/exactly-once.md, "Replay").

A replay `R` owns a fixed plan: the dead-letter rows marked `replayed_by = R` (marked before any
work, in one Delta commit). The plan's rows, in a fixed order, are the source:

    ReplaySource   SOURCE_SCHEMA rows: topic "dlq-replay/<R>", partition 0, offset = ordinal in the
                   plan, value = the original `raw` bytes
    ReplaySink     a DeltaSink whose positions are that pseudo partition (txn app id
                   tidegate/<job>/replay/dlq-replay/<R>/0): before each commit it rewrites the rows'
                   source_topic/partition/offset back to the original event's, so replayed results
                   sit where the event came from; the repair window is the plan ordinals of
                   dead-letter rows this replay already wrote (run_id = R)

so the ordinary job loop (jobs.pipeline.PipelineJob) runs a replay with the same guarantees as any
run: a crashed replay, rerun, resumes at its committed position and writes nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import QueryBuilder

from connectors.delta import DeltaSink
from connectors.source import Lag, SourceContext, SourceStatus, partition_lag
from schemas.records import SOURCE_SCHEMA

TopicPartition = tuple[str, int]
PLAN_ORDER = [("source_topic", "ascending"), ("source_partition", "ascending"), ("source_offset", "ascending"),
              ("run_id", "ascending"), ("failed_at", "ascending")]  # fmt: skip


def replay_topic(replay_id: str) -> str:
    return f"dlq-replay/{replay_id}"


class ReplaySource:
    """The plan's dead-letter rows as a source with one pseudo partition (the connectors.source.Source
    interface; built by the replay job, not named in specs)."""

    kind = "replay"
    bounded = True

    def __init__(self, plan: pa.Table, replay_id: str, ctx: SourceContext):
        self.plan = plan.sort_by(PLAN_ORDER)
        self.topic = replay_topic(replay_id)
        self.positions = ctx.positions
        self.total_rows: int | None = self.plan.num_rows
        self._next = 0

    def check(self, required: Mapping[str, str]) -> None:
        pass  # events are the original messages: decoding checks them row by row

    def start(self) -> None:
        last = self.positions.resume([(self.topic, 0)]).get((self.topic, 0))
        self._next = 0 if last is None else last + 1
        self.total_rows = max(0, self.plan.num_rows - self._next)

    def poll(self, max_records: int, timeout_ms: int) -> pa.Table | None:
        if self._next >= self.plan.num_rows:
            return None
        start, n = self._next, min(max_records, self.plan.num_rows - self._next)
        self._next += n
        rows = self.plan.slice(start, n)
        now = time.monotonic_ns()
        return pa.table(
            {
                "topic": pa.array([self.topic] * n, pa.string()),
                "partition": pa.array([0] * n, pa.int32()),
                "offset": pa.array(range(start, start + n), pa.int64()),
                "key": pa.nulls(n, pa.binary()),
                "value": rows.column("raw").cast(pa.binary()),
                "timestamp_ms": pa.nulls(n, pa.int64()),
                "received_ns": pa.array([now] * n, pa.int64()),
                "source_change": pa.nulls(n, pa.string()),
            },
            schema=SOURCE_SCHEMA,
        )

    def drained(self) -> bool:
        return self._next >= self.plan.num_rows

    def backlog(self) -> int | None:
        return self.plan.num_rows - self._next

    def assignment(self) -> set[TopicPartition]:
        return {(self.topic, 0)}

    def reseek(self, tps: Iterable[TopicPartition]) -> None:
        self.start()

    def keepalive(self) -> None:
        pass  # nothing held between polls

    def extra_positions(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        return {}

    def committed(self, positions: Mapping[TopicPartition, int]) -> None:
        pass

    def lag(self, committed: Mapping[TopicPartition, int | None]) -> Lag:
        tp = (self.topic, 0)
        return Lag(partitions=partition_lag({tp: self.plan.num_rows}, {tp: committed.get(tp)}))

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    @classmethod
    def status(cls, settings, job_name: str, stored) -> SourceStatus:
        return SourceStatus({"kind": cls.kind}, summary="dead-letter replay")  # a replay is shown by `tidegate status` of its job


class ReplaySink(DeltaSink):
    """DeltaSink for a replay: pseudo positions in the Delta log, original positions in the rows."""

    # Replayed rows carry their original source positions, which sink.topic's marks cannot key:
    # a replay stores its results in Delta only (docs/exactly-once.md, "Results to Kafka").
    publishes = False

    def __init__(self, job_name: str, results_uri: str, dead_letter_uri: str, storage_options, replay_id: str, plan,
                 **write_settings):  # fmt: skip
        super().__init__(job_name, results_uri, dead_letter_uri, storage_options, source_kind="replay", **write_settings)
        self.replay_id = replay_id
        plan = plan.sort_by(PLAN_ORDER)
        self._orig_topic = plan.column("source_topic").combine_chunks()
        self._orig_partition = plan.column("source_partition").combine_chunks()
        self._orig_offset = plan.column("source_offset").combine_chunks()
        self._ordinal = {
            (t, p, o): i
            for i, (t, p, o) in enumerate(
                zip(self._orig_topic.to_pylist(), self._orig_partition.to_pylist(), self._orig_offset.to_pylist())
            )
        }

    def _original(self, rows: pa.Table) -> pa.Table:
        if not rows.num_rows:
            return rows
        idx = rows.column("source_offset")
        for name, values in (
            ("source_topic", self._orig_topic),
            ("source_partition", self._orig_partition),
            ("source_offset", self._orig_offset),
        ):
            rows = rows.set_column(rows.schema.get_field_index(name), name, pc.take(values, idx))
        return rows

    def prepare(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        """The rows at the original events' positions (before encryption binds values to them)."""
        return self._original(results), self._original(dead)

    def repair_window(self, tp: TopicPartition) -> set[int]:
        """Plan ordinals this replay already dead-lettered above its committed position."""
        res = self._results_pos.get(tp)
        qb = QueryBuilder().register("dl", self.dead_letter.open())
        reader = qb.execute(
            "SELECT source_topic, source_partition, source_offset FROM dl WHERE run_id = '{}'".format(
                self.replay_id.replace("'", "''")
            )
        )
        table = pa.table(reader.read_all())
        low = -1 if res is None else res
        done = set()
        for t, p, o in zip(*(table.column(c).to_pylist() for c in ("source_topic", "source_partition", "source_offset"))):
            i = self._ordinal.get((t, p, o))
            if i is not None and i > low:
                done.add(i)
        return done
