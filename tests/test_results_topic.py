"""sink.topic: committed results and dead letters published to Kafka after their Delta commit,
exactly once across a kill -9 before, in the middle of, or after a publish; read back by an
outside client (librdkafka, confluent-kafka) with read_committed. The commit writer runs as a
plain object over real Delta tables and the real broker (no Ray needed for this protocol)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from deltalake import DeltaTable
from kafka import KafkaConsumer as RealKafkaConsumer

from actors.writer import CommitWriter
from schemas.errors import SpecError
from schemas.spec import parse_spec
from tests.conftest import REPO
from tests.results_topic_crash import TPS, commit_rows


def consume_all(bootstrap: str, topic: str, idle_s: float = 3.0, first_s: float = 30.0) -> list:
    """Every message of `topic` from the beginning, read with librdkafka (read_committed): until
    `idle_s` passes without one, once the first came (a new consumer's first fetch, from a broker
    just restarted say, may take longer: up to `first_s`)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "isolation.level": "read_committed", "auto.offset.reset": "earliest"})  # fmt: skip
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    out, last = [], time.monotonic()
    while time.monotonic() - last < (idle_s if out else first_s):
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        last = time.monotonic()
        out.append(m)
    c.close()
    return out


def spec_dict(tmp_path, broker, out_topic: str, **topic) -> dict:
    return {
        "name": "publisher",
        "source": {"kafka": {"topic": "t", "bootstrap_servers": broker.bootstrap_servers}},
        "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"},
        "sink": {"results": str(tmp_path / "res"), "dead_letter": str(tmp_path / "dl"),
                 "topic": {"name": out_topic, "partitions": 2, "scan_idle_ms": 800, **topic}},
    }  # fmt: skip


def positions_of(messages) -> Counter:
    return Counter(
        (int(dict(m.headers())["tidegate.source_partition"]), int(dict(m.headers())["tidegate.source_offset"]))
        for m in messages
    )


def test_rows_are_published_after_their_commit_keyed_by_id_with_headers_and_marks(tmp_path, broker):
    out = f"out-{uuid.uuid4().hex[:8]}"
    spec = parse_spec(spec_dict(tmp_path, broker, out, include=["id", "status", "output_text", "error_class", "raw",
                                                                "source_partition", "source_offset"]))  # fmt: skip
    writer = CommitWriter(spec)
    writer.open()
    writer.resume(TPS)
    for first, last in ((0, 9), (10, 19)):
        writer.write_tables(*commit_rows(first, last), None)
    msgs = consume_all(broker.bootstrap_servers, out)
    assert positions_of(msgs) == Counter({(p, o): 1 for p in (0, 1) for o in range(20)})
    for m in msgs:
        h = dict(m.headers())
        value = json.loads(m.value())
        assert m.partition() == value["source_partition"] % 2  # source partition p -> topic partition p mod N
        assert set(value) <= {"id", "status", "output_text", "error_class", "raw", "source_partition", "source_offset"}
        if h["status"] == b"dead_letter":
            assert h["error_class"] == b"invalid_json" and base64.b64decode(value["raw"]) == b"\x00"
        else:
            assert h["status"] == b"ok" and m.key() == value["id"].encode() and h["run_id"] == b"r"
    # what the first commit's publish reached rides on the second commit, in the Delta log
    res = DeltaTable(str(tmp_path / "res"))
    published, scan_from = writer.topic.mark_names(TPS[0])
    assert res.transaction_version(published) == 9 and res.transaction_version(scan_from) >= 10
    writer.topic.close()


def slow_first_fetch(*args, **kwargs) -> RealKafkaConsumer:
    """The restart's read-back consumer as on a busy broker whose ListOffsets is wrong (tansu's is,
    at times: 1 for a partition of 5 records): the end offsets it reports are 0, and no fetch is
    answered for its first 2 s (poll returns nothing; kafka-python fetches only inside poll).
    Patched in for the resume only (the tests read the topic with librdkafka)."""
    consumer = RealKafkaConsumer(*args, **kwargs)
    slow_until, real_poll = time.monotonic() + 2.0, consumer.poll
    consumer.end_offsets = lambda partitions: {p: 0 for p in partitions}

    def poll(timeout_ms=0, **kw):
        if time.monotonic() < slow_until:
            time.sleep(timeout_ms / 1000)
            return {}
        return real_poll(timeout_ms=timeout_ms, **kw)

    consumer.poll = poll
    return consumer


