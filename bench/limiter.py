"""Benchmark: what serve.limits costs a request, in the replica and in the application's shared actor.

Side by side in one run, on a local Ray: the time of one admit (the call a replica makes before
each request) with

- scope replica:      compute/limits.TenantLimits.admit in the caller's process;
- scope application:  `await SharedTenantLimits.admit.remote(...)` (actors/limiter.py), from an
                      async caller as a replica makes it, one at a time and with `--concurrency`
                      callers at once (an application under load: the actor answers one at a time).

Budgets are set high enough that every admit succeeds (the cost of a refusal is the same call).
Reports p50/p95/p99 in milliseconds and admits/s; JSON under bench/results/.

    python bench/limiter.py [--admits 3000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def quantiles_ms(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": round(q[49] * 1e3, 4), "p95_ms": round(q[94] * 1e3, 4), "p99_ms": round(q[98] * 1e3, 4)}


async def timed_admits(handle, admits: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    per_caller = admits // concurrency

    async def caller(i: int) -> None:
        for _ in range(per_caller):
            t0 = time.perf_counter()
            refused = await handle.admit.remote(f"tenant-{i % 8}", 100)
            latencies.append(time.perf_counter() - t0)
            assert refused is None, refused

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--admits", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    import ray

    from actors.limiter import delete_shared_limits, shared_limits
    from compute.limits import TenantLimits
    from schemas.spec import ServeLimitsSpec

    spec = ServeLimitsSpec(requests_per_minute=10**9, tokens_per_minute=10**12)
    local = TenantLimits(spec)
    in_process = []
    for i in range(args.admits):
        t0 = time.perf_counter()
        local.admit(f"tenant-{i % 8}", 100)
        in_process.append(time.perf_counter() - t0)

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tgray", dir="/tmp"))
    try:
        handle = shared_limits("bench", spec)
        asyncio.run(timed_admits(handle, 200, 1))  # warm the actor and the connection
        one, one_s = asyncio.run(timed_admits(handle, args.admits, 1))
        many, many_s = asyncio.run(timed_admits(handle, args.admits, args.concurrency))
        delete_shared_limits("bench")
    finally:
        ray.shutdown()

    result = {
        "bench": "limiter",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "admits": args.admits,
        "concurrency": args.concurrency,
        "replica_in_process": {**quantiles_ms(in_process), "admits_per_s": round(len(in_process) / sum(in_process))},
        "application_actor_one_caller": {**quantiles_ms(one), "admits_per_s": round(len(one) / one_s)},
        "application_actor_concurrent": {**quantiles_ms(many), "admits_per_s": round(len(many) / many_s)},
    }
    out = REPO / "bench" / "results" / f"limiter-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
