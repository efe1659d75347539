"""Where each source batch is between the source and its commit (pure bookkeeping, no I/O).

A batch handed out is numbered by the CommitLedger (connectors/offsets.py), then:

    rendering  at a stage worker (RenderTag)
    open       rows at the engines, first generation or a retry (EngineTag), or being
               validated (AssembleTag): OpenBatch counts the submissions not back yet
    complete   in the ledger, waiting for the contiguous prefix it belongs to
    writing    in the commit at the writer

`epoch` is bumped when uncommitted work is dropped (a fence, a revocation, a writer that died):
what a stage returns for a tag of an older epoch is ignored, since that work is read again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.offsets import CommitLedger, TopicPartition


@dataclass(frozen=True)
class RenderTag:
    epoch: int
    seq: int
    rows: int  # source rows of the batch
    src: Any  # the SOURCE_SCHEMA table in the object store (render and assemble read it)


@dataclass(frozen=True)
class EngineTag:
    epoch: int
    seq: int
    requests: Any  # ref to what was submitted: assemble joins the completions with it
    submitted: float  # monotonic time of the submission (batch latency)


@dataclass(frozen=True)
class AssembleTag:
    epoch: int
    seq: int


@dataclass
class OpenBatch:
    """A source batch whose rows are at the engines or being validated."""

    src: Any  # ref to the SOURCE_SCHEMA table (render and every assemble of the batch read it)
    rows: int  # source rows it covers
    parts: list[Any]  # refs to its BatchOutput objects: render's dead letters, then each assemble's
    carried: Any = None  # ref to encryption.input_fields per (partition, offset), plain
    waiting: int = 1  # submissions not back yet


@dataclass
class BatchParts:
    """A complete batch in the ledger: what the commit writer joins, and the source rows it covers."""

    outputs: list[Any]  # refs to BatchOutput objects
    consumed: int


class InFlight:
    def __init__(self) -> None:
        self.ledger = CommitLedger()
        self.epoch = 0
        self.rendering = 0  # batches at a stage worker, not at the engines yet
        self.open: dict[int, OpenBatch] = {}
        self.writing_batches = 0  # batches in the commit at the writer
        self.writing_rows = 0  # ... and their source rows
        self.uncommitted_rows = 0  # source rows handed out and not committed yet

    def admit(self, spans: dict[TopicPartition, tuple[int, int]], rows: int, src: Any) -> RenderTag:
        seq = self.ledger.open(spans)
        self.uncommitted_rows += rows
        self.rendering += 1
        return RenderTag(self.epoch, seq, rows, src)

    def stale(self, tag: RenderTag | EngineTag | AssembleTag) -> bool:
        return tag.epoch != self.epoch

    def rendered(self, tag: RenderTag, batch: OpenBatch | None, output: BatchParts | None) -> None:
        """Rendering is done: the batch goes to the engines (batch) or, with nothing to
        generate, straight to the ledger (output)."""
        self.rendering -= 1
        if batch is not None:
            self.open[tag.seq] = batch
        else:
            self.ledger.complete(tag.seq, output)

    def batch(self, tag: EngineTag | AssembleTag) -> OpenBatch | None:
        """The open batch of a current tag (None: dropped while the call ran)."""
        return None if self.stale(tag) else self.open.get(tag.seq)

    def close(self, seq: int) -> None:
        """Every row of an open batch is kept or dead-lettered: it joins the ledger."""
        batch = self.open.pop(seq)
        self.ledger.complete(seq, BatchParts(batch.parts, batch.rows))

    def writing(self, batches: int, rows: int) -> None:
        self.writing_batches, self.writing_rows = batches, rows

    def committed(self, batches: int, rows: int) -> None:
        self.writing_batches = self.writing_rows = 0
        self.uncommitted_rows = max(0, self.uncommitted_rows - rows)

    def drop(self) -> None:
        """Forget every uncommitted batch: it will be read again. A commit already at the writer
        stays counted until it lands (or fails)."""
        self.epoch += 1
        self.rendering = 0
        self.ledger.reset()
        self.open.clear()
        self.uncommitted_rows = self.writing_rows
