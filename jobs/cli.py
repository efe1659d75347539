"""The `tidegate` command line.

    tidegate run SPEC.yaml [--until-drained | --follow] [--address ADDR]
    tidegate submit SPEC.yaml --address http://HEAD:8265 [--until-drained] [--wait]
    tidegate jobs list|status|logs|stop [JOB_ID] --address http://HEAD:8265
    tidegate demo [--events N]
    tidegate broker [--port PORT] [--data DIR]
    tidegate produce FILE.jsonl (--spec SPEC | --bootstrap HOST:PORT --topic T)
    tidegate schema SPEC [--format json-schema|avro]
    tidegate status SPEC [--json] | tidegate usage SPEC [--by run|day|tenant] [--json]
    tidegate report SPEC [--out report.html]
    tidegate maintain SPEC [--optimize] [--vacuum] [--checkpoint]
    tidegate model make-tiny DIR [--seed N]
    tidegate serve SPEC [--address ADDR] [--blocking] [--master-key-file PATH] | serve status --address ADDR | serve stop NAME --address ADDR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from jobs.keys_cli import keys_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tidegate: event-driven batch LLM inference.")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(model_app, name="model")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs submitted to a Ray cluster (Ray's JobSubmissionClient).")
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter table.")
app.add_typer(dlq_app, name="dlq")

AddressOption = Annotated[
    str, typer.Option("--address", envvar="RAY_API_SERVER_ADDRESS", help="Ray dashboard address, http://HEAD:8265.")
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", help="Show the engines' and Ray's own logs here (default: in Ray's log folder).")
]


def _verbose(on: bool) -> None:
    import os

    if on:
        os.environ["TIDEGATE_VERBOSE"] = "1"  # read by jobs.run.init_ray (and inherited by children)


TokenEnvOption = Annotated[
    str, typer.Option("--token-env", help="Environment variable holding the cluster's Ray auth token.")
]


def _cluster_call(fn, exit_codes: dict | None = None):
    """Run a call to the cluster; a refused token or a bad spec is one 'error:' line, exit 2 (or
    the code `exit_codes` gives the error's class)."""
    from schemas.errors import TidegateError

    try:
        return fn()
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(next((c for k, c in (exit_codes or {}).items() if isinstance(e, k)), 2))


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    until_drained: Annotated[bool, typer.Option("--until-drained", help="Stop once every partition is consumed and committed.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Delta incremental sources: keep polling for new versions until SIGTERM.")] = False,
    log_format: Annotated[Optional[str], typer.Option("--log-format", help="text | json (default: TIDEGATE_LOG_FORMAT or text).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a spec: Kafka sources consume until stopped (or drained); Delta sources until committed."""
    from jobs.run import main

    _verbose(verbose)
    raise typer.Exit(main(str(spec), until_drained, address, follow, log_format))


@app.command()
def check(spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")]) -> None:
    """Validate a spec and print it, secrets masked. Runs none of the code the spec names: says
    which import paths `run` would load and why the trust policy allows them (README, "A spec is code")."""
    import yaml

    from compute.validation import check_offline
    from jobs.run import load_job_spec
    from schemas.errors import TidegateError

    try:
        parsed = load_job_spec(spec)
        verdicts = check_offline(parsed)
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    refused = [v for v in verdicts if not v.allowed]
    for v in refused:
        typer.echo(f"error: {v.ref.field}: run would refuse to import {v.ref.path}: {v.why}", err=True)
    if refused:
        raise typer.Exit(2)
    from jobs.logs import redact_text

    typer.echo(redact_text(yaml.safe_dump(parsed.redacted(), sort_keys=False)))  # URL credentials too
    typer.echo(f"# rules: {', '.join(f'{r.label} ({r.on_fail})' for r in parsed.rules) or 'none'}")
    for v in verdicts:
        typer.echo(f"# code: {v.ref.field} = {v.ref.path}: run would import it ({v.why})")


@dlq_app.command("replay")
def dlq_replay(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML) of the job whose dead letters to replay.")],
    where: Annotated[Optional[str], typer.Option(help="SQL predicate over the dead-letter columns.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Re-process dead-lettered rows after a fix, exactly once; marks them replayed."""
    from jobs.replay import main

    _verbose(verbose)
    raise typer.Exit(main(str(spec), where, address))


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML); shipped with the code.")],
    address: AddressOption,
    until_drained: Annotated[bool, typer.Option("--until-drained", help="Stop once drained.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Block until the job ends; exit 0 only if it succeeded.")] = False,
    wait_timeout: Annotated[Optional[float], typer.Option(
        "--wait-timeout", min=0, help="With --wait: give up waiting after this many seconds (exit 3; the job goes "
        "on). Default: as long as the job runs.")] = None,  # fmt: skip
    submission_id: Annotated[Optional[str], typer.Option(help="Job id to use (default: Ray's).")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Delta incremental sources: keep polling.")] = False,
    token_env: TokenEnvOption = "RAY_AUTH_TOKEN",
    master_key_file: Annotated[Optional[str], typer.Option(
        "--master-key-file", help="Where the cluster keeps this job's master key (a path on the head node); "
        "the job alone gets it as <encryption.master_key_env>_FILE.")] = None,  # fmt: skip
) -> None:
    """Submit a spec to a Ray cluster with the repo as the job's working_dir."""
    from jobs import submit as sub

    job_id = _cluster_call(lambda: sub.submit(spec, address, until_drained=until_drained, submission_id=submission_id,
                                              follow=follow, token_env=token_env, master_key_file=master_key_file))  # fmt: skip
    typer.echo(job_id)
    if wait:
        try:
            status = _cluster_call(lambda: sub.wait(address, job_id, wait_timeout, token_env=token_env),
                                   exit_codes={sub.JobWaitTimeout: 3})  # fmt: skip
        except KeyboardInterrupt:  # the job is the cluster's now: Ctrl-C ends the wait, not the job
            typer.echo(f"stopped waiting; job {job_id} goes on (`tidegate jobs stop {job_id}` stops it)", err=True)
            raise typer.Exit(130)
        typer.echo(f"{job_id}: {status}")
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@jobs_app.command("list")
def jobs_list(address: AddressOption, token_env: TokenEnvOption = "RAY_AUTH_TOKEN") -> None:
    """List jobs on the cluster."""
    from rich.console import Console
    from rich.table import Table

    from jobs.submit import client

    table = Table("job id", "status", "tidegate job", "entrypoint")
    for info in sorted(_cluster_call(lambda: client(address, token_env).list_jobs()), key=lambda j: j.start_time or 0):
        table.add_row(info.submission_id or info.job_id or "", str(info.status.value),
                      (info.metadata or {}).get("tidegate_job", ""), info.entrypoint)  # fmt: skip
    Console().print(table)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption, token_env: TokenEnvOption = "RAY_AUTH_TOKEN") -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from jobs.submit import client

    typer.echo(str(_cluster_call(lambda: client(address, token_env).get_job_status(job_id)).value))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: AddressOption, token_env: TokenEnvOption = "RAY_AUTH_TOKEN") -> None:
    """Print a job's logs."""
    from jobs.submit import client

    typer.echo(_cluster_call(lambda: client(address, token_env).get_job_logs(job_id)), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption, token_env: TokenEnvOption = "RAY_AUTH_TOKEN") -> None:
    """Ask a job to stop (SIGTERM to its driver: in-flight batches are finished and committed)."""
    from jobs.submit import client

    stopped = _cluster_call(lambda: client(address, token_env).stop_job(job_id))
    typer.echo("stop requested" if stopped else "job was not running")


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Valid request events to produce.")] = 300,
    lake: Annotated[Path, typer.Option(help="Folder for the demo's tables (its results, dead_letter and runs tables there are replaced; nothing else is touched).")] = Path("lake/demo"),
    verbose: VerboseOption = False,
) -> None:
    """Start a broker, produce sample events, run the demo job until drained, show the output."""
    from jobs.demo import run_demo
    from schemas.errors import TidegateError

    _verbose(verbose)
    try:
        code = run_demo(events=events, lake=lake)
    except TidegateError as e:  # no vLLM, no broker binary, ...: one line, as `run` says it
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(code)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 0,
    data: Annotated[Optional[Path], typer.Option(help="Keep topics in this folder (they survive a restart); default: in memory.")] = None,
) -> None:
    """Run the embedded Kafka-protocol broker (tansu) in the foreground."""
    from connectors.broker import EmbeddedBroker
    from schemas.errors import TidegateError

    try:
        b = EmbeddedBroker(port=port or None, data_dir=data).start()
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"bootstrap_servers: {b.bootstrap_servers}  (pid {b.process.pid}; Ctrl-C stops it)")
    process = b.process
    try:
        while process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    finally:
        b.stop()
    # It ended by itself (Ctrl-C returned above).
    typer.echo(f"error: the broker exited with code {process.returncode}", err=True)
    raise typer.Exit(2)


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one event per line ('-' for stdin).")],
    spec: Annotated[Optional[Path], typer.Option(help="Job spec: its topic, brokers, event contract and format.")] = None,
    bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (default: the spec's).")] = None,
    topic: Annotated[Optional[str], typer.Option(help="Topic to send to (default: the spec's).")] = None,
    key_field: Annotated[Optional[str], typer.Option(help="Without --spec: the event field with the id, the message key (default: id).")] = None,
    partitions: Annotated[int, typer.Option(help="Partitions if the topic must be created.")] = 4,
) -> None:
    """Send events from a JSON Lines file through the producer SDK (tidegate.producer): every event is
    checked first (a bad line is named and nothing is sent), keyed by its id, sent with acks=all."""
    import json

    from connectors.kafka import try_create_topic
    from schemas.errors import EventContractError, ProduceError, TidegateError
    from jobs.producer import EventProducer

    try:
        stream = sys.stdin.buffer if str(file) == "-" else open(file, "rb")
    except OSError as e:
        typer.echo(f"error: cannot read {file}: {e.strerror}", err=True)
        raise typer.Exit(2)
    events, lines = [], []
    for n, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError as e:
            typer.echo(f"error: line {n}: not valid JSON ({type(e).__name__}); nothing was sent", err=True)
            raise typer.Exit(2)
        events.append(event)
        lines.append(n)
    try:
        if spec is not None:
            producer = EventProducer.from_spec(spec, bootstrap_servers=bootstrap, topic=topic)
        elif bootstrap and topic:
            producer = EventProducer(bootstrap, topic, key_field or "id")
        else:
            typer.echo("error: give --spec, or --bootstrap and --topic", err=True)
            raise typer.Exit(2)
        with producer:
            failed = try_create_topic(producer.bootstrap_servers, producer.topic, partitions)
            if failed:  # sending below says whether the topic is usable
                typer.echo(f"note: could not create topic {producer.topic!r} ({failed}); sending anyway", err=True)
            try:
                sent = producer.send_many(events)
            except EventContractError as e:
                where = f"line {lines[e.record]}: " if e.record is not None else ""
                typer.echo(f"error: {where}{str(e).split(': ', 1)[-1]}; nothing was sent", err=True)
                raise typer.Exit(2)
            except ProduceError as e:  # named by its line; the others delivered are said (a rerun repeats them)
                where = f"line {lines[e.record]}: " if e.record is not None else ""
                typer.echo(f"error: {where}{e}", err=True)
                raise typer.Exit(2)
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"sent {len(sent)} event(s) to {producer.topic}")


