"""Shared fixtures: a real tansu broker, a tiny model built offline, job specs and job processes.

Everything a test starts it stops by PID; every test gets its own topic, group, tables and Ray
temp dir. Nothing here talks to anything outside this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import yaml
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from connectors.broker import EmbeddedBroker, free_port
from connectors.kafka import create_topic, produce

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from jobs.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def schema_registry():
    from tests.registry import SchemaRegistryServer

    server = SchemaRegistryServer().start()
    yield server
    server.stop()


@pytest.fixture
def topic(broker) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    create_topic(broker.bootstrap_servers, name, partitions=4)
    return name


def make_spec(tmp_path: Path, broker, topic: str, model: Path, **overrides) -> dict:
    """A job spec dict reading `topic` on `broker` (or no source yet when broker is None)."""
    kafka = {
        "bootstrap_servers": broker.bootstrap_servers if broker else None,
        "topic": topic,
        "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "max_message_bytes": 4096,
        "poll_timeout_ms": 100,
        # tansu completes a group join about session_timeout_ms / 2 after it starts (measured: 3 s
        # at the default 6,000 ms, 2 s at 3,000): a shorter session makes each job start faster.
        "session_timeout_ms": 3000,
        "heartbeat_interval_ms": 500,
    }
    spec = {
        "name": f"job-{uuid.uuid4().hex[:8]}",
        "source": {"kafka": kafka} if broker is not None else {},
        "prompt": {"template": "Answer for {{ user }}: {{ question }}", "id_field": "id"},
        "model": {"path": str(model), "dtype": "float32", "kv_cache_gib": 1},
        "sampling": {"max_tokens": 16, "temperature": 0},
        "pool": {"actors": 1, "batch_size": 32, "num_cpus": 1},
        "sink": {
            "results": str(tmp_path / "lake" / "results"),
            "dead_letter": str(tmp_path / "lake" / "dead_letter"),
            "commit_interval_s": 0.5,
        },
        "run": {"shutdown_timeout_s": 30},
    }
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def event(i: int, **extra) -> tuple[bytes, bytes]:
    body = {"id": f"e{i:06d}", "user": f"user-{i % 17}", "question": f"what is the status of order {i}?"}
    body.update(extra)
    return body["id"].encode(), json.dumps(body).encode()


def send(broker, topic: str, records) -> int:
    return produce(broker.bootstrap_servers, topic, records)


class JobProcess:
    """`python -m jobs.run SPEC` in its own process group-free child, with its own Ray temp dir."""

    def __init__(
        self,
        spec_path: Path,
        until_drained: bool = True,
        log_path: Path | None = None,
        extra_args: tuple = (),
        module: str = "jobs.run",
        env_overrides: dict[str, str] | None = None,
    ):
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="tgray", dir="/tmp"))  # short: Ray's socket paths
        env = dict(os.environ)
        env.update(
            TIDEGATE_RAY_TEMP_DIR=str(self.ray_tmp),
            TIDEGATE_LOG_LEVEL="INFO",
            # The engines' and Ray's output in the job's log too (security tests scan it for values).
            TIDEGATE_VERBOSE="1",
            PYTHONUNBUFFERED="1",
            RAY_DEDUP_LOGS="0",
        )
        env.update(env_overrides or {})
        cmd = [sys.executable, "-m", module, str(spec_path)]
        if until_drained and module in ("jobs.run", "tests.job_runner"):
            cmd.append("--until-drained")
        cmd += list(extra_args)
        self.log_path = log_path or spec_path.parent / f"job-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job did not finish within {timeout}s; log:\n{self.log()[-4000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def cleanup(self) -> None:
        self.kill()
        self._log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def job_processes():
    started: list[JobProcess] = []

    def start(spec_path: Path, **kw) -> JobProcess:
        jp = JobProcess(spec_path, **kw)
        started.append(jp)
        return jp

    yield start
    for jp in started:
        leftovers = jp.descendants()
        jp.cleanup()
        kill_all(leftovers)


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL processes a test started (by PID, never by name); those already gone are skipped."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def table_rows(uri: str) -> int:
    """Rows in a Delta table; 0 while the job has not created it yet."""
    try:
        return DeltaTable(uri).count()
    except TableNotFoundError:
        return 0


def living(pids) -> list[int]:
    """The PIDs of `pids` still running (a zombie has exited: it only waits for its parent)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def results_table(offsets: list[int], partition: int = 0, topic: str = "t", **columns):
    """A RESULTS_SCHEMA table for rows at `offsets` (placeholder values; `columns` overrides any)."""
    from datetime import datetime, timezone

    import pyarrow as pa

    from schemas.records import RESULTS_SCHEMA

    n = len(offsets)
    cols = {
        "id": [f"id{o}" for o in offsets], "status": ["ok"] * n, "output_text": ["x"] * n,
        "output_json": [None] * n, "finish_reason": ["length"] * n, "model": ["m"] * n,
        "prompt_tokens": [1] * n, "completion_tokens": [2] * n, "latency_ms": [1.0] * n,
        "attempts": [1] * n, "rule_results": [[]] * n, "source_topic": [topic] * n,
        "source_partition": [partition] * n, "source_offset": offsets, "run_id": ["r"] * n,
        "processed_at": [datetime.now(timezone.utc)] * n,
    }  # fmt: skip
    cols.update({k: (v if isinstance(v, list) else [v] * n) for k, v in columns.items()})
    for f in RESULTS_SCHEMA:
        cols.setdefault(f.name, [None] * n)
    return pa.table(cols, schema=RESULTS_SCHEMA)


