"""Kafka producers and consumers around a job: the producer SDK (tidegate.producer), the
`tidegate produce` / `tidegate schema` verbs, and a job that reads Avro in the Confluent wire
format from librdkafka's client and publishes its results to a topic. Real broker (tansu), a real
HTTP schema registry endpoint (tests/registry.py), real Delta tables, a real Ray + vLLM job."""

from __future__ import annotations

import io
import json
import re
import struct
import uuid
from collections import Counter

import fastavro
import pandas as pd
import polars as pl
import pytest
from typer.testing import CliRunner

from compute.event_formats import AvroDecoder
from connectors.schema_registry import HttpSchemaRegistry
from jobs.cli import app
from schemas.errors import EventContractError
from tests.conftest import make_spec, table_rows, write_spec
from tests.test_results_topic import consume_all

SECRET = "canary-ecosystem-7731"


def producer_spec(tmp_path, broker, topic: str, **kafka) -> dict:
    return {
        "name": "producer-job",
        "source": {"kafka": {"topic": topic, "bootstrap_servers": broker.bootstrap_servers, **kafka},
                   "event_schema": {"properties": {"priority": {"type": "integer", "minimum": 1, "maximum": 5}},
                                    "required": ["priority"]}},
        "prompt": {"template": "Ticket for {{ user }}: {{ question }}", "id_field": "id"},
        "model": {"path": "/m"},
        "sink": {"results": str(tmp_path / "r"), "dead_letter": str(tmp_path / "d")},
    }  # fmt: skip


def ev(i: int, **kw) -> dict:
    return {"id": f"p{i:04d}", "user": f"u{i % 3}", "question": f"where is order {i}?", "priority": 1 + i % 5, **kw}


def test_the_producer_checks_every_event_first_keys_by_id_and_reports_deliveries(tmp_path, broker, topic):
    from tidegate.producer import EventProducer

    spec_path = write_spec(tmp_path, producer_spec(tmp_path, broker, topic))
    with EventProducer.from_spec(spec_path) as producer:
        first = producer.send(ev(0))
        assert first.id == "p0000" and first.topic == topic and first.offset >= 0
        with pytest.raises(EventContractError) as e:
            producer.send_many([ev(1), ev(2, priority=SECRET), ev(3)])
        assert str(e.value) == "event #1: priority: fails 'type' \"integer\"" and e.value.record == 1
        with pytest.raises(EventContractError, match="event #0: question: required field missing"):
            producer.send_many([{"id": "x", "user": "u", "priority": 1}])
        frames = producer.send_many(pl.DataFrame([ev(i) for i in range(10, 15)]))
        frames += producer.send_many(pd.DataFrame([ev(i) for i in range(20, 23)]))
    assert [d.id for d in frames] == [f"p{i:04d}" for i in [*range(10, 15), *range(20, 23)]]
    msgs = consume_all(broker.bootstrap_servers, topic, idle_s=2)
    got = {m.key().decode(): json.loads(m.value()) for m in msgs}
    assert sorted(got) == sorted(["p0000", *(d.id for d in frames)])  # nothing of the refused calls
    assert got["p0021"] == ev(21)
    by_id = {m.key().decode(): m.partition() for m in msgs}
    assert all(by_id[d.id] == d.partition for d in frames)


def test_send_each_answers_each_event_on_its_own_even_one_the_client_refuses(tmp_path, broker, topic):
    """send_each (the online /events route): an event over the producer's max_request_size was
    refused by kafka-python's send() itself, and escaped send_each (a 500 from /events, with the
    earlier events queued all the same); then it was that event's ProduceError. Since stop 44 the
    size is checked with the contract: its outcome is an EventContractError (the size, never its
    value), and the others are delivered.
    """
    from tidegate.producer import EventProducer

    spec_path = write_spec(tmp_path, producer_spec(tmp_path, broker, topic))
    with EventProducer.from_spec(spec_path, producer_config={"max_request_size": 4096}) as producer:
        out = producer.send_each([ev(0), ev(2, priority="x"), ev(1, question=SECRET * 400), ev(3)])
    # Refused before the client since stop 44 (an EventContractError: over the size the job takes),
    # in its place, named by its number in the request.
    assert [type(o).__name__ for o in out] == ["Delivery", "EventContractError", "EventContractError", "Delivery"]
    assert SECRET not in str(out[2])
    assert "event #2:" in str(out[2]) and "over the producer's max_request_size (4096 bytes)" in str(out[2])
    msgs = consume_all(broker.bootstrap_servers, topic, idle_s=2)
    assert sorted(m.key().decode() for m in msgs) == ["p0000", "p0003"]


