"""Benchmark: field encryption throughput of actors.ciphers, one process, one core.

Encrypts then decrypts a column of 200-byte text values (default 200,000) with row ids like the
results table's ("topic:partition:offset"), in random mode (AES-256-GCM) and deterministic mode
(AES-SIV), one tenant and, for GCM, also 8 tenants interleaved row by row (per-row tenants).
Each figure is the median of --runs runs of the encrypt_column or decrypt_column call (Arrow in
and out), as fields per CPU-second of this process (time.process_time: the per-core figure, less
diluted by other processes on a shared machine) and per wall-clock second. Also the bare AEAD
call rate (AESGCM/AESSIV.encrypt over ready-made Python bytes, no Arrow): the ceiling the
per-value Python work eats into. Runs are interleaved so that all figures see the same load.

    python bench/crypto_fields.py [--values 200000] [--runs 5] [--size 200]

Prints a table and writes bench/results/crypto_fields.json. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from rich.console import Console
from rich.table import Table

from crypto import decrypt_column, encrypt_column
from crypto.keyring import Keyring, LocalMasterKeyProvider


def _timed(fn) -> tuple[float, float, object]:
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=200, help="bytes per value")
    args = ap.parse_args()
    n, runs = args.values, args.runs

    provider = LocalMasterKeyProvider(key=os.urandom(32))
    tmp = tempfile.mkdtemp(prefix="tidegate-bench-")
    keyring = Keyring.init(Path(tmp) / "keyring.json", provider)
    tenants8 = [f"tenant-{i}" for i in range(8)]
    for t in ["acme", *tenants8]:
        keyring.create_tenant(t)

    # printable text of exactly --size bytes, distinct per row
    values = pa.array([base64.b64encode(os.urandom(args.size))[: args.size].decode() for _ in range(n)])
    row_ids = pa.array([f"orders:{i % 8}:{i}" for i in range(n)])
    per_row = pa.array([tenants8[i % 8] for i in range(n)])
    where = {"table": "results", "column": "output_text", "keyring": keyring}

    # the ceiling: bare AEAD calls on prepared Python objects (distinct per value), no Arrow, no cutting
    k = min(n, 100_000)
    pts = [os.urandom(args.size) for _ in range(k)]
    nonces = [os.urandom(12) for _ in range(k)]
    aads = [b"results/output_text/" + str(i).encode() for i in range(k)]
    gcm, siv = AESGCM(os.urandom(32)), AESSIV(os.urandom(64))
    cases = {
        "AES-256-GCM (random), 1 tenant": ("acme", False),
        "AES-256-GCM (random), 8 tenants per row": (per_row, False),
        "AES-SIV (deterministic), 1 tenant": ("acme", True),
    }
    # Runs are interleaved (every case, then the ceilings, `runs` times) so that load from other
    # processes on a shared machine hits all figures alike; each figure is a median over the runs.
    times: dict[str, list[tuple[float, float]]] = {}
    for _ in range(runs):
        for label, (tenants, det) in cases.items():
            c, w, enc = _timed(
                lambda t=tenants, d=det: encrypt_column(values, row_ids, tenants=t, deterministic=d, **where)
            )
            times.setdefault((label, "enc"), []).append((c / n, w / n))
            c, w, dec = _timed(lambda e=enc: decrypt_column(e, row_ids, **where))
            times.setdefault((label, "dec"), []).append((c / n, w / n))
            assert dec.equals(values), "round trip failed"
        c, w, _ = _timed(lambda: deque(map(gcm.encrypt, nonces, pts, aads), maxlen=0))
        times.setdefault(("bare", "gcm"), []).append((c / k, w / k))
        c, w, _ = _timed(lambda: deque(map(siv.encrypt, pts, [[a] for a in aads]), maxlen=0))
        times.setdefault(("bare", "siv"), []).append((c / k, w / k))

    def rate(key, which: int) -> int:
        return round(1 / statistics.median(t[which] for t in times[key]))

    rows = [
        {
            "mode": label,
            "encrypt_fields_per_cpu_s": rate((label, "enc"), 0),
            "decrypt_fields_per_cpu_s": rate((label, "dec"), 0),
            "encrypt_fields_per_wall_s": rate((label, "enc"), 1),
            "decrypt_fields_per_wall_s": rate((label, "dec"), 1),
        }
        for label in cases
    ]
    raw_gcm = (rate(("bare", "gcm"), 0), rate(("bare", "gcm"), 1))
    raw_siv = (rate(("bare", "siv"), 0), rate(("bare", "siv"), 1))

    table = Table(title=f"field encryption, {n:,} values of {args.size} bytes, median of {runs}, one process")
    table.add_column("mode")
    table.add_column("encrypt fields/CPU-s", justify="right")
    table.add_column("decrypt fields/CPU-s", justify="right")
    table.add_column("encrypt fields/s (wall)", justify="right")
    table.add_column("decrypt fields/s (wall)", justify="right")
    for r in rows:
        table.add_row(
            r["mode"],
            f"{r['encrypt_fields_per_cpu_s']:,}",
            f"{r['decrypt_fields_per_cpu_s']:,}",
            f"{r['encrypt_fields_per_wall_s']:,}",
            f"{r['decrypt_fields_per_wall_s']:,}",
        )
    table.add_row("bare AESGCM.encrypt calls (ceiling)", f"{raw_gcm[0]:,}", "", f"{raw_gcm[1]:,}", "")
    table.add_row("bare AESSIV.encrypt calls (ceiling)", f"{raw_siv[0]:,}", "", f"{raw_siv[1]:,}", "")
    Console(width=140).print(table)

    out = {
        "values": n,
        "value_bytes": args.size,
        "runs": runs,
        "results": rows,
        "bare_aesgcm_encrypt_calls_per_cpu_s": raw_gcm[0],
        "bare_aessiv_encrypt_calls_per_cpu_s": raw_siv[0],
        "bare_aesgcm_encrypt_calls_per_wall_s": raw_gcm[1],
        "bare_aessiv_encrypt_calls_per_wall_s": raw_siv[1],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    dest = REPO / "bench" / "results" / "crypto_fields.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {dest.relative_to(REPO)}")


if __name__ == "__main__":
    main()