@contextlib.contextmanager
def closed_port():
    """A local port nothing listens on while the block runs: bound and never listening, so a
    connection is refused and no other process (Ray, the other test worker) can take it meanwhile
    (free_port() closes its socket: the port could be anyone's by the time it is used)."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray for one test module (its own temp dir; shut down after the module)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tgray", dir="/tmp"),
             object_store_memory=80 * 2**20)  # fmt: skip
    yield
    ray.shutdown()


class FixedPositions:
    """A SourcePositions (connectors/source.py) over a dict, for sources tested without a job:
    resume answers from `positions`, release records what was given away."""

    def __init__(self, positions: dict | None = None):
        self.positions = dict(positions or {})
        self.released: list = []
        self.anchored: dict = {}

    def resume(self, tps):
        return {tp: self.positions.get(tp) for tp in tps}

    def anchor(self, positions):
        self.anchored.update(positions)
        self.positions.update(positions)

    def release(self, tps, lost: bool = False, within_s: float | None = None):
        self.released.extend(tps)


def source_context(positions: dict | None = None, **kw):
    from connectors.source import SourceContext

    kw.setdefault("job_name", "job")
    return SourceContext(positions=FixedPositions(positions), **kw)


def tidegate_cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed `tidegate` command, run from the repository with `env`."""
    return subprocess.run([str(BIN / "tidegate"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


class RayHead(NamedTuple):
    dashboard: str  # http://127.0.0.1:PORT: the job API (tidegate submit, jobs)
    gcs: str  # 127.0.0.1:PORT: what drivers connect to (--address)
    env: dict  # the environment a client needs (RAY_AUTH_TOKEN)


@contextlib.contextmanager
def started_ray_head(**extra_env: str):
    """A Ray head on free ports with its own temp dir, with token authentication (as cluster.yaml
    and deploy/kuberay run it); stopped by PID at the end. Clients get the token in RAY_AUTH_TOKEN.
    extra_env: the head's node environment (cluster.yaml's start commands set Serve's ingress)."""
    import secrets

    temp = tempfile.mkdtemp(prefix="tghead", dir="/tmp")
    ports = {name: free_port() for name in ("gcs", "dash", "client", "nm", "om", "agent", "agent_grpc", "rtenv", "metrics")}
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               **extra_env)  # fmt: skip
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", f"--port={ports['gcs']}",
        f"--dashboard-port={ports['dash']}", f"--ray-client-server-port={ports['client']}",
        f"--node-manager-port={ports['nm']}", f"--object-manager-port={ports['om']}",
        f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['rtenv']}", f"--metrics-export-port={ports['metrics']}",
    ]  # fmt: skip
    log = open(Path(temp) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dash']}"

    def up():
        request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
        try:
            return urllib.request.urlopen(request, timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 120, interval=1, what="the Ray head's job API")
        yield RayHead(address, f"127.0.0.1:{ports['gcs']}", env)
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            # A head with a Serve application took ~30 s to stop gracefully (CI, 2026-12-06); what
            # it has not stopped by then is killed by PID below (nothing here tests its shutdown).
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        kill_all(family)
        log.close()


@pytest.fixture(scope="module")
def ray_head():
    with started_ray_head() as head:
        yield head
