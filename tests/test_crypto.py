"""Field encryption and keys: spec section, ciphers, keyring, PII tokens, reader, re-encryption, CLI.

Pure logic plus real Delta tables in tmp_path; no Ray, no engine, no broker.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from pydantic import ValidationError
from typer.testing import CliRunner

from crypto import (
    ARMOR_PREFIX,
    MAGIC,
    armor,
    decrypt_column,
    encrypt_column,
    is_deterministic,
    is_encrypted,
    key_versions,
    protect_pii,
    reveal_pii,
    row_ids_from,
    table_label,
)
from crypto.reader import decrypt_table, read_results
from crypto.keyring import Keyring, LocalMasterKeyProvider, key_context
from jobs.reencrypt import reencrypt_table
from schemas.encryption import EncryptionSpec
from schemas.errors import DecryptionError, KeyPermissionError, KeyRevokedError, KeyringError, TidegateError

MASTER = bytes(range(32))
T, C = "results", "output_text"


@pytest.fixture
def provider():
    return LocalMasterKeyProvider(key=MASTER)


@pytest.fixture
def kr(tmp_path, provider):
    k = Keyring.init(tmp_path / "keys" / "keyring.json", provider)
    for t in ("acme", "umbr", "globex"):  # acme and umbr: same id length (header grouping by content)
        k.create_tenant(t)
    return k


def rids(n, topic="orders"):
    return pa.array([f"{topic}:0:{i}" for i in range(n)])


def enc(values, kr, *, tenants="acme", table=T, column=C, row_ids=None, deterministic=False):
    values = values if isinstance(values, pa.Array) else pa.array(values)
    row_ids = rids(len(values)) if row_ids is None else row_ids
    return encrypt_column(
        values, row_ids, table=table, column=column, tenants=tenants, keyring=kr, deterministic=deterministic
    )


def dec(values, kr, *, table=T, column=C, row_ids=None, **kw):
    row_ids = rids(len(values)) if row_ids is None else row_ids
    return decrypt_column(values, row_ids, table=table, column=column, keyring=kr, **kw)


def swap(arr: pa.Array, i: int, j: int) -> pa.Array:
    vals = arr.to_pylist()
    vals[i], vals[j] = vals[j], vals[i]
    return pa.array(vals, arr.type)


def flip(arr: pa.Array, row: int, pos: int) -> pa.Array:
    vals = arr.to_pylist()
    b = bytearray(vals[row])
    b[pos] ^= 0x01
    vals[row] = bytes(b)
    return pa.array(vals, arr.type)


# -- spec section


def test_spec_absent_section_means_off_and_defaults(monkeypatch):
    monkeypatch.delenv("TIDEGATE_KEYRING", raising=False)
    spec = EncryptionSpec()
    assert not spec.enabled and not spec.needs_keys
    assert spec.keyring == ".tidegate/keyring.json"
    assert spec.pii == "off" and spec.input_fields == [] and spec.output_fields == []
    monkeypatch.setenv("TIDEGATE_KEYRING", "/secrets/kr.json")
    assert EncryptionSpec().keyring == "/secrets/kr.json"


def test_spec_fields_shorthand_and_dead_letter_default():
    spec = EncryptionSpec.model_validate(
        {"tenant_field": "customer", "input_fields": ["email", {"name": "user_id", "deterministic": True}]}
    )
    assert [(f.name, f.deterministic) for f in spec.input_fields] == [("email", False), ("user_id", True)]
    assert spec.encrypt_dead_letter_raw is True  # default follows input_fields
    assert EncryptionSpec(tenant="a", output_fields=["output_text"]).encrypt_dead_letter_raw is False
    assert EncryptionSpec(tenant="a", input_fields=["x"], dead_letter_raw=False).encrypt_dead_letter_raw is False
    assert EncryptionSpec(pii="redact").enabled and not EncryptionSpec(pii="redact").needs_keys
    assert spec.tenant_of({"customer": "acme"}) == "acme"
    assert spec.tenant_of({"customer": 42}) == "42"
    assert spec.tenant_of({}) is None
    assert EncryptionSpec(tenant="dflt", tenant_field="c", output_fields=["o"]).tenant_of({}) == "dflt"
    with pytest.raises(ValueError, match="'customer' does not hold a valid tenant id") as e:
        spec.tenant_of({"customer": "ann@example.com"})
    assert "ann@example.com" not in str(e.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tenant": "a", "input_fields": ["email", "email"]}, "listed more than once: email"),
        ({"tenant": "a", "output_fields": ["o", {"name": "o", "deterministic": True}]}, "listed more than once: o"),
        ({"tenant": "a", "output_fields": [""]}, "at least 1 character"),
        ({"tenant": "a", "input_fields": ["  "]}, "must not be blank"),
        ({"input_fields": ["email"]}, "needs a tenant"),
        ({"tenant": "a b"}, "invalid tenant id"),
        ({"tenant": "a", "output_fields": ["source_offset"]}, "row-id columns stay in clear"),
        # an encrypted tenant made every row unreadable (the reader checks values against it)
        ({"tenant": "a", "output_fields": ["output_text", "tenant", "id"]}, "id, tenant: stay in clear text"),
        ({"tenant": "a", "pii": "mask"}, "pii"),
        ({"tenant": "a", "colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_spec_rejects(bad, message):
    with pytest.raises(ValidationError, match=message):
        EncryptionSpec.model_validate(bad)


def test_the_id_field_cannot_be_an_encrypted_input(tmp_path):
    """The id is stored in clear in both tables and keys the results topic's messages: a job
    naming its id field among the fields to encrypt is refused, not half-protected."""
    from schemas.errors import SpecError
    from schemas.spec import parse_spec
    from tests.conftest import make_spec

    data = make_spec(tmp_path, None, "t", tmp_path / "no-model", **{
        "source": {"kafka": {"topic": "t", "bootstrap_servers": ["127.0.0.1:9"]}},
        "encryption": {"tenant": "a", "input_fields": ["email", "id"]}})  # fmt: skip
    with pytest.raises(SpecError, match="encryption.input_fields: 'id' is prompt.id_field, stored in clear"):
        parse_spec(data)
    data["encryption"]["input_fields"] = ["email"]
    assert parse_spec(data).prompt.id_field == "id"


# -- round trips and the stored format


def test_random_round_trip_nulls_and_format(kr):
    values = pa.array(["hello", None, "", "é€😀 unicode", "\x00zero\x00", "x" * 1000])
    out = enc(values, kr)
    assert out.type == pa.binary()
    assert out.null_count == 1 and out[1].as_py() is None
    first = out[0].as_py()
    # magic, format 1, flags 0 (random, text), tenant length + id, version 1 (big-endian), nonce, ct+tag
    assert first[:3] == MAGIC == b"\xa7TG"
    assert first[3:10] == b"\x01\x00\x04acme" and first[10:14] == b"\x00\x00\x00\x01"
    assert len(first) == 14 + 12 + len("hello") + 16
    assert b"hello" not in first
    assert dec(out, kr).to_pylist() == values.to_pylist()
    # fresh nonce per value: same value, same row, twice -> different bytes
    assert enc(["same"], kr)[0].as_py() != enc(["same"], kr)[0].as_py()
    assert is_encrypted(out) and not is_deterministic(out)
    assert key_versions(out) == [("acme", 1), None, ("acme", 1), ("acme", 1), ("acme", 1), ("acme", 1)]


def test_round_trip_binary_large_chunked_and_sliced(kr):
    raw = pa.array([b"\x00\xff", None, b"", os.urandom(300)], pa.binary())
    out = enc(raw, kr, column="raw")
    back = dec(out, kr, column="raw")
    assert back.type == pa.binary() and back.to_pylist() == raw.to_pylist()
    large = pa.array(["a", "bb", None], pa.large_string())
    assert dec(enc(large, kr), kr).to_pylist() == ["a", "bb", None]
    chunked = pa.chunked_array([["x", "y"], ["z"]])
    assert dec(enc(chunked, kr), kr).to_pylist() == ["x", "y", "z"]
    sliced = pa.array(["skip", "keep1", None, "keep2"]).slice(1)  # non-zero array offset
    ids = pa.array(["r1", "r2", "r3"])
    assert dec(enc(sliced, kr, row_ids=ids), kr, row_ids=ids).to_pylist() == ["keep1", None, "keep2"]
    ints = pa.array([10, 11, 12])  # integer row ids are cast to text
    assert dec(enc(["a", "b", "c"], kr, row_ids=ints), kr, row_ids=ints).to_pylist() == ["a", "b", "c"]
    assert enc(pa.array([], pa.string()), kr, row_ids=pa.array([], pa.string())).to_pylist() == []
    assert dec(enc([None, None], kr), kr).to_pylist() == [None, None]
    with pytest.raises(TypeError, match="string or binary"):
        enc(pa.array([1, 2]), kr)


def test_per_row_tenants(kr):
    values = pa.array(["a0", "u1", None, "g3", "a4", "u5", ""])
    tenants = pa.array(["acme", "umbr", None, "globex", "acme", "umbr", "globex"])
    out = enc(values, kr, tenants=tenants)
    assert [kv and kv[0] for kv in key_versions(out)] == ["acme", "umbr", None, "globex", "acme", "umbr", "globex"]
    assert dec(out, kr).to_pylist() == values.to_pylist()
    assert dec(out, kr, tenants=tenants).to_pylist() == values.to_pylist()
    # a list of tenant ids works too
    assert dec(enc(["p", "q"], kr, tenants=["umbr", "acme"]), kr).to_pylist() == ["p", "q"]
    with pytest.raises(ValueError, match="has a value but no tenant"):
        enc(["a", "b"], kr, tenants=pa.array(["acme", None]))
    with pytest.raises(KeyPermissionError, match="initech") as e:
        enc(["a", "b"], kr, tenants=pa.array(["acme", "initech"]))
    assert e.value.tenant == "initech"
    with pytest.raises(KeyPermissionError, match="not valid") as e:
        enc(["a"], kr, tenants=["bob@example.com"])
    assert "bob@example.com" not in str(e.value)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_round_trip_many_rows_mixed(kr, deterministic, per_row):
    # several batches (4096 rows per batch and tenant), nulls, per-row tenants, NUL bytes, one value past 100 kB
    rng = np.random.default_rng(7)
    n = 26_000
    vals = [bytes(rng.integers(0, 256, int(rng.integers(0, 60)), dtype=np.uint8)) + b"\x00" for _ in range(n)]
    vals[17] = os.urandom(150_000)
    for i in rng.choice(n, 2600, replace=False):
        vals[i] = None
    tenants = pa.array(rng.choice(["acme", "umbr", "globex"] if per_row else ["umbr"], n).tolist())
    values = pa.array(vals, pa.binary())
    out = enc(values, kr, tenants=tenants, deterministic=deterministic)
    assert out.null_count == 2600
    assert dec(out, kr, tenants=tenants).equals(values)
    assert [kv and kv[0] for kv in key_versions(out)] == [t if v is not None else None
                                                           for t, v in zip(tenants.to_pylist(), vals)]  # fmt: skip


def test_deterministic_tokens(kr):
    values = pa.array(["alice", "bob", "alice", None, "alice"])
    out = enc(values, kr, deterministic=True, row_ids=None)
    toks = out.to_pylist()
    assert toks[0] == toks[2] == toks[4] and toks[0] != toks[1]
    assert toks[0][4] == 0x01  # deterministic flag
    assert len(toks[0]) == 14 + 16 + len("alice")
    assert is_deterministic(out)
    assert decrypt_column(out, None, table=T, column=C, keyring=kr).to_pylist() == values.to_pylist()
    # equal within a column and tenant; different in another column, table or tenant
    other_col = enc(values, kr, deterministic=True, column="email")
    other_table = enc(values, kr, deterministic=True, table="dead_letter")
    other_tenant = enc(values, kr, deterministic=True, tenants="umbr")
    assert other_col[0].as_py() != toks[0]
    assert other_table[0].as_py() != toks[0]
    assert other_tenant[0].as_py() != toks[0]
    # joinable: a second batch gives the same token for the same value
    assert enc(["alice"], kr, deterministic=True)[0].as_py() == toks[0]
    # no row binding by design: moving a token to another row of the column still decrypts
    moved = swap(out, 0, 1)
    assert decrypt_column(moved, None, table=T, column=C, keyring=kr).to_pylist()[:2] == ["bob", "alice"]
    # but not in another column
    with pytest.raises(DecryptionError) as e:
        decrypt_column(out, None, table=T, column="email", keyring=kr)
    assert (e.value.table, e.value.column, e.value.row_id) == (T, "email", "#0")


# -- binding, tampering, keys


def test_value_moved_to_another_row_column_or_table_fails(kr):
    secret = ["secret-0", "secret-1", "secret-2"]
    out = enc(secret, kr)
    with pytest.raises(DecryptionError) as e:
        dec(swap(out, 1, 2), kr)
    assert (e.value.table, e.value.column, e.value.row_id) == (T, C, "orders:0:1")
    assert "results.output_text row orders:0:1" in str(e.value)
    assert all(s not in str(e.value) for s in secret)
    with pytest.raises(DecryptionError, match="row orders:0:0") as e:
        dec(out, kr, column="summary")
    assert e.value.column == "summary"
    with pytest.raises(DecryptionError) as e:
        dec(out, kr, table="other_job/results")
    assert e.value.table == "other_job/results"
    # same column and table, other row ids
    with pytest.raises(DecryptionError):
        dec(out, kr, row_ids=rids(3, topic="payments"))
    # The documented exception (docs/encryption.md): a deterministic value is not bound to its row
    # (equal plaintexts give equal values across rows), so a swap within one tenant's column opens;
    # it is still bound to its column and table.
    det = enc(secret, kr, deterministic=True)
    assert dec(swap(det, 1, 2), kr).to_pylist() == ["secret-0", "secret-2", "secret-1"]
    with pytest.raises(DecryptionError):
        dec(det, kr, column="summary")


def test_flipped_bytes_and_garbage(kr):
    out = enc(["hello world", "second"], kr)
    n = len(out[1].as_py())
    for pos in (30, n - 1, 15, 4):  # ciphertext, tag, nonce, flags (text -> bytes)
        with pytest.raises(DecryptionError) as e:
            dec(flip(out, 1, pos), kr)
        assert e.value.row_id == "orders:0:1" and "hello" not in str(e.value)
    truncated = pa.array([out[0].as_py()[:20], out[1].as_py()], pa.binary())
    with pytest.raises(DecryptionError, match="row orders:0:0: not a Tidegate encrypted value"):
        dec(truncated, kr)
    with pytest.raises(DecryptionError, match="not a Tidegate"):
        dec(pa.array([b'{"json": 1}', None], pa.binary()), kr)
    assert not is_encrypted(pa.array([b'{"json": 1}'], pa.binary()))
    assert not is_encrypted(pa.array([None], pa.binary())) and not is_encrypted(pa.array(["t"]))
    # A text value with the armor prefix and a body that is not base64: named, not a bare binascii.Error.
    for body in ("a", "zz\u00e9zz"):
        with pytest.raises(DecryptionError, match="row orders:0:1: an encrypted value whose text is not base64") as e:
            dec(pa.array(["tgenc1:" + enc(["x"], kr).to_pylist()[0].hex()[:4], "tgenc1:" + body]), kr)
        assert e.value.row_id == "orders:0:1"


def test_tenant_key_never_opens_another_tenant(kr):
    out = enc(["for umbr only"], kr, tenants="umbr")
    forged = bytearray(out[0].as_py())
    assert forged[6:10] == b"umbr"
    forged[6:10] = b"acme"  # claim acme: acme's key is used, and does not open umbr's value
    with pytest.raises(DecryptionError):
        dec(pa.array([bytes(forged)], pa.binary()), kr)
    with pytest.raises(DecryptionError, match="belongs to another tenant"):
        dec(out, kr, tenants="acme")


def test_keyring_without_tenant_raises_or_keeps(kr, tmp_path):
    tenants = pa.array(["acme", "globex", "acme"])
    out = enc(["a", "g", "a2"], kr, tenants=tenants)
    only_acme = kr.export(tmp_path / "acme.json", ["acme"], same_master_key=True)
    assert only_acme.tenants() == ["acme"]
    with pytest.raises(KeyPermissionError, match="globex") as e:
        dec(out, only_acme)
    assert e.value.tenant == "globex" and "acme.json" in str(e.value)
    kept = dec(out, only_acme, on_missing_key="keep")
    assert kept.to_pylist()[0] == "a" and kept.to_pylist()[2] == "a2"
    assert kept[1].as_py() == armor(out[1].as_py()) and kept[1].as_py().startswith(ARMOR_PREFIX)
    # the kept text form decrypts later with a keyring that has the key (and only in its row)
    assert dec(kept.slice(1, 1), kr, row_ids=pa.array(["orders:0:1"])).to_pylist() == ["g"]
    with pytest.raises(DecryptionError, match="row orders:0:0: not a Tidegate"):
        dec(kept, kr)  # clear text is not taken for a stored value
    # binary columns keep the stored bytes
    raw = enc(pa.array([b"r1", b"r2"]), kr, tenants=pa.array(["globex", "acme"]), column="raw")
    kept_raw = dec(raw, only_acme, column="raw", on_missing_key="keep")
    assert kept_raw.to_pylist() == [raw[0].as_py(), b"r2"]
    with pytest.raises(KeyPermissionError):
        enc(["x"], only_acme, tenants="globex")


def test_rotation_and_revocation(kr):
    old = enc(["before rotation"], kr, row_ids=pa.array(["r-old"]))
    assert kr.rotate("acme") == 2 and kr.current("acme") == 2
    new = enc(["after rotation"], kr, row_ids=pa.array(["r-new"]))
    assert key_versions(old) == [("acme", 1)] and key_versions(new) == [("acme", 2)]
    assert [(v.version, v.state) for v in kr.versions("acme")] == [(1, "retired"), (2, "active")]
    assert dec(old, kr, row_ids=pa.array(["r-old"])).to_pylist() == ["before rotation"]
    assert dec(new, kr, row_ids=pa.array(["r-new"])).to_pylist() == ["after rotation"]
    kr.revoke("acme", 1)
    with pytest.raises(KeyRevokedError, match="version 1 of tenant 'acme' is revoked") as e:
        dec(old, kr, row_ids=pa.array(["r-old"]))
    assert (e.value.tenant, e.value.version) == ("acme", 1)
    assert dec(new, kr, row_ids=pa.array(["r-new"])).to_pylist() == ["after rotation"]
    doc = json.loads(kr.path.read_text())
    assert doc["tenants"]["acme"][0] == {**doc["tenants"]["acme"][0], "state": "revoked", "wrapped_key": None}
    # a fresh process (new Keyring object) sees the same
    again = Keyring.open(kr.path, LocalMasterKeyProvider(key=MASTER))
    with pytest.raises(KeyRevokedError):
        again.data_key("acme", 1)
    # a long-lived keyring object sees another process's changes after reload()
    other = Keyring.open(kr.path, LocalMasterKeyProvider(key=MASTER))
    other.rotate("umbr")
    assert kr.current("umbr") == 1
    kr.reload()
    assert kr.current("umbr") == 2
    # revoking the only active version: nothing can be encrypted until a rotation
    kr.revoke("acme", 2)
    with pytest.raises(KeyRevokedError, match="no active key version"):
        enc(["x"], kr)
    assert kr.rotate("acme") == 3 and key_versions(enc(["x"], kr)) == [("acme", 3)]
    with pytest.raises(KeyPermissionError, match="no key version 9"):
        kr.revoke("acme", 9)


# -- keyring file and master key


def test_keyring_file_mode_atomic_writes_and_refusal(tmp_path, provider, monkeypatch):
    path = tmp_path / "kr.json"
    k = Keyring.init(path, provider)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k.create_tenant("acme")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = k.data_key("acme", 1)
    text = path.read_text()
    assert base64.b64encode(key).decode() not in text and key.hex() not in text
    with pytest.raises(KeyringError, match="already exists"):
        Keyring.init(path, provider)
    assert path.read_text() == text
    with pytest.raises(KeyringError, match="already exists"):
        k.create_tenant("acme")
    with pytest.raises(KeyringError, match="invalid tenant id"):
        k.create_tenant("no spaces")
    # a write that fails half-way leaves the old file whole and no temp file behind
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        k.rotate("acme")
    monkeypatch.undo()
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kr.json", "kr.json.lock"]
    # the on-disk file is re-read under the lock before a change: two objects do not lose updates
    k2 = Keyring.open(path, provider)
    k.rotate("acme")
    k2.create_tenant("umbr")
    final = Keyring.open(path, provider)
    assert final.tenants() == ["acme", "umbr"] and final.current("acme") == 2
    assert final.data_key("acme", 1) == key


def test_keyring_wrong_master_key_moved_entry_and_malformed(tmp_path, provider):
    k = Keyring.init(tmp_path / "kr.json", provider)
    k.create_tenant("acme")
    k.create_tenant("umbr")
    other = LocalMasterKeyProvider(key=bytes(32))
    with pytest.raises(KeyringError, match="wrong master key"):
        Keyring.open(k.path, other).data_key("acme", 1)
    # listing needs no master key at all
    assert [v.state for v in Keyring.open(k.path, None).versions("acme")] == ["active"]
    # a wrapped key moved to another tenant does not unwrap (context binds tenant and version)
    doc = json.loads(k.path.read_text())
    a, u = doc["tenants"]["acme"][0], doc["tenants"]["umbr"][0]
    a["wrapped_key"], u["wrapped_key"] = u["wrapped_key"], a["wrapped_key"]
    (tmp_path / "moved.json").write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match="tenant 'acme' version 1 does not open"):
        Keyring.open(tmp_path / "moved.json", provider).data_key("acme", 1)
    for bad, why in [("{", "not valid JSON"), ('{"format": "x"}', "format"), ("[]", "format")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(KeyringError, match=why):
            Keyring.open(tmp_path / "bad.json", provider)
    doc["tenants"]["acme"][0]["state"] = "paused"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match="state must be one of"):
        Keyring.open(tmp_path / "bad.json", provider)
    with pytest.raises(KeyringError, match="does not exist"):
        Keyring.open(tmp_path / "missing.json", provider)


def test_a_rotation_whose_write_failed_leaves_no_key_that_another_process_wrote_differently(tmp_path, provider,
                                                                                            monkeypatch):  # fmt: skip
    """Before, a new version's data key was cached before its write: when the write failed, and
    another process then wrote that version with its own key, this object kept sealing values under
    its own, which no keyring file holds (unreadable, and gone once the process ended)."""
    k = Keyring.init(tmp_path / "kr.json", provider)
    k.create_tenant("acme")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        k.rotate("acme")
    monkeypatch.setattr(os, "replace", real_replace)
    Keyring.open(k.path, provider).rotate("acme")  # another process: version 2, its own key
    k.refresh()
    assert k.current("acme") == 2
    assert k.data_key("acme", 2) == Keyring.open(k.path, provider).data_key("acme", 2)


def test_an_export_from_an_old_keyring_object_keeps_a_version_revoked_since(kr, tmp_path):
    """Before, export used the object's copy of the file: a version revoked by another process
    since (crypto-shredding) came back, active, in the exported keyring."""
    kr.data_key("acme", 1)  # cached here
    other = Keyring.open(kr.path, LocalMasterKeyProvider(key=MASTER))
    other.rotate("acme")
    other.revoke("acme", 1)
    sub = kr.export(tmp_path / "sub.json", ["acme"], provider=LocalMasterKeyProvider(key=b"\x07" * 32))
    assert [v.state for v in sub.versions("acme")] == ["revoked", "active"]
    with pytest.raises(KeyRevokedError):
        sub.data_key("acme", 1)


@pytest.mark.parametrize("change, why", [
    (lambda e: e.update(wrapped_key="abc"), "tenant 'acme' version 1: wrapped_key is not base64"),
    (lambda e: e.pop("created_at"), "tenant 'acme' version 1: created_at missing"),
    (lambda e: e.update(version=2**32), "version from 1 to 2\\^32 - 1"),
])  # fmt: skip
def test_a_malformed_keyring_entry_is_refused_when_opened_naming_it(tmp_path, provider, change, why):
    """Before, these passed the check and failed later as a bare binascii.Error mid-commit, a
    KeyError in `keys list`, or an OverflowError at the first encryption."""
    k = Keyring.init(tmp_path / "kr.json", provider)
    k.create_tenant("acme")
    doc = json.loads(k.path.read_text())
    change(doc["tenants"]["acme"][0])
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match=why):
        Keyring.open(tmp_path / "bad.json", provider)


def test_master_key_from_environment(monkeypatch):
    var = "TG_TEST_MASTER"
    monkeypatch.delenv(var, raising=False)
    with pytest.raises(KeyringError, match=f"{var} is not set"):
        LocalMasterKeyProvider(var)
    secretish = "not-base64-at-all!!"
    monkeypatch.setenv(var, secretish)
    with pytest.raises(KeyringError, match=f"{var} is neither base64 nor hex") as e:
        LocalMasterKeyProvider(var)
    assert secretish not in str(e.value)
    monkeypatch.setenv(var, base64.b64encode(b"short").decode())
    with pytest.raises(KeyringError, match="must hold 32 bytes"):
        LocalMasterKeyProvider(var)
    monkeypatch.setenv(var, "")
    with pytest.raises(KeyringError, match="is empty"):
        LocalMasterKeyProvider(var)
    ids = set()
    for text in (base64.b64encode(MASTER).decode(), MASTER.hex(), base64.urlsafe_b64encode(MASTER).decode()):
        monkeypatch.setenv(var, text)
        p = LocalMasterKeyProvider(var)
        ids.add(p.key_id)
        assert p.unwrap(p.wrap(b"k" * 32, {"t": "1"}), {"t": "1"}) == b"k" * 32
        with pytest.raises(KeyringError):
            p.unwrap(p.wrap(b"k" * 32, {"t": "1"}), {"t": "2"})
    assert ids == {LocalMasterKeyProvider(key=MASTER).key_id}
    assert MASTER.hex() not in next(iter(ids))
    # the default variable name
    monkeypatch.delenv("TIDEGATE_MASTER_KEY", raising=False)
    with pytest.raises(KeyringError, match="TIDEGATE_MASTER_KEY is not set"):
        LocalMasterKeyProvider()


def test_export_rewrapped_for_another_master_key(kr, tmp_path):
    values = enc(["for acme"], kr)
    recipient = LocalMasterKeyProvider(key=b"\x07" * 32)
    sub = kr.export(tmp_path / "notebook.json", ["acme"], provider=recipient)
    assert sub.master_key_id == recipient.key_id != kr.master_key_id
    reopened = Keyring.open(tmp_path / "notebook.json", recipient)
    assert dec(values, reopened).to_pylist() == ["for acme"]
    with pytest.raises(KeyringError, match="wrong master key"):
        Keyring.open(tmp_path / "notebook.json", LocalMasterKeyProvider(key=MASTER)).data_key("acme", 1)
    with pytest.raises(KeyringError, match="already exists"):
        kr.export(tmp_path / "notebook.json", ["acme"], provider=recipient)
    with pytest.raises(KeyPermissionError, match="initech"):
        kr.export(tmp_path / "x.json", ["initech"], provider=recipient)


def test_export_rewraps_unless_told_to_keep_the_master_key(kr, tmp_path):
    # No recipient key and no explicit same_master_key: refused, nothing written.
    with pytest.raises(KeyringError, match="recipient's master key"):
        kr.export(tmp_path / "a.json", ["acme"])
    # The production master key given as the "recipient": refused too (it opens every tenant).
    with pytest.raises(KeyringError, match="this keyring's own"):
        kr.export(tmp_path / "a.json", ["acme"], provider=LocalMasterKeyProvider(key=MASTER))
    with pytest.raises(KeyringError, match="not both"):
        kr.export(tmp_path / "a.json", ["acme"], provider=LocalMasterKeyProvider(key=b"\x07" * 32), same_master_key=True)
    assert not (tmp_path / "a.json").exists()
    kept = kr.export(tmp_path / "a.json", ["acme"], same_master_key=True)  # explicit: today's copy
    assert kept.master_key_id == kr.master_key_id and kept.data_key("acme", 1) == kr.data_key("acme", 1)


# -- PII inside text


@dataclass
class Span:
    kind: str
    start: int
    end: int


def fake_find_pii(text: str) -> list[Span]:
    spans = [Span("email", m.start(), m.end()) for m in re.finditer(r"[\w.]+@[\w.]+\.\w+", text)]
    spans += [Span("phone", m.start(), m.end()) for m in re.finditer(r"\+?\d[\d -]{7,}\d", text)]
    return spans


TEXTS = ["mail ann@example.com or +1 555 123 4567 now", None, "nothing here", "", "b@x.io"]


def test_pii_redact():
    out = protect_pii(pa.array(TEXTS), None, fake_find_pii, "redact", table=T, column=C)
    assert out.to_pylist() == [
        "mail [REDACTED:email] or [REDACTED:phone] now",
        None,
        "nothing here",
        "",
        "[REDACTED:email]",
    ]

    # overlapping spans are merged, with the kind of the one that starts first (before stop 45 the
    # later was dropped whole: "567" stayed in clear); off returns the input
    def overlapping(text):
        return [Span("a", 0, 5), Span("b", 3, 8), Span("c", 8, 9), Span("d", 1, 2)]

    assert protect_pii(pa.array(["0123456789"]), None, overlapping, "redact", table=T, column=C).to_pylist() == [
        "[REDACTED:a][REDACTED:c]9"
    ]
    values = pa.array(TEXTS)
    assert protect_pii(values, None, fake_find_pii, "off", table=T, column=C) is values


def test_overlapping_echoes_and_detections_leave_nothing_in_clear(kr):
    """Two echoes that overlap ("Jane Doe" and "Doe, 14 Elm Street, Springfield"), and an echo that
    starts inside an email the detector found: all of both is protected, and revealed back whole."""
    texts = ["Customer: Jane Doe, 14 Elm Street, Springfield.", "Noted: jo@x.io diagnosis HIV positive"]
    echoes = [["Jane Doe", "Doe, 14 Elm Street, Springfield"], ["x.io diagnosis HIV positive"]]
    redacted = protect_pii(pa.array(texts), None, fake_find_pii, "redact", table=T, column=C, echoes=echoes)
    assert redacted.to_pylist() == ["Customer: [REDACTED:echo].", "Noted: [REDACTED:email]"]
    ids = rids(2)
    sealed = protect_pii(pa.array(texts), ids, fake_find_pii, "encrypt", table=T, column=C, tenants="acme",
                         keyring=kr, echoes=echoes)  # fmt: skip
    outside = [re.sub(r"\[PII:[a-z]+:[\w-]+\]", "", t) for t in sealed.to_pylist()]
    assert outside == ["Customer: .", "Noted: "]
    assert reveal_pii(sealed, ids, table=T, column=C, keyring=kr).to_pylist() == texts


def test_an_echo_hidden_by_invisible_or_full_width_characters_is_still_protected(kr):
    """An echo the model writes with a zero-width space inside, in full-width letters or with a
    soft hyphen reads as the value: it is protected whole, invisible characters included, and
    revealed back as written (before stop 46 each stayed in clear: echoes were exact text)."""
    texts = ["Dear J\u200bane Doe, hello", "Ｊａｎｅ Ｄｏｅ lives here", "Ja\u00adne Doe!", "Jane Dough is not"]
    echoes = [["Jane Doe"]] * 4
    redacted = protect_pii(pa.array(texts), None, lambda _: (), "redact", table=T, column=C, echoes=echoes)
    assert redacted.to_pylist() == ["Dear [REDACTED:echo], hello", "[REDACTED:echo] lives here", "[REDACTED:echo]!",
                                    "Jane Dough is not"]  # fmt: skip
    ids = rids(4)
    sealed = protect_pii(pa.array(texts), ids, lambda _: (), "encrypt", table=T, column=C, tenants="acme",
                         keyring=kr, echoes=echoes)  # fmt: skip
    assert [re.sub(r"\[PII:echo:[\w-]+\]", "", t) for t in sealed.to_pylist()] == ["Dear , hello", " lives here", "!",
                                                                                   "Jane Dough is not"]  # fmt: skip
    assert reveal_pii(sealed, ids, table=T, column=C, keyring=kr).to_pylist() == texts
    # Composed and decomposed accents read alike, in the text or in the value.
    nfd = unicodedata.normalize("NFD", "José Ñúñez")
    both = protect_pii(pa.array([nfd + " called", "José Ñúñez called"]), None, lambda _: (), "redact", table=T,
                       column=C, echoes=[["José Ñúñez"], [nfd]])  # fmt: skip
    assert both.to_pylist() == ["[REDACTED:echo] called"] * 2
    # A value that reads as fewer than ECHO_MIN_CHARS characters is not looked for as it reads.
    short = protect_pii(pa.array(["ab ab"]), None, lambda _: (), "redact", table=T, column=C,
                        echoes=[["a\u200b\u200b\u200bb"]])  # fmt: skip
    assert short.to_pylist() == ["ab ab"]


def test_pii_in_a_json_number_keeps_output_json_valid(kr):
    """A card number written as a JSON number: its token goes in quotes, so output_json stays JSON
    (before stop 45 `{"card": [REDACTED:card], ...}` did not parse, and an online replay of the
    stored answer json.loads it); inside a string the token stays as it is. Revealed, the number
    comes back as a JSON string."""
    from crypto.pii import find_pii

    texts = ['{"card": 4111111111111111, "note": "mail jo@example.com"}']
    redacted = protect_pii(pa.array(texts), None, find_pii, "redact", table=T, column="output_json", json_text=True)
    assert json.loads(redacted[0].as_py()) == {"card": "[REDACTED:card]", "note": "mail [REDACTED:email]"}
    ids = rids(1)
    sealed = protect_pii(pa.array(texts), ids, find_pii, "encrypt", table=T, column="output_json", tenants="acme",
                         keyring=kr, json_text=True)  # fmt: skip
    parsed = json.loads(sealed[0].as_py())
    assert parsed["card"].startswith("[PII:card:") and "4111" not in sealed[0].as_py()
    revealed = reveal_pii(sealed, ids, table=T, column="output_json", keyring=kr)[0].as_py()
    assert json.loads(revealed) == {"card": "4111111111111111", "note": "mail jo@example.com"}


def test_pii_spans_that_are_not_inside_one_json_string_keep_output_json_valid(kr):
    """The review's cases: a card inside a float (the span stops at its ".0"), an echo of a whole
    quoted value (the span covers the quotes), two spans side by side outside strings. Each is
    replaced, grown to the whole JSON tokens it touches, by one token in quotes: the JSON parses,
    redacted and sealed, and revealed it holds the text as a JSON string."""
    texts = ['{"x": 5555555555554444.0, "tier":"VIP1", "pair": 12345678-87654321}']

    def find(text):
        spans = [Span("card", text.index("5555"), text.index("5555") + 16)]
        spans += [Span("id", text.index("12345678"), text.index("12345678") + 8),
                  Span("id", text.index("87654321") - 1, text.index("87654321") + 8)]
        return spans

    echoes = [['"VIP1"']]
    redacted = protect_pii(pa.array(texts), None, find, "redact", table=T, column="output_json", echoes=echoes,
                           json_text=True)[0].as_py()  # fmt: skip
    assert json.loads(redacted) == {"x": "[REDACTED:card]", "tier": "[REDACTED:echo]", "pair": "[REDACTED:id]"}
    ids = rids(1)
    sealed = protect_pii(pa.array(texts), ids, find, "encrypt", table=T, column="output_json", tenants="acme",
                         keyring=kr, echoes=echoes, json_text=True)  # fmt: skip
    assert "5555" not in sealed[0].as_py() and "VIP1" not in sealed[0].as_py() and "8765" not in sealed[0].as_py()
    assert set(json.loads(sealed[0].as_py())) == {"x", "tier", "pair"}
    revealed = reveal_pii(sealed, ids, table=T, column="output_json", keyring=kr)[0].as_py()
    assert json.loads(revealed) == {"x": "5555555555554444.0", "tier": '"VIP1"', "pair": "12345678-87654321"}


def test_pii_encrypt_inline_and_reveal(kr, tmp_path):
    ids = rids(len(TEXTS))
    out = protect_pii(pa.array(TEXTS), ids, fake_find_pii, "encrypt", table=T, column=C, tenants="acme", keyring=kr)
    protected = out.to_pylist()
    # outside the tokens: a token's random base64 may hold "555" by chance
    outside = re.sub(r"\[PII:[a-z]+:[\w-]+\]", "", protected[0])
    assert "ann@example.com" not in outside and "555" not in outside
    assert re.fullmatch(r"mail \[PII:email:[\w-]+\] or \[PII:phone:[\w-]+\] now", protected[0])
    assert protected[1:4] == [None, "nothing here", ""]
    assert reveal_pii(out, ids, table=T, column=C, keyring=kr).to_pylist() == TEXTS
    # a token moved to another row does not decrypt there
    moved = pa.array([protected[4], None, None, None, protected[0]])
    with pytest.raises(DecryptionError, match="row orders:0:0: inline PII"):
        reveal_pii(moved, ids, table=T, column=C, keyring=kr)
    # a keyring without the tenant: raise, or keep the tokens
    only_umbr = kr.export(tmp_path / "umbr.json", ["umbr"], same_master_key=True)
    with pytest.raises(KeyPermissionError, match="acme"):
        reveal_pii(out, ids, table=T, column=C, keyring=only_umbr)
    assert reveal_pii(out, ids, table=T, column=C, keyring=only_umbr, on_missing_key="keep").to_pylist() == protected


def test_pii_literal_tokens_in_text_are_escaped(kr):
    # text that already holds "[PII:" (e.g. a model repeating a token it was shown) stays literal text
    earlier = protect_pii(pa.array(["x@y.org"]), ["other:0:9"], fake_find_pii, "encrypt",
                          table=T, column=C, tenants="acme", keyring=kr)[0].as_py()  # fmt: skip
    texts = [f"copied {earlier} and [PII::odd] and c@d.net", "[PII:x:notbase64!]"]
    ids = rids(2)
    out = protect_pii(pa.array(texts), ids, fake_find_pii, "encrypt", table=T, column=C, tenants="umbr", keyring=kr)
    assert "[PII::email:" in out[0].as_py()  # the copied token was escaped
    assert reveal_pii(out, ids, table=T, column=C, keyring=kr).to_pylist() == texts


# -- tables: reader and re-encryption


def _results(kr: Keyring, n: int = 6, offset: int = 0, table: str = T) -> tuple[pa.Table, dict]:
    tenants = pa.array([["acme", "globex"][i % 2] for i in range(n)])
    base = pa.table(
        {
            "id": [f"e{offset + i}" for i in range(n)],
            "status": ["ok"] * n,
            "source_topic": ["orders"] * n,
            "source_partition": pa.array([i % 2 for i in range(n)], pa.int32()),
            "source_offset": pa.array([offset + i for i in range(n)], pa.int64()),
        }
    )
    ids = row_ids_from(base)
    clear = {
        "output_text": [f"reply {offset + i} to z{i}@mail.com" if i != 2 else None for i in range(n)],
        "user_email": [f"user{i % 2}@corp.com" for i in range(n)],
        "raw": [json.dumps({"n": offset + i}).encode() for i in range(n)],
    }
    text = protect_pii(pa.array(clear["output_text"]), ids, fake_find_pii, "encrypt",
                       table=table, column="output_text", tenants=tenants, keyring=kr)  # fmt: skip
    cols = {
        "output_text": encrypt_column(text, ids, table=table, column="output_text", tenants=tenants, keyring=kr),
        "user_email": encrypt_column(
            pa.array(clear["user_email"]),
            ids,
            table=table,
            column="user_email",
            tenants=tenants,
            keyring=kr,
            deterministic=True,
        ),
        "raw": encrypt_column(
            pa.array(clear["raw"], pa.binary()), ids, table=table, column="raw", tenants=tenants, keyring=kr
        ),
    }
    for name, col in cols.items():
        base = base.append_column(name, col)
    return base, clear


def test_table_label_and_row_ids():
    assert table_label("s3://lake/triage/results/") == "results"
    assert table_label("/tmp/x/dead_letter", "job1/dead_letter") == "job1/dead_letter"
    t = pa.table({"source_topic": ["a:b", None], "source_partition": [1, 2], "source_offset": [5, 6]})
    assert row_ids_from(t).to_pylist() == ["a:b:1:5", None]


def test_reader_polars_pandas_arrow(kr, tmp_path):
    data, clear = _results(kr)
    uri = str(tmp_path / "lake" / "results")
    write_deltalake(uri, data)
    df = read_results(uri, keyring=kr)
    assert isinstance(df, pl.DataFrame)
    assert df["output_text"].to_list() == clear["output_text"]
    assert df["user_email"].to_list() == clear["user_email"]
    assert df["raw"].to_list() == clear["raw"] and df.schema["raw"] == pl.Binary
    assert df["id"].to_list() == [f"e{i}" for i in range(6)] and df.columns == data.column_names
    pdf = read_results(uri, keyring=kr, backend="pandas", columns=["id", "output_text"])
    assert isinstance(pdf, pd.DataFrame) and list(pdf.columns) == ["id", "output_text"]
    assert [None if pd.isna(v) else v for v in pdf["output_text"]] == clear["output_text"]
    arrow = read_results(uri, keyring=kr, backend="arrow", columns=["user_email"])
    assert arrow.column_names == ["user_email"] and arrow.column(0).to_pylist() == clear["user_email"]
    # keyring given as a path, master key from the environment
    os.environ["TIDEGATE_MASTER_KEY"] = base64.b64encode(MASTER).decode()
    try:
        assert read_results(uri, keyring=str(kr.path))["user_email"].to_list() == clear["user_email"]
    finally:
        del os.environ["TIDEGATE_MASTER_KEY"]
    # a table read under another logical name does not decrypt
    with pytest.raises(DecryptionError) as e:
        read_results(uri, keyring=kr, table="other")
    assert e.value.table == "other"


def test_reader_missing_tenant_raise_or_keep(kr, tmp_path):
    data, clear = _results(kr)
    uri = str(tmp_path / "results")
    write_deltalake(uri, data)
    only_acme = kr.export(tmp_path / "acme.json", ["acme"], same_master_key=True)
    with pytest.raises(KeyPermissionError, match="globex") as e:
        read_results(uri, keyring=only_acme)
    assert e.value.tenant == "globex"
    df = read_results(uri, keyring=only_acme, on_missing_key="keep", backend="pandas")
    acme = [i for i in range(6) if i % 2 == 0]
    globex = [i for i in range(6) if i % 2 == 1]
    assert [df["user_email"][i] for i in acme] == [clear["user_email"][i] for i in acme]
    assert [df["raw"][i] for i in acme] == [clear["raw"][i] for i in acme]
    assert df["output_text"][0] == clear["output_text"][0]
    for i in globex:
        assert df["user_email"][i].startswith(ARMOR_PREFIX) and "corp.com" not in df["user_email"][i]
        assert df["raw"][i] == data.column("raw")[i].as_py()  # stored bytes, still encrypted
        assert "mail.com" not in df["output_text"][i]


def test_decrypt_table_on_dead_letter_shape(kr):
    # a dead-letter-like table: encrypted raw event, no output text
    t = pa.table({"source_topic": ["t"], "source_partition": [0], "source_offset": [7], "stage": ["decode"]})
    ids = row_ids_from(t)
    raw = encrypt_column(pa.array([b"\xff not json"]), ids, table="dead_letter", column="raw",
                         tenants="acme", keyring=kr)  # fmt: skip
    out = decrypt_table(t.append_column("raw", raw), kr, table="dead_letter")
    assert out.column("raw").to_pylist() == [b"\xff not json"] and out.column("stage").to_pylist() == ["decode"]


def test_reencrypt_table_after_rotation(kr, tmp_path):
    uri = str(tmp_path / "results")
    old, clear_old = _results(kr, n=6)
    write_deltalake(uri, old, commit_properties=CommitProperties(app_transactions=[Transaction("orders-0", 41)]))
    kr.rotate("acme")
    new, clear_new = _results(kr, n=2, offset=100)
    write_deltalake(uri, new, mode="append")
    before = DeltaTable(uri).version()
    versions = key_versions(pl.read_delta(uri)["user_email"].to_arrow())
    assert ("acme", 1) in versions and ("acme", 2) in versions

    steps: list[tuple[str, int, int]] = []
    report = reencrypt_table(uri, kr, progress=lambda *step: steps.append(step))
    n = len(pl.read_delta(uri).columns)  # every column but the row ids, plus read and write
    assert steps[0][:2] == ("read", 1) and steps[-1] == ("write", steps[-1][2], steps[-1][2])
    assert [d for _, d, _ in steps] == list(range(1, len(steps) + 1)) and "user_email" in [s for s, _, _ in steps]
    assert len(steps) < n + 2
    # acme rows of the first batch: 0, 2, 4 (output_text of row 2 is null); globex was not rotated
    assert report.rows_rewritten == {"output_text": 2, "user_email": 3, "raw": 3}
    assert report.read_version == before and report.written_version == before + 1
    dt = DeltaTable(uri)
    assert dt.version() == before + 1 and dt.transaction_version("orders-0") == 41
    after = pl.read_delta(uri).sort("source_offset")
    for col in ("output_text", "user_email", "raw"):
        assert {kv for kv in key_versions(after[col].to_arrow()) if kv} == {("acme", 2), ("globex", 1)}
    # inline PII tokens inside the encrypted text were re-sealed too
    text = decrypt_column(after["output_text"].to_arrow(), row_ids_from(after.to_arrow()),
                          table=T, column="output_text", keyring=kr)  # fmt: skip
    token_versions = {tok[2] for tok in _token_headers(text.to_pylist())}
    assert token_versions == {("acme", 2), ("globex", 1)}
    # clear columns untouched, plaintext unchanged, and the old version can now go
    assert after["id"].to_list() == [f"e{i}" for i in range(6)] + ["e100", "e101"]
    kr.revoke("acme", 1)
    df = read_results(uri, keyring=kr).sort("source_offset")
    assert df["output_text"].to_list() == clear_old["output_text"] + clear_new["output_text"]
    assert df["user_email"].to_list() == clear_old["user_email"] + clear_new["user_email"]
    assert df["raw"].to_list() == clear_old["raw"] + clear_new["raw"]
    # deterministic tokens are equal again within the column once all rows share the version
    emails = after.filter(pl.col("source_partition") == 0)["user_email"].to_list()
    assert len(set(emails)) == 1
    # nothing stale: nothing written
    again = reencrypt_table(uri, kr)
    assert again.written_version is None and again.total == 0 and DeltaTable(uri).version() == before + 1


def test_a_reencrypt_conflict_masks_the_uris_credentials(kr, tmp_path):
    """The conflict errors named the table by its URI as given: an object store URI with a key in
    it reached the terminal (keys_cli prints TidegateErrors as they are)."""
    from jobs.reencrypt import ReencryptConflict, _no_rewrite_since

    uri = str(tmp_path / "results")
    for part in range(2):
        write_deltalake(uri, _results(kr, n=2, offset=10 * part)[0], mode="append")
    read = DeltaTable(uri)
    DeltaTable(uri).optimize.compact()
    with pytest.raises(ReencryptConflict) as e:
        _no_rewrite_since(DeltaTable(uri), read, read.version(), "s3://AKIAEXAMPLE:hunter2@bucket/results")
    assert "hunter2" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value) and "bucket/results" in str(e.value)


def test_reencrypt_refuses_to_overwrite_a_compaction_that_landed_meanwhile(kr, tmp_path):
    """A compaction committed while the table is being re-encrypted: the overwrite would keep the
    compacted file beside the snapshot's rows (delta-rs sees no conflict), every row twice. It is
    refused, nothing written; run again, it re-encrypts once. The files it writes keep statistics
    off ids, text and ciphertexts, as the sink's do."""
    import pyarrow.parquet as pq

    from jobs.reencrypt import ReencryptConflict

    uri = str(tmp_path / "results")
    for part in range(3):
        rows, _ = _results(kr, n=2, offset=10 * part)
        write_deltalake(uri, rows, mode="append")
    kr.rotate("acme")
    before = pl.read_delta(uri).height

    def compact_during_the_read(step, done, total):
        if step == "read":
            DeltaTable(uri).optimize.compact()

    with pytest.raises(ReencryptConflict, match="rewritten or removed"):
        reencrypt_table(uri, kr, progress=compact_during_the_read)
    assert pl.read_delta(uri).height == before

    # The compaction's commit file already cleaned from the log (a checkpoint after it, the older
    # commit files expired, as log_retention_hours does): its history no longer names it, and the
    # check by the log alone let the overwrite keep every row twice. The snapshot's files tell.
    import os

    for part in range(2):  # more than one file again, for the compaction to rewrite
        rows, _ = _results(kr, n=1, offset=300 + part)
        write_deltalake(uri, rows, mode="append")
    before += 2

    def compact_and_clean_the_log(step, done, total):
        if step == "read":
            DeltaTable(uri).optimize.compact()
            DeltaTable(uri).create_checkpoint()
            rows, _ = _results(kr, n=1, offset=500)
            write_deltalake(uri, rows, mode="append")
            latest = DeltaTable(uri).version()
            for v in range(latest):  # every commit file up to the checkpoint's (the compaction's) version
                os.remove(os.path.join(uri, "_delta_log", f"{v:020d}.json"))
            assert [c["operation"] for c in DeltaTable(uri).history()] == ["WRITE"]

    with pytest.raises(ReencryptConflict, match="rewritten or removed"):
        reencrypt_table(uri, kr, progress=compact_and_clean_the_log)
    assert pl.read_delta(uri).height == before + 1
    before += 1

    appended: set[str] = set()

    def append_during_the_read(step, done, total):  # a running job's commit: kept, not refused
        if step == "read":
            files = set(DeltaTable(uri).file_uris())
            more, _ = _results(kr, n=2, offset=100)
            write_deltalake(uri, more, mode="append")
            appended.update(set(DeltaTable(uri).file_uris()) - files)

    report = reencrypt_table(uri, kr, progress=append_during_the_read)
    assert report.total and pl.read_delta(uri).height == before + 2
    before += 2
    dt = DeltaTable(uri)
    rewritten = set(dt.file_uris()) - appended  # the test's own append wrote its file with default statistics
    assert rewritten and len(appended) == 1
    for path in rewritten:
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                if col.path_in_schema in ("id", "output_text", "user_email", "raw"):
                    assert col.statistics is None or not col.statistics.has_min_max, col.path_in_schema


