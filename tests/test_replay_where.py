"""`tidegate dlq replay --where`: the predicate is parsed, checked and re-serialised, and the plan's
ownership condition stays outside it (fast: no Ray; Delta tables on disk)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pytest
from deltalake import DeltaTable, QueryBuilder, write_deltalake

from connectors.delta import DeltaSink
from jobs.replay import mark_plan, plan_predicate, where_sql
from schemas.errors import SpecError
from schemas.records import DEAD_LETTER_SCHEMA

OTHER = "other-replay-01"


def test_a_new_plan_leaves_out_what_the_resumed_replays_dead_lettered_again(dl_uri):
    """dlq replay resumes unfinished replays, then plans: the rows those replays dead-lettered again
    (run_id = their id, owned by nobody yet) were replayed once by this command already. Before, the
    new plan took them and ran each a second time in the same command."""
    again = {**_row("r8", "missing_variable"), "run_id": "resumed-1"}
    write_deltalake(dl_uri, pa.Table.from_pylist([again], schema=DEAD_LETTER_SCHEMA), mode="append")
    assert mark_plan(dl_uri, None, "new-1", None, skip_runs=["resumed-1"]) == 4  # r1 r3 r5 r6, not r8
    assert _owners(dl_uri)["r8"] is None
    assert mark_plan(dl_uri, None, "new-2", None) == 1  # a later command takes it


def test_a_plain_replay_leaves_a_delta_sources_reported_changes_alone(dl_uri):
    """stage `source` rows (a Delta source's reported update or delete) are reported, not run: a
    replay without --where leaves them (a deleted row run through the model became a result);
    --where that names them takes them."""
    change = _row("r9", "source_delete", stage="source")
    write_deltalake(dl_uri, pa.Table.from_pylist([change], schema=DEAD_LETTER_SCHEMA), mode="append")
    assert mark_plan(dl_uri, None, "plain", None) == 4 and _owners(dl_uri)["r9"] is None
    assert mark_plan(dl_uri, None, "asked", "stage = 'source'") == 1 and _owners(dl_uri)["r9"] == "asked"


@pytest.mark.parametrize(
    "where, runs",
    [
        ("error_class = 'missing_variable'", "error_class = 'missing_variable'"),
        ("stage = 'validate' AND failed_at > '2026-11-01'", "stage = 'validate' AND failed_at > '2026-11-01'"),
        ("error_class IN ('a','b')", "error_class IN ('a', 'b')"),
        ("error_class NOT IN ('a') OR error LIKE '%timeout%'", "NOT error_class IN ('a') OR error LIKE '%timeout%'"),
        ("tenant IS NOT NULL AND (source_offset BETWEEN -1 AND 10 OR attempts >= 2)",
         "NOT tenant IS NULL AND (source_offset BETWEEN -1 AND 10 OR attempts >= 2)"),
        ("lower(error_class) <> 'x' AND NOT stage = 'engine'", "LOWER(error_class) <> 'x' AND NOT stage = 'engine'"),
        ("ERROR_CLASS = 'x'", "error_class = 'x'"),  # unquoted names are case-insensitive; the canonical one runs
        ("error = 'it''s' OR error = 'a\\'", "error = 'it''s' OR error = 'a\\'"),
        ("TRUE", "TRUE"),
    ],
)  # fmt: skip
def test_where_accepts_boolean_expressions_over_dead_letter_columns(where, runs):
    assert where_sql(where) in (runs, runs.replace("NOT tenant IS NULL", "tenant IS NOT NULL"))
    assert plan_predicate(where) == f"replayed_by IS NULL AND ({where_sql(where)})"


@pytest.mark.parametrize(
    "where, why",
    [
        ("x') OR (1=1", "not a SQL expression"),
        ("error_class = 'x') OR (error_class = 'y'", "not one complete SQL expression (stopped at ')')"),
        ("1=1) OR (1=1", "not one complete SQL expression"),
        ("1=1; DROP TABLE dl", "';' is not allowed"),
        ("error_class = 'x'; ", "';' is not allowed"),
        ("(SELECT 1)", "subqueries are not allowed"),
        ("EXISTS (SELECT 1)", "subqueries are not allowed"),
        ("id IN (SELECT id FROM dl)", "not a subquery"),
        ("sleep(1)", "function sleep() is not allowed"),
        ("error_class = coalesce(stage, 'x')", "function coalesce() is not allowed"),
        ("nope = 1", "unknown column 'nope'"),
        ("\"ERROR_CLASS\" = 'x'", "unknown column 'ERROR_CLASS'"),
        ("dl.error_class = 'x'", "must not name a table"),
        ("error_class = 'x' -- and more", "comments are not allowed"),
        ("error_class = 'x' /* c */", "comments are not allowed"),
        ("error_class", "is not a condition"),
        ("source_offset = 1 + 1", "1 + 1 is not allowed"),
        ("failed_at > CAST('2026-11-01' AS TIMESTAMP)", "casts are not allowed"),
        ("error_class = ?", "parameters are not allowed"),
        ("error_class = 'x' UNION SELECT 1", "not one complete SQL expression"),
        ("error_class IN ()", "at least one value"),
        ("", "empty"),
    ],
)
def test_where_refuses_anything_else(where, why):
    with pytest.raises(SpecError, match="^--where") as e:
        where_sql(where)
    assert why in str(e.value)


def test_where_refusals_name_the_problem_briefly():
    with pytest.raises(SpecError) as e:
        where_sql("sleep(1)")
    assert len(str(e.value)) < 200
    with pytest.raises(SpecError, match="longer than"):
        where_sql("error_class = 'x' OR " * 2000 + "TRUE")


# -- on a real dead-letter table ------------------------------------------------------------------


def _row(id, error_class, replayed_by=None, stage="prompt", failed_at=datetime(2026, 10, 1, tzinfo=timezone.utc)):
    return dict(id=id, stage=stage, error_class=error_class, error="e", source_topic="t", source_partition=0,
                source_offset=int(id[1:]), raw=b"{}", run_id="run-1", failed_at=failed_at, replayed_by=replayed_by)  # fmt: skip


@pytest.fixture
def dl_uri(tmp_path):
    res, dl = str(tmp_path / "results"), str(tmp_path / "dead")
    DeltaSink("job", res, dl, None).open()  # the tables as the job creates them
    rows = [
        _row("r1", "missing_variable"),
        _row("r2", "missing_variable", replayed_by=OTHER),  # taken by another replay, still in progress
        _row("r3", "invalid_json"),
        _row("r4", "it's", replayed_by=OTHER),
        _row("r5", "validation_failed", stage="validate", failed_at=datetime(2026, 11, 5, tzinfo=timezone.utc)),
        _row("r6", "a\\"),
        _row("r7", "invalid_json", replayed_by=OTHER),
    ]
    write_deltalake(dl, pa.Table.from_pylist(rows, schema=DEAD_LETTER_SCHEMA), mode="append")
    return dl


def _owners(uri: str) -> dict[str, str | None]:
    t = DeltaTable(uri).to_pyarrow_table(columns=["id", "replayed_by"])
    return dict(zip(t.column("id").to_pylist(), t.column("replayed_by").to_pylist()))


def _count(uri: str, predicate: str) -> int:
    qb = QueryBuilder().register("dl", DeltaTable(uri))
    return pa.table(qb.execute(f"SELECT id FROM dl WHERE {predicate}").read_all()).num_rows


def test_mark_plan_takes_only_unowned_matching_rows(dl_uri):
    assert mark_plan(dl_uri, None, "new-1", "error_class = 'missing_variable'") == 1
    assert mark_plan(dl_uri, None, "new-2", "stage = 'validate' AND failed_at > '2026-11-01'") == 1
    assert mark_plan(dl_uri, None, "new-3", "error_class = 'a\\' OR error_class = 'it''s'") == 1  # r4 is OTHER's
    assert _owners(dl_uri) == {"r1": "new-1", "r2": OTHER, "r3": None, "r4": OTHER, "r5": "new-2", "r6": "new-3",
                               "r7": OTHER}  # fmt: skip
    # A predicate that is true everywhere still takes only rows no replay owns.
    assert mark_plan(dl_uri, None, "new-4", "error_class = 'nope' OR 1 = 1") == 1
    assert mark_plan(dl_uri, None, "new-5", None) == 0
    assert [rid for rid in _owners(dl_uri).values()].count(OTHER) == 3


@pytest.mark.parametrize(
    "where",
    ["1=1) OR (1=1", "error_class = 'x') OR (error_class = 'invalid_json'", "x') OR (1=1",
     "1=1); UPDATE dl SET replayed_by = NULL; --"],
)  # fmt: skip
def test_an_escaping_where_cannot_take_another_replays_rows(dl_uri, where):
    if where in ("1=1) OR (1=1", "error_class = 'x') OR (error_class = 'invalid_json'"):
        # the old plan ran `replayed_by IS NULL AND (<where>)` as is: these match rows OTHER owns
        assert _count(dl_uri, f"replayed_by = '{OTHER}' AND (replayed_by IS NULL AND ({where}))") > 0
    version = DeltaTable(dl_uri).version()
    with pytest.raises(SpecError, match="^--where"):
        mark_plan(dl_uri, None, "evil", where)
    assert DeltaTable(dl_uri).version() == version  # nothing written
    assert "evil" not in _owners(dl_uri).values()


def test_a_where_the_engine_rejects_quotes_no_stored_value(dl_uri):
    where = "source_offset = error_class"  # DataFusion: "Cannot cast string '<a stored value>' to Int64"
    with pytest.raises(SpecError, match="does not run on the dead-letter table") as e:
        mark_plan(dl_uri, None, "new-1", where)
    message = str(e.value).replace(where, "")
    for stored in ("missing_variable", "invalid_json", "validation_failed", "r1", OTHER):
        assert stored not in message
    assert set(_owners(dl_uri).values()) == {None, OTHER}
