"""Sources: where a job's events come from, behind one small interface and a registry.

A source reads an outside system (a Kafka topic, a Delta table, the dead-letter plan of a replay)
as SOURCE_SCHEMA batches (schemas/records.py) whose rows have positions `(topic, partition, offset)`:

    topic      what the rows' `source_topic` column says (a topic name, a table URI, ...)
    partition  an independent, ordered stream of rows (a Kafka partition, a table version, ...)
    offset     the row's place in its partition; a partition's rows are handed out in offset order

Positions are never stored by the source. The sink keeps them, atomically with the rows it
writes (docs/exactly-once.md), and the job hands them to the source through `SourcePositions`:
whenever a source (re)takes partitions it asks `positions.resume(tps)` where each one stands and
reads on from the next offset; when it must give partitions away (a Kafka rebalance) it calls
`positions.release(tps)` first, which commits or drops the job's work on them.

Adding a source: one module with a settings class (a `schemas.spec.SourceSettings`, the spec's
`source.<kind>` section) and a class with the methods of `Source`, decorated with
`@register_source`; built-in kinds are listed in `BUILTIN_SOURCES` (imported on first use).
tests/test_architecture.py adds a toy source that way.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import pyarrow as pa

from schemas.errors import SpecError
from schemas.spec import JobSpec, SourceSettings, register_source_kind, set_source_kind_loader

TopicPartition = tuple[str, int]

# kind -> module that registers it. A module listed here is imported when its kind is first needed.
BUILTIN_SOURCES: dict[str, str] = {"kafka": "connectors.kafka", "delta": "connectors.delta_source"}


class SourcePositions(Protocol):
    """What the job gives a source: where partitions stand, and a say before they go."""

    def resume(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, int | None]:
        """The last committed offset of each partition (None: nothing committed yet)."""

    def release(self, tps: list[TopicPartition], lost: bool = False, within_s: float | None = None) -> None:
        """The source is giving these partitions away: finish the work on them (for at most
        within_s) and commit it (not when `lost`: another reader may own them already), drop the rest."""

    # Optional (a source checks with getattr):
    #   anchor({tp: position}) -> None: record, durably and before the source reads them, where
    #   partitions with no position start (the last offset *before* the first one to read), as a
    #   commit of positions and no rows. Kafka's `start_from: latest` uses it: without it a job
    #   stopped before its first commit on a partition started again at a later end.
    #   furthest(tps) -> {tp: position or None}: the furthest position any of the sink's tables
    #   recorded, a commit that landed half-way (its dead letters in, its results not) included.
    #   For a source that picks what to read from a position (the Delta source's snapshot version).


@dataclass
class SourceContext:
    """The job-level facts a source is built with."""

    job_name: str
    positions: SourcePositions
    batch_rows: int = 256  # pool.batch_size: how many rows one poll should bring at most
    follow: bool = False  # bounded sources: keep looking for new data instead of ending


@dataclass
class Lag:
    """How far behind the job is, as the source measures it (for metrics)."""

    partitions: dict[TopicPartition, int] | None = None  # rows behind per partition
    versions_behind: int | None = None  # table sources: source versions not processed yet


@dataclass
class PartitionStatus:
    """One row of `tidegate status`'s positions table."""

    topic: str
    partition: int
    committed: int | None  # the results table's position (last offset covered)
    dead_letter_position: int | None
    end: int | None = None  # the partition's end (Kafka high watermark, a version's row count)

    @property
    def next(self) -> int | None:
        return None if self.committed is None else self.committed + 1

    @property
    def lag(self) -> int | None:
        tp = (self.topic, self.partition)
        return None if self.end is None else partition_lag({tp: self.end}, {tp: self.committed})[tp]

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic, "partition": self.partition, "committed": self.committed, "next": self.next,
            "end": self.end, "lag": self.lag, "dead_letter_position": self.dead_letter_position,
            # A crash between the dead-letter and the results commit: the next run repairs it.
            "repair_pending": self.dead_letter_position is not None
            and (self.committed is None or self.dead_letter_position > self.committed),
        }  # fmt: skip


@dataclass
class SourceStatus:
    """What `tidegate status` shows about a source, read without running the job."""

    description: dict[str, Any]  # kind and where: topic and brokers, table URI and mode, ...
    summary: str = ""  # the same in words, for the terminal
    unit: str = "partition"  # what a partition is here, for the terminal ("partition", "source version")
    partitions: list[PartitionStatus] = field(default_factory=list)
    versions_behind: int | None = None
    errors: list[str] = field(default_factory=list)  # what could not be read, and why


class StoredPositions(Protocol):
    """What `Source.status` reads of the sink (a connectors.sink.Sink is one)."""

    def read_positions(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, tuple[int | None, int | None]]:
        """(results position, dead-letter position) per partition."""

    def partitions_seen(self, topic: str) -> set[int]:
        """Partitions of `topic` the stored rows come from."""