def _token_headers(texts):
    for t in texts:
        for kind, tok in re.findall(r"\[PII:(\w+):([\w-]+)\]", t or ""):
            raw = base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4))
            n = raw[5]
            yield kind, raw, (raw[6 : 6 + n].decode(), int.from_bytes(raw[6 + n : 10 + n], "big"))


def test_reencrypt_leaves_text_shaped_like_a_pii_token_and_counts_what_it_seals(kr, tmp_path):
    """An event's id or a clear input field holding "[PII:...]" text (producers are untrusted), or a
    forged token inside a PII column: before, re-encryption tried to open them all, and one that did
    not open stopped every pass (rotate, re-encrypt, revoke could not finish). Tokens are only
    looked for in the binding's PII columns now, and one that does not open is left as it is. The
    values a pass seals count toward the keyring's per-version limit (before, they did not)."""
    uri = str(tmp_path / "results")
    data, _ = _results(kr, n=4)
    ids = row_ids_from(data)
    clear_text = decrypt_column(data.column("output_text"), ids, table=T, column="output_text", keyring=kr)
    token = re.search(r"\[PII:\w+:[\w-]+\]", clear_text[0].as_py()).group(0)
    forged = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]  # acme v1, does not decrypt
    data = data.set_column(data.schema.get_field_index("id"), "id", pa.array([forged, "e1", "e2", "e3"]))
    data = data.append_column("summary", pa.array([f"note {forged}", None, "plain", forged]))
    write_deltalake(uri, data)
    kr.rotate("acme")
    report = reencrypt_table(uri, kr)
    assert report.rows_rewritten == {"output_text": 1, "user_email": 2, "raw": 2}  # acme: rows 0 and 2 (2 has no text)
    after = pl.read_delta(uri).sort("source_offset")
    assert after["id"][0] == forged and after["summary"].to_list() == [f"note {forged}", None, "plain", forged]
    assert report.unopened_tokens == 0  # the forged ones are outside the PII columns: not looked at
    kr.reload()
    # 2 values in each of 3 columns, and the PII tokens inside acme's output texts, under version 2
    tokens = sum(len(re.findall(r"\[PII:", t or "")) for t in clear_text.to_pylist()[0::2])
    assert kr.usage("acme")[2] == 5 + tokens and tokens > 0
    # A forged token inside a PII column is left as it is; a real stale one beside it is resealed.
    from jobs.reencrypt import reencrypt_values

    mixed = pa.array([f"{token} and {forged}"])
    unopened = [0]
    new, changed = reencrypt_values(mixed, ids.slice(0, 1), table=T, column="output_text", keyring=kr, unopened=unopened)
    assert changed == 1 and forged in new[0].as_py() and token not in new[0].as_py()
    assert unopened == [1]  # counted: `keys reencrypt` then exits 3 (a revoke would strand real ones)


