"""Security properties of the pure logic (docs/encryption.md, "Threat model"): whose key protects
a dead letter, what messages may say, what a running job sees of the keyring, echoes, what a
reader reveals and what each value is bound to. End to end: tests/test_encryption_e2e.py."""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Literal, Union

import pyarrow as pa
import pytest
from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from compute.prompts import PromptRenderer
from compute.rules import Candidate, OutputSchema
from compute.validation import Validator
from connectors.delta import DeltaSink
from crypto.binding import binding_of
from crypto.columns import encrypt_column, row_ids_from
from crypto.format import b64, header
from crypto.keyring import Keyring, LocalMasterKeyProvider
from crypto.reader import decrypt_table, read_results
from crypto.stage import EncryptionStage
from schemas.encryption import EncryptionSpec
from schemas.errors import DecryptionError
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA, SOURCE_SCHEMA
from schemas.spec import PromptSpec, parse_spec

MASTER = bytes(range(32))
SECRET = "jane.doe@corp.example"  # a value that must never show in a message


@pytest.fixture
def keyring(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDEGATE_MASTER_KEY", MASTER.hex())
    k = Keyring.init(tmp_path / "keyring.json", LocalMasterKeyProvider(key=MASTER))
    for t in ("acme", "globex", "default"):
        k.create_tenant(t)
    return k


def source(values: list[bytes | None], changes=None) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            "topic": ["t"] * n, "partition": [0] * n, "offset": list(range(n)), "key": [None] * n, "value": values,
            "timestamp_ms": [0] * n, "received_ns": [0] * n, "source_change": changes or [None] * n,
        },
        schema=SOURCE_SCHEMA,
    )  # fmt: skip


def renderer(keyring=None, template="Q: {{ q }}", **enc) -> PromptRenderer:
    spec = PromptSpec(template=template, id_field="id")
    encryption = None
    if keyring is not None:
        encryption = EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", tenant="default",
                                    input_fields=["ref"], **enc)  # fmt: skip

    def has_key(tenant):
        return keyring is not None and keyring.has_tenant(tenant)

    return PromptRenderer(spec, 200, "run1", encryption, has_key)


# -- 2. a dead letter is encrypted under its event's tenant -----------------------------------------


def test_an_event_of_a_known_tenant_is_dead_lettered_under_its_own_tenant(keyring):
    r = renderer(keyring)
    events = [
        b'{"customer": "acme", "q": "x"}',  # missing_id
        b'{"customer": "acme", "id": [1], "q": "x"}',  # invalid_id
        json.dumps({"customer": "acme", "id": "big", "q": "x" * 500}).encode(),  # oversized
        b'{"customer": "globex", "id": "r", "q": "x"}',  # a source update (below)
        b"\xff not json",  # unreadable bytes: the fallback tenant
        b'{"customer": "nobody", "id": "u", "q": "x"}',  # unknown tenant: the fallback
        b'{"customer": "acme", "id": "ok", "q": "x"}',
    ]
    out = r.render(source(events, changes=[None, None, None, "update", None, None, None]))
    dead = out.dead.to_pylist()
    assert [(d["error_class"], d["tenant"]) for d in dead] == [
        ("missing_id", "acme"), ("invalid_id", "acme"), ("oversized_message", "acme"),
        ("source_update", "globex"), ("invalid_utf8", "default"), ("unknown_tenant", "default"),
    ]  # fmt: skip
    assert dead[2]["id"] == "big"  # an oversized event is still named
    assert out.requests.column("tenant").to_pylist() == ["acme"]


# -- 6. messages name fields and positions, never values ---------------------------------------------

S = SECRET.encode()
RENDER_CASES = [
    (b'{"id": "' + S + b'", "q": ', "invalid_json"),
    (b'{"id": "' + S + b'\xff"}', "invalid_utf8"),
    (b'["' + S + b'"]', "not_an_object"),
    (b'{"' + S + b'": "\\ud800", "id": "a", "q": "x"}', "invalid_unicode"),
    (b'{"q": "' + S + b'"}', "missing_id"),
    (b'{"id": {"' + S + b'": 1}, "q": "x"}', "invalid_id"),
    (b'{"id": "a", "' + S + b'": 1}', "missing_variable"),
    (b'{"id": "a", "q": "x", "customer": "' + S + b'"}', "invalid_tenant"),
    (b'{"id": "a", "q": "x", "customer": "' + b"x" * 300 + S + b'"}', "oversized_message"),
]


