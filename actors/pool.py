"""A pool of engine actors on Ray, fed with a bounded number of batches each.

Each actor holds one vLLM engine (loaded once) and runs one batch at a time; the pool keeps
`batches_in_flight` batches queued per actor so the engine starts the next batch as soon as
it finishes one. Submission is bounded: `has_capacity()` is False when every actor has its
queue full, which is how backpressure reaches the Kafka consumer.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.engine import EngineWorker, engine_env
from schemas.errors import EngineError
from schemas.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    actor: Any
    in_flight: int = 0


class EnginePool:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.slots: list[_Slot] = []
        self._pending: dict[ray.ObjectRef, tuple[_Slot, Any]] = {}
        self.max_model_len: int | None = None

    def start(self, fixed_cluster: bool = False) -> None:
        """Start the engine actors and wait until each has loaded its engine.

        fixed_cluster: the cluster cannot grow (a local one this process started), so a request
        no node can ever satisfy fails at once instead of after actor_start_timeout_s.
        """
        pool = self.spec.pool
        if fixed_cluster:
            self._check_fits()
        env = engine_env(self.spec.model)
        # Ray sets OMP_NUM_THREADS to an actor's num_cpus (often 1); a CPU engine is the only heavy
        # consumer on its node, so it gets the cores (measured: 1.7x faster with 2 threads than 1).
        if pool.engine_threads:
            env["OMP_NUM_THREADS"] = str(pool.engine_threads)
        elif pool.num_gpus == 0 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // pool.actors))
        actor_cls = ray.remote(EngineWorker).options(
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            runtime_env={"env_vars": env},
            # A crashed engine process is restarted and its queued batches retried: batches are
            # pure functions of their input, and exactly-once comes from the commit protocol.
            max_restarts=2,
            max_task_retries=2,
        )
        actors = [
            actor_cls.remote(self.spec.model, self.spec.sampling, self.spec.prompt.chat, self.spec.prompt.system)
            for _ in range(pool.actors)
        ]
        self.slots = [_Slot(a) for a in actors]
        t0 = time.monotonic()
        refs = [a.info.remote() for a in actors]
        try:
            infos = ray.get(refs, timeout=pool.actor_start_timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise EngineError(
                f"{pool.actors} engine actor(s) did not start within pool.actor_start_timeout_s="
                f"{pool.actor_start_timeout_s:.0f}s; asked for num_cpus={pool.num_cpus}, num_gpus={pool.num_gpus} "
                f"each; the cluster has {_describe(ray.cluster_resources())}"
            ) from None
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
            raise EngineError(f"engine actor failed to start: {cause}") from None
        self.max_model_len = infos[0]["max_model_len"]
        log.info(
            "%d engine actor(s) ready in %.1fs (engine load %.1fs, context %d tokens)",
            len(actors), time.monotonic() - t0, infos[0]["load_s"], self.max_model_len,
        )  # fmt: skip

    def _check_fits(self) -> None:
        pool = self.spec.pool
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = [n for n in nodes if n.get("CPU", 0) >= pool.num_cpus and n.get("GPU", 0) >= pool.num_gpus]
        if not fits:
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise EngineError(
                f"no node can ever hold an engine actor: pool.num_cpus={pool.num_cpus:g}, pool.num_gpus={pool.num_gpus:g} "
                f"per actor, but the largest node of this (non-autoscaling) cluster has {_describe(biggest)}"
            )
        total_cpu = sum(n.get("CPU", 0) for n in nodes)
        total_gpu = sum(n.get("GPU", 0) for n in nodes)
        if pool.actors * pool.num_cpus > total_cpu or pool.actors * pool.num_gpus > total_gpu:
            raise EngineError(
                f"pool.actors={pool.actors} engine actors need CPU={pool.actors * pool.num_cpus:g}, "
                f"GPU={pool.actors * pool.num_gpus:g} in all; the cluster has CPU={total_cpu:g}, GPU={total_gpu:g}"
            )

    @property
    def capacity(self) -> int:
        return len(self.slots) * self.spec.pool.batches_in_flight

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def has_capacity(self) -> bool:
        return self.in_flight < self.capacity

    def submit(self, requests: pa.Table, tag: Any) -> None:
        slot = min(self.slots, key=lambda s: s.in_flight)
        slot.in_flight += 1
        ref = slot.actor.generate.remote(requests)
        self._pending[ref] = (slot, tag)

    def collect(self, timeout_s: float) -> list[tuple[Any, pa.Table]]:
        """Completed batches as (tag, COMPLETION_SCHEMA table); waits up to timeout_s for one."""
        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout_s, fetch_local=True)
        if not ready:
            return []
        done = []
        for ref in ready:
            slot, tag = self._pending.pop(ref)
            slot.in_flight -= 1
            try:
                done.append((tag, ray.get(ref)))
            except (RayActorError, RayTaskError) as e:
                raise EngineError(f"engine actor failed beyond its retries: {e}") from None
        return done

    def drop_pending(self) -> None:
        """Forget in-flight batches (their results will be ignored; the work is read again)."""
        for ref, (slot, _) in self._pending.items():
            slot.in_flight -= 1
            try:
                ray.cancel(ref)
            except Exception:  # already finished or not cancellable: the result is ignored anyway
                pass
        self._pending.clear()

    def usage(self, timeout_s: float = 10.0) -> list[dict[str, float]]:
        """Per-actor busy/up time; empty if the actors cannot answer in time."""
        try:
            return ray.get([s.actor.usage.remote() for s in self.slots], timeout=timeout_s)
        except Exception as e:  # reporting only: never fail a run over it
            log.warning("could not read engine usage: %s", e)
            return []

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.actor)
            except Exception:  # already dead
                pass
        self.slots = []
        self._pending.clear()


def _describe(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources] or list(resources)[:5]
    parts = []
    for k in keys:
        v = resources[k]
        parts.append(f"{k}={v / 2**30:.1f}GiB" if k == "memory" else f"{k}={v:g}")
    if "GPU" not in resources:
        parts.append("GPU=0")
    return ", ".join(parts)
