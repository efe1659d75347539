"""Benchmark: peak memory of reading a 1,000,000-row Delta table as a snapshot source.

Writes a 1M-row table (10 appends of 100k rows, ~200-byte questions), then, in a fresh process,
streams it through the job's read path exactly as `PipelineJob` does (DeltaSource.poll in
batches of `pool.batch_size`, then PromptRenderer.render), and reports the peak RSS next to the
table's size in memory as one Arrow table. The engine is left out: 1M rows through the tiny model
on 2 CPU cores would take about an hour, and the engine's memory does not grow with the table.

    python bench/delta_source_memory.py [--rows 1000000] [--batch-size 256]

Run it with two sizes: a streaming reader's peak does not grow with the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_table(uri: str, rows: int) -> int:
    import pyarrow as pa
    from deltalake import write_deltalake

    step = 100_000
    nbytes = 0
    for start in range(0, rows, step):
        n = min(step, rows - start)
        t = pa.table(
            {
                "id": [f"r{i:08d}" for i in range(start, start + n)],
                "user": [f"user-{i % 997}" for i in range(start, start + n)],
                "question": [f"order {i}: " + "where is my parcel, it was due last week " * 5 for i in range(start, start + n)],
            }
        )
        nbytes += t.nbytes
        write_deltalake(uri, t, mode="append")
    return nbytes


def read_all(uri: str, batch_size: int) -> dict:
    from compute.prompts import PromptRenderer
    from connectors.delta_source import DeltaSource
    from connectors.source import SourceContext
    from schemas.spec import DeltaSourceSpec, PromptSpec

    class _NoPositions:  # a fresh job: nothing committed yet
        def resume(self, tps):
            return {tp: None for tp in tps}

        def release(self, tps, lost=False, within_s=None):
            pass

    src = DeltaSource(DeltaSourceSpec(uri=uri), SourceContext("bench", _NoPositions(), batch_rows=batch_size))
    renderer = PromptRenderer(PromptSpec(template="Answer {{ user }}: {{ question }}", id_field="id"), 2**31 - 1, "bench")
    src.check(renderer.required_fields())
    src.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, rows, prompts = time.monotonic(), 0, 0
    while (batch := src.poll(batch_size, 0)) is not None:
        rows += batch.num_rows
        prompts += renderer.render(batch).requests.num_rows
    seconds = time.monotonic() - t0
    return {
        "rows": rows,
        "prompts": prompts,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "peak_rss_before_reading_mib": round(rss_before),  # imports, table metadata, plan
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--read", help=argparse.SUPPRESS)  # internal: the measuring child process
    args = ap.parse_args()
    if args.read:
        print(json.dumps(read_all(args.read, args.batch_size)))
        return
    uri = str(Path(tempfile.mkdtemp(prefix="tidegate-bench-delta-")) / "src")
    table_bytes = write_table(uri, args.rows)
    out = subprocess.run(
        [sys.executable, __file__, "--read", uri, "--batch-size", str(args.batch_size)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["table_in_memory_mib"] = round(table_bytes / 2**20)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
