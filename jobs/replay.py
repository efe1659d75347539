"""`tidegate dlq replay SPEC.yaml [--where SQL]`: re-process dead-lettered rows after a fix.

    1. resume   replays left unfinished by a crash (rows with replayed_by set, replayed_at null):
                finish them first, under their own id
    2. plan     one Delta UPDATE marks the rows to replay: replayed_by = R (a new run id), for rows
                not replayed yet that match --where (a SQL predicate over the dead-letter columns,
                checked and re-serialised by `where_sql`; see `mark_plan`)
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
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import CommitFailedError
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from connectors.delta import DeltaSink
from connectors.replay import ReplaySink, ReplaySource
from connectors.sink import stored_schemas
from schemas.errors import SinkError, SpecError
from schemas.records import DEAD_LETTER_SCHEMA
from schemas.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    replays: list[dict] = field(default_factory=list)  # {replay_id, rows, ok, dead_lettered, resumed}
    stopped: str | None = None  # the replay a stop (SIGTERM/SIGINT) left unfinished: the next command finishes it


def _update(dt_uri: str, storage_options, retries: int = 5, **kwargs) -> dict:
    """A Delta UPDATE on the dead-letter table, retried when a running job's append races it. The
    files it rewrites are written as the sink writes them: statistics on the safe columns only."""
    from connectors.delta import safe_writer_properties
    from schemas.spec import ParquetSpec

    props = safe_writer_properties(kwargs.pop("parquet", None) or ParquetSpec(), DEAD_LETTER_SCHEMA.names)
    for attempt in range(retries):
        try:
            return DeltaTable(dt_uri, storage_options=storage_options).update(writer_properties=props, **kwargs)
        except CommitFailedError:
            if attempt == retries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


# -- --where: a boolean expression over the dead-letter columns, nothing else ----------------------

WHERE_MAX_CHARS = 20_000
WHERE_DIALECT = "postgres"  # DataFusion's SQL (delta-rs runs the UPDATE predicate with it) is PostgreSQL-like
WHERE_FUNCTIONS = {exp.Lower: "lower", exp.Upper: "upper"}
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike)
_SUBQUERY = (exp.Subquery, exp.Select, exp.Exists, exp.Query)
_ALLOWED = "comparisons, AND/OR/NOT, IN, LIKE, IS [NOT] NULL, BETWEEN, literals, lower(), upper()"


def _refuse(why: str, *, hint: bool = True) -> SpecError:
    return SpecError(f"--where: {why}" + (f" (allowed: {_ALLOWED} over the dead-letter columns)" if hint else ""))


def _snippet(node: exp.Expression) -> str:
    text = node.sql(dialect=WHERE_DIALECT, comments=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(node: exp.Expression) -> None:
    """An operand: a dead-letter column, a literal, NULL, TRUE/FALSE, -number, lower()/upper() of an operand."""
    if isinstance(node, exp.Paren):
        _check_value(node.this)
    elif isinstance(node, exp.Column):
        if node.args.get("table") or node.args.get("db") or node.args.get("catalog"):
            raise _refuse(f"column {_snippet(node)} must not name a table")
        ident = node.this
        if not isinstance(ident, exp.Identifier):
            raise _refuse(f"{_snippet(node)} is not a column")
        name = ident.name if ident.quoted else ident.name.lower()  # unquoted names are case-insensitive
        if name not in DEAD_LETTER_SCHEMA.names:
            raise _refuse(f"unknown column {ident.name!r} (dead-letter columns: {', '.join(DEAD_LETTER_SCHEMA.names)})",
                          hint=False)  # fmt: skip
        node.set("this", exp.to_identifier(name, quoted=False))  # runs as the canonical column name
    elif type(node) is exp.Literal or isinstance(node, (exp.Null, exp.Boolean)):
        pass
    elif isinstance(node, exp.Neg) and type(node.this) is exp.Literal and not node.this.is_string:
        pass
    elif type(node) in WHERE_FUNCTIONS:
        _check_value(node.this)
    else:
        _check_other(node)


def _check_bool(node: exp.Expression) -> None:
    """A condition: what AND/OR/NOT combine and what --where must be."""
    if isinstance(node, exp.Paren):
        _check_bool(node.this)
    elif isinstance(node, (exp.And, exp.Or)):
        _check_bool(node.this)
        _check_bool(node.expression)
    elif isinstance(node, exp.Not):
        _check_bool(node.this)
    elif isinstance(node, exp.Boolean):
        pass
    elif isinstance(node, _COMPARISONS):
        _check_value(node.this)
        _check_value(node.expression)
    elif isinstance(node, exp.In):
        if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
            raise _refuse(f"IN takes a list of values, not a subquery: {_snippet(node)}")
        if not node.expressions:
            raise _refuse("IN () needs at least one value")
        _check_value(node.this)
        for value in node.expressions:
            _check_value(value)
    elif isinstance(node, exp.Is):
        if not isinstance(node.expression, (exp.Null, exp.Boolean)):
            raise _refuse(f"IS takes NULL, TRUE or FALSE: {_snippet(node)}")
        _check_value(node.this)
    elif isinstance(node, exp.Between):
        if node.args.get("symmetric"):
            raise _refuse("BETWEEN SYMMETRIC is not allowed")
        for part in (node.this, node.args["low"], node.args["high"]):
            _check_value(part)
    elif isinstance(node, (exp.Column, exp.Literal, exp.Null, exp.Neg, exp.Lower, exp.Upper)):
        raise _refuse(f"{_snippet(node)} is not a condition")
    else:
        _check_other(node)


def _check_other(node: exp.Expression) -> None:
    if isinstance(node, _SUBQUERY):
        raise _refuse("subqueries are not allowed")
    if isinstance(node, exp.Cast):
        raise _refuse("casts are not allowed (compare a timestamp column with a string such as '2026-11-01')")
    if isinstance(node, exp.Func):
        name = node.sql_name().lower() if not isinstance(node, exp.Anonymous) else str(node.this).lower()
        raise _refuse(f"function {name}() is not allowed")
    if isinstance(node, exp.Placeholder):
        raise _refuse("parameters are not allowed")
    raise _refuse(f"{_snippet(node)} is not allowed")


_ALLOWED_NODES = (exp.Paren, exp.And, exp.Or, exp.Not, exp.Boolean, *_COMPARISONS, exp.In, exp.Is, exp.Between,
                  exp.Column, exp.Identifier, exp.Literal, exp.Null, exp.Neg, *WHERE_FUNCTIONS)  # fmt: skip


def where_sql(where: str) -> str:
    """`--where` checked and re-serialised: a boolean expression over DEAD_LETTER_SCHEMA's columns with
    comparisons, AND/OR/NOT, IN (values), LIKE/ILIKE, IS [NOT] NULL/TRUE/FALSE, BETWEEN, literals
    (strings, numbers, booleans, NULL), lower()/upper() and parentheses. Anything else (subqueries,
    other functions, unknown or table-qualified columns, several statements, comments, casts,
    arithmetic, parameters) raises SpecError naming it. What is returned is generated from the
    parsed tree, so what runs is exactly what was checked."""
    if not where or not where.strip():
        raise SpecError("--where is empty (leave it out to replay every row not replayed yet)")
    if len(where) > WHERE_MAX_CHARS:
        raise SpecError(f"--where is longer than {WHERE_MAX_CHARS:,} characters")
    try:
        tokens = sqlglot.Dialect.get_or_raise(WHERE_DIALECT).tokenize(where)
    except TokenError:
        raise SpecError("--where is not a SQL expression: a string is not closed, or a character is not SQL") from None
    if any(t.token_type == TokenType.SEMICOLON for t in tokens):
        raise _refuse("';' is not allowed: one expression, not statements")
    if any(t.comments for t in tokens):
        raise _refuse("comments are not allowed")
    try:
        tree = sqlglot.parse_one(where, read=WHERE_DIALECT, into=exp.Condition)
    except ParseError as e:
        at = e.errors[0].get("highlight") if e.errors else None
        raise SpecError("--where is not one complete SQL expression" + (f" (stopped at {at!r})" if at else "")) from None
    except RecursionError:
        raise SpecError("--where is nested too deeply") from None
    if any(n.comments for n in tree.walk()):
        raise _refuse("comments are not allowed")
    _check_bool(tree)
    stray = next((n for n in tree.walk() if not isinstance(n, _ALLOWED_NODES)), None)
    if stray is not None:  # an argument the structural check does not look at
        _check_other(stray)
    sql = tree.sql(dialect=WHERE_DIALECT, comments=False)
    if sqlglot.parse_one(sql, read=WHERE_DIALECT, into=exp.Condition) != tree:
        raise SpecError("--where cannot be re-written faithfully; simplify it")
    return sql


def plan_predicate(where: str | None, skip_runs: Sequence[str] = ()) -> str:
    """The UPDATE predicate of a new plan: rows no replay owns, not dead-lettered again by the
    replays in `skip_runs` (this command's resumed ones: replayed once already in it), and (checked)
    `where`; without `where`, not a Delta source's reported changes (stage source: a deleted row
    run through the model would become a result). The ownership condition stays outside the
    user's expression: nothing in --where can reach rows of another replay."""
    own = "replayed_by IS NULL"
    if where is None:  # a Delta source's reported updates and deletes (stage source): reported, not run
        own += " AND stage <> 'source'"
    if skip_runs:  # run ids are hex (uuid4().hex[:16]): quoted all the same
        own += " AND run_id NOT IN ({})".format(", ".join("'{}'".format(r.replace("'", "''")) for r in skip_runs))
    return own if where is None else f"{own} AND ({where_sql(where)})"


