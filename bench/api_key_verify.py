"""Benchmark: what an online replica's API key check costs after keyring writes, code against code.

A replica verifies a request's `Authorization: Bearer` key with scrypt once and then remembers it
(crypto/api_keys.py). The keyring file it reads is, by default, the encryption's keyring too, which
the replica itself rewrites: usage counters at most every 10 s under traffic (crypto/stage.py),
a rotation when a key reaches its limit. Each leg, in a child process importing that checkout's
`crypto`, makes a keyring with `--keys` API keys (one tenant each), verifies them all, then
`--passes` times: writes usage counters (nothing about API keys changes) and verifies every
key again, timing that pass (the CPU a replica's event loop spends before those requests go on).
Also timed: the same pass after a new API key is created (the verified keys are unchanged), and
one remembered verify.

    python bench/api_key_verify.py --code before=/path/to/checkout,now=. [--keys 10]

`--loop`: what new keys' checks do to the other requests of a replica's event loop. One checkout
(this one); each leg, in a child process, runs an event loop with a stream of requests by a
remembered key (one every 2 ms: each is its verify, timed from when it was due) and, 50 ms in,
`--keys` first requests of new keys at once, checked either on the loop (`verify`, what the
replica did before `verify_async`) or in worker threads (`verify_async`). Reported per leg: the
stream's lateness (how long a due request waited for the loop) while the checks ran, and how long
the last new key waited for its answer. The modes alternate over `--rounds`.

    python bench/api_key_verify.py --loop [--keys 10] [--rounds 3]

Prints a line per leg and writes bench/results/api_key_verify-<UTC time>.json. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def leg(code: Path, keys: int, passes: int) -> dict:
    sys.path.insert(0, str(code))
    from crypto.api_keys import ApiKeyVerifier
    from crypto.keyring import Keyring, LocalMasterKeyProvider

    path = Path(tempfile.mkdtemp(prefix="tg-api-keys-")) / "keyring.json"
    kr = Keyring.init(path, LocalMasterKeyProvider(key=secrets.token_bytes(32)))
    kr.create_tenant("acme")
    tokens = [kr.create_api_key(f"tenant{i}")[1] for i in range(keys)]
    verifier = ApiKeyVerifier(Keyring.open(path))

    def verify_all() -> float:
        t0 = time.perf_counter()
        for token in tokens:
            verifier.verify(token)
        return (time.perf_counter() - t0) * 1e3

    first = verify_all()
    after_usage = []
    for _ in range(passes):
        kr.record_usage({("acme", 1): 5})  # what the replica's encryption writes
        after_usage.append(verify_all())
    kr.create_api_key("newcomer")
    after_new_key = verify_all()
    remembered = []
    for _ in range(200):
        t0 = time.perf_counter()
        verifier.verify(tokens[0])
        remembered.append((time.perf_counter() - t0) * 1e6)
    return {"keys": keys, "first_pass_ms": round(first, 2), "after_usage_write_ms": [round(x, 2) for x in after_usage],
            "after_new_key_ms": round(after_new_key, 2), "remembered_verify_us_median": round(statistics.median(remembered), 1)}  # fmt: skip


def loop_leg(code: Path, keys: int, mode: str) -> dict:
    import asyncio

    sys.path.insert(0, str(code))
    from crypto.api_keys import ApiKeyVerifier
    from crypto.keyring import Keyring, LocalMasterKeyProvider

    path = Path(tempfile.mkdtemp(prefix="tg-api-keys-")) / "keyring.json"
    kr = Keyring.init(path, LocalMasterKeyProvider(key=secrets.token_bytes(32)))
    regular = kr.create_api_key("regular")[1]
    tokens = [kr.create_api_key(f"tenant{i}")[1] for i in range(keys)]
    verifier = ApiKeyVerifier(Keyring.open(path))
    verifier.verify(regular)

    async def first_request(token: str) -> None:
        if mode == "on-loop":
            verifier.verify(token)
        else:
            await verifier.verify_async(token)

    async def run() -> dict:
        lateness: list[float] = []
        burst_done = asyncio.Event()

        async def stream() -> None:
            while not burst_done.is_set():
                due = time.perf_counter() + 0.002
                await asyncio.sleep(0.002)
                verifier.verify(regular)
                lateness.append((time.perf_counter() - due) * 1e3)

        task = asyncio.ensure_future(stream())
        await asyncio.sleep(0.05)
        lateness.clear()  # only what happens during the burst
        t0 = time.perf_counter()
        await asyncio.gather(*(first_request(t) for t in tokens))
        burst_ms = (time.perf_counter() - t0) * 1e3
        burst_done.set()
        await task
        lateness.sort()
        return {"mode": mode, "keys": keys, "burst_ms": round(burst_ms, 1), "stream_requests": len(lateness),
                "lateness_ms_p50": round(statistics.median(lateness), 2) if lateness else None,
                "lateness_ms_p95": round(lateness[math.ceil(0.95 * len(lateness)) - 1], 2) if lateness else None,
                "lateness_ms_max": round(lateness[-1], 2) if lateness else None}  # fmt: skip

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default="now=.", help="NAME=PATH,... checkouts to compare (PATH: a Tidegate repo root)")
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loop", action="store_true", help="new keys' checks beside a remembered key's requests")
    ap.add_argument("--leg", metavar="PATH", help=argparse.SUPPRESS)  # the child's side
    ap.add_argument("--loop-leg", metavar="MODE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.leg and args.loop_leg:
        print(json.dumps(loop_leg(Path(args.leg).resolve(), args.keys, args.loop_leg)))
        return 0
    if args.leg:
        print(json.dumps(leg(Path(args.leg).resolve(), args.keys, args.passes)))
        return 0
    if args.loop:
        return loop_main(args)

    sys.path.insert(0, str(REPO))
    from bench.checkouts import commit_of, parse_codes, run_leg

    codes = parse_codes(args.code)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"bench": "api_key_verify", "started": stamp,
              "codes": {name: commit_of(path) for name, path in codes.items()}, "legs": []}  # fmt: skip
    out = REPO / "bench" / "results" / f"api_key_verify-{stamp}.json"
    for rnd in range(1, args.rounds + 1):
        for name, path in codes.items():
            cmd = [sys.executable, __file__, "--leg", path, "--keys", str(args.keys), "--passes", str(args.passes)]
            got = run_leg(cmd, result, out, round=rnd, code=name)
            print(f"round {rnd} {name:8} {got['keys']} keys: first pass {got['first_pass_ms']} ms; after a usage write "
                  f"{got['after_usage_write_ms']} ms; after a new key {got['after_new_key_ms']} ms; a remembered "
                  f"verify {got['remembered_verify_us_median']} us", flush=True)  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


def loop_main(args) -> int:
    sys.path.insert(0, str(REPO))
    from bench.checkouts import commit_of, run_leg

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"bench": "api_key_verify --loop", "started": stamp, "codes": {"now": commit_of(str(REPO))}, "legs": []}
    out = REPO / "bench" / "results" / f"api_key_verify-{stamp}-loop.json"
    modes = ["on-loop", "thread"]
    for rnd in range(1, args.rounds + 1):
        for mode in modes if rnd % 2 else modes[::-1]:
            cmd = [sys.executable, __file__, "--leg", str(REPO), "--loop-leg", mode, "--keys", str(args.keys)]
            got = run_leg(cmd, result, out, round=rnd)
            print(f"round {rnd} {mode:8} {got['keys']} new keys answered in {got['burst_ms']} ms; meanwhile "
                  f"{got['stream_requests']} requests of a remembered key were late by p50 {got['lateness_ms_p50']} / "
                  f"p95 {got['lateness_ms_p95']} / max {got['lateness_ms_max']} ms", flush=True)  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