@pytest.mark.parametrize(("value", "error_class"), RENDER_CASES)
def test_render_errors_quote_no_value(keyring, value, error_class):
    dead = renderer(keyring).render(source([value])).dead.to_pylist()
    assert [d["error_class"] for d in dead] == [error_class]
    assert SECRET not in dead[0]["error"] and "jane" not in dead[0]["error"]


@pytest.mark.parametrize(
    ("template", "event", "message"),
    [
        ("{{ user[key] }}", {"user": {}, "key": SECRET}, "template: an attribute or item it looks up is undefined"),
        ("{{ user[key].x }}", {"user": {SECRET: 1}, "key": SECRET}, "template: an attribute or item it looks up is undefined"),
        ("{{ q.upper(x) }}", {"q": SECRET, "x": 1}, "template: TypeError"),
        ("{{ raise(q) }}", {"q": SECRET}, "template: "),  # an undefined callable
        ("{{ q | attr(q) | upper }}", {"q": SECRET}, "template: an attribute or item it looks up is undefined"),
    ],
)
def test_template_errors_quote_no_value(template, event, message):
    event = {"id": "a", **event}
    dead = renderer(template=template).render(source([json.dumps(event).encode()])).dead.to_pylist()
    assert len(dead) == 1 and dead[0]["error"].startswith(message), dead[0]["error"]
    assert "jane" not in dead[0]["error"]


def test_json_schema_messages_name_declared_fields_only():
    keyed = OutputSchema({"type": "object", "additionalProperties": {"type": "integer"}})
    with pytest.raises(ValueError) as e:
        keyed.parse(json.dumps({SECRET: "x"}))
    assert "jane" not in str(e.value) and "<key>: fails 'type'" in str(e.value)
    nested = OutputSchema({"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a"]}}}})
    with pytest.raises(ValueError) as e:
        nested.parse(json.dumps({"tags": ["a", SECRET]}))
    assert "jane" not in str(e.value) and "tags[1]: fails 'enum'" in str(e.value)


class KeyedModel(BaseModel):
    scores: dict[str, int]
    email: str

    @field_validator("email")
    @classmethod
    def _company(cls, v: str) -> str:
        if not v.endswith("@ours.example"):
            raise ValueError(f"{v} is not one of ours")  # quotes the value: must not reach a table
        return v


