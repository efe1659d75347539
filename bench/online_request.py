"""Benchmark: the CPU one online request costs in the replica's guards, code against code.

Each side is a checkout of Tidegate (`--code NAME=PATH`; default: this tree, as `now`). A leg runs in
a child process that imports that checkout's `compute.online.OnlineGuards` (the batch stages' code,
one request at a time: what `tidegate serve` runs per request, docs/serving.md) and sends it
`--requests` chat requests one after the other, with the spec of bench/serve_load.py: the default
rules (refusal, pii_leakage), output_text encrypted under the tenant's key. The engine is a stand-in
that answers at once with a canned completion (one of a few phrases, 1-64 tokens), so what is timed
is the guards' own work:
- guards:  chat_request (the request as a source row and a request row), run (validate, assemble;
           no retry: the phrases pass the rules) and the outcome's token count;
- protect: the audit's `protect` of every 3 requests' rows together (a durable group commit's
           encryption of output_text, before its Delta append), per request.
Reported: process CPU µs per request (mean over the leg, after a warm-up of 300). Legs alternate
the codes, `--rounds` times; the JSON under bench/results/ keeps every leg. No HTTP, no Delta write,
no engine: bench/serve_load.py measures the whole endpoint.

    python bench/online_request.py --code before=/tmp/base,now=. [--requests 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHRASES = ("Open settings and choose reset password.", "Your order ships tomorrow.", "Yes.",
           "Support will follow up by email within one business day, with the steps to restore access.")  # fmt: skip
PROMPT = "How do I reset my password?"


def leg(code: Path, requests: int) -> dict:
    """One leg, in this (child) process: `code`'s guards and audit encryption."""
    sys.path.insert(0, str(code))
    os.environ["TIDEGATE_MASTER_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
    import pyarrow as pa

    from compute.lineage import lineage_columns
    from compute.online import OnlineGuards
    from connectors.audit import AuditLog
    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from crypto.stage import EncryptionStage
    from schemas.records import COMPLETION_SCHEMA
    from schemas.spec import JobSpec

    work = Path(tempfile.mkdtemp(prefix="tg-online-request-"))
    (work / "model").mkdir()
    Keyring.init(work / "keyring.json", LocalMasterKeyProvider()).create_tenant("acme")
    spec = JobSpec.model_validate({
        "name": "serve-bench", "source": {"kafka": {"topic": "unused", "bootstrap_servers": ["127.0.0.1:9"]}},
        "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": str(work / "model"), "dtype": "float32"},
        "sampling": {"temperature": 1.0, "max_tokens": 64},
        "sink": {"results": str(work / "lake" / "results"), "dead_letter": str(work / "lake" / "dead")},
        "encryption": {"keyring": str(work / "keyring.json"), "tenant": "acme", "output_fields": ["output_text"]},
    })  # fmt: skip
    canned = [
        pa.table({"source_partition": [0], "source_offset": [0], "output_text": [p], "finish_reason": ["stop"],
                  "prompt_tokens": [9], "completion_tokens": [1 + 7 * i], "error_stage": [None], "error_class": [None],
                  "error": [None]}, schema=COMPLETION_SCHEMA)
        for i, p in enumerate(PHRASES)
    ]  # fmt: skip

    class CannedEngine:
        """Answers at once; the guards' own cost is what the leg times."""

        def __init__(self):
            self.n = 0

        async def complete(self, requests, priority: int = 0):
            self.n += 1
            return canned[self.n % len(canned)]

    encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
    guards = OnlineGuards(spec, "bench-run", CannedEngine(), lineage_columns(spec, "bench"), encryption)
    audit = AuditLog(spec, encryption, "bench-run")
    audit.open()
    messages = [{"role": "user", "content": PROMPT}]
    body = json.dumps({"model": "m", "messages": messages}).encode()

    async def run(n: int) -> tuple[float, float, int]:
        guard_s = protect_s = 0.0
        group: list = []
        tokens = 0
        for k in range(n):
            c0 = time.process_time()
            src, req = guards.chat_request(body, "chat/completions", k, f"chatcmpl-{k}", PROMPT, messages, "acme", 64)
            out = await guards.run(src, req)
            tokens += out.tokens()
            guard_s += time.process_time() - c0
            group.append(out)
            if len(group) == 3:
                c0 = time.process_time()
                audit.protect(pa.concat_tables([o.results for o in group]), pa.concat_tables([o.dead for o in group]))
                protect_s += time.process_time() - c0
                group = []
        return guard_s, protect_s, tokens

    asyncio.run(run(300))  # warm-up
    guard_s, protect_s, tokens = asyncio.run(run(requests))
    return {"requests": requests, "guards_us_per_request": round(guard_s / requests * 1e6, 1),
            "protect_us_per_request": round(protect_s / requests * 1e6, 1), "tokens": tokens}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default="now=.", help="NAME=PATH,... checkouts to compare (PATH: a Tidegate repo root)")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--leg", metavar="PATH", help=argparse.SUPPRESS)  # the child's side
    args = ap.parse_args()
    if args.leg:
        print(json.dumps(leg(Path(args.leg).resolve(), args.requests)))
        return 0
    sys.path.insert(0, str(REPO))
    from bench.checkouts import commit_of, parse_codes, run_leg

    codes = parse_codes(args.code)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"bench": "online_request", "started": stamp, "machine": {"cpus": os.cpu_count()},
              "codes": {name: commit_of(path) for name, path in codes.items()}, "legs": []}  # fmt: skip
    out = REPO / "bench" / "results" / f"online_request-{stamp}.json"
    for rnd in range(1, args.rounds + 1):
        for name, path in codes.items():
            got = run_leg([sys.executable, __file__, "--leg", path, "--requests", str(args.requests)], result, out,
                          round=rnd, code=name)  # fmt: skip
            print(f"round {rnd} {name:8} guards {got['guards_us_per_request']:7.1f} µs/request, "
                  f"protect {got['protect_us_per_request']:6.1f} µs/request", flush=True)  # fmt: skip
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
