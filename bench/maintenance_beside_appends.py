"""Benchmark: what a table maintenance round costs the appends beside it, by where the round runs.

An online replica appends each durable answer's rows to the audit tables and, every
`sink.maintenance.compact_every_commits` commits, runs a maintenance round (compaction, checkpoint,
vacuum) on the same tables. Each leg, in a child process of its own: a fresh results table of
`--files` one-commit files (the round's work: compacting them), then lone 3-row appends through
the sink, one every 10 ms, before, during and after a round that runs

- `thread`: in a thread of the appending process (connectors/audit.py's default, and the online
  replica's before 2026-12-06);
- `process`: in a TableMaintainer actor on a local Ray (actors/maintainer.py: the replica's now;
  its own process, niceness 10);
- `none`: no round (the appends alone, as long as the `thread` leg's round took).

Reported per leg: the round's wall seconds, and the appends that ran while it did: count, p50,
p95 and max ms. Legs alternate, `--rounds` times; the JSON under bench/results/ keeps every leg.

    python bench/maintenance_beside_appends.py [--files 600] [--rounds 3] [--modes none,thread,process]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def leg(mode: str, files: int, none_s: float) -> dict:
    sys.path.insert(0, str(REPO))
    from compute.prompts import dead_letter_table
    from connectors.audit import maintain_tables
    from connectors.delta import DeltaSink
    from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA
    from schemas.spec import parse_spec
    from tests.conftest import make_spec, results_table

    root = Path(tempfile.mkdtemp(prefix="tg-maint-bench-"))
    spec = parse_spec(make_spec(root, None, "t", root / "no-model", **{"source": {"kafka": {"topic": "t"}}}))
    sink = DeltaSink.from_spec(spec)
    sink.open()
    empty = dead_letter_table([], "r")
    for i in range(files):
        sink.append_unpositioned(results_table([i]), empty)
    rounds = None
    if mode == "process":
        import ray

        from actors.maintainer import LowPriorityRounds

        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tgray", dir="/tmp"),
                 object_store_memory=80 * 2**20, log_to_driver=False)  # fmt: skip
        rounds = LowPriorityRounds()
        rounds.start()
        ray.get(rounds.actor.priorities.remote())  # the process is up (its start is not the round's cost)
    offset = files

    def append() -> float:
        nonlocal offset
        rows = results_table(list(range(offset, offset + 3)))
        offset += 3
        t0 = time.perf_counter()
        sink.append_unpositioned(rows, empty)
        return (time.perf_counter() - t0) * 1e3

    before = [append() for _ in range(30)]
    took: list[float] = []
    done = threading.Event()

    def run_round():
        t0 = time.perf_counter()
        if mode == "thread":
            maintain_tables(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)
        elif mode == "process":
            rounds(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)
        else:
            time.sleep(none_s)
        took.append(time.perf_counter() - t0)
        done.set()

    threading.Thread(target=run_round).start()
    during = []
    while not done.is_set():
        during.append(append())
        time.sleep(0.01)
    after = [append() for _ in range(30)]
    if rounds is not None:
        rounds.stop()
    shutil.rmtree(root, ignore_errors=True)

    def stats(xs):
        xs = sorted(xs)
        return {"n": len(xs), "p50_ms": round(statistics.median(xs), 2),
                "p95_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))], 2), "max_ms": round(xs[-1], 2)}  # fmt: skip

    return {"mode": mode, "files": files, "round_s": round(took[0], 3), "appends_during": stats(during),
            "appends_before": stats(before), "appends_after": stats(after)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="none,thread,process")
    ap.add_argument("--leg", help=argparse.SUPPRESS)
    ap.add_argument("--none-s", type=float, default=2.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.leg:
        print(json.dumps(leg(args.leg, args.files, args.none_s)))
        return 0

    sys.path.insert(0, str(REPO))
    from bench.checkouts import commit_of, run_leg

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"maintenance_beside_appends-{stamp}.json"
    result = {"bench": "maintenance_beside_appends", "started": stamp, "code": commit_of(str(REPO)),
              "files": args.files, "legs": []}  # fmt: skip
    none_s = 2.0
    for rnd in range(1, args.rounds + 1):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--leg", mode, "--files", str(args.files), "--none-s", str(none_s)]
            got = run_leg(cmd, result, out, round=rnd)
            if mode == "thread":
                none_s = got["round_s"]  # the next `none` leg appends as long as this round took
            d = got["appends_during"]
            print(f"round {rnd} {mode:7} round {got['round_s']:5.2f} s; appends during it: n={d['n']:3} "
                  f"p50 {d['p50_ms']:6.1f} p95 {d['p95_ms']:6.1f} max {d['max_ms']:6.1f} ms "
                  f"(alone before: p50 {got['appends_before']['p50_ms']:.1f})", flush=True)  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
