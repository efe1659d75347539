"""Entry point of a job run: `tidegate run SPEC.yaml` or `python -m jobs.run SPEC.yaml`.

Owns the process-level concerns around `PipelineJob`: connecting to (or starting) Ray,
starting the embedded broker when the spec names no Kafka cluster, turning SIGTERM/SIGINT
into a clean stop, and printing the summary.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from schemas.errors import EngineError, TidegateError
from schemas.spec import JobSpec, load_spec

log = logging.getLogger("tidegate")


def configure_logging(level: str | None = None, stream=None) -> None:
    """Text log lines on stderr (or `stream`), secrets redacted (jobs.logs.configure_text_logging)."""
    from jobs.logs import configure_text_logging

    configure_text_logging(level, stream)


def load_job_spec(path: str | Path) -> JobSpec:
    """load_spec with every connector's source kind known: a built-in kind whose settings live in
    its connector module is loaded when a spec names it (connectors.source installs the loader)."""
    import connectors.source  # noqa: F401

    return load_spec(path)


def verbose() -> bool:
    """TIDEGATE_VERBOSE=1 (`--verbose`): engine and Ray logs in the terminal, not only in files."""
    return os.environ.get("TIDEGATE_VERBOSE", "").strip() not in ("", "0", "false")


def init_ray(spec: JobSpec, address: str | None = None) -> str | None:
    """Connect to the spec's Ray cluster, or start a local one. Returns, for a local cluster
    started quietly, the folder of its logs (the engines' and Ray's own output goes there, not
    to this terminal, unless `verbose()`); else None."""
    import ray

    if ray.is_initialized():
        return None
    address = address or spec.ray.address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    if address:
        # A cluster's driver logs are what `ray job logs` shows: the workers' output stays in them.
        # (The workers' log redaction comes with the submission's runtime_env, jobs/submit.py.)
        ray.init(address=address, **common)
        return None
    # A local cluster started by this process. Ray's raylet and GCS die with us (parent-death
    # signal) but some of their children do not: the reaper cleans those up after a `kill -9`.
    from jobs.worker import WORKER_SETUP_HOOK
    from jobs.reaper import start_for_current_process

    start_for_current_process()
    extra = {}
    if spec.ray.metrics_export_port:
        # Prometheus scrapes a local cluster's metrics here (deploy/prometheus/prometheus.yml).
        extra["_metrics_export_port"] = spec.ray.metrics_export_port
    loud = verbose()
    # Ray announces at every local start that token auth is on (it stays on): said in its docs.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    if not loud:
        notice.setLevel(logging.ERROR)
    try:
        context = ray.init(
            num_cpus=os.cpu_count(),
            object_store_memory=int(os.environ.get("TIDEGATE_OBJECT_STORE_BYTES", 512 * 2**20)),
            _temp_dir=os.environ.get("TIDEGATE_RAY_TEMP_DIR"),
            log_to_driver=loud,
            # Every worker's log records redacted like the driver's, its tables sent our way (jobs/worker.py).
            runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK},
            **common,
            **extra,
        )
    finally:
        notice.setLevel(level)
    if loud:
        return None
    logs = str(Path(context.address_info["session_dir"]) / "logs")
    log.info("engine and Ray logs: %s (--verbose shows them here)", logs)
    return logs


class _ProgressBar:
    """rows committed / total, rows/s and ETA for table sources (rich)."""

    def __init__(self, console: Console, label: str = "rows"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
        self._task = None
        self._started = None

    def __call__(self, done: int, total: int | None) -> None:
        import time

        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("rows", total=total or None, rate="")
            self._started = time.monotonic()
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self._progress.update(self._task, completed=done, total=total or None, rate=f"{done / elapsed:,.0f} rows/s")

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


class _HashingBar:
    """Bytes of the model's files hashed for lineage (model_revision), at start (rich)."""

    def __init__(self, console: Console):
        self.console = console
        self._progress = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("[bold]hashing the model's files (lineage)"), BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(), console=self.console, transient=True)  # fmt: skip
            self._progress.start()
            self._task = self._progress.add_task("hash", total=total or None)
        self._progress.update(self._task, completed=done, total=total or None)
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _StreamStatus:
    """One live line for a stream (Kafka) run on a terminal: consumed, committed, dead letters,
    backlog (the lag, measured every few seconds) and rows/s since the run started (rich)."""

    def __init__(self, console: Console):
        self.console = console
        self.job = None
        self._live = None

    def attach(self, job) -> None:
        from rich.live import Live

        self.job = job
        self._live = Live(get_renderable=self._line, console=self.console, refresh_per_second=2, transient=True)
        self._live.start()

    def _line(self):
        from rich.text import Text

        s = self.job.stats
        done = s.ok + s.dead_lettered
        backlog = "?" if s.backlog is None else f"{s.backlog:,}"
        return Text(f"consumed {s.consumed:,} · committed {done:,} ({s.dead_lettered:,} dead letters) · "
                    f"backlog {backlog} · {done / max(s.elapsed_s, 1e-6):,.1f} rows/s · {s.commits:,} commits",
                    style="bold")  # fmt: skip

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def run_job(
    spec: JobSpec,
    until_drained: bool = False,
    address: str | None = None,
    console: Console | None = None,
    follow: bool = False,
    run_id: str | None = None,
    components=None,
    *,
    stop: threading.Event | None = None,
    handle_signals: bool = True,
    progress=None,
    on_job=None,
    hashing=None,
):
    """Run a spec to completion (or until signalled). Returns the job's stats.

    A bounded source (a table) ends the run once its rows are committed, unless `follow`;
    `components` (jobs.pipeline.JobComponents) replaces the spec's engine, source or sink.
    Embedding it (the `tidegate.Job` API): `stop` ends the run when set; `handle_signals=False`
    leaves the process's signal handlers alone; `progress(done, total)` and `hashing(bytes_done,
    bytes_total)` replace the console's bars; `on_job(PipelineJob)` is called once the job is
    built (its live `stats`)."""
    from schemas.trusted_code import refuse_untrusted

    refuse_untrusted(spec.code_refs(), spec.allowed_modules)  # before anything starts: exit 2
    from connectors.source import source_class
    from jobs.pipeline import PipelineJob

    console = console or Console(stderr=True)
    stop = stop if stop is not None else threading.Event()

    def _on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("received %s: finishing in-flight batches, then stopping", signal.Signals(signum).name)
        stop.set()

    remote = address or spec.ray.address or os.environ.get("RAY_ADDRESS")
    if not remote and not (Path(spec.model.path) / "config.json").is_file():
        # On a local cluster the engines see this filesystem: fail before starting anything.
        raise EngineError(f"model.path {spec.model.path!r} is not a model directory (no config.json)")
    if not remote and not spec.pool.num_gpus:
        from compute.engine import cpu_dtype_advice

        advice = cpu_dtype_advice(spec.model)
        if advice:
            log.warning(advice)
    bounded = source_class(spec.source.kind).bounded
    bar = _ProgressBar(console) if progress is None and bounded else None
    hashing_bar = _HashingBar(console) if hashing is None and console.is_terminal else None  # redrawn: terminals only
    # A stream's live line, on a terminal only (a log file gets the summary, not a redrawn line).
    live = _StreamStatus(console) if progress is None and not bounded and console.is_terminal else None
    try:
        ray_logs = init_ray(spec, address)
        # After ray.init: a local Ray installs its own SIGTERM handler (sys.exit) in the driver.
        if handle_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        job = PipelineJob(
            spec, run_id=run_id, fixed_cluster=not remote, progress=progress or bar, follow=follow,
            components=components, hashing=hashing or hashing_bar,
        )  # fmt: skip
        if on_job is not None:
            on_job(job)
        if live is not None:
            live.attach(job)
        stats = job.run(until_drained=until_drained, stop=stop)
    finally:
        for display in (bar, hashing_bar, live):
            if display is not None:
                display.close()
    if ray_logs:
        stats.notes.append(f"engine and Ray logs: {ray_logs} (--verbose shows them here)")
    print_summary(spec, stats, console)
    return stats