def mark_plan(dl_uri: str, storage_options, replay_id: str, where: str | None, parquet=None,
              skip_runs: Sequence[str] = ()) -> int:  # fmt: skip
    """Plan a new replay: one Delta UPDATE sets replayed_by = replay_id on the dead-letter rows no replay
    owns that match `where` (and were not dead-lettered by `skip_runs`). Returns how many rows it
    marked. A bad --where raises SpecError; its engine error is not quoted (it can quote stored values)."""
    predicate = plan_predicate(where, skip_runs)
    try:
        marked = _update(dl_uri, storage_options, new_values={"replayed_by": replay_id}, predicate=predicate,
                         parquet=parquet)  # fmt: skip
    except CommitFailedError:  # not the expression: a running job's appends won every try
        raise SinkError("the dead-letter table kept changing under the replay's plan (a running job's commits "
                        "won every try); run the replay again") from None  # fmt: skip
    except Exception as e:
        if where is None:
            raise
        raise SpecError(
            f"--where {where!r} does not run on the dead-letter table ({type(e).__name__}; e.g. a value of the "
            "wrong type for its column: timestamps as 'YYYY-MM-DD ...' strings, numbers unquoted)"
        ) from None
    return int(marked.get("num_updated_rows", 0))


def _plan(dt_uri: str, storage_options, replay_id: str, stored: pa.Schema = DEAD_LETTER_SCHEMA) -> pa.Table:
    """The replay's rows, as the table stores them (`stored`: encrypted columns are binary)."""
    qb = QueryBuilder().register("dl", DeltaTable(dt_uri, storage_options=storage_options))
    sql = "SELECT * FROM dl WHERE replayed_by = '{}'".format(replay_id.replace("'", "''"))
    table = pa.table(qb.execute(sql).read_all())  # string_view / binary_view columns: cast to ours
    names = DEAD_LETTER_SCHEMA.names
    return table.select(names).cast(pa.schema([stored.field(n) for n in names]))


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