@runtime_checkable
class Source(Protocol):
    """The interface the job loop (jobs/pipeline.py) uses. Where a capability means nothing for
    a source (Kafka has no columns to check, a table has no consumer group to mirror offsets to)
    its method is a no-op there."""

    kind: ClassVar[str]
    settings: ClassVar[type[SourceSettings]]
    bounded: ClassVar[bool]  # has an end (a table, a replay plan): a run ends once it is drained
    topic: str  # the rows' source_topic
    total_rows: int | None  # rows to do when known (progress), else None

    def check(self, required: Mapping[str, str]) -> None:
        """Fail fast, before any engine starts: `required` maps event field -> why it is needed."""

    def start(self) -> None:
        """Connect, take partitions (asking positions.resume) and be ready to poll."""

    def poll(self, max_records: int, timeout_ms: int) -> pa.Table | None:
        """Up to max_records SOURCE_SCHEMA rows, waiting up to timeout_ms; None when none came."""

    def drained(self) -> bool:
        """Every partition is read to its current end (a bounded source: to its end)."""

    def backlog(self) -> int | None:
        """Rows known to be waiting beyond what was read (None: unknown); drives autoscaling."""

    def assignment(self) -> set[TopicPartition]:
        """The partitions this source reads now."""

    def reseek(self, tps: list[TopicPartition]) -> None:
        """Read these partitions again from their committed positions (positions.resume)."""

    def keepalive(self) -> None:
        """Called on every turn of the job loop, reading or not: keep what the source holds (a
        consumer group's membership) while the job has no room for rows. Cheap when not due."""

    def extra_positions(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Positions committed along with a batch's own (a table source's version marker)."""

    def committed(self, positions: Mapping[TopicPartition, int]) -> None:
        """A commit covering these positions landed (Kafka mirrors them for lag tools)."""

    def lag(self, committed: Mapping[TopicPartition, int | None]) -> Lag:
        """Lag against the committed positions (monitoring only: may be approximate)."""

    def notes(self) -> list[str]:
        """Lines for the run summary (e.g. source versions that could not be processed)."""

    def close(self) -> None: ...

    @classmethod
    def status(cls, settings: SourceSettings, job_name: str, stored: StoredPositions) -> SourceStatus:
        """Where each partition stands, for `tidegate status` (no job running)."""


def partition_lag(
    end_offsets: Mapping[TopicPartition, int], committed_last: Mapping[TopicPartition, int | None]
) -> dict[TopicPartition, int]:
    """Rows still to process per partition, for every partition in `end_offsets`.

    end_offsets: the offset the next row will get (Kafka: the fetch high watermark, not
    ListOffsets, which tansu answers wrongly). committed_last: the last offset committed in the
    sink, None when nothing is committed (then every row from offset 0 counts).

        lag = end - (last + 1), never below 0 (a stale end behind the committed position reads 0)
    """
    out: dict[TopicPartition, int] = {}
    for tp, end in end_offsets.items():
        last = committed_last.get(tp)
        out[tp] = max(0, int(end) - (0 if last is None else int(last) + 1))
    return out


def identity_of(text: str) -> int:
    """63 bits of the SHA-256 of `text`: what a source records beside its positions to say which
    table or topic they are of (a Delta table's id, a Kafka topic id), a valid Delta txn version."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def source_versions_behind(latest_version: int, last_processed: int | None) -> int:
    """Table sources: versions not processed yet (latest - last processed; every version
    0..latest when nothing was processed)."""
    if last_processed is None:
        return latest_version + 1
    return max(0, latest_version - last_processed)


_SOURCES: dict[str, type] = {}


def register_source(cls: type) -> type:
    """Class decorator: make `cls` the source of spec sections `source.<cls.kind>`."""
    missing = [m for m in _SOURCE_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(f"source {cls.__name__} lacks {', '.join(missing)}")
    register_source_kind(cls.kind, cls.settings)
    _SOURCES[cls.kind] = cls
    return cls


_SOURCE_METHODS = ("check", "start", "poll", "drained", "backlog", "assignment", "reseek", "extra_positions",
                   "committed", "lag", "notes", "close", "status")  # fmt: skip


def _load_builtin(kind: str) -> None:
    if kind not in _SOURCES and kind in BUILTIN_SOURCES:
        importlib.import_module(BUILTIN_SOURCES[kind])


set_source_kind_loader(_load_builtin)  # a spec naming a built-in kind loads its module


def source_class(kind: str) -> type:
    _load_builtin(kind)
    try:
        return _SOURCES[kind]
    except KeyError:
        raise SpecError(f"source.{kind}: no source is registered for this kind") from None


def open_source(spec: JobSpec, ctx: SourceContext) -> Source:
    """The spec's source, built (not started)."""
    return source_class(spec.source.kind)(spec.source.settings, ctx)
