"""The functions and handles `import tidegate` exports (see tidegate/__init__.py for the list).

Each delegates to the layer that owns the work: specs to schemas/ (with every connector's source
kind known, as `tidegate run` loads them), runs to jobs/run.py, cluster jobs to jobs/submit.py,
tables to crypto/reader.py and connectors/runs.py, status to jobs/status.py, usage to jobs/usage.py.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from schemas.errors import SpecError
from schemas.spec import JobSpec

if TYPE_CHECKING:
    import polars as pl

    from jobs.stats import JobStats

SpecLike = JobSpec | str | Path


# -- specs -------------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a job spec file (YAML); a bad spec raises SpecError naming the field.

    >>> spec = tidegate.load_spec("examples/demo.yaml")
    >>> spec.sink.results
    'lake/demo/results'
    """
    from jobs.run import load_job_spec

    return load_job_spec(path)


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """A job spec from a mapping (what the YAML file holds), checked like load_spec."""
    import connectors.source  # noqa: F401  (every source kind's settings)
    from schemas.spec import parse_spec as _parse

    return _parse(data, "<mapping>")


def _spec(spec: SpecLike) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else load_spec(spec)


# -- a local run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunProgress:
    """Where a run is. rows_total is known for table sources only (a Kafka topic has no end)."""

    state: str  # starting | running | finished | stopped | failed
    consumed: int  # source rows read
    written: int  # result rows committed (flagged included)
    dead_lettered: int
    rows_committed: int  # source rows whose results are committed (table sources; else written + dead_lettered)
    rows_total: int | None
    commits: int
    elapsed_s: float
    rows_per_s: float
    backlog: int | None = None  # Kafka: rows not committed yet, measured every ~5 s (None: not yet)
    model_hashed: tuple[int, int] | None = None  # at start: (bytes, of total) of the model's files hashed for lineage

    @property
    def fraction(self) -> float | None:
        return self.rows_committed / self.rows_total if self.rows_total else None


