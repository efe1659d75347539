"""Fuzzed events: random bytes, deep and huge JSON, unicode edge cases (lone surrogate escapes, odd
scripts), huge numbers, NaN, duplicate keys, template-breaking values, ids of every type. The job
never crashes, every record lands in exactly one table, and no message quotes an event's values
(each value carries a canary that must never show up in an error or a log line)."""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from compute.prompts import PromptRenderer
from schemas.records import SOURCE_SCHEMA
from schemas.spec import PromptSpec
from tests.conftest import make_spec, send, write_spec

CANARY = "CANARY-7f3a"

# JSON text pieces, written by hand so that what json.dumps never makes can appear: duplicate keys,
# NaN / Infinity, lone surrogate escapes, 5,000-digit integers, nesting past the recursion limit.
scalars = st.one_of(
    st.just("null"), st.just("true"), st.just("false"), st.just("NaN"), st.just("-Infinity"),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr).filter(lambda s: "e" not in s or "." in s),
    st.just("1" * 5000),  # over Python's int digit limit
    st.text(max_size=40).map(lambda s: json.dumps(CANARY + s)),
    st.text(max_size=40).map(lambda s: json.dumps(CANARY + s, ensure_ascii=False)),
    st.sampled_from(['"\\ud800"', '"\\udfff tail"', '"\\ud83d\\ude00"', '"\\u0000"', '"{{ 7 * 7 }}"', '"{% raw %}"']),
)  # fmt: skip


def _obj(children):
    keys = st.one_of(st.sampled_from(["user", "question", "id", "self", "", "a b", "__class__"]), st.text(max_size=8))
    return st.lists(st.tuples(keys.map(json.dumps), children), max_size=5).map(
        lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
    )


values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
                                                   _obj(c)), max_leaves=20)  # fmt: skip
ids = st.one_of(values, st.sampled_from(['"e1"', "17", "1.5", "true", "[1]", '{"x": 1}', '""', '"  "', "null"]))


@st.composite
def events(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=64))  # not UTF-8, or not JSON
    if kind == 1:
        depth = draw(st.sampled_from([10, 900, 5000]))
        return ("[" * depth + "]" * depth).encode()  # deep nesting
    if kind == 2:
        return ('{"id": "d", "user": ' + json.dumps(CANARY * 300) + ', "question": "q"}').encode()  # big values
    fields = [f'"id": {draw(ids)}', f'"user": {draw(values)}', f'"question": {draw(values)}']
    if draw(st.booleans()):
        fields.append(f'"id": {draw(ids)}')  # a duplicate key: the last one wins
    if draw(st.booleans()):
        fields.append(f'"extra": {draw(values)}')
    draw(st.randoms()).shuffle(fields)
    return ("{" + ", ".join(fields) + "}").encode("utf-8", "surrogatepass")


def source_table(raw: list[bytes]) -> pa.Table:
    n = len(raw)
    return pa.table(
        {"topic": ["t"] * n, "partition": [0] * n, "offset": list(range(n)), "key": [None] * n, "value": raw,
         "timestamp_ms": [None] * n, "received_ns": [0] * n, "source_change": [None] * n},
        schema=SOURCE_SCHEMA,
    )  # fmt: skip


RENDERER = PromptRenderer(PromptSpec(template="Answer for {{ user }}: {{ question }}", id_field="id"), 1 << 20, "r")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(events(), min_size=1, max_size=12))
def test_rendering_accounts_for_every_record_and_quotes_no_value(raw):
    out = RENDERER.render(source_table(raw))
    seen = out.requests.column("source_offset").to_pylist() + out.dead.column("source_offset").to_pylist()
    assert sorted(seen) == list(range(len(raw)))  # every record in exactly one output
    for msg in out.dead.column("error").to_pylist():
        assert CANARY not in msg, msg
    # What goes on is valid text: it can be tokenized, stored and encrypted.
    for prompt in out.requests.column("prompt").to_pylist():
        prompt.encode("utf-8")
    assert set(out.dead.column("error_class").to_pylist()) <= {
        "invalid_utf8", "invalid_json", "invalid_unicode", "not_an_object", "missing_id", "invalid_id",
        "missing_variable", "render_error", "oversized_message", "empty_message",
    }  # fmt: skip


@pytest.mark.slow
@settings(max_examples=1, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))  # one fixed draw, one real job: no shrinking reruns
@given(fuzzed=st.lists(events(), min_size=400, max_size=400))
def test_a_job_over_fuzzed_events_never_crashes_and_writes_each_once(
    tmp_path, broker, topic, tiny_model, job_processes, fuzzed
):
    raw = fuzzed + [json.dumps({"id": f"v{i}", "user": "u", "question": "q"}).encode() for i in range(40)]
    send(broker, topic, ((None, v) for v in raw))
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"source.kafka.max_message_bytes": 1 << 20})
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner", extra_args=("--instant-engine",))
    assert job.wait(300) == 0, job.log()[-4000:]
    res, dead = pl.read_delta(spec["sink"]["results"]), pl.read_delta(spec["sink"]["dead_letter"])
    positions = list(zip(res["source_partition"], res["source_offset"])) + list(
        zip(dead["source_partition"], dead["source_offset"])
    )
    assert len(positions) == len(set(positions)) == len(raw)
    assert not [m for m in dead["error"].to_list() if CANARY in m]
    assert CANARY not in job.log()
    assert {f"v{i}" for i in range(40)} <= set(res["id"].to_list())