def _undecryptable(before: pa.Table, after: pa.Table) -> pa.Array:
    """Rows whose raw event stayed encrypted (no key for its tenant or version in this keyring):
    replayed, the ciphertext would be taken for the event (boolean mask over the plan)."""
    if not before.num_rows:
        return pa.array([], pa.bool_())
    raw_in, raw_out = before.column("raw").cast(pa.binary()), after.column("raw")
    return pc.fill_null(pc.and_(raw_in.is_valid(), pc.equal(raw_in, raw_out)), False)


def _committed_any(spec: JobSpec, replay_id: str) -> bool:
    """Whether the replay has committed anything (its plan ordinals are then in use): a replay
    stopped before its first commit, while it was giving rows back say, may still leave rows out."""
    from connectors.replay import replay_topic

    sink = DeltaSink(spec.name, spec.sink.results, spec.sink.dead_letter, spec.sink.storage_options, source_kind="replay")
    tp = (replay_topic(replay_id), 0)
    return any(v is not None for v in sink.read_positions([tp])[tp])


def _release(dl_uri: str, storage_options, replay_id: str, rows: pa.Table, parquet) -> None:
    """Give rows of a plan back (replayed_by null again): a later replay, with a keyring that can
    read them, plans them anew. Only the plan's own rows carry replayed_by = replay_id."""
    quoted = lambda v: "'{}'".format(str(v).replace("'", "''"))  # noqa: E731
    groups: dict[tuple[str, int, str | None], list[int]] = {}
    columns = ("source_topic", "source_partition", "source_offset", "run_id")
    for t, p, o, run in zip(*(rows.column(c).to_pylist() for c in columns)):
        if t is None or p is None or o is None:  # no position to find it by: it stays in the plan's hands
            continue
        groups.setdefault((t, p, run), []).append(o)
    for (t, p, run), offsets in groups.items():
        same_run = "run_id IS NULL" if run is None else f"run_id = {quoted(run)}"
        for i in range(0, len(offsets), 1000):  # predicates of a bounded size
            chunk = ", ".join(str(int(o)) for o in offsets[i : i + 1000])
            _update(dl_uri, storage_options, updates={"replayed_by": "NULL"}, parquet=parquet,
                    predicate=f"replayed_by = {quoted(replay_id)} AND source_topic = {quoted(t)} "
                              f"AND source_partition = {int(p)} AND {same_run} AND source_offset IN ({chunk})")  # fmt: skip


