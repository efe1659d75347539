"""A commit writer that dies (SIGKILL) at a chosen point of its second publish: before it, in the
middle of it, or after it (before the next commit records the marks); or, `between`, in its second
commit, after the dead-letter half landed and before the results half (a repair window). Fault injection through a
component (a ResultsTopic subclass), not a hook in production code. Used by tests/test_results_topic.py:

    python -m tests.results_topic_crash SPEC.json before|middle|after|between
"""

from __future__ import annotations

import json
import os
import signal
import sys

from actors.writer import CommitWriter
from connectors.results_topic import ResultsTopic
from schemas.spec import parse_spec
from tests.conftest import results_table
from tests.test_delta_sink import dead

TPS = [("t", 0), ("t", 1)]


def commit_rows(first: int, last: int):
    """Results for source offsets first..last of both partitions, every 4th offset a dead letter."""
    import pyarrow as pa

    offsets = list(range(first, last + 1))
    res = pa.concat_tables([results_table([o for o in offsets if o % 4], p) for p in (0, 1)])
    dl = pa.concat_tables([dead([o for o in offsets if not o % 4], p) for p in (0, 1)])
    return res, dl, {tp: last for tp in TPS}


class CrashingTopic(ResultsTopic):
    mode = "before"
    calls = 0

    def publish(self, results, dead, positions, keep=None, also_dead=None):
        self.calls += 1
        if self.calls < 2:
            return super().publish(results, dead, positions, keep, also_dead)
        if self.mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "middle":
            super().publish(results.slice(0, results.num_rows // 2), dead.slice(0, 1), positions, keep)
            os.kill(os.getpid(), signal.SIGKILL)
        super().publish(results, dead, positions, keep)
        os.kill(os.getpid(), signal.SIGKILL)


def main(spec_path: str, mode: str) -> None:
    spec = parse_spec(json.loads(open(spec_path).read()))
    writer = CommitWriter(spec)
    topic = CrashingTopic(spec, writer.stored_results, writer.stored_dead)
    topic.mode = mode
    writer.topic = topic
    writer.open()
    writer.resume(TPS)
    for first, last in ((0, 9), (10, 19)):
        res, dl, positions = commit_rows(first, last)
        if first and mode == "between":
            writer.sink.results.append = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        writer.write_tables(res, dl, positions, None)
    sys.exit(3)  # not reached: the second publish kills this process


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
