"""Orchestration ceiling: the whole job with the engine replaced by an instant stand-in.

    python bench/orchestration.py [--events 200000] [--batch-size 1024] [--runs 2]

Kafka in (tansu, 8 partitions), render, the default rules (refusal, pii_leakage), assembly and
Delta commits, with `bench/instant_engine.py` instead of vLLM (same interface, answers at once):
how many rows/s the pipeline around the engine can carry on this machine, and what each process
costs per row. Each run: events produced first, then `python -m tests.job_runner --instant-engine
--until-drained`; steady rows/s = rows committed after the first commit / time from the first to
the last commit (Delta log times); CPU seconds per process (driver, stage worker, commit writer,
engine actor, Ray's own) sampled until the job exits, per 10,000 rows.

Writes bench/results/orchestration-<UTC time>-b<batch size>-s<stage actors>.json (every run, not the best one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_by_role(pid: int) -> dict[int, tuple[str, float]]:
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
                name = "driver" if p.pid == pid else p.name().split(".")[0]
                out[p.pid] = (name, t.user + t.system)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def commit_times(uri: str) -> list[tuple[float, int]]:
    """(commit time s, rows added) of each commit of a Delta table, from its log."""
    from deltalake import DeltaTable

    dt = DeltaTable(uri)
    out = []
    for h in dt.history():
        rows = int((h.get("operationMetrics") or {}).get("num_added_rows", 0) or 0)
        if h.get("operation") in ("WRITE", "APPEND") or rows:
            out.append((h["timestamp"] / 1000.0, rows))
    return sorted(out)


def produce(bootstrap: str, topic: str, n: int) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024)
    for i in range(n):
        value = f'{{"id": "o{i:08d}", "user": "user-{i % 97}", "question": "what is the status of order {i}?"}}'
        producer.send(topic, key=str(i).encode(), value=value.encode())
    producer.flush()
    producer.close()


def run_once(events: int, batch_size: int, workdir: Path, stages: int) -> dict:
    import yaml

    from connectors.broker import EmbeddedBroker
    from connectors.kafka import create_topic

    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        topic = f"orch-{uuid.uuid4().hex[:8]}"
        create_topic(broker.bootstrap_servers, topic, 8)
        produce(broker.bootstrap_servers, topic, events)
        (workdir / "no-model").mkdir(exist_ok=True)
        (workdir / "no-model" / "config.json").write_text("{}")
        name = f"orch{uuid.uuid4().hex[:6]}"
        spec = {
            "name": name,
            "source": {"kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic}},
            "prompt": {"template": "Answer for {{ user }}: {{ question }}", "id_field": "id"},
            "model": {"path": str(workdir / "no-model")},
            "sampling": {"max_tokens": 16},
            "pool": {"batch_size": batch_size, "num_cpus": 0.25, "batches_in_flight": 4},
            "stages": {"actors": stages},
            "sink": {"results": str(workdir / name / "results"), "dead_letter": str(workdir / name / "dead_letter"),
                     "commit_max_rows": 16384},
        }  # fmt: skip
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = dict(os.environ, TIDEGATE_RAY_TEMP_DIR=tempfile.mkdtemp(prefix="tgorch", dir="/tmp"),
                   TIDEGATE_LOG_LEVEL="WARNING")  # fmt: skip
        log = open(workdir / f"{name}.log", "wb")
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "tests.job_runner", str(path), "--until-drained",
                                 "--instant-engine"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        cpu: dict[int, tuple[str, float]] = {}
        series: list[tuple[float, dict[int, tuple[str, float]]]] = []  # (wall time, cumulative CPU per pid)
        while proc.poll() is None:
            snap = cpu_by_role(proc.pid)
            cpu.update(snap)
            series.append((time.time(), dict(cpu)))
            time.sleep(0.25)
        wall = time.monotonic() - t0
        if proc.returncode:
            raise SystemExit(f"job failed; see {workdir / (name + '.log')}")
    commits = commit_times(spec["sink"]["results"])
    rows = sum(r for _, r in commits)
    first_t, first_rows = commits[0]
    span = commits[-1][0] - first_t
    by_role: dict[str, float] = {}
    for role, secs in cpu.values():
        by_role[role] = by_role.get(role, 0.0) + secs
    per_10k = {role: round(secs / rows * 10_000, 3) for role, secs in sorted(by_role.items(), key=lambda kv: -kv[1])}
    # Steady state: CPU spent between the first and the last commit, per row committed in between
    # (start-up imports and the engine load are left out).
    at = lambda t: min(series, key=lambda s: abs(s[0] - t))[1]  # noqa: E731
    start, end = at(first_t), at(commits[-1][0])
    steady: dict[str, float] = {}
    for pid, (role, secs) in end.items():
        steady[role] = steady.get(role, 0.0) + secs - start.get(pid, (role, 0.0))[1]
    steady_rows = rows - first_rows
    steady_us = {role: round(secs / steady_rows * 1e6, 1) for role, secs in sorted(steady.items(), key=lambda kv: -kv[1])
                 if steady_rows and secs > 0}  # fmt: skip
    return {
        "events": events,
        "rows": rows,
        "commits": len(commits),
        "wall_s_including_startup": round(wall, 1),
        "steady_rows_per_s": round((rows - first_rows) / span, 1) if span > 0 else None,
        "cpu_s_per_10k_rows": per_10k,
        "steady_cpu_us_per_row": steady_us,
        "steady_cpu_us_per_row_total": round(sum(steady_us.values()), 1),
        "cpu_s_total": round(sum(by_role.values()), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--stages", type=int, default=1, help="stages.actors")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tidegate-orch-"))
    runs = []
    for i in range(a.runs):
        r = run_once(a.events, a.batch_size, workdir, a.stages)
        runs.append(r)
        print(json.dumps(r, indent=1))
    result = {
        "bench": "orchestration",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "batch_size": a.batch_size,
        "stages_actors": a.stages,
        "runs": runs,
    }
    stamp = result["measured_at"][:19].replace(":", "").replace("-", "")
    out = a.out or REPO / "bench" / "results" / f"orchestration-{stamp}Z-b{a.batch_size}-s{a.stages}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
