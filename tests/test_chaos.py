"""The short form of `make chaos` (tests/chaos.py): one fault of every kind on a durable broker."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_chaos_short_form(tmp_path):
    from tests.chaos import FAULTS, run

    report = run(seed=3, events=6000, faults=len(FAULTS), partitions=4, replicas=2, workdir=tmp_path, timeout_s=600)
    assert sorted(f["kind"] for f in report.faults) == sorted(FAULTS)  # every kind struck once
    skipped = [f for f in report.faults if "skipped" in f["target"]]
    assert not skipped, skipped  # a fault that found nothing to strike would prove nothing
    assert report.lost == 0 and report.duplicated == 0, report
    assert report.poison > 0 and report.poison_dead_lettered_once, report
    assert report.unexpected_dead_letters == 0, report
    assert report.orphans == [], report.orphan_names  # each: name, parent, born when
