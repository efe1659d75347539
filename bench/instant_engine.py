"""An instant stand-in for the vLLM engine, for benchmarks and long runs where the model's cost
would hide everything else (the orchestration ceiling, soak, chaos).

    InstantEngine(model, sampling, ...)   same constructor and methods as compute.engine.EngineWorker
      generate(REQUEST_SCHEMA table) -> COMPLETION_SCHEMA table, at once

Its output is a fixed phrase of 1..max_tokens words chosen by the row's offset (so outputs vary in
length, never quote the prompt, and pass the default rules), made with Arrow compute only. Nothing is loaded: no vLLM,
no model directory is read. Used through jobs.pipeline.JobComponents(engine=InstantEngine), never
by a spec.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from compute.engine import completion_counts
from schemas.records import COMPLETION_SCHEMA

WORDS = ("the", "order", "ships", "soon", "and", "support", "will", "follow", "up", "today")


class InstantEngine:
    def __init__(self, model, sampling: dict[str, Any], chat: bool = True, system=None, json_schema=None,
                 tensor_parallel_size: int = 1, separate_process: bool = False,
                 priority_scheduling: bool = False, batch_share: float = 1.0):  # fmt: skip
        self.max_tokens = int(sampling.get("max_tokens") or 16)
        self._texts = pa.array([" ".join(WORDS[i % len(WORDS)] for i in range(k)) + "." for k in range(1, self.max_tokens + 1)])
        self.ready_at = time.monotonic()
        self.busy_s = 0.0
        self.batches = 0

    def info(self) -> dict[str, Any]:
        return {"max_model_len": 4096, "load_s": 0.0, "pid": os.getpid(), "max_num_seqs": 1 << 20, "prefix_caching": False}

    def model_revision(self) -> str:
        return "instant-engine"

    def ping(self) -> int:
        return os.getpid()

    def usage(self) -> dict[str, float]:
        up = time.monotonic() - self.ready_at
        return {"busy_s": self.busy_s, "up_s": up, "idle_s": up - self.busy_s, "span_s": up, "occupancy_s": 0.0,
                "batches": self.batches, "prompt_tokens": 0, "cached_tokens": 0}  # fmt: skip

    async def run_batch(self, requests: pa.Table, priority: int = 0) -> tuple[dict, pa.Table]:
        table = self.generate(requests)
        return completion_counts(table), table

    async def complete(self, requests: pa.Table, priority: int = 0) -> pa.Table:
        return self.generate(requests)

    def generate(self, requests: pa.Table) -> pa.Table:
        """Arrow compute only (no per-row Python): the stand-in must cost next to nothing."""
        t0 = time.monotonic()
        n = requests.num_rows
        # 1..max_tokens words, from the row's offset (varied lengths, same for the same row)
        lengths = pc.add(pc.bit_wise_and(requests.column("source_offset"), 0xFFFF).cast(pa.int32()), 0)
        lengths = pc.add(pc.subtract(lengths, pc.multiply(pc.divide(lengths, self.max_tokens), self.max_tokens)), 1)
        text = pc.take(self._texts, pc.subtract(lengths, 1))
        out = pa.table(
            {
                "source_partition": requests.column("source_partition"),
                "source_offset": requests.column("source_offset"),
                "output_text": text,
                "finish_reason": pa.repeat(pa.scalar("stop", pa.string()), n),
                "prompt_tokens": pc.add(pc.divide(pc.utf8_length(requests.column("prompt")), 4), 1).cast(pa.int32()),
                "completion_tokens": lengths.cast(pa.int32()),
            }
        )
        for f in COMPLETION_SCHEMA:
            if f.name not in out.column_names:
                out = out.append_column(f.name, pa.nulls(n, f.type))
        self.busy_s += time.monotonic() - t0
        self.batches += 1
        return out.select(COMPLETION_SCHEMA.names).cast(COMPLETION_SCHEMA)
