"""Source records into batches for the engines (pure bookkeeping, no I/O).

A poll returns what the consumer has buffered, often less than a batch. The engine's cost per
call is dominated by its decode steps whatever the batch size, so small batches waste it: records
accumulate until a full batch, an idle engine, or `pool.batch_linger_ms`.
"""

from __future__ import annotations

import time

import pyarrow as pa


class Batcher:
    def __init__(self, batch_size: int, linger_ms: float):
        self.batch_size = batch_size
        self.linger_ms = linger_ms
        self._parts: list[pa.Table] = []
        self.rows = 0  # records read and not handed out yet
        self._since = 0.0  # when the oldest of them was read

    @property
    def room(self) -> int:
        """Records the next poll may bring."""
        return max(0, self.batch_size - self.rows)

    def add(self, table: pa.Table | None) -> None:
        if table is None or not table.num_rows:
            return
        if not self._parts:
            self._since = time.monotonic()
        self._parts.append(table)
        self.rows += table.num_rows

    def ready(self, engine_idle: bool) -> bool:
        """A full batch, an engine with nothing to do, or records that waited batch_linger_ms."""
        if not self.rows:
            return False
        if self.rows >= self.batch_size or engine_idle:
            return True
        return (time.monotonic() - self._since) * 1000 >= self.linger_ms

    def take(self) -> pa.Table:
        table = pa.concat_tables(self._parts) if len(self._parts) > 1 else self._parts[0]
        self.drop()
        return table

    def drop(self) -> None:
        """Forget records read but not handed out: after a seek they are read again."""
        self._parts, self.rows = [], 0
