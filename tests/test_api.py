"""`import tidegate`: the Python API notebooks use (tidegate/api.py), and cost accounting
(model.pricing, the runs table's cost column, `tidegate usage`).

The end-to-end test runs a real job from the API (embedded-style broker, the tiny vLLM model, a
local Ray) in the background, stops a second one with `handle.stop()`, and reads everything back
through the API: results decrypted with the spec's keyring, a tenant-only keyring, dead letters,
runs with their cost, usage by run, day and tenant, the status, and the `usage` CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

import tidegate
from tests.conftest import REPO, event, make_spec, send, wait_for, write_spec

NO_BROKER = SimpleNamespace(bootstrap_servers="127.0.0.1:9")  # specs that are only parsed, never run
PRICING = {"prompt_per_1k": 0.5, "completion_per_1k": 1.5, "currency": "EUR"}


def _spec_dict(tmp_path, broker, topic, model, **kw):
    return make_spec(tmp_path, broker, topic, model, **{"model.pricing": PRICING, **kw})


# -- pure: pricing and usage over a runs table on disk (no Ray) ---------------------------------------


def test_token_cost_and_pricing_spec_errors(tmp_path):
    from compute.pricing import cost_fields, token_cost
    from schemas.spec import PricingSpec

    p = PricingSpec(prompt_per_1k=0.5, completion_per_1k=1.5)
    assert token_cost(p, 2000, 1000) == 2.5 and token_cost(None, 2000, 1000) is None
    assert cost_fields(p, 0, 0) == {"cost": 0.0, "currency": "USD"}
    with pytest.raises(tidegate.SpecError, match="model.pricing.prompt_per_1k"):
        tidegate.parse_spec(make_spec(tmp_path, NO_BROKER, "t", tmp_path, **{"model.pricing": {"prompt_per_1k": -1, "completion_per_1k": 1}}))
    with pytest.raises(tidegate.SpecError, match="model.pricing.currency"):
        tidegate.parse_spec(make_spec(tmp_path, NO_BROKER, "t", tmp_path, **{"model.pricing": {**PRICING, "currency": "euro"}}))


def test_usage_by_run_and_day_from_recorded_and_current_prices(tmp_path):
    """Recorded costs are kept (priced when incurred); rows without one are priced now."""
    from connectors.runs import RunsTable
    from jobs.usage import usage_frame

    spec = tidegate.parse_spec(_spec_dict(tmp_path, NO_BROKER, "t", tmp_path))
    runs = RunsTable.for_results(spec.sink.results)
    day1 = datetime(2026, 12, 1, 23, 0, tzinfo=timezone.utc)
    # run a: two commits across midnight, recorded at an older price (1.0 EUR per 1k prompt tokens)
    runs.append_commit(run_id="a", job=spec.name, commit_seq=1, started_at=day1, ended_at=day1 + timedelta(minutes=30),
                       rows_ok=10, prompt_tokens=1000, completion_tokens=0, cost=1.0, currency="EUR")  # fmt: skip
    runs.append_commit(run_id="a", job=spec.name, commit_seq=2, started_at=day1, ended_at=day1 + timedelta(hours=2),
                       rows_ok=5, rows_dead=1, prompt_tokens=500, completion_tokens=0, cost=0.5, currency="EUR")  # fmt: skip
    # run b: written before pricing was set (no cost): priced with the spec's prices now
    runs.append_commit(run_id="b", job=spec.name, commit_seq=1, started_at=day1 + timedelta(days=1),
                       ended_at=day1 + timedelta(days=1, minutes=5), rows_ok=4, prompt_tokens=2000,
                       completion_tokens=1000)  # fmt: skip
    # run d ended: its run row (every generation, 10% more tokens here) counts, not its commits
    runs.append_commit(run_id="d", job=spec.name, commit_seq=1, started_at=day1 + timedelta(days=2),
                       ended_at=day1 + timedelta(days=2, minutes=1), rows_ok=3, prompt_tokens=1000,
                       completion_tokens=0, cost=0.5, currency="EUR")  # fmt: skip
    runs.append_run(run_id="d", job=spec.name, started_at=day1 + timedelta(days=2), status="finished", commits=1,
                    ended_at=day1 + timedelta(days=2, minutes=2), rows_ok=3, prompt_tokens=1100, completion_tokens=0,
                    cost=0.55, currency="EUR")  # fmt: skip
    runs.append_commit(run_id="c", job="another-job", commit_seq=1, started_at=day1, ended_at=day1,
                       rows_ok=99, prompt_tokens=99, completion_tokens=99, cost=9.9, currency="EUR")  # fmt: skip

    by_run = usage_frame(spec, "run")
    assert by_run.select("run_id", "rows", "prompt_tokens", "cost", "currency", "priced", "counted_from").rows() == [
        ("a", 16, 1500, 1.5, "EUR", "recorded", "commits"),
        ("b", 4, 2000, 2.5, "EUR", "current_prices", "commits"),
        ("d", 3, 1100, 0.55, "EUR", "recorded", "run"),
    ]
    by_day = usage_frame(spec, "day")
    assert [(str(d), r, c) for d, r, c in by_day.select("day", "rows", "cost").rows()] == [
        ("2026-12-01", 10, 1.0), ("2026-12-02", 6 + 4, 0.5 + 2.5), ("2026-12-03", 3, 0.5)]  # day 2: one recorded, one priced now
    assert by_day["priced"].to_list() == ["recorded", "mixed", "recorded"]
    # Without model.pricing, an unpriced row makes its group's cost unknown (null), not partial.
    unpriced = tidegate.parse_spec({**_spec_dict(tmp_path, NO_BROKER, "t", tmp_path), "name": spec.name,
                                    "model": {"path": str(tmp_path)}})  # fmt: skip
    assert usage_frame(unpriced, "run").select("cost", "priced").rows() == [(1.5, "recorded"), (None, "none"), (0.55, "recorded")]
    with pytest.raises(tidegate.SpecError, match="by must be one of run, day, tenant"):
        usage_frame(spec, "week")
    # No table yet: empty frames with the columns.
    empty = tidegate.parse_spec(_spec_dict(tmp_path / "none", NO_BROKER, "t", tmp_path))
    assert usage_frame(empty, "run").is_empty() and usage_frame(empty, "tenant").columns[:2] == ["tenant", "rows"]


# -- end to end --------------------------------------------------------------------------------------


@pytest.fixture
def local_ray(monkeypatch):
    """The API starts a local Ray in this process (as in a notebook); shut down after the test."""
    import tempfile

    monkeypatch.setenv("TIDEGATE_RAY_TEMP_DIR", tempfile.mkdtemp(prefix="tgray", dir="/tmp"))
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_a_job_from_the_api_in_the_background_then_read_back(tmp_path, broker, topic, tiny_model, monkeypatch, local_ray):
    from crypto.keyring import Keyring, LocalMasterKeyProvider

    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    keyring_path = tmp_path / "keys" / "keyring.json"
    kr = Keyring.init(keyring_path, LocalMasterKeyProvider())
    kr.create_tenant("acme")
    kr.create_tenant("globex")
    spec_path = write_spec(tmp_path, _spec_dict(
        tmp_path, broker, topic, tiny_model,
        encryption={"keyring": str(keyring_path), "tenant_field": "tenant", "tenant": "acme", "input_fields": ["question"]},
    ))  # fmt: skip
    spec = tidegate.load_spec(spec_path)
    assert spec.source_path == str(spec_path)

    # Produce through the API's producer: 30 good events of two tenants; 2 without an id.
    tenants = {f"e{i:06d}": ("acme" if i % 3 else "globex") for i in range(30)}
    with tidegate.EventProducer.from_spec(spec) as producer:
        producer.send_many([json.loads(event(i, tenant=tenants[f"e{i:06d}"])[1]) for i in range(30)])
    send(broker, topic, [(b"x", json.dumps({"user": "u", "question": "no id", "tenant": "acme"}).encode())] * 2)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tidegate.Job(spec).run(until_drained=True)
    assert not run.done and run.state in ("starting", "running")  # returned at once: the run is in the background
    stats = run.wait(timeout=600)
    # Tidegate installed no handler (a local Ray's ray.init sets its own SIGTERM one in the driver).
    assert signal.getsignal(signal.SIGINT) == handlers[0]
    assert "run_job" not in getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")
    assert run.state == "finished" and (stats.ok, stats.dead_lettered) == (30, 2)
    progress = run.progress
    assert (progress.written, progress.dead_lettered, progress.rows_committed) == (30, 2, 32) and progress.commits >= 1
    assert "finished" in repr(run) and "rows written" in run.summary.getvalue()  # quiet: the summary is kept
    from compute.lineage import model_files

    weights = sum(p.stat().st_size for p in model_files(tiny_model))
    assert progress.model_hashed == (weights, weights)  # the engine hashed the model; the handle saw it end

    # Results: decrypted with the spec's own keyring (its master key variable), filtered lazily.
    results = tidegate.read_results(spec)
    assert sorted(results["id"].to_list()) == sorted(tenants)
    assert all(q.startswith("what is the status of order") for q in results["input_question"].to_list())
    globex_only = kr.export(tmp_path / "keys" / "globex.json", ["globex"], same_master_key=True)
    mine = tidegate.read_results(spec, keyring=globex_only, where=pl.col("tenant") == "globex", columns=["id", "input_question"])
    assert sorted(mine["id"].to_list()) == sorted(i for i, t in tenants.items() if t == "globex")
    with pytest.raises(tidegate.KeyPermissionError, match="acme"):
        tidegate.read_results(spec, keyring=globex_only)
    # Plain columns need no key: read even where the keyring file is not (an analyst's machine).
    keyring_path.rename(keyring_path.with_suffix(".away"))
    assert tidegate.read_results(spec, columns=["id", "status"]).height == 30
    with pytest.raises(tidegate.KeyringError, match="does not exist"):
        tidegate.read_results(spec, columns=["id", "input_question"])
    keyring_path.with_suffix(".away").rename(keyring_path)
    dead = tidegate.read_dead_letters(spec, columns=["stage", "error_class"])
    assert dead.height == 2 and set(dead["error_class"]) == {"missing_id"}

    # Cost: every runs-table row priced; the run row's cost is its tokens at model.pricing.
    from compute.pricing import token_cost

    (run_row,) = tidegate.read_runs(spec, kind="run").to_dicts()
    assert run_row["run_id"] == run.run_id and run_row["status"] == "finished" and run_row["currency"] == "EUR"
    assert run_row["prompt_tokens"] > 0 and run_row["cost"] == pytest.approx(
        token_cost(spec.model.pricing, run_row["prompt_tokens"], run_row["completion_tokens"]))
    commits = tidegate.read_runs(spec, kind="commit")
    assert commits["cost"].null_count() == 0 and commits["rows_ok"].sum() == 30

    # A second run, not drained: stopped from the API mid-stream, then a third drains the rest.
    send(broker, topic, [event(i, tenant="acme") for i in range(100, 400)])
    run2 = tidegate.Job(spec).run(until_drained=False)
    wait_for(lambda: run2.progress.commits >= 1 and run2.progress.backlog is not None, timeout=300,
             what="a commit and a backlog measure of the second run")  # fmt: skip
    assert 0 <= run2.progress.backlog <= 300
    run2.stop(timeout=300)
    assert run2.state == "stopped"
    tidegate.Job(spec).run(until_drained=True, wait=True).wait()
    ids = tidegate.read_results(spec, columns=["id"])["id"].to_list()
    assert len(ids) == len(set(ids)) == 330  # each input exactly once across the stop

    by_run = tidegate.usage(spec, by="run")
    assert by_run.height == 3 and by_run["rows"].sum() == 332 and set(by_run["priced"]) == {"recorded"}
    assert set(by_run["counted_from"]) == {"run"}  # each run wrote its run row
    assert by_run["cost"].sum() == pytest.approx(tidegate.read_runs(spec, kind="run")["cost"].sum())
    by_tenant = tidegate.usage(spec, by="tenant")
    counts = dict(zip(by_tenant["tenant"], by_tenant["rows"]))
    assert counts == {"acme": 20 + 300, "globex": 10}
    assert set(by_tenant["priced"]) == {"current_prices"} and by_tenant["cost"].min() > 0
    assert tidegate.usage(spec, by="day")["rows"].sum() == 332

    status = tidegate.status(spec)
    assert status["job"] == spec.name and status["lag_total"] == 0

    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "usage", str(spec_path), "--by", "tenant", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert {json.loads(line)["tenant"]: json.loads(line)["rows"] for line in cli.stdout.splitlines()} == counts
    table = subprocess.run([sys.executable, "-m", "jobs.cli", "usage", str(spec_path)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert table.returncode == 0 and "usage by run" in table.stdout and "EUR" in table.stdout


def test_stream_status_line_says_where_a_kafka_run_is():
    """The live line `tidegate run` shows on a terminal for a Kafka source (pure: a stats object)."""
    import io

    from rich.console import Console

    from jobs.run import _StreamStatus
    from jobs.stats import JobStats

    stats = JobStats("r1", consumed=1500, ok=1180, dead_lettered=20, commits=7, backlog=300)
    stats.started -= 10.0  # ten seconds in
    line = _StreamStatus(Console(file=io.StringIO()))
    line.job = SimpleNamespace(stats=stats)
    text = line._line().plain
    assert text.startswith("consumed 1,500 · committed 1,200 (20 dead letters) · backlog 300 · 120.0 rows/s"), text
    stats.backlog = None
    assert "backlog ? ·" in line._line().plain


@pytest.mark.slow
def test_tidegate_run_keeps_engine_and_ray_logs_in_their_files_by_default(tmp_path, broker, topic, tiny_model,
                                                                          job_processes):  # fmt: skip
    """A quiet terminal: the engines' warnings (vLLM's seed, eager mode, Triton, ...) and Ray's
    token-auth notice are in Ray's log folder, which the summary names; the dtype advice is said
    once in our words (a bf16 model on CPUs without bf16 instructions)."""
    import re
    import shutil as _shutil

    from compute.engine import BF16_CPU_FLAGS

    bf16_model = tmp_path / "bf16-model"
    _shutil.copytree(tiny_model, bf16_model)
    config = json.loads((bf16_model / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"  # the weights stay float32; vLLM casts them (dtype: auto)
    (bf16_model / "config.json").write_text(json.dumps(config))
    send(broker, topic, [event(i) for i in range(10)])
    spec = write_spec(tmp_path, make_spec(tmp_path, broker, topic, bf16_model, **{"model.dtype": "auto"}))
    job = job_processes(spec, env_overrides={"TIDEGATE_VERBOSE": "0"})
    assert job.wait(300) == 0, job.log()[-4000:]
    out = job.log()
    assert "EngineWorker" not in out and "Enforce eager" not in out and "Token authentication" not in out, out[-3000:]
    m = re.search(r"engine and Ray logs: (\S+) \(--verbose shows them here\)", out)  # the log line
    assert m, out[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in Path(m.group(1)).glob("worker-*"))
    assert "Enforce eager" in logs  # vLLM's own warnings are kept, in Ray's worker logs
    cpu_has_bf16 = any(f in Path("/proc/cpuinfo").read_text().split() for f in BF16_CPU_FLAGS)
    assert out.count("this machine's CPUs have no bf16 instructions") == (0 if cpu_has_bf16 else 1), out[-3000:]


def test_submit_needs_a_spec_file(tmp_path):
    spec = tidegate.parse_spec(make_spec(tmp_path, NO_BROKER, "t", tmp_path))
    with pytest.raises(tidegate.SpecError, match="built from a mapping"):
        tidegate.submit(spec, address="http://127.0.0.1:1")
