"""`tidegate dlq replay SPEC.yaml [--where SQL]`: re-process dead-lettered rows after a fix.

    1. resume   replays left unfinished by a crash (rows with replayed_by set, replayed_at null):
                finish them first, under their own id
    2. plan     one Delta UPDATE marks the rows to replay: replayed_by = R (a new run id), for rows
                not replayed yet that match --where (a SQL predicate over the dead-letter columns)
    3. run      the ordinary job loop over the plan (connectors/replay.py): results land in the
                results table under the events' original positions, rows that fail again land in
                the dead-letter table as new rows (run_id = R), committed with R's own positions
    4. finish   one UPDATE sets replayed_at on the plan's rows

Exactly once: the plan is fixed before any work; the replay's position lives in the results
table's Delta log like any partition's; a rerun after a crash at any point resumes the same plan
(step 1) and skips what R already committed. Rows dead-lettered again by R can be replayed by a
later replay: they are new dead letters.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import CommitFailedError

from connectors.delta import DeltaSink
from connectors.replay import ReplaySink, ReplaySource
from schemas.errors import SpecError
from schemas.records import DEAD_LETTER_SCHEMA
from schemas.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    replays: list[dict] = field(default_factory=list)  # {replay_id, rows, ok, dead_lettered, resumed}


def _update(dt_uri: str, storage_options, retries: int = 5, **kwargs) -> dict:
    """A Delta UPDATE on the dead-letter table, retried when a running job's append races it."""
    for attempt in range(retries):
        try:
            return DeltaTable(dt_uri, storage_options=storage_options).update(**kwargs)
        except CommitFailedError:
            if attempt == retries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _plan(dt_uri: str, storage_options, replay_id: str) -> pa.Table:
    qb = QueryBuilder().register("dl", DeltaTable(dt_uri, storage_options=storage_options))
    sql = "SELECT * FROM dl WHERE replayed_by = '{}'".format(replay_id.replace("'", "''"))
    table = pa.table(qb.execute(sql).read_all())  # string_view / binary_view columns: cast to ours
    return table.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA)


def _decrypted(spec: JobSpec, plan: pa.Table) -> pa.Table:
    """The plan with its raw events in clear (in memory only) when dead-letter raw is encrypted."""
    enc = spec.encryption
    if not (enc.enabled and enc.encrypt_dead_letter_raw) or not plan.num_rows:
        return plan
    from crypto import decrypt_column, row_ids_from
    from crypto.binding import binding_of
    from crypto.stage import EncryptionStage

    stage = EncryptionStage(enc, spec.sink.results, spec.sink.dead_letter)
    dt = DeltaTable(spec.sink.dead_letter, storage_options=spec.sink.storage_options or None)
    binding = binding_of(dt.metadata(), pa.schema(dt.schema().to_arrow()), spec.sink.dead_letter)
    raw = decrypt_column(plan.column("raw"), row_ids_from(plan, binding.row_id_columns), table=binding.label,
                         column="raw", keyring=stage.keyring, tenants=plan.column("tenant"),
                         on_missing_key="keep")  # fmt: skip
    return plan.set_column(plan.schema.get_field_index("raw"), "raw", raw.cast(pa.binary()))


def _pending(dt_uri: str, storage_options) -> list[str]:
    qb = QueryBuilder().register("dl", DeltaTable(dt_uri, storage_options=storage_options))
    rows = pa.table(qb.execute("SELECT DISTINCT replayed_by FROM dl WHERE replayed_by IS NOT NULL AND replayed_at IS NULL").read_all())
    return sorted(rows.column("replayed_by").to_pylist()) if rows.num_rows else []


def replay_dead_letters(spec: JobSpec, where: str | None, fixed_cluster: bool) -> ReplayReport:
    """Run inside a Ray-initialised driver (jobs.run sets that up)."""
    from jobs.pipeline import JobComponents, PipelineJob

    if spec.sink.kind != "delta":
        raise SpecError(f"dlq replay reads and updates a Delta dead-letter table; sink.kind is {spec.sink.kind!r}")
    opts = spec.sink.storage_options or None
    dl_uri = spec.sink.dead_letter
    DeltaSink(spec.name, spec.sink.results, dl_uri, spec.sink.storage_options).open()  # schema upgrade if needed
    report = ReplayReport()
    todo = [(rid, True) for rid in _pending(dl_uri, opts)]
    new_id = uuid.uuid4().hex[:16]
    predicate = "replayed_by IS NULL" + (f" AND ({where})" if where else "")
    try:
        marked = _update(dl_uri, opts, new_values={"replayed_by": new_id}, predicate=predicate)
    except Exception as e:  # a bad --where: DataFusion names the problem
        raise SpecError(f"--where {where!r}: {e}") from None
    if marked.get("num_updated_rows", 0):
        todo.append((new_id, False))
    for replay_id, resumed in todo:
        plan = _decrypted(spec, _plan(dl_uri, opts, replay_id))
        log.info("replay %s: %d dead-lettered row(s)%s", replay_id, plan.num_rows, " (resumed)" if resumed else "")
        sink = ReplaySink(spec.name, spec.sink.results, dl_uri, spec.sink.storage_options, replay_id, plan,
                          write_attempts=spec.sink.write_attempts, write_backoff_s=spec.sink.write_backoff_s)  # fmt: skip
        source = lambda ctx, plan=plan, rid=replay_id: ReplaySource(plan, rid, ctx)  # noqa: E731
        job = PipelineJob(
            spec, run_id=replay_id, fixed_cluster=fixed_cluster, components=JobComponents(source=source, sink=sink)
        )
        stats = job.run(until_drained=True)
        _update(
            dl_uri, opts,
            new_values={"replayed_at": datetime.now(timezone.utc)},
            predicate="replayed_by = '{}' AND replayed_at IS NULL".format(replay_id.replace("'", "''")),
        )  # fmt: skip
        report.replays.append(
            {"replay_id": replay_id, "rows": plan.num_rows, "ok": stats.ok, "dead_lettered": stats.dead_lettered,
             "resumed": resumed}  # fmt: skip
        )
    return report


def main(spec_path: str, where: str | None = None, address: str | None = None) -> int:
    """`tidegate dlq replay` / `python -m jobs.replay`: exit 0 done, 2 a Tidegate error."""
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    from jobs.run import configure_logging, init_ray, load_job_spec
    from schemas.errors import TidegateError

    configure_logging()
    console = Console(stderr=True)
    try:
        spec = load_job_spec(spec_path)
        init_ray(spec, address)
        remote = address or spec.ray.address or os.environ.get("RAY_ADDRESS")
        report = replay_dead_letters(spec, where, fixed_cluster=not remote)
    except TidegateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = Table(title=f"dead-letter replay ({spec.name})")
    for col in ("replay (run_id)", "rows", "ok", "dead-lettered again", "resumed"):
        table.add_column(col)
    for r in report.replays:
        table.add_row(r["replay_id"], str(r["rows"]), str(r["ok"]), str(r["dead_lettered"]), "yes" if r["resumed"] else "")
    if not report.replays:
        table.add_row("-", "0", "0", "0", "nothing to replay")
    console.print(table)
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m jobs.replay", description="Replay dead-lettered rows.")
    parser.add_argument("spec")
    parser.add_argument("--where", default=None, help="SQL predicate over the dead-letter columns")
    parser.add_argument("--address", default=None)
    a = parser.parse_args()
    sys.exit(main(a.spec, a.where, a.address))
