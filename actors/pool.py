"""A pool of engine actors on Ray, each with `pool.batches_in_flight` batches inside its engine
(up to `pool.max_batches_in_flight` while long outputs keep the earlier ones inside).

    submit(requests, rows, tag)   requests: a REQUEST_SCHEMA table or an object ref to one
    collect(timeout_s)            -> [(tag, Completions)]: per batch, an object ref to its
                                  COMPLETION_SCHEMA table (rows in request order) and its counts

Each actor is async (compute.engine.EngineWorker.run_batch): every batch it holds is inside the
engine at once, and the engine batches continuously across them. The completions stay in the
object store (fetched to the driver's node, not into the driver process) for the stage workers.
Submission is bounded: `has_capacity()` is False when every actor holds its share, which is how
backpressure reaches the source. An actor's share is batches_in_flight, plus one each time its
engine says it has room (EngineWorker.room: its unfinished rows fit the running set while it
still holds that many batches, i.e. their last rows are long outputs), up to
max_batches_in_flight; each batch that finishes takes one such extra place back.

Failures: a dead engine is restarted and its batches re-run; a batch that fails twice, or runs
past pool.batch_timeout_s (a hang: the call is cancelled, which aborts its rows in the engine, and
an engine that stopped answering is restarted), is quarantined and split until the row at fault
is alone (`engine_crash` / `engine_hang`). Scaling: `autoscale(backlog)` between min_actors and
max_actors. Tensor parallelism: one STRICT_PACK placement group per engine.

pool.backend serve: the actors are clients of a running Serve application's engines
(actors/serve_engine.py), one per pool.actors, with the same interface; nothing else changes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.remote import actor_restarts, cause, first_line
from compute.engine import EngineWorker, engine_env, engine_threads
from schemas.errors import EngineBroken, EngineError
from schemas.records import COMPLETION_SCHEMA
from schemas.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class Completions:
    """A batch's completions: where they are, and their counts (so the driver never reads them)."""

    ref: Any  # object ref to the COMPLETION_SCHEMA table, rows in request order
    rows: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Slot:
    actor: Any
    in_flight: int = 0
    idle_since: float = field(default_factory=time.monotonic)  # when its last call finished
    ready_at: float = 0.0  # restarted: its calls' clocks start once it has loaded again
    probe: tuple[Any, float] | None = None  # (ping ref, sent at): is a suspected engine still answering?
    pg: Any = None  # its placement group (tensor parallel engines)
    run_batch: Any = None  # the actor's run_batch with num_returns=2
    extra: int = 0  # batches beyond batches_in_flight its engine had room for
    room: Any = None  # the room() call waiting on its engine, if any
    killed_pid: int | None = None  # the engine process the pool last restarted (EngineBroken)
    restarts: int = 0  # Ray's restart count of its actor, as last read (a crash Ray restarted it from)
    restarting_since: float | None = None  # when the pool first saw Ray restarting it (None: not restarting)


@dataclass
class _Batch:
    """A batch as the job submitted it; it may run as several parts after a crash."""

    tag: Any
    requests: Any  # the REQUEST_SCHEMA table, or an object ref to it
    done: dict[int, tuple[dict, Any]] = field(default_factory=dict)  # first row -> (counts, completions ref)
    open_parts: int = 0


@dataclass
class _Part:
    batch: _Batch
    start: int  # row of batch.requests where this part begins
    requests: Any  # table or object ref
    rows: int
    alone: bool = False  # ran with nothing else on the pool: a failure is its own fault
    attempts: int = 0  # failures while alone
    hung: bool = False  # the last failure was a timeout, not a dead process


@dataclass
class _Call:
    slot: _Slot
    part: _Part
    counts: Any  # object ref to the counts dict (the call's first return)
    sent: float


class EngineHang(Exception):
    """A batch ran longer than pool.batch_timeout_s: the engine was restarted."""


