"""Pure-logic units: spec validation, event decoding and rendering, the commit ledger."""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pytest

from compute.prompts import PromptRenderer
from connectors.offsets import CommitLedger
from schemas.errors import SpecError
from schemas.records import DEAD_LETTER_SCHEMA, REQUEST_SCHEMA, SOURCE_SCHEMA
from schemas.spec import PromptSpec, parse_spec

GOOD = {
    "name": "j1",
    "source": {"kafka": {"bootstrap_servers": "a:1,b:2", "topic": "t"}},
    "prompt": {"template": "Q: {{ q }}", "id_field": "id"},
    "model": {"path": "/m"},
    "sink": {"results": "/r", "dead_letter": "/d"},
}


def _with(path: str, value):
    spec = json.loads(json.dumps(GOOD))
    node = spec
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return spec


def test_spec_defaults_and_parsing():
    spec = parse_spec(GOOD)
    assert spec.source.kafka.bootstrap_servers == ["a:1", "b:2"]
    assert spec.source.kafka.group(spec.name) == "tidegate-j1"
    assert spec.pool.actors == 1 and spec.pool.batch_size == 256
    assert spec.stages.actors == 1 and spec.stages.num_cpus == 0  # no logical CPU taken from the engines
    assert spec.sampling == {"max_tokens": 64, "temperature": 0.0}


@pytest.mark.parametrize(
    "path,value,expect",
    [
        ("pool.actors", 0, "pool.actors: Input should be greater than or equal to 1"),
        ("pool.num_cpus", -1, "pool.num_cpus"),
        ("prompt.template", "{{ q ", "prompt.template: Value error, not a valid Jinja2 template"),
        ("sampling", {"max_tokens": 8, "temprature": 0}, "sampling: Value error, unknown SamplingParams field(s): temprature"),
        ("source.kafka.topic", "", "source.kafka.topic"),
        ("sink.dead_letter", "/r", "sink.results and sink.dead_letter must be different tables"),
        ("name", "bad name!", "name: Value error"),
        ("pool.gpus", 1, "pool.gpus: Extra inputs are not permitted"),
        ("stages.actors", 0, "stages.actors: Input should be greater than or equal to 1"),
        ("stages.num_cpus", -0.5, "stages.num_cpus"),
        ("pool.backend", "remote", "pool.backend: Input should be 'engines' or 'serve'"),
        ("pool.serve_app", "online", "pool: Value error, serve_app is only read with backend: serve"),
        ("pool", {"backend": "serve", "max_actors": 2, "tensor_parallel_size": 2, "num_gpus": 2},
         "pool: Value error, max_actors, tensor_parallel_size: size the engines a job starts; with backend: serve"),
        # Accepted and then ignored or rounded before stop 43:
        ("model.kv_cache_gib", 0.25, "model.kv_cache_gib: Value error, must be a whole number of GiB, not 0.25"),
        ("sampling", {"logprobs": 5}, "sampling: Value error, logprobs: computed and then dropped"),
        ("sampling", {"prompt_logprobs": 1}, "sampling: Value error, prompt_logprobs: computed and then dropped"),
        ("sampling", {"detokenize": False}, "sampling: Value error, detokenize: false would make every output_text empty"),
        # vLLM's own ranges, checked when the spec is read, not when the engine starts
        ("sampling", {"temperature": 5}, "sampling: Value error, temperature: must be [0, 2], not 5"),
        ("sampling", {"top_p": 0}, "sampling: Value error, top_p: must be (0, 1], not 0"),
        ("sampling", {"max_tokens": 0}, "sampling: Value error, max_tokens: must be at least 1, not 0"),
        ("sampling", {"top_k": 2.5}, "sampling: Value error, top_k: must be an integer"),
        ("sampling", {"max_tokens": 8, "min_tokens": 9}, "sampling: Value error, min_tokens: must be at most max_tokens (8)"),
        ("sampling", {"min_tokens": 100}, "sampling: Value error, min_tokens: must be at most max_tokens (64)"),  # the default
        ("model.kv_cache_gib", float("inf"), "model.kv_cache_gib: Value error, must be a whole number of GiB"),
    ],
)
def test_bad_spec_names_the_field(path, value, expect):
    with pytest.raises(SpecError) as e:
        parse_spec(_with(path, value), "spec.yaml")
    assert expect in str(e.value)
    assert str(e.value).startswith("invalid job spec spec.yaml:")


