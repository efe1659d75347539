"""`tidegate report SPEC --out report.html`: a real job's tables rendered to one self-contained
page, opened in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): every chart
renders with a real size, the page makes no request beyond its own file, its console is free of
errors, and a screenshot shows the charts. The page quotes no event value."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tidegate
from tests.conftest import REPO, make_spec, send, write_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CANARY = "CANARY-REPORT-7f3a"


def _browser_page(html_path, screenshot):
    """(console errors, page errors, outside requests, chart sizes) of the page in headless Chromium."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Chromium is needed for this test: `apt-get install chromium` (the Makefile's `test` installs it)"
    console, errors, outside = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],  # a fresh profile: Playwright makes one
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith("file://") else None)
            page.goto(html_path.as_uri(), wait_until="load")
            sizes = page.eval_on_selector_all(
                "figure svg", "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })"
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return console, errors, outside, sizes


@pytest.mark.slow
def test_report_of_a_real_job_renders_offline_in_chromium(tmp_path, broker, topic, tiny_model, monkeypatch):
    import tempfile as _tempfile

    import ray
    from PIL import Image

    monkeypatch.setenv("TIDEGATE_RAY_TEMP_DIR", _tempfile.mkdtemp(prefix="tgray", dir="/tmp"))
    spec_path = write_spec(tmp_path, make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"model.pricing": {"prompt_per_1k": 0.5, "completion_per_1k": 1.5, "currency": "EUR"},
           "prompt.context_field": "docs",
           "validation": [{"rule": "grounding", "threshold": 0.5, "on_fail": "flag"},
                          {"rule": "regex", "must_not_match": ["^ 1312"], "on_fail": "reject"}]},
    ))  # fmt: skip
    records = [
        (f"e{i}".encode(), json.dumps({"id": f"e{i}", "user": CANARY, "question": f"{CANARY} order {i}?",
                                       "docs": [f"{CANARY} order {i} shipped"]}).encode())
        for i in range(40)
    ]  # fmt: skip
    send(broker, topic, records + [(b"bad", b'{"id": "bad", ')])
    spec = tidegate.load_spec(spec_path)
    try:
        stats = tidegate.Job(spec).run(until_drained=True, wait=True).wait()
    finally:
        ray.shutdown()
    assert stats.ok + stats.dead_lettered == 41

    out = tmp_path / "report" / "report.html"
    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "report", str(spec_path), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    page = out.read_text()
    assert CANARY not in page  # aggregates and identifiers only
    for section in ("Runs", "rows committed over time", "latency over time", "latency distribution",
                    "dead letters by class", "rule failure rates", "groundedness scores", "cost per tenant (EUR)"):  # fmt: skip
        assert section in page, section
    assert "<script" not in page and "<link" not in page  # nothing to fetch or run

    shot = tmp_path / "report.png"
    console, errors, outside, sizes = _browser_page(out, shot)
    assert console == [] and errors == [], (console, errors)
    assert outside == [], outside  # opens offline
    assert len(sizes) == 7 and all(w > 300 and h > 150 for w, h in sizes), sizes
    image = Image.open(shot).convert("L")
    assert image.size[0] >= 1100 and image.size[1] > 1500
    # Charts drew something: a good share of the page is not background.
    ink = sum(1 for px in image.getdata() if px < 200) / (image.size[0] * image.size[1])
    assert ink > 0.01, ink


def test_report_of_a_job_that_has_not_run_yet(tmp_path):
    """No tables yet: the page still renders, each chart saying what it lacks."""
    spec = tidegate.parse_spec(make_spec(tmp_path, type("B", (), {"bootstrap_servers": "127.0.0.1:9"})(), "t", tmp_path))
    page = tidegate.report(spec, tmp_path / "r.html").read_text()
    assert page.count("<svg") == 7 and "no run has ended yet" in page
    from jobs.report import collect, render

    data = collect(spec)
    spec.sink.results = "s3://reader:hunter2@minio.local/lake/results"  # credentials in a URI: masked
    page = render(spec, data)
    assert "hunter2" not in page and "s3://***@minio.local/lake/results" in page
    for what in ("no commits yet", "no results yet", "no dead letters yet", "no validated outputs yet", "no priced rows yet"):
        assert what in page, what


def test_report_of_an_unreadable_table_is_one_error_line(tmp_path):
    """A results table the reader cannot read: `tidegate report` says which table, exits 2, writes nothing."""
    spec = make_spec(tmp_path, type("B", (), {"bootstrap_servers": "127.0.0.1:9"})(), "t", tmp_path)
    log = Path(spec["sink"]["results"]) / "_delta_log"
    log.mkdir(parents=True)
    (log / "00000000000000000000.json").write_text('{"commitInfo": {"secret-canary-4711": 1}}\nnot json\n')
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "report", str(write_spec(tmp_path, spec)), "--out",
                          str(tmp_path / "r.html")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot read the results table {spec['sink']['results']} ({lines[0].rsplit('(', 1)[1]}"], lines
    assert "secret-canary" not in out.stderr and not (tmp_path / "r.html").exists()