def test_reencrypt_revoked_version_refuses(kr, tmp_path):
    uri = str(tmp_path / "results")
    data, _ = _results(kr, n=2)
    write_deltalake(uri, data)
    kr.rotate("acme")
    kr.revoke("acme", 1)
    with pytest.raises(KeyRevokedError, match="acme"):
        reencrypt_table(uri, kr)
    assert DeltaTable(uri).version() == 0


# -- CLI


def test_cli_keys(tmp_path):
    from jobs.cli import app

    runner = CliRunner()
    path = str(tmp_path / "kr.json")
    env = {"TIDEGATE_MASTER_KEY": base64.b64encode(MASTER).decode(), "TIDEGATE_KEYRING": path}

    def run(*args, code=0, **kw):
        r = runner.invoke(app, ["keys", *args], env=kw.pop("env", env), **kw)
        assert r.exit_code == code, r.output
        return r.output

    assert "created" in run("init")
    assert "already exists" in run("init", code=2)
    assert os.path.exists(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "version 1" in run("create-tenant", "acme")
    assert "version 1" in run("create-tenant", "globex", "--keyring", path)
    assert "version 2 is now current" in run("rotate", "acme")
    assert "revoked" in run("revoke", "acme", "1", "--yes")
    assert "Aborted" in run("revoke", "globex", "1", input="n\n", code=1)
    out = run("list", env={"TIDEGATE_KEYRING": path})  # no master key needed
    lines = [ln for ln in out.splitlines() if "acme" in ln or "globex" in ln]
    assert len(lines) == 3
    assert re.search(r"acme\s+│\s+1\s+│\s+revoked", out) and re.search(r"acme\s+│\s+2\s+│\s+active.*\*", out)
    assert re.search(r"globex\s+│\s+1\s+│\s+active", out)
    doc = json.loads(Path(path).read_text())

    def shows_any_of(output: str, secret: str) -> bool:
        """A table may wrap a long cell over lines: any 16 characters of it, borders and spaces out."""
        flat = re.sub(r"[\s│┃─━┏┓┗┛┡┩└┘├┤┼╇╈╋┳┻┌┐╭╮╰╯]", "", output)  # (rich's borders: never base64)
        return any(secret[i : i + 16] in flat for i in range(0, max(1, len(secret) - 15)))

    for tenant in ("acme", "globex"):
        for version in doc["tenants"][tenant]:
            assert version["wrapped_key"] is None or not shows_any_of(out, version["wrapped_key"])
    # API keys: the token once at creation; the list never shows it, its hash or its salt.
    token = re.search(r"tg_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", run("api-key", "create", "acme")).group(0)
    listed = run("api-key", "list", env={"TIDEGATE_KEYRING": path})
    record = json.loads(Path(path).read_text())["api_keys"][token[3:15]]
    assert token[3:15] in listed and "acme" in listed
    assert not any(shows_any_of(listed, v) for v in (token[16:], record["hash"], record["salt"]))
    # export: re-wrapped for the recipient's master key, or refused unless told to keep the production one.
    sub = str(tmp_path / "acme-only.json")
    refused = run("export", "--tenant", "acme", "--out", sub, code=2)
    assert "--to-master-key-env" in refused and "--same-master-key" in refused and not os.path.exists(sub)
    both = run("export", "--tenant", "acme", "--out", sub, "--same-master-key", "--to-master-key-env", "X", code=2)
    assert "exclude each other" in both and not os.path.exists(sub)
    assert "keyring's own" in run("export", "--tenant", "acme", "--out", sub, "--to-master-key-env",
                                  "TIDEGATE_MASTER_KEY", code=2)  # the production key as "recipient"  # fmt: skip
    assert "TG_NOTEBOOK_KEY is not set" in run("export", "--tenant", "acme", "--out", sub, "--to-master-key-env",
                                               "TG_NOTEBOOK_KEY", code=2)  # fmt: skip
    assert not os.path.exists(sub)
    notebook_key = b"\x05" * 32
    nb_env = {**env, "TG_NOTEBOOK_KEY": base64.b64encode(notebook_key).decode()}
    out = run("export", "--tenant", "acme", "--tenant", "globex", "--out", sub, "--to-master-key-env", "TG_NOTEBOOK_KEY",
              env=nb_env)  # fmt: skip
    assert "acme, globex" in out and stat.S_IMODE(os.stat(sub).st_mode) == 0o600
    one = str(tmp_path / "globex-only.json")
    run("export", "--tenant", "globex", "--out", one, "--to-master-key-env", "TG_NOTEBOOK_KEY", env=nb_env)
    production, recipient = Keyring.open(path, LocalMasterKeyProvider(key=MASTER)), LocalMasterKeyProvider(key=notebook_key)
    exported = Keyring.open(one, recipient)
    assert exported.tenants() == ["globex"] and exported.master_key_id == recipient.key_id
    assert exported.data_key("globex", 1) == production.data_key("globex", 1)  # the same data key, re-wrapped
    with pytest.raises(KeyPermissionError, match="acme"):
        exported.data_key("acme", 2)
    with pytest.raises(KeyringError, match="wrong master key"):
        Keyring.open(one, LocalMasterKeyProvider(key=MASTER)).data_key("globex", 1)
    wrapped = base64.b64decode(json.loads(Path(one).read_text())["tenants"]["globex"][0]["wrapped_key"])
    with pytest.raises(KeyringError, match="does not open"):  # not merely relabelled: the production key cannot unwrap
        LocalMasterKeyProvider(key=MASTER).unwrap(wrapped, key_context("globex", 1))
    both_tenants = Keyring.open(sub, recipient)
    assert both_tenants.tenants() == ["acme", "globex"] and both_tenants.data_key("acme", 2)
    with pytest.raises(KeyRevokedError):
        both_tenants.data_key("acme", 1)  # revoked stays revoked: no key travels
    # --same-master-key: today's copy, asked for explicitly; the production master key opens it.
    same = str(tmp_path / "same.json")
    assert "acme" in run("export", "--tenant", "acme", "--out", same, "--same-master-key")
    assert Keyring.open(same, LocalMasterKeyProvider(key=MASTER)).tenants() == ["acme"]
    assert "TIDEGATE_MASTER_KEY is not set" in run("rotate", "acme", env={"TIDEGATE_KEYRING": path}, code=2)
    assert "no key for tenant 'nope'" in run("rotate", "nope", code=2)


def test_reencrypt_rewrites_the_stored_values_of_a_column_that_also_holds_clear_ones(kr, tmp_path):
    """Dead-letter `raw` written before `dead_letter_raw` was turned on is clear, after it encrypted:
    the stored values are re-encrypted, the clear ones kept byte for byte. Before, the column was
    taken for clear and skipped, and revoking the old version then destroyed its encrypted values."""
    uri = str(tmp_path / "results")  # the name the values are bound to (_results)
    data, _ = _results(kr, n=6)
    sealed = data.column("raw").to_pylist()
    # Clear bytes, and one that looks like a stored value but is not ours (a client's event shaped
    # like a header): kept as they are, not a reason to stop the table's pass.
    clear = [json.dumps({"old": 0}).encode(), json.dumps({"old": 1}).encode(), sealed[0][:-1] + bytes([sealed[0][-1] ^ 1])]
    raw = pa.array(clear + sealed[3:], pa.binary())
    write_deltalake(uri, data.set_column(data.schema.get_field_index("raw"), "raw", raw))
    kr.rotate("acme")
    kr.rotate("globex")
    report = reencrypt_table(uri, kr, columns=["raw"])
    assert report.rows_rewritten == {"raw": 3}
    # The one shaped like a value under acme's old version did not open beside three that did: the
    # label is right, so it is not ours (a client's bytes), and not counted (it would block every
    # `reencrypt && revoke` for good: it stays as it is).
    assert report.unopened_values == 0
    after = pl.read_delta(uri).sort("source_offset")["raw"].to_list()
    assert after[:3] == clear
    assert {kv for kv in key_versions(pa.array(after[3:], pa.binary()))} == {("acme", 2), ("globex", 2)}
    assert reencrypt_table(uri, kr, columns=["raw"]).written_version is None  # nothing stale now


def test_reencrypt_counts_the_stored_values_of_a_mixed_column_it_cannot_open(kr, tmp_path):
    """A wrong table label (`--name`) opens none of a mixed column's stored values: before stop 45
    each was taken for clear bytes, the command said "nothing to re-encrypt" and exited 0, and
    `reencrypt && revoke` destroyed them. They are counted now, and the command exits 3."""
    from jobs.cli import app

    uri = str(tmp_path / "results")
    data, _ = _results(kr, n=4)
    sealed = data.column("raw").to_pylist()
    raw = pa.array([json.dumps({"old": 0}).encode()] + sealed[1:], pa.binary())
    write_deltalake(uri, data.set_column(data.schema.get_field_index("raw"), "raw", raw))
    kr.rotate("acme")
    kr.rotate("globex")
    report = reencrypt_table(uri, kr, columns=["raw"], table="not-this-table")
    assert report.written_version is None and report.unopened_values == 3
    env = {"TIDEGATE_MASTER_KEY": base64.b64encode(MASTER).decode(), "TIDEGATE_KEYRING": str(kr.path)}
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri, "--column", "raw", "--name", "not-this-table"],
                           env=env)  # fmt: skip
    assert r.exit_code == 3, r.output
    assert "3 value(s) of columns that also hold clear bytes" in r.output and "nothing to re-encrypt" not in r.output
    assert reencrypt_table(uri, kr, columns=["raw"]).rows_rewritten == {"raw": 3}  # the right label opens them