def test_missing_sections_are_all_reported():
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "x"})
    for field in ("source:", "prompt:", "model:", "sink:"):
        assert field in str(e.value)


def _source(values: list[bytes | None], partition: int = 0) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            "topic": ["t"] * n,
            "partition": [partition] * n,
            "offset": list(range(n)),
            "key": [None] * n,
            "value": values,
            "timestamp_ms": [0] * n,
            "received_ns": [0] * n,
            "source_change": [None] * n,
        },
        schema=SOURCE_SCHEMA,
    )


BAD_CASES = [
    (b'{"id": "a", "q": ', "decode", "invalid_json", "not valid JSON: Expecting value at line 1 column 18"),
    (b'{"id": "a", "q": "\xff"}', "decode", "invalid_utf8", "an invalid byte at position 18"),
    (b"[1, 2]", "decode", "not_an_object", "JSON value is an array, expected an object"),
    (b'"just a string"', "decode", "not_an_object", "is a string"),
    (b'{"q": "x"}', "decode", "missing_id", "id field 'id' is missing"),
    (b'{"id": "", "q": "x"}', "decode", "missing_id", "id field 'id' is empty"),
    (b'{"id": null, "q": "x"}', "decode", "missing_id", "is missing"),
    (b'{"id": {"a": 1}, "q": "x"}', "decode", "invalid_id", "id field 'id' is an object"),
    (b'{"id": "a"}', "prompt", "missing_variable", "'q' is undefined"),
    (b'{"id": "a", "q": "' + b"x" * 200 + b'"}', "decode", "oversized_message", "over source.kafka.max_message_bytes=128"),
    (None, "decode", "empty_message", "tombstone"),
]


@pytest.mark.parametrize("value,stage,error_class,message", BAD_CASES)
def test_each_bad_event_is_dead_lettered_with_its_reason(value, stage, error_class, message):
    r = PromptRenderer(PromptSpec(template="Q: {{ q }}", id_field="id"), max_message_bytes=128, run_id="r1")
    out = r.render(_source([b'{"id": 1, "q": "fine"}', value, b'{"id": "z", "q": "ok too"}']))
    assert out.requests.schema == REQUEST_SCHEMA and out.dead.schema == DEAD_LETTER_SCHEMA
    assert out.requests.column("id").to_pylist() == ["1", "z"]
    assert out.requests.column("prompt").to_pylist() == ["Q: fine", "Q: ok too"]
    (dead,) = out.dead.to_pylist()
    assert (dead["stage"], dead["error_class"]) == (stage, error_class)
    assert message in dead["error"]
    assert dead["raw"] == value and dead["source_offset"] == 1 and dead["run_id"] == "r1"


def test_event_data_is_never_compiled_as_a_template():
    r = PromptRenderer(PromptSpec(template="Q: {{ q }}", id_field="id"), max_message_bytes=1024, run_id="r")
    out = r.render(_source([json.dumps({"id": "a", "q": "{{ 7*7 }} {% for x in y %}"}).encode()]))
    assert out.requests.column("prompt").to_pylist() == ["Q: {{ 7*7 }} {% for x in y %}"]


def test_sandbox_blocks_unsafe_templates():
    r = PromptRenderer(
        PromptSpec(template="{{ q.__class__.__mro__ }}", id_field="id"), max_message_bytes=1024, run_id="r"
    )
    out = r.render(_source([b'{"id": "a", "q": "x"}']))
    assert out.requests.num_rows == 0
    assert out.dead.column("error_class").to_pylist() == ["render_error"]


def test_skip_drops_rows_already_dead_lettered():
    r = PromptRenderer(PromptSpec(template="{{ q }}", id_field="id"), max_message_bytes=1024, run_id="r")
    src = _source([b'{"id": "a", "q": "x"}', b"bad", b'{"id": "c", "q": "y"}'])
    out = r.render(src, skip=lambda t, p, o: o == 1)
    assert out.requests.num_rows == 2 and out.dead.num_rows == 0


