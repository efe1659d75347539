"""Offset bookkeeping for exactly-once commits (pure logic, no I/O).

`CommitLedger` numbers the batches the source hands out, in order, and releases completed
batches for commit only as the longest prefix of consecutive batch numbers that are all
complete. Within a partition a batch starts right after the previous one, so a committed prefix
always covers a contiguous run of offsets per partition, whatever order batches finish in.
See docs/exactly-once.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TopicPartition = tuple[str, int]


@dataclass
class LedgerEntry:
    seq: int
    # Per partition: (first offset, last offset) of the records this batch read.
    spans: dict[TopicPartition, tuple[int, int]]
    payload: Any = None
    done: bool = False


@dataclass
class CommitGroup:
    """Completed batches released together: their payloads and the last offset per partition."""

    payloads: list[Any] = field(default_factory=list)
    positions: dict[TopicPartition, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.payloads)


class CommitLedger:
    def __init__(self) -> None:
        self._entries: dict[int, LedgerEntry] = {}
        self._next_seq = 0
        self._next_release = 0
        self._done = 0  # entries completed and not released, in the prefix or behind a slower one
        # Last offset handed out per partition: a new batch must start above it.
        self._handed_out: dict[TopicPartition, int] = {}

    def open(self, spans: Mapping[TopicPartition, tuple[int, int]]) -> int:
        """Register a batch read from the source; returns its sequence number."""
        for tp, (first, last) in spans.items():
            if first > last:
                raise ValueError(f"empty span {first}..{last} for {tp}")
            prev = self._handed_out.get(tp)
            if prev is not None and first <= prev:
                raise ValueError(f"batch for {tp} starts at {first}, at or below {prev} already handed out")
        seq = self._next_seq
        self._next_seq += 1
        self._entries[seq] = LedgerEntry(seq, dict(spans))
        for tp, (_, last) in spans.items():
            self._handed_out[tp] = last
        return seq

    def complete(self, seq: int, payload: Any) -> None:
        entry = self._entries.get(seq)
        if entry is None:
            raise KeyError(f"batch {seq} is not open")
        if entry.done:
            raise ValueError(f"batch {seq} completed twice")
        entry.payload = payload
        entry.done = True
        self._done += 1

    def pop_committable(self, max_batches: int | None = None) -> CommitGroup:
        """Remove and return the longest complete prefix of batches (its first max_batches)."""
        group = CommitGroup()
        while (entry := self._entries.get(self._next_release)) is not None and entry.done:
            if max_batches is not None and len(group.payloads) >= max_batches:
                break
            self._done -= 1
            del self._entries[self._next_release]
            self._next_release += 1
            group.payloads.append(entry.payload)
            for tp, (_, last) in entry.spans.items():
                group.positions[tp] = max(last, group.positions.get(tp, last))
        return group

    def committable_count(self) -> int:
        n, seq = 0, self._next_release
        while (entry := self._entries.get(seq)) is not None and entry.done:
            n += 1
            seq += 1
        return n

    @property
    def done_count(self) -> int:
        """Completed batches not released: the prefix, and those waiting behind an unfinished one."""
        return self._done

    @property
    def open_count(self) -> int:
        """Batches handed out and not yet released (in flight or waiting on an earlier one)."""
        return len(self._entries)

    def reset(self) -> None:
        """Forget everything (after a fence or a revocation): uncommitted work will be read again."""
        self._entries.clear()
        self._done = 0
        self._next_release = self._next_seq
        self._handed_out.clear()
