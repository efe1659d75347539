"""`tidegate report SPEC --out report.html`: one self-contained HTML page about a job.

Read from the job's tables only (results, dead letters, runs) and written as one file: the charts
are SVG drawn by matplotlib and inlined, with no script, font or stylesheet fetched from anywhere,
so the page opens offline and can be mailed or archived. It shows aggregates and identifiers only
(run ids, error classes, rule names, tenant ids): never an event's or an output's values, and
never a decrypted column, so it needs no keyring.

Sections: totals; runs; rows committed and throughput over time; latency over time (p50, p95)
and its distribution; dead letters by class; rule failure rates; groundedness scores; cost per
tenant and per day (model.pricing).
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from connectors.runs import RunsTable
from jobs.formatting import format_value
from jobs.logs import redact_text  # a table URI with credentials in it is shown masked
from jobs.usage import usage_frame
from schemas.errors import SinkError
from schemas.spec import JobSpec

GROUNDING_RULES = ("grounding", "semantic_grounding")
PALETTE = {"main": "#3b7dd8", "bad": "#d8503b", "good": "#4caf7d", "muted": "#8a8f98"}


def _scan(uri: str, storage_options: dict | None, columns: list[str], role: str) -> pl.DataFrame | None:
    from deltalake import DeltaTable

    try:
        if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
            return None
        lazy = pl.scan_delta(uri, storage_options=storage_options)
        present = lazy.collect_schema().names()
        return lazy.select([c for c in columns if c in present]).collect()
    except Exception as e:  # noqa: BLE001 - a store's or reader's own message can quote paths and stored values
        raise SinkError(f"cannot read the {role} table {redact_text(uri)} ({type(e).__name__})") from None


def collect(spec: JobSpec) -> dict:
    """The report's data: plain frames of aggregates and identifiers."""
    opts = spec.sink.storage_options or None
    results = _scan(spec.sink.results, opts, ["status", "latency_ms", "processed_at", "rule_results", "tenant"], "results")
    dead = _scan(spec.sink.dead_letter, opts, ["stage", "error_class", "failed_at", "rule_results"], "dead-letter")
    try:
        runs = RunsTable.for_results(spec.sink.results, opts).read(job=spec.name)
    except Exception as e:  # noqa: BLE001 - as in _scan
        raise SinkError(f"cannot read the runs table beside {redact_text(spec.sink.results)} ({type(e).__name__})") from None
    checked = []  # every validated output's rule results: kept rows and validate-stage dead letters
    if results is not None and results.height:
        checked.append(results.select("rule_results"))
    if dead is not None and dead.height and "rule_results" in dead.columns:
        checked.append(dead.filter(pl.col("stage") == "validate").select("rule_results"))
    rules = (
        pl.concat(checked).explode("rule_results").drop_nulls().unnest("rule_results").select("rule", "passed", "score")
        if checked else pl.DataFrame(schema={"rule": pl.String, "passed": pl.Boolean, "score": pl.Float64})
    )  # fmt: skip
    return {
        "results": results, "dead": dead, "runs": runs, "rules": rules,
        "by_tenant": usage_frame(spec, "tenant"), "by_day": usage_frame(spec, "day"),
    }  # fmt: skip


# -- charts ------------------------------------------------------------------------------------------


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # same tables, same bytes
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline in HTML


def _figure(height: float = 3.0, width: float = 6.4):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", color=PALETTE["muted"], transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _bucket(span_s: float) -> str:
    """A time bucket giving about 30 points over the span."""
    for seconds, label in ((1, "1s"), (5, "5s"), (15, "15s"), (60, "1m"), (300, "5m"), (900, "15m"), (3600, "1h")):
        if span_s / seconds <= 40:
            return label
    return "1d"


def _elapsed(times: pl.Series, start) -> tuple[list[float], str]:
    """Times as elapsed numbers from `start`, in seconds, minutes or hours by the span."""
    seconds = ((times - start).dt.total_milliseconds() / 1000).to_list()
    span = max(seconds, default=0)
    for unit, size in (("s", 1), ("min", 60), ("h", 3600)):
        if span <= 300 * size:
            break
    return [x / size for x in seconds], unit


def _chart(title: str, missing: str | None, draw, height: float = 3.0) -> str:
    """One chart as SVG: `draw(fig, ax)`, or a "no ... yet" note when `missing` names what is absent."""
    fig, ax = _figure(height=height)
    if missing:
        _empty(ax, missing)
    else:
        draw(fig, ax)
    ax.set_title(title)
    return _svg(fig)


