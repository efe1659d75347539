"""actors/transport.py: how tables go between the job's processes.

Pure: every kind of table the job sends comes back equal; a slice goes as IPC and carries only its
rows; a fresh table goes as its columns. With Ray (a local cluster started the way jobs start one,
jobs/run.py init_ray): the driver and every worker, an engine-like actor with its own env_vars
included, send tables with this reducer, and tables cross actors intact."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pyarrow as pa
import pytest

from actors.transport import table_from_parts, table_to_parts


def _tables() -> dict[str, pa.Table]:
    n = 3000
    t = pa.table({
        "i": pa.array([1, None, 3] * (n // 3)),
        "s": pa.array(["x", None, "yyy"] * (n // 3)),
        "b": pa.array([b"\x00z"] * n, pa.binary()),
        "l": pa.array([[1, 2], [3]] * (n // 2)),
        "st": pa.array([{"x": 1, "y": "a"}] * n),
        "d": pa.array(["a", "b", "c"] * (n // 3)).dictionary_encode(),
        "n": pa.nulls(n, pa.string()),
    }).replace_schema_metadata({b"k": b"v"})  # fmt: skip
    return {
        "fresh": t,
        "slice": t.slice(1000, 10),
        "head": t.slice(0, 10),
        "tail": t.slice(2990),
        "chunked": pa.concat_tables([t, t.slice(5, 7)]),
        "empty": t.schema.empty_table(),
        "taken": t.take([0, 4, 2999]),
        "no columns": pa.table({"x": [1, 2]}).drop(["x"]),
    }


@pytest.mark.parametrize("name", list(_tables()))
def test_every_kind_of_table_comes_back_equal(name):
    t = _tables()[name]
    back = table_from_parts(pickle.loads(pickle.dumps(table_to_parts(t), protocol=5)))
    assert back.equals(t) and back.schema.equals(t.schema, check_metadata=True)
    assert back.num_rows == t.num_rows


def test_a_slice_carries_its_rows_only_and_a_fresh_table_goes_as_columns():
    big = pa.table({"s": [f"row {i}" for i in range(1_000_000)], "i": list(range(1_000_000))})
    whole = len(pickle.dumps(table_to_parts(big), protocol=5))
    assert table_to_parts(big)[0] == "columns"
    for part in (big.slice(500_000, 100), big.slice(0, 100)):
        parts = table_to_parts(part)
        assert parts[0] == "ipc"
        assert len(pickle.dumps(parts, protocol=5)) < 10_000 < whole // 100  # not the parent's buffers
    # Sanity of the premise: pyarrow's own pickle of the same slice carries the parent's buffers.
    assert len(pickle.dumps(big.slice(0, 100), protocol=5)) > whole // 2


def _in_a_local_ray() -> None:
    """The Ray half of the test, in a process of its own (run by the test below): the pytest
    process hosts no Ray session of this test's."""
    import json
    import sys

    import ray

    from actors.transport import use_table_transport
    from jobs.run import init_ray

    init_ray(SimpleNamespace(ray=SimpleNamespace(address=None, metrics_export_port=None)))
    try:

        def reducer_here() -> str:
            import pyarrow as pa
            from ray import cloudpickle

            reducer = cloudpickle.CloudPickler.dispatch.get(pa.Table)  # set when Ray's context is made
            if reducer is None:
                return "none yet"
            deserializer = reducer(pa.table({"a": [1]}))[0]
            return f"{deserializer.__module__}.{deserializer.__qualname__}"

        @ray.remote(num_cpus=0)
        class Probe:
            def reducer(self) -> str:
                return reducer_here()

            def echo(self, t: pa.Table) -> pa.Table:
                return t

        out: dict = {}
        ray.get(ray.put(pa.table({"a": [1]})))
        out["driver_before"] = reducer_here()
        use_table_transport()  # what jobs/pipeline.py does at the job's start
        out["driver_after"] = reducer_here()
        plain = Probe.remote()
        with_env = Probe.options(runtime_env={"env_vars": {"TG_PROBE": "1"}}).remote()  # like the engines
        out["workers"] = ray.get([plain.reducer.remote(), with_env.reducer.remote()])
        out["unequal"] = [name for name, t in _tables().items()
                          if not ray.get(with_env.echo.remote(plain.echo.remote(t))).equals(t)]  # fmt: skip
        sys.stdout.write(json.dumps(out) + "\n")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_driver_and_every_worker_send_tables_with_it(tmp_path):
    """A local Ray started the way jobs start one (jobs/run.py init_ray, with the worker hook)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from tests.conftest import REPO

    env = dict(os.environ, TIDEGATE_RAY_TEMP_DIR=tempfile.mkdtemp(prefix="tgray", dir="/tmp"))
    code = "from tests.test_transport import _in_a_local_ray; _in_a_local_ray()"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    ours = "actors.transport.table_from_parts"
    assert out["driver_before"] not in (ours, "none yet")  # Ray's own until the job registers
    assert out["driver_after"] == ours
    assert out["workers"] == [ours, ours]
    assert out["unequal"] == []
