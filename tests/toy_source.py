"""A toy source, added the way any source is: this one module, registered with @register_source.

    source:
      counter: {events: 40, partitions: 2}

Event i is {"id": "c000i", "user": "user-<i % 5>", "question": "what is 2 + <i>?"} at partition
i % partitions, offset i // partitions. The source is bounded: a run ends once every event is
committed, and a rerun resumes each partition after its committed position (so it does nothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import pyarrow as pa
from pydantic import Field

from connectors.source import Lag, PartitionStatus, SourceContext, SourceStatus, partition_lag, register_source
from schemas.errors import SourceError
from schemas.records import SOURCE_SCHEMA
from schemas.spec import SourceSettings

FIELDS = ("id", "user", "question")


class CounterSettings(SourceSettings):
    events: int = Field(gt=0)
    partitions: int = Field(default=1, ge=1)


@register_source
class CounterSource:
    kind = "counter"
    settings = CounterSettings
    bounded = True

    def __init__(self, settings: CounterSettings, ctx: SourceContext):
        self.spec = settings
        self.ctx = ctx
        self.topic = f"counter/{ctx.job_name}"
        self.total_rows = settings.events
        self._next: dict[int, int] = {}

    def _size(self, p: int) -> int:
        """Events of partition p."""
        n, k = self.spec.events, self.spec.partitions
        return n // k + (1 if p < n % k else 0)

    def check(self, required: Mapping[str, str]) -> None:
        missing = sorted(set(required) - set(FIELDS))
        if missing:
            raise SourceError(f"the counter source has no field(s) {', '.join(missing)}")

    def start(self) -> None:
        self.reseek(sorted(self.assignment()))

    def reseek(self, tps) -> None:
        positions = self.ctx.positions.resume(list(tps))
        for tp in tps:
            last = positions.get(tp)
            self._next[tp[1]] = 0 if last is None else last + 1
        self.total_rows = sum(self._size(p) - o for p, o in self._next.items())

    def poll(self, max_records: int, timeout_ms: int) -> pa.Table | None:
        rows = []
        for p in sorted(self._next):
            while self._next[p] < self._size(p) and len(rows) < max_records:
                o = self._next[p]
                i = o * self.spec.partitions + p
                value = json.dumps({"id": f"c{i:04d}", "user": f"user-{i % 5}", "question": f"what is 2 + {i}?"})
                rows.append({"topic": self.topic, "partition": p, "offset": o, "key": None, "value": value.encode(),
                             "timestamp_ms": None, "received_ns": time.monotonic_ns(), "source_change": None})  # fmt: skip
                self._next[p] = o + 1
        return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA) if rows else None

    def drained(self) -> bool:
        return all(o >= self._size(p) for p, o in self._next.items())

    def keepalive(self) -> None:
        pass  # nothing held between polls

    def backlog(self) -> int | None:
        return sum(self._size(p) - o for p, o in self._next.items())

    def assignment(self) -> set[tuple[str, int]]:
        return {(self.topic, p) for p in range(self.spec.partitions)}

    def extra_positions(self, positions):
        return {}

    def committed(self, positions) -> None:
        pass

    def lag(self, committed) -> Lag:
        return Lag(partitions=partition_lag({(self.topic, p): self._size(p) for p in self._next}, committed))

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    @classmethod
    def status(cls, settings: CounterSettings, job_name: str, stored) -> SourceStatus:
        topic = f"counter/{job_name}"
        tps = [(topic, p) for p in range(settings.partitions)]
        positions = stored.read_positions(tps)
        out = SourceStatus({"kind": cls.kind, "events": settings.events}, summary=f"counter ({settings.events} events)")
        for tp in tps:
            size = settings.events // settings.partitions + (1 if tp[1] < settings.events % settings.partitions else 0)
            out.partitions.append(PartitionStatus(tp[0], tp[1], *positions[tp], end=size))
        return out