def chart_throughput(runs: pl.DataFrame) -> str:
    commits = runs.filter(pl.col("kind") == "commit").sort("ended_at")

    def draw(fig, ax):
        x, unit = _elapsed(commits["ended_at"], commits["started_at"].min())
        rows = (commits["rows_ok"] + commits["rows_dead"]).cum_sum().to_list()
        ax.step([0.0, *x], [0, *rows], where="post", color=PALETTE["main"], marker="o", ms=3)
        ax.set(xlabel=f"{unit} since the first commit's start", ylabel="rows committed (cumulative)")
        ax.set_ylim(bottom=0)

    return _chart("rows committed over time", "commits" if commits.is_empty() else None, draw)


def _no_results(results: pl.DataFrame | None) -> str | None:
    return "results" if results is None or results.is_empty() else None


def chart_latency_over_time(results: pl.DataFrame | None) -> str:
    def draw(fig, ax):
        frame = results.select("processed_at", "latency_ms").drop_nulls().sort("processed_at")
        span = (frame["processed_at"].max() - frame["processed_at"].min()).total_seconds()
        per = frame.group_by_dynamic("processed_at", every=_bucket(span)).agg(
            pl.col("latency_ms").quantile(0.5).alias("p50"), pl.col("latency_ms").quantile(0.95).alias("p95"))  # fmt: skip
        x, unit = _elapsed(per["processed_at"], per["processed_at"].min())  # from the first bucket's start
        ax.plot(x, per["p50"].to_list(), marker="o", ms=3, color=PALETTE["main"], label="p50")
        ax.plot(x, per["p95"].to_list(), marker="o", ms=3, color=PALETTE["bad"], label="p95")
        ax.set(xlabel=f"{unit} since the first result ({_bucket(span)} buckets)", ylabel="ms (event read to result)")
        if len(x) == 1:
            ax.set_xlim(x[0] - 0.5, x[0] + 0.5)
        ax.set_ylim(bottom=0)
        ax.legend()

    return _chart("latency over time", _no_results(results), draw)


def chart_latency_histogram(results: pl.DataFrame | None) -> str:
    def draw(fig, ax):
        ax.hist(results["latency_ms"].drop_nulls().to_list(), bins=30, color=PALETTE["main"])
        ax.set(xlabel="ms", ylabel="rows")

    return _chart("latency distribution", _no_results(results), draw)


def _bars(pairs: list[tuple[str, float]], title: str, xlabel: str, color: str, what: str) -> str:
    def draw(fig, ax):
        labels, values = zip(*pairs)
        ax.barh(list(labels), list(values), color=color, height=0.6)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)

    return _chart(title, None if pairs else what, draw, height=min(6.0, max(2.2, 0.35 * len(pairs) + 1)))


def chart_dead_letters(dead: pl.DataFrame | None) -> str:
    pairs = []
    if dead is not None and dead.height:
        counts = dead.group_by("error_class").len().sort("len", descending=True)
        pairs = list(zip(counts["error_class"].to_list(), counts["len"].to_list()))
    return _bars(pairs, "dead letters by class", "rows", PALETTE["bad"], "dead letters")


def chart_rule_failures(rules: pl.DataFrame) -> str:
    rates = rules.group_by("rule").agg((~pl.col("passed")).mean().alias("rate")).sort("rule")
    return _bars(list(zip(rates["rule"].to_list(), rates["rate"].to_list())), "rule failure rates",
                 "share of validated outputs failing", PALETTE["bad"], "validated outputs")  # fmt: skip


def chart_groundedness(rules: pl.DataFrame) -> str:
    scores = rules.filter(pl.col("rule").is_in(GROUNDING_RULES))["score"].drop_nulls()

    def draw(fig, ax):
        ax.hist(scores.to_list(), bins=20, range=(0, 1), color=PALETTE["main"])
        ax.set(xlabel="groundedness score", ylabel="outputs")

    missing = "grounding scores (no grounding rule, or no output made a claim)" if scores.is_empty() else None
    return _chart("groundedness scores", missing, draw)


def chart_cost_per_tenant(by_tenant: pl.DataFrame) -> str:
    priced = by_tenant.filter(pl.col("cost").is_not_null())
    currency = priced["currency"].drop_nulls().first() if priced.height else None
    pairs = list(zip(priced["tenant"].to_list(), priced["cost"].to_list()))
    return _bars(pairs, f"cost per tenant ({currency or 'no model.pricing'})", currency or "", PALETTE["good"],
                 "priced rows")  # fmt: skip


