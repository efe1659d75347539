"""Monitoring, lineage, run history, status and JSON logs: fast tests, no Ray, no broker, no engine.

Delta tables are real (on disk, written by connectors.delta.DeltaSink with its app transactions);
Kafka end offsets come from a fake in place of `connectors.kafka.kafka_end_offsets` (the real one needs a broker).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
import yaml
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from rich.console import Console
from typer.testing import CliRunner

from compute import lineage
from compute.prompts import dead_letter_table
from connectors.delta import DeltaSink, txn_app_id
from compute.totals import CommitTotals, e2e_latencies_s, span_positions
from connectors.runs import RUNS_SCHEMA, RunsTable, default_runs_uri
from connectors.source import partition_lag, source_versions_behind
from jobs import metrics as M
from jobs.logs import (
    JsonLogFormatter,
    configure_json_logging,
    configure_text_logging,
    log_context,
    redact,
    redact_text,
    redact_value,
)
from jobs.status import collect_status, render_status
from schemas.records import RESULTS_SCHEMA
from schemas.spec import parse_spec
from tests.conftest import REPO, results_table

T = "topic-a"
TP0, TP1, TP2, TP3 = (T, 0), (T, 1), (T, 2), (T, 3)
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone.utc)


def results_rows(offsets, partition=0, topic=T, status="ok", processed_at=None, latency_ms=1.0) -> pa.Table:
    return results_table(
        offsets, partition, topic, status=status, finish_reason="stop", prompt_tokens=3, completion_tokens=4,
        latency_ms=latency_ms, run_id="r1", processed_at=processed_at or datetime.now(timezone.utc),
    )  # fmt: skip


def dead_rows(offsets, partition=0, topic=T, stage="decode", error_class="invalid_json") -> pa.Table:
    return dead_letter_table(
        [dict(stage=stage, error_class=error_class, error="e", source_topic=topic, source_partition=partition,
              source_offset=o, raw=b"\x00") for o in offsets],
        "r1",
    )  # fmt: skip


def make_spec(tmp_path, **over) -> dict:
    spec = {
        "name": "job",
        "source": {"kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": T}},
        "prompt": {"template": "Answer {{ q }}", "id_field": "id"},
        "model": {"path": str(tmp_path / "model")},
        "sampling": {"max_tokens": 16, "temperature": 0},
        "sink": {"results": str(tmp_path / "lake" / "results"), "dead_letter": str(tmp_path / "lake" / "dead_letter")},
    }
    for dotted, value in over.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_recorder_keeps_totals_without_ray():
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    m = M.JobMetrics("triage", "run1", "kafka")
    m.rows_in(10)
    m.rows_in(5)
    m.rows_in(0)  # nothing to add: no error, no change
    m.rows_out("ok", 7)
    m.rows_out("flagged", 2)
    m.rows_out("ok", 1)
    m.dead_letters("decode", "invalid_json", 3)
    m.dead_letters("validate", "validation_failed")
    m.validation_failures("refusal", 4)
    m.tokens(prompt=100, completion=40)
    m.tokens(prompt=50, completion=0)
    m.retries(2)
    m.queue_depth(3)
    m.queue_depth(1)  # a gauge keeps the last value
    m.live_actors(2)
    m.partition_lags({TP0: 5, TP1: 0})
    m.partition_lag(T, 0, 4)
    m.versions_behind(2)
    m.batch_latency(0.3)
    m.batch_latency(7.0)
    m.commit_latency(0.02)

    assert not m.exporting
    assert m.value("tidegate_rows_in_total") == 15
    assert m.value("tidegate_rows_out_total") == 10
    assert m.value("tidegate_rows_out_total", status="ok") == 8
    assert m.value("tidegate_rows_out_total", status="flagged") == 2
    assert m.value("tidegate_dead_letters_total", stage="decode") == 3
    assert m.value("tidegate_dead_letters_total", error_class="validation_failed") == 1
    assert m.value("tidegate_validation_failures_total", rule="refusal") == 4
    assert m.value("tidegate_prompt_tokens_total") == 150
    assert m.value("tidegate_completion_tokens_total") == 40
    assert m.value("tidegate_retries_total") == 2
    assert m.gauge("tidegate_engine_queue_depth") == 1
    assert m.gauge("tidegate_live_actors") == 2
    assert m.gauge("tidegate_partition_lag", topic=T, partition=0) == 4
    assert m.gauge("tidegate_partition_lag", topic=T, partition=1) == 0
    assert m.value("tidegate_partition_lag") == 4
    assert m.gauge("tidegate_source_versions_behind") == 2
    h = m.histogram("tidegate_batch_latency_seconds")
    assert (h.count, h.sum) == (2, pytest.approx(7.3))
    bounds = h.boundaries
    assert h.buckets[bounds.index(0.5)] == 1 and h.buckets[bounds.index(10.0)] == 1 and sum(h.buckets) == 2
    assert m.value("tidegate_commit_latency_seconds") == 1
    with pytest.raises(ValueError, match="takes tags"):
        m._inc("tidegate_rows_out_total", 1)  # the status tag is missing


def test_metric_names_are_valid_and_declared_once():
    assert len(M.METRIC_NAMES) == len(set(M.METRIC_NAMES)) == 18
    for name in M.METRIC_NAMES:
        assert re.fullmatch(r"tidegate_[a-z0-9_]+", name), name
    counters = [n for n in M.METRIC_NAMES if M._DEFS[n][0] == "counter"]
    assert all(n.endswith("_total") for n in counters)  # exported unchanged (no second _total)


def test_committed_counts_rows_and_e2e_latency():
    m = M.JobMetrics("j", "r", "kafka")
    res = pa.concat_tables([
        results_rows([0, 1, 2], processed_at=NOW - timedelta(seconds=2), latency_ms=500.0),
        results_rows([3], status="flagged", processed_at=NOW - timedelta(seconds=10), latency_ms=0.0),
    ])  # fmt: skip
    dead = pa.concat_tables([dead_rows([4, 5]), dead_rows([6], stage="engine", error_class="engine_crash")])
    assert e2e_latencies_s(res, NOW) == [2.5, 2.5, 2.5, 10.0]
    m.committed(CommitTotals.of(res, dead, {TP0: 6}, NOW))
    assert m.value("tidegate_rows_out_total", status="ok") == 3
    assert m.value("tidegate_rows_out_total", status="flagged") == 1
    assert m.value("tidegate_dead_letters_total", stage="decode", error_class="invalid_json") == 2
    assert m.value("tidegate_dead_letters_total", stage="engine", error_class="engine_crash") == 1
    h = m.histogram("tidegate_e2e_latency_seconds")
    assert h.count == 4 and h.sum == pytest.approx(17.5)
    assert h.buckets[h.boundaries.index(2.5)] == 3 and h.buckets[h.boundaries.index(10.0)] == 1
    assert e2e_latencies_s(RESULTS_SCHEMA.empty_table(), NOW) == []


def test_sampled_observations_keep_the_extremes_and_are_bounded():
    values = [float(i) for i in range(10_000)]
    sample = M._sample_sorted(values, 512)
    assert len(sample) == 512 and sample[0] == 0.0 and sample[-1] == 9999.0
    assert abs(sample[256] - 5000) < 30  # the median survives


def test_partition_lag_against_known_positions():
    # End offsets as a fetch reports them (tansu: a partition with 5 records has high watermark 5,
    # while its ListOffsets answer is 1); Delta positions are the last offsets committed.
    end = {TP0: 5, TP1: 2, TP2: 0, TP3: 10}
    committed = {TP0: 2, TP1: None, TP3: 12, (T, 9): 4}
    lag = partition_lag(end, committed)
    assert lag == {
        TP0: 2,  # offsets 3, 4 to do
        TP1: 2,  # nothing committed: every record from the start (0)
        TP2: 0,  # empty partition, nothing committed
        TP3: 0,  # over-committed (a stale watermark): never negative
    }
    assert partition_lag({TP0: 5}, {TP0: 4}) == {TP0: 0}  # fully caught up
    assert source_versions_behind(7, 5) == 2
    assert source_versions_behind(7, None) == 8
    assert source_versions_behind(3, 3) == 0


# -- dashboard and Prometheus config ---------------------------------------------------------------


def test_promql_metric_name_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le, job) (rate(ray_tidegate_e2e_latency_seconds_bucket'
        '{job=~"$job", status!="x"}[$__rate_interval]))) / on(job) group_left sum(ray_other_total offset 5m)'
        ' + 1e3 * count without (instance) (up{job="ray"})'
    )
    assert M.promql_metric_names(expr) == {"ray_tidegate_e2e_latency_seconds_bucket", "ray_other_total", "up"}


def test_dashboard_queries_only_exported_tidegate_metrics(tmp_path):
    path = REPO / "deploy" / "grafana" / "tidegate.json"
    dash = json.loads(path.read_text())
    assert dash["schemaVersion"] >= 39 and dash["uid"] == "tidegate"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "ray_tidegate_rows_in_total" in variables["job"]["definition"]
    exported = {M.EXPORT_PREFIX + n for n in M.METRIC_NAMES}
    names = M.dashboard_metric_names(path)
    assert names <= exported, names - exported
    assert names == exported, f"metrics without a panel: {exported - names}"  # every metric is shown
    exprs = M.dashboard_exprs(dash)
    for base in ("batch_latency", "e2e_latency", "commit_latency"):
        for q in ("0.5", "0.95"):
            assert any(f"histogram_quantile({q}" in e and f"ray_tidegate_{base}_seconds_bucket" in e for e in exprs)
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    # The check catches a misspelt name.
    dash["panels"][1]["targets"][0]["expr"] = "rate(ray_tidegate_rows_inn_total[5m])"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dash))
    assert "ray_tidegate_rows_inn_total" in M.dashboard_metric_names(bad) - exported


def test_prometheus_config_scrapes_rays_service_discovery():
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    ray_job = jobs["ray"]
    files = [f for sd in ray_job["file_sd_configs"] for f in sd["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert ray_job["honor_labels"] is True  # keeps Tidegate's `job` label
    assert config["global"]["scrape_interval"]


# -- lineage ---------------------------------------------------------------------------------------


def _model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text('{"v": 1}')
    (d / "model.safetensors").write_bytes(b"\x01" * 4096)
    (d / "README.md").write_text("not part of the revision")
    return d


def test_model_revision_changes_with_weights_and_is_cached(tmp_path):
    d = _model_dir(tmp_path)
    lineage.clear_cache()
    before = lineage.hashed_bytes
    rev = lineage.model_revision(d)
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", rev)
    first_read = lineage.hashed_bytes - before
    assert first_read == 4096 + len('{"model_type": "llama"}') + len('{"v": 1}')
    assert lineage.model_revision(d) == rev and lineage.hashed_bytes - before == first_read  # cached
    (d / "README.md").write_text("changed")
    assert lineage.model_revision(d) == rev  # not a model file

    weights = d / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"\x02" * 4096)  # same size: the new mtime makes it read again
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    rev2 = lineage.model_revision(d)
    assert rev2 != rev
    assert lineage.hashed_bytes - before == first_read + 4096  # only the changed file was read

    (d / "model-00002.bin").write_bytes(b"\x03")
    assert lineage.model_revision(d) not in (rev, rev2)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError):
        lineage.model_revision(d)


def test_spec_hash_excludes_secrets_and_follows_the_template(tmp_path):
    base = make_spec(
        tmp_path,
        **{
            # (the spec itself refuses sasl_plain_password & co. here; spec_hash drops any key that
            # looks secret, whatever the spec lets through)
            "source.kafka.consumer_config": {"custom_secret": "hunter2", "client_id": "SASL_SSL",
                                             "private_keyfile": "/k.pem", "refresh_token": "tok-9f3"},
            "sink.storage_options": {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_REGION": "eu-west-1"},
        },
    )  # fmt: skip
    spec = parse_spec(base)
    h = lineage.spec_hash(spec)
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", h)
    public = json.dumps(lineage.spec_public_dict(spec))
    for secret in ("hunter2", "s3cr3t", "/k.pem", "tok-9f3", "eu-west-1"):
        assert secret not in public
    assert "SASL_SSL" in public and "AWS_SECRET_ACCESS_KEY" in public

    other_secrets = json.loads(json.dumps(base))
    other_secrets["source"]["kafka"]["consumer_config"]["custom_secret"] = "other"
    other_secrets["sink"]["storage_options"]["AWS_SECRET_ACCESS_KEY"] = "other"
    assert lineage.spec_hash(parse_spec(other_secrets)) == h
    other_template = json.loads(json.dumps(base))
    other_template["prompt"]["template"] = "Answer briefly {{ q }}"
    assert lineage.spec_hash(parse_spec(other_template)) != h
    other_protocol = json.loads(json.dumps(base))
    other_protocol["source"]["kafka"]["consumer_config"]["client_id"] = "SSL"
    assert lineage.spec_hash(parse_spec(other_protocol)) != h

    assert lineage.template_hash("Answer {{ q }}") == lineage.template_hash("Answer {{ q }}")
    assert lineage.template_hash("Answer {{ q }}") != lineage.template_hash("Answer {{ q }} ")
    assert lineage.sampling_json(spec) == '{"max_tokens":16,"temperature":0}'

    _model_dir(tmp_path)
    cols = lineage.lineage_columns(spec)
    assert cols == {
        "model_path": str(tmp_path / "model"),
        "model_revision": lineage.model_revision(tmp_path / "model"),
        "prompt_template_hash": lineage.template_hash("Answer {{ q }}"),
        "sampling_params": '{"max_tokens":16,"temperature":0}',
        "spec_hash": h,
    }
    assert set(cols) == set(lineage.LINEAGE_COLUMNS)
    missing = parse_spec(make_spec(tmp_path, **{"model.path": str(tmp_path / "nowhere")}))
    assert lineage.lineage_columns(missing)["model_revision"] is None
    assert lineage.lineage_columns(missing, model_rev="sha256:abc")["model_revision"] == "sha256:abc"


# -- run history -----------------------------------------------------------------------------------


def test_default_runs_uri():
    assert default_runs_uri("s3://lake/triage/results") == "s3://lake/triage/runs"
    assert default_runs_uri("/data/x/results/") == "/data/x/runs"
    assert default_runs_uri("file:///data/results") == "file:///data/runs"
    assert default_runs_uri("results") == "runs"
    with pytest.raises(ValueError):
        default_runs_uri("s3://bucket")
    with pytest.raises(ValueError):
        default_runs_uri("/data/runs")


def test_runs_table_append_and_read(tmp_path):
    runs = RunsTable(str(tmp_path / "runs"))
    empty = runs.read()
    assert empty.height == 0 and empty.columns == RUNS_SCHEMA.names and not runs.exists()
    lin = {"model_path": "/m", "model_revision": "sha256:aa", "spec_hash": "sha256:bb"}
    t0 = NOW
    res, dead = results_rows([10, 11, 12]), dead_rows([13])
    spans = span_positions(res, dead, {TP0: 13, (T, -1): 7})
    assert spans == {TP0: (10, 13), (T, -1): (None, 7)}
    runs.append_commit(
        run_id="r1", job="job", commit_seq=1, started_at=t0, ended_at=t0 + timedelta(seconds=2),
        rows_ok=3, rows_flagged=1, rows_dead=1, dead_by_class={"invalid_json": 1}, prompt_tokens=30,
        completion_tokens=12, retries=1, positions=spans, lineage=lin,
    )  # fmt: skip
    runs.append_commit(
        run_id="r1", job="job", commit_seq=2, started_at=t0 + timedelta(seconds=2), ended_at=t0 + timedelta(seconds=3),
        rows_ok=4, positions={TP0: 20}, lineage=lin,
    )  # fmt: skip
    runs.append_commit(run_id="other", job="job2", commit_seq=1, started_at=t0, ended_at=t0, rows_ok=1)
    runs.append_run(
        run_id="r1", job="job", started_at=t0 - timedelta(seconds=1), ended_at=t0 + timedelta(seconds=4),
        status="finished", commits=2, rows_ok=7, rows_flagged=1, rows_dead=1, dead_by_class={"invalid_json": 1},
        prompt_tokens=30, completion_tokens=12, retries=1, lineage=lin,
    )  # fmt: skip
    with pytest.raises(ValueError, match="status"):
        runs.append_run(run_id="r1", job="job", started_at=t0, ended_at=t0, status="ok", commits=0, rows_ok=0)
    with pytest.raises(ValueError, match="timezone"):
        runs.append_commit(run_id="r1", job="job", commit_seq=3, started_at=datetime(2026, 1, 1),
                           ended_at=datetime(2026, 1, 1), rows_ok=0)  # fmt: skip

    assert runs.exists() and runs.read().height == 4
    df = runs.read(run_id="r1")
    assert df.get_column("kind").to_list() == ["commit", "commit", "run"]
    c1, c2, run = df.to_dicts()
    assert c1["commit_seq"] == 1 and c1["rows_ok"] == 3 and c1["rows_dead"] == 1 and c1["rows_flagged"] == 1
    assert c1["duration_s"] == 2.0 and c1["rows_per_s"] == 2.0  # (3 ok + 1 dead) / 2 s
    assert dict(c1["dead_by_class"]) == {"invalid_json": 1}
    assert c1["positions"] == [
        {"topic": T, "partition": -1, "first_offset": None, "last_offset": 7},
        {"topic": T, "partition": 0, "first_offset": 10, "last_offset": 13},
    ]
    assert c1["started_at"] == t0 and c1["ended_at"] == t0 + timedelta(seconds=2)
    assert (c1["model_revision"], c1["spec_hash"], c1["status"], c1["error"]) == ("sha256:aa", "sha256:bb", None, None)
    assert c2["positions"] == [{"topic": T, "partition": 0, "first_offset": None, "last_offset": 20}]
    assert c2["rows_per_s"] == 4.0
    assert run["status"] == "finished" and run["commit_seq"] == 2 and run["duration_s"] == 5.0
    assert run["rows_per_s"] == pytest.approx(8 / 5)
    assert runs.read(job="job2").get_column("run_id").to_list() == ["other"]


def test_commit_and_run_totals():
    res = pa.concat_tables([results_rows([0, 1]), results_rows([2], status="flagged")])
    res = res.set_column(res.schema.get_field_index("attempts"), "attempts", pa.array([1, 3, 2], pa.int32()))
    dead = pa.concat_tables([dead_rows([3, 4]), dead_rows([5], stage="validate", error_class="validation_failed")])
    dead = dead.set_column(dead.schema.get_field_index("attempts"), "attempts", pa.array([None, None, 2], pa.int32()))
    totals = CommitTotals.of(res, dead, {TP0: 5}, NOW)
    assert totals.runs_fields() == dict(
        rows_ok=3, rows_flagged=1, rows_dead=3, dead_by_class={"invalid_json": 2, "validation_failed": 1},
        prompt_tokens=9, completion_tokens=12, retries=4,  # (3-1) + (2-1) + (2-1)
        positions={TP0: (0, 5)},
    )  # fmt: skip
    assert totals.dead_by == {("decode", "invalid_json"): 2, ("validate", "validation_failed"): 1}
    from jobs.stats import JobStats

    st = JobStats("r1", ok=4, flagged=1, dead_lettered=0, retried=4, prompt_tokens=50, completion_tokens=20, commits=1)
    st.dead_by_class["invalid_json"] += 1
    st.book(totals)  # the same object the metrics and the runs row take
    st.engine_idle, st.engine_occupancy = 0.25, 0.8
    assert st.runs_fields() == dict(
        commits=2, rows_ok=7, rows_flagged=2, rows_dead=3, dead_by_class={"invalid_json": 3, "validation_failed": 1},
        prompt_tokens=50, completion_tokens=20, retries=4,
        engine={"engine_idle": 0.25, "engine_occupancy": 0.8, "prefix_cache_hit_rate": None},
    )  # fmt: skip


# -- status ----------------------------------------------------------------------------------------


@pytest.fixture
def kafka_job(tmp_path):
    """A job's tables after two commits, a crash window on partition 2, and one recorded run."""
    spec = parse_spec(make_spec(tmp_path))
    sink = DeltaSink(spec.name, spec.sink.results, spec.sink.dead_letter, {})
    sink.open()
    sink.load_positions([TP0, TP1, TP2])
    sink.commit(results_rows([0, 1, 3]), dead_rows([2]), {TP0: 3})
    sink.commit(results_rows([0, 1], partition=1), dead_rows([]), {TP1: 1})
    # A crash between the dead-letter commit and the results commit for partition 2.
    write_deltalake(
        spec.sink.dead_letter,
        dead_rows([0, 1], partition=2, stage="validate", error_class="validation_failed"),
        mode="append",
        commit_properties=CommitProperties(app_transactions=[Transaction(txn_app_id("job", TP2), 1)]),
    )
    runs = RunsTable.for_results(spec.sink.results)
    t0 = datetime.now(timezone.utc) - timedelta(seconds=10)
    runs.append_commit(run_id="r1", job="job", commit_seq=1, started_at=t0, ended_at=t0 + timedelta(seconds=2),
                       rows_ok=3, rows_dead=1, positions={TP0: 3})  # fmt: skip
    runs.append_commit(run_id="r1", job="job", commit_seq=2, started_at=t0 + timedelta(seconds=2),
                       ended_at=t0 + timedelta(seconds=4), rows_ok=2, positions={TP1: 1})  # fmt: skip
    runs.append_commit(run_id="r0", job="job", commit_seq=1, started_at=t0 - timedelta(hours=1),
                       ended_at=t0 - timedelta(hours=1), rows_ok=9)  # fmt: skip
    runs.append_run(run_id="r0", job="job", started_at=t0 - timedelta(hours=1, seconds=5),
                    ended_at=t0 - timedelta(hours=1), status="stopped", commits=1, rows_ok=9)  # fmt: skip
    return spec


