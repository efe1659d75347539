"""Benchmark: the Delta sink's commits/s and rows/s on local disk, on S3 (a local S3-compatible
server, localbucket, on loopback) and on Azure Blob (Azurite, when `make azurite` installed it),
side by side in one run.

Two workloads per store, through DeltaSink.commit (positions in each commit, as a job writes):
  small: `--small-commits` commits of 10 rows (the commit rate: what a 1 s commit interval needs)
  large: `--large-commits` commits of `--large-rows` rows (the row rate of big commits)

    python bench/object_store.py [--small-commits 300] [--large-commits 20] [--large-rows 8192]

The emulators are processes on the same 2 cores (localbucket in Python, Azurite in Node.js), so
their numbers measure the protocol's round trips (conditional put, listing) more than a real
store's latency; the ratio is what counts.
Result: bench/results/object_store-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(uri: str, opts: dict[str, str], commits: int, rows: int) -> dict:
    from connectors.delta import DeltaSink
    from schemas.records import DEAD_LETTER_SCHEMA
    from tests.conftest import results_table

    sink = DeltaSink("bench", uri + "/results", uri + "/dead_letter", opts)
    sink.open()
    sink.load_positions([("t", 0)])
    batches = [results_table(list(range(c * rows, (c + 1) * rows))) for c in range(commits)]
    empty = DEAD_LETTER_SCHEMA.empty_table()
    t0 = time.perf_counter()
    for c, batch in enumerate(batches):
        sink.commit(batch, empty, {("t", 0): (c + 1) * rows - 1})
    elapsed = time.perf_counter() - t0
    return {"commits": commits, "rows_per_commit": rows, "seconds": round(elapsed, 2),
            "commits_per_s": round(commits / elapsed, 1), "rows_per_s": round(commits * rows / elapsed)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-commits", type=int, default=300)
    ap.add_argument("--large-commits", type=int, default=20)
    ap.add_argument("--large-rows", type=int, default=8192)
    args = ap.parse_args()

    from connectors.broker import LocalObjectStore

    root = Path(tempfile.mkdtemp(prefix="tg-os-"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    result = {"bench": "object_store", "started": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "runs": {}}
    from contextlib import ExitStack

    from tests.azurite import Azurite, azurite_binary

    with ExitStack() as stack:
        s3 = stack.enter_context(LocalObjectStore(root / "s3"))
        s3.bucket("lake")
        opts = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
        legs = [("local", str(root / "local"), {}), ("s3", "s3://lake/bench", opts)]
        if azurite_binary() is not None:
            az = stack.enter_context(Azurite(root / "azurite"))
            os.environ.update(az.env())
            az.container("lake")
            legs.append(("azure", "az://lake/bench", az.storage_options()))
        for name, uri, o in legs:
            result["runs"][name] = {
                "small": run(uri + "-small", o, args.small_commits, 10),
                "large": run(uri + "-large", o, args.large_commits, args.large_rows),
            }
            print(name, json.dumps(result["runs"][name]), flush=True)
    for store in [name for name in result["runs"] if name != "local"]:
        for kind in ("small", "large"):
            result[f"{store}_over_local_{kind}"] = round(
                result["runs"]["local"][kind]["seconds"] / result["runs"][store][kind]["seconds"], 3)  # fmt: skip
    out = REPO / "bench" / "results" / f"object_store-{result['started']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if "_over_local_" in k}), f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
