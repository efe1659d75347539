"""The engine pool's quarantine on a real local Ray with stand-in engine actors: a quarantined
part waits for its engine without blocking the job's loop, and runs with nothing beside it.
(The whole path, an engine killed by a poison row, is tests/test_pool.py's.)"""

from __future__ import annotations

import os
import time

import pyarrow as pa
import ray

from tests.conftest import make_spec


def pool_over(actor, tmp_path):
    """An engine pool whose one engine is `actor` (no vLLM: the pool's bookkeeping only). The
    start timeout is wide (it was 20 s): a restarted Ray worker on a busy 2-core machine can take
    that long, and no test here waits for it to pass."""
    from actors.pool import EnginePool, _Slot
    from schemas.spec import parse_spec

    spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model", **{
        "source": {"kafka": {"topic": "t"}}, "pool.actor_start_timeout_s": 90, "pool.batches_in_flight": 4}))  # fmt: skip
    pool = EnginePool(spec)
    pool._room = False
    pool.slots = [_Slot(actor)]
    return pool


@ray.remote(num_cpus=0)
class ReloadingEngine:
    """ping() answers once `asleep` is gone (a restarted engine reloading its model); run_batch
    records how many calls run at once."""

    def __init__(self, asleep: str):
        self.asleep = asleep
        self.running = 0
        self.peak = 0
        self.calls: list[int] = []

    async def ping(self) -> int:
        import asyncio

        while os.path.exists(self.asleep):
            await asyncio.sleep(0.02)
        return os.getpid()

    async def run_batch(self, requests: pa.Table):
        import asyncio

        self.running += 1
        self.peak = max(self.peak, self.running)
        self.calls.append(requests.num_rows)
        await asyncio.sleep(0.2)
        self.running -= 1
        return {"rows": requests.num_rows, "prompt_tokens": 0, "completion_tokens": 0}, requests

    def seen(self) -> tuple[int, list[int]]:
        return self.peak, self.calls


def test_a_quarantined_part_waits_for_its_engine_without_blocking_and_runs_alone(local_ray, tmp_path):
    from actors.pool import _Batch, _Part

    asleep = tmp_path / "asleep"
    asleep.touch()
    pool = pool_over(ReloadingEngine.remote(str(asleep)), tmp_path)
    quarantined = pa.table({"prompt": ["a", "b", "c"]})
    pool._suspects.append(_Part(_Batch("quarantined", quarantined, open_parts=1), 0, quarantined, 3))

    t0 = time.monotonic()
    assert pool.collect(0) == []  # the engine is reloading: nothing to collect, and no wait for it
    assert time.monotonic() - t0 < 10  # (the old code waited in ray.get until the engine answered)
    assert pool._waking is not None and pool.in_flight == 1 and not pool.has_capacity()
    assert pool.waitable() == [pool._waking[0]]  # the ping: the job's shared wait wakes when the engine is back
    later = pa.table({"prompt": ["d", "e"]})
    pool.submit(later, 2, "later")  # rendered before the quarantine: held, not started beside it
    assert not pool._pending and pool.in_flight == 2

    asleep.unlink()
    finished: list = []
    deadline = time.monotonic() + 150
    while len(finished) < 2 and time.monotonic() < deadline:
        finished += pool.collect(0.2)
        if pool._pending and any(c.part.alone for c in pool._pending.values()):
            assert len(pool._pending) == 1 and len(pool._held) == 1  # alone: the held part waits
    assert [tag for tag, _ in finished] == ["quarantined", "later"]
    assert [c.rows for _, c in finished] == [3, 2]
    peak, calls = ray.get(pool.slots[0].actor.seen.remote())
    assert peak == 1 and calls == [3, 2]
    assert pool.in_flight == 0 and pool.has_capacity()


@ray.remote(num_cpus=0, max_restarts=-1)
class BreakingEngine:
    """Its engine breaks (a step raised) in the first process that finds `breaks`; a restarted
    process has a fresh one."""

    def __init__(self, breaks: str):
        with open(breaks + ".starts", "a") as f:  # one line per process the actor ran in
            f.write(f"{os.getpid()}\n")
        self.broken = os.path.exists(breaks)
        if self.broken:
            os.remove(breaks)

    def ping(self) -> int:
        return os.getpid()

    def run_batch(self, requests: pa.Table):
        from schemas.errors import EngineBroken

        if self.broken:
            raise EngineBroken("the engine failed a step (RuntimeError)", os.getpid())
        return {"rows": requests.num_rows, "prompt_tokens": 0, "completion_tokens": 0}, requests


def test_an_engine_whose_step_failed_is_restarted_and_its_batches_run_again_on_the_fresh_one(local_ray, tmp_path):
    """Every batch inside an engine whose step raised fails with EngineBroken; the engine would
    fail every later row too. The pool restarts it, once, and the batches run again (alone, as
    after a crash) on the fresh engine: no row is dead-lettered for the engine's failure."""
    breaks = tmp_path / "breaks"
    breaks.touch()
    pool = pool_over(BreakingEngine.remote(str(breaks)), tmp_path)
    pool._restart_grace_s = 1.0
    first_pid = ray.get(pool.slots[0].actor.ping.remote())
    for i in range(3):
        pool.submit(pa.table({"prompt": [f"q{i}a", f"q{i}b"]}), 2, f"b{i}")
    finished: list = []
    deadline = time.monotonic() + 150
    while len(finished) < 3 and time.monotonic() < deadline:
        finished += pool.collect(0.2)
    assert sorted(tag for tag, _ in finished) == ["b0", "b1", "b2"]
    completions = [ray.get(c.ref) for _, c in finished]
    assert all("error_class" not in t.column_names for t in completions)  # the rows' own answers, no crash rows
    assert ray.get(pool.slots[0].actor.ping.remote()) != first_pid
    starts = (tmp_path / "breaks.starts").read_text().split()
    assert len(starts) == 2, starts  # restarted once, for the three batches the one failure failed
