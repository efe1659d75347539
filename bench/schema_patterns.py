"""What an event contract with patterns and formats costs an event: jsonschema's own keywords
(Python's `re`, no format checks: the code before stop 43) vs Tidegate's validator (the `regex`
library with a time limit per search and a budget per event, format checks), side by side.

    .venv/bin/python bench/schema_patterns.py [--events 20000] [--rounds 4]

The schema: an id pattern, an email with a pattern and `format: email`, a date with `format:
date`, a list of tags each with a pattern, a map whose keys match patternProperties, no
additional properties. Events are valid (the common case). The two sides alternate, round by
round, in one process; each round validates every event once. Reports µs per event per round and
the ratio new / old per round. Writes bench/results/schema_patterns-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^T-[0-9]{4,8}$"},
        "email": {"type": "string", "format": "email", "pattern": "^[a-z0-9._-]+@[a-z0-9.-]+\\.[a-z]{2,}$"},
        "day": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,30}$"}},
        "scores": {"type": "object", "patternProperties": {"^[a-z]{2,10}$": {"type": "integer"}},
                   "additionalProperties": False},
        "text": {"type": "string", "maxLength": 2000},
    },
    "required": ["id", "email", "day"],
}


def events(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    words = "order refund shipment billing delayed courier account invoice".split()
    return [
        {"id": f"T-{rng.randint(1000, 99999999)}", "email": f"user{i}.{rng.choice(words)}@example.com",
         "day": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
         "tags": [f"{rng.choice(words)}-{rng.randint(0, 99)}" for _ in range(rng.randint(1, 8))],
         "scores": {w: rng.randint(0, 5) for w in rng.sample(words, rng.randint(1, 4))},
         "text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))}
        for i in range(n)
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()

    import jsonschema

    from bench.checkouts import commit_of
    from compute.rules import json_schema_validator, schema_errors

    old = jsonschema.Draft202012Validator(SCHEMA)
    new = json_schema_validator(SCHEMA, "source.event_schema")
    sides = {
        "old: jsonschema (re, no formats)": lambda e: sorted(old.iter_errors(e), key=lambda x: [str(p) for p in x.path]),
        "new: regex, time limits, formats": lambda e: schema_errors(new, e),
    }
    evs = events(a.events)
    for name, check in sides.items():  # every event valid on both sides (and a warm-up)
        assert all(not check(e) for e in evs[:500]), name
    rounds = []
    for r in range(a.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        got = {}
        for name in order:
            check = sides[name]
            t0 = time.perf_counter()
            for e in evs:
                check(e)
            got[name] = (time.perf_counter() - t0) / len(evs) * 1e6
        names = list(sides)
        rounds.append({"order": order, "us_per_event": got, "new_over_old": got[names[1]] / got[names[0]]})
        print(f"round {r + 1}: " + ", ".join(f"{n} {v:.1f} µs" for n, v in got.items())
              + f"; new/old {rounds[-1]['new_over_old']:.2f}")  # fmt: skip
    ratios = [x["new_over_old"] for x in rounds]
    result = {"bench": "schema_patterns", "measured_at": datetime.now(timezone.utc).isoformat(), "events": a.events,
              "code": commit_of(str(REPO)), "schema": SCHEMA, "rounds": rounds,
              "new_over_old_median": statistics.median(ratios)}  # fmt: skip
    out = REPO / "bench" / "results" / f"schema_patterns-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"median new/old {result['new_over_old_median']:.2f}; written {out}")


if __name__ == "__main__":
    main()