def test_empty_tables_are_built_once_per_schema_and_rows_keep_their_columns():
    from schemas.records import RESULTS_SCHEMA, empty_table, with_columns_of

    a = empty_table(DEAD_LETTER_SCHEMA)
    assert a.num_rows == 0 and a.schema.equals(DEAD_LETTER_SCHEMA, check_metadata=True)
    assert empty_table(DEAD_LETTER_SCHEMA) is a and empty_table(pa.schema(list(DEAD_LETTER_SCHEMA))) is a
    assert empty_table(RESULTS_SCHEMA).schema.equals(RESULTS_SCHEMA) and empty_table(RESULTS_SCHEMA) is not a
    marked = DEAD_LETTER_SCHEMA.with_metadata({"x": "1"})  # another schema by its metadata
    assert empty_table(marked).schema.metadata == {b"x": b"1"}
    rows = pa.table({"error": ["e"], "id": ["r1"]})
    full = with_columns_of(rows, DEAD_LETTER_SCHEMA)
    assert full.schema.equals(DEAD_LETTER_SCHEMA) and full.select(["id", "error", "stage"]).to_pylist() == [
        {"id": "r1", "error": "e", "stage": None}]
    assert with_columns_of(full, DEAD_LETTER_SCHEMA) is full  # already in shape: as it is


def test_ledger_releases_only_contiguous_prefix():
    ledger = CommitLedger()
    a = ledger.open({("t", 0): (0, 9), ("t", 1): (0, 4)})
    b = ledger.open({("t", 0): (10, 19)})
    c = ledger.open({("t", 1): (5, 9)})
    ledger.complete(c, "C")
    ledger.complete(b, "B")
    assert not ledger.pop_committable()  # a is still in flight
    assert ledger.committable_count() == 0
    assert ledger.done_count == 2  # waiting behind a: in memory all the same (the job's backpressure)
    ledger.complete(a, "A")
    assert ledger.committable_count() == 3
    first = ledger.pop_committable(max_batches=2)  # a commit's cap: the rest goes in the next one
    assert first.payloads == ["A", "B"] and first.positions == {("t", 0): 19, ("t", 1): 4}
    assert ledger.done_count == 1
    group = ledger.pop_committable()
    assert group.payloads == ["C"]
    assert group.positions == {("t", 1): 9}
    assert ledger.open_count == 0 and ledger.done_count == 0


def test_ledger_random_completion_order_never_skips_work():
    rng = random.Random(3)
    ledger = CommitLedger()
    next_off = {0: 0, 1: 0}
    batches = []
    for _ in range(200):
        spans = {}
        for p in rng.sample([0, 1], rng.randint(1, 2)):
            n = rng.randint(1, 5)
            spans[("t", p)] = (next_off[p], next_off[p] + n - 1)
            next_off[p] += n
        batches.append((ledger.open(spans), spans))
    order = list(range(len(batches)))
    rng.shuffle(order)
    committed = {0: -1, 1: -1}
    done = set()
    for i in order:
        ledger.complete(batches[i][0], i)
        done.add(i)
        group = ledger.pop_committable()
        for (_, p), last in group.positions.items():
            committed[p] = last
        # Every offset at or below a committed position belongs to a completed batch.
        for seq, spans in batches:
            for (_, p), (first, _) in spans.items():
                if first <= committed[p]:
                    assert seq in done
    assert committed == {0: next_off[0] - 1, 1: next_off[1] - 1}


def test_ledger_rejects_overlapping_or_repeated_work():
    ledger = CommitLedger()
    s = ledger.open({("t", 0): (0, 9)})
    with pytest.raises(ValueError):
        ledger.open({("t", 0): (5, 12)})
    ledger.complete(s, 1)
    with pytest.raises(ValueError):
        ledger.complete(s, 1)
    ledger.reset()
    ledger.open({("t", 0): (0, 3)})  # after a reset the partition is read again from its position


# -- Kafka TLS/SASL and secrets --------------------------------------------------------------------


