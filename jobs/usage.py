"""Token usage and cost of a job (`tidegate usage SPEC --by tenant|day|run`, `tidegate.usage`).

    by run     one row per run: its run row (every generation, retried and rejected ones included);
               a run without one (killed, or still running) sums its commit rows (counted_from)
    by day     one row per UTC day on which commits landed: commit rows, by ended_at
    by tenant  one row per tenant: the result rows' tokens (the tenant column; null: "-")

Commit rows and result rows count the final generation of each stored row (docs/operations.md,
the runs table): days and tenants leave out retried and rejected generations, runs with a run row
do not. Cost is the runs table's recorded cost where there is one (priced when incurred);
otherwise, and per tenant, the tokens priced with the spec's model.pricing now, row by row (the
same sum as compute.pricing.token_cost; column `priced`: recorded | current_prices | mixed; none,
with a null cost, when a row has neither).
"""

from __future__ import annotations

import polars as pl

from schemas.errors import SpecError
from schemas.spec import JobSpec

BY = ("run", "day", "tenant")
COLUMNS = ("rows", "prompt_tokens", "completion_tokens", "cost", "currency", "priced")


def _row_cost(spec: JobSpec, recorded: bool) -> list[pl.Expr]:
    """Per row: `row_cost` (the recorded cost, else the tokens at the current prices, else null),
    `row_currency`, and whether it was recorded."""
    pricing = spec.model.pricing
    now = (
        pl.col("prompt_tokens") / 1000 * pricing.prompt_per_1k + pl.col("completion_tokens") / 1000 * pricing.completion_per_1k
        if pricing is not None else pl.lit(None, pl.Float64)
    )  # fmt: skip
    current = pl.lit(pricing.currency if pricing is not None else None, pl.String)
    if not recorded:
        return [now.alias("row_cost"), current.alias("row_currency"), pl.lit(False).alias("row_recorded")]
    has = pl.col("cost").is_not_null()
    return [
        pl.when(has).then(pl.col("cost")).otherwise(now).alias("row_cost"),
        pl.when(has).then(pl.col("currency")).otherwise(current).alias("row_currency"),
        has.alias("row_recorded"),
    ]


_COST_AGGS = [
    # null when a row's cost is unknown (no recorded cost and no model.pricing)
    pl.when(pl.col("row_cost").is_null().any()).then(None).otherwise(pl.col("row_cost").sum()).alias("cost"),
    pl.col("row_currency").drop_nulls().first().alias("currency"),
    pl.col("row_currency").drop_nulls().n_unique().alias("currencies"),
    pl.when(pl.col("row_cost").is_null().any()).then(pl.lit("none"))
    .when(pl.col("row_recorded").all()).then(pl.lit("recorded"))
    .when(~pl.col("row_recorded").any()).then(pl.lit("current_prices"))
    .otherwise(pl.lit("mixed")).alias("priced"),
]  # fmt: skip


def _one_currency(frame: pl.DataFrame) -> pl.DataFrame:
    if frame.height and (frame["currencies"].max() or 0) > 1:
        raise SpecError("usage: one group holds costs in more than one currency (model.pricing.currency changed): "
                        "sum them yourself from tidegate.read_runs")  # fmt: skip
    return frame


def usage_frame(spec: JobSpec, by: str = "run") -> pl.DataFrame:
    """The job's usage grouped `by` run, day or tenant (see the module docstring for the columns)."""
    if by not in BY:
        raise SpecError(f"usage: by must be one of {', '.join(BY)}, not {by!r}")
    if spec.sink.kind != "delta":
        raise SpecError(f"usage: sink.kind {spec.sink.kind!r} has no tables to read (usage reads Delta tables)")
    from jobs.logs import reading_store

    with reading_store(f"the job's tables (results table {spec.sink.results})"):  # a store's own message may quote values
        return _usage_frame(spec, by)


def _usage_frame(spec: JobSpec, by: str) -> pl.DataFrame:
    from connectors.runs import RunsTable

    if by == "tenant":
        from deltalake import DeltaTable

        opts = spec.sink.storage_options or None
        if not DeltaTable.is_deltatable(spec.sink.results, storage_options=opts):
            rows = pl.LazyFrame(schema={"tenant": pl.String, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64})
        else:
            rows = pl.scan_delta(spec.sink.results, storage_options=opts).select(
                pl.col("tenant").fill_null("-"), pl.col("prompt_tokens").cast(pl.Int64),
                pl.col("completion_tokens").cast(pl.Int64))  # fmt: skip
        frame = (
            rows.with_columns(_row_cost(spec, recorded=False))
            .group_by("tenant")
            .agg(pl.len().alias("rows"), pl.col("prompt_tokens").sum(), pl.col("completion_tokens").sum(), *_COST_AGGS)
            .sort("tenant")
            .collect()
        )
        return _one_currency(frame).select("tenant", *COLUMNS)

    runs = RunsTable.for_results(spec.sink.results, spec.sink.storage_options or None).read(job=spec.name)
    if "cost" not in runs.columns:  # a runs table written before the cost columns
        runs = runs.with_columns(cost=pl.lit(None, pl.Float64), currency=pl.lit(None, pl.String))
    runs = runs.with_columns(_row_cost(spec, recorded=True))
    commits = runs.filter(pl.col("kind") == "commit")
    totals = [
        (pl.col("rows_ok").sum() + pl.col("rows_dead").sum()).alias("rows"),
        pl.col("prompt_tokens").sum(), pl.col("completion_tokens").sum(), *_COST_AGGS,
    ]  # fmt: skip
    if by == "day":
        day = pl.col("ended_at").dt.convert_time_zone("UTC").dt.date().alias("day")
        return _one_currency(commits.group_by(day).agg(totals)).sort("day").select("day", *COLUMNS)
    # by run: the run row (every generation) where the run wrote one; else its commit rows summed
    # (a run killed before its end, or still running).
    span = [pl.col("started_at").min(), pl.col("ended_at").max()]
    ended = runs.filter(pl.col("kind") == "run").group_by("run_id").agg(*totals, *span, pl.lit("run").alias("counted_from"))
    unended = (commits.filter(~pl.col("run_id").is_in(ended["run_id"].implode()))
               .group_by("run_id").agg(*totals, *span, pl.lit("commits").alias("counted_from")))  # fmt: skip
    frame = _one_currency(pl.concat([ended, unended], how="vertical_relaxed"))
    return frame.sort("started_at").select("run_id", "started_at", "ended_at", *COLUMNS, "counted_from")
