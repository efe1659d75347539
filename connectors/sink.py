"""Sinks: where a job's results and dead letters go, behind one small interface and a registry.

A sink stores two kinds of rows, results (RESULTS_SCHEMA) and dead letters (DEAD_LETTER_SCHEMA),
and the source positions they cover, atomically with them: that is the whole exactly-once
contract (docs/exactly-once.md), and every sink keeps it the same way:

    load_positions(tps)            the committed position of each partition (the resume point); it
                                   also arms the fence: a later commit checks nobody moved them
    repair_window(tp)              offsets of dead letters already stored above that position (a
                                   crash between the dead-letter and the results commit)
    commit(results, dead, pos)     dead letters first, then results, each with the positions, each
                                   atomic; raises PartitionFencedError when another writer moved a
                                   position since load_positions (then nothing of the commit that
                                   failed is stored). With no rows at all it still records the
                                   positions (a source's starting points: `start_from: latest`);
                                   a position may be -1 (an empty partition, read from offset 0)
    forget(tps)                    partitions given away: drop what the fence knows of them

The commit writer actor (actors/writer.py) owns the job's one sink object and is the only caller
of these; `read_positions` (read-only, for `tidegate status`) may be called from anywhere.

Adding a sink: one module with a class that has the methods of `Sink`, decorated with
`@register_sink`, selected by `sink.kind` in the spec (the built-in kinds are listed in
`BUILTIN_SINKS`). tests/test_architecture.py adds a toy sink that way.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import pyarrow as pa

from schemas.errors import SpecError
from schemas.spec import JobSpec

TopicPartition = tuple[str, int]

BUILTIN_SINKS: dict[str, str] = {"delta": "connectors.delta"}


@runtime_checkable
class Sink(Protocol):
    kind: ClassVar[str]

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Sink:
        """The sink of a job spec (its `sink:` section; positions are namespaced by the job's name)."""

    def use_schemas(self, results: pa.Schema, dead_letter: pa.Schema) -> None:
        """The stored schemas when they differ from the plain ones (encrypted columns are
        binary, carried input fields are added). Called before open()."""

    def open(self) -> None:
        """Create or check the tables: an incompatible one fails before any work."""

    def bindings(self) -> tuple[Any, Any]:
        """(results, dead letters) crypto.binding.Binding: what encrypted values are bound to."""

    def load_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]: ...

    def repair_window(self, tp: TopicPartition) -> set[int]: ...

    def forget(self, tps: Iterable[TopicPartition]) -> None: ...

    def prepare(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Rows as they will be stored, before the last stages (encryption) see them."""

    def commit(self, results: pa.Table, dead: pa.Table, positions: Mapping[TopicPartition, int]) -> None: ...

    def read_positions(
        self, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, tuple[int | None, int | None]]:
        """(results position, dead-letter position) per partition, read only."""

    def partitions_seen(self, topic: str) -> set[int]:
        """Partitions of `topic` that stored rows come from (status, when the source cannot say)."""

    def history(self) -> Any:
        """The runs history table (connectors.runs.RunsTable) next to the results, or None."""

    def describe(self) -> dict[str, Any]:
        """For `tidegate status`: the tables (uri, exists, version, rows, last commit) and the
        dead letters by stage and class."""


_SINKS: dict[str, type] = {}

_SINK_METHODS = ("from_spec", "use_schemas", "open", "bindings", "load_positions", "repair_window", "forget", "prepare", "commit",
                 "read_positions", "partitions_seen", "history", "describe")  # fmt: skip


def register_sink(cls: type) -> type:
    """Class decorator: make `cls` the sink of `sink.kind: <cls.kind>`, built with `cls.from_spec(spec)`."""
    missing = [m for m in _SINK_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(f"sink {cls.__name__} lacks {', '.join(missing)}")
    _SINKS[cls.kind] = cls
    return cls


def sink_class(kind: str) -> type:
    if kind not in _SINKS and kind in BUILTIN_SINKS:
        importlib.import_module(BUILTIN_SINKS[kind])
    try:
        return _SINKS[kind]
    except KeyError:
        raise SpecError(f"sink.kind {kind!r}: no sink is registered for this kind") from None


def open_sink(spec: JobSpec) -> Sink:
    """The spec's sink, not opened yet."""
    return sink_class(spec.sink.kind).from_spec(spec)


def adopt_stored_twin(encryption, sink: Sink) -> None:
    """An output column the results table already stores in clear stays so (crypto.stage
    EncryptionStage.keep_twin_as_stored); asked of sinks that can say what they store."""
    stored = getattr(sink, "stored_table_schemas", None)
    if callable(stored) and encryption.twin is not None:
        encryption.keep_twin_as_stored(*stored())


def stored_schemas(spec: JobSpec, sink: Sink) -> tuple[pa.Schema, pa.Schema]:
    """(results, dead letters) as the spec's commit writer stores them into `sink`'s tables, for a
    sink opened by something else (maintenance, a replay's table check): no key is needed."""
    from crypto.stage import EncryptionStage
    from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA

    encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter, keys=False)
    adopt_stored_twin(encryption, sink)
    return encryption.stored_results_schema(RESULTS_SCHEMA), encryption.stored_dead_schema(DEAD_LETTER_SCHEMA)
