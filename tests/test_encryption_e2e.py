"""No plaintext anywhere: a whole job (tansu, Ray, vLLM, Delta) over events carrying canary
strings in every sensitive field and model outputs forced to contain planted PII and an echo of an
input field. Every byte of every file the run produced is scanned for the canaries; then the right
keyring finds them all back, and one tenant's keyring never opens another tenant's rows. Then a
job that runs while its tenants' keys are rotated and revoked."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

import signal

from crypto.format import parse_header
from crypto.reader import read_results
from crypto.keyring import Keyring, LocalMasterKeyProvider
from schemas.errors import KeyPermissionError
from tests.conftest import make_spec, send, table_rows, wait_for, write_spec

pytestmark = pytest.mark.slow

TAG = uuid.uuid4().hex[:10]
OUT_EMAIL = f"canary-out-{TAG}@leak.example"  # generated into every output by the schema's const
# Also generated into every output (a const), and the carried customer_ref of events 1 and 6: an
# echo there, plain text elsewhere (so not a canary). Letters only: no PII detector matches it.
ECHO_REF = "ECHOREF" + TAG.translate(str.maketrans("0123456789", "ghijklmnop")).upper()
ECHO_ROWS = (1, 6)  # e001 is kept, e006 rejected by the rule


def reject_marked(candidate) -> bool:
    """Custom rule: outputs of prompts marked REJECT-ME fail (so validate-stage dead letters carry outputs)."""
    return "REJECT-ME" not in candidate.prompt


def scan(root: Path, canaries: list[str]) -> list[str]:
    """Every file under root: raw bytes, and for Parquet files every decoded value too."""
    needles = [c.encode() for c in canaries]
    hits = []
    for path in [root] if root.is_file() else root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        hits += [f"{path}: {n.decode()}" for n in needles if n in data]
        if path.suffix == ".parquet":
            text = json.dumps(pq.read_table(path).to_pylist(), default=repr)
            hits += [f"{path} (decoded): {c}" for c in canaries if c in text]
    return hits


def test_canaries_never_appear_in_plaintext_and_decrypt_back(tmp_path, broker, topic, tiny_model, job_processes, monkeypatch):
    master = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("TIDEGATE_MASTER_KEY", master)
    keyring_path = tmp_path / "keys" / "keyring.json"
    kr = Keyring.init(keyring_path, LocalMasterKeyProvider())
    kr.create_tenant("acme")
    kr.create_tenant("globex")

    canaries: list[str] = [OUT_EMAIL]
    records = []
    for i in range(24):
        email, ref = f"canary-{TAG}-{i}@example.com", f"CANARY-REF-{TAG}-{i}"
        if i in ECHO_ROWS:
            ref = ECHO_REF
        canaries += [email] + ([] if i in ECHO_ROWS else [ref])
        question = f"order {i} status?" + (" REJECT-ME" if i % 6 == 0 else "")
        body = {"id": f"e{i:03d}", "tenant": "acme" if i % 2 else "globex", "email": email,
                "customer_ref": ref, "question": question}  # fmt: skip
        records.append((body["id"].encode(), json.dumps(body).encode()))
    # Bad events carrying canaries: a missing template variable, an unknown tenant, invalid JSON;
    # and events of a known tenant dead-lettered before their prompt is rendered (no id; too big).
    bad = {
        "missing": {"id": "b1", "tenant": "acme", "email": f"canary-bad1-{TAG}@example.com", "customer_ref": "x"},
        "unknown_tenant": {"id": "b2", "tenant": "initech", "email": f"canary-bad2-{TAG}@example.com",
                           "customer_ref": "x", "question": "q"},  # fmt: skip
        "no_id": {"tenant": "globex", "email": f"canary-bad4-{TAG}@example.com", "question": "q"},
        "oversized": {"id": "b5", "tenant": "globex", "email": f"canary-bad5-{TAG}@example.com",
                      "question": "q", "pad": "p" * 5000},  # over max_message_bytes (4096)  # fmt: skip
    }
    for body in bad.values():
        canaries.append(body["email"])
        records.append((body.get("id", "b4").encode(), json.dumps(body).encode()))
    canaries.append(f"CANARY-JSON-{TAG}")
    records.append((b"b3", f'{{"id": "b3", "email": "CANARY-JSON-{TAG}", '.encode()))
    send(broker, topic, records)

    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{
            "prompt.template": "Customer {{ email }} ({{ customer_ref }}) asks: {{ question }}",
            "sampling.max_tokens": 160,
            "output": {"schema": {"type": "object", "required": ["contact", "ref", "note"],
                                  "properties": {"contact": {"const": OUT_EMAIL}, "ref": {"const": ECHO_REF},
                                                 "note": {"type": "string", "maxLength": 12}}}},
            "validation": [{"rule": "custom", "path": "tests.test_encryption_e2e:reject_marked", "on_fail": "reject"}],
            "encryption": {
                "keyring": str(keyring_path), "tenant_field": "tenant", "tenant": "acme",
                "input_fields": ["email", {"name": "customer_ref", "deterministic": True}],
                # The output stays text: its PII and the echo are protected in place. (Naming
                # output_text or output_json here would encrypt the whole output, both columns.)
                "pii": "encrypt",
            },
        },
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(300) == 0, job.log()[-4000:]

    # 1. Zero hits in every file the run produced: tables, job log, Ray's session logs.
    assert scan(tmp_path / "lake", canaries) == []
    assert scan(job.ray_tmp, canaries) == []
    assert scan(job.log_path, canaries) == []  # the job's own log (stdout + stderr)
    assert job.log_path.stat().st_size > 1000 and any(job.ray_tmp.rglob("*.log"))  # the scans saw real logs

    # 2. The right keyring finds every canary back.
    res = read_results(spec["sink"]["results"], keyring_path).sort("id")
    kept = [i for i in range(24) if i % 6]
    assert res["id"].to_list() == [f"e{i:03d}" for i in kept]
    assert res["input_email"].to_list() == [f"canary-{TAG}-{i}@example.com" for i in kept]
    assert res["input_customer_ref"].to_list() == [ECHO_REF if i in ECHO_ROWS else f"CANARY-REF-{TAG}-{i}" for i in kept]
    assert all(json.loads(j)["contact"] == OUT_EMAIL for j in res["output_json"].to_list())
    assert all(OUT_EMAIL in t for t in res["output_text"].to_list())  # PII tokens revealed in place
    assert res["tenant"].to_list() == ["acme" if i % 2 else "globex" for i in kept]
    # The echo: e001's output repeats its own customer_ref: stored as a token, revealed back.
    stored = {r["id"]: r["output_text"] for r in pl.read_delta(spec["sink"]["results"]).to_dicts()}
    assert ECHO_REF not in stored["e001"] and "[PII:echo:" in stored["e001"]
    assert ECHO_REF in stored["e003"]  # not e003's input: the model really wrote it, in clear
    assert all(ECHO_REF in t for t in res["output_text"].to_list())

    dead = read_results(spec["sink"]["dead_letter"], keyring_path).sort("id")
    by_id = {r["id"]: r for r in dead.to_dicts()}
    for i in range(0, 24, 6):  # rejected by the rule: the raw event and the output, decrypted
        row = by_id[f"e{i:03d}"]
        assert row["stage"] == "validate" and f"canary-{TAG}-{i}@example.com".encode() in row["raw"]
        assert OUT_EMAIL in row["output_text"]
    assert by_id["e006"]["output_text"].count("[REDACTED:echo]") == 1 and ECHO_REF not in by_id["e006"]["output_text"]
    assert by_id["b1"]["error_class"] == "missing_variable" and bad["missing"]["email"].encode() in by_id["b1"]["raw"]
    # Known tenants dead-lettered before rendering: under their own tenant's key, not the fallback's.
    assert by_id["b5"]["error_class"] == "oversized_message" and by_id["b5"]["tenant"] == "globex"
    assert bad["oversized"]["email"].encode() in by_id["b5"]["raw"]
    no_id = [r for r in dead.to_dicts() if r["error_class"] == "missing_id"]
    assert len(no_id) == 1 and no_id[0]["tenant"] == "globex" and bad["no_id"]["email"].encode() in no_id[0]["raw"]
    unreadable = [r for r in dead.to_dicts() if r["error_class"] == "invalid_json"]
    assert len(unreadable) == 1 and unreadable[0]["id"] is None and unreadable[0]["tenant"] == "acme"  # the fallback
    assert f"CANARY-JSON-{TAG}".encode() in unreadable[0]["raw"]
    # An event of a tenant the keyring does not know: the fallback tenant's (encryption.tenant).
    assert by_id["b2"]["error_class"] == "unknown_tenant" and by_id["b2"]["tenant"] == "acme"
    assert bad["unknown_tenant"]["email"].encode() in by_id["b2"]["raw"]

    # 3. Tenant isolation: a keyring holding only globex's key never opens acme's rows.
    globex_only = kr.export(tmp_path / "keys" / "globex.json", ["globex"], same_master_key=True)
    with pytest.raises(KeyPermissionError) as e:
        read_results(spec["sink"]["results"], globex_only)
    assert "acme" in str(e.value)
    partial = read_results(spec["sink"]["results"], globex_only, on_missing_key="keep").sort("id")
    globex = partial.filter(pl.col("tenant") == "globex")
    acme = partial.filter(pl.col("tenant") == "acme")
    assert globex["input_email"].to_list() == [f"canary-{TAG}-{i}@example.com" for i in kept if i % 2 == 0]
    assert not any(f"canary-{TAG}" in str(v) for v in acme["input_email"].to_list())
    # Deterministic tokens: equal values, equal tokens (joinable); here every ref is distinct.
    raw_refs = pl.read_delta(spec["sink"]["results"])["input_customer_ref"].to_list()
    assert len(set(raw_refs)) == len(raw_refs)


def header_version(value: bytes) -> tuple[str, int]:
    _, tenant, version = parse_header(value[: 10 + value[5]])
    return tenant, version


def test_rotate_and_revoke_while_the_job_runs(tmp_path, broker, topic, tiny_model, job_processes, monkeypatch):
    """A long-running job: after `rotate` its next commits use the new version; after `revoke`
    of a tenant's only version, that tenant's new events are dead-lettered with nothing written
    under the dead key; the values each version encrypted are counted in the keyring."""
    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    keyring_path = tmp_path / "keys" / "keyring.json"
    kr = Keyring.init(keyring_path, LocalMasterKeyProvider())
    kr.create_tenant("acme")
    kr.create_tenant("globex")
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"prompt.template": "{{ question }}", "sampling.max_tokens": 4, "validation": [],
           "encryption": {"keyring": str(keyring_path), "tenant_field": "tenant",
                          "input_fields": ["email"], "output_fields": ["output_text"]}},
    )  # fmt: skip
    results, dead = spec["sink"]["results"], spec["sink"]["dead_letter"]
    job = job_processes(write_spec(tmp_path, spec), until_drained=False)

    def batch(prefix: str) -> list:
        return [(f"{prefix}{i}".encode(), json.dumps({"id": f"{prefix}{i}", "tenant": ["acme", "globex"][i % 2],
                 "email": f"{prefix}{i}@x.example", "question": "q"}).encode()) for i in range(10)]  # fmt: skip

    send(broker, topic, batch("a"))
    wait_for(lambda: table_rows(results) == 10, 300, what="batch a committed")
    kr.rotate("acme")  # `tidegate keys rotate acme` while the job runs
    send(broker, topic, batch("b"))
    wait_for(lambda: table_rows(results) == 20, 120, what="batch b committed")
    kr.revoke("globex", 1)  # globex's only version
    send(broker, topic, batch("c"))
    wait_for(lambda: table_rows(results) == 25 and table_rows(dead) == 5, 120, what="batch c committed")
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(120) == 0, job.log()[-4000:]

    stored = pl.read_delta(results).to_dicts()
    versions = {r["id"]: header_version(r["output_text"]) for r in stored}
    assert {v for k, v in versions.items() if k[0] == "a"} == {("acme", 1), ("globex", 1)}
    assert {v for k, v in versions.items() if k[0] in "bc" and v[0] == "acme"} == {("acme", 2)}
    assert not any(k.startswith("c") and v[0] == "globex" for k, v in versions.items())
    for r in stored:  # the carried field follows the same version
        assert header_version(r["input_email"]) == versions[r["id"]]
    dl = pl.read_delta(dead).to_dicts()
    assert sorted(r["id"] for r in dl) == ["c1", "c3", "c5", "c7", "c9"]
    assert all(r["error_class"] in ("unknown_tenant", "key_revoked") and r["raw"] is None for r in dl)
    assert "c1@x.example" not in job.log()
    kr.reload()
    # Two values a row (output_text, input_email): acme 5 rows under v1, then 10 under v2.
    assert kr.usage("acme") == {1: 10, 2: 20} and kr.usage("globex") == {1: 20}
