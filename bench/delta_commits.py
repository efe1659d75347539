"""Benchmark: what one commit through the Delta sink costs as the table's log grows, code against code.

Each side is a checkout of Tidegate (`--code NAME=PATH`; default: this tree, as `now`). A leg runs
in a child process that imports that checkout's `connectors.delta` and writes `--commits` commits
to a fresh table on a local disk, the way Tidegate's writers do:

- batch: `DeltaSink.commit`, 5 result rows with their partition's position (the commit writer:
  one every `sink.commit_interval_s`);
- audit: `DeltaSink.append_unpositioned`, 3 result rows (an online replica's group commit under
  `serve.ack: durable`, docs/serving.md). Where the checkout's sink has `defer_checkpoints` (the
  online audit's since 2026-12-06), it is used as the audit uses it: an append only marks a
  checkpoint due and `write_checkpoints()` writes it after the append's time is taken (after the
  answer); its wall time is reported apart, its CPU is in the commit's.

The tables get the sink's default policy (`log_retention_hours` 24: nothing expires during a run,
as on a table's first day; `--checkpoint-intervals 100,20`: legs with each
`sink.maintenance.checkpoint_interval`) and no maintenance round runs. Reported per window of `--window`
commits: wall ms per commit (mean, p95) and the child's CPU ms per commit (every thread of it,
delta-rs's included), and the log's file count at the end; per leg also the commits' wall p50 and
p95 (what a lone request's durable answer waits for). Legs alternate the codes, `--rounds`
times; the JSON under bench/results/ keeps every leg.

    python bench/delta_commits.py --code before=/tmp/base,now=. [--commits 3000] [--rounds 2]
        [--checkpoint-intervals 100,20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def leg(code: Path, mode: str, commits: int, window: int, checkpoint_interval: int | None = None) -> dict:
    """One leg, in this (child) process: `code`'s sink, a fresh table, `commits` commits."""
    sys.path.insert(0, str(code))
    from connectors.delta import DeltaSink
    from schemas.records import DEAD_LETTER_SCHEMA
    from schemas.spec import MaintenanceSpec
    from tests.conftest import results_table

    root = Path(tempfile.mkdtemp(prefix="tg-delta-commits-"))
    maintenance = MaintenanceSpec(checkpoint_interval=checkpoint_interval) if checkpoint_interval else None
    sink = DeltaSink("bench", str(root / "results"), str(root / "dead_letter"), {}, maintenance=maintenance)
    deferred = mode == "audit" and hasattr(sink, "defer_checkpoints")
    if deferred:
        sink.defer_checkpoints()
    sink.open()
    checkpoints: list[float] = []  # deferred ones: wall s each
    tp = ("t", 0)
    sink.load_positions([tp])
    empty = DEAD_LETTER_SCHEMA.empty_table()
    rows_per = 5 if mode == "batch" else 3
    walls: list[float] = []
    cpus: list[float] = []
    for i in range(commits):
        offsets = list(range(i * rows_per, (i + 1) * rows_per))
        rows = results_table(offsets)
        w0, c0 = time.perf_counter(), time.process_time()
        if mode == "batch":
            sink.commit(rows, empty, {tp: offsets[-1]})
        else:
            sink.append_unpositioned(rows, empty)
        walls.append(time.perf_counter() - w0)
        if deferred:  # after the answer, as jobs/serve.py does
            k0 = time.perf_counter()
            if sink.write_checkpoints():
                checkpoints.append(time.perf_counter() - k0)
        cpus.append(time.process_time() - c0)
    windows = []
    for start in range(0, commits, window):
        w, c = walls[start : start + window], cpus[start : start + window]
        windows.append({
            "commits": f"{start + 1}-{start + len(w)}",
            "wall_ms_mean": round(statistics.fmean(w) * 1e3, 2),
            "wall_ms_p95": round(statistics.quantiles(w, n=20)[18] * 1e3, 2) if len(w) >= 20 else None,
            "cpu_ms_mean": round(statistics.fmean(c) * 1e3, 2),
        })  # fmt: skip
    log_files = len(os.listdir(root / "results" / "_delta_log"))
    shutil.rmtree(root)
    return {"mode": mode, "commits": commits, "checkpoint_interval": sink.maintenance.checkpoint_interval, "wall_ms_mean": round(statistics.fmean(walls) * 1e3, 2),
            "cpu_ms_mean": round(statistics.fmean(cpus) * 1e3, 2), "log_files_at_end": log_files,
            "wall_ms_p50": round(statistics.median(walls) * 1e3, 2),
            "wall_ms_p95": round(statistics.quantiles(walls, n=20)[18] * 1e3, 2),
            "checkpoints_after_the_commit": len(checkpoints) if deferred else None,
            "checkpoint_ms_mean": round(statistics.fmean(checkpoints) * 1e3, 2) if checkpoints else None,
            "windows": windows}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default="now=.", help="NAME=PATH,... checkouts to compare (PATH: a Tidegate repo root)")
    ap.add_argument("--modes", default="audit,batch")
    ap.add_argument("--commits", type=int, default=3000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkpoint-intervals", default="",
                    help="N,...: legs with each sink.maintenance.checkpoint_interval (default: the sink's)")
    ap.add_argument("--leg", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)  # the child's side
    args = ap.parse_args()
    if args.leg:
        ck = int(args.checkpoint_intervals) if args.checkpoint_intervals else None
        print(json.dumps(leg(Path(args.leg[0]).resolve(), args.leg[1], args.commits, args.window, ck)))
        return 0

    sys.path.insert(0, str(REPO))
    from bench.checkouts import commit_of, parse_codes, run_leg

    codes = parse_codes(args.code)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"bench": "delta_commits", "started": stamp, "codes": {name: commit_of(path) for name, path in codes.items()},
              "commits": args.commits, "window": args.window, "legs": []}  # fmt: skip
    out = REPO / "bench" / "results" / f"delta_commits-{stamp}.json"
    for rnd in range(1, args.rounds + 1):
        for mode in args.modes.split(","):
            for name, path in codes.items():
                for ck in args.checkpoint_intervals.split(",") if args.checkpoint_intervals else [""]:
                    cmd = [sys.executable, __file__, "--leg", path, mode, "--commits", str(args.commits),
                           "--window", str(args.window), "--checkpoint-intervals", ck]  # fmt: skip
                    got = run_leg(cmd, result, out, round=rnd, code=name)
                    first, last = got["windows"][0], got["windows"][-1]
                    print(f"round {rnd} {mode:5} {name:8} checkpoint every {got['checkpoint_interval']:4} "
                          f"mean {got['wall_ms_mean']:6.2f} ms (cpu {got['cpu_ms_mean']:6.2f}); "
                          f"commits {first['commits']}: {first['wall_ms_mean']:6.2f} ms, {last['commits']}: "
                          f"{last['wall_ms_mean']:6.2f} ms; p50/p95 {got['wall_ms_p50']:.2f}/{got['wall_ms_p95']:.2f} ms; "
                          f"checkpoints after: {got['checkpoints_after_the_commit']} "
                          f"({got['checkpoint_ms_mean']} ms); log files {got['log_files_at_end']}", flush=True)  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
