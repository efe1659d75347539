"""The CPU stages as Ray actors, so the engines never wait on the job loop.

    StageWorker (spec.stages.actors of them)
      render(src, skip)                      SOURCE_SCHEMA -> RenderedBatch (requests + dead letters)
      assemble(config, src, requests,        -> Assembled (results, dead letters, retries);
               completions, carried)            config: lineage columns + embedders, one stored object
    CommitWriter (one)
      write(results, dead, positions, ...)   plain rows -> DeltaSink.prepare -> EncryptionStage
                                             -> DeltaSink.commit -> CommitReport
      append_runs_row()                      the runs-table row of the last commit (after it is booked)
      resume(tps) / forget(tps) / open()     the sink's positions (docs/exactly-once.md)

The job loop (jobs/pipeline.py) keeps only the bookkeeping: which source batch is where, the
commit ledger, the engine pool's queue. It sends tables to these actors and routes what comes
back, so the per-row work (JSON decode, templates, rules, ciphers, Parquet) runs in other
processes while the loop keeps every engine's queue full.

All stage actors are pinned to the driver's node: the keyring file and the master key's
environment variable the driver was given are there, and latency is measured against the driver's
monotonic clock. They reserve `stages.num_cpus` logical CPUs each (default 0, like the driver
itself), so they never compete with the engines for placement and work on a head node that takes
no work (num_cpus=0).

Failures: render and assemble are pure functions of their input, so a worker that dies has its
calls re-run on its restarted self (max_task_retries). A commit is never retried blindly: one
whose writer died may or may not have landed, so the job treats it like a fence (drop the
uncommitted work, re-read the positions from the table, read on from there). A writer Ray
restarted between commits knows no positions: it refuses to write (WriterRestarted) until the job
has read them again through it, the same recovery.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.assemble import Assembled, BatchAssembler
from actors.encryption import EncryptionStage
from actors.prompts import PromptRenderer, RenderedBatch
from actors.validation import Validator
from connectors.delta import DeltaSink
from connectors.runs import RunsTable, commit_totals, span_positions
from schemas.errors import StageError
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


class WriterDied(StageError):
    """The commit writer died during a commit: whether it landed is read back from the table."""


class WriterRestarted(WriterDied):
    """The commit writer was restarted between commits: its positions must be read again."""


def job_schemas(encryption: EncryptionStage) -> tuple[pa.Schema, pa.Schema, pa.Schema]:
    """(plain results, stored results, stored dead letters) for a job's encryption section."""
    return (
        encryption.plain_results_schema(RESULTS_SCHEMA),
        encryption.stored_results_schema(RESULTS_SCHEMA),
        encryption.stored_dead_schema(DEAD_LETTER_SCHEMA),
    )


class StageWorker:
    """Decode + render and validate + assemble for one job. A plain class: Ray runs it as an actor."""

    def __init__(self, spec: JobSpec, run_id: str):
        self.spec = spec
        self.run_id = run_id
        encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        self.results_schema = job_schemas(encryption)[0]
        self.renderer = PromptRenderer(
            spec.prompt, spec.source.max_message_bytes, run_id, spec.encryption, encryption.has_key
        )
        self.validator = Validator(spec)
        self.assembler: BatchAssembler | None = None

    def ping(self) -> int:
        return os.getpid()

    def _configure(self, config: dict) -> BatchAssembler:
        """Lineage columns (known once the engines hashed their model) and the embedding actors of
        semantic_grounding rules, by model. They come with every assemble call (one object in the
        store), so a worker Ray restarted after a crash has them too."""
        if self.assembler is None:
            for rule in self.validator.semantic_rules():
                rule.embed = config["embedders"][rule.spec.model]
            self.assembler = BatchAssembler(self.spec, self.validator, self.results_schema, self.run_id, config["lineage"])
        return self.assembler

    def render(self, src: pa.Table, skip: dict[TopicPartition, set[int]]) -> RenderedBatch:
        def done(topic: str, partition: int, offset: int) -> bool:
            offsets = skip.get((topic, partition))
            return bool(offsets) and offset in offsets

        return self.renderer.render(src, skip=done if skip else None)

    def assemble(
        self, config: dict, src: pa.Table, requests: pa.Table, completions: pa.Table, carried: dict
    ) -> Assembled:
        return self._configure(config).assemble(src, requests, completions, carried)


@dataclass
class CommitReport:
    results_rows: int
    dead_rows: int
    commit_s: float  # prepare, encryption and the Delta commits
    ended_at: datetime  # when the commit landed (the next commit's start, in the runs table)


