"""The engine's step loop, its room() signal and request priorities, on a scripted stand-in for
vLLM's LLMEngine (pure scheduling logic; the real engine is in test_engine.py and the pool's use of
it in test_pipeline.py)."""

from __future__ import annotations

import asyncio
import copy
import threading
from types import SimpleNamespace

import pyarrow as pa

from compute.engine import EngineWorker


class ScriptedEngine:
    """What the step loop uses of vLLM's LLMEngine: a request finishes after max_tokens steps, and
    each step waits for the test to release it."""

    def __init__(self):
        self.left: dict[str, int] = {}
        self.priority: dict[str, int] = {}
        self.go = threading.Semaphore(0)

    def add_request(self, rid, prompt, params, priority=0):
        self.left[rid] = params.max_tokens
        self.priority[rid] = priority
        low = sum(1 for r in self.left if self.priority[r] > 0)
        self.peak_low = max(getattr(self, "peak_low", 0), low)

    def abort_request(self, ids):
        for rid in ids:
            self.left.pop(rid, None)

    def step(self):
        self.go.acquire()
        out = []
        for rid in list(self.left):
            self.left[rid] -= 1
            if not self.left[rid]:
                del self.left[rid]
                done = SimpleNamespace(text="x", finish_reason="length", token_ids=[0])
                out.append(SimpleNamespace(request_id=rid, finished=True, num_cached_tokens=0, outputs=[done]))
        return out


class Params:
    max_tokens = 16

    def clone(self):
        return copy.copy(self)


def worker(max_num_seqs: int) -> EngineWorker:
    w = EngineWorker.__new__(EngineWorker)  # no vLLM: the step loop around a scripted engine
    w.engine = ScriptedEngine()
    w.tokenizer = lambda prompts, add_special_tokens: {"input_ids": [[1, 2, 3] for _ in prompts]}
    w.chat, w.system, w.sampling = False, None, Params()
    w.max_model_len, w.max_num_seqs, w.priority_scheduling = 100, max_num_seqs, True
    w.low_priority_cap = None
    w._setup_loop()
    return w


def batch(budgets: list[int]) -> pa.Table:
    n = len(budgets)
    return pa.table({"prompt": ["q"] * n, "source_partition": pa.array([0] * n, pa.int32()),
                     "source_offset": pa.array(range(n), pa.int64()), "max_tokens": budgets})  # fmt: skip


async def steps(w: EngineWorker, n: int) -> None:
    for _ in range(n):
        w.engine.go.release()
    await asyncio.sleep(0.05)  # before a check that something has NOT happened; until() for one that has


