"""Ray job submission: ship the repo (and the spec) as the job's working_dir and run `jobs.run`.

    tidegate submit SPEC.yaml --address http://HEAD:8265 [--until-drained] [--wait]
    tidegate jobs list|status|logs|stop [JOB_ID] --address ...

The working dir is a staged copy of the project's own files (no virtualenv, no tables, no caches)
with the spec placed at `submitted/<spec file name>`, so a spec kept anywhere on the submitting
machine travels with the code. The entrypoint is the same one a user would type:

    python -m jobs.run submitted/SPEC.yaml [--until-drained] [--follow]

which is also what plain `ray job submit --working-dir . -- python -m jobs.run SPEC.yaml` runs.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

from schemas.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
# What never travels: environments, outputs, caches, VCS data.
EXCLUDE = (".venv", ".git", "lake", ".cache", "__pycache__", "*.pyc", ".pytest_cache", "bench/results", "*.egg-info")


def stage_working_dir(spec_path: Path) -> tuple[Path, str]:
    """Copy the project and the spec into a temp dir; returns (dir, spec path inside it)."""
    staging = Path(tempfile.mkdtemp(prefix="tidegate-submit-"))
    root = staging / "app"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(*EXCLUDE), symlinks=False)
    (root / "submitted").mkdir(exist_ok=True)
    shutil.copy2(spec_path, root / "submitted" / spec_path.name)
    return root, f"submitted/{spec_path.name}"


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(
    spec_path: str | Path,
    address: str,
    until_drained: bool = False,
    submission_id: str | None = None,
    follow: bool = False,
) -> str:
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)  # a bad spec fails here, before anything is shipped
    root, rel = stage_working_dir(spec_path)
    try:
        entrypoint = f"python -m jobs.run {shlex.quote(rel)}"
        entrypoint += (" --until-drained" if until_drained else "") + (" --follow" if follow else "")
        return client(address).submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"working_dir": str(root)},
            metadata={"tidegate_job": spec.name},
        )
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)  # uploaded by now


def wait(address: str, job_id: str, timeout_s: float = 3600.0) -> str:
    """Block until the job ends; returns its final status name."""
    from ray.job_submission import JobStatus

    c = client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = c.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f}s")