def test_pydantic_messages_name_declared_fields_only(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    schema = OutputSchema("tests.test_security:KeyedModel")
    with pytest.raises(ValueError) as e:
        schema.parse(json.dumps({"scores": {SECRET: "high"}, "email": "a@ours.example"}))
    assert "jane" not in str(e.value) and "scores.<key>: " in str(e.value)
    with pytest.raises(ValueError) as e:
        schema.parse(json.dumps({"scores": {}, "email": SECRET}))
    assert "jane" not in str(e.value) and "email: value_error" in str(e.value)


class Refund(BaseModel):
    kind: Literal["refund"]


class Ship(BaseModel):
    kind: Literal["ship"]


class TaggedModel(BaseModel):
    """Messages of pydantic's own that quote the input (a union's tag, a parser's words) and a
    validator's own error type (PydanticCustomError fills its message from the value)."""

    action: Annotated[Union[Refund, Ship], Field(discriminator="kind")]
    ref: uuid.UUID
    owner: str
    note: str = Field(max_length=5)

    @field_validator("owner")
    @classmethod
    def _ours(cls, v: str) -> str:
        if not v.endswith("@ours.example"):
            raise PydanticCustomError("not_ours", "{v} is not ours", {"v": v})
        return v


def test_pydantic_messages_that_quote_the_input_give_their_type_only(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    schema = OutputSchema("tests.test_security:TaggedModel")
    with pytest.raises(ValueError) as e:
        schema.parse(json.dumps({"action": {"kind": SECRET}, "ref": SECRET, "owner": SECRET, "note": "x" * 9}))
    text = str(e.value)
    assert "jane" not in text and "j`" not in text, text
    assert "action: union_tag_invalid" in text and "ref: uuid_parsing" in text and "owner: not_ours" in text
    # pydantic's words where they say only what the schema expects
    assert "note: String should have at most 5 characters" in text


def quoting_rule(candidate):
    return False, None, f"bad output {candidate.output} " + "x" * 400


def test_custom_rule_messages_are_scrubbed_and_truncated(monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    spec = parse_spec({
        "name": "v", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"}, "sink": {"results": "r", "dead_letter": "d"},
        "validation": [{"rule": "custom", "path": "tests.test_security:quoting_rule"}],
    })  # fmt: skip
    rule = Validator(spec).rules[0]
    message = rule.check(Candidate(f"mail {SECRET}")).message
    assert "jane" not in message and "[REDACTED:email]" in message and len(message) == 200


# -- 3 and 4. a running job sees rotations and revocations; usage is counted ------------------------


def stage_for(keyring, **enc) -> EncryptionStage:
    spec = EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", output_fields=["output_text"], **enc)
    return EncryptionStage(spec, "/lake/results", "/lake/dead_letter")


def results_rows(tenants: list[str], texts: list[str] | None = None, **extra) -> pa.Table:
    n = len(tenants)
    cols = {name: pa.nulls(n, RESULTS_SCHEMA.field(name).type) for name in RESULTS_SCHEMA.names}
    cols.update(
        id=pa.array([f"e{i}" for i in range(n)]), tenant=pa.array(tenants), source_topic=pa.array(["t"] * n),
        source_partition=pa.array([0] * n, pa.int32()), source_offset=pa.array(range(n), pa.int64()),
        attempts=pa.array([1] * n, pa.int32()), output_text=pa.array(texts or [f"out {i}" for i in range(n)]),
    )  # fmt: skip
    table = pa.table(cols, schema=RESULTS_SCHEMA)
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values, pa.string()))
    return table


def test_a_running_stage_sees_rotation_and_revocation(keyring, tmp_path):
    stage = stage_for(keyring)
    assert stage.keyring.current("acme") == 1
    other = Keyring.open(keyring.path, LocalMasterKeyProvider(key=MASTER))  # `tidegate keys` elsewhere
    other.rotate("acme")
    assert stage.refresh() and stage.keyring.current("acme") == 2
    assert not stage.refresh()  # unchanged file: one stat, no reload
    other.revoke("acme", 2)
    other.revoke("acme", 1)
    stage.refresh()
    kept, dead = stage.split_unkeyed(results_rows(["acme", "globex", "acme"]), "run1")
    assert kept.column("id").to_pylist() == ["e1"]
    d = dead.to_pylist()
    assert [(r["id"], r["tenant"], r["stage"], r["error_class"]) for r in d] == [
        ("e0", "acme", "encrypt", "key_revoked"), ("e2", "acme", "encrypt", "key_revoked")
    ]
    assert set(dead.schema.names) <= set(DEAD_LETTER_SCHEMA.names)
    assert "out 0" not in json.dumps(d, default=str)  # nothing of the row is written


def test_usage_is_counted_per_version_and_rotates_at_the_limit(keyring):
    stage = stage_for(keyring, rotate_after_values=5)
    stored = stage.stored_results_schema(RESULTS_SCHEMA)
    stage.protect_results(results_rows(["acme"] * 3 + ["globex"]), stored)
    assert stage.record_usage() == []  # acme v1: 3 values
    keyring.reload()
    assert keyring.usage("acme") == {1: 3} and keyring.usage("globex") == {1: 1}
    stage.protect_results(results_rows(["acme"] * 2), stored)
    assert stage.record_usage() == [("acme", 2)]  # 5 values: rotated
    keyring.reload()
    assert keyring.current("acme") == 2 and keyring.usage("acme") == {1: 5, 2: 0}
    assert stage.keyring.current("acme") == 2  # the stage encrypts under the new version next
    stage.protect_results(results_rows(["acme"]), stored)
    stage.record_usage()
    keyring.reload()
    assert keyring.usage("acme") == {1: 5, 2: 1}


# -- 5. echoes of carried input values ------------------------------------------------------------


def test_an_echoed_input_value_is_protected_in_the_output(keyring):
    spec = EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", input_fields=["ref"])
    stage = EncryptionStage(spec, "/lake/results", "/lake/dead_letter")
    plain = results_rows(["acme", "acme"], ["ticket REF-77812 is closed", "no echo here"], input_ref=["REF-77812", "REF-1"])
    stored = stage.stored_results_schema(RESULTS_SCHEMA)
    out = stage.protect_results(plain, stored)
    text = out.column("output_text").to_pylist()
    assert "REF-77812" not in text[0] and text[0].startswith("ticket [PII:echo:")
    assert text[1] == "no echo here"
    back = decrypt_table(out, keyring, binding=stage.results)
    assert back.column("output_text").to_pylist() == ["ticket REF-77812 is closed", "no echo here"]
    # A structured output escapes the value inside its JSON strings: protected in that form too.
    name = 'Zoë "Z" Smith'
    escaped = [json.dumps({"who": name}), json.dumps({"who": name}, ensure_ascii=False)]
    out = stage.protect_results(results_rows(["acme", "acme"], escaped, input_ref=[name, name]), stored)
    for stored_text in out.column("output_text").to_pylist():
        # A token's ciphertext is random base64 and may hold "Zo" by chance: look outside the tokens.
        outside = re.sub(r"\[PII:echo:[A-Za-z0-9_-]+\]", "", stored_text)
        assert "[PII:echo:" in stored_text and "Zo" not in outside and "Smith" not in outside, stored_text
    assert decrypt_table(out, keyring, binding=stage.results).column("output_text").to_pylist() == escaped
    off = EncryptionStage(spec.model_copy(update={"protect_echoes": False}), "/lake/results", "/lake/dead_letter")
    assert "REF-77812" in off.protect_results(plain, off.stored_results_schema(RESULTS_SCHEMA)).column("output_text")[0].as_py()


def test_the_stage_keeps_output_json_valid_around_a_pii_number(keyring):
    """The stage protects output_json as JSON (protect_pii json_text): a card written as a number
    is a quoted token, in redact and in encrypt mode (tests/test_crypto.py has the reveal)."""
    card = '{"card": 4111111111111111}'
    for mode in ("redact", "encrypt"):
        stage = EncryptionStage(EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", pii=mode),
                                "/lake/results", "/lake/dead_letter")  # fmt: skip
        plain = results_rows(["acme"])
        plain = plain.set_column(plain.schema.get_field_index("output_json"), "output_json", pa.array([card]))
        out = stage.protect_results(plain, stage.stored_results_schema(RESULTS_SCHEMA))
        stored = out.column("output_json")[0].as_py()
        assert "4111" not in stored and json.loads(stored)["card"].startswith(("[REDACTED:card]", "[PII:card:")), mode


# -- 7 and 9. what a reader reveals ----------------------------------------------------------------


def forged_token(tenant: str = "acme") -> str:
    """A token with a valid header that no key opens (what anyone can write into a text column)."""
    return f"[PII:email:{b64(header(tenant, 1, 0) + bytes(12) + bytes(24))}]"


def test_reveal_only_in_pii_columns_and_a_bad_token_fails_its_cell(keyring):
    stage = stage_for(keyring, pii="encrypt")
    stage.output_fields = {}  # inline PII only
    stored = stage.stored_results_schema(RESULTS_SCHEMA)
    assert [f.name for f in stored if f.metadata and f.metadata.get(b"tidegate.pii")] == ["output_text", "output_json"]
    plain = results_rows(["acme"] * 3, ["mail a@b.example", "mail c@d.example", "mail e@f.example"])
    out = stage.protect_results(plain, stored)
    ids = out.column("id").to_pylist()
    ids[0] = forged_token()  # a forged token in the plain id column: never touched
    texts = out.column("output_text").to_pylist()
    texts[1] = "see " + forged_token()  # a forged token in a protected cell
    out = out.set_column(0, "id", pa.array(ids)).set_column(
        out.schema.get_field_index("output_text"), "output_text", pa.array(texts)
    )
    binding = stage.results
    with pytest.raises(DecryptionError, match=r"output_text row t:0:1: inline PII token does not decrypt"):
        decrypt_table(out, keyring, binding=binding)
    kept = decrypt_table(out, keyring, binding=binding, on_missing_key="keep")
    assert kept.column("id")[0].as_py() == forged_token()
    assert kept.column("output_text").to_pylist() == ["mail a@b.example", texts[1], "mail e@f.example"]


def test_a_value_of_another_tenant_in_a_row_is_refused(keyring):
    stage = stage_for(keyring)
    out = stage.protect_results(results_rows(["acme", "globex"]), stage.stored_results_schema(RESULTS_SCHEMA))
    relabelled = out.set_column(out.schema.get_field_index("tenant"), "tenant", pa.array(["acme", "acme"]))
    with pytest.raises(DecryptionError, match=r"row t:0:1"):
        decrypt_table(relabelled, keyring, binding=stage.results)


# -- 8. bindings -----------------------------------------------------------------------------------


def test_tables_are_bound_by_their_delta_identity_not_their_uri(keyring, tmp_path):
    prod = DeltaSink("j", str(tmp_path / "prod" / "results"), str(tmp_path / "prod" / "dead_letter"), {})
    staging = DeltaSink("j", str(tmp_path / "staging" / "results"), str(tmp_path / "staging" / "dead_letter"), {})
    prod.open(), staging.open()
    (pr, pd), (sr, sd) = prod.bindings(), staging.bindings()
    assert pr.label.startswith("delta:") and len({pr.label, pd.label, sr.label, sd.label}) == 4
    assert sd.row_id_columns[-1] == "run_id" and "run_id" not in pr.row_id_columns
    rows = results_rows(["acme"])
    value = encrypt_column(pa.array(["secret"]), row_ids_from(rows), table=pr.label, column="output_text",
                           tenants="acme", keyring=keyring)  # fmt: skip
    moved = rows.set_column(rows.schema.get_field_index("output_text"), "output_text", pa.array(["x"]))
    moved = moved.drop_columns(["output_text"]).append_column("output_text", value)
    assert decrypt_table(moved, keyring, binding=pr).column("output_text").to_pylist() == ["secret"]
    with pytest.raises(DecryptionError):  # same last URI part ("results"), another table
        decrypt_table(moved, keyring, binding=sr)


def test_a_replayed_row_that_fails_again_has_its_own_row_id(keyring, tmp_path):
    sink = DeltaSink("j", str(tmp_path / "results"), str(tmp_path / "dead_letter"), {})
    sink.open()
    _, dead = sink.bindings()
    two = pa.table({"source_topic": ["t", "t"], "source_partition": [0, 0], "source_offset": [5, 5],
                    "run_id": ["first", "replay"]})  # fmt: skip
    ids = row_ids_from(two, dead.row_id_columns).to_pylist()
    assert ids[0] != ids[1]
    # A value of the first dead letter does not open at the second's row id.
    v = encrypt_column(pa.array(["raw"]), pa.array([ids[0]]), table=dead.label, column="raw", tenants="acme",
                       keyring=keyring)  # fmt: skip
    with pytest.raises(DecryptionError):
        decrypt_table(two.slice(1).append_column("raw", v).append_column("tenant", pa.array(["acme"])),
                      keyring, binding=dead)  # fmt: skip


def test_binding_of_a_legacy_table_is_its_last_uri_part(tmp_path):
    from deltalake import DeltaTable

    dt = DeltaTable.create(str(tmp_path / "old" / "results"), schema=RESULTS_SCHEMA)
    b = binding_of(dt.metadata(), pa.schema(dt.schema().to_arrow()), str(tmp_path / "old" / "results"))
    assert b.label == "results" and b.pii_columns == ("output_text", "output_json")


def test_read_results_uses_the_tables_own_binding(keyring, tmp_path):
    sink = DeltaSink("j", str(tmp_path / "results"), str(tmp_path / "dead_letter"), {})
    stage = stage_for(keyring)
    stored = stage.stored_results_schema(RESULTS_SCHEMA)
    sink.use_schemas(stored, stage.stored_dead_schema(DEAD_LETTER_SCHEMA))
    sink.open()
    stage.bind(*sink.bindings())
    from deltalake import write_deltalake

    write_deltalake(str(tmp_path / "results"), stage.protect_results(results_rows(["acme", "globex"]), stored), mode="append")
    got = read_results(str(tmp_path / "results"), keyring, backend="arrow")
    assert got.column("output_text").to_pylist() == ["out 0", "out 1"]


def test_usage_records_are_throttled_and_kept_when_the_keyring_cannot_be_written(keyring, monkeypatch):
    stage = stage_for(keyring)  # rotate_after_values 2^30: records every USAGE_RECORD_S at most
    stored = stage.stored_results_schema(RESULTS_SCHEMA)
    stage.protect_results(results_rows(["acme"] * 2), stored)
    assert stage.record_usage() == [] and stage.usage == {("acme", 1): 2}  # not due yet: nothing written
    keyring.reload()
    assert keyring.usage("acme") == {1: 0}

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(stage.keyring, "record_usage", read_only)
    with pytest.raises(PermissionError):
        stage.record_usage(force=True)
    assert stage.usage == {("acme", 1): 2}  # kept for the next try
    monkeypatch.undo()
    stage.record_usage(force=True)
    keyring.reload()
    assert keyring.usage("acme") == {1: 2} and stage.usage == {}


# -- 11. the master key reaches a job as a file it alone is told about -----------------------------


def test_master_key_from_a_file_named_by_the_variable(tmp_path, monkeypatch):
    import base64
    import os

    from schemas.errors import KeyringError

    path = tmp_path / "master-key"
    path.write_text(base64.b64encode(MASTER).decode() + "\n")
    os.chmod(path, 0o640)
    monkeypatch.delenv("TIDEGATE_MASTER_KEY", raising=False)
    monkeypatch.setenv("TIDEGATE_MASTER_KEY_FILE", str(path))
    assert LocalMasterKeyProvider().key_id == LocalMasterKeyProvider(key=MASTER).key_id
    os.chmod(path, 0o644)
    with pytest.raises(KeyringError, match=r"TIDEGATE_MASTER_KEY_FILE: .* can be read by every user"):
        LocalMasterKeyProvider()
    monkeypatch.setenv("TIDEGATE_MASTER_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(KeyringError, match=r"TIDEGATE_MASTER_KEY_FILE: cannot read .*absent: No such file"):
        LocalMasterKeyProvider()


def test_a_submitted_job_is_told_where_the_key_is_never_the_key(tmp_path, monkeypatch):
    from jobs.submit import auth_headers, job_runtime_env
    from schemas.errors import SpecError

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", MASTER.hex())  # on the submitting machine: stays there
    data = {
        "name": "j", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"}, "sink": {"results": "r", "dead_letter": "d"},
    }  # fmt: skip
    enc = parse_spec({**data, "encryption": {"tenant": "acme", "pii": "encrypt", "master_key_env": "ACME_KEY"}})
    env = job_runtime_env(tmp_path, enc, "/var/run/secrets/tidegate/master-key")
    hook = {"worker_process_setup_hook": "jobs.worker.setup_worker"}  # workers' log redaction, table transport
    stop = {"RAY_JOB_STOP_WAIT_TIME_S": "90"}  # run.shutdown_timeout_s (60) + 30 before Ray's SIGKILL (3 s by default)
    assert env == {"working_dir": str(tmp_path), **hook,
                   "env_vars": {"ACME_KEY_FILE": "/var/run/secrets/tidegate/master-key", **stop}}  # fmt: skip
    assert job_runtime_env(tmp_path, enc, None) == {"working_dir": str(tmp_path), **hook, "env_vars": stop}
    assert MASTER.hex() not in json.dumps(env)
    with pytest.raises(SpecError, match="--master-key-file: the spec encrypts nothing"):
        job_runtime_env(tmp_path, parse_spec(data), "/k")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    assert auth_headers() == {"Authorization": "Bearer tok-123"}
    # The keyring never travels with the job: its default folder is not staged, and a job that
    # encrypts is refused unless its keyring is outside the project (before: a copy on the cluster).
    from jobs.submit import EXCLUDE, REPO, check_cluster_keyring

    assert ".tidegate" in EXCLUDE
    for inside in (".tidegate/keyring.json", str(REPO / "keys" / "keyring.json")):
        with pytest.raises(SpecError, match="encryption.keyring .* absolute path outside it"):
            check_cluster_keyring(parse_spec({**data, "encryption": {"tenant": "acme", "pii": "encrypt", "keyring": inside}}))
    check_cluster_keyring(parse_spec({**data, "encryption": {"tenant": "acme", "pii": "encrypt",
                                                             "keyring": "/secrets/tidegate/keyring.json"}}))  # fmt: skip
    check_cluster_keyring(parse_spec(data))  # nothing encrypted: no keyring needed
    # Tables too: a relative path would be inside Ray's copy of the project (gone with it).
    from jobs.submit import check_cluster_tables

    with pytest.raises(SpecError, match="sink.results 'r': a submitted job runs in a copy"):
        check_cluster_tables(parse_spec(data))
    check_cluster_tables(parse_spec({**data, "sink": {"results": "s3://lake/r", "dead_letter": "/data/d"}}))
    monkeypatch.setenv("TIDEGATE_KEYRING", "/secrets/tidegate/keyring.json")  # this machine's, not the cluster's
    with pytest.raises(SpecError, match="needs its keyring's path in the spec"):
        check_cluster_keyring(parse_spec({**data, "encryption": {"tenant": "acme", "pii": "encrypt"}}))
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert auth_headers() is None


def test_the_runs_table_keeps_a_foreign_errors_type_not_its_message():
    """A failed run's `error` (a plain-text column): Tidegate's own errors by their first line,
    any other exception (a library's, user code's: its text may quote an event or an output) by
    its type only."""
    from jobs.pipeline import run_error
    from schemas.errors import SinkError

    assert run_error(SinkError("writing the results table failed 5 times\nmore")) == (
        "SinkError: writing the results table failed 5 times")
    assert run_error(KeyError("jane.doe@corp.example")) == "KeyError (its message is in the job's log)"


def test_only_text_result_columns_can_be_encrypted(keyring):
    """rule_results (a list of structs) or processed_at (a timestamp) in output_fields was accepted,
    and the job failed at its first commit (Arrow cannot cast them to text): the driver, and an
    online replica, refuse them when they build their stages."""
    from actors.writer import job_schemas
    from schemas.errors import SpecError

    for named, shown in ((["rule_results"], "rule_results (list<"), (["output_text", "processed_at"], "processed_at (timestamp")):
        stage = EncryptionStage(EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", output_fields=named),
                                "/lake/results", "/lake/dead_letter")  # fmt: skip
        with pytest.raises(SpecError, match="only text columns can be encrypted") as e:
            stage.check_output_fields(job_schemas(stage)[0])
        assert shown in str(e.value)
    ok = EncryptionStage(EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", output_fields=["model"]),
                         "/lake/results", "/lake/dead_letter")  # fmt: skip
    ok.check_output_fields(job_schemas(ok)[0])


def test_naming_one_of_the_two_output_columns_encrypts_both(keyring):
    """output_text and output_json hold the same output (its text, its parsed JSON): naming one
    encrypts both, with the named one's mode, in the results and in the dead letters."""
    for named in (["output_json"], ["output_text"], ["output_text", "output_json"]):
        stage = EncryptionStage(EncryptionSpec(keyring=str(keyring.path), tenant_field="customer", output_fields=named),
                                "/lake/results", "/lake/dead_letter")  # fmt: skip
        stored = stage.stored_results_schema(RESULTS_SCHEMA)
        assert stored.field("output_text").type == stored.field("output_json").type == pa.binary(), named
        assert stage.stored_dead_schema(DEAD_LETTER_SCHEMA).field("output_text").type == pa.binary(), named
        rows = results_rows(["acme", "globex"], texts=[f'{{"mail": "{SECRET}"}}'] * 2)
        rows = rows.set_column(rows.schema.get_field_index("output_json"), "output_json",
                               pa.array([f'{{"mail": "{SECRET}"}}', None]))  # fmt: skip
        out = stage.protect_results(rows, stored)
        assert SECRET.encode() not in b"".join(v for c in ("output_text", "output_json")
                                               for v in out.column(c).to_pylist() if v)  # fmt: skip
        assert out.column("output_json")[1].as_py() is None  # no output JSON: nothing to encrypt
    siv = EncryptionSpec(keyring=str(keyring.path), tenant_field="customer",
                         output_fields=[{"name": "output_json", "deterministic": True}])  # fmt: skip
    assert EncryptionStage(siv, "/lake/results", "/lake/dead_letter").output_fields["output_text"].deterministic


def test_a_table_storing_the_twin_in_clear_keeps_it_so_with_a_warning(keyring, tmp_path, caplog):
    """A results table created when output_fields encrypted only the column it named stores the
    other as text: the job still starts and writes into it (its schema is fixed), says so, and a
    new table encrypts both."""
    import logging

    from actors.writer import CommitWriter
    from tests.conftest import results_table
    from tests.test_delta_sink import TP0, dead

    def spec(results: str) -> dict:
        return parse_spec({
            "name": "twins", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
            "model": {"path": "m"}, "sink": {"results": results, "dead_letter": str(tmp_path / "dl" / results[-3:])},
            "encryption": {"keyring": str(keyring.path), "tenant": "acme", "output_fields": ["output_json"]},
        })  # fmt: skip

    from deltalake import DeltaTable

    old = str(tmp_path / "old")  # as an earlier Tidegate created it: output_json binary, output_text text
    before = EncryptionStage(spec(old).encryption, old, str(tmp_path / "dl" / "old"))
    before.output_fields.pop("output_text")
    DeltaTable.create(old, schema=before.stored_results_schema(RESULTS_SCHEMA))
    # A new results table beside the old dead-letter table, whose output_text is text: that one
    # stays so (a warning), the new results table encrypts both.
    mixed = EncryptionStage(spec(old).encryption, old, str(tmp_path / "dl" / "old"))
    mixed.keep_twin_as_stored(None, pa.schema([pa.field("output_text", pa.string())]))
    assert mixed.stored_dead_schema(DEAD_LETTER_SCHEMA).field("output_text").type == pa.string()
    assert mixed.stored_results_schema(RESULTS_SCHEMA).field("output_text").type == pa.binary()
    for uri, clear in ((old, True), (str(tmp_path / "new"), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="crypto.stage"):
            writer = CommitWriter(spec(uri))
            writer.open()
            writer.resume([TP0])
            rows = results_table([0, 1], output_text=[f"to {SECRET}"] * 2, tenant=["acme"] * 2)
            writer.write_tables(rows, dead([]).slice(0, 0), {TP0: 1}, None)
        stored = pa.schema(DeltaTable(uri).schema().to_arrow())
        assert pa.types.is_binary(stored.field("output_json").type)
        assert pa.types.is_binary(stored.field("output_text").type) is not clear, uri
        assert ("stores output_text in clear text" in caplog.text) is clear, caplog.text
        assert SECRET not in caplog.text
        text = DeltaTable(uri).to_pyarrow_table(columns=["output_text"]).column(0).to_pylist()
        assert all((SECRET in str(v)) is clear for v in text), uri  # the old table: as before (pii off here)
        assert read_results(uri, keyring, backend="arrow").column("output_text").to_pylist() == [f"to {SECRET}"] * 2


@pytest.mark.parametrize("partition_by", [[], ["processed_date"]])
def test_a_commit_writer_ray_restarted_opens_its_tables_again_before_writing(keyring, tmp_path, partition_by):
    """Ray re-runs only the commit writer's constructor; the job's recovery then calls resume(),
    never open(). The restarted writer must open the tables itself: unopened, it bound its values
    to the wrong tables (rows nobody could decrypt), lost sink.partition_by and wrote Parquet
    statistics on every column."""
    from deltalake import DeltaTable

    from actors.writer import CommitWriter
    from tests.conftest import results_table
    from tests.test_delta_sink import TP0, dead

    res, dl = str(tmp_path / "res"), str(tmp_path / "dl")
    spec = parse_spec({
        "name": "restarts", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"}, "sink": {"results": res, "dead_letter": dl, "partition_by": partition_by},
        "encryption": {"keyring": str(keyring.path), "tenant": "acme", "output_fields": ["output_text"]},
    })  # fmt: skip
    first = CommitWriter(spec)
    first.open()
    first.resume([TP0])
    first.write_tables(results_table([0, 1], output_text=[f"to {SECRET}"] * 2, tenant=["acme"] * 2), dead([]), {TP0: 1}, None)
    restarted = CommitWriter(spec)  # what Ray does after the process died; the job calls resume()
    positions, _ = restarted.resume([TP0])
    assert positions == {TP0: 1}
    restarted.write_tables(results_table([2, 3], output_text=[f"to {SECRET}"] * 2, tenant=["acme"] * 2), dead([]),
                           {TP0: 3}, None)  # fmt: skip
    back = read_results(res, keyring, backend="arrow")
    assert sorted(back.column("source_offset").to_pylist()) == [0, 1, 2, 3]
    assert back.column("output_text").to_pylist() == [f"to {SECRET}"] * 4
    table = DeltaTable(res)
    assert table.metadata().partition_columns == partition_by
    stats = table.get_add_actions(flatten=True).column_names
    assert "min.source_offset" in stats and not [c for c in stats if c.startswith(("min.id", "max.id"))], stats


def test_switching_encryption_on_for_a_plain_tables_column_fails_at_start_naming_it(keyring, tmp_path):
    """docs/encryption.md: a results table whose output column is text cannot take the job's
    encrypted (binary) values: the sink refuses before any work, naming the column, and the table
    is left as it was."""
    from deltalake import DeltaTable

    from schemas.errors import SinkSchemaError

    plain = DeltaSink("j", str(tmp_path / "results"), str(tmp_path / "dead_letter"), {})
    plain.open()  # a job without encryption created the tables
    version = DeltaTable(str(tmp_path / "results")).version()
    stage = EncryptionStage(EncryptionSpec(keyring=str(keyring.path), tenant="acme", output_fields=["output_text"]),
                            str(tmp_path / "results"), str(tmp_path / "dead_letter"))  # fmt: skip
    sink = DeltaSink("j", str(tmp_path / "results"), str(tmp_path / "dead_letter"), {})
    stage.keep_twin_as_stored(*sink.stored_table_schemas())  # output_json stays text there, output_text cannot
    sink.use_schemas(stage.stored_results_schema(RESULTS_SCHEMA), stage.stored_dead_schema(DEAD_LETTER_SCHEMA))
    with pytest.raises(SinkSchemaError, match="column 'output_text' is string, expected binary"):
        sink.open()
    assert DeltaTable(str(tmp_path / "results")).version() == version