async def until(cond, timeout_s: float = 5.0) -> None:
    """Wait for the step thread to get there (a loaded machine can hold it past any fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.005)


def test_room_comes_when_long_rows_hold_their_batches_and_the_running_set_runs_short():
    async def scenario():
        w = worker(max_num_seqs=4)
        a = asyncio.create_task(w.complete(batch([20, 1, 1, 1])))
        b = asyncio.create_task(w.complete(batch([20, 1, 1, 1])))
        room2, room3 = asyncio.create_task(w.room(2)), asyncio.create_task(w.room(3))
        await asyncio.sleep(0.05)
        assert not room2.done()  # 8 unfinished rows, the running set holds 4
        await steps(w, 1)  # the short rows finish: 2 unfinished, both batches inside
        await until(room2.done)
        assert room2.result() is True
        assert not a.done() and not b.done()
        assert not room3.done()  # only 2 batches inside
        await steps(w, 19)
        assert (await a).num_rows == 4 and (await b).num_rows == 4
        assert not room3.done()
        room3.cancel()
        await asyncio.sleep(0.01)
        assert w._room_waiters == []  # a cancelled room() leaves nothing behind
        assert w.usage()["peak_batches"] == 2
        w.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_no_room_when_rows_run_short_only_because_a_batch_finished():
    """Outputs of one length: the running set empties as a whole batch leaves, and that batch's
    place in the pool is the room; room() must not add one more."""

    async def scenario():
        w = worker(max_num_seqs=4)
        a = asyncio.create_task(w.complete(batch([2, 2, 2, 2])))
        b = asyncio.create_task(w.complete(batch([4, 4, 4, 4])))
        room2 = asyncio.create_task(w.room(2))
        await asyncio.sleep(0.05)
        await steps(w, 2)  # a finishes: 4 unfinished rows (b's), one batch inside
        await until(a.done)
        assert not b.done()
        assert not room2.done()
        await steps(w, 2)
        await until(b.done)
        assert not room2.done()
        room2.cancel()
        w.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_rows_submitted_but_not_yet_in_the_engine_count():
    w = worker(max_num_seqs=4)
    woke: list[bool] = []
    with w._cv:  # as if submit() queued a batch of 5 rows the step thread has not added yet
        w._commands.append(("add", (SimpleNamespace(key="q"), [(0, [1], Params())] * 5)))
        w._room_waiters.append((1, lambda: woke.append(True)))
    w._wake_room_waiters()
    assert woke == []  # 5 rows on their way: more than the running set
    with w._cv:
        w._commands[0] = ("add", (SimpleNamespace(key="q"), [(0, [1], Params())] * 3))
    w._wake_room_waiters()
    assert woke == [True]  # 3 rows, one batch (queued): room for one more
    assert w._room_waiters == []
    with w._cv:
        w._commands.clear()
    w.close()


def test_a_batchs_priority_reaches_the_engine_with_each_of_its_rows():
    """pool.backend serve: a batch job's rows go to an online replica's engine at a lower priority
    (vLLM's priority scheduling starts waiting rows by it); online requests keep priority 0."""

    async def scenario():
        w = worker(max_num_seqs=4)
        online = asyncio.create_task(w.complete(batch([1, 1])))
        batched = asyncio.create_task(w.run_batch(batch([1, 1, 1]), priority=1))
        await asyncio.sleep(0.05)
        await steps(w, 1)
        assert (await online).num_rows == 2
        counts, table = await batched
        assert counts["rows"] == 3 and table.num_rows == 3
        assert sorted(w.engine.priority.values()) == [0, 0, 1, 1, 1]
        w.priority_scheduling = False  # an engine that schedules first come, first served gets none
        await asyncio.gather(w.run_batch(batch([1]), priority=1), steps(w, 1))
        assert sorted(w.engine.priority.values()) == [0, 0, 0, 1, 1, 1]
        w.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_batch_share_keeps_places_in_the_running_set_for_online_requests():
    """serve.batch_share 0.5 of 4 places: a batch job's rows (priority 1) hold at most 2 at once,
    the rest wait in the worker; an online request goes in at once beside them; every row ends,
    and an aborted batch's held rows never reach the engine."""

    async def scenario():
        w = worker(max_num_seqs=4)
        w.low_priority_cap = 2
        batched = asyncio.create_task(w.run_batch(batch([2] * 6), priority=1))
        await until(lambda: len(w.engine.left) == 2 and len(w._held) == 4)
        online = asyncio.create_task(w.complete(batch([1])))
        await asyncio.sleep(0.05)  # submitted while the step thread is inside a step
        await steps(w, 1)  # the step in progress ends; the online row goes in beside the 2 batch rows
        await until(lambda: len(w.engine.left) == 3)
        assert len(w._held) == 4
        await steps(w, 1)
        assert (await online).num_rows == 1
        await steps(w, 8)
        counts, table = await batched
        assert counts["rows"] == 6 and table.column("output_text").to_pylist() == ["x"] * 6
        assert w.engine.peak_low == 2 and w._low_in_engine == 0 and not w._held

        aborted = asyncio.create_task(w.complete(batch([50] * 5), priority=1))
        await until(lambda: len(w._held) == 3)
        aborted.cancel()
        await asyncio.sleep(0.05)
        await steps(w, 1)
        await until(lambda: not w._held and w._low_in_engine == 0 and not w.engine.left)
        w.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_row_vllm_refuses_fails_alone_naming_the_exception_type_only():
    """vLLM's validation errors can quote the value they refuse (a row's own budget, its text):
    the row's dead-letter reason, which an online request answers with too, names the type only."""

    class Refusing(ScriptedEngine):
        def add_request(self, rid, prompt, params, priority=0):
            if params.max_tokens == 7:
                raise ValueError(f"max_tokens=7 is not allowed for prompt {prompt} of customer jane@example.com")
            super().add_request(rid, prompt, params, priority)

    async def scenario():
        w = worker(max_num_seqs=4)
        w.engine = Refusing()
        done = asyncio.create_task(w.complete(batch([1, 7, 1])))
        await asyncio.sleep(0.05)
        await steps(w, 1)
        table = await done
        assert table.column("error_class").to_pylist() == [None, "engine_error", None]
        assert table.column("error").to_pylist()[1] == "vLLM refused the row (ValueError)"
        w.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_an_engine_whose_step_fails_is_marked_broken_and_its_batches_fail_with_engine_broken():
    """A step that raises (vLLM's engine core gone, a sticky device error) fails every batch in
    it with EngineBroken (the pool restarts that engine: tests/test_pool_isolation.py), and the
    engine says it is broken (an online replica's check_health then fails: Serve replaces it)."""
    import pytest

    from jobs.serve import TidegateEndpoint
    from schemas.errors import EngineBroken

    class Dead(ScriptedEngine):
        def step(self):
            self.go.acquire()
            raise RuntimeError("engine core died")

    async def scenario():
        w = worker(max_num_seqs=4)
        w.engine = Dead()
        assert w.broken is None
        done = asyncio.create_task(w.complete(batch([3, 3])))
        await asyncio.sleep(0.05)
        await steps(w, 1)
        with pytest.raises(EngineBroken, match="RuntimeError"):
            await done
        assert w.broken == "RuntimeError"
        w.close()
        return w

    w = asyncio.run(asyncio.wait_for(scenario(), 10))
    endpoint = getattr(TidegateEndpoint, "func_or_class", TidegateEndpoint)
    with pytest.raises(RuntimeError, match=r"engine failed a step \(RuntimeError\)"):
        endpoint.check_health(SimpleNamespace(engine=w))
    healthy = worker(max_num_seqs=4)
    endpoint.check_health(SimpleNamespace(engine=healthy, guards=SimpleNamespace(busy_for=lambda: 0.0),
                                          spec=SimpleNamespace(serve=SimpleNamespace(request_timeout_s=3.0)),
                                          buffer=SimpleNamespace(journal=None)))  # a healthy one passes  # fmt: skip
    healthy.close()
