"""`tidegate serve SPEC` end to end with the real vLLM engine on the tiny model: the CLI creates an
API key, the command deploys on its own local Ray, the official openai client talks to it, the
audit row carries the job's lineage, and SIGTERM takes it all down (exit 0)."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from connectors.broker import free_port
from tests.conftest import REPO, kill_all, living, make_spec, wait_for, write_spec

pytestmark = pytest.mark.slow


def test_tidegate_serve_with_the_real_engine(tmp_path, tiny_model, broker):
    import polars as pl
    import psutil
    from openai import OpenAI

    from crypto.reader import read_results

    ray_tmp = tempfile.mkdtemp(prefix="tgray", dir="/tmp")
    keyring = tmp_path / "keyring.json"
    env = dict(os.environ, TIDEGATE_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
               TIDEGATE_KEYRING=str(keyring), TIDEGATE_RAY_TEMP_DIR=ray_tmp, PYTHONUNBUFFERED="1")  # fmt: skip
    cli = [sys.executable, "-m", "jobs.cli"]
    subprocess.run([*cli, "keys", "init"], env=env, cwd=REPO, check=True, capture_output=True)
    made = subprocess.run([*cli, "keys", "api-key", "create", "acme"], env=env, cwd=REPO, check=True,
                          capture_output=True, text=True)  # fmt: skip
    token = made.stdout.strip()  # stdout holds the key alone
    assert token.startswith("tg_") and "shown once" in made.stderr and token not in keyring.read_text()

    port = free_port()
    spec = make_spec(tmp_path, broker, "serve-vllm", tiny_model, **{"serve": {"port": port, "num_cpus": 1}})
    path = write_spec(tmp_path, spec)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cli, "serve", str(path)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    started = psutil.Process(proc.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "not ready in 240 s:\n" + log_path.read_text()[-4000:]
            time.sleep(1)
        client = OpenAI(base_url=url + "/v1", api_key=token)
        label = spec["model"]["path"]
        chat = client.chat.completions.create(model=label, messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=8)  # fmt: skip
        assert isinstance(chat.choices[0].message.content, str)
        assert 1 <= chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0
        assert chat.tidegate["status"] in ("ok", "flagged")  # the guards' verdict rides along (extra field)
        with pytest.raises(Exception) as refused:
            OpenAI(base_url=url + "/v1", api_key="tg_000000000000_" + "B" * 43).models.list()
        assert getattr(refused.value, "status_code", None) == 401
        rows = read_results(spec["sink"]["results"], keyring=str(keyring), backend="arrow",
                            where=pl.col("id") == chat.id).to_pylist()  # fmt: skip
        assert len(rows) == 1 and rows[0]["tenant"] == "acme" and rows[0]["source_topic"] == "serve:chat/completions"
        assert rows[0]["model_revision"] and rows[0]["completion_tokens"] == chat.usage.completion_tokens
        # serve.engine_process separate (the default): vLLM's engine core runs in a child of the
        # replica, and goes with it when the application stops.
        names = {}
        for p in started.children(recursive=True):
            try:
                names[p.pid] = " ".join(p.cmdline())
            except psutil.Error:
                pass
        engine = [pid for pid, cmd in names.items() if cmd.startswith("VLLM::")]  # EngineCore, its Worker
        assert any(names[pid].startswith("VLLM::EngineCore") for pid in engine), sorted(names.values())
        # On CPUs vLLM binds its worker to all cores but one; every thread of the replica keeps off them.
        worker_cores = set().union(*(psutil.Process(p).cpu_affinity() for p in engine if names[p].startswith("VLLM::Worker")))
        replica = next(pid for pid, cmd in names.items() if "ServeReplica" in cmd)
        replica_cores: set[int] = set()
        for tid in os.listdir(f"/proc/{replica}/task"):
            try:
                replica_cores |= os.sched_getaffinity(int(tid))
            except OSError:  # a thread that ended meanwhile
                pass
        if worker_cores and worker_cores != set(range(os.cpu_count())):
            assert not replica_cores & worker_cores, (replica_cores, worker_cores)
        else:  # a one-core machine: nothing to keep off
            assert replica_cores == set(range(os.cpu_count()))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-4000:]
        wait_for(lambda: not living(engine), 30, what="the engine core's processes to end")
    finally:
        leftovers = started.children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(leftovers)
        shutil.rmtree(ray_tmp, ignore_errors=True)