def secure_spec(security: dict, **kafka) -> dict:
    return {
        "name": "s",
        "source": {"kafka": {"topic": "t", "security": security, **kafka}},
        "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m", "engine_args": {"hf_token": "hf-SECRET"}},
        "sink": {"results": "r", "dead_letter": "d", "storage_options": {"AWS_SECRET_ACCESS_KEY": "aws-SECRET"}},
    }


def test_kafka_security_settings_reach_kafka_python(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    sec = {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "svc",
           "sasl_password_env": "TG_KAFKA_PW", "ssl_cafile": str(ca), "ssl_password_env": "TG_KEY_PW"}  # fmt: skip
    spec = parse_spec(secure_spec(sec))
    cfg = spec.source.kafka.security.client_config({"TG_KAFKA_PW": "pw-SECRET", "TG_KEY_PW": "key-SECRET"})
    assert cfg == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw-SECRET",
        "ssl_cafile": str(ca),
        "ssl_check_hostname": True,
        "ssl_password": "key-SECRET",
    }
    import kafka

    # Every key is a real KafkaConsumer setting (a typo would be silently ignored by the spec).
    assert set(cfg) <= set(kafka.KafkaConsumer.DEFAULT_CONFIG)
    with pytest.raises(SpecError, match=r"security.sasl_password_env: environment variable 'TG_KAFKA_PW' is not set"):
        spec.source.kafka.security.client_config({})


@pytest.mark.parametrize(
    ("security", "kafka", "message"),
    [
        ({"protocol": "SASL_SSL"}, {}, "protocol SASL_SSL needs sasl_mechanism, sasl_username and sasl_password_env"),
        ({"sasl_username": "u"}, {}, "sasl_* settings need protocol SASL_PLAINTEXT or SASL_SSL"),
        ({}, {"consumer_config": {"sasl_plain_password": "pw"}}, "sasl_plain_password: secrets do not go in a spec"),
        # Security is source.kafka.security's alone: consumer_config cannot downgrade it.
        ({"protocol": "SSL"}, {"consumer_config": {"security_protocol": "PLAINTEXT"}},
         "security_protocol: TLS and SASL settings go in source.kafka.security"),
        ({"protocol": "SSL"}, {"consumer_config": {"ssl_check_hostname": False, "ssl_context": None}},
         "ssl_check_hostname, ssl_context: TLS and SASL settings go in source.kafka.security"),
        ({}, {"consumer_config": {"sasl_mechanism": "PLAIN"}}, "sasl_mechanism: TLS and SASL settings go in"),
        ({}, {"consumer_config": {"group_id": "g", "enable_auto_commit": True}},
         "enable_auto_commit, group_id: set by the job (enable_auto_commit from the job: positions are committed"),
        ({}, {"consumer_config": {"fetch_max_bytes": 10}}, "fetch_max_bytes: set by the job (fetch_max_bytes from "
         "source.kafka.max_message_bytes)"),  # before: silently replaced
        # TLS settings with a protocol that would drop them (before: a plaintext connection, silently)
        ({"ssl_cafile": "ca.pem"}, {}, "ssl_cafile need protocol SSL or SASL_SSL, not PLAINTEXT"),
        ({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password_env": "E",
          "ssl_check_hostname": False}, {}, "ssl_check_hostname need protocol SSL or SASL_SSL, not SASL_PLAINTEXT"),
    ],
)
def test_kafka_security_errors(security, kafka, message):
    with pytest.raises(SpecError) as e:
        parse_spec(secure_spec(security, **kafka))
    assert message in str(e.value) and "pw" not in str(e.value).replace("password", "")


def test_printed_spec_masks_secrets():
    spec = parse_spec(secure_spec({}, consumer_config={"client_id": "c", "api_key": "k-SECRET"}))
    text = json.dumps(spec.redacted())
    assert "-SECRET" not in text
    shown = spec.redacted()
    assert shown["sink"]["storage_options"] == {"AWS_SECRET_ACCESS_KEY": "***"}
    assert shown["model"]["engine_args"] == {"hf_token": "***"}
    assert shown["source"]["kafka"]["consumer_config"] == {"client_id": "c", "api_key": "***"}
    assert shown["sampling"]["max_tokens"] == 64  # not a secret, not masked


