"""A toy sink, added the way any sink is: this one module, registered with @register_sink.

    sink: {kind: jsonl, results: /data/out/results.jsonl, dead_letter: /data/out/dead.jsonl}

Each file is a JSON Lines log: one line per commit, {"positions": {"topic|partition": last}, "rows":
[...]}, written with one write() and fsync'd. A line either is whole or is ignored on reading (a
torn last line after a crash): rows and positions land together, which is all the exactly-once
protocol asks of a sink (docs/exactly-once.md). One writer per file: there is no conditional append.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import Any

import pyarrow as pa

from connectors.sink import register_sink
from schemas.errors import PartitionFencedError

TopicPartition = tuple[str, int]


def _key(tp: TopicPartition) -> str:
    return f"{tp[0]}|{tp[1]}"


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    raise TypeError(type(v).__name__)


class _Log:
    def __init__(self, path: str):
        self.path = path

    def lines(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    out.append(json.loads(raw))
                except ValueError:  # a torn last line: that commit never happened
                    break
        return out

    def positions(self) -> dict[str, int]:
        pos: dict[str, int] = {}
        for line in self.lines():
            pos.update(line["positions"])
        return pos

    def rows(self) -> list[dict]:
        return [r for line in self.lines() for r in line["rows"]]

    def append(self, rows: pa.Table, positions: Mapping[str, int]) -> None:
        line = json.dumps({"positions": dict(positions), "rows": rows.to_pylist()}, default=_plain) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


@register_sink
class JsonLinesSink:
    kind = "jsonl"

    @classmethod
    def from_spec(cls, spec) -> JsonLinesSink:
        return cls(spec.sink.results, spec.sink.dead_letter)

    def __init__(self, results: str, dead_letter: str):
        self.results, self.dead_letter = _Log(results), _Log(dead_letter)
        self._res: dict[TopicPartition, int | None] = {}
        self._dl: dict[TopicPartition, int | None] = {}

    def use_schemas(self, results: pa.Schema, dead_letter: pa.Schema) -> None:
        pass  # JSON holds any row

    def open(self) -> None:
        for log in (self.results, self.dead_letter):
            os.makedirs(os.path.dirname(os.path.abspath(log.path)), exist_ok=True)

    def bindings(self):
        from crypto.binding import legacy_binding

        return legacy_binding(self.results.path), legacy_binding(self.dead_letter.path)

    def load_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        res, dl = self.results.positions(), self.dead_letter.positions()
        for tp in tps:
            self._res[tp], self._dl[tp] = res.get(_key(tp)), dl.get(_key(tp))
        return {tp: self._res[tp] for tp in tps}

    def repair_window(self, tp: TopicPartition) -> set[int]:
        res, dl = self._res.get(tp), self._dl.get(tp)
        if dl is None or (res is not None and dl <= res):
            return set()
        low = -1 if res is None else res
        return {
            r["source_offset"] for r in self.dead_letter.rows()
            if (r["source_topic"], r["source_partition"]) == tp and low < r["source_offset"] <= dl
        }  # fmt: skip

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._res.pop(tp, None)
            self._dl.pop(tp, None)

    def prepare(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        return results, dead

    def commit(self, results: pa.Table, dead: pa.Table, positions: Mapping[TopicPartition, int]) -> None:
        stored = self.results.positions()
        moved = [tp for tp in positions if stored.get(_key(tp)) != self._res.get(tp)]
        if moved:
            raise PartitionFencedError(f"positions of {moved} moved under this job", moved)
        if dead.num_rows:
            dl = {tp: max(last, self._dl.get(tp) or -1) for tp, last in positions.items()}
            self.dead_letter.append(dead, {_key(tp): v for tp, v in dl.items()})
            self._dl.update(dl)
        self.results.append(results, {_key(tp): last for tp, last in positions.items()})
        self._res.update(positions)

    def read_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int | None, int | None]]:
        res, dl = self.results.positions(), self.dead_letter.positions()
        return {tp: (res.get(_key(tp)), dl.get(_key(tp))) for tp in tps}

    def partitions_seen(self, topic: str) -> set[int]:
        return {r["source_partition"] for log in (self.results, self.dead_letter) for r in log.rows() if r["source_topic"] == topic}

    def history(self) -> None:
        return None  # no runs table

    def describe(self) -> dict[str, Any]:
        tables = {
            role: {"uri": log.path, "exists": os.path.exists(log.path), "rows": len(log.rows())}
            for role, log in (("results", self.results), ("dead_letter", self.dead_letter))
        }
        dead = self.dead_letter.rows()
        return {"tables": tables, "dead_letters": {"total": len(dead), "by_stage_class": []}}