class EnginePool:
    """engine_cls: the engine each actor runs (EngineWorker; tests pass a subclass that fails on cue)."""

    def __init__(self, spec: JobSpec, json_schema: dict | None = None, engine_cls: type = EngineWorker):
        self.spec = spec
        self.json_schema = json_schema  # constrain generation to it (structured outputs)
        self.serve_app = spec.engines_app
        if self.serve_app is not None:
            from actors.serve_engine import ServeEngine

            engine_cls = ServeEngine
        self.engine_cls = engine_cls
        self.slots: list[_Slot] = []
        self._pending: dict[ray.ObjectRef, _Call] = {}  # completions ref -> the call
        self._suspects: deque[_Part] = deque()  # quarantined parts, run one at a time
        # The next quarantined part, waiting for slot 0's engine to answer a ping (a restart
        # reloads the model): (ping ref, part, since). Waited for without blocking the job's loop,
        # which keeps the source's group membership (a reload can outlast max.poll.interval.ms).
        self._waking: tuple[Any, _Part, float] | None = None
        self._held: deque[_Part] = deque()  # submitted while a part runs alone: started after it
        self._finished: list[tuple[Any, Completions]] = []
        self.max_model_len: int | None = None
        self.model_revision: str | None = None
        self._restart_grace_s = 60.0  # set from the measured engine load time in start()
        self.fixed_cluster = False
        self._actor_options: dict[str, Any] = {}
        self._starting: tuple[_Slot, Any, float] | None = None  # an engine being added (scale up)
        self._backlog_since: float | None = None
        self._told_full = False
        self._usage_refs: list | None = None
        self._rooms: dict[ray.ObjectRef, _Slot] = {}  # room() calls waiting -> their slot
        self._room = hasattr(engine_cls, "room") and spec.pool.batches_cap > spec.pool.batches_in_flight
        self.on_hashing: Callable[[int, int], None] | None = None  # (bytes hashed, total): the model's hash

    def _hash_model(self, actor, timeout_s: float) -> str:
        """The model's revision from one engine; with `on_hashing`, its progress polled meanwhile
        (an engine class without hash_model/hashing_progress is asked model_revision, silently)."""
        if self.on_hashing is None or not hasattr(self.engine_cls, "hashing_progress"):
            return ray.get(actor.model_revision.remote(), timeout=timeout_s)
        ref = actor.hash_model.remote()
        deadline = time.monotonic() + timeout_s
        while not ray.wait([ref], timeout=0.5)[0]:
            if time.monotonic() >= deadline:
                raise GetTimeoutError(f"hashing the model took over {timeout_s:.0f}s")
            self.on_hashing(*ray.get(actor.hashing_progress.remote(), timeout=timeout_s))
        revision = ray.get(ref)
        _, total = ray.get(actor.hashing_progress.remote(), timeout=timeout_s)
        self.on_hashing(total, total)
        return revision

    def start(self, fixed_cluster: bool = False) -> None:
        """Start the engine actors and wait until each has loaded its engine.

        fixed_cluster: the cluster cannot grow (a local one this process started), so a request
        no node can ever satisfy fails at once instead of after actor_start_timeout_s.
        """
        pool = self.spec.pool
        self.fixed_cluster = fixed_cluster
        if fixed_cluster and self.serve_app is None:
            self._check_fits()
        env = engine_env(self.spec.model)
        threads = engine_threads(pool.engine_threads, pool.num_gpus, pool.max_engines)
        if threads:
            env["OMP_NUM_THREADS"] = threads
        options: dict[str, Any] = dict(
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            runtime_env={"env_vars": env},
            # A crashed engine process is always restarted and Ray runs the batches it held once
            # more (calls made while it restarts wait for it). A batch that fails again is put in
            # quarantine (see collect). Batches are pure functions of their input; exactly-once
            # comes from the commit protocol.
            max_restarts=-1,
            max_task_retries=1,
            # Async actor: every batch it holds is inside the engine at once (continuous batching),
            # beside a room() call, usage and ping.
            max_concurrency=max(4, pool.batches_cap + 4),
        )
        if self.serve_app is not None:  # a client of the application's replicas: they hold the resources
            options.update(num_cpus=0, num_gpus=0, runtime_env={})
        elif pool.tensor_parallel_size > 1:
            # The engine actor holds no GPU itself: vLLM's Ray executor starts one worker per GPU
            # in the placement group the actor captures (one group per engine, packed on a node).
            options.update(num_gpus=0, num_cpus=0)
        self._actor_options = options
        actors = [self._new_actor() for _ in range(pool.initial_engines)]
        self.slots = [_Slot(a, pg=pg) for a, pg in actors]
        t0 = time.monotonic()
        refs = [a.info.remote() for a, _ in actors]
        try:
            infos = ray.get(refs, timeout=pool.actor_start_timeout_s)
            # Every engine loads the same model: one of them hashes it (a read of every weight file).
            self.model_revision = self._hash_model(actors[0][0], pool.actor_start_timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise EngineError(
                f"{len(actors)} engine actor(s) did not start within pool.actor_start_timeout_s="
                f"{pool.actor_start_timeout_s:.0f}s; asked for num_cpus={pool.num_cpus}, num_gpus={pool.num_gpus}"
                f"{_tp_text(pool)} each; the cluster has {_describe(ray.cluster_resources())}"
            ) from None
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
            raise EngineError(f"engine actor failed to start: {cause}") from None
        self.max_model_len = infos[0]["max_model_len"]
        # After a restart the engine loads again before it runs anything: that time is not a hang.
        self._restart_grace_s = 30.0 + 3 * max(i["load_s"] for i in infos)
        if self.serve_app is not None:
            log.info("engines: the Serve application %r's (%d client(s), context %d tokens)",
                     self.serve_app, len(actors), self.max_model_len)  # fmt: skip
            return
        log.info(
            "%d engine actor(s) ready in %.1fs (engine load %.1fs, context %d tokens)",
            len(actors), time.monotonic() - t0, infos[0]["load_s"], self.max_model_len,
        )  # fmt: skip

    def _new_actor(self) -> tuple[Any, Any]:
        """One engine actor (and its placement group when tensor_parallel_size > 1)."""
        pool = self.spec.pool
        options = dict(self._actor_options)
        pg = None
        if self.serve_app is not None:
            actor = ray.remote(self.engine_cls).options(**options).remote(
                self.serve_app, self.spec.model, self.spec.sampling, self.spec.prompt.chat, self.spec.prompt.system,
                self.json_schema,
            )
            return actor, None
        if pool.tensor_parallel_size > 1:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            per_gpu_cpu = max(pool.num_cpus / pool.tensor_parallel_size, 0.001)
            pg = placement_group([{"GPU": 1, "CPU": per_gpu_cpu}] * pool.tensor_parallel_size, strategy="STRICT_PACK")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_capture_child_tasks=True
            )
        actor = (
            ray.remote(self.engine_cls)
            .options(**options)
            .remote(
                self.spec.model,
                self.spec.sampling,
                self.spec.prompt.chat,
                self.spec.prompt.system,
                self.json_schema,
                pool.tensor_parallel_size,
            )
        )
        return actor, pg

    # -- scaling ---------------------------------------------------------------------------------

    def autoscale(self, backlog_rows: int | None) -> None:
        """Between pool.min_actors and pool.max_actors: add an engine when the source's backlog
        has exceeded what the engines have queued for scale_up_after_s; remove one that has been
        idle for scale_down_after_s. Call it from the job loop (cheap; never blocks)."""
        pool = self.spec.pool
        now = time.monotonic()
        self._adopt_started()
        if pool.min_engines == pool.max_engines:
            return
        # More waiting at the source than the engines have queued, for a while: they do not keep up.
        queued_rows = self.capacity * pool.batch_size
        if backlog_rows is not None and backlog_rows > queued_rows:
            self._backlog_since = self._backlog_since or now
            grow = now - self._backlog_since >= pool.scale_up_after_s
            if grow and self._starting is None and len(self.slots) < pool.max_engines:
                self._scale_up()
                self._backlog_since = None
        else:
            self._backlog_since = None
        if len(self.slots) > pool.min_engines and self._starting is None and not self._isolating:
            for slot in reversed(self.slots[1:]):  # slot 0 runs quarantined parts: keep it
                if not slot.in_flight and now - slot.idle_since >= pool.scale_down_after_s:
                    self.slots.remove(slot)
                    self._forget_rooms([slot])
                    self._kill(slot)
                    log.info("engine pool: idle for %.0fs, down to %d engine(s)", pool.scale_down_after_s, len(self.slots))
                    break

    def _scale_up(self) -> None:
        pool = self.spec.pool
        if self.fixed_cluster:
            free = ray.available_resources()
            if free.get("CPU", 0) < pool.num_cpus or free.get("GPU", 0) < pool.num_gpus:
                if not self._told_full:
                    log.info("engine pool: backlog, but this fixed cluster has no room for another engine (%s free)",
                             _describe(free))  # fmt: skip
                    self._told_full = True
                return
        actor, pg = self._new_actor()
        self._starting = (_Slot(actor, pg=pg), actor.info.remote(), time.monotonic())
        log.info("engine pool: backlog for %.0fs, starting engine %d of at most %d",
                 pool.scale_up_after_s, len(self.slots) + 1, pool.max_engines)  # fmt: skip

    def _adopt_started(self) -> None:
        if self._starting is None:
            return
        slot, ref, since = self._starting
        ready, _ = ray.wait([ref], timeout=0)
        if ready:
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                log.warning("engine pool: a new engine failed to start: %s", first_line(e))
                self._kill(slot)
            else:
                slot.idle_since = time.monotonic()
                self.slots.append(slot)
                log.info("engine pool: %d engine(s)", len(self.slots))
            self._starting = None
        elif time.monotonic() - since > self.spec.pool.actor_start_timeout_s:
            log.warning("engine pool: a new engine did not start within %.0fs; giving up on it",
                        self.spec.pool.actor_start_timeout_s)  # fmt: skip
            self._kill(slot)
            self._starting = None

    @staticmethod
    def _kill(slot: _Slot) -> None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        if slot.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(slot.pg)
            except Exception:
                pass

    def _check_fits(self) -> None:
        pool = self.spec.pool
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = [n for n in nodes if n.get("CPU", 0) >= pool.num_cpus and n.get("GPU", 0) >= pool.num_gpus]
        if not fits:
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise EngineError(
                f"no node can ever hold an engine actor: pool.num_cpus={pool.num_cpus:g}, pool.num_gpus={pool.num_gpus:g}"
                f"{_tp_text(pool)} per actor, but the largest node of this (non-autoscaling) cluster has "
                f"{_describe(biggest)}"
            )
        total_cpu = sum(n.get("CPU", 0) for n in nodes)
        total_gpu = sum(n.get("GPU", 0) for n in nodes)
        n = pool.initial_engines
        if n * pool.num_cpus > total_cpu or n * pool.num_gpus > total_gpu:
            what = "pool.actors" if pool.min_actors is None else "pool.min_actors"
            raise EngineError(
                f"{what}={n} engine actors need CPU={n * pool.num_cpus:g}, "
                f"GPU={n * pool.num_gpus:g} in all; the cluster has CPU={total_cpu:g}, GPU={total_gpu:g}"
            )

    def _limit(self, slot: _Slot) -> int:
        return self.spec.pool.batches_in_flight + slot.extra

    @property
    def capacity(self) -> int:
        return sum(self._limit(s) for s in self.slots)

    @property
    def in_flight(self) -> int:
        """Parts running or waiting (quarantined and held parts included)."""
        return len(self._pending) + len(self._suspects) + len(self._held) + (self._waking is not None)

    @property
    def _isolating(self) -> bool:
        """Quarantined parts wait, or one runs alone: nothing new may start beside them."""
        return bool(self._suspects) or self._waking is not None or any(c.part.alone for c in self._pending.values())

    def has_capacity(self, queued_elsewhere: int = 0) -> bool:
        """Room for another batch; queued_elsewhere: batches on their way here (being rendered)."""
        return not self._isolating and len(self._pending) + queued_elsewhere < self.capacity

    def waitable(self) -> list:
        """The calls running now, and a ping being waited for (for a wait shared with other stages)."""
        return [*self._pending, *self._rooms, *([self._waking[0]] if self._waking is not None else [])]

    def submit(self, requests: Any, rows: int, tag: Any) -> None:
        """requests: a REQUEST_SCHEMA table or an object ref to one (rows: its row count). While
        parts are isolated (quarantine), it is held and started once they are done: a failure
        beside a part running alone would be charged to that part's rows."""
        part = _Part(_Batch(tag, requests, open_parts=1), 0, requests, rows)
        if self._isolating:
            self._held.append(part)
            return
        self._start(part)

    def _start(self, part: _Part) -> None:
        slot = min(self.slots, key=lambda s: s.in_flight - self._limit(s))
        self._call(slot, part)
        self._ask_room(slot)

    def _may_grow(self, slot: _Slot) -> bool:
        """At its limit, and the limit below max_batches_in_flight."""
        return slot.in_flight >= self._limit(slot) and self._limit(slot) < self.spec.pool.batches_cap

    def _ask_room(self, slot: _Slot) -> None:
        """A slot that may grow asks its engine to say when it has room."""
        if not self._room or slot.room is not None or self._isolating or slot.probe is not None or not self._may_grow(slot):
            return
        slot.room = slot.actor.room.remote(slot.in_flight)
        self._rooms[slot.room] = slot

    def _roomed(self, ready) -> None:
        """Room the engines reported: a slot still at its limit gets one more place."""
        for ref in [r for r in self._rooms if r in ready]:
            slot = self._rooms.pop(ref)
            slot.room = None
            try:
                ray.get(ref)
            except Exception:  # the engine restarted or the call was cancelled: no room then
                continue
            if slot in self.slots and self._may_grow(slot):
                slot.extra += 1

    def _forget_rooms(self, slots: list[_Slot]) -> None:
        for slot in slots:
            if slot.room is not None:
                self._rooms.pop(slot.room, None)
                try:
                    ray.cancel(slot.room)
                except Exception:
                    pass
                slot.room = None
            slot.extra = 0

    def _call(self, slot: _Slot, part: _Part, retries: int | None = None) -> None:
        if retries is not None:
            method = slot.actor.run_batch.options(num_returns=2, max_task_retries=retries)
        else:  # made once per actor: Ray's options() costs the driver ~0.1 ms a call
            method = slot.run_batch = slot.run_batch or slot.actor.run_batch.options(num_returns=2)
        counts, table = method.remote(part.requests)
        slot.in_flight += 1
        self._pending[table] = _Call(slot, part, counts, time.monotonic())

    def _done(self, call: _Call) -> None:
        call.slot.in_flight -= 1
        call.slot.extra = max(0, call.slot.extra - 1)  # a finished batch gives an extra place back
        if not call.slot.in_flight:
            call.slot.idle_since = time.monotonic()

    def collect(self, timeout_s: float, ready: set | None = None) -> list[tuple[Any, Completions]]:
        """Completed batches as (tag, Completions), waiting up to timeout_s for one to finish.

        A batch that failed twice (its engine process died, e.g. on a row that crashes it) goes to
        quarantine: new work waits, and once nothing else runs, quarantined parts run one at a
        time, alone, so a failure is their own. A failing part is split in halves down to single
        rows; a single row that fails alone pool.max_attempts times comes back as an
        `engine_crash` error row.
        """
        self._check_stuck()
        if self._suspects and self._rooms:
            self._forget_rooms(self.slots)
        if not self._pending and self._suspects and self._waking is None and self.slots[0].probe is None:
            self._wake_alone(self._suspects.popleft())
        if self._waking is not None:
            self._run_alone_once_awake()
        self._start_held()
        if not self._pending:
            return []
        # fetch_local: the completions are copied to this node's object store (where the stage
        # workers read them), not into this process; a lost engine node cannot take them along.
        # `ready`: the refs a wait over every stage already found ready (see actors.remote.wait_ready).
        if ready is None:
            done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout_s, fetch_local=True)
        else:
            done = [ref for ref in self._pending if ref in ready]
        for ref in done:
            call = self._pending.pop(ref)
            self._done(call)
            try:
                counts = ray.get(call.counts)
            except (RayActorError, RayTaskError) as e:
                call.part.hung = False
                if isinstance(cause(e), EngineBroken):
                    self._restart_broken(call, e)
                self._failed(call.part, e)
                continue
            self._resolve(call.part, counts, ref)
        self._start_held()  # the isolated part that just finished was the last
        if self._room:  # after the completions: a batch that finished meanwhile took its place back
            if self._rooms:
                if ready is None:
                    ready = set(ray.wait(list(self._rooms), num_returns=len(self._rooms), timeout=0)[0])
                self._roomed(ready)
            for slot in self.slots:
                self._ask_room(slot)
        self._check_hangs()
        finished, self._finished = self._finished, []
        return finished

    def _check_stuck(self) -> None:
        """An engine suspected after a hang that does not answer a ping within pool.stuck_after_s is
        stuck (a blocked kernel, not a slow row): it is restarted."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.probe is None:
                continue
            ping, sent = slot.probe
            if ray.wait([ping], timeout=0)[0]:
                slot.probe = None
            elif now - sent > self.spec.pool.stuck_after_s and self._reloading(slot, now):
                slot.probe = (ping, now)  # a new process loading the model answers nothing yet: not stuck
            elif now - sent > self.spec.pool.stuck_after_s:
                log.warning("an engine did not answer for %.0fs: restarting it", now - sent)
                ray.kill(slot.actor, no_restart=False)
                slot.restarts += 1  # ours: not one to report as Ray's (_reloading)
                slot.probe = None
                slot.ready_at = now + self._restart_grace_s

    def _reloading(self, slot: _Slot, now: float) -> bool:
        """Whether Ray restarted this engine's actor since the pool last looked (a crash: Ray
        restarts it and runs its calls again) or is restarting it now. If so its calls' clocks start
        again from now: the model's reload is not the batches' time. Asked only of a call past its
        limit, or an engine that does not answer its probe (one GCS lookup)."""
        seen = actor_restarts(slot.actor)
        if seen is None:
            return False
        restarting, restarts = seen
        if restarts != slot.restarts:  # a restart the pool did not make, done or under way
            log.warning("an engine was restarted by Ray (restart %d); its batches run again", restarts)
            slot.restarts = restarts
            slot.restarting_since = now if restarting else None
            slot.ready_at = max(slot.ready_at, now)
            return True
        if not restarting:
            slot.restarting_since = None
            return False
        if slot.restarting_since is None:
            slot.restarting_since = now
        if now - slot.restarting_since > self._restart_grace_s:
            # Longer than a reload takes (a hung model load, an actor Ray cannot place): handled as
            # a hang again (cancel, isolate; the probe kills and restarts it), never waited on for good.
            return False
        slot.ready_at = max(slot.ready_at, now)
        return True

    def _restart_broken(self, call: _Call, err: Exception) -> None:
        """A step of this call's engine raised: the engine stays in no known state and would fail
        every row sent to it, so the actor is restarted (a fresh engine); the failed batches go
        the way of a crash (quarantine, then alone once a process other than this one answers:
        _run_alone_once_awake). Once per process (EngineBroken names it): every batch that was
        inside the engine comes back with it, and a successor is never taken for it."""
        slot, pid = call.slot, getattr(cause(err), "pid", None)
        if self.serve_app is not None or pid is None or pid == slot.killed_pid:
            return  # a Serve replica is replaced by Serve (check_health); this process is already going
        log.warning("an engine failed a step: restarting it (%s)", first_line(cause(err)))
        ray.kill(slot.actor, no_restart=False)
        slot.restarts += 1  # ours: not one to report as Ray's (_reloading)
        slot.killed_pid = pid
        slot.ready_at = time.monotonic() + self._restart_grace_s

    def _check_hangs(self) -> None:
        """A call running longer than pool.batch_timeout_s is cancelled (the engine aborts its rows
        and goes on with the others) and treated as a failed part (quarantine, then isolation);
        the engine is probed (_check_stuck)."""
        now = time.monotonic()
        limit = self.spec.pool.batch_timeout_s
        if limit is None:
            return
        for ref, call in list(self._pending.items()):
            started = max(call.sent, call.slot.ready_at)
            if now - started <= limit or self._reloading(call.slot, now):
                continue
            del self._pending[ref]
            self._done(call)
            log.warning(
                "a batch of %d row(s) ran over pool.batch_timeout_s=%gs: cancelled", call.part.rows, limit
            )  # fmt: skip
            ray.cancel(ref)  # aborts its rows in the engine; a cancelled call is not retried
            if call.slot.probe is None:
                call.slot.probe = (call.slot.actor.ping.remote(), now)
            call.part.hung = True
            self._failed(call.part, EngineHang(f"ran over pool.batch_timeout_s={limit:g}s"))

    def _resolve(self, part: _Part, counts: dict, ref: Any) -> None:
        batch = part.batch
        batch.done[part.start] = (counts, ref)
        batch.open_parts -= 1
        if batch.open_parts:
            return
        parts = [batch.done[k] for k in sorted(batch.done)]
        if len(parts) == 1:
            counts, ref = parts[0]
        else:  # isolated after a failure: the parts' tables, joined in row order (a rare path)
            ref = ray.put(pa.concat_tables(ray.get([r for _, r in parts])))
            counts = {k: sum(c[k] for c, _ in parts) for k in ("rows", "prompt_tokens", "completion_tokens")}
        self._finished.append((batch.tag, Completions(ref, counts["rows"], counts["prompt_tokens"], counts["completion_tokens"])))

    def _failed(self, part: _Part, err: Exception) -> None:
        n = part.rows
        if not part.alone:
            log.warning("engine failed twice on a batch of %d row(s), quarantined: %s", n, first_line(err))
            self._suspects.append(part)
            return
        part.attempts += 1
        log.warning("engine failed on %d quarantined row(s) (attempt %d): %s", n, part.attempts, first_line(err))
        if n > 1:  # split: the half without the culprit succeeds, the other is split again
            requests = _table(part.requests)
            half = n // 2
            part.batch.open_parts += 1
            self._suspects.appendleft(_Part(part.batch, part.start + half, requests.slice(half), n - half))
            self._suspects.appendleft(_Part(part.batch, part.start, requests.slice(0, half), half))
        elif part.attempts >= self.spec.pool.max_attempts:
            rows = crash_rows(_table(part.requests), part.attempts, hung=part.hung)
            self._resolve(part, {"rows": rows.num_rows, "prompt_tokens": 0, "completion_tokens": 0}, ray.put(rows))
        else:
            self._suspects.appendleft(part)

    def _start_held(self) -> None:
        if self._held and not self._isolating:
            while self._held:
                self._start(self._held.popleft())

    def _wake_alone(self, part: _Part) -> None:
        """Ask slot 0's engine to answer once it is back (a restart reloads the model); the part
        runs when it has (_run_alone_once_awake), alone, with no retry."""
        self._waking = (self.slots[0].actor.ping.options(max_task_retries=-1).remote(), part, time.monotonic())

    def _run_alone_once_awake(self) -> None:
        ping, part, since = self._waking
        limit = self.spec.pool.actor_start_timeout_s
        if ray.wait([ping], timeout=0)[0]:
            try:
                pid = ray.get(ping)
            except RayActorError:  # the process being killed answered with its death: ask the next one
                pid = self.slots[0].killed_pid
            if pid != self.slots[0].killed_pid:
                self._waking = None
            else:  # the process the pool restarted answered before it went: ask the next one
                self._waking = (self.slots[0].actor.ping.options(max_task_retries=-1).remote(), part, since)
        if self._waking is not None:
            if time.monotonic() - since <= limit:
                return
            raise EngineError(f"the engine did not come back within pool.actor_start_timeout_s={limit:g}s "
                              "to run a quarantined batch")  # fmt: skip
        part.alone = True
        slot = self.slots[0]
        slot.ready_at = time.monotonic()
        self._call(slot, part, retries=0)

    def drop_pending(self) -> None:
        """Forget in-flight batches (their results will be ignored; the work is read again)."""
        for ref, call in self._pending.items():
            self._done(call)
            try:
                ray.cancel(ref)
            except Exception:  # already finished or not cancellable: the result is ignored anyway
                pass
        self._pending.clear()
        self._suspects.clear()
        self._held.clear()
        self._waking = None
        self._forget_rooms(self.slots)

    def poll_usage(self) -> list[dict[str, float]] | None:
        """Non-blocking: the engines' usage once their answers to the last request are in (then a
        new request goes out on the next call); None meanwhile."""
        refs = self._usage_refs
        if refs is None:
            self._usage_refs = [s.actor.usage.remote() for s in self.slots]
            return None
        if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
            return None
        self._usage_refs = None
        try:
            return ray.get(refs)
        except Exception:  # an engine restarting: next time
            return None

    def usage(self, timeout_s: float = 10.0) -> list[dict[str, float]]:
        """Per-actor usage (compute.engine.EngineWorker.usage); empty if the actors cannot answer in time."""
        try:
            return ray.get([s.actor.usage.remote() for s in self.slots], timeout=timeout_s)
        except Exception as e:  # reporting only: never fail a run over it
            log.warning("could not read engine usage: %s", e)
            return []

    def shutdown(self) -> None:
        for slot in self.slots:
            self._kill(slot)
        if self._starting is not None:
            self._kill(self._starting[0])
            self._starting = None
        self.slots = []
        self._pending.clear()
        self._suspects.clear()
        self._held.clear()
        self._waking = None
        self._rooms.clear()


def _table(requests: Any) -> pa.Table:
    return requests if isinstance(requests, pa.Table) else ray.get(requests)


def crash_rows(requests: pa.Table, attempts: int, hung: bool = False) -> pa.Table:
    n = requests.num_rows
    if hung:
        message = f"the engine hung on this row {attempts} times (over pool.batch_timeout_s; isolated from its batch)"
    else:
        message = f"the engine failed on this row {attempts} times (process died or raised; isolated from its batch)"
    cols = {name: [None] * n for name in COMPLETION_SCHEMA.names}
    cols["source_partition"] = requests.column("source_partition").to_pylist()
    cols["source_offset"] = requests.column("source_offset").to_pylist()
    cols["error_stage"] = ["engine"] * n
    cols["error_class"] = ["engine_hang" if hung else "engine_crash"] * n
    cols["error"] = [message] * n
    return pa.table(cols, schema=COMPLETION_SCHEMA)


def _tp_text(pool) -> str:
    return f" (tensor_parallel_size={pool.tensor_parallel_size}, one node)" if pool.tensor_parallel_size > 1 else ""


def _describe(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources] or list(resources)[:5]
    parts = []
    for k in keys:
        v = resources[k]
        parts.append(f"{k}={v / 2**30:.1f}GiB" if k == "memory" else f"{k}={v:g}")
    if "GPU" not in resources:
        parts.append("GPU=0")
    return ", ".join(parts)