def test_cli_reencrypt(kr, tmp_path):
    from jobs.cli import app

    uri = str(tmp_path / "results")
    data, _ = _results(kr, n=4)
    write_deltalake(uri, data)
    kr.rotate("globex")
    env = {"TIDEGATE_MASTER_KEY": base64.b64encode(MASTER).decode(), "TIDEGATE_KEYRING": str(kr.path)}
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri, "--column", "user_email"], env=env)
    assert r.exit_code == 0, r.output
    assert "re-encrypted 2 value(s) (user_email: 2)" in r.output
    assert "checked again at version 1: nothing under an old key version" in r.output  # a second pass, read only
    after = pl.read_delta(uri)
    assert {kv for kv in key_versions(after["user_email"].to_arrow())} == {("acme", 1), ("globex", 2)}
    assert {kv for kv in key_versions(after["raw"].to_arrow())} == {("acme", 1), ("globex", 1)}  # not asked
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri, "--column", "user_email"], env=env)
    assert "nothing to re-encrypt" in r.output
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri, "--storage-option", "oops"], env=env)
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    # A wrong table or column: one line, exit 2 (before stop 44: a traceback quoting the URI)
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri + "-typo"], env=env)
    assert r.exit_code == 2 and r.output.strip().endswith(f"error: no Delta table at {uri}-typo"), r.output
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri, "--column", "user_emial"], env=env)
    assert r.exit_code == 2 and "error: --column: no such column(s) in the table: user_emial (it has" in r.output
    secret_uri = "s3://AKIAEXAMPLE:hunter2@127.0.0.1:9/b/results"  # nothing listens: the store's own error
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", secret_uri, "--storage-option", "AWS_ALLOW_HTTP=true",
                                 "--storage-option", "AWS_ENDPOINT_URL=http://127.0.0.1:9"], env=env)  # fmt: skip
    assert r.exit_code == 2 and "hunter2" not in r.output and "s3://***@127.0.0.1:9/b/results" in r.output, r.output


