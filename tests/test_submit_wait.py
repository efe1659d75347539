"""`tidegate submit --wait` / SubmittedJob.wait: the polling logic against a scripted job API (the
real cluster path is tests/test_submission.py; this covers what a cluster cannot be made to do on
cue: answer nothing for a while, answer 503, take longer than an hour)."""

from __future__ import annotations

import pytest
from ray.job_submission import JobStatus
from typer.testing import CliRunner

from jobs import submit as sub


class ScriptedJobAPI:
    """get_job_status answers (or raises) the scripted items in turn, then repeats the last."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0

    def get_job_status(self, job_id):
        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(item, BaseException):
            raise item
        return item


def wait(api, **kw):
    return sub.wait("http://head:8265", "job-1", client_factory=lambda *_: api, poll_s=0, **kw)


def test_wait_has_no_time_limit_by_default(monkeypatch):
    """Before stop 44 a wait ended after an hour with a TimeoutError traceback, the job still running."""
    clock = iter(range(0, 10**9, 1000))  # every reading 1,000 s after the last: 5 polls are 5,000 s
    monkeypatch.setattr(sub.time, "monotonic", lambda: next(clock))
    api = ScriptedJobAPI(*[JobStatus.RUNNING] * 5, JobStatus.SUCCEEDED)
    assert wait(api) == "SUCCEEDED"
    assert api.calls == 6


def test_wait_rides_out_an_unreachable_job_api_then_gives_up_with_a_named_error():
    down = ConnectionError("connection refused")  # requests' ConnectionError is an OSError too
    api = ScriptedJobAPI(JobStatus.RUNNING, down, RuntimeError("Request failed with status code 503: ..."), down,
                         JobStatus.FAILED)  # fmt: skip
    assert wait(api) == "FAILED"
    with pytest.raises(sub.ClusterUnreachable, match="did not answer for 0s while waiting for job job-1"):
        wait(ScriptedJobAPI(JobStatus.RUNNING, down), unreachable_s=0)


def test_wait_raises_what_is_not_transient_and_names_a_refused_token():
    with pytest.raises(sub.ClusterCallError, match="answered 404: Job job-1 does not exist"):
        wait(ScriptedJobAPI(RuntimeError("Request failed with status code 404: Job job-1 does not exist.")))
    with pytest.raises(sub.ClusterAuthError, match="requires its token"):
        wait(ScriptedJobAPI(RuntimeError("Request failed with status code 401: Unauthorized")))


def test_wait_timeout_leaves_the_job_running_and_the_cli_exits_3(monkeypatch, tmp_path):
    with pytest.raises(sub.JobWaitTimeout, match="job job-1 still running after 0s"):
        wait(ScriptedJobAPI(JobStatus.RUNNING), timeout_s=0)
    with pytest.raises(TimeoutError):  # what wait() raised before stop 44: `except TimeoutError` still works
        wait(ScriptedJobAPI(JobStatus.RUNNING), timeout_s=0)

    from jobs.cli import app

    api = ScriptedJobAPI(JobStatus.RUNNING)
    monkeypatch.setattr(sub, "submit", lambda *a, **k: "job-1")
    monkeypatch.setattr(sub, "client", lambda *a, **k: api)
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\n")  # never read: submit is scripted
    out = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://head:8265", "--wait",
                                   "--wait-timeout", "0"])  # fmt: skip
    assert out.exit_code == 3, out.output
    assert "error: job job-1 still running after 0s of waiting; it goes on" in out.output
    api.script = [JobStatus.SUCCEEDED]
    out = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://head:8265", "--wait"])
    assert out.exit_code == 0 and "job-1: SUCCEEDED" in out.output, out.output


def test_job_api_failures_are_one_line_errors_not_tracebacks():
    """Every job API call's plain errors become ClusterCallError (exit 2 in the CLI): a job id the
    cluster does not know (404), a 5xx, no cluster at the address (checked for real below)."""
    import subprocess

    from tests.conftest import BIN

    api = sub.JobAPI(ScriptedJobAPI(RuntimeError("Request failed with status code 404: Job x does not exist.")),
                     "http://head:8265")  # fmt: skip
    with pytest.raises(sub.ClusterCallError, match=r"answered 404: Job x does not exist\.$") as e:
        api.get_job_status("x")
    assert not e.value.transient
    api = sub.JobAPI(ScriptedJobAPI(RuntimeError("Request failed with status code 502: bad gateway")), "h")
    with pytest.raises(sub.ClusterCallError) as e:
        api.get_job_status("x")
    assert e.value.transient
    import socket

    with socket.socket() as held:  # bound, never listening: refused, and no other test can take the port
        held.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{held.getsockname()[1]}"
        out = subprocess.run([str(BIN / "tidegate"), "jobs", "status", "x", "--address", address],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: cannot reach the Ray job API at {address} (" in out.stderr, out.stderr