def open_transaction(*args, **kwargs) -> RealKafkaConsumer:
    """The read-back consumer as beside another producer's open transaction: read_committed stops
    at its first record, 3 short of the high watermark the fetches report (tansu shows such records
    anyway, so the high watermark is raised by 3 instead)."""
    consumer = RealKafkaConsumer(*args, **kwargs)
    real_highwater = consumer.highwater
    consumer.highwater = lambda tp: None if real_highwater(tp) is None else real_highwater(tp) + 3
    return consumer


@pytest.mark.parametrize("mode", ["before", "middle", "after", "after, slow first fetch", "after, open transaction"])
def test_a_kill_around_a_publish_loses_no_row_and_repeats_none(tmp_path, broker, mode, monkeypatch):
    """... and a read-back whose first fetch is answered after scan_idle_ms (0.8 s here) still
    finds what the topic holds (before stop 45 it ended with nothing seen: 40 rows sent again);
    one short of the high watermark behind an open transaction ends once it stalls (here 2 s)."""
    import kafka

    import connectors.results_topic

    slow = mode.endswith("slow first fetch")
    held = mode.endswith("open transaction")
    mode = mode.split(",")[0]
    out = f"out-{uuid.uuid4().hex[:8]}"
    spec = spec_dict(tmp_path, broker, out)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.results_topic_crash", str(path), mode], cwd=REPO,
                          capture_output=True, timeout=180)  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    before = positions_of(consume_all(broker.bootstrap_servers, out, idle_s=1.5))
    assert all(n == 1 for n in before.values())
    if mode == "before":
        assert len(before) == 20  # the first commit's 2 partitions x 10 offsets only
    elif mode == "middle":
        assert 20 < len(before) < 40  # half of the second commit's results and one dead letter
    elif mode == "after":
        assert len(before) == 40  # both commits, marks of the second not recorded

    restarted = CommitWriter(parse_spec(spec))
    restarted.open()
    if slow:
        monkeypatch.setattr(kafka, "KafkaConsumer", slow_first_fetch)
    if held:
        monkeypatch.setattr(kafka, "KafkaConsumer", open_transaction)
        monkeypatch.setattr(connectors.results_topic, "_SCAN_OPEN_TRANSACTION_S", 2.0)
    positions, _ = restarted.resume(TPS)  # publishes what the topic lacks
    monkeypatch.undo()
    assert positions == {TPS[0]: 19, TPS[1]: 19}
    restarted.write_tables(*commit_rows(20, 24), None)
    got = positions_of(consume_all(broker.bootstrap_servers, out))
    assert got == Counter({(p, o): 1 for p in (0, 1) for o in range(25)}), {k: n for k, n in got.items() if n != 1}
    restarted.topic.close()


def test_a_repair_windows_dead_letters_are_published_with_the_commit_that_covers_them(tmp_path, broker):
    """Killed between the dead-letter half of a commit and its results half: the dead letters are
    stored above the results position (the repair window), and the restarted job skips their offsets.
    Before, nothing ever published them; now the commit that covers their offsets does."""
    out = f"out-{uuid.uuid4().hex[:8]}"
    spec = spec_dict(tmp_path, broker, out)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.results_topic_crash", str(path), "between"], cwd=REPO,
                          capture_output=True, timeout=180)  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    assert len(positions_of(consume_all(broker.bootstrap_servers, out, idle_s=1.5))) == 20  # the first commit's

    restarted = CommitWriter(parse_spec(spec))
    restarted.open()
    positions, windows = restarted.resume(TPS)
    assert positions == {TPS[0]: 9, TPS[1]: 9} and windows == {TPS[0]: {12, 16}, TPS[1]: {12, 16}}
    # As the pipeline does: offsets 10..19 again without the window's, then the next commit.
    import pyarrow.compute as pc

    res, no_dead = commit_rows(10, 19)[0], commit_rows(0, 0)[1].slice(0, 0)
    first_half = pc.less_equal(res.column("source_offset"), 14)
    restarted.write_tables(res.filter(first_half), no_dead, {tp: 14 for tp in TPS}, None)  # covers 12
    restarted.write_tables(res.filter(pc.invert(first_half)), no_dead, {tp: 19 for tp in TPS}, None)  # and 16
    restarted.write_tables(*commit_rows(20, 24), None)
    got = positions_of(consume_all(broker.bootstrap_servers, out))
    assert got == Counter({(p, o): 1 for p in (0, 1) for o in range(25)}), {k: n for k, n in got.items() if n != 1}
    restarted.topic.close()


