"""The job's handle on the commit writer actor (actors/writer.py CommitWriterClient), on a real
local Ray and real Delta tables, with a sink whose commits are slow (tests/job_runner.py)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_spec

pytestmark = pytest.mark.slow


def test_a_call_queued_behind_a_long_commit_waits_for_it_then_gets_its_own_timeout(tmp_path, local_ray):
    """The writer is sequential: a rebalance's resume (or anchor, forget, read_positions) waits
    behind the commit in flight, which may run long (a maintenance round inside it, a store's
    retries). Before stop 44 stages.start_timeout_s counted that wait too: a commit of 6 s and a
    timeout of 3 s failed the resume, and with it the run, from inside the rebalance."""
    from actors.writer import CommitWriterClient
    from schemas.spec import parse_spec
    from tests.job_runner import slow_sink

    spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model", **{
        "source": {"kafka": {"topic": "t"}}, "stages.start_timeout_s": 3}))  # fmt: skip
    client = CommitWriterClient(spec, slow_sink(spec, 6.0))
    try:
        client.open()
        assert client.resume([("t", 0)])[0] == {("t", 0): None}  # (positions, repair windows)
        client.write([], {("t", 0): 0}, None, "the slow commit")
        t0 = time.monotonic()
        assert client.resume([("t", 0)])[0] == {("t", 0): 0}  # after the commit, which it waited for
        assert time.monotonic() - t0 >= 4
        tag, _ = client.finished(timeout_s=10)
        assert tag == "the slow commit"
    finally:
        client.shutdown(timeout_s=10)
