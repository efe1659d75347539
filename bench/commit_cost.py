"""Benchmark: what a long Delta log costs each commit and each read on a local disk.

Takes a results table written by `bench/maintenance.py --job-policy --dir D` (many 1 s commits
with the log kept: log retention not yet expired) and measures, on fresh copies one after the
other in one run (as is, cleaned, as is again):

- as is:       the log folder as the job left it (one JSON file per commit since the start,
               a checkpoint every 100);
- log cleaned: the same table after the log cleanup a shorter `log_retention_hours` does at a
               checkpoint (delta-rs's own cleanup_metadata with a zero retention);

for each: milliseconds per commit of `--commits` more commits through the job's DeltaSink
(positions included), and a polars full read. Local disk only. Why a long log costs each commit
(every commit lists the log folder, which a local disk does in full) and what that costs per log
file, code against code: bench/delta_commits.py.

    python bench/commit_cost.py --table /tmp/tgm-day [--commits 150]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(root: Path, commits: int, clean: bool) -> dict:
    import polars as pl
    from deltalake import DeltaTable

    from connectors.delta import DeltaSink, txn_app_id
    from schemas.records import DEAD_LETTER_SCHEMA
    from schemas.spec import MaintenanceSpec
    from tests.conftest import results_table

    uri = str(root / "results")
    dt = DeltaTable(uri)
    if clean:
        dt.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
        dt.create_checkpoint()
        dt.cleanup_metadata()
    log_files = len(list((root / "results" / "_delta_log").iterdir()))
    t0 = time.perf_counter()
    rows = pl.read_delta(uri).height
    read_s = time.perf_counter() - t0
    position = DeltaTable(uri).transaction_version(txn_app_id("bench", ("t", 0)))
    # The policy as the table has it (no maintenance round in this short stretch).
    sink = DeltaSink("bench", uri, str(root / "dead_letter"), {},
                     maintenance=MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(),
                                                                    "compact_every_commits": None}))  # fmt: skip
    sink.open()
    sink.load_positions([("t", 0)])
    empty = DEAD_LETTER_SCHEMA.empty_table()
    base = position + 1
    t0 = time.perf_counter()
    for _ in range(commits):
        offsets = list(range(base, base + 5))
        base += 5
        sink.commit(results_table(offsets), empty, {("t", 0): offsets[-1]})
    per_commit_ms = (time.perf_counter() - t0) / commits * 1000
    return {"log_files": log_files, "rows": rows, "read_s": round(read_s, 3), "commit_ms": round(per_commit_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="bench/maintenance.py's --dir (holds results/ and dead_letter/)")
    ap.add_argument("--commits", type=int, default=150)
    args = ap.parse_args()
    from deltalake import DeltaTable

    source = Path(args.table)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"bench": "commit_cost", "started": stamp, "table_version": DeltaTable(str(source / "results")).version(),
              "commits_measured": args.commits, "legs": {}}  # fmt: skip
    for leg, clean in (("as_is", False), ("log_cleaned", True), ("as_is_again", False)):
        work = Path(tempfile.mkdtemp(prefix="tg-commit-cost-"))
        shutil.copytree(source, work / "t")
        result["legs"][leg] = measure(work / "t", args.commits, clean)
        shutil.rmtree(work)
        print(leg, json.dumps(result["legs"][leg]), flush=True)
    out = REPO / "bench" / "results" / f"commit_cost-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