def test_transactional_publishing_and_a_clean_restart_sends_nothing_again(tmp_path, broker):
    out = f"out-{uuid.uuid4().hex[:8]}"
    spec = parse_spec(spec_dict(tmp_path, broker, out, transactional=True))
    writer = CommitWriter(spec)
    writer.open()
    writer.resume(TPS)
    writer.write_tables(*commit_rows(0, 9), None)
    writer.topic.close()
    again = CommitWriter(spec)
    again.open()
    sent, _ = again.topic.resume(again.sink, again.sink.load_positions(TPS))
    assert sent == 0  # the topic already holds every committed row: found by reading it back
    assert positions_of(consume_all(broker.bootstrap_servers, out)) == Counter({(p, o): 1 for p in (0, 1) for o in range(10)})
    again.topic.close()


def test_avro_results_in_the_confluent_wire_format(tmp_path, broker, schema_registry):
    import io

    import fastavro

    out = f"out-{uuid.uuid4().hex[:8]}"
    spec = parse_spec(spec_dict(tmp_path, broker, out, format="avro", schema_registry=schema_registry.url))
    writer = CommitWriter(spec)
    writer.open()
    writer.resume(TPS)
    writer.write_tables(*commit_rows(0, 3), None)
    writer.topic.close()
    msgs = consume_all(broker.bootstrap_servers, out)
    assert len(msgs) == 8
    (subject, (schema_id, schema)), = schema_registry.subjects.items()
    assert subject == f"{out}-value"
    for m in msgs:
        v = m.value()
        assert v[0] == 0 and int.from_bytes(v[1:5], "big") == schema_id
        row = fastavro.schemaless_reader(io.BytesIO(v[5:]), fastavro.parse_schema(schema), None)
        assert row["source_offset"] == int(dict(m.headers())["tidegate.source_offset"])
        assert ("error_class" in row) == (dict(m.headers())["status"] == b"dead_letter")


def test_topic_settings_are_checked(tmp_path, broker):
    bad = spec_dict(tmp_path, broker, "out", format="avro")
    with pytest.raises(SpecError, match="format avro needs schema_registry"):
        parse_spec(bad)
    same = spec_dict(tmp_path, broker, "t")
    same["sink"]["topic"]["bootstrap_servers"] = None
    with pytest.raises(SpecError, match="the source's own topic"):
        parse_spec(same)
    embedded = spec_dict(tmp_path, broker, "out")
    embedded["source"]["kafka"]["bootstrap_servers"] = None
    with pytest.raises(SpecError, match="sink.topic.bootstrap_servers"):
        parse_spec(embedded)
    unknown = parse_spec(spec_dict(tmp_path, broker, "out", include=["id", "nope"]))
    with pytest.raises(Exception, match="no such column: nope"):
        CommitWriter(unknown)


def test_encrypted_columns_stay_encrypted_on_the_topic(tmp_path, broker, monkeypatch):
    import os

    from crypto.keyring import Keyring, LocalMasterKeyProvider
    from tests.conftest import results_table

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    keyring = tmp_path / "keys" / "keyring.json"
    Keyring.init(keyring, LocalMasterKeyProvider()).create_tenant("acme")
    canary = f"canary-topic-{uuid.uuid4().hex[:8]}@example.com"
    out = f"out-{uuid.uuid4().hex[:8]}"
    spec = spec_dict(tmp_path, broker, out)
    spec["encryption"] = {"keyring": str(keyring), "tenant": "acme", "output_fields": ["output_text"]}
    writer = CommitWriter(parse_spec(spec))
    writer.open()
    writer.resume(TPS)
    rows = results_table([0, 1, 2], 0, output_text=f"reply to {canary}", tenant="acme")
    writer.write_tables(rows, commit_rows(0, 0)[1].slice(0, 0), {TPS[0]: 2}, None)
    writer.topic.close()
    msgs = consume_all(broker.bootstrap_servers, out)
    assert len(msgs) == 3
    for m in msgs:
        assert canary.encode() not in m.value()
        stored = base64.b64decode(json.loads(m.value())["output_text"])  # the ciphertext as the table holds it
        assert canary.encode() not in stored and len(stored) > len(canary)
    # A consumer with the keyring decrypts what it read from the topic, bound to the results table.
    import pyarrow as pa

    from crypto.binding import binding_of
    from crypto.reader import decrypt_table, open_keyring
    from schemas.encryption import ROW_ID_COLUMNS

    dt = DeltaTable(spec["sink"]["results"])
    binding = binding_of(dt.metadata(), pa.schema(dt.schema().to_arrow()), spec["sink"]["results"])
    rows = [json.loads(m.value()) for m in msgs]
    table = pa.table({"output_text": [base64.b64decode(r["output_text"]) for r in rows],
                      "tenant": [r["tenant"] for r in rows], **{c: [r[c] for r in rows] for c in ROW_ID_COLUMNS}})  # fmt: skip
    clear = decrypt_table(table, open_keyring(str(keyring)), binding=binding, columns=["output_text"])
    assert set(clear.column("output_text").to_pylist()) == {f"reply to {canary}"}