def fake_end_offsets(calls=None):
    def end_offsets(bootstrap, topic, consumer_config=None):
        if calls is not None:
            calls.append((bootstrap, topic, consumer_config))
        return {(topic, 0): 10, (topic, 1): 2, (topic, 2): 4, (topic, 3): 0}

    return end_offsets


def end_offsets_from(monkeypatch, fn) -> None:
    """The Kafka source's status reads end offsets with connectors.kafka.kafka_end_offsets."""
    import connectors.kafka

    monkeypatch.setattr(connectors.kafka, "kafka_end_offsets", fn)


def test_collect_status_from_real_tables(kafka_job, tmp_path, monkeypatch):
    spec = kafka_job
    versions = {u: DeltaTable(u).version() for u in (spec.sink.results, spec.sink.dead_letter)}
    runs_version = DeltaTable(default_runs_uri(spec.sink.results)).version()
    calls = []
    end_offsets_from(monkeypatch, fake_end_offsets(calls))
    st = collect_status(spec)
    # The spec's client settings go with it (here: the security section's protocol).
    assert calls == [(["127.0.0.1:1"], T, {"security_protocol": "PLAINTEXT"})]
    by_p = {p["partition"]: p for p in st["partitions"]}
    assert sorted(by_p) == [0, 1, 2, 3]  # from the topic's metadata (the end-offsets answer)
    assert by_p[0] == {"topic": T, "partition": 0, "committed": 3, "next": 4, "end": 10, "lag": 6,
                       "dead_letter_position": 3, "repair_pending": False}  # fmt: skip
    assert (by_p[1]["committed"], by_p[1]["lag"], by_p[1]["dead_letter_position"]) == (1, 0, None)
    assert (by_p[2]["committed"], by_p[2]["next"], by_p[2]["lag"]) == (None, None, 4)
    assert by_p[2]["dead_letter_position"] == 1 and by_p[2]["repair_pending"] is True
    assert (by_p[3]["committed"], by_p[3]["lag"]) == (None, 0)
    assert st["lag_total"] == 10
    assert st["tables"]["results"]["rows"] == 5 and st["tables"]["dead_letter"]["rows"] == 3
    last = datetime.fromisoformat(st["last_commit_at"])
    assert abs((datetime.now(timezone.utc) - last).total_seconds()) < 120
    assert st["dead_letters"] == {
        "total": 3,
        "by_stage_class": [
            {"stage": "validate", "error_class": "validation_failed", "count": 2},
            {"stage": "decode", "error_class": "invalid_json", "count": 1},
        ],
    }
    last_run = st["runs"]["last"]
    assert last_run["run_id"] == "r1" and last_run["status"] == "unfinished" and last_run["commits"] == 2
    assert (last_run["rows_ok"], last_run["rows_dead"]) == (5, 1)
    assert last_run["rows_per_s"] == pytest.approx(6 / 4)
    assert [r["run_id"] for r in st["runs"]["recent"]] == ["r1", "r0"]
    assert st["runs"]["recent"][1]["status"] == "stopped"
    assert st["errors"] == []
    json.dumps(st)  # serialisable as is
    # Read only: no table moved.
    assert {u: DeltaTable(u).version() for u in versions} == versions
    assert DeltaTable(default_runs_uri(spec.sink.results)).version() == runs_version