@app.command()
def schema(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    format: Annotated[str, typer.Option("--format", help="json-schema | avro")] = "json-schema",
) -> None:
    """Print the contract of the events the job accepts: what its template and fields need, with
    source.event_schema's overrides (compute/event_contract.py)."""
    import json

    from compute.event_contract import EventContract
    from schemas.errors import TidegateError
    from schemas.spec import load_spec

    if format not in ("json-schema", "avro"):
        typer.echo(f"error: --format {format!r}: use json-schema or avro", err=True)
        raise typer.Exit(2)
    try:
        contract = EventContract(load_spec(spec))
        out = contract.json_schema if format == "json-schema" else contract.avro_schema()
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(out, indent=2))


@app.command()
def maintain(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML): its sink's tables and sink.maintenance.")],
    optimize: Annotated[bool, typer.Option("--optimize", help="Compact small files (target sink.maintenance.target_file_mb).")] = False,
    vacuum: Annotated[bool, typer.Option("--vacuum", help="Delete files unreferenced for vacuum_retention_hours.")] = False,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Write a checkpoint and clean up expired log files.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Vacuum: also delete files under the tables' folders that no version names "
                                       "(e.g. replaced files whose tombstones expired unseen); refused if another table is nested there.")] = False,
) -> None:
    """Maintain the job's Delta tables (none of the flags: all three). Safe while the job runs:
    positions survive, a compaction that races a commit is retried."""
    from rich.console import Console
    from rich.table import Table

    from connectors.sink import open_sink, stored_schemas
    from schemas.errors import TidegateError
    from schemas.spec import load_spec

    if not (optimize or vacuum or checkpoint):
        optimize = vacuum = checkpoint = True
    try:
        job = load_spec(spec)
        sink = open_sink(job)
        if not callable(getattr(sink, "maintain", None)):
            raise TidegateError(f"sink.kind {job.sink.kind!r} has no table maintenance")
        sink.use_schemas(*stored_schemas(job, sink))  # encrypted columns are binary there
        sink.open()
        # --full: the vacuum lists the tables' folders too, so it also finds files whose tombstones
        # expired before a round saw them (the rounds read the log only).
        report = sink.maintain(compact=optimize, checkpoint=checkpoint, vacuum=vacuum, full_vacuum=full)
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    table = Table(title=f"{job.name}: table maintenance")
    for col in ("table", "version", "files", "MB", "log files", "log MB", "seconds", "note"):
        table.add_column(col)
    mb = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    failed = False
    for role, r in report.items():
        b, a, rep = r["before"], r["after"], r["report"]
        failed |= rep["error"] is not None
        table.add_row(role, f"{b['version']} -> {a['version']}", f"{b['files']} -> {a['files']}",
                      f"{mb(b['data_bytes'])} -> {mb(a['data_bytes'])}",
                      f"{b['log_files'] if b['log_files'] is not None else '-'} -> {a['log_files'] if a['log_files'] is not None else '-'}",
                      f"{mb(b['log_bytes'])} -> {mb(a['log_bytes'])}", f"{rep['seconds']:.1f}",
                      rep["error"] or (f"vacuumed {rep['vacuumed_files']}" if rep["vacuumed_files"] else ""))  # fmt: skip
    Console().print(table)
    raise typer.Exit(1 if failed else 0)


