"""Soak: a long run of the whole job (Kafka in, Delta out) with the instant engine, watching memory.

    python bench/soak.py [--events 1000000] [--partitions 8] [--out bench/results/soak-<UTC time>-<events>.json]
    make soak

What it does: starts the embedded broker, produces `--events` events to a topic, runs one job
(`python -m tests.job_runner --instant-engine`: the real driver, stage actors, commit writer and
engine actor, with an engine that answers at once, so 1M events take minutes, not hours) until the
topic is drained, and samples the RSS of every process of the job every `--sample-s` seconds.

What it reports (JSON, and a summary on stdout):
  - per process (driver, raylet, gcs, StageWorker, CommitWriter, EngineWorker, ...): RSS at start,
    end and peak, and the slope of a least-squares line over the second half of the run (MB/min);
  - throughput (rows/s), commits, exactly-once check (every id once);
  - the Delta log: commit files, checkpoints, the table's open time at the end;
  - read -> completion latency (latency_ms) p50 / p95 per tenth of the run (stable or drifting).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(samples) < 3:
        return 0.0
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def _role(p) -> str:
    name = p.name()
    if name.startswith("ray::"):
        return name.split(".")[0]
    cmd = " ".join(p.cmdline()[:3])
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "reaper", "tansu"):
        if key in cmd:
            return key
    return name


def soak(events: int, partitions: int, sample_s: float, workdir: Path, log=print) -> dict:
    import polars as pl
    import psutil
    import yaml
    from deltalake import DeltaTable

    from connectors.broker import EmbeddedBroker
    from connectors.kafka import create_topic

    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    try:
        topic = f"soak-{uuid.uuid4().hex[:8]}"
        create_topic(broker.bootstrap_servers, topic, partitions)
        t0 = time.monotonic()
        _produce(broker.bootstrap_servers, topic, events)
        log(f"produced {events:,} events in {time.monotonic() - t0:.1f}s")
        (workdir / "no-model").mkdir(exist_ok=True)
        (workdir / "no-model" / "config.json").write_text("{}")
        spec = {
            "name": "soak",
            "source": {"kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic}},
            "prompt": {"template": "Answer for {{ user }}: {{ question }}", "id_field": "id"},
            "model": {"path": str(workdir / "no-model")},
            "sampling": {"max_tokens": 16},
            "pool": {"batch_size": 1024, "num_cpus": 0.5},
            "sink": {"results": str(workdir / "lake" / "results"), "dead_letter": str(workdir / "lake" / "dead_letter")},
        }
        spec_path = workdir / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        ray_tmp = tempfile.mkdtemp(prefix="tgsoak", dir="/tmp")
        env = dict(os.environ, TIDEGATE_RAY_TEMP_DIR=ray_tmp, PYTHONUNBUFFERED="1")
        logf = open(workdir / "job.log", "wb")
        cmd = [sys.executable, "-m", "tests.job_runner", str(spec_path), "--until-drained", "--instant-engine"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
        rss: dict[str, list[tuple[float, float]]] = {}
        started = time.monotonic()
        first_commit_s = None
        first_log = Path(spec["sink"]["results"]) / "_delta_log" / f"{1:020d}.json"
        try:
            while proc.poll() is None:
                now = time.monotonic() - started
                try:
                    family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    break
                per_role: dict[str, float] = {}
                for p in family:
                    try:
                        role = "driver" if p.pid == proc.pid else _role(p)
                        per_role[role] = per_role.get(role, 0.0) + p.memory_info().rss / 2**20
                    except psutil.NoSuchProcess:
                        pass
                for role, mb in per_role.items():
                    rss.setdefault(role, []).append((now, mb))
                if first_commit_s is None and first_log.exists():
                    first_commit_s = now  # steady state from here: imports and start-up are done
                time.sleep(sample_s)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
        elapsed = time.monotonic() - started
        rc = proc.returncode
        res_uri = spec["sink"]["results"]
        res = pl.read_delta(res_uri, columns=["id", "latency_ms", "processed_at"])
        log_dir = Path(res_uri) / "_delta_log"
        t1 = time.monotonic()
        dt = DeltaTable(res_uri)
        open_ms = (time.monotonic() - t1) * 1e3
        deciles = []
        ordered = res.sort("processed_at")
        step = max(1, ordered.height // 10)
        for i in range(0, ordered.height - step + 1, step):
            lat = ordered["latency_ms"][i : i + step]
            deciles.append({"p50_ms": round(float(lat.quantile(0.5)), 1), "p95_ms": round(float(lat.quantile(0.95)), 1)})
        report = {
            "events": events,
            "partitions": partitions,
            "exit_code": rc,
            "elapsed_s": round(elapsed, 1),
            "rows_per_s": round(res.height / elapsed, 1),
            "rows": res.height,
            "unique_ids": res["id"].n_unique(),
            "exactly_once": res.height == res["id"].n_unique() == events,
            "delta": {
                "version": dt.version(),
                "commit_files": len(list(log_dir.glob("*.json"))),
                "checkpoints": len(list(log_dir.glob("*.checkpoint.parquet"))),
                "open_ms": round(open_ms, 1),
            },
            "latency_by_tenth": deciles[:10],
            "first_commit_s": None if first_commit_s is None else round(first_commit_s, 1),
            "rss": {
                role: {
                    "start_mb": round(pts[0][1], 1),
                    "end_mb": round(pts[-1][1], 1),
                    "peak_mb": round(max(mb for _, mb in pts), 1),
                    # the slope once the job is past its start-up (after the first commit), and
                    # over the second half of that steady part
                    "slope_steady_mb_per_min": round(slope_mb_per_min(steady := [p for p in pts if p[0] >= (first_commit_s or 0)]), 2),
                    "slope_second_half_mb_per_min": round(slope_mb_per_min(steady[len(steady) // 2 :]), 2),
                    "samples": len(pts),
                }
                for role, pts in sorted(rss.items())
            },
        }
        return report
    finally:
        broker.stop()


def _produce(bootstrap: str, topic: str, n: int) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024)
    for i in range(n):
        value = f'{{"id": "s{i:08d}", "user": "user-{i % 97}", "question": "status of order {i}?"}}'.encode()
        producer.send(topic, key=str(i).encode(), value=value)
    producer.flush()
    producer.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tidegate-soak-"))
    report = soak(a.events, a.partitions, a.sample_s, workdir)
    report["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stamp = report["measured_at"][:19].replace(":", "").replace("-", "")
    out = a.out or REPO / "bench" / "results" / f"soak-{stamp}Z-{a.events}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0 if report["exactly_once"] and report["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
