"""The short form of `make soak` (bench/soak.py): a run long enough for a checkpoint, memory sampled."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_soak_short_form(tmp_path):
    from bench.soak import soak

    report = soak(events=60_000, partitions=4, sample_s=1.0, workdir=tmp_path)
    assert report["exit_code"] == 0 and report["exactly_once"], report
    assert report["delta"]["open_ms"] < 5_000 and report["delta"]["commit_files"] >= 1
    roles = set(report["rss"])
    assert {"driver", "ray::StageWorker", "ray::CommitWriter", "ray::InstantEngine"} <= roles, roles
    # A gross leak (a table kept per commit, say) grows the driver by tens of MB per minute.
    assert report["rss"]["driver"]["slope_second_half_mb_per_min"] < 60, report["rss"]["driver"]