@model_app.command("make-tiny")
def make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the model.")],
    seed: Annotated[int, typer.Option(help="Seed for the weights and the tokenizer corpus.")] = 0,
) -> None:
    """Build a tiny random Llama model with tokenizer and chat template, offline."""
    from jobs.tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed)
    typer.echo(f"tiny model written to {path}")


@app.command("status")
def status_cmd(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as one JSON object.")] = False,
) -> None:
    """Where a job stands, read from its tables: positions and lag per partition, last commit,
    dead letters by stage/class, recent runs. Writes nothing."""
    import json

    from rich.console import Console

    from jobs.run import load_job_spec
    from jobs.status import collect_status, render_status
    from schemas.errors import TidegateError

    try:
        result = collect_status(load_job_spec(spec))
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_status(result, Console())


@app.command("usage")
def usage_cmd(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    by: Annotated[str, typer.Option("--by", help="run | day | tenant")] = "run",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
) -> None:
    """Tokens and cost of a job, per run, UTC day or tenant (model.pricing prices them). Writes nothing."""
    import json

    from rich.console import Console
    from rich.table import Table

    from jobs.run import load_job_spec
    from jobs.usage import usage_frame
    from schemas.errors import TidegateError

    try:
        frame = usage_frame(load_job_spec(spec), by)
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if as_json:
        for row in frame.to_dicts():
            typer.echo(json.dumps(row, default=str))
        return
    table = Table(title=f"usage by {by}")
    for name in frame.columns:
        table.add_column(name, justify="right" if frame[name].dtype.is_numeric() else "left")

    from jobs.formatting import format_value

    for row in frame.iter_rows():
        table.add_row(*(format_value(v, decimals=4) for v in row))
    Console().print(table)