class CommitWriter:
    """The last stages of a commit, in one actor: the sink's prepare (a replay maps rows to their
    original positions), encryption at those positions, the Delta commits, the runs-table row."""

    def __init__(self, spec: JobSpec, sink: DeltaSink | None = None, slow_commit_s: float = 0.0):
        self.encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        _, stored_results, stored_dead = job_schemas(self.encryption)
        self.sink = sink or DeltaSink(
            spec.name, spec.sink.results, spec.sink.dead_letter, spec.sink.storage_options, source_kind=spec.source.kind
        )
        self.sink.use_schemas(stored_results, stored_dead)
        self.runs = RunsTable.for_results(spec.sink.results, spec.sink.storage_options)
        self.slow_commit_s = slow_commit_s  # fault injection: a slow sink (the backpressure test)
        self._runs_row: dict | None = None
        # The sink's fencing state lives in this process: after Ray restarted it, no commit until
        # the job has read the positions again (resume), or one could pass a stale check.
        self._resumed = False

    def ping(self) -> int:
        return os.getpid()

    def open(self) -> int:
        self.sink.open()
        return os.getpid()

    def resume(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int | None], dict]:
        """Committed positions of these partitions, and the dead-letter offsets above them."""
        positions = self.sink.load_positions(tps)
        self._resumed = True
        return positions, {tp: self.sink.repair_window(tp) for tp in tps}

    def forget(self, tps: list[TopicPartition]) -> None:
        self.sink.forget(tps)

    def write(self, results: pa.Table, dead: pa.Table, positions: dict, record: dict | None) -> CommitReport:
        if not self._resumed:
            raise WriterRestarted("the commit writer was restarted since the positions were read")
        t0 = time.monotonic()
        plain_results, plain_dead = results, dead
        results, dead = self.sink.prepare(results, dead)
        results = self.encryption.protect_results(results, self.sink.results.schema)
        dead = self.encryption.protect_dead(dead, self.sink.dead_letter.schema)
        if self.slow_commit_s:
            time.sleep(self.slow_commit_s)
        self.sink.commit(results, dead, positions)
        ended_at = datetime.now(timezone.utc)
        if record is not None:
            # Counted now, appended by append_runs_row(): the job books the commit without
            # waiting for the informational runs table.
            self._runs_row = dict(
                **record, ended_at=ended_at, positions=span_positions(plain_results, plain_dead, positions),
                **commit_totals(plain_results, plain_dead),
            )  # fmt: skip
        return CommitReport(results.num_rows, dead.num_rows, time.monotonic() - t0, ended_at)

    def append_runs_row(self) -> None:
        """The runs-table row of the last commit (informational: a failure is logged, not raised)."""
        row, self._runs_row = self._runs_row, None
        if row is None:
            return
        try:
            self.runs.append_commit(**row)
        except Exception as e:
            log.warning("could not append to the runs table %s: %s", self.runs.uri, e)


def _on_driver_node(spec: JobSpec, **options) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return dict(
        num_cpus=spec.stages.num_cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        **options,
    )


def _cause(err: Exception) -> BaseException:
    return err.cause if isinstance(err, RayTaskError) and err.cause is not None else err


class StagePool:
    """spec.stages.actors StageWorkers; calls go to the least busy one, results come back tagged."""

    def __init__(self, spec: JobSpec, run_id: str):
        self.spec = spec
        self.run_id = run_id
        self.workers: list[Any] = []
        self._load: list[int] = []
        self._pending: dict[ray.ObjectRef, tuple[int, Any]] = {}
        self._config: ray.ObjectRef | None = None
        self.pids: list[int] = []

    def start(self) -> None:
        """Start the workers (they load while the engines do; configure() waits for them)."""
        # Pure calls: a worker that dies is restarted and the calls it held run again.
        options = _on_driver_node(self.spec, max_restarts=-1, max_task_retries=3)
        self.workers = [
            ray.remote(StageWorker).options(**options).remote(self.spec, self.run_id) for _ in range(self.spec.stages.actors)
        ]
        self._load = [0] * len(self.workers)

    def configure(self, lineage: dict, embedders: dict) -> None:
        """Wait for the workers; lineage and embedders go with every assemble call from now on."""
        self._config = ray.put({"lineage": lineage, "embedders": embedders})
        self.pids = _wait_started([w.ping.remote() for w in self.workers], self.spec, f"{len(self.workers)} stage worker(s)")

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def waitable(self) -> list:
        return list(self._pending)

    def render(self, src: pa.Table, skip: dict, tag: Any) -> None:
        self._call("render", tag, src, skip)

    def assemble(self, src: pa.Table, requests: pa.Table, completions: pa.Table, carried: dict, tag: Any) -> None:
        self._call("assemble", tag, self._config, src, requests, completions, carried)

    def _call(self, method: str, tag: Any, *args) -> None:
        i = min(range(len(self.workers)), key=self._load.__getitem__)
        ref = getattr(self.workers[i], method).remote(*args)
        self._load[i] += 1
        self._pending[ref] = (i, tag)

    def collect(self, timeout_s: float) -> list[tuple[Any, Any]]:
        """(tag, result) of the calls that finished, waiting up to timeout_s for them."""
        if not self._pending:
            return []
        done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout_s)
        out = []
        for ref in done:
            i, tag = self._pending.pop(ref)
            self._load[i] -= 1
            try:
                out.append((tag, ray.get(ref)))
            except RayTaskError as e:  # first: it may wrap a RayActorError of another actor (embedding)
                raise _cause(e) from None  # a bug in a stage (or a custom rule): the job fails, loudly
            except RayActorError as e:
                raise StageError(f"a stage worker died repeatedly: {_actor_error(e)}") from None
        return out

    def drop_pending(self) -> None:
        """Forget calls in flight (after a fence): what they return is never looked at."""
        self._pending.clear()
        self._load = [0] * len(self.workers)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:
                pass
        self.workers, self._pending = [], {}


