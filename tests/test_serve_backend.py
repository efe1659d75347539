"""pool.backend serve: a batch job whose engines are a running Serve application's (`tidegate
serve SPEC --address`), on a real Ray head started as cluster.yaml starts its nodes (Serve's
HAProxy ingress and throughput-optimized data plane, so handle calls go over gRPC), with the real
vLLM engine, Kafka and Delta."""

from __future__ import annotations

import httpx
import polars as pl
import pytest

from connectors.broker import free_port
from tests.conftest import event, make_spec, send, started_ray_head, tidegate_cli, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    from jobs.serve import local_ingress_ports

    # HAProxy's and the replicas' ports: ones no other local Ray has, as `tidegate serve` gives a local Ray.
    with started_ray_head(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1",
                          **local_ingress_ports()) as head:  # fmt: skip
        yield head


def test_a_batch_job_runs_on_a_serve_applications_engines(tmp_path, broker, topic, tiny_model, ray_head, job_processes):
    port = free_port()
    overrides = {"serve.port": port, "serve.num_cpus": 1, "serve.auth": False, "pool.backend": "serve",
                 "pool.actors": 2, "pool.batch_size": 8}  # fmt: skip
    spec = make_spec(tmp_path, broker, topic, tiny_model, **overrides)
    spec_path = write_spec(tmp_path, spec)
    name = spec["name"]
    deployed = tidegate_cli(["serve", str(spec_path), "--address", ray_head.gcs], ray_head.env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        send(broker, topic, (event(i) for i in range(60)))
        job = job_processes(spec_path, extra_args=("--address", ray_head.gcs), env_overrides=ray_head.env)
        assert job.wait(600) == 0, job.log()[-4000:]
        log = job.log()
        assert f"engines: the Serve application '{name}''s (2 client(s)" in log
        assert "engine actor(s) ready" not in log  # the job started no engine of its own
        assert f"Serve application '{name}'" in log.split("engines of")[1]  # the run summary says whose
        res = pl.read_delta(spec["sink"]["results"])
        assert sorted(res["id"].to_list()) == [f"e{i:06d}" for i in range(60)]
        assert set(res["model_revision"].to_list()) != {None} and res["completion_tokens"].min() >= 1

        # The replica that ran the batches answers online requests on the same engine.
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/jobs/{name}/invoke",
                            json={"id": "online-1", "user": "u", "question": "q?"}, timeout=120)  # fmt: skip
        assert answer.status_code == 200, answer.text
        online = pl.read_delta(spec["sink"]["results"]).filter(pl.col("id") == "online-1")
        assert online["source_topic"].to_list() == ["serve:invoke"]
        assert online["model_revision"][0] == res["model_revision"][0]

        # A job whose spec generates differently is refused before any work, naming what differs.
        other_spec = dict(spec, name=f"{name}-other", sampling={"max_tokens": 8, "temperature": 0})
        other_spec["pool"] = dict(spec["pool"], serve_app=name)
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        other = job_processes(write_spec(other_dir, other_spec), extra_args=("--address", ray_head.gcs),
                              env_overrides=ray_head.env)  # fmt: skip
        assert other.wait(300) != 0
        assert f"the Serve application '{name}' generates with another sampling than this job's spec" in other.log()

        missing_spec = dict(spec, name=f"{name}-missing")
        missing_spec["pool"] = dict(spec["pool"], serve_app="no-such-app")
        missing_dir = tmp_path / "missing"
        missing_dir.mkdir()
        missing = job_processes(write_spec(missing_dir, missing_spec), extra_args=("--address", ray_head.gcs),
                                env_overrides=ray_head.env)  # fmt: skip
        assert missing.wait(300) != 0
        assert "the Serve application 'no-such-app' does not answer on this Ray cluster" in missing.log()
    finally:
        tidegate_cli(["serve", "stop", name, "--address", ray_head.gcs], ray_head.env, 120)  # the head goes next anyway
