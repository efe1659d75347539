"""A node lost mid-job: a multi-node local Ray cluster (ray.cluster_utils, several raylets on this
machine), the engine's node is killed while the job runs; the engine comes back on the other node
and every event is in the output exactly once."""

from __future__ import annotations

import polars as pl
import psutil
import pytest

from tests.conftest import event, make_spec, send, table_rows, wait_for, write_spec

pytestmark = pytest.mark.slow


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def test_the_job_survives_losing_the_engines_node(tmp_path, broker, topic, tiny_model, job_processes, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the test's cluster and the job's driver alike
    from ray.cluster_utils import Cluster

    # The head takes no work (num_cpus=0): the engine runs on one of the two worker nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        n = 1200
        send(broker, topic, (event(i) for i in range(n)))
        spec = make_spec(tmp_path, broker, topic, tiny_model, validation=[], **{"pool.batch_size": 32})
        job = job_processes(write_spec(tmp_path, spec), extra_args=("--address", cluster.address))
        res_uri = spec["sink"]["results"]
        wait_for(lambda: table_rows(res_uri) > 0 or job.proc.poll() is not None, 300, what="first commit")
        assert job.proc.poll() is None, job.log()[-3000:]

        def engine_node():
            for w in workers:
                raylet = psutil.Process(_raylet_pid(w))
                if any(p.name().startswith("ray::EngineWorker") for p in raylet.children(recursive=True)):
                    return w
            return None

        victim = wait_for(engine_node, 60, what="the engine's node")
        before = table_rows(res_uri)
        cluster.remove_node(victim, allow_graceful=False)  # kills that node's raylet and workers
        assert job.wait(600) == 0, job.log()[-4000:]
        assert before < n  # the node died mid-job, not after it

        ids = pl.read_delta(res_uri)["id"].to_list()
        assert len(ids) == len(set(ids)) == n
        assert pl.read_delta(spec["sink"]["dead_letter"]).height == 0
        survivor = next(w for w in workers if w is not victim)
        assert psutil.pid_exists(_raylet_pid(survivor))
    finally:
        cluster.shutdown()