class CommitWriterClient:
    """The job loop's handle on the CommitWriter actor: blocking calls for positions, and at most
    one commit in flight (commits are ordered; the next is prepared while this one is written)."""

    def __init__(self, spec: JobSpec, sink: DeltaSink | None, slow_commit_s: float = 0.0):
        self.spec = spec
        # Restarted if it dies (its state is re-read from the table), but a call is never re-run:
        # a commit is not a pure function of its input.
        options = _on_driver_node(spec, max_restarts=-1, max_task_retries=0)
        self.actor = ray.remote(CommitWriter).options(**options).remote(spec, sink, slow_commit_s)
        self.pid: int | None = None
        self._writing: tuple[ray.ObjectRef, Any] | None = None

    def open(self) -> None:
        self.pid = _wait_started([self._idempotent("open")], self.spec, "the commit writer")[0]

    def resume(self, tps: list[TopicPartition]):
        return self._get(self._idempotent("resume", list(tps)))

    def forget(self, tps: list[TopicPartition]) -> None:
        self._get(self._idempotent("forget", list(tps)))

    def _idempotent(self, method: str, *args) -> ray.ObjectRef:
        # Safe to run again: sent to a writer that is restarting, they wait for it instead of failing.
        return getattr(self.actor, method).options(max_task_retries=-1).remote(*args)

    def _get(self, ref):
        try:
            return ray.get(ref, timeout=self.spec.stages.start_timeout_s)
        except RayTaskError as e:
            raise _cause(e) from None
        except GetTimeoutError:
            raise StageError(
                f"the commit writer did not answer within stages.start_timeout_s={self.spec.stages.start_timeout_s:g}s"
            ) from None

    @property
    def busy(self) -> bool:
        return self._writing is not None

    def write(self, results: pa.Table, dead: pa.Table, positions: dict, record: dict | None, tag: Any) -> None:
        assert self._writing is None, "one commit at a time"
        self._writing = (self.actor.write.remote(results, dead, positions, record), tag)

    def append_runs_row(self) -> None:
        """Queue the last commit's runs-table row at the writer (before any later commit)."""
        self._idempotent("append_runs_row")

    def waitable(self) -> list:
        return [self._writing[0]] if self._writing is not None else []

    def finished(self, timeout_s: float = 0.0) -> tuple[Any, CommitReport] | None:
        """(tag, report) once the commit in flight has landed; None while it runs. Raises what
        the commit raised (PartitionFencedError, ...), or WriterDied."""
        if self._writing is None:
            return None
        ref, tag = self._writing
        done, _ = ray.wait([ref], timeout=timeout_s)
        if not done:
            return None
        self._writing = None
        try:
            return tag, ray.get(ref)
        except RayActorError as e:
            raise WriterDied(f"the commit writer died during a commit: {_actor_error(e)}") from None
        except RayTaskError as e:
            raise _cause(e) from None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Let the calls queued at the writer finish (the last runs-table row), then stop it."""
        try:
            ray.get(self.actor.ping.remote(), timeout=timeout_s)
        except Exception as e:
            log.warning("the commit writer did not finish its queued calls: %s", _actor_error(e))
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass


def _actor_error(err: BaseException) -> str:
    """The useful line of a Ray actor error: the cause's `SomeError: message` line when Ray quotes
    a traceback (an actor whose constructor raised), else the first line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception):", line)]
    return causes[-1] if causes else (lines[0] if lines else type(err).__name__)


def _wait_started(refs: list, spec: JobSpec, what: str) -> list:
    try:
        return ray.get(refs, timeout=spec.stages.start_timeout_s)
    except GetTimeoutError:
        raise StageError(
            f"{what} did not start within stages.start_timeout_s={spec.stages.start_timeout_s:g}s on the driver's "
            f"node; asked for stages.num_cpus={spec.stages.num_cpus:g} each"
        ) from None
    except RayTaskError as e:
        raise _cause(e) from None
    except RayActorError as e:
        raise StageError(f"{what} failed to start: {_actor_error(e)}") from None