def test_collect_status_without_tables_or_broker(tmp_path, monkeypatch):
    spec = parse_spec(make_spec(tmp_path))

    def unreachable(bootstrap, topic, consumer_config=None):
        raise RuntimeError("no broker")

    end_offsets_from(monkeypatch, unreachable)
    st = collect_status(spec)
    assert st["partitions"] == [] and st["lag_total"] is None and st["last_commit_at"] is None
    assert not st["tables"]["results"]["exists"] and not st["tables"]["runs"]["exists"]
    assert st["errors"] == ["Kafka end offsets unavailable: no broker"]
    assert not (tmp_path / "lake").exists()  # nothing created


def test_collect_status_falls_back_to_partitions_in_the_tables(kafka_job, monkeypatch):
    end_offsets_from(monkeypatch, lambda b, t, consumer_config=None: {})
    st = collect_status(kafka_job)
    assert [(p["partition"], p["committed"], p["lag"]) for p in st["partitions"]] == [(0, 3, None), (1, 1, None), (2, None, None)]


def test_collect_status_for_a_delta_snapshot_source(tmp_path):
    src = str(tmp_path / "source")
    write_deltalake(src, pa.table({"id": ["a", "b", "c", "d", "e"], "q": ["1", "2", "3", "4", "5"]}))  # version 0
    spec = parse_spec(make_spec(tmp_path, source={"delta": {"uri": src, "mode": "snapshot"}}))
    sink = DeltaSink(spec.name, spec.sink.results, spec.sink.dead_letter, {}, source_kind="delta")
    sink.open()
    sink.load_positions([(src, 0), (src, -1)])
    sink.commit(results_rows([0, 1, 2], partition=0, topic=src), dead_rows([]), {(src, 0): 2, (src, -1): 0})
    st = collect_status(spec)
    assert st["source"] == {"kind": "delta", "uri": src, "mode": "snapshot"}
    assert st["partitions"] == [{"topic": src, "partition": 0, "committed": 2, "next": 3, "end": 5, "lag": 2,
                                 "dead_letter_position": None, "repair_pending": False}]  # fmt: skip
    assert st["versions_behind"] == 0
    write_deltalake(src, pa.table({"id": ["f"], "q": ["6"]}), mode="append")  # version 1
    st = collect_status(spec)
    assert st["versions_behind"] == 1 and st["partitions"][0]["partition"] == 0  # the snapshot stays
    inc = parse_spec(make_spec(tmp_path, source={"delta": {"uri": src, "mode": "incremental"}}))
    st = collect_status(inc)
    assert [(p["partition"], p["committed"]) for p in st["partitions"]] == [(0, 2), (1, None)]


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_render_status_prints_partition_rows(kafka_job, monkeypatch):
    end_offsets_from(monkeypatch, fake_end_offsets())
    st = collect_status(kafka_job)
    console = Console(record=True, width=200, color_system=None)
    render_status(st, console)
    text = console.export_text()
    assert "tidegate status: job" in text
    # partition | committed | next | end | lag | dead-letter pos | repair pending
    assert _table_rows(text, "0") == [["0", "3", "4", "10", "6", "3", "no"]]
    assert _table_rows(text, "2") == [["2", "-", "-", "4", "4", "1", "yes"]]
    assert _table_rows(text, "3") == [["3", "-", "-", "0", "0", "-", "no"]]
    assert _table_rows(text, "validate")[0][1:] == ["validation_failed", "2"]
    assert _table_rows(text, "r1")[0][1] == "unfinished"
    assert _table_rows(text, "r0")[0][1] == "stopped"


