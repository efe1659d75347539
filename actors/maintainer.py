"""An online replica's table maintenance rounds, in a process of their own at a low CPU priority.

    TableMaintainer (Ray actor, on the replica's node)
      maintain(spec, results_schema, dead_schema) -> the round's report (connectors/audit.py maintain_tables)
      priorities()                 -> {thread id: nice value} of its process (what it runs at)
    LowPriorityRounds(nice)        a runner for AuditLog.maintain: start() starts the actor (else the
                                   first round does), a round whose actor died starts a new one

Why a process: a round in a thread of the replica (compaction of ~600 one-commit files, a
checkpoint, vacuum) shares the replica's GIL and delta-rs's runtime threads with the appends that
answer durable requests. Measured by hand on 2 cores (docs/performance.md, 2026-12-06): appends
beside a round in a thread had p50/p95 27/70 ms against 18/42 alone, and the round took 2.7 s; in a
child process the appends stayed at 19/45 (15/44 with the child niced) and the round took 1.1-1.2 s.
The niceness makes the answers' work win the cores whenever both want them; a round only keeps
the tables' file count bounded and can wait. Pinned to the replica's node: a table on a local
disk is only there.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from schemas.spec import JobSpec

# The niceness every thread of the process gets at least (Linux: 0-19, 19 the lowest priority; a
# thread at 10 gets about a tenth of what one at 0 gets of a core both want). Ray starts a worker's
# main thread at 15 and its other threads at 0, so this is a floor, not an increment.
NICE = 10
# A round still running after this long is given up (its process killed; the next round starts a
# new one): one stuck round would otherwise hold every later round back (each skipped while it runs).
ROUND_TIMEOUT_S = 3600.0


def _lower_priority(to: int) -> None:
    """Every thread of this process (Linux schedules threads; nice is per thread) to niceness `to`
    at least; threads started later (delta-rs's runtime) inherit their creator's."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process's own value
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < to:
                os.setpriority(os.PRIO_PROCESS, tid, to)
        except OSError:  # a thread that ended meanwhile
            pass


@ray.remote(num_cpus=0, max_restarts=0)
class TableMaintainer:
    def __init__(self, nice: int = NICE):
        _lower_priority(nice)

    def maintain(self, spec: JobSpec, results_schema: pa.Schema, dead_schema: pa.Schema) -> dict[str, Any]:
        from connectors.audit import maintain_tables

        return maintain_tables(spec, results_schema, dead_schema)

    def priorities(self) -> dict[int, int]:
        out = {}
        for t in os.listdir("/proc/self/task"):
            try:
                out[int(t)] = os.getpriority(os.PRIO_PROCESS, int(t))
            except OSError:
                pass
        return out


class LowPriorityRounds:
    """Runs AuditLog.maintain's rounds in a TableMaintainer on this node (started by start() or the
    first round, again after one died). Called from a worker thread (it blocks for the round)."""

    def __init__(self, nice: int = NICE):
        self.nice = nice
        self.actor = None

    def start(self):
        node = ray.get_runtime_context().get_node_id()
        self.actor = TableMaintainer.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(self.nice)
        return self.actor

    def __call__(self, spec: JobSpec, results_schema: pa.Schema, dead_schema: pa.Schema) -> dict[str, Any]:
        actor = self.actor or self.start()
        try:
            return ray.get(actor.maintain.remote(spec, results_schema, dead_schema), timeout=ROUND_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            self.actor = None
            raise
        except ray.exceptions.RayActorError:
            self.actor = None  # the next round starts a new one; this one failed (logged by the caller)
            raise

    def stop(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None
