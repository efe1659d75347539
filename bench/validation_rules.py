"""Validation throughput: rows/s of the validation stage on 1,000-character outputs, one core.

    .venv/bin/python bench/validation_rules.py [--rows 5000] [--repeats 3]

Rule sets, side by side in one run (each the median of --repeats):
  default   what a spec without `validation:` runs (refusal, pii_leakage)
  all       length, regex, deny_list, refusal, pii_leakage, grounding (with 3 context documents)
  all+json  the same plus json_schema (outputs are JSON objects with a 1,000-character field)
Semantic grounding is excluded: its cost is the embedding model's (see docs/performance.md).
The time covers Validator.validate on Arrow batches of 256 rows, Arrow conversion included.
Target (issue #4): >= 5,000 rows/s per core for the default rule set.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from compute.validation import Validator
from schemas.records import COMPLETION_SCHEMA, REQUEST_SCHEMA
from schemas.spec import parse_spec

WORDS = """the order shipment refund customer account invoice delivery support team issue payment
card address warehouse courier status update request ticket priority billing approved delayed
tomorrow within days please thanks regarding confirmed tracking number replacement item""".split()
NAMES = ["Acme Corp", "Dana Whitfield", "Globex", "Initech", "March 5, 2024", "2024-03-05"]
DOCS = [
    "Acme Corp shipped order 4411 on March 5, 2024. The refund of $1,299.50 was approved by Dana Whitfield.",
    "Replacement items leave the warehouse within two working days of the request.",
    "Invoices are sent to the account address; card payments are charged on shipment.",
]


def make_text(rng: random.Random, chars: int = 1000) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        r = rng.random()
        w = rng.choice(NAMES) if r < 0.04 else str(rng.randint(10, 99999)) if r < 0.08 else rng.choice(WORDS)
        if rng.random() < 0.08:
            w += "."
        out.append(w)
        n += len(w) + 1
    text = " ".join(out)[:chars]
    return text[0].upper() + text[1:]


def batch(texts: list[str]) -> tuple[pa.Table, pa.Table]:
    n = len(texts)
    req = pa.table(
        {
            "id": [str(i) for i in range(n)],
            "prompt": ["Summarise the ticket for customer 4411: " + DOCS[0]] * n,
            "source_topic": ["t"] * n,
            "source_partition": [0] * n,
            "source_offset": list(range(n)),
            "received_ns": [0] * n,
            "attempt": [1] * n,
            "first_prompt": [None] * n,
            "context": [DOCS] * n,
            "tenant": [None] * n,
            "max_tokens": [None] * n,
        },
        schema=REQUEST_SCHEMA,
    )
    comp = pa.table(
        {
            "source_partition": [0] * n,
            "source_offset": list(range(n)),
            "output_text": texts,
            "finish_reason": ["stop"] * n,
            "prompt_tokens": [40] * n,
            "completion_tokens": [220] * n,
            "error_stage": [None] * n,
            "error_class": [None] * n,
            "error": [None] * n,
        },
        schema=COMPLETION_SCHEMA,
    )
    return req, comp


RULE_SETS = {
    "default": None,
    "all": [
        {"rule": "length", "max_chars": 2000, "on_fail": "fix"},
        {"rule": "regex", "must_not_match": [r"https?://\S+"], "on_fail": "fix"},
        {"rule": "deny_list", "phrases": ["guarantee", "lawsuit", "legal advice", "competitor"], "on_fail": "flag"},
        {"rule": "refusal", "on_fail": "flag"},
        {"rule": "pii_leakage", "on_fail": "fix"},
        {"rule": "grounding", "threshold": 0.5, "on_fail": "flag"},
    ],
}


def spec_for(rules, json_output: bool):
    data = {
        "name": "bench",
        "source": {"kafka": {"topic": "t"}},
        "prompt": {"template": "{{ q }}", "id_field": "id", "context_field": "docs"},
        "model": {"path": "m"},
        "sink": {"results": "r", "dead_letter": "d"},
    }
    if rules is not None:
        data["validation"] = rules
    if json_output:
        data["output"] = {
            "schema": {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 1200}}, "required": ["summary"]}
        }
    return parse_spec(data)


def run(rows: int, repeats: int) -> dict:
    rng = random.Random(3)
    texts = [make_text(rng) for _ in range(rows)]
    # A few outputs that fail the rules, so the failure paths (messages, fixes) are in the timing.
    for i in range(0, rows, 50):
        texts[i] = texts[i][:900] + " Mail eve@evil.io or call +44 20 7946 0958."
    json_texts = [json.dumps({"summary": t}) for t in texts]
    cases = {
        "default": (spec_for(RULE_SETS["default"], False), texts),
        "all": (spec_for(RULE_SETS["all"], False), texts),
        "all+json": (spec_for(RULE_SETS["all"], True), json_texts),
    }
    out = {}
    for name, (spec, data) in cases.items():
        v = Validator(spec)
        batches = [batch(data[i : i + 256]) for i in range(0, rows, 256)]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for req, comp in batches:
                verdicts = v.validate(req, comp)
                verdicts.rule_results_array()
            times.append(time.perf_counter() - t0)
        out[name] = {"rules": [r.name for r in v.rules], "rows_per_s": rows / statistics.median(times)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "validation_rules.json",
                    help="where the result JSON goes (a side-by-side run of two code versions writes one per leg)")
    args = ap.parse_args()
    res = run(args.rows, args.repeats)
    table = Table(title=f"validation rows/s, one core, 1,000-character outputs ({args.rows} rows, median of {args.repeats})")
    table.add_column("rule set")
    table.add_column("rules")
    table.add_column("rows/s", justify="right")
    for name, r in res.items():
        table.add_row(name, ", ".join(r["rules"]), f"{r['rows_per_s']:,.0f}")
    Console().print(table)
    import compute.validation

    res["code"] = str(Path(compute.validation.__file__).parent.parent)  # which checkout ran (PYTHONPATH)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