def _pending(dt_uri: str, storage_options) -> list[str]:
    qb = QueryBuilder().register("dl", DeltaTable(dt_uri, storage_options=storage_options))
    rows = pa.table(qb.execute("SELECT DISTINCT replayed_by FROM dl WHERE replayed_by IS NOT NULL AND replayed_at IS NULL").read_all())
    return sorted(rows.column("replayed_by").to_pylist()) if rows.num_rows else []


def replay_dead_letters(spec: JobSpec, where: str | None, fixed_cluster: bool, progress=None,
                        stop: threading.Event | None = None) -> ReplayReport:  # fmt: skip
    """Run inside a Ray-initialised driver (jobs.run sets that up). progress(done, total): rows of
    the replay in flight whose results are committed (a bar, in `main`). `stop` set: the replay in
    flight finishes its batches, commits them and ends unfinished (its rows are not marked
    replayed; the next command resumes it), and no new plan is made."""
    stop = stop if stop is not None else threading.Event()
    from jobs.pipeline import JobComponents, PipelineJob
    from schemas.trusted_code import refuse_untrusted

    # The code the spec names (custom rules, output.schema, model.engine_args' classes) under the
    # trust policy, as `run` and `serve` check it: the replay's engines and stages import it too.
    refuse_untrusted(spec.code_refs(), spec.allowed_modules)
    if spec.sink.kind != "delta":
        raise SpecError(f"dlq replay reads and updates a Delta dead-letter table; sink.kind is {spec.sink.kind!r}")
    if where is not None:
        where_sql(where)  # a bad --where fails before anything is resumed or marked
    opts = spec.sink.storage_options or None
    dl_uri = spec.sink.dead_letter
    tables = DeltaSink.from_spec(spec)  # the job's partitioning, table properties and stored (encrypted) schemas
    stored_results, stored_dead = stored_schemas(spec, tables)
    tables.use_schemas(stored_results, stored_dead)
    tables.open()  # schema upgrade if needed
    report = ReplayReport()
    new_id = uuid.uuid4().hex[:16]

    def replays():
        """The unfinished replays first, then (only once they are done) a new plan: a replay that
        cannot finish stops the command before any new row is marked. Rows those replays dead-letter
        again are not in it: replayed once by this command already."""
        resumed = list(_pending(dl_uri, opts))
        for rid in resumed:
            yield rid, True
        if mark_plan(dl_uri, opts, new_id, where, spec.sink.parquet, skip_runs=resumed):
            yield new_id, False

    for replay_id, resumed in replays():
        planned = _plan(dl_uri, opts, replay_id, stored_dead)
        plan = _decrypted(spec, planned)
        if plan is not planned:
            locked = _undecryptable(planned, plan)
            if pc.any(locked).as_py() and resumed and _committed_any(spec, replay_id):
                # Its positions are ordinals in the plan as it was made: leaving rows out now would
                # shift them (rows skipped, or run twice). It finishes with a keyring that opens them.
                raise SpecError(f"replay {replay_id} is in progress and {pc.sum(locked.cast(pa.int64())).as_py()} of its "
                                "rows' raw events do not decrypt with this keyring (a tenant or key version it lacks, "
                                "or revoked since): finish it with the keyring it started with")  # fmt: skip
            if pc.any(locked).as_py():
                _release(dl_uri, opts, replay_id, planned.filter(locked), spec.sink.parquet)
                plan = plan.filter(pc.invert(locked))
                log.warning("replay %s: %d row(s) left out and given back: their raw events do not decrypt with this "
                            "keyring (a tenant or key version it lacks, or revoked)", replay_id,
                            pc.sum(locked.cast(pa.int64())).as_py())  # fmt: skip
        log.info("replay %s: %d dead-lettered row(s)%s", replay_id, plan.num_rows, " (resumed)" if resumed else "")
        sink = ReplaySink(spec.name, spec.sink.results, dl_uri, spec.sink.storage_options, replay_id, plan,
                          write_attempts=spec.sink.write_attempts, write_backoff_s=spec.sink.write_backoff_s,
                          maintenance=spec.sink.maintenance, partition_by=spec.sink.partition_by,
                          parquet=spec.sink.parquet)  # fmt: skip
        source = lambda ctx, plan=plan, rid=replay_id: ReplaySource(plan, rid, ctx)  # noqa: E731
        job = PipelineJob(
            spec, run_id=replay_id, fixed_cluster=fixed_cluster, components=JobComponents(source=source, sink=sink),
            progress=progress,
        )  # fmt: skip
        stats = job.run(until_drained=True, stop=stop)
        if stop.is_set():  # before stop 44 a stop ended it mid-plan and marked every row replayed all the same
            report.replays.append({"replay_id": replay_id, "rows": plan.num_rows, "ok": stats.ok,
                                   "dead_lettered": stats.dead_lettered, "resumed": resumed})  # fmt: skip
            report.stopped = replay_id
            break
        _update(
            dl_uri, opts,
            new_values={"replayed_at": datetime.now(timezone.utc)},
            predicate="replayed_by = '{}' AND replayed_at IS NULL".format(replay_id.replace("'", "''")),
            parquet=spec.sink.parquet,
        )  # fmt: skip
        report.replays.append(
            {"replay_id": replay_id, "rows": plan.num_rows, "ok": stats.ok, "dead_lettered": stats.dead_lettered,
             "resumed": resumed}  # fmt: skip
        )
    return report


