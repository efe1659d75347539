"""The CLI's error contract (README, "Exit codes"): a user's mistake or an unavailable service is
one `error:` line and exit 2, never a traceback; and a command touches only what it owns."""

from __future__ import annotations

import socket
import subprocess

from tests.conftest import BIN


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tidegate"), *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_a_broker_on_a_port_in_use_is_an_error_not_a_silent_exit_0():
    """Before stop 44 `tidegate broker --port N` on a busy port printed a bootstrap address (the
    other program answered the readiness check), then exited 0 once tansu failed to bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("broker", "--port", str(port), timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: the embedded broker's port 127.0.0.1:{port} is in use" in out.stderr
    assert "bootstrap_servers" not in out.stdout and "Traceback" not in out.stderr


def test_the_demo_replaces_its_own_tables_and_nothing_else_in_its_lake(tmp_path):
    from jobs.demo import EXAMPLE_SPEC, clear_demo_tables
    from schemas.spec import load_spec

    lake = tmp_path / "lake"
    for folder in ("results", "dead_letter", "runs", "support-online/results", "notes"):
        (lake / folder).mkdir(parents=True)
        (lake / folder / "part-0.parquet").write_bytes(b"x")
    spec = load_spec(EXAMPLE_SPEC)
    spec.sink.results, spec.sink.dead_letter = str(lake / "results"), str(lake / "dead_letter")
    clear_demo_tables(spec)
    assert sorted(p.name for p in lake.iterdir()) == ["notes", "support-online"]
    assert (lake / "support-online/results/part-0.parquet").exists()


def _spec_file(tmp_path, results: str, dead_letter: str, bootstrap: str, **sink) -> str:
    import yaml

    spec = {"name": "st", "source": {"kafka": {"topic": "t", "bootstrap_servers": [bootstrap]}},
            "prompt": {"template": "{{ q }}", "id_field": "id"}, "model": {"path": "/m"},
            "sink": {"results": results, "dead_letter": dead_letter, **sink}}  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_status_and_usage_name_an_unreadable_store_in_one_line_without_its_credentials(tmp_path):
    """Before stop 44 both ended in a traceback quoting the store's own message (here: the URI
    with its key, hunter2)."""
    from connectors.broker import free_port

    port = free_port()  # nothing listens there
    store = f"s3://AKIAEXAMPLE:hunter2@127.0.0.1:{port}/b"
    opts = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}  # fmt: skip
    spec = _spec_file(tmp_path, f"{store}/results", f"{store}/dead_letter", f"127.0.0.1:{port}", storage_options=opts)
    for args in (["status", spec, "--json"], ["usage", spec, "--by", "tenant"], ["usage", spec]):
        out = cli(*args, timeout=300)
        assert out.returncode == 2, (args, out.stdout + out.stderr)
        assert out.stderr.startswith("error: cannot read the job's"), (args, out.stderr)
        assert "Traceback" not in out.stderr and "hunter2" not in out.stdout + out.stderr, (args, out.stderr)


def test_status_json_masks_secrets_in_every_text_it_prints(tmp_path, broker):
    """`status --json` carries the tables' and source's URIs: before stop 44 only the rendered table
    masked their credentials. (A local path holding a secret-looking part stands in for an object
    store URI with a key in it: the same redaction, without a store.)"""
    import json

    lake = tmp_path / "token=hunter2"
    spec = _spec_file(tmp_path, str(lake / "results"), str(lake / "dead_letter"), broker.bootstrap_servers)
    out = cli("status", spec, "--json", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    status = json.loads(out.stdout)
    assert status["tables"]["results"]["uri"].startswith(str(tmp_path / "token=***"))
    assert "hunter2" not in out.stdout + out.stderr