def print_summary(spec: JobSpec, stats, console: Console) -> None:
    table = Table(title=f"tidegate run {stats.run_id} ({spec.name})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("events consumed", f"{stats.consumed:,}")
    table.add_row("rows written", f"{stats.ok:,}")
    table.add_row("  of which flagged", f"{stats.flagged:,}")
    table.add_row("rows dead-lettered", f"{stats.dead_lettered:,}")
    for cls, n in sorted(stats.dead_by_class.items()):
        table.add_row(f"  {cls}", f"{n:,}")
    for rule, n in sorted(stats.rule_failures.items()):
        table.add_row(f"  rule {rule} failed", f"{n:,} (outputs, retries included)")
    table.add_row("retried generations", f"{stats.retried:,}")
    table.add_row("prompt tokens", f"{stats.prompt_tokens:,}")
    table.add_row("completion tokens", f"{stats.completion_tokens:,}")
    if spec.model.pricing is not None:
        from compute.pricing import token_cost

        cost = token_cost(spec.model.pricing, stats.prompt_tokens, stats.completion_tokens)
        table.add_row("cost", f"{cost:,.4f} {spec.model.pricing.currency} (model.pricing)")
    table.add_row("commits", f"{stats.commits:,}")
    if spec.sink.topic is not None:
        table.add_row(f"rows published to {spec.sink.topic.name}", f"{stats.published:,}")
    table.add_row("peak rows read, not committed", f"{stats.peak_uncommitted:,}")
    table.add_row("elapsed", f"{stats.elapsed_s:.1f} s")
    table.add_row("throughput", f"{stats.rows_per_s:.1f} rows/s")
    if stats.engines_ready_s is not None:
        table.add_row("engines ready after", f"{stats.engines_ready_s:.1f} s")
        table.add_row("throughput once ready", f"{stats.rows_per_s_after_start:.1f} rows/s")
    table.add_row("engines (peak)", f"{stats.peak_engines}")
    shared = spec.engines_app is not None
    if shared:
        table.add_row("engines of", f"Serve application {spec.engines_app!r}")
        table.add_row("note", "pool.backend serve: the engine figures below are one replica's, online requests included")
    if stats.engine_busy_fraction is not None:
        table.add_row("engine busy", f"{stats.engine_busy_fraction:.1%}")
    if stats.engine_idle is not None:
        table.add_row("engine idle", f"{stats.engine_idle:.1%} (nothing in the engine)")
    if stats.engine_occupancy is not None:
        table.add_row("engine running set", f"{stats.engine_occupancy:.1%} of max_num_seqs (mean over decode steps)")
    if stats.engine_peak_batches is not None:
        growth = "" if shared else f", up to {spec.pool.batches_cap} while long outputs finish"
        table.add_row("engine batches at once", f"at most {stats.engine_peak_batches} (pool.batches_in_flight "
                      f"{spec.pool.batches_in_flight}{growth})")  # fmt: skip
    if stats.prefix_cache_hit_rate is not None:
        table.add_row("prefix cache hits", f"{stats.prefix_cache_hit_rate:.1%} of prompt tokens")
    if stats.first_commit_s is not None:
        table.add_row("first commit after", f"{stats.first_commit_s:.1f} s")
    for note in stats.notes:
        table.add_row("note", note)
    from jobs.logs import redact_text

    table.add_row("results table", redact_text(spec.sink.results))  # a URI's credentials masked
    table.add_row("dead-letter table", redact_text(spec.sink.dead_letter))
    console.print(table)


def main(
    spec_path: str,
    until_drained: bool = False,
    address: str | None = None,
    follow: bool = False,
    log_format: str | None = None,
    components=None,
) -> int:
    import uuid

    run_id = uuid.uuid4().hex[:16]
    chosen = log_format or os.environ.get("TIDEGATE_LOG_FORMAT") or "text"
    if chosen not in ("text", "json"):  # before stop 43 any other value meant text, silently
        where = "--log-format" if log_format else "TIDEGATE_LOG_FORMAT"
        print(f"error: {where} must be text or json, not {chosen!r}", file=sys.stderr)
        return 2
    if chosen == "json":
        from jobs.logs import configure_json_logging

        configure_json_logging(run_id=run_id)  # one JSON object per line, with run_id; secrets redacted
    else:
        configure_logging()
    try:
        spec = load_job_spec(spec_path)
        run_job(spec, until_drained=until_drained, address=address, follow=follow, run_id=run_id, components=components)
    except TidegateError as e:
        print(f"error: {e}", file=sys.stderr)  # one plain line (or block), never wrapped
        return 2
    except KeyboardInterrupt:  # a second signal (or Ctrl-C before the handlers): stop at once, no traceback
        print("stopped at once: batches in flight were not committed; the next run reads them again",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


def arg_parser(prog: str = "python -m jobs.run"):
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description="Run a Tidegate job spec.")
    parser.add_argument("spec")
    parser.add_argument("--until-drained", action="store_true")
    parser.add_argument("--follow", action="store_true", help="Delta incremental sources: keep polling for new versions")
    parser.add_argument("--address", default=None)
    parser.add_argument("--log-format", choices=["text", "json"], default=None, help="default: TIDEGATE_LOG_FORMAT or text")
    parser.add_argument("--verbose", action="store_true", help="engine and Ray logs here too (TIDEGATE_VERBOSE=1)")
    return parser


if __name__ == "__main__":
    a = arg_parser().parse_args()
    if a.verbose:
        os.environ["TIDEGATE_VERBOSE"] = "1"
    sys.exit(main(a.spec, a.until_drained, a.address, a.follow, a.log_format))
