"""Benchmark: a day of 1-second commits to a results table, before and after maintenance.

Commits `--commits` small appends (default 86,400: one a second for a day, simulated as fast as
delta-rs commits) through the job's DeltaSink (each with its position transaction, as a job
writes them), with the job's automatic maintenance switched off. Every `--snapshot-every`
commits it records the table's health (data files, _delta_log files and bytes) and a full polars
read time. At the end it runs `tidegate maintain`'s steps (compact, checkpoint + log cleanup,
vacuum with a zero retention: nothing reads old versions here) and measures again, then checks
that the rows and the position are unchanged.

    python bench/maintenance.py [--commits 86400] [--rows-per-commit 5] [--snapshot-every 10800]
    python bench/maintenance.py --job-policy     # the day as a job lives it, sink.maintenance defaults on
    python bench/maintenance.py --job-policy --log-retention-hours 0   # ... with the log expiring at once

With `--job-policy` the table lives the day as a job's does: the default `sink.maintenance`
(compact + checkpoint + vacuum every 600 commits, and the retentions of docs/lakehouse.md),
run between commits exactly as the commit writer runs it (`DeltaSink.maintain`). Nothing expires
within one simulated day under retentions of a day or more, so the snapshots also count the data files and
log files on disk (what a week of retention keeps), not only the live ones. No final round.

The result JSON (bench/results/maintenance-<time>.json) is rewritten after every snapshot, so a
run stopped early still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def read_time(uri: str) -> tuple[float, int]:
    import polars as pl

    t0 = time.perf_counter()
    n = pl.read_delta(uri).height
    return round(time.perf_counter() - t0, 3), n


def snapshot(uri: str, commits: int, elapsed: float) -> dict:
    from deltalake import DeltaTable

    from connectors.maintenance import table_health

    health = table_health(DeltaTable(uri)).as_dict()
    seconds, rows = read_time(uri)
    return {"commits": commits, "elapsed_s": round(elapsed, 1), **health, "read_s": seconds, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=86_400)
    ap.add_argument("--rows-per-commit", type=int, default=5)
    ap.add_argument("--snapshot-every", type=int, default=10_800)
    ap.add_argument("--dir", default=None, help="Where to put the table (default: a temp dir).")
    ap.add_argument("--job-policy", action="store_true", help="sink.maintenance defaults on, as in a job.")
    ap.add_argument("--log-retention-hours", type=int, default=None,
                    help="With --job-policy: this log retention instead of the default (0: the simulated "
                         "day's log counts as expired at each checkpoint, as if the retention were short).")  # fmt: skip
    args = ap.parse_args()

    from connectors.delta import DeltaSink, txn_app_id
    from connectors.maintenance import maintain_table
    from schemas.spec import MaintenanceSpec
    from tests.conftest import results_table

    root = Path(args.dir or tempfile.mkdtemp(prefix="tg-maint-"))
    uri = str(root / "results")
    # No maintenance in the "job"; log retention 0 so the simulated day's log counts as expired
    # (a real day of commits is cleaned once its files are log_retention_hours old).
    policy = MaintenanceSpec.model_construct(**{**MaintenanceSpec().model_dump(), "compact_every_commits": None,
                                                "log_retention_hours": 0})  # fmt: skip
    if args.job_policy:
        policy = MaintenanceSpec()
        if args.log_retention_hours is not None:  # 0 is below what a spec may set: model_construct
            policy = MaintenanceSpec.model_construct(**{**policy.model_dump(), "log_retention_hours": args.log_retention_hours})
    every = policy.compact_every_commits
    sink = DeltaSink("bench", uri, str(root / "dead_letter"), {}, maintenance=policy)
    sink.open()
    sink.load_positions([("t", 0)])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-job-policy" if args.job_policy else ""
    if args.job_policy and args.log_retention_hours is not None:
        suffix += f"-log{args.log_retention_hours}h"
    out_path = REPO / "bench" / "results" / f"maintenance-{stamp}{suffix}.json"
    result = {"bench": "maintenance", "started": stamp, "commits_planned": args.commits,
              "rows_per_commit": args.rows_per_commit, "policy": policy.model_dump(), "snapshots": []}  # fmt: skip
    rounds: list[float] = []
    last = (0, 0.0)
    empty = None
    t0 = time.perf_counter()
    r = args.rows_per_commit
    for c in range(args.commits):
        offsets = list(range(c * r, (c + 1) * r))
        rows = results_table(offsets)
        if empty is None:
            empty = rows.slice(0, 0)
        sink.commit(rows, empty_dead(), {("t", 0): offsets[-1]})
        if every is not None and (c + 1) % every == 0:  # what actors/writer.py does between commits
            t_round = time.perf_counter()
            sink.maintain()
            rounds.append(time.perf_counter() - t_round)
        if (c + 1) % args.snapshot_every == 0 or c + 1 == args.commits:
            now = time.perf_counter() - t0
            snap = snapshot(uri, c + 1, now)
            snap["commits_per_s_stretch"] = round((c + 1 - last[0]) / max(now - last[1], 1e-9), 1)
            snap.update(on_disk(uri))
            if rounds:
                snap["maintenance_rounds"] = len(rounds)
                snap["maintenance_round_s_mean"] = round(sum(rounds) / len(rounds), 3)
                snap["maintenance_round_s_max"] = round(max(rounds), 3)
            last = (c + 1, now)
            result["snapshots"].append(snap)
            result["commits_per_s"] = round((c + 1) / now, 1)
            out_path.write_text(json.dumps(result, indent=2))
            print(json.dumps(result["snapshots"][-1]), flush=True)
    before = result["snapshots"][-1]
    from deltalake import DeltaTable

    if args.job_policy:
        result["rows_unchanged"] = before["rows"] == args.commits * r
        result["position_unchanged"] = (
            DeltaTable(uri).transaction_version(txn_app_id("bench", ("t", 0))) == args.commits * r - 1
        )
        out_path.write_text(json.dumps(result, indent=2))
        print(f"rows and position intact: {result['rows_unchanged'] and result['position_unchanged']}")
        print(f"wrote {out_path.relative_to(REPO)}")
        return

    dt = DeltaTable(uri)
    zero = MaintenanceSpec.model_construct(**{**policy.model_dump(), "vacuum_retention_hours": 0})
    result["log_before_maintenance"] = "log_retention_hours 0: delta-rs already deletes expired log files at checkpoints"
    report = maintain_table(dt, zero)
    after = snapshot(uri, args.commits, time.perf_counter() - t0)
    result.update(
        maintenance={"compacted": report.compacted, "vacuumed_files": report.vacuumed_files,
                     "seconds": report.seconds, "error": report.error},  # fmt: skip
        before=before, after=after,
        rows_unchanged=after["rows"] == before["rows"] == args.commits * r,
        position_unchanged=DeltaTable(uri).transaction_version(txn_app_id("bench", ("t", 0))) == args.commits * r - 1,
        read_speedup=round(before["read_s"] / max(after["read_s"], 1e-6), 1),
    )  # fmt: skip
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("maintenance", "before", "after", "rows_unchanged",
                                              "position_unchanged", "read_speedup")}, indent=2))  # fmt: skip
    print(f"wrote {out_path.relative_to(REPO)}")


def on_disk(uri: str) -> dict:
    """Files on disk, live or not (vacuum's and log retention's backlog)."""
    root = Path(uri)
    data = [p for p in root.rglob("*.parquet") if "_delta_log" not in p.parts]
    return {"data_files_on_disk": len(data), "data_mb_on_disk": round(sum(p.stat().st_size for p in data) / 2**20, 1)}


def empty_dead():
    from schemas.records import DEAD_LETTER_SCHEMA

    return DEAD_LETTER_SCHEMA.empty_table()


if __name__ == "__main__":
    main()