def test_a_row_over_max_message_bytes_is_published_without_its_largest_columns(tmp_path, broker):
    """A dead letter's `raw` (base64 in JSON) or a long output can make a message larger than the
    broker takes; before, the publish failed and every restart sent it again: the job stopped for
    good. Now such a row is sent without its largest columns, named in tidegate.omitted, and the
    tables keep it whole."""
    import pyarrow as pa

    from compute.prompts import dead_letter_table
    from tests.conftest import results_table

    out = f"out-{uuid.uuid4().hex[:8]}"
    limit = 8192
    writer = CommitWriter(parse_spec(spec_dict(tmp_path, broker, out, max_message_bytes=limit)))
    writer.open()
    writer.resume(TPS)
    big_raw, long_output = b"\x01" * 20_000, "y" * 12_000
    res = results_table([0, 1], 0, output_text=["short", long_output], output_json=[None, '{"a": 1}'])
    dl = dead_letter_table([dict(stage="decode", error_class="too_large", error="e", source_topic="t",
                                 source_partition=0, source_offset=2, raw=big_raw)], "r")  # fmt: skip
    writer.write_tables(res, dl, {TPS[0]: 2}, None)
    writer.topic.close()
    msgs = {int(dict(m.headers())["tidegate.source_offset"]): m for m in consume_all(broker.bootstrap_servers, out)}
    assert sorted(msgs) == [0, 1, 2]
    for m in msgs.values():
        assert len(m.value()) + len(m.key() or b"") + sum(len(k) + len(v) for k, v in m.headers()) <= limit
    assert "tidegate.omitted" not in dict(msgs[0].headers()) and json.loads(msgs[0].value())["output_text"] == "short"
    long_row, dead_row = json.loads(msgs[1].value()), json.loads(msgs[2].value())
    assert dict(msgs[1].headers())["tidegate.omitted"] == b"output_text"
    assert long_row["output_text"] is None and long_row["output_json"] == '{"a": 1}' and long_row["id"] == "id1"
    assert dict(msgs[2].headers())["tidegate.omitted"] == b"raw" and dict(msgs[2].headers())["status"] == b"dead_letter"
    assert dead_row["raw"] is None and dead_row["error_class"] == "too_large" and dead_row["source_offset"] == 2
    # the tables hold both rows whole
    stored = pa.table(DeltaTable(str(tmp_path / "res")).to_pyarrow_table()).to_pylist()
    assert {r["source_offset"]: r["output_text"] for r in stored}[1] == long_output
    assert DeltaTable(str(tmp_path / "dl")).to_pyarrow_table().column("raw").to_pylist() == [big_raw]

    # An id over the limit itself (an event's id is the producer's): left out too, the key its
    # SHA-256; and only published columns are ever named (output_json is not in `include` here).
    import hashlib

    out2 = f"out-{uuid.uuid4().hex[:8]}"
    include = ["id", "status", "output_text", "source_partition", "source_offset"]
    writer = CommitWriter(parse_spec(spec_dict(tmp_path / "b", broker, out2, max_message_bytes=limit, include=include)))
    writer.open()
    writer.resume(TPS)
    huge_id = "i" * 20_000
    res = results_table([0, 1], 0, id=["small", huge_id], output_text=["a" * 9_000, "b"], output_json=['{"x": 1}', "j" * 9_000])
    writer.write_tables(res, dl.slice(0, 0), {TPS[0]: 1}, None)
    writer.topic.close()
    msgs = {int(dict(m.headers())["tidegate.source_offset"]): m for m in consume_all(broker.bootstrap_servers, out2)}
    assert dict(msgs[0].headers())["tidegate.omitted"] == b"output_text" and json.loads(msgs[0].value())["id"] == "small"
    assert dict(msgs[1].headers())["tidegate.omitted"] == b"id"  # output_json is not published: not named
    assert msgs[1].key() == hashlib.sha256(huge_id.encode()).hexdigest().encode()
    assert json.loads(msgs[1].value()) == {"id": None, "status": "ok", "output_text": "b", "source_partition": 0,
                                           "source_offset": 1}  # fmt: skip