@pytest.mark.parametrize("line", [
    "    AWS_SECRET_ACCESS_KEY: wJalr-SECRET/K7MDENG: x",  # a colon in the value: mapping values not allowed
    '    AWS_SECRET_ACCESS_KEY: "wJalr-SECRET/K7MDENG',  # an unclosed quote
    '    AWS_SECRET_ACCESS_KEY: "wJalr-SECRET\\q"',  # an escape YAML does not know
    "    AWS_SECRET_ACCESS_KEY: !wJalr-SECRET x",  # a tag
])  # fmt: skip
def test_a_spec_that_is_no_yaml_is_refused_by_line_and_column_without_its_text(tmp_path, line):
    """PyYAML's message quotes the lines around the error: a spec line can hold a secret."""
    from schemas.spec import load_spec

    path = tmp_path / "job.yaml"
    path.write_text("name: j\nsink:\n  storage_options:\n" + line + "\n  results: /r\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+: ") as e:
        load_spec(path)
    assert "SECRET" not in str(e.value) and "wJalr" not in str(e.value), str(e.value)


@pytest.mark.parametrize(("content", "message"), [
    (b"name: j\nsink:\n  results: /r\xff\n", "not UTF-8 text (an invalid byte at position 27)"),
    (b"name: j\nwhen: 2024-02-30\n", "a value YAML cannot read (ValueError"),
])  # fmt: skip
def test_a_spec_that_is_no_utf8_or_holds_an_impossible_date_is_a_spec_error(tmp_path, content, message):
    """Before: a UnicodeDecodeError or PyYAML's ValueError, a traceback and exit 1 (not 2)."""
    from schemas.spec import load_spec

    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(path)


def test_check_command_prints_the_spec_masked_and_fails_on_a_bad_one(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from jobs.cli import app

    good = tmp_path / "good.yaml"
    data = secure_spec({}, consumer_config={"api_key": "k-SECRET"})
    data["sink"]["results"] = "abfss://user:pw-SECRET@lake.dfs.core.windows.net/results"  # credentials in a URI
    good.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["check", str(good)])
    assert out.exit_code == 0, out.output
    assert "-SECRET" not in out.output and "api_key: '***'" in out.output
    assert "abfss://***@lake.dfs.core.windows.net/results" in out.output
    assert "# rules: refusal (flag), pii_leakage (flag)" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**secure_spec({}), "output": {"schema": "nowhere.mod:Model"}}))
    out = CliRunner().invoke(app, ["check", str(bad)])
    assert out.exit_code == 2, out.output
    assert "output.schema: run would refuse to import nowhere.mod:Model: module 'nowhere' not found" in out.output


def test_model_revision_reports_its_progress(tmp_path):
    from compute import lineage

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w" * (lineage.CHUNK_BYTES + 10))
    seen: list[tuple[int, int]] = []
    plain = lineage.model_revision(tmp_path)
    lineage._FILE_DIGESTS.clear()
    assert lineage.model_revision(tmp_path, progress=lambda d, t: seen.append((d, t))) == plain
    total = lineage.CHUNK_BYTES + 12
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 4  # config, then two chunks
    seen.clear()
    lineage.model_revision(tmp_path, progress=lambda d, t: seen.append((d, t)))  # cached digests count at once
    assert seen[-1] == (total, total)


def test_cpu_dtype_advice_warns_only_for_bf16_on_a_cpu_without_bf16(tmp_path):
    import json

    from compute.engine import cpu_dtype_advice
    from schemas.spec import ModelSpec

    no_bf16 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    with_bf16 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    auto = ModelSpec(path=str(tmp_path))
    advice = cpu_dtype_advice(auto, no_bf16)
    assert advice is not None and "auto picks the model's bfloat16" in advice and "model.dtype: float32" in advice
    assert cpu_dtype_advice(auto, with_bf16) is None
    assert "model.dtype is bf16" in cpu_dtype_advice(ModelSpec(path=str(tmp_path), dtype="bf16"), no_bf16)
    assert cpu_dtype_advice(ModelSpec(path=str(tmp_path), dtype="float32"), no_bf16) is None
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))  # newer configs name it `dtype`
    assert cpu_dtype_advice(auto, no_bf16) is None
    assert cpu_dtype_advice(ModelSpec(path=str(tmp_path / "missing")), no_bf16) is None  # no config: no advice