def test_the_producer_registers_the_contract_and_sends_the_confluent_wire_format(tmp_path, broker, topic,
                                                                                   schema_registry):  # fmt: skip
    from tidegate.producer import EventProducer

    spec = producer_spec(tmp_path, broker, topic, format="avro", schema_registry=schema_registry.url)
    with EventProducer.from_spec(write_spec(tmp_path, spec)) as producer:
        producer.send_many([ev(i) for i in range(6)])
        # An integer id and a number in a template variable pass the contract (JSON allows them):
        # sent as their text, as the job reads them from JSON. Before stop 47: refused, TypeError.
        producer.send({**ev(6), "id": 6, "question": 42})
    (subject, (schema_id, schema)), = schema_registry.subjects.items()
    assert subject == f"{topic}-value" and {f["name"] for f in schema["fields"]} >= {"id", "user", "question", "priority"}
    decode = AvroDecoder(lookup=HttpSchemaRegistry(schema_registry.url))
    msgs = consume_all(broker.bootstrap_servers, topic, idle_s=2)
    events = {decode(m.value())["id"]: decode(m.value()) for m in msgs}
    assert sorted(events) == ["6", *(f"p{i:04d}" for i in range(6))]
    assert events["6"]["question"] == "42" and events["6"]["priority"] == ev(6)["priority"]
    assert {struct.unpack(">bI", m.value()[:5]) for m in msgs} == {(0, schema_id)}


def test_cli_schema_and_produce(tmp_path, broker, topic):
    spec_path = write_spec(tmp_path, producer_spec(tmp_path, broker, topic))
    runner = CliRunner()
    out = runner.invoke(app, ["schema", str(spec_path)])
    assert out.exit_code == 0, out.output
    schema = json.loads(out.output)
    assert schema["required"] == ["id", "question", "user", "priority"]
    avro = runner.invoke(app, ["schema", str(spec_path), "--format", "avro"])
    assert avro.exit_code == 0 and fastavro.parse_schema(json.loads(avro.output))["type"] == "record"
    assert runner.invoke(app, ["schema", str(spec_path), "--format", "xml"]).exit_code == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(e) for e in [ev(1), ev(2), ev(3, priority=9, question=SECRET)]) + "\n")
    res = runner.invoke(app, ["produce", str(bad), "--spec", str(spec_path)])
    assert res.exit_code == 2 and "line 3: priority: fails 'maximum' 5; nothing was sent" in res.output
    assert SECRET not in res.output
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(ev(i)) for i in range(4)) + "\n\n")
    res = runner.invoke(app, ["produce", str(good), "--spec", str(spec_path)])
    assert res.exit_code == 0 and f"sent 4 event(s) to {topic}" in res.output, res.output
    assert len(consume_all(broker.bootstrap_servers, topic, idle_s=2)) == 4


def test_cli_produce_sends_nothing_before_an_oversized_event_and_checks_ids_without_a_spec(tmp_path, broker, topic):
    """Before stop 44: an event over the producer's max_request_size was refused by the client after
    the events before it had been sent (a rerun of the fixed file sent them twice), named by its
    0-based position, not its line; an event over the job's max_message_bytes was sent (and
    dead-lettered by the job); without a spec a null or boolean id was sent, keyed b"None"; a missing
    file was a traceback."""
    spec_path = write_spec(tmp_path, producer_spec(tmp_path, broker, topic, max_message_bytes=2000))
    runner = CliRunner()
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps(e) for e in [ev(1), ev(2), ev(3, question=SECRET * 200), ev(4)]) + "\n")
    res = runner.invoke(app, ["produce", str(big), "--spec", str(spec_path)])
    assert res.exit_code == 2, res.output
    assert "line 3:" in res.output and "over the job's source.kafka.max_message_bytes (2000); nothing was sent" in res.output
    assert SECRET not in res.output
    loose = tmp_path / "loose.jsonl"  # no spec: only the id is checked, and it must be a usable id
    for bad_id in (None, True, {"a": 1}, 1.5):
        loose.write_text(json.dumps({"id": "ok-1"}) + "\n" + json.dumps({"id": bad_id, "q": SECRET}) + "\n")
        res = runner.invoke(app, ["produce", str(loose), "--bootstrap", broker.bootstrap_servers, "--topic", topic])
        assert res.exit_code == 2 and "line 2: id:" in res.output and "nothing was sent" in res.output, (bad_id, res.output)
        assert SECRET not in res.output
    res = runner.invoke(app, ["produce", str(tmp_path / "missing.jsonl"), "--spec", str(spec_path)])
    assert res.exit_code == 2 and "error: cannot read" in res.output and "No such file" in res.output, res.output
    assert consume_all(broker.bootstrap_servers, topic, idle_s=2) == []
    from tidegate.producer import EventProducer

    with EventProducer(broker.bootstrap_servers, topic, "id", json_schema={"type": "object"}) as producer:
        with pytest.raises(EventContractError, match="id: id field 'id' is missing"):  # was a bare KeyError
            producer.send({"q": 1})


