"""Benchmark: online requests and a batch job on the same engine (`pool.backend: serve`), with the
replica's engine scheduling by priority (the default: batch rows wait behind online requests) and
first come, first served (`model.engine_args: {scheduling_policy: fcfs}`), side by side.

Sides: priority (the default), fcfs, share:X (priority and serve.batch_share X: batch rows hold at
most that share of the running set, the rest kept for online requests).

One local Ray (this process) with Serve's HAProxy ingress, one tansu broker. For each side, in
rounds alternating the sides (the machine's drift hits both):
  deploy    the spec's application (serve.auth off, no encryption: the engine's queue is measured)
  alone     --clients closed-loop clients for --seconds: POST /v1/chat/completions; latency p50/p95/p99
  shared    a batch job (`python -m jobs.run SPEC --address <this Ray>`, pool.backend serve, its own
            topic of --events events) fills the engine; once its first rows are committed, the same
            online load for --seconds; the batch rows committed meanwhile give its rows/s; then the
            job is stopped (SIGTERM, graceful)
The workload: temperature 1, max_tokens 64, logit_bias +4 on the end token (outputs from one token
to the limit); model.max_num_seqs 32 and batches of 64 x 2 in flight, so batch rows wait for the
running set (where priorities matter: vLLM starts waiting requests by priority, and does not
preempt running ones for it unless the KV cache runs out).

    python bench/serve_shared.py [--clients 4] [--seconds 40] [--rounds 2] [--events 6000]
        [--sides priority,fcfs,share:0.75]

Prints a summary and writes bench/results/serve_shared-<UTC time>.json (every run is kept).
Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_load import PROMPTS, _load, free_port, write_result  # noqa: E402


def batch_rows(results: str, topic: str) -> int:
    import polars as pl

    try:
        return pl.read_delta(results).filter(pl.col("source_topic") == topic).height
    except Exception:  # noqa: BLE001 - the table does not exist yet
        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--sides", default="priority,fcfs")
    a = ap.parse_args()

    import ray
    from ray import serve

    from connectors.broker import EmbeddedBroker
    from connectors.kafka import create_topic, produce
    from jobs.serve import deploy, ingress_env
    from jobs.tiny_model import build_tiny_model
    from schemas.spec import parse_spec

    work = Path(tempfile.mkdtemp(prefix="serve-shared-"))
    model = build_tiny_model(work / "model")
    end_token = int(json.loads((Path(model) / "config.json").read_text())["eos_token_id"])
    port = free_port()
    runs = []
    with EmbeddedBroker() as broker:
        base = {
            "name": "shared-bench",
            "source": {"kafka": {"topic": "t0", "bootstrap_servers": [broker.bootstrap_servers],
                                 "poll_timeout_ms": 100}},
            "prompt": {"template": "{{ q }}", "id_field": "id"},
            "model": {"path": str(model), "dtype": "float32", "kv_cache_gib": 1, "max_num_seqs": 32},
            "sampling": {"temperature": 1.0, "max_tokens": 64, "logit_bias": {end_token: 4.0}},
            "pool": {"backend": "serve", "actors": 1, "batch_size": 64, "batches_in_flight": 2},
            "sink": {"results": str(work / "lake" / "results"), "dead_letter": str(work / "lake" / "dead"),
                     "commit_interval_s": 1.0},
            "serve": {"port": port, "num_cpus": 1, "auth": False, "ack": "journal",
                      "journal_dir": str(work / "journals"), "max_ongoing_requests": 256},
        }  # fmt: skip
        os.environ.update(ingress_env(parse_spec(base)))
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tgray", dir="/tmp"))
        gcs = ray.get_runtime_context().gcs_address
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def body(max_tokens: int):
            def of(k: int) -> dict:
                return {"model": str(model), "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                        "max_tokens": max_tokens}  # fmt: skip

            return of

        for rnd in range(1, a.rounds + 1):
            for side in a.sides.split(","):
                topic = f"shared-{rnd}-{side.replace(':', '-').replace('.', '')}"
                create_topic(broker.bootstrap_servers, topic, 4)
                events = ({"id": f"{topic}-{i}", "q": PROMPTS[i % len(PROMPTS)]} for i in range(a.events))
                produce(broker.bootstrap_servers, topic, ((e["id"].encode(), json.dumps(e).encode()) for e in events))
                spec = copy.deepcopy(base)  # (a JSON round trip would make logit_bias keys strings)
                spec["source"]["kafka"]["topic"] = topic
                if side == "fcfs":
                    spec["model"]["engine_args"] = {"scheduling_policy": "fcfs"}
                elif side.startswith("share:"):  # share:0.75 -> serve.batch_share 0.75
                    spec["serve"]["batch_share"] = float(side.split(":")[1])
                path = work / f"spec-{rnd}-{side.replace(':', '-')}.yaml"
                path.write_text(yaml.safe_dump(spec))
                t0 = time.monotonic()
                deploy(parse_spec(spec))
                deploy_s = time.monotonic() - t0
                asyncio.run(_load(url, {}, body(4), 2, None, 20))  # warm-up
                alone = asyncio.run(_load(url, {}, body(64), a.clients, a.seconds, None))
                log = work / f"job-{rnd}-{side.replace(':', '-')}.log"
                with open(log, "wb") as fh:
                    job = subprocess.Popen([sys.executable, "-m", "jobs.run", str(path), "--address", gcs], cwd=REPO,
                                           stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
                try:
                    deadline = time.monotonic() + 300
                    while batch_rows(spec["sink"]["results"], topic) == 0:
                        if job.poll() is not None or time.monotonic() > deadline:
                            raise SystemExit(f"the batch job committed nothing; log {log}:\n{log.read_text()[-3000:]}")
                        time.sleep(1)
                    before, t_start = batch_rows(spec["sink"]["results"], topic), time.monotonic()
                    shared = asyncio.run(_load(url, {}, body(64), a.clients, a.seconds, None))
                    after, t_end = batch_rows(spec["sink"]["results"], topic), time.monotonic()
                finally:
                    job.send_signal(signal.SIGTERM)  # our own child, by PID: a graceful stop
                    try:
                        job.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        job.kill()
                        job.wait()
                serve.delete(spec["name"])
                batch = {"rows": after - before, "seconds": round(t_end - t_start, 1),
                         "rows_per_s": round((after - before) / (t_end - t_start), 2), "exit": job.returncode}  # fmt: skip
                run = {"round": rnd, "side": side, "deploy_s": round(deploy_s, 1), "alone": alone, "shared": shared,
                       "batch": batch}  # fmt: skip
                runs.append(run)
                print(f"round {rnd} {side:8s} alone p50/p95 {alone['latency_ms']['p50']}/{alone['latency_ms']['p95']} ms "
                      f"{alone['requests_per_s']} req/s | with the batch job p50/p95 {shared['latency_ms']['p50']}/"
                      f"{shared['latency_ms']['p95']} ms {shared['requests_per_s']} req/s, batch {batch['rows_per_s']} rows/s "
                      f"errors {shared['errors']}", flush=True)  # fmt: skip
        ray.shutdown()

    summary = {}
    for side in a.sides.split(","):
        mine = [r for r in runs if r["side"] == side]
        summary[side] = {
            "alone_p95_ms": [r["alone"]["latency_ms"]["p95"] for r in mine],
            "shared_p50_ms": [r["shared"]["latency_ms"]["p50"] for r in mine],
            "shared_p95_ms": [r["shared"]["latency_ms"]["p95"] for r in mine],
            "shared_over_alone_p95": [round(r["shared"]["latency_ms"]["p95"] / r["alone"]["latency_ms"]["p95"], 2)
                                      for r in mine],
            "batch_rows_per_s": [r["batch"]["rows_per_s"] for r in mine],
        }  # fmt: skip
    out = {"bench": "serve_shared", "at": datetime.now(timezone.utc).isoformat(), "machine": {"cpus": os.cpu_count()},
           "args": vars(a), "runs": runs, "summary": summary}  # fmt: skip
    write_result(out, summary)


if __name__ == "__main__":
    main()
