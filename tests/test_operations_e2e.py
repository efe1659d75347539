"""Monitoring and run history end to end: a real job (tansu, Ray, vLLM, Delta), its real Prometheus
endpoint, `tidegate status` mid-way, the runs table and the lineage columns afterwards."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request

import polars as pl
import pytest

from compute.lineage import model_revision, sampling_json, spec_hash, template_hash
from connectors.broker import free_port
from jobs.metrics import EXPORT_PREFIX, METRIC_NAMES, dashboard_metric_names
from schemas.spec import parse_spec
from tests.conftest import REPO, event, make_spec, send, table_rows, wait_for, write_spec

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Samples of the tidegate metrics on a Prometheus text endpoint: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_tidegate_\w+)(?:\{(.*)\})? ([-+0-9.eE]+|NaN)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_metrics_status_runs_and_lineage_of_a_real_job(tmp_path, broker, topic, tiny_model, job_processes):
    n_ok, bad = 90, [b'{"id": "x1", "question": ', b"[1, 2]"]
    records = [event(i) for i in range(n_ok)] + [(None, b) for b in bad]
    send(broker, topic, records)
    port = free_port()
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{
            "ray.metrics_export_port": port,
            # Never satisfied: every output is retried once, then flagged, so the counts are known.
            "validation": [
                {"rule": "regex", "must_match": ["^NEVER$"], "on_fail": "retry", "max_attempts": 2, "then": "flag"}
            ],
        },
    )  # fmt: skip
    spec_path = write_spec(tmp_path, spec)
    job = job_processes(spec_path, until_drained=False)  # a long-running consumer, stopped by SIGTERM below
    res_uri, dl_uri = spec["sink"]["results"], spec["sink"]["dead_letter"]
    wait_for(lambda: table_rows(res_uri) + table_rows(dl_uri) == len(records) or job.proc.poll() is not None,
             300, what="every record committed")  # fmt: skip
    assert job.proc.poll() is None, job.log()[-3000:]

    # `tidegate status` mid-way (the job is still running): positions, zero lag, dead letters.
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "status", str(spec_path), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout)
    parts = {p["partition"]: p for p in status["partitions"]}
    res = pl.read_delta(res_uri)
    dead = pl.read_delta(dl_uri)
    last = pl.concat([res.select("source_partition", "source_offset"), dead.select("source_partition", "source_offset")])
    expected_last = dict(last.group_by("source_partition").agg(pl.col("source_offset").max()).iter_rows())
    assert {p: v["committed"] for p, v in parts.items() if v["committed"] is not None} == expected_last
    assert all(v["lag"] == 0 for v in parts.values()) and status["lag_total"] == 0
    assert status["dead_letters"]["total"] == 2

    # The real metrics endpoint: every metric the dashboard queries exists, with the known values
    # (source_versions_behind is the Delta sources' lag: a Kafka job does not export it).
    queried = dashboard_metric_names(REPO / "deploy" / "grafana" / "tidegate.json")
    # Every metric a Kafka job without sink.topic records (Delta sources' versions behind and
    # published rows are not among them).
    kafka_metrics = {EXPORT_PREFIX + m for m in METRIC_NAMES} - {"ray_tidegate_source_versions_behind",
                                                                 "ray_tidegate_published_rows_total"}  # fmt: skip
    assert queried == {EXPORT_PREFIX + m for m in METRIC_NAMES}

    def names_of(s):
        return {n for n, _ in s} | {re.sub(r"_(bucket|sum|count)$", "", n) for n, _ in s}

    seen: dict = {}

    def ready():
        s = seen["last"] = scrape(port)
        done = total(s, "ray_tidegate_rows_out_total") == n_ok and kafka_metrics <= names_of(s)
        return s if done and total(s, "ray_tidegate_partition_lag") == 0 else None

    try:
        samples = wait_for(ready, 90, interval=2, what="metrics exported")
    except AssertionError:
        s = seen.get("last", {})
        raise AssertionError(
            f"rows out {total(s, 'ray_tidegate_rows_out_total')} of {n_ok}, lag {total(s, 'ray_tidegate_partition_lag')}, "
            f"missing {sorted(kafka_metrics - names_of(s))}"
        ) from None
    assert total(samples, "ray_tidegate_rows_in_total") == len(records)
    assert total(samples, "ray_tidegate_rows_out_total", status="flagged") == n_ok
    assert total(samples, "ray_tidegate_dead_letters_total", stage="decode", error_class="invalid_json") == 1
    assert total(samples, "ray_tidegate_dead_letters_total", stage="decode", error_class="not_an_object") == 1
    assert total(samples, "ray_tidegate_validation_failures_total", rule="regex") == 2 * n_ok
    assert total(samples, "ray_tidegate_retries_total") == n_ok
    # Token counters count every generation; the result rows hold the last one (attempt 2).
    assert total(samples, "ray_tidegate_prompt_tokens_total") > res["prompt_tokens"].sum()
    assert total(samples, "ray_tidegate_completion_tokens_total") >= res["completion_tokens"].sum()
    assert (res["attempts"] == 2).all()
    assert total(samples, "ray_tidegate_live_actors") == 1
    assert total(samples, "ray_tidegate_commit_latency_seconds_count") >= 1
    assert total(samples, "ray_tidegate_batch_latency_seconds_count") >= 1
    assert all(lab and dict(lab).get("job") == spec["name"] for (n, lab) in samples)

    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(120) == 0, job.log()[-3000:]

    # Runs table: one row per commit adding up to the run's row, which says how the run ended.
    runs = pl.read_delta(str(tmp_path / "lake" / "runs"))
    commits, run = runs.filter(pl.col("kind") == "commit"), runs.filter(pl.col("kind") == "run")
    assert run.height == 1 and run["status"][0] == "stopped" and run["error"][0] is None
    assert commits["rows_ok"].sum() == run["rows_ok"][0] == n_ok == run["rows_flagged"][0]
    assert commits["rows_dead"].sum() == run["rows_dead"][0] == 2
    assert run["commit_seq"][0] == commits.height and sorted(commits["commit_seq"].to_list()) == list(range(1, commits.height + 1))
    assert run["prompt_tokens"][0] == total(samples, "ray_tidegate_prompt_tokens_total")
    assert run["retries"][0] == n_ok

    # Lineage on every result row: model, its revision, template, sampling, spec.
    parsed = parse_spec(spec)
    res = pl.read_delta(res_uri)
    assert (res["model_path"] == str(tiny_model)).all()
    assert (res["model_revision"] == model_revision(tiny_model)).all() and res["model_revision"][0].startswith("sha256:")
    assert (res["prompt_template_hash"] == template_hash(parsed.prompt.template)).all()
    assert (res["sampling_params"] == sampling_json(parsed)).all()
    assert (res["spec_hash"] == spec_hash(parsed)).all() and (res["spec_hash"] == run["spec_hash"][0]).all()


def test_worker_processes_log_through_the_same_redaction(tmp_path, broker, topic, tiny_model, job_processes):
    """A line with secrets logged inside an engine actor's process (tests/job_runner.py
    --engine-logs) is masked in the worker's own log file under the job's Ray folder and in what
    Ray forwards to the job's output: the workers run jobs/logs.py's hook (worker_process_setup_hook)."""
    from pathlib import Path

    secrets = ("hunter2-canary-771", "canarysecret993", "canarypass55")
    line = (f"sasl_plain_password={secrets[0]} Authorization: Bearer tg_k1_{secrets[1]} "
            f"source=s3://AKIAUSER:{secrets[2]}@lake.example/bucket")  # fmt: skip
    send(broker, topic, [event(i) for i in range(10)])
    spec = make_spec(tmp_path, broker, topic, tiny_model)
    job = job_processes(write_spec(tmp_path, spec), module="tests.job_runner",
                        extra_args=("--instant-engine", "--engine-logs", line))  # fmt: skip
    assert job.wait(300) == 0, job.log()[-3000:]
    assert "engine settings: sasl_plain_password=***" in job.log()  # the line came through, masked
    seen_in_a_worker_file = False
    for f in Path(job.ray_tmp).rglob("*"):
        if f.is_file() and not f.is_symlink():
            text = f.read_bytes()
            assert not any(s.encode() in text for s in secrets), f
            seen_in_a_worker_file |= f.name.startswith("worker-") and b"engine settings: sasl_plain_password=***" in text
    assert seen_in_a_worker_file
    assert not any(s in job.log() for s in secrets)