def test_sampling_keys_not_given_keep_tidegates_defaults():
    """README: an absent sampling section is max_tokens 64, temperature 0; a section given keeps
    max_tokens 64 unless it sets it (replaced whole, vLLM's 16 cut answers short), and its other
    fields are vLLM's (a top_p without a temperature samples at 1.0, as it always did)."""
    from schemas.spec import parse_spec

    base = {"name": "s", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
            "model": {"path": "m"}, "sink": {"results": "/tmp/r", "dead_letter": "/tmp/d"}}  # fmt: skip
    assert parse_spec(base).sampling == {"max_tokens": 64, "temperature": 0.0}
    spec = parse_spec({**base, "sampling": {"top_p": 0.9}})
    assert spec.sampling == {"max_tokens": 64, "top_p": 0.9}
    assert parse_spec({**base, "sampling": {"max_tokens": 8, "temperature": 0.7}}).sampling == {"max_tokens": 8, "temperature": 0.7}
    assert parse_spec(spec.model_dump()).sampling == spec.sampling  # a dumped spec reads back the same


def test_a_log_format_other_than_text_or_json_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    """Before, `tidegate run --log-format jsn` (or TIDEGATE_LOG_FORMAT=JSON) ran with text logs,
    silently: a log pipeline expecting JSON got none."""
    from jobs.run import main

    missing = str(tmp_path / "never-read.yaml")  # refused before the spec is even read
    monkeypatch.delenv("TIDEGATE_LOG_FORMAT", raising=False)
    assert main(missing, log_format="jsn") == 2
    assert "error: --log-format must be text or json, not 'jsn'" in capsys.readouterr().err
    monkeypatch.setenv("TIDEGATE_LOG_FORMAT", "JSON")
    assert main(missing) == 2
    assert "error: TIDEGATE_LOG_FORMAT must be text or json, not 'JSON'" in capsys.readouterr().err


def test_a_local_table_path_that_delta_rs_would_percent_encode_is_refused_by_the_spec(tmp_path):
    """polars, which every reader here uses, cannot read a Delta table whose local URI delta-rs
    percent-encodes (a space, a non-ASCII letter, '#', ...): measured, the files are looked for
    under "my%20lake"; some characters ('[', '|', ...) make delta-rs panic. Refused up front, by
    field; object store URIs are left to their store."""
    import polars as pl
    import pyarrow as pa
    from deltalake import write_deltalake

    from schemas.errors import SpecError
    from schemas.spec import parse_spec

    write_deltalake(str(tmp_path / "my lake"), pa.table({"a": [1]}))
    with pytest.raises(FileNotFoundError):  # why: if polars learns to read it, this check can go
        pl.read_delta(str(tmp_path / "my lake"))
    base = {"name": "u", "source": {"kafka": {"topic": "t"}}, "model": {"path": "/m"},
            "prompt": {"template": "{{ q }}", "id_field": "id"}}  # fmt: skip
    for field, path, shown in (("results", "lake/my results", "space"), ("dead_letter", "lake/dé", "'é'"),
                               ("results", "file:///lake/a#b", "'#'")):  # fmt: skip
        sink = {"results": "lake/r", "dead_letter": "lake/d", field: path}
        with pytest.raises(SpecError, match=rf"sink\.{field}: .*a local table path cannot hold {shown}"):
            parse_spec({**base, "sink": sink})
    with pytest.raises(SpecError, match=r"source\.delta\.uri: .*cannot hold space"):
        parse_spec({**base, "source": {"delta": {"uri": "lake/in put"}}, "sink": {"results": "r", "dead_letter": "d"}})
    parse_spec({**base, "sink": {"results": "s3://bucket/my results", "dead_letter": "lake/d-1_x.y"}})
    from schemas.spec import SinkSpec

    SinkSpec(kind="jsonl", results="out dir/results.jsonl", dead_letter="out dir/dead.jsonl")  # a plugin's own