def main(spec_path: str, where: str | None = None, address: str | None = None) -> int:
    """`tidegate dlq replay` / `python -m jobs.replay`: exit 0 done, 2 a Tidegate error, 3 stopped
    by SIGTERM/SIGINT before the end (what was in flight is committed; run it again to finish), 130
    stopped at once by a second signal."""
    import os
    import signal
    import sys

    from rich.console import Console
    from rich.table import Table

    from jobs.run import _ProgressBar, configure_logging, init_ray, load_job_spec
    from schemas.errors import TidegateError

    configure_logging()
    console = Console(stderr=True)
    bar = _ProgressBar(console, "replayed rows")
    try:
        spec = load_job_spec(spec_path)
        from schemas.trusted_code import refuse_untrusted

        refuse_untrusted(spec.code_refs(), spec.allowed_modules)  # before anything starts (again in replay_dead_letters)
        # The job's modules (and the native extensions under them: cryptography's, pyarrow's) are
        # loaded before Ray's threads start, as `run` does. CI run 57 saw this process die of a
        # SIGSEGV inside `import crypto` with Ray up; the cause is not proven, the order is run's.
        import jobs.pipeline  # noqa: F401

        init_ray(spec, address)
        stop = threading.Event()

        def on_signal(signum, _frame):  # as `run`: the first finishes what is in flight, a second stops at once
            if stop.is_set():
                raise KeyboardInterrupt
            log.info("received %s: finishing the replay's batches in flight, then stopping", signal.Signals(signum).name)
            stop.set()

        if threading.current_thread() is threading.main_thread():  # after ray.init (it sets its own SIGTERM one)
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        remote = address or spec.ray.address or os.environ.get("RAY_ADDRESS")
        report = replay_dead_letters(spec, where, fixed_cluster=not remote, progress=bar, stop=stop)
    except TidegateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped at once: the replay's batches in flight were not committed; run it again to finish it",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        bar.close()
    table = Table(title=f"dead-letter replay ({spec.name})")
    for col in ("replay (run_id)", "rows", "ok", "dead-lettered again", "resumed"):
        table.add_column(col)
    for r in report.replays:
        table.add_row(r["replay_id"], str(r["rows"]), str(r["ok"]), str(r["dead_lettered"]), "yes" if r["resumed"] else "")
    if not report.replays:
        table.add_row("-", "0", "0", "0", "nothing to replay")
    console.print(table)
    if report.stopped is not None:
        console.print(f"stopped before the end: replay {report.stopped} is unfinished (what was in flight is "
                      "committed); run `tidegate dlq replay` again to finish it")  # fmt: skip
        return 3
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
