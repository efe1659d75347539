"""Benchmark: `tidegate serve` (all guards on) against vLLM's own OpenAI server on the same model,
side by side in one invocation, under bounded loopback load.

Servers (one at a time, each on the whole machine):
  vllm      python -m vllm.entrypoints.openai.api_server --model MODEL (what `vllm serve` runs)
  tidegate  python -m jobs.cli serve SPEC on its own local Ray: API key auth, the default rules
            (refusal, pii_leakage), output_text encrypted under the tenant's key, every request an
            audit row committed before its answer (serve.ack durable; --ack journal: fsync'd in the
            replica's journal before its answer, committed every second)

Phases, for each server, in rounds alternating vllm, tidegate (the machine's drift hits both):
  load      --clients concurrent clients (asyncio, one connection each) for --seconds: POST
            /v1/chat/completions, temperature 1, max_tokens 64, logit_bias +4 on the model's end
            token (outputs from one token to the limit); requests/s, output tokens/s, latency p50/p95/p99
  overhead  one client, --overhead-requests requests with max_tokens 1: the latency of a request
            that costs the engine almost nothing, so tidegate p95 - vllm p95 is what the guards,
            Serve's proxy and the audit commit add to a request

    python bench/serve_load.py [--clients 32] [--seconds 60] [--rounds 2] [--overhead-requests 200]
        [--ack durable|journal|buffered] [--engine-process separate|inline] [--alternate]
        [--sides vllm,tidegate:inline:durable,tidegate:separate:journal,tidegate:durable:gc0,tidegate:durable:ck20,...]
        [--code before=/path/to/checkout --sides vllm,tidegate:durable@before,tidegate:durable]

Each tidegate run writes tables of its own (a table's log length costs each commit); the run's
record has the results table's version after it (~ the audit's commits).

Prints a summary and writes bench/results/serve_load-<UTC time>.json (every run is kept).
Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.checkouts import commit_of, parse_codes  # noqa: E402

PROMPTS = [
    "Summarise the customer's complaint about a late parcel in two sentences.",
    "Write a short, polite reply to a customer asking for a refund.",
    "List three reasons why an order could be delayed.",
    "Explain what a return label is to a new customer.",
    "Draft a follow-up message for an unanswered support ticket.",
    "Classify this message as billing, shipping or other: my card was charged twice.",
]


def free_port() -> int:
    from connectors.broker import free_port as fp

    return fp()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _load(url: str, headers: dict, body_of, clients: int, seconds: float | None, total: int | None) -> dict:
    lat: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds if seconds else None
    sent = 0

    async def client(i: int) -> None:
        nonlocal tokens, sent
        async with httpx.AsyncClient(timeout=300) as http:
            k = i
            while True:
                if stop_at is not None and time.monotonic() >= stop_at:
                    return
                if total is not None:
                    if sent >= total:
                        return
                    sent += 1
                t0 = time.monotonic()
                try:
                    r = await http.post(url, json=body_of(k), headers=headers)
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                dt = time.monotonic() - t0
                k += clients
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    continue
                lat.append(dt)
                tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.monotonic() - t0
    return {
        "requests": len(lat), "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1), "mean_output_tokens": round(tokens / max(1, len(lat)), 1),
        "latency_ms": {f"p{q}": round(pct(lat, q) * 1000, 1) if lat else None for q in (50, 95, 99)},
        "errors": errors,
    }  # fmt: skip


def write_result(out: dict, summary: dict) -> Path:
    """bench/results/<out["bench"]>-<UTC time>.json (every run is kept); prints the summary."""
    dest = REPO / "bench" / "results" / f"{out['bench']}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written {dest}")
    return dest


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"server not ready in {timeout}s; log {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # our own child, by PID
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--overhead-requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sides", default="vllm,tidegate",
                    help="which servers, in each round's order; a tidegate side may set serve.engine_process, "
                         "serve.ack, serve.ingress, serve.group_commit_ms (gcN) and sink.maintenance.checkpoint_interval (ckN): "
                         "tidegate:inline, tidegate:separate:durable, tidegate:proxy, tidegate:durable:gc0, "
                         "tidegate:durable:ck20, ...")  # fmt: skip
    ap.add_argument("--alternate", action="store_true",
                    help="run the sides in reverse order in every second round (the machine's drift within a "
                         "round then favours no side)")
    ap.add_argument("--engine-process", default="separate", choices=["separate", "inline"],
                    help="tidegate's serve.engine_process where a side does not say")
    ap.add_argument("--ack", default="durable", choices=["durable", "journal", "buffered"],
                    help="tidegate's serve.ack")
    ap.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"],
                    help="tidegate's serve.ingress where a side does not say")
    ap.add_argument("--code", default="",
                    help="NAME=PATH,...: other Tidegate checkouts a tidegate side may run from (@NAME), "
                         "e.g. --code before=/tmp/base --sides vllm,tidegate:durable@before,tidegate:durable")  # fmt: skip
    a = ap.parse_args()
    codes = {name: str(Path(path).resolve()) for name, path in parse_codes(a.code).items()}

    from deltalake import DeltaTable

    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from jobs.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = build_tiny_model(work / "model")
    end_token = int(json.loads((Path(model) / "config.json").read_text())["eos_token_id"])
    env = dict(os.environ, TIDEGATE_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
               VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TIDEGATE_RAY_TEMP_DIR=tempfile.mkdtemp(prefix="tgray", dir="/tmp"))  # fmt: skip
    os.environ["TIDEGATE_MASTER_KEY"] = env["TIDEGATE_MASTER_KEY"]
    kr = Keyring.init(work / "keyring.json", LocalMasterKeyProvider())
    kr.create_tenant("acme")
    _, token = kr.create_api_key("acme")
    sampling = {"temperature": 1.0, "max_tokens": a.max_tokens}
    spec = {
        "name": "serve-bench", "source": {"kafka": {"topic": "unused", "bootstrap_servers": ["127.0.0.1:9"]}},
        "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": str(model), "dtype": "float32", "kv_cache_gib": 1},
        "sampling": {**sampling, "logit_bias": {end_token: 4.0}},
        "pool": {"num_cpus": 1},
        "sink": {"results": str(work / "lake" / "results"), "dead_letter": str(work / "lake" / "dead"),
                 "commit_interval_s": 1.0},
        "encryption": {"keyring": str(work / "keyring.json"), "tenant": "acme", "output_fields": ["output_text"]},
        "serve": {"num_cpus": 1, "max_ongoing_requests": 256, "max_queued_requests": 1024, "ack": a.ack,
                  "journal_dir": str(work / "journals")},
    }  # fmt: skip

    def body(max_tokens: int, bias: bool):
        def of(k: int) -> dict:
            b = {"model": str(model), "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                 "temperature": 1.0, "max_tokens": max_tokens}  # fmt: skip
            if bias:  # vLLM's server takes the bias per request; tidegate's comes from the spec
                b["logit_bias"] = {str(end_token): 4.0}
            return b

        return of

    runs = []
    for rnd in range(1, a.rounds + 1):
        order = a.sides.split(",")
        for side in (order[::-1] if a.alternate and rnd % 2 == 0 else order):
            port = free_port()
            log = work / f"{side.replace(':', '-')}-{rnd}.log"
            if side == "vllm":
                cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port",
                       str(port), "--dtype", "float32", "--enforce-eager"]  # fmt: skip
                headers = {}
                ready = f"http://127.0.0.1:{port}/v1/models"
                cwd = str(REPO)
            else:
                side_name, _, code_name = side.partition("@")  # e.g. tidegate:durable@before
                opts = side_name.split(":")[1:]  # e.g. tidegate:inline:durable
                engine_process = next((o for o in opts if o in ("inline", "separate")), a.engine_process)
                ack = next((o for o in opts if o in ("durable", "journal", "buffered")), a.ack)
                ingress = next((o for o in opts if o in ("haproxy", "proxy")), a.ingress)
                lake = work / f"lake-{side.replace(':', '-')}-{rnd}"  # each run its own tables (a log's length costs each commit)
                group_ms = next((float(o[2:]) for o in opts if o.startswith("gc")), None)  # e.g. gc100
                serve_keys = {} if group_ms is None else {"group_commit_ms": group_ms}
                checkpoints = next((int(o[2:]) for o in opts if o.startswith("ck")), None)  # e.g. ck20
                sink_keys = {} if checkpoints is None else {"maintenance": {"checkpoint_interval": checkpoints}}
                s = {**spec, "serve": {**spec["serve"], "port": port, "engine_process": engine_process, "ack": ack,
                                       "ingress": ingress, **serve_keys},
                     "sink": {**spec["sink"], "results": str(lake / "results"), "dead_letter": str(lake / "dead"),
                              **sink_keys}}  # fmt: skip
                path = work / f"spec-{rnd}.yaml"
                path.write_text(yaml.safe_dump(s))
                cmd = [sys.executable, "-m", "jobs.cli", "serve", str(path)]
                cwd = codes[code_name] if code_name else str(REPO)  # its jobs/ and every module its Ray workers import
                headers = {"Authorization": f"Bearer {token}"}
                ready = f"http://127.0.0.1:{port}/readyz"
            with open(log, "wb") as fh:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            try:
                start_s = wait_ready(ready, proc, log)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                asyncio.run(_load(url, headers, body(4, side == "vllm"), 4, None, 40))  # warm-up
                load = asyncio.run(_load(url, headers, body(a.max_tokens, side == "vllm"), a.clients, a.seconds, None))
                over = asyncio.run(_load(url, headers, body(1, False), 1, None, a.overhead_requests))
            finally:
                stop(proc)
            run = {"round": rnd, "side": side, "start_s": round(start_s, 1), "load": load, "overhead": over}
            if side != "vllm":  # the results table version after the run: ~ the audit's commits (and maintenance rounds)
                run["results_table_version"] = DeltaTable(str(lake / "results")).version()
            runs.append(run)
            print(f"round {rnd} {side:17s} load {load['requests_per_s']:7.2f} req/s {load['output_tokens_per_s']:8.1f} tok/s "
                  f"p50/p95/p99 {load['latency_ms']['p50']}/{load['latency_ms']['p95']}/{load['latency_ms']['p99']} ms "
                  f"errors {load['errors']} | 1-token p50/p95 {over['latency_ms']['p50']}/{over['latency_ms']['p95']} ms",
                  flush=True)  # fmt: skip

    summary: dict = {"vllm_requests_per_s": [r["load"]["requests_per_s"] for r in runs if r["side"] == "vllm"]}
    for side in [x for x in a.sides.split(",") if x != "vllm"]:
        pairs = [(v, t) for v in runs for t in runs
                 if v["side"] == "vllm" and t["side"] == side and v["round"] == t["round"]]  # fmt: skip
        ratios = [t["load"]["requests_per_s"] / v["load"]["requests_per_s"] for v, t in pairs]
        summary[side] = {
            "requests_per_s": [t["load"]["requests_per_s"] for _, t in pairs],
            "throughput_ratio_requests": [round(x, 3) for x in ratios],
            "throughput_ratio_tokens": [round(t["load"]["output_tokens_per_s"] / v["load"]["output_tokens_per_s"], 3)
                                        for v, t in pairs],
            "overhead_p95_ms": [round(t["overhead"]["latency_ms"]["p95"] - v["overhead"]["latency_ms"]["p95"], 1)
                                for v, t in pairs],
            "median_ratio_requests": round(statistics.median(ratios), 3) if ratios else None,
        }  # fmt: skip
    out = {
        "bench": "serve_load", "at": datetime.now(timezone.utc).isoformat(), "machine": {"cpus": os.cpu_count()},
        "args": vars(a), "code": {name: commit_of(path) for name, path in {"this tree": str(REPO), **codes}.items()},
        "sampling": {**sampling, "logit_bias_end_token": 4.0}, "runs": runs, "summary": summary,
    }  # fmt: skip
    write_result(out, summary)


if __name__ == "__main__":
    main()
