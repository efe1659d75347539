"""What the PII detectors (crypto/pii.py find_pii) cost a text: this checkout's against another
revision's, side by side in one process.

    .venv/bin/python bench/pii_detect.py [--against HEAD~1] [--texts 500] [--rounds 7]

The other revision's crypto/pii.py is read with `git show REV:crypto/pii.py` and loaded as its own
module. Eight kinds of text, `--texts` of each, 5-200 words: ASCII prose with dates, prices and
order numbers (about half of them pass the 9-digit gate, so the card, SSN and phone patterns run);
the same with an email and a phone number; prose with accented Latin letters; Japanese; Chinese
with full-width punctuation; prose ending in one '…'; prose
with zero-width spaces; prose with a card number and an email address that zero-width spaces
hide from a detector that reads the text as written, and a French phone number. The two sides alternate, round by round; each round runs find_pii once
over every text. Reports the median µs per text per kind, the ratio this / other, and how many
spans each side found. Writes bench/results/pii_detect-<UTC time>.json. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def texts(n: int, seed: int = 1) -> dict[str, list[str]]:
    rng = random.Random(seed)
    words = ("the order was shipped on 2024-03-05 to our customer and the total came to 1,299.00 euros "
             "please call back about invoice 88123 ref").split()  # fmt: skip
    prose = [" ".join(rng.choices(words, k=rng.randint(5, 200))) for _ in range(n)]
    return {
        "ascii": prose,
        "ascii+pii": [t + " mail jo@example.com or call +44 20 7946 0958" for t in prose],
        "accented": ["Über die Straße, café naïve résumé " + t for t in prose],
        "japanese": ["日本語のテキストです。" * rng.randint(5, 100) for _ in range(n)],
        # Chinese as written: full-width commas and brackets, which NFKC changes (every one of these
        # texts went through a per-character loop in stop 46's first cut).
        "chinese": ["这是一个（测试）文本，包含标点！" * rng.randint(5, 100) for _ in range(n)],
        "ascii+1 ellipsis": [t + " …" for t in prose],
        "zero-width": [t.replace(" ", " \u200b", 3) for t in prose],
        "hidden": [t + " card 4111\u200b1111\u200b1111\u200b1111, jo\u200b@example.com, 06 12 34 56 78" for t in prose],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="HEAD~1", help="the revision to compare with (git show REV:crypto/pii.py)")
    ap.add_argument("--texts", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    other_src = subprocess.run(["git", "show", f"{a.against}:crypto/pii.py"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout  # fmt: skip
    rev = subprocess.run(["git", "rev-parse", "--short", a.against], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pii_other.py"
        path.write_text(other_src)
        other = load("pii_other", path)
    this = load("pii_this", REPO / "crypto" / "pii.py")
    kinds = texts(a.texts)
    result = {"bench": "pii_detect", "against": a.against, "against_commit": rev, "texts_per_kind": a.texts,
              "rounds": a.rounds, "kinds": {}}  # fmt: skip
    for kind, batch in kinds.items():
        us = {"this": [], "other": []}
        for r in range(a.rounds):
            for side, module in (("this", this), ("other", other)) if r % 2 == 0 else (("other", other), ("this", this)):
                t0 = time.perf_counter()
                for t in batch:
                    module.find_pii(t)
                us[side].append((time.perf_counter() - t0) / len(batch) * 1e6)
        found = {side: sum(len(m.find_pii(t)) for t in batch) for side, m in (("this", this), ("other", other))}
        med = {side: statistics.median(v) for side, v in us.items()}
        result["kinds"][kind] = {"us_per_text": us, "median_us": med, "ratio_this_other": med["this"] / med["other"],
                                 "spans_found": found}  # fmt: skip
        print(f"{kind:11s} this {med['this']:7.1f} µs  {rev} {med['other']:7.1f} µs  "
              f"this/{rev} {med['this'] / med['other']:.2f}  spans {found['this']} vs {found['other']}")
    out = REPO / "bench" / "results" / f"pii_detect-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out.relative_to(REPO))


if __name__ == "__main__":
    main()