def test_cli_reencrypt_exits_3_when_a_token_under_an_old_version_does_not_open(kr, tmp_path):
    """A token shaped text left as it is (it does not open here: forged, or the table's label is
    wrong) must not let `reencrypt && revoke` revoke: a real one would be stranded."""
    from jobs.cli import app

    uri = str(tmp_path / "results")
    data, _ = _results(kr, n=2)
    ids = row_ids_from(data)
    clear_text = decrypt_column(data.column("output_text"), ids, table=T, column="output_text", keyring=kr)
    token = re.search(r"\[PII:\w+:[\w-]+\]", clear_text[0].as_py()).group(0)
    forged = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    data = data.set_column(data.schema.get_field_index("output_text"), "output_text", pa.array([f"x {forged}", None]))
    write_deltalake(uri, data)
    kr.rotate("acme")
    env = {"TIDEGATE_MASTER_KEY": base64.b64encode(MASTER).decode(), "TIDEGATE_KEYRING": str(kr.path)}
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri], env=env)
    assert r.exit_code == 3, r.output
    assert "1 text(s) in PII columns shaped like a token under an old key version did not open" in r.output
    assert forged not in r.output


def test_cli_reencrypt_exits_3_while_stale_values_still_arrive(kr, tmp_path, monkeypatch):
    """`reencrypt && revoke` must not revoke while values under the old version are still landing:
    the last pass still rewrote something, so the command says so and exits 3 (one pass here
    stands for a writer still sealing under the old version). Before, it exited 0."""
    import jobs.keys_cli
    from jobs.cli import app

    uri = str(tmp_path / "results")
    write_deltalake(uri, _results(kr, n=4)[0])
    kr.rotate("globex")
    monkeypatch.setattr(jobs.keys_cli, "REENCRYPT_PASSES", 1)
    env = {"TIDEGATE_MASTER_KEY": base64.b64encode(MASTER).decode(), "TIDEGATE_KEYRING": str(kr.path)}
    r = CliRunner().invoke(app, ["keys", "reencrypt", "--table", uri, "--settle-s", "0.1"], env=env)
    assert r.exit_code == 3 and "run it again before revoking" in r.output, r.output