def test_the_producer_takes_only_what_the_job_takes_and_outlives_a_refusal(tmp_path, broker, topic):
    """Four gaps from a read-only review (stop 47), on the real broker:
    - an id the job dead-letters (a float, a boolean, an object: invalid_id) was sent when the
      contract allowed it (a json_schema, or an event_schema that retypes the id);
    - send() did not check the size (send_many and send_each did): an event the job dead-letters
      as oversized_message was sent;
    - the client kept kafka-python's 1 MiB max_request_size whatever the job's
      source.kafka.max_message_bytes, refusing events the job takes;
    - a batch the broker refuses for good (a message over the topic's limit, a denied ACL) left
      kafka-python's idempotent producer failed for good: every later event of a shared producer
      (/events) failed with that error until its replica was replaced. The refusal's state is set
      here as kafka-python sets it (its transaction manager's fatal transition), then events are
      sent."""
    from kafka.errors import MessageSizeTooLargeError

    from tidegate.producer import Delivery, EventProducer

    with EventProducer(broker.bootstrap_servers, topic, "id", json_schema={"type": "object"}) as loose:
        for bad in (1.5, True, {"a": SECRET}):
            with pytest.raises(EventContractError, match="id: id field 'id' is") as e:
                loose.send({"id": bad, "q": SECRET})
            assert SECRET not in str(e.value)
        assert loose.send({"id": 7, "q": "an integer id is the job's too"}).id == "7"
    spec_path = write_spec(tmp_path, producer_spec(tmp_path, broker, topic, max_message_bytes=2000))
    with EventProducer.from_spec(spec_path) as producer:
        assert producer._producer.config["max_request_size"] == 1_048_576  # at or below 1 MiB: kafka-python's
        with pytest.raises(EventContractError, match="over the job's source.kafka.max_message_bytes"):
            producer.send(ev(1, question=SECRET * 200))
        assert isinstance(producer.send(ev(2)), Delivery)
        producer._producer._transaction_manager.transition_to_fatal_error(MessageSizeTooLargeError())
        out = producer.send_each([ev(3), ev(4)])
        assert [type(o).__name__ for o in out] == ["Delivery", "Delivery"], out
        assert isinstance(producer.send(ev(5)), Delivery)
    (tmp_path / "big").mkdir()
    big = write_spec(tmp_path / "big", producer_spec(tmp_path, broker, topic, max_message_bytes=4_000_000))
    with EventProducer.from_spec(big) as producer:
        assert producer._producer.config["max_request_size"] > 4_000_000
        producer._check_size(0, b"k", b"x" * 2_000_000)  # taken by the job: not refused here
    # A user's Avro schema that types as text a field the contract wants as a number: the job
    # would decode "3" and dead-letter it (schema_violation); refused here, naming the field.
    (tmp_path / "avro").mkdir()
    schema = {"type": "record", "name": "Ticket", "fields": [{"name": n, "type": "string"} for n in
                                                             ("id", "user", "question", "priority")]}  # fmt: skip
    avro = write_spec(tmp_path / "avro", producer_spec(tmp_path, broker, topic, format="avro", avro_schema=schema))
    with EventProducer.from_spec(avro) as producer:
        with pytest.raises(EventContractError, match="priority: fails 'type'.*as the Avro schema sends it"):
            producer.send(ev(6))
    got = sorted(m.key().decode() for m in consume_all(broker.bootstrap_servers, topic, idle_s=2))
    assert got == ["7", "p0002", "p0003", "p0004", "p0005"]