# -- the page ----------------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tidegate report: {{ job }}</title>
<style>
 body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px; color: #1d2330; padding: 0 1rem; }
 h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #e2e5ea; }
 .meta { color: #5b6270; } .grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 1rem; }
 @media (max-width: 800px) { .grid { grid-template-columns: 1fr; } }
 figure { margin: 0; } figure svg { width: 100%; height: auto; }
 table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
 th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #eef0f3; } td.n, th.n { text-align: right; }
 .totals { display: flex; flex-wrap: wrap; gap: 1.5rem; } .totals div { min-width: 8rem; }
 .totals b { display: block; font-size: 1.3rem; }
</style></head>
<body>
<h1>Tidegate report: {{ job }}</h1>
<p class="meta">generated {{ generated }} from {{ results_uri }} (and its dead-letter and runs tables)</p>
<div class="totals">
{% for label, value in totals %}<div><b>{{ value }}</b>{{ label }}</div>
{% endfor %}</div>
<h2>Runs</h2>
{% if runs %}<table><thead><tr>{% for h in run_headers %}<th{% if h.n %} class="n"{% endif %}>{{ h.label }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in runs %}<tr>{% for cell, numeric in row %}<td{% if numeric %} class="n"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>{% else %}<p class="meta">no run has ended yet</p>{% endif %}
<h2>Throughput and latency</h2>
<div class="grid">{% for svg in charts.flow %}<figure>{{ svg | safe }}</figure>{% endfor %}</div>
<h2>Quality</h2>
<div class="grid">{% for svg in charts.quality %}<figure>{{ svg | safe }}</figure>{% endfor %}</div>
<h2>Cost</h2>
<div class="grid">{% for svg in charts.cost %}<figure>{{ svg | safe }}</figure>{% endfor %}</div>
{% if by_day %}<table><thead><tr><th>day (UTC)</th><th class="n">rows</th><th class="n">prompt tokens</th><th class="n">completion tokens</th><th class="n">cost</th></tr></thead>
<tbody>{% for d in by_day %}<tr><td>{{ d.day }}</td><td class="n">{{ d.rows }}</td><td class="n">{{ d.prompt_tokens }}</td><td class="n">{{ d.completion_tokens }}</td><td class="n">{{ d.cost }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
</body></html>
"""

_RUN_COLUMNS = [
    ("run_id", "run", False), ("status", "status", False), ("started_at", "started (UTC)", False),
    ("duration_s", "seconds", True), ("rows_ok", "rows", True), ("rows_dead", "dead", True),
    ("rows_per_s", "rows/s", True), ("prompt_tokens", "prompt tokens", True),
    ("completion_tokens", "completion tokens", True), ("cost", "cost", True), ("error", "error", False),
]  # fmt: skip


def _fmt(value) -> str:
    small = isinstance(value, float) and abs(value) < 10  # costs per 1k tokens, ratios: 4 places
    return format_value(value, decimals=4 if small else 1, none="–")


def render(spec: JobSpec, data: dict | None = None) -> str:
    """The report page as a string (jinja2, autoescaped; the SVGs are matplotlib's own markup)."""
    from jinja2 import Environment

    data = data if data is not None else collect(spec)
    results, dead, runs, rules = data["results"], data["dead"], data["runs"], data["rules"]
    run_rows = runs.filter(pl.col("kind") == "run").sort("started_at", descending=True).head(50)
    commits = runs.filter(pl.col("kind") == "commit")
    n_results = results.height if results is not None else 0
    n_dead = dead.height if dead is not None else 0
    flagged = results.filter(pl.col("status") == "flagged").height if results is not None and n_results else 0
    cost = data["by_tenant"]["cost"].sum() if data["by_tenant"].height else None
    currency = data["by_tenant"]["currency"].drop_nulls().first() if data["by_tenant"].height else None
    totals = [
        ("result rows", _fmt(n_results)), ("flagged", _fmt(flagged)), ("dead letters", _fmt(n_dead)),
        ("runs", _fmt(runs.filter(pl.col("kind") == "run").height)), ("commits", _fmt(commits.height)),
        ("prompt tokens", _fmt(int(commits["prompt_tokens"].sum() or 0))),
        ("completion tokens", _fmt(int(commits["completion_tokens"].sum() or 0))),
    ]  # fmt: skip
    if cost is not None and currency:
        totals.append((f"cost ({currency}, stored rows)", _fmt(float(cost))))
    charts = {
        "flow": [chart_throughput(runs), chart_latency_over_time(results), chart_latency_histogram(results)],
        "quality": [chart_dead_letters(dead), chart_rule_failures(rules), chart_groundedness(rules)],
        "cost": [chart_cost_per_tenant(data["by_tenant"])],
    }
    page = Environment(autoescape=True).from_string(_PAGE)
    return page.render(
        job=spec.name, generated=_fmt(datetime.now(timezone.utc)), results_uri=redact_text(spec.sink.results),
        totals=totals,
        run_headers=[{"label": label, "n": numeric} for _, label, numeric in _RUN_COLUMNS],
        runs=[[(_fmt(r.get(col)), numeric) for col, _, numeric in _RUN_COLUMNS] for r in run_rows.to_dicts()],
        charts=charts, by_day=[{k: _fmt(v) for k, v in d.items()} for d in data["by_day"].to_dicts()],
    )  # fmt: skip


def write_report(spec: JobSpec, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(spec), encoding="utf-8")
    return out