@app.command("report")
def report_cmd(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """One self-contained HTML page about a job (runs, throughput, latency, dead letters, rules,
    groundedness, cost per tenant), charts inlined: it opens offline. Reads the tables, writes only --out."""
    from jobs.report import write_report
    from jobs.run import load_job_spec
    from schemas.errors import TidegateError

    try:
        path = write_report(load_job_spec(spec), out)
    except TidegateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


@app.command("serve")
def serve_cmd(
    target: Annotated[list[str], typer.Argument(help="SPEC.yaml to deploy; or `status`; or `stop NAME`.")],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")] = None,
    blocking: Annotated[bool, typer.Option("--blocking", help="Serve until Ctrl-C, then delete the application (always so on a local Ray).")] = False,
    master_key_file: Annotated[Optional[str], typer.Option(
        "--master-key-file", help="Where the replicas' nodes keep the master key (a path there); the replicas "
        "alone get it as <encryption.master_key_env>_FILE.")] = None,  # fmt: skip
    verbose: VerboseOption = False,
) -> None:
    """The spec's online endpoint on Ray Serve: OpenAI-compatible routes, /v1/jobs/NAME/invoke and
    /events, with the job's guards, tenants and audit tables (docs/serving.md)."""
    _verbose(verbose)
    verb = target[0]
    if verb in ("status", "stop"):
        import os

        import ray
        from ray import serve

        if len(target) != (2 if verb == "stop" else 1):
            typer.echo("usage: tidegate serve status | tidegate serve stop NAME", err=True)
            raise typer.Exit(2)
        addr = address or os.environ.get("RAY_ADDRESS")
        if not addr:
            typer.echo("error: give --address (or RAY_ADDRESS): the cluster the application runs on", err=True)
            raise typer.Exit(2)
        ray.init(address=addr, include_dashboard=False, logging_level="WARNING")
        if verb == "stop":
            from actors.remote import delete_app_actors

            serve.delete(target[1])
            delete_app_actors(target[1])  # its shared limiter and idempotency claims, if it has them
            typer.echo(f"{target[1]}: deleted")
            return
        def plain(v) -> str:
            return str(getattr(v, "value", v))

        apps = serve.status().applications
        for name, app_status in apps.items():
            typer.echo(f"{name}: {plain(app_status.status)}")
            for dname, d in app_status.deployments.items():
                replicas = ", ".join(f"{n} {plain(state)}" for state, n in d.replica_states.items())
                typer.echo(f"  {dname}: {plain(d.status)} (replicas: {replicas or 'none'})")
        if not apps:
            typer.echo("no Serve applications")
        return
    if len(target) != 1:
        typer.echo("usage: tidegate serve SPEC.yaml [--address ADDR] [--blocking] [--master-key-file PATH]", err=True)
        raise typer.Exit(2)
    from jobs.serve import main as serve_main

    raise typer.Exit(serve_main(target[0], address, blocking, master_key_file))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