def test_a_keyring_shared_by_threads_reloads_while_others_read_and_rotate(kr):
    """An online replica refreshes one keyring from its event loop, its guards' thread and its
    audit writer's thread: reload, a key cached meanwhile and writes hold its lock (a reload's
    copy of the key cache could meet a key being cached: "dictionary changed size")."""
    import threading

    kr.data_key("acme", 1)
    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(300):
                kr.reload()
                kr.data_key("acme", kr.current("acme"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(5):
        kr.rotate("acme")
    for t in threads:
        t.join()
    assert errors == [] and kr.current("acme") == 6


def test_errors_are_tidegate_errors():
    for cls in (KeyringError, KeyPermissionError, KeyRevokedError, DecryptionError):
        assert issubclass(cls, TidegateError)


# -- known answers: the stored format as docs/encryption.md states it, built by hand


class _FixedKeys:
    """A KeySource with one known data key (acme, version 1)."""

    def __init__(self, key: bytes):
        self.key = key

    def current(self, tenant: str) -> int:
        return 1

    def data_key(self, tenant: str, version: int) -> bytes:
        assert (tenant, version) == ("acme", 1)
        return self.key


def test_values_built_by_hand_from_the_documented_format_open_and_a_wrapped_key_too():
    """Every other test is a round trip: a change to the HKDF labels, the header, the associated
    data's order or the key wrapping would pass them all and leave every stored table and keyring
    unreadable. These values are made with `cryptography` alone, as docs/encryption.md describes
    ("Stored value format", "What a value is bound to", "Keys under a value", the wrapped key)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    data_key, table, column, row_id = bytes(range(100, 132)), "delta:0f3c", "output_text", "orders:0:7"
    keys = _FixedKeys(data_key)

    def header(flags: int) -> bytes:
        return bytes([0xA7, 0x54, 0x47, 1, flags, 4]) + b"acme" + (1).to_bytes(4, "big")

    def u16(s: str) -> bytes:
        return len(s.encode()).to_bytes(2, "big") + s.encode()

    # random (AES-256-GCM): header | nonce | ciphertext | tag; aad = header, table, column, row id
    gcm = HKDF(SHA256(), 32, salt=None, info=b"tidegate/v1/aes-256-gcm|acme|1").derive(data_key)
    nonce, h = bytes(12), header(0)
    value = h + nonce + AESGCM(gcm).encrypt(nonce, "hello, acme".encode(), h + u16(table) + u16(column) + row_id.encode())
    opened = decrypt_column(pa.array([value], pa.binary()), pa.array([row_id]), table=table, column=column, keyring=keys)
    assert opened.to_pylist() == ["hello, acme"]
    # the same bytes under another row id do not open (the row is bound)
    with pytest.raises(DecryptionError):
        decrypt_column(pa.array([value], pa.binary()), pa.array(["orders:0:8"]), table=table, column=column, keyring=keys)
    # deterministic (AES-SIV, bytes): header | SIV | ciphertext; associated data [header, table, column]
    siv = HKDF(SHA256(), 64, salt=None, info=b"tidegate/v1/aes-siv-512|acme|1").derive(data_key)
    h = header(0b11)
    value = h + AESSIV(siv).encrypt(b"\x00raw bytes", [h, table.encode(), column.encode()])
    opened = decrypt_column(pa.array([value], pa.binary()), pa.array([row_id]), table=table, column=column, keyring=keys)
    assert opened.to_pylist() == [b"\x00raw bytes"]
    # a wrapped key: nonce (12) | AES-256-GCM(master, nonce, data key, aad = canonical JSON of the context)
    context = b'{"purpose":"tidegate-data-key","tenant":"acme","version":"1"}'
    wrapped = nonce + AESGCM(MASTER).encrypt(nonce, data_key, context)
    assert LocalMasterKeyProvider(key=MASTER).unwrap(wrapped, key_context("acme", 1)) == data_key
    assert LocalMasterKeyProvider(key=MASTER).key_id == "local:" + __import__("hmac").new(
        MASTER, b"tidegate master key id", "sha256").hexdigest()[:16]  # fmt: skip
