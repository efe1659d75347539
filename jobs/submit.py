"""Ray job submission: ship the repo (and the spec) as the job's working_dir and run `jobs.run`.

    tidegate submit SPEC.yaml --address http://HEAD:8265 [--until-drained] [--wait]
    tidegate jobs list|status|logs|stop [JOB_ID] --address ...

The working dir is a staged copy of the project's own files (no virtualenv, no tables, no caches)
with the spec placed at `submitted/<spec file name>`, so a spec kept anywhere on the submitting
machine travels with the code. The entrypoint is the same one a user would type:

    python -m jobs.run submitted/SPEC.yaml [--until-drained] [--follow]

which is also what plain `ray job submit --working-dir . -- python -m jobs.run SPEC.yaml` runs.

Clusters run with Ray's token authentication (cluster.yaml, deploy/kuberay): every call here sends
`Authorization: Bearer <token>` with the token read from an environment variable (RAY_AUTH_TOKEN,
or the one --token-env names). The master key never travels with a job: `--master-key-file PATH`
only tells the job where the cluster keeps it (a file on the head, e.g. a mounted secret), as
the environment variable <encryption.master_key_env>_FILE of that job alone (docs/operations.md).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from schemas.errors import SpecError, TidegateError
from schemas.spec import load_spec

TOKEN_ENV = "RAY_AUTH_TOKEN"  # Ray's own variable for its token authentication
# A stopped job's driver gets run.shutdown_timeout_s plus this before Ray kills it (its commit, its run row).
STOP_MARGIN_S = 30


class ClusterAuthError(TidegateError):
    """The cluster refused the call: no token, or the wrong one (the token is never shown)."""

REPO = Path(__file__).resolve().parent.parent
# What never travels: environments, outputs, caches, VCS data.
# Nor the default keyring's folder (.tidegate): wrapped keys and API-key hashes stay on this machine.
EXCLUDE = (".venv", ".git", "lake", ".cache", "__pycache__", "*.pyc", ".pytest_cache", "bench/results", "*.egg-info",
           ".tidegate", "node_modules", ".hypothesis", ".ruff_cache")  # fmt: skip


def check_cluster_tables(spec) -> None:
    """The tables of a submitted job must be where every node, and the next run, finds them: a
    relative path would be inside the copy of the project Ray makes for the job, and go with it
    (the next submission would start from nothing and process every input again)."""
    for field, uri in (("sink.results", spec.sink.results), ("sink.dead_letter", spec.sink.dead_letter)):
        if "://" not in uri and not Path(uri).expanduser().is_absolute():
            raise SpecError(f"{field} {uri!r}: a submitted job runs in a copy of the project's folder, so its tables "
                            "need an absolute path on storage every node sees, or an object store URI (s3://, ...)")  # fmt: skip


def check_cluster_keyring(spec) -> None:
    """A job that encrypts needs a keyring path the cluster's nodes share, absolute and outside the
    project: the job runs in a copy of the project's folder shipped with it, so a keyring in there
    would be a copy too. Keys the job rotated (encryption.rotate_after_values) would live only in
    that copy and be gone with it, values sealed with them unreadable; the operator's `keys rotate`
    and `keys revoke` would never reach the job."""
    enc = spec.encryption
    if not enc.needs_keys:
        return
    if "keyring" not in enc.model_fields_set:  # from this machine's TIDEGATE_KEYRING, or the default
        raise SpecError("encryption.keyring: a submitted job needs its keyring's path in the spec (the cluster has "
                        "neither your TIDEGATE_KEYRING nor the project's .tidegate/): an absolute path on storage "
                        "every node of the cluster sees")  # fmt: skip
    path = Path(enc.keyring).expanduser()
    if not path.is_absolute() or path.resolve().is_relative_to(REPO):
        raise SpecError(f"encryption.keyring {enc.keyring!r}: a submitted job runs in a copy of the project's "
                        "folder, so its keyring must be an absolute path outside it, on storage every node of the "
                        "cluster sees (a copy would lose the job's rotations and miss your rotations and revocations)")  # fmt: skip


def stage_working_dir(spec_path: Path) -> tuple[Path, str]:
    """Copy the project and the spec into a temp dir; returns (dir, spec path inside it)."""
    staging = Path(tempfile.mkdtemp(prefix="tidegate-submit-"))
    root = staging / "app"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(*EXCLUDE), symlinks=False)
    (root / "submitted").mkdir(exist_ok=True)
    shutil.copy2(spec_path, root / "submitted" / spec_path.name)
    return root, f"submitted/{spec_path.name}"


def auth_headers(token_env: str = TOKEN_ENV) -> dict[str, str] | None:
    token = os.environ.get(token_env, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else None


class ClusterCallError(TidegateError):
    """A job API call that failed: the cluster could not be reached, or answered with an error
    (its HTTP status and Ray's one-line reason). `transient`: worth repeating (no answer, 5xx)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class JobAPI:
    """Ray's JobSubmissionClient with its failures as Tidegate errors: every method's plain
    RuntimeError (an HTTP status) or connection error becomes ClusterAuthError or ClusterCallError,
    one line for the CLI (exit 2) instead of a traceback."""

    def __init__(self, api, address: str, token_env: str = TOKEN_ENV):
        self._api, self.address, self.token_env = api, address, token_env

    def __getattr__(self, name: str):
        attr = getattr(self._api, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except TidegateError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray's SDK raises plain errors: sorted by cluster_error
                raise cluster_error(e, self.address, self.token_env) from None

        return call


def cluster_error(e: Exception, address: str, token_env: str) -> TidegateError:
    """The Tidegate error for a failed job API call (see ClusterCallError)."""
    refused = _auth_error(e, address, token_env)
    if refused is not None:
        return refused
    if isinstance(e, OSError):  # requests' connection errors and timeouts, Ray's ConnectionError
        return ClusterCallError(f"cannot reach the Ray job API at {address} ({type(e).__name__}); is the address "
                                "the head's dashboard (http://HEAD:8265)?", transient=True)  # fmt: skip
    text = str(e)
    if isinstance(e, RuntimeError) and text.startswith("Request failed with status code "):
        code, _, reason = text[len("Request failed with status code "):].partition(":")
        reason = " ".join(reason.split())[:200]  # Ray's reason, e.g. "Job X does not exist."
        return ClusterCallError(f"the Ray job API at {address} answered {code}: {reason}",
                                transient=code.strip().startswith("5"))  # fmt: skip
    return ClusterCallError(f"the Ray job API call failed at {address}: {type(e).__name__}")


def client(address: str, token_env: str = TOKEN_ENV) -> JobAPI:
    """Ray's JobSubmissionClient for the cluster, authenticated with the token in `token_env`
    (wrapped: its failures are Tidegate errors)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobAPI(JobSubmissionClient(address, headers=auth_headers(token_env)), address, token_env)
    except Exception as e:  # noqa: BLE001 - Ray reports a refused token, or no cluster, as a plain error
        raise cluster_error(e, address, token_env) from None


def _auth_error(e: Exception, address: str, token_env: str) -> ClusterAuthError | None:
    text = str(e)
    if not any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "authentication")):
        return None
    given = "is set but the cluster refused it" if os.environ.get(token_env) else "is not set"
    return ClusterAuthError(f"the Ray cluster at {address} requires its token (token authentication); "
                            f"{token_env} {given}")  # fmt: skip


def job_env_vars(spec, master_key_file: str | None) -> dict[str, str]:
    """Where the cluster keeps the master key (a path on the cluster; the key itself is never put
    in a job's settings, which the job API lists), as the job's <master_key_env>_FILE."""
    if master_key_file is None:
        return {}
    if not spec.encryption.needs_keys:
        raise SpecError("--master-key-file: the spec encrypts nothing (no encryption section)")
    return {f"{spec.encryption.master_key_env}_FILE": master_key_file}


def job_runtime_env(root: Path, spec, master_key_file: str | None) -> dict:
    """The job's runtime_env: its code, job_env_vars, and its workers' setup hook (jobs/worker.py)."""
    from jobs.worker import WORKER_SETUP_HOOK

    env: dict = {"working_dir": str(root), "worker_process_setup_hook": WORKER_SETUP_HOOK}
    env_vars = job_env_vars(spec, master_key_file)
    # `tidegate jobs stop` is a SIGTERM to the driver, which finishes and commits the batches in
    # flight for run.shutdown_timeout_s; Ray's job supervisor (which runs with the job's runtime_env)
    # SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S, 3 s by default: a clean stop needs that window.
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(math.ceil(spec.run.shutdown_timeout_s) + STOP_MARGIN_S)
    env["env_vars"] = env_vars
    return env


def submit(
    spec_path: str | Path,
    address: str,
    until_drained: bool = False,
    submission_id: str | None = None,
    follow: bool = False,
    token_env: str = TOKEN_ENV,
    master_key_file: str | None = None,
) -> str:
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)  # a bad spec fails here, before anything is shipped
    job_env_vars(spec, master_key_file)  # so does a --master-key-file the spec has no use for
    check_cluster_keyring(spec)  # and a keyring that would travel in the working dir
    check_cluster_tables(spec)  # and tables that would
    jobs = client(address, token_env)
    root, rel = stage_working_dir(spec_path)
    try:
        entrypoint = f"python -m jobs.run {shlex.quote(rel)}"
        entrypoint += (" --until-drained" if until_drained else "") + (" --follow" if follow else "")
        return jobs.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=job_runtime_env(root, spec, master_key_file),
            metadata={"tidegate_job": spec.name},
        )
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)  # uploaded by now


class JobWaitTimeout(TidegateError, TimeoutError):
    """`--wait-timeout` passed with the job still running; the job itself is left running (a
    TimeoutError too: what wait() raised before stop 44)."""


class ClusterUnreachable(TidegateError):
    """The job API did not answer for `unreachable_s` while waiting; the job may still be running."""


def wait(address: str, job_id: str, timeout_s: float | None = None, token_env: str = TOKEN_ENV, *,
         poll_s: float = 1.0, unreachable_s: float = 120.0, client_factory=None) -> str:  # fmt: skip
    """Block until the job ends; returns its final status name (SUCCEEDED, FAILED, STOPPED).

    timeout_s      None: as long as the job runs (a batch job may take hours); else JobWaitTimeout
    unreachable_s  the job API may be away that long (a head's dashboard restarting, a network
                   blip) before ClusterUnreachable: before stop 44 the first failed poll ended the
                   wait with a traceback, after hours of it
    """
    from ray.job_submission import JobStatus

    c = client_factory(address, token_env) if client_factory is not None else client(address, token_env)
    c = c if isinstance(c, JobAPI) else JobAPI(c, address, token_env)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failing_since: float | None = None
    while True:
        try:
            status = c.get_job_status(job_id)
            failing_since = None
        except ClusterCallError as e:
            if not e.transient:
                raise
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since >= unreachable_s:
                raise ClusterUnreachable(f"the job API at {address} did not answer for {unreachable_s:.0f}s while "
                                         f"waiting for job {job_id} (last: {e}); the job may still be running: "
                                         f"`tidegate jobs status {job_id}`") from None  # fmt: skip
            status = None
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if deadline is not None and time.monotonic() >= deadline:
            raise JobWaitTimeout(f"job {job_id} still running after {timeout_s:g}s of waiting; it goes on "
                                 f"(`tidegate jobs stop {job_id}` stops it)")  # fmt: skip
        time.sleep(poll_s)