@pytest.mark.slow
def test_a_job_reads_librdkafka_avro_and_publishes_each_committed_row_to_kafka_once(
    tmp_path, broker, topic, tiny_model, job_processes, schema_registry
):
    from confluent_kafka import Producer

    spec = make_spec(tmp_path, broker, topic, tiny_model)
    contract_spec = producer_spec(tmp_path, broker, topic)
    spec["source"]["kafka"].update(format="avro", schema_registry=schema_registry.url)
    spec["source"]["event_schema"] = contract_spec["source"]["event_schema"]
    spec["prompt"] = contract_spec["prompt"]
    out_topic = f"results-{uuid.uuid4().hex[:8]}"
    spec["sink"]["topic"] = {"name": out_topic, "partitions": 2, "scan_idle_ms": 500}
    # the writer's schema, registered the way a Confluent serializer does (POST /subjects/.../versions)
    schema = {"type": "record", "name": "Ticket", "namespace": "acme", "fields": [
        {"name": "id", "type": "string"}, {"name": "user", "type": "string"},
        {"name": "question", "type": "string"}, {"name": "priority", "type": "int"}]}  # fmt: skip
    schema_id = schema_registry.register(f"{topic}-value", schema)

    def framed(event: dict, sid: int = schema_id) -> bytes:
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, sid))
        fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), event)
        return buf.getvalue()

    p = Producer({"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True, "acks": "all"})
    for i in range(30):
        p.produce(topic, key=f"p{i:04d}", value=framed(ev(i)))
    p.produce(topic, key="unknown", value=framed(ev(100), sid=schema_id + 1000))  # no such schema id
    p.produce(topic, key="p0101", value=framed(ev(101, priority=7, question=SECRET)))  # breaks the contract
    p.produce(topic, key="json", value=json.dumps(ev(102)).encode())  # not the wire format
    assert p.flush(30) == 0

    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(300) == 0, job.log()[-4000:]
    results = pl.read_delta(spec["sink"]["results"])
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert results.height == 30 and sorted(results["id"]) == [f"p{i:04d}" for i in range(30)]
    assert Counter(dead["error_class"]) == Counter({"unknown_schema_id": 1, "schema_violation": 1, "invalid_framing": 1})
    violation = dead.filter(pl.col("error_class") == "schema_violation").row(0, named=True)
    assert violation["id"] == "p0101" and violation["error"] == "priority: fails 'maximum' 5"

    msgs = consume_all(broker.bootstrap_servers, out_topic)
    by_position = Counter((int(dict(m.headers())["tidegate.source_partition"]),
                           int(dict(m.headers())["tidegate.source_offset"])) for m in msgs)  # fmt: skip
    assert len(by_position) == 33 and set(by_position.values()) == {1}  # every committed row, once
    # ... and counted: the run summary (tidegate_published_rows_total counts the same, jobs/pipeline.py)
    assert re.search(rf"rows published to {out_topic}\s*│\s*33\b", job.log()), job.log()[-3000:]
    statuses = Counter(dict(m.headers())["status"] for m in msgs)
    assert statuses[b"dead_letter"] == 3 and sum(statuses.values()) == 33
    assert {json.loads(m.value())["id"] for m in msgs if dict(m.headers())["status"] != b"dead_letter"} == set(results["id"])
    assert table_rows(spec["sink"]["results"]) == 30


def test_a_topic_without_metadata_fails_a_calls_events_at_once_not_one_wait_each():
    """kafka-python's send() waits up to max_block_ms (60 s) for the topic's metadata (a topic not
    created, auto-creation off; the broker gone before the first send) and raises
    KafkaTimeoutError. send_each caught it per event and sent the next, which waited again: a
    100-event /events call held its thread for 100 minutes. Now the first timeout fails the rest of
    the call at once. A pure-logic unit of the send loop: the client is a stand-in whose send()
    times out, as kafka-python's does without metadata (the test broker creates every topic)."""
    import threading
    from types import SimpleNamespace as NS

    from kafka.errors import KafkaTimeoutError

    from jobs.producer import EventProducer
    from schemas.errors import ProduceError

    calls = []

    def send(topic, key, value):
        calls.append(key)
        raise KafkaTimeoutError("Failed to update metadata after 60.0 secs.")

    producer = object.__new__(EventProducer)
    producer.topic, producer._lock = "t", threading.Lock()
    producer._producer = NS(send=send, flush=lambda: None, _transaction_manager=NS(has_fatal_error=lambda: False))
    out = producer._send_each([(b"a", b"{}", "a"), (b"b", b"{}", "b"), (b"c", b"{}", "c")], [4, 5, 6])
    assert calls == [b"a"]  # one wait, not three
    assert [type(o) for o in out] == [ProduceError] * 3
    assert [str(o).split("event ")[1] for o in out] == ["4: KafkaTimeoutError"] * 1 + ["5: KafkaTimeoutError", "6: KafkaTimeoutError"]