class RunHandle:
    """A run of a job in this process, started by `Job.run`: the run goes on in a background
    thread; the handle reads its live counters and stops it.

        run = tidegate.Job(spec).run(until_drained=True)
        run.progress        # RunProgress(state='running', consumed=1200, written=1180, ...)
        run.stop()          # finish the batches in flight, commit, stop (like SIGTERM)
        stats = run.wait()  # JobStats; raises what the run raised
    """

    def __init__(self, spec: JobSpec, run_id: str):
        self.spec = spec
        self.run_id = run_id
        self._stop = threading.Event()
        self._job = None  # jobs.pipeline.PipelineJob, once built
        self._stats: JobStats | None = None
        self._error: BaseException | None = None
        self._progress: tuple[int, int | None] = (0, None)
        self._hashed: tuple[int, int] | None = None
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self.summary = io.StringIO()  # the run's summary table, as `tidegate run` prints it

    # -- what the run thread calls
    def _on_job(self, job) -> None:
        self._job = job

    def _on_progress(self, done: int, total: int | None) -> None:
        self._progress = (done, total)

    def _on_hashing(self, done: int, total: int) -> None:
        self._hashed = (done, total)

    def _finished(self, stats, error: BaseException | None) -> None:
        self._stats, self._error = stats, error

    # -- what users call
    @property
    def stats(self) -> JobStats | None:
        """The run's counters (jobs.stats.JobStats), live while it runs; None before the job is built."""
        if self._stats is not None:
            return self._stats
        return self._job.stats if self._job is not None else None

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    @property
    def state(self) -> str:
        if not self.done:
            return "running" if self._job is not None else "starting"
        if self._error is not None:
            return "failed"
        return "stopped" if self._stop.is_set() else "finished"

    @property
    def progress(self) -> RunProgress:
        stats = self.stats
        done, total = self._progress
        elapsed = stats.elapsed_s if stats is not None else time.monotonic() - self._started
        ok, dead = (stats.ok, stats.dead_lettered) if stats is not None else (0, 0)
        return RunProgress(
            state=self.state, consumed=stats.consumed if stats else 0, written=ok, dead_lettered=dead,
            rows_committed=done if total is not None else ok + dead, rows_total=total,
            commits=stats.commits if stats else 0, elapsed_s=elapsed,
            rows_per_s=(ok + dead) / elapsed if elapsed > 0 else 0.0, backlog=stats.backlog if stats else None,
            model_hashed=self._hashed,
        )  # fmt: skip

    def stop(self, wait: bool = True, timeout: float | None = None) -> JobStats | None:
        """Ask the run to stop (in-flight batches finish and commit); by default wait for it."""
        self._stop.set()
        if wait:
            return self.wait(timeout)
        return None

    def wait(self, timeout: float | None = None) -> JobStats:
        """Block until the run ends; its stats, or the exception it raised. TimeoutError if it
        is still running after `timeout` seconds (the run goes on)."""
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.done:
            raise TimeoutError(f"run {self.run_id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    def __repr__(self) -> str:
        p = self.progress
        total = f"/{p.rows_total:,}" if p.rows_total is not None else ""
        return (f"<tidegate run {self.run_id} of {self.spec.name!r}: {p.state}, {p.rows_committed:,}{total} rows "
                f"committed, {p.written:,} written, {p.dead_lettered:,} dead-lettered, {p.rows_per_s:,.1f} rows/s>")  # fmt: skip


class Job:
    """A job spec to run in this process (a local Ray, or the cluster of `address`).

    >>> run = tidegate.Job("examples/demo.yaml").run(until_drained=True)
    >>> run.wait().ok
    300
    """

    def __init__(self, spec: SpecLike, *, address: str | None = None, components=None):
        self.spec = _spec(spec)
        self.address = address
        self.components = components  # jobs.pipeline.JobComponents: replace the engine, source or sink

    def run(self, until_drained: bool = True, *, follow: bool = False, wait: bool = False,
            quiet: bool = True, run_id: str | None = None) -> RunHandle:  # fmt: skip
        """Start the run in a background thread and return its handle at once (wait=True: once it ended).

        until_drained  Kafka sources stop once every partition is consumed and committed (table
                       sources always end once their rows are committed, unless follow)
        quiet          keep the summary table off the output: it goes to `handle.summary` instead (quiet=False: to stderr)

        No signal handler is installed (a notebook's kernel keeps its own): stop with
        `handle.stop()`. Ray is started (or joined) here, in the calling thread, before the run
        thread starts.
        """
        from rich.console import Console

        from jobs.run import init_ray, run_job

        init_ray(self.spec, self.address)
        handle = RunHandle(self.spec, run_id or uuid.uuid4().hex[:16])
        # force_jupyter=False: in a notebook rich would otherwise display it rather than write the file
        console = Console(file=handle.summary, width=120, force_jupyter=False) if quiet else Console(stderr=True)

        def _run() -> None:
            stats, error = None, None
            try:
                stats = run_job(
                    self.spec, until_drained=until_drained, address=self.address, console=console, follow=follow,
                    run_id=handle.run_id, components=self.components, stop=handle._stop, handle_signals=False,
                    progress=handle._on_progress, on_job=handle._on_job, hashing=handle._on_hashing,
                )  # fmt: skip
            except BaseException as e:  # handed to wait(): the thread itself never raises
                error = e
            handle._finished(stats, error)

        handle._thread = threading.Thread(target=_run, name=f"tidegate-run-{handle.run_id}", daemon=True)
        handle._thread.start()
        if wait:
            handle._thread.join()
        return handle


# -- a job on a Ray cluster ---------------------------------------------------------------------------


class SubmittedJob:
    """A job submitted to a Ray cluster (Ray's job submission): its status, logs, stop and wait."""

    def __init__(self, job_id: str, address: str, token_env: str):
        self.job_id = job_id
        self.address = address
        self.token_env = token_env

    def _client(self):
        from jobs.submit import client

        return client(self.address, self.token_env)

    def status(self) -> str:
        """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""
        return str(self._client().get_job_status(self.job_id).value)

    def logs(self) -> str:
        return self._client().get_job_logs(self.job_id)

    def stop(self) -> bool:
        """Ask the job to stop (SIGTERM: it finishes its batches and commits); False if it had ended."""
        return bool(self._client().stop_job(self.job_id))

    def wait(self, timeout_s: float | None = None) -> str:
        """Block until the job ends (timeout_s None: however long it runs); its final status.
        Raises JobWaitTimeout past timeout_s (the job goes on), ClusterUnreachable when the job
        API stays away for two minutes."""
        from jobs.submit import wait

        return wait(self.address, self.job_id, timeout_s, self.token_env)

    def __repr__(self) -> str:
        return f"<tidegate submitted job {self.job_id} on {self.address}>"


def submit(spec: SpecLike, address: str, *, until_drained: bool = False, follow: bool = False,
           submission_id: str | None = None, token_env: str = "RAY_AUTH_TOKEN",
           master_key_file: str | None = None) -> SubmittedJob:  # fmt: skip
    """Submit a spec file to a Ray cluster with the repo as the job's working_dir (`tidegate submit`).

    The file is what is shipped: pass its path, or a spec from `tidegate.load_spec` (one built
    from a mapping has no file: write it out first).

    >>> job = tidegate.submit("examples/demo.yaml", address="http://head:8265", until_drained=True)
    >>> job.wait()
    'SUCCEEDED'
    """
    from jobs.submit import submit as _submit

    path = spec.source_path if isinstance(spec, JobSpec) else str(spec)
    if path is None:
        raise SpecError("submit ships the spec's file: this spec was built from a mapping; write it to a YAML "
                        "file and pass its path (or load it with tidegate.load_spec)")  # fmt: skip
    job_id = _submit(path, address, until_drained=until_drained, submission_id=submission_id, follow=follow,
                     token_env=token_env, master_key_file=master_key_file)  # fmt: skip
    return SubmittedJob(job_id, address, token_env)


# -- the tables --------------------------------------------------------------------------------------


def _keyring(spec: JobSpec, keyring):
    """The reader's keyring: the one given, else the spec's; a keyring given as a path (or the
    spec's) takes its master key from the spec's variable (encryption.master_key_env). Opened only
    once a value needs a key (plain columns read without any)."""
    if not spec.encryption.needs_keys or not (keyring is None or isinstance(keyring, (str, Path))):
        return keyring
    from crypto.reader import KeyringOnFirstUse

    enc = spec.encryption
    return KeyringOnFirstUse(keyring if keyring is not None else enc.keyring, enc.master_key_env)


def _read(spec: JobSpec, uri: str, keyring, where, columns, backend, on_missing_key, version):
    from crypto.reader import read_results as _read_table

    return _read_table(uri, _keyring(spec, keyring), columns=columns, on_missing_key=on_missing_key, backend=backend,
                       storage_options=spec.sink.storage_options or None, version=version, where=where)  # fmt: skip


def read_results(spec: SpecLike, *, where: pl.Expr | None = None, columns: Sequence[str] | None = None,
                 keyring=None, backend: Literal["polars", "pandas", "arrow"] = "polars",
                 on_missing_key: Literal["raise", "keep"] = "raise", version: int | None = None):  # fmt: skip
    """The job's results table, decrypted where the keyring opens it (crypto/reader.py).

    Lazy: `where` (a polars expression over plain columns) and `columns` are applied before
    anything is read, and only the selected rows are decrypted: a tenant-only keyring reads its
    tenant's rows with `where=pl.col("tenant") == "acme"`, and raises KeyPermissionError naming the
    tenant on another's (on_missing_key="keep" leaves those values encrypted instead).
    keyring: a Keyring or a keyring file; default: the spec's encryption.keyring (when encryption is on).

    >>> tidegate.read_results(spec, where=pl.col("status") == "flagged", columns=["id", "output_text"])
    """
    spec = _spec(spec)
    return _read(spec, spec.sink.results, keyring, where, columns, backend, on_missing_key, version)


def read_dead_letters(spec: SpecLike, *, where: pl.Expr | None = None, columns: Sequence[str] | None = None,
                      keyring=None, backend: Literal["polars", "pandas", "arrow"] = "polars",
                      on_missing_key: Literal["raise", "keep"] = "raise", version: int | None = None):  # fmt: skip
    """The job's dead-letter table (one row per input that could not be processed, with its
    stage, error_class and error), read like read_results.

    >>> tidegate.read_dead_letters(spec).group_by("error_class").len()
    """
    spec = _spec(spec)
    return _read(spec, spec.sink.dead_letter, keyring, where, columns, backend, on_missing_key, version)


def read_runs(spec: SpecLike, *, run_id: str | None = None, kind: Literal["run", "commit"] | None = None) -> pl.DataFrame:
    """The job's rows of the runs table (connectors/runs.py): one per commit and one per run,
    with rows, tokens, cost, throughput and engine figures; ordered by ended_at.

    >>> tidegate.read_runs(spec, kind="run").select("run_id", "status", "rows_ok", "cost")
    """
    import polars as pl

    from connectors.runs import RunsTable

    spec = _spec(spec)
    frame = RunsTable.for_results(spec.sink.results, spec.sink.storage_options or None).read(run_id=run_id, job=spec.name)
    return frame.filter(pl.col("kind") == kind) if kind is not None else frame


def status(spec: SpecLike) -> dict:
    """The job's status as `tidegate status SPEC --json` prints it: the source's partitions, lag,
    the tables, the last commit, dead letters and recent runs."""
    from jobs.status import collect_status

    return collect_status(_spec(spec))


def usage(spec: SpecLike, by: Literal["run", "day", "tenant"] = "run") -> pl.DataFrame:
    """Tokens and cost grouped by run, day or tenant (jobs/usage.py says what each counts).

    >>> tidegate.usage(spec, by="tenant")
    shape: (2, 7)  tenant | rows | prompt_tokens | completion_tokens | cost | currency | priced
    """
    from jobs.usage import usage_frame

    return usage_frame(_spec(spec), by)


def report(spec: SpecLike, out: str | Path = "report.html") -> Path:
    """Write the job's self-contained HTML report (`tidegate report`, jobs/report.py); its path."""
    from jobs.report import write_report

    return write_report(_spec(spec), out)