def test_status_cli_json(kafka_job, tmp_path, monkeypatch):
    from jobs.cli import app

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(kafka_job.model_dump(mode="json", by_alias=True)))
    calls = []
    end_offsets_from(monkeypatch, fake_end_offsets(calls))
    result = CliRunner().invoke(app, ["status", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(p["partition"], p["lag"]) for p in out["partitions"]] == [(0, 6), (1, 0), (2, 4), (3, 0)]
    assert out["job"] == "job" and out["dead_letters"]["total"] == 3
    # The default path passes the spec's client settings (here: the security section's protocol).
    security = getattr(kafka_job.source.kafka, "security", None)
    expected = security.client_config() if security is not None else {}
    assert calls[0][:2] == (["127.0.0.1:1"], T) and calls[0][2] == expected
    table = CliRunner().invoke(app, ["status", str(spec_path)])
    assert table.exit_code == 0 and "positions (Delta) and lag" in table.stdout
    bad = CliRunner().invoke(app, ["status", str(tmp_path / "missing.yaml"), "--json"])
    assert bad.exit_code == 2 and "cannot read job spec" in bad.output


# -- JSON logs -------------------------------------------------------------------------------------


def test_redaction_masks_secret_values_only():
    text = "cfg sasl_plain_password=hunter2 ssl_password: 'p w' api_key=\"k1\" max_tokens=64 prompt_tokens: 5 token=abc"
    assert redact_text(text) == (
        "cfg sasl_plain_password=*** ssl_password: '***' api_key=\"***\" max_tokens=64 prompt_tokens: 5 token=***"
    )
    assert redact_text(str({"password": "x1", "secret": "x2", "user": "bob"})) == (
        "{'password': '***', 'secret': '***', 'user': 'bob'}"
    )
    assert redact_value({"a": {"AWS_SECRET_ACCESS_KEY": "s", "sas_token": "t", "region": "eu"}, "b": ["token=z"]}) == {
        "a": {"AWS_SECRET_ACCESS_KEY": "***", "sas_token": "***", "region": "eu"},
        "b": ["token=***"],
    }


def test_redaction_of_master_keys_url_credentials_and_authorization():
    masked = {
        "export TIDEGATE_MASTER_KEY=q9Xk2b64secret==": "export TIDEGATE_MASTER_KEY=***",
        "env {'TIDEGATE_MASTER_KEY': 'q9Xk', 'NOTEBOOK_MASTER_KEY': 'n0tebook'}":
            "env {'TIDEGATE_MASTER_KEY': '***', 'NOTEBOOK_MASTER_KEY': '***'}",
        "encryption: {master_key: q9Xk}": "encryption: {master_key: ***}",
        '{"master_key": "q9Xk"}': '{"master_key": "***"}',
        "reading s3://AKIAEXAMPLE:wJalrXUtn/K7MDENG@minio:9000/lake/results": "reading s3://***@minio:9000/lake/results",
        "GET https://alice:pa55w0rd@example.com/x failed": "GET https://***@example.com/x failed",
        "clone https://ghp_tok3n@github.com/o/r": "clone https://***@github.com/o/r",
        "headers Authorization: Bearer eyJhbGciOi.J9.sig": "headers Authorization: Bearer ***",
        "{'Authorization': 'Basic dXNlcjpwYXNz', 'Accept': 'json'}": "{'Authorization': 'Basic ***', 'Accept': 'json'}",
        "proxy-authorization=Basic dXNlcjpwYXNz": "proxy-authorization=Basic ***",
        "AUTHORIZATION: abc123": "AUTHORIZATION: ***",
        "retrying with Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig": "retrying with Bearer ***",
    }
    for text, want in masked.items():
        assert redact_text(text) == want, text
        assert redact_text(want) == want  # masking twice changes nothing
    assert redact_value({"Authorization": "Bearer short", "tidegate_master_key": "k"}) == {
        "Authorization": "***", "tidegate_master_key": "***"}  # fmt: skip
    # Ordinary words, ids and URLs stay as they are.
    for text in (
        "max_tokens=64 prompt_tokens: 5 tokens=3",
        "master_key_id=local:5f0c9e1a2b3c4d5e master_key_env=TIDEGATE_MASTER_KEY",
        "results s3://lake/triage/results and https://example.com/a?mail=bob@example.com",
        "kafka bootstrap kafka://broker:9092, user bob@example.com",
        "Basic validation failed: the bearer of the request",
        "keys export --to-master-key-env NOTEBOOK_MASTER_KEY",
    ):
        assert redact_text(text) == text


def _log_a_secret_traceback(log: logging.Logger) -> None:
    def connect():
        raise ConnectionError("cannot reach s3://AKIAEXAMPLE:tb-secret-1@minio/lake with password=tb-secret-2")

    try:
        connect()
    except ConnectionError:
        log.exception("commit failed, token=%s", "arg-secret-3")


def test_text_logging_redacts_messages_args_and_tracebacks(monkeypatch):
    from jobs.run import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        configure_logging()  # what `tidegate run` (text mode), `dlq replay` and the demo use
        assert len(root.handlers) == 1 and redact in root.handlers[0].filters
        handler = configure_text_logging("DEBUG", stream=stream)
        assert redact in handler.filters and root.handlers == [handler]
        log = logging.getLogger("jobs.pipeline")
        log.info("consumer config %s", {"sasl_plain_password": "hunter2", "bootstrap_servers": "b:9092"})
        log.warning("env TIDEGATE_MASTER_KEY=%s url %s max_tokens=%d", "mk-secret", "https://u:url-secret@h/x", 64)
        log.info("headers %s", {"Authorization": "Bearer hdr-secret-123456"}, extra={"api_key": "k9"})
        _log_a_secret_traceback(log)
        log.info("where am I", stack_info=True)  # the stack shows this line: token=stack-secret-4
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    out = stream.getvalue()
    for secret in ("hunter2", "mk-secret", "url-secret", "hdr-secret", "tb-secret-1", "tb-secret-2", "arg-secret-3",
                   "stack-secret-4"):  # fmt: skip
        assert secret not in out, secret
    assert "env TIDEGATE_MASTER_KEY=*** url https://***@h/x max_tokens=64" in out
    assert "Traceback (most recent call last)" in out and "in connect" in out  # the traceback is still there
    assert "ConnectionError: cannot reach s3://***@minio/lake with password=***" in out
    assert "commit failed, token=***" in out and "Stack (most recent call last)" in out


def test_redact_filter_leaves_no_live_exception_to_render_again():
    try:
        raise RuntimeError("password=live-secret")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert redact.filter(rec) is True
    assert rec.exc_info is None and "RuntimeError: password=***" in rec.exc_text
    for fmt in (logging.Formatter(), JsonLogFormatter()):  # any formatter prints the masked text
        assert "live-secret" not in fmt.format(rec) and "password=***" in fmt.format(rec)


def test_json_log_formatter_and_redaction():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        handler = configure_json_logging("DEBUG", run_id="run-7", stream=stream)
        assert redact in handler.filters and root.handlers == [handler]
        log = logging.getLogger("jobs.pipeline")
        log.info("consumer config %s", {"sasl_plain_password": "hunter2", "bootstrap_servers": "b:9092"})
        log.warning("retry with password=%s token: %s max_tokens=%d", "pw1", "tok2", 64)
        with log_context(batch_id=7):
            log.info("batch done", extra={"rows": 5, "api_key": "k9"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("commit failed", extra={"batch_id": 8})
        logging.getLogger("kafka.conn").info("suppressed")  # noisy library: WARNING and above only
        _log_a_secret_traceback(log)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    out = stream.getvalue()
    for secret in ("hunter2", "pw1", "tok2", "k9", "tb-secret-1", "tb-secret-2", "arg-secret-3"):
        assert secret not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5
    a, b, c, d, e = lines
    assert set(a) >= {"ts", "level", "logger", "message", "run_id", "batch_id"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", a["ts"])
    assert (a["level"], a["logger"], a["run_id"], a["batch_id"]) == ("INFO", "jobs.pipeline", "run-7", None)
    assert a["message"] == "consumer config {'sasl_plain_password': '***', 'bootstrap_servers': 'b:9092'}"
    assert b["message"] == "retry with password=*** token: *** max_tokens=64" and b["level"] == "WARNING"
    assert (c["message"], c["batch_id"], c["rows"], c["api_key"]) == ("batch done", 7, 5, "***")
    assert d["batch_id"] == 8 and d["level"] == "ERROR" and "ValueError: boom" in d["exc"]
    assert e["message"] == "commit failed, token=***" and "in connect" in e["exc"]
    assert "ConnectionError: cannot reach s3://***@minio/lake with password=***" in e["exc"]


def test_json_formatter_alone_uses_context_and_default_run_id():
    fmt = JsonLogFormatter(run_id="default-run")
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    assert json.loads(fmt.format(rec))["run_id"] == "default-run"
    with log_context(run_id="ctx-run", batch_id="b1"):
        line = json.loads(fmt.format(rec))
    assert (line["message"], line["run_id"], line["batch_id"]) == ("hello you", "ctx-run", "b1")
    assert json.loads(fmt.format(rec))["batch_id"] is None  # the context ended


@pytest.mark.slow
def test_metric_objects_belong_to_one_ray_session():
    """A process that shuts Ray down and starts it again (a notebook between two runs) gets new
    metric objects, and between the two no job believes it exports (a real local Ray, twice)."""
    import tempfile

    import ray

    def start():
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tgray", dir="/tmp"))

    start()
    try:
        assert M.JobMetrics("job", "run1", "kafka").exporting
        first = M._ray_metric_objects()["tidegate_rows_in_total"]
    finally:
        ray.shutdown()
    assert not M.JobMetrics("job", "run2", "kafka").exporting
    start()
    try:
        m = M.JobMetrics("job", "run3", "kafka")
        assert m.exporting and M._ray_metric_objects()["tidegate_rows_in_total"] is not first
        m.rows_in(3)  # records through the new session's objects
        assert m.value("tidegate_rows_in_total") == 3
    finally:
        ray.shutdown()
