"""Ray job submission against a real head started by the test (`ray start --head --block`)."""

from __future__ import annotations

import os
import subprocess

import polars as pl
import pytest

from tests.conftest import BIN, REPO, event, make_spec, send, table_rows, tidegate_cli, wait_for, write_spec

pytestmark = pytest.mark.slow


def test_tidegate_submit_runs_the_spec_on_the_cluster(tmp_path, broker, topic, tiny_model, ray_head):
    address, env = ray_head.dashboard, ray_head.env
    send(broker, topic, (event(i) for i in range(50)))
    spec = make_spec(tmp_path, broker, topic, tiny_model)
    spec_path = write_spec(tmp_path, spec)  # outside the repo: it must travel with the job

    out = tidegate_cli(["submit", str(spec_path), "--address", address, "--until-drained", "--wait",
                        "--submission-id", "tg-submit-1"], env)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tg-submit-1: SUCCEEDED" in out.stdout

    res = pl.read_delta(spec["sink"]["results"])
    assert sorted(res["id"].to_list()) == [f"e{i:06d}" for i in range(50)]

    listing = tidegate_cli(["jobs", "list", "--address", address], env, 60)
    assert "tg-submit-1" in listing.stdout and "SUCCEEDED" in listing.stdout
    assert tidegate_cli(["jobs", "status", "tg-submit-1", "--address", address], env, 60).stdout.strip() == "SUCCEEDED"
    logs = tidegate_cli(["jobs", "logs", "tg-submit-1", "--address", address], env, 60).stdout
    assert "every partition is consumed to its end and committed" in logs
    # A job id the cluster does not know: one line, exit 2 (before stop 44: a RuntimeError traceback).
    for verb in ("status", "logs", "stop"):
        out = tidegate_cli(["jobs", verb, "no-such-job", "--address", address], env, 60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr
        assert f"error: the Ray job API at {address} answered 404" in out.stderr, out.stderr


def test_the_job_api_refuses_calls_without_the_token(ray_head, tmp_path):
    address, env = ray_head.dashboard, ray_head.env
    # RAY_AUTH_MODE=disabled: Ray's client would otherwise send a token of its own (~/.ray/auth_token).
    without = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"RAY_AUTH_MODE": "disabled"}
    out = tidegate_cli(["jobs", "list", "--address", address], without, 60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "requires its token (token authentication); RAY_AUTH_TOKEN is not set" in out.stderr
    wrong = dict(without, RAY_AUTH_TOKEN="not-the-token")
    out = tidegate_cli(["jobs", "list", "--address", address], wrong, 60)
    assert out.returncode == 2 and "RAY_AUTH_TOKEN is set but the cluster refused it" in out.stderr
    assert "not-the-token" not in out.stdout + out.stderr
    named = dict(without, MY_RAY_TOKEN=env["RAY_AUTH_TOKEN"])  # --token-env names another variable
    out = tidegate_cli(["jobs", "list", "--address", address, "--token-env", "MY_RAY_TOKEN"], named, 60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_plain_ray_job_submit_and_stop(tmp_path, broker, topic, tiny_model, ray_head):
    """`ray job submit --working-dir . --runtime-env-json '{"worker_process_setup_hook": ...}' -- python -m
    jobs.run SPEC` (README) works; `tidegate jobs stop` stops it cleanly."""
    address, env = ray_head.dashboard, ray_head.env
    send(broker, topic, (event(i) for i in range(30)))
    spec = make_spec(tmp_path, broker, topic, tiny_model)
    spec_path = write_spec(tmp_path, spec)
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "tg-plain-1", "--no-wait",
         "--working-dir", ".", "--runtime-env-json", '{"worker_process_setup_hook": "jobs.worker.setup_worker"}',
         "--", "python", "-m", "jobs.run", str(spec_path)],  # as README shows it
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # A long-running consumer: wait until it has committed everything, then stop it.
    wait_for(lambda: table_rows(spec["sink"]["results"]) == 30, 300, interval=1, what="the submitted job's results")
    stop = tidegate_cli(["jobs", "stop", "tg-plain-1", "--address", address], env, 60)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    wait_for(lambda: tidegate_cli(["jobs", "status", "tg-plain-1", "--address", address], env, 60).stdout.strip()
             in ("STOPPED", "SUCCEEDED"), 120, interval=1, what="the job to stop")  # fmt: skip
    assert table_rows(spec["sink"]["results"]) == 30


def test_the_python_api_submits_watches_and_stops_a_cluster_job(tmp_path, broker, topic, tiny_model, ray_head,
                                                                 monkeypatch):  # fmt: skip
    """`tidegate.submit` from a notebook: a handle with status, logs, stop and wait."""
    import tidegate

    address, env = ray_head.dashboard, ray_head.env
    monkeypatch.setenv("RAY_AUTH_TOKEN", env["RAY_AUTH_TOKEN"])
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    send(broker, topic, (event(i) for i in range(20)))
    spec = make_spec(tmp_path, broker, topic, tiny_model)
    job = tidegate.submit(tidegate.load_spec(write_spec(tmp_path, spec)), address=address, submission_id="tg-api-1")
    assert job.job_id == "tg-api-1" and "tg-api-1" in repr(job)
    wait_for(lambda: table_rows(spec["sink"]["results"]) == 20, 300, interval=1, what="the submitted job's results")
    assert job.status() == "RUNNING"  # a Kafka consumer without --until-drained: it goes on
    assert job.stop() is True
    assert job.wait(timeout_s=120) in ("STOPPED", "SUCCEEDED")
    assert f"reading kafka {topic}" in job.logs()  # the driver's own log lines, through the handle
    assert table_rows(spec["sink"]["results"]) == 20


def test_submit_rejects_a_bad_spec_before_shipping(tmp_path, broker, topic, tiny_model):
    spec = make_spec(tmp_path, broker, topic, tiny_model, **{"pool.actors": 0})
    out = tidegate_cli(["submit", str(write_spec(tmp_path, spec)), "--address", "http://127.0.0.1:9"], dict(os.environ), 60)
    assert out.returncode == 2
    assert "pool.actors: Input should be greater than or equal to 1" in out.stderr
