"""The job loop: one driver thread that routes batches between the actors and keeps the books.

The data flow, which module owns each stage and why the commits are exactly-once are stated
once, in docs/architecture.md and docs/exactly-once.md. This module only routes: it does no
per-row work and holds no Ray code of its own (the actors' clients in actors/ hide Ray).

Its parts: the source (connectors/source.py), a Batcher (jobs/batcher.py), the stage workers and
the engine pool (actors/stages.py, actors/pool.py), the in-flight tracker with the commit ledger
(jobs/inflight.py), the commit writer (actors/writer.py), the run's stats and metrics
(jobs/stats.py, jobs/metrics.py). It is also the source's `SourcePositions`: the source asks it
where partitions stand (resume) and lets it finish or drop their work before giving them away
(release).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from actors.embedding import start_embedding_actor
from actors.pool import Completions, EnginePool
from actors.remote import kill, put, wait_ready
from actors.stages import StagePool, job_renderer
from actors.transport import use_table_transport
from actors.writer import CommitWriterClient, WriterDied, job_schemas
from compute.engine import EngineWorker
from compute.lineage import lineage_columns
from compute.validation import Validator
from connectors.sink import Sink, open_sink
from connectors.source import Source, SourceContext, open_source
from crypto.stage import EncryptionStage
from jobs.batcher import Batcher
from jobs.inflight import AssembleTag, BatchParts, EngineTag, InFlight, OpenBatch, RenderTag
from jobs.logs import log_context
from jobs.metrics import JobMetrics
from jobs.stats import JobStats
from schemas.errors import PartitionFencedError, TidegateError
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


@dataclass
class JobComponents:
    """What a job is built from besides its spec. The defaults are the spec's own; the replay job
    passes its source and sink, and tests (tests/faults.py) an engine that fails on cue."""

    engine: type = EngineWorker
    sink: Sink | None = None  # default: the spec's sink.kind
    source: Callable[[SourceContext], Source] | None = None  # default: the spec's source kind


# At shutdown, how long a commit still at the writer after shutdown_timeout_s is waited for (as long
# as the writer's own shutdown waits for its queued calls: CommitWriterClient.shutdown).
LAST_COMMIT_WAIT_S = 30.0


@dataclass(frozen=True)
class CommitTag:
    """What the driver keeps of a commit in flight, to book it once it lands."""

    batches: int
    rows: int  # source rows it covers
    positions: dict[TopicPartition, int]  # the batches' own positions
    stored: dict[TopicPartition, int]  # ... plus the source's extra positions (all that was committed)


def run_error(e: BaseException) -> str:
    """The runs table's `error` for a run that failed with `e`. The column is plain text:
    Tidegate's own errors (which never hold values) by their first line; any other's message may
    quote data (a library's, a custom rule's or output schema's code): its type only, the message
    stays in the job's log."""
    if isinstance(e, TidegateError):
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return f"{type(e).__name__} (its message is in the job's log)"


class PipelineJob:
    def __init__(
        self,
        spec: JobSpec,
        run_id: str | None = None,
        fixed_cluster: bool = False,
        progress: Callable[[int, int | None], None] | None = None,
        follow: bool = False,
        components: JobComponents | None = None,
        hashing: Callable[[int, int], None] | None = None,
    ):
        """progress(rows_committed, rows_total): after each commit; hashing(bytes_done, bytes_total):
        while an engine hashes the model's files for lineage (at start)."""
        self.spec = spec
        self.components = components or JobComponents()
        self.fixed_cluster = fixed_cluster
        self.follow = follow
        self.progress = progress  # optional callable(rows_committed, rows_total) for progress bars
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.stats = JobStats(self.run_id)
        # The driver builds every stage once itself, so a bad spec, keyring, output schema or
        # custom rule fails here, before any actor or GPU work; the stage actors build their own.
        encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        encryption.check_output_fields(job_schemas(encryption)[0])
        self.results_schema = job_schemas(encryption)[0]
        self.renderer = job_renderer(spec, self.run_id, encryption)
        self.validator = Validator(spec)  # imports output.schema and custom rules
        json_schema = self.validator.json_schema if spec.output.structured else None
        self.pool = EnginePool(spec, json_schema=json_schema, engine_cls=self.components.engine)
        self.pool.on_hashing = hashing
        self.batcher = Batcher(spec.pool.batch_size, spec.pool.batch_linger_ms)
        self.flight = InFlight()
        self.source: Source | None = None
        self.stages: StagePool | None = None
        self.writer: CommitWriterClient | None = None
        self._engines_started = False
        self._embedders: list = []  # semantic_grounding's embedding actors
        # Monitoring (docs/operations.md): Prometheus metrics through Ray, lineage columns on every
        # result row, the runs table (a row per commit and one per run, written by the writer).
        self.metrics = JobMetrics(spec.name, self.run_id, spec.source.kind)
        self.lineage: dict[str, str | None] = {}
        self.started_at = datetime.now(timezone.utc)
        self._last_commit_at = self.started_at
        self._last_commit = time.monotonic()
        self._committed: dict[TopicPartition, int | None] = {}  # last position committed (or resumed)
        # Offsets the dead-letter table already holds above the results position (repair window).
        self._skip: dict[TopicPartition, set[int]] = {}
        self._next_lag_check = 0.0
        self._next_scale_check = 0.0
        self._ready: set | None = None  # calls the last wait found finished

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, until_drained: bool = False, stop: threading.Event | None = None) -> JobStats:
        stop = stop or threading.Event()
        status, error = "failed", None
        try:
            self._start()
            log.info("run %s: reading %s %s", self.run_id, self.spec.source.kind, self.source.topic)
            self._loop(until_drained or (self.source.bounded and not self.follow), stop)
            self._finish(self.spec.run.shutdown_timeout_s, keep_membership=True)
            self._land_last_commit()
            self._engine_usage()
            self.stats.notes.extend(self.source.notes())
            status = "stopped" if stop.is_set() else "finished"
        except KeyboardInterrupt:  # a second signal (jobs/run.py): a stop that did not wait for the drain
            status, error = "stopped", "KeyboardInterrupt: stopped at once by a second signal; batches in flight not committed"
            raise
        except BaseException as e:
            error = run_error(e)
            raise
        finally:
            self.stats.finished = time.monotonic()
            if self.source is not None:
                self.source.close()
            self.pool.shutdown()
            self.metrics.live_actors(0)
            for embed in self._embedders:
                kill(embed.actor)
            if self.stages is not None:
                self.stages.shutdown()
            if self.writer is not None:
                if self._engines_started:  # a run that failed before its engines has nothing to record
                    self._record_run(status, error)
                self.writer.shutdown()
        return self.stats

    def _start(self) -> None:
        # The commit writer opens (or creates) the tables first: an incompatible table fails the
        # job before any GPU work. The stage workers load while the engines do.
        # The sink is built here, from the registry, and shipped to the writer actor (which imports
        # its module): a sink plugin needs registering in the driver only.
        use_table_transport()  # the driver's tables (source batches) sent like the workers' (actors/transport.py)
        sink = self.components.sink if self.components.sink is not None else open_sink(self.spec)
        self.writer = CommitWriterClient(self.spec, sink)
        self.writer.open()
        self.stages = StagePool(self.spec, self.run_id)
        self.stages.start()
        ctx = SourceContext(self.spec.name, self, batch_rows=self.spec.pool.batch_size, follow=self.follow)
        make = self.components.source
        self.source = make(ctx) if make is not None else open_source(self.spec, ctx)
        self.source.check(self.renderer.required_fields())  # before any GPU work
        # Connect the source before the engines load: an unreachable broker fails in seconds.
        self.source.start()
        self.pool.start(fixed_cluster=self.fixed_cluster)
        self._engines_started = True
        # The engines hash the model they loaded: the driver may not see the model directory.
        self.lineage = lineage_columns(self.spec, model_rev=self.pool.model_revision or "unknown")
        self.metrics.live_actors(len(self.pool.slots))
        self.stats.peak_engines = len(self.pool.slots)
        self.stages.configure(self.lineage, self._start_embedders())
        self.stats.engines_ready_s = time.monotonic() - self.stats.started

    def _start_embedders(self) -> dict:
        """One embedding actor per model that semantic_grounding rules name: {model: embedder}."""
        started: dict[str | None, object] = {}
        for rule in self.validator.semantic_rules():
            model = rule.spec.model
            if model not in started:
                started[model] = start_embedding_actor(model, self.spec.pool.actor_start_timeout_s)
        self._embedders = list(started.values())
        return started

    def _engine_usage(self) -> None:
        """Engine time accounting, measured inside the engines (compute.engine.EngineWorker.usage)."""
        usage = self.pool.usage()
        self.stats.__dict__.update(engine_usage_fractions(usage))
        if usage:
            self.metrics.engine_usage(self.stats.engine_idle, self.stats.engine_occupancy, self.stats.prefix_cache_hit_rate)

    def _record_run(self, status: str, error: str | None) -> None:
        self.writer.append_run_row(
            dict(
                run_id=self.run_id, job=self.spec.name, started_at=self.started_at,
                ended_at=datetime.now(timezone.utc), status=status, lineage=self.lineage, error=error,
                positions={tp: pos for tp, pos in self._committed.items() if pos is not None},
                **self.stats.runs_fields(),
            )
        )  # fmt: skip

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self, until_drained: bool, stop: threading.Event) -> None:
        spec = self.spec
        poll_ms = getattr(spec.source.settings, "poll_timeout_ms", 200)
        max_ready = max(spec.sink.commit_max_rows, spec.pool.batch_size) * 2
        while not stop.is_set():
            admitted = False
            # Bounded end to end: batches at the engines plus those at a stage worker (rendering or
            # being validated) fit the pool's capacity; complete batches, the one being written
            # included, stay under max_ready rows. A slow sink or engine thus slows the source.
            # Complete batches behind an unfinished one count too (an engine reloading holds the
            # head of the ledger while the others go on): they wait in memory all the same.
            ready_rows = (self.flight.ledger.done_count + self.flight.writing_batches) * spec.pool.batch_size
            room = self.pool.has_capacity(queued_elsewhere=self.stages.in_flight) and ready_rows < max_ready
            if room:
                self._read(poll_ms)
                idle_engine = self.pool.in_flight + self.flight.rendering < len(self.pool.slots)
                if self.batcher.ready(idle_engine):
                    self._admit(self.batcher.take())
                    admitted = True
            self.source.keepalive()  # without room, or with the batcher full, nothing else polls
            # Wait for the next thing to route. With room, the source is polled again soon (records
            # accumulate into a batch); without, only a finished call or a due commit can change
            # anything, and the wait ends as soon as a call finishes: fewer wake-ups, same latency.
            self._pump(0 if admitted else 0.02 if room else self._idle_wait(0.2))
            self.metrics.queue_depth(self.pool.in_flight)
            self._update_lag()
            self._autoscale()
            drained = until_drained and not self._busy and not self.batcher.rows and self.source.drained()
            try:
                self._land_commit()
                # Once drained there is nothing to batch commits with: commit right away.
                self._maybe_commit(force=drained)
            except (PartitionFencedError, WriterDied) as e:
                self._recover_from_fence(e)
                continue
            if drained and not self.flight.ledger.open_count and not self.writer.busy:
                log.info("run %s: every partition is consumed to its end and committed", self.run_id)
                return

    def _read(self, poll_ms: int) -> None:
        if not self.batcher.room:
            return
        # Block in poll only when nothing is in flight, buffered or being committed.
        idle = not (self._busy or self.batcher.rows or self.writer.busy)
        self.batcher.add(self.source.poll(self.batcher.room, poll_ms if idle else 0))

    def _idle_wait(self, longest: float) -> float:
        """How long the loop may wait for a call to finish: until the next commit is due at most."""
        if self.flight.ledger.committable_count() and not self.writer.busy:
            due = self._last_commit + self.spec.sink.commit_interval_s - time.monotonic()
            return min(longest, max(0.0, due))
        return longest

    @property
    def _busy(self) -> bool:
        """Work at the engines or at a stage worker."""
        return bool(self.pool.in_flight or self.stages.in_flight)

    def _pump(self, timeout_s: float) -> None:
        """Route what the stage workers and the engines finished, waiting up to timeout_s for the
        first of them (or of the commit in flight) to finish."""
        ready = wait_ready(self.pool.waitable() + self.stages.waitable() + self.writer.waitable(), timeout_s)
        self._ready = ready  # for _land_commit in this iteration
        for tag, counts, refs in self.stages.collect(0, ready):
            with log_context(batch_id=tag.seq):  # JSON logs carry the batch (ledger sequence number)
                if isinstance(tag, RenderTag):
                    self._rendered(tag, counts, refs)
                else:
                    self._assembled(tag, counts, refs)
        if self.pool.in_flight:
            for tag, completions in self.pool.collect(0, ready):
                with log_context(batch_id=tag.seq):
                    self._generated(tag, completions)

    def _finish(self, within_s: float | None, keep_membership: bool = False) -> None:
        """Finish the work in flight (for at most within_s) and commit it, never partially; work
        not finished by then is dropped (it is read again). keep_membership: the source's
        keepalive meanwhile (at shutdown; not inside a rebalance's callback, which runs within a
        poll and is itself what the group waits for)."""
        deadline = None if within_s is None else time.monotonic() + within_s
        try:
            while self._busy and (deadline is None or time.monotonic() < deadline):
                self._pump(0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic())))
                self._land_commit()
                # The completed prefix now, not after the drain: a straggler that outlives the
                # deadline would otherwise take every finished batch behind it down with it.
                self._maybe_commit(force=True)
                if keep_membership:
                    self.source.keepalive()
            if self._busy:
                log.warning("abandoning %d batch(es) still in flight; they are read again", self.pool.in_flight)
                self.pool.drop_pending()
                self.stages.drop_pending()
            self._commit_all(deadline)
        except (PartitionFencedError, WriterDied) as e:
            log.warning("not committing the work in flight: %s", e)

    def _land_last_commit(self, wait_s: float = LAST_COMMIT_WAIT_S) -> None:
        """A commit the shutdown's deadline left at the writer lands anyway (the writer finishes its
        calls before it stops): booked here, if within wait_s, so that the run's record counts it
        (before stop 46 it was in the tables and missing from the run's totals and positions)."""
        if not self.writer.busy:
            return
        try:
            self._land_commit(wait_s)
        except (PartitionFencedError, WriterDied) as e:
            log.warning("the last commit did not land: %s", e)
            return
        if self.writer.busy:
            log.warning("the last commit had not landed %.0f s after the shutdown deadline: the run's record "
                        "leaves it out (the tables have it if it lands)", wait_s)  # fmt: skip

    # -- stages ----------------------------------------------------------------------------------
    # A source batch goes: _admit -> stage worker (render) -> _rendered -> engine -> _generated ->
    # stage worker (assemble) -> _assembled -> (retries: engine again) -> ledger -> commit writer.

    def _admit(self, src: pa.Table) -> None:
        spans = _spans(src)
        src_ref = put(src)  # serialized once: render and every assemble of the batch read it
        tag = self.flight.admit(spans, src.num_rows, src_ref)
        self.stats.consumed += src.num_rows
        self.stats.peak_uncommitted = max(self.stats.peak_uncommitted, self.flight.uncommitted_rows + self.batcher.rows)
        self.metrics.rows_in(src.num_rows)
        skip = {tp: self._skip[tp] for tp in spans if self._skip.get(tp)}
        self.stages.render(src_ref, skip, tag)

    def _rendered(self, tag: RenderTag, counts: dict, refs: list) -> None:
        if self.flight.stale(tag):
            return
        requests, output, carried = refs
        if counts["requests"]:
            self.flight.rendered(tag, OpenBatch(tag.src, tag.rows, [output], carried=carried), None)
            self._submit(tag.seq, requests, counts["requests"])
        else:
            self.flight.rendered(tag, None, BatchParts([output], tag.rows))

    def _submit(self, seq: int, requests, rows: int) -> None:
        self.pool.submit(requests, rows, EngineTag(self.flight.epoch, seq, requests, time.monotonic()))

    def _generated(self, tag: EngineTag, done: Completions) -> None:
        batch = self.flight.batch(tag)
        if batch is None:  # dropped by a fence or a revocation while at the engine
            return
        self.metrics.batch_latency(time.monotonic() - tag.submitted)
        self.stats.prompt_tokens += done.prompt_tokens
        self.stats.completion_tokens += done.completion_tokens
        self.metrics.tokens(done.prompt_tokens, done.completion_tokens)
        self.stages.assemble(batch.src, tag.requests, done.ref, batch.carried, AssembleTag(tag.epoch, tag.seq))

    def _assembled(self, tag: AssembleTag, counts: dict, refs: list) -> None:
        batch = self.flight.batch(tag)
        if batch is None:
            return
        output, retries = refs
        for rule, n in counts["rule_failures"].items():
            self.stats.rule_failures[rule] += n
            self.metrics.validation_failures(rule, n)
        batch.parts.append(output)
        batch.waiting -= 1
        if counts["retries"]:
            self.stats.retried += counts["retries"]
            self.metrics.retries(counts["retries"])
            batch.waiting += 1
            self._submit(tag.seq, retries, counts["retries"])
        if not batch.waiting:
            self.flight.close(tag.seq)

    # -- commits ---------------------------------------------------------------------------------
    # One commit in flight at the writer; the loop goes on feeding the engines meanwhile. Its
    # bookkeeping (source offsets mirror, stats, metrics) happens when it has landed.

    def _maybe_commit(self, force: bool) -> None:
        if self.writer.busy:
            return
        ready = self.flight.ledger.committable_count()
        if not ready:
            return
        due = time.monotonic() - self._last_commit >= self.spec.sink.commit_interval_s
        full = ready * self.spec.pool.batch_size >= self.spec.sink.commit_max_rows
        if not (force or due or full):
            return
        # At most commit_max_rows a commit: a long prefix (released at once after a slow head
        # batch) goes as several commits, not one the writer must hold in memory whole.
        group = self.flight.ledger.pop_committable(max(1, -(-self.spec.sink.commit_max_rows // self.spec.pool.batch_size)))
        stored = {**group.positions, **self.source.extra_positions(group.positions)}
        outputs = [ref for batch in group.payloads for ref in batch.outputs]
        record = dict(
            run_id=self.run_id, job=self.spec.name, commit_seq=self.stats.commits + 1,
            started_at=self._last_commit_at, lineage=self.lineage,
        )  # fmt: skip
        rows = sum(batch.consumed for batch in group.payloads)
        self.writer.write(outputs, stored, record, CommitTag(len(group.payloads), rows, group.positions, stored))
        self.flight.writing(len(group.payloads), rows)

    def _land_commit(self, timeout_s: float = 0.0) -> None:
        """Book the commit in flight once it has landed (raises what the commit raised)."""
        ready, self._ready = self._ready, None  # what this iteration's wait found (used once)
        try:
            landed = self.writer.finished(timeout_s, ready)
        except BaseException:
            self.flight.writing(0, 0)  # it did not land (or is read back from the table)
            raise
        if landed is None:
            return
        tag, report = landed
        self.flight.committed(tag.batches, tag.rows)
        self.source.committed(tag.positions)
        self._last_commit = time.monotonic()
        self._last_commit_at = report.ended_at
        self.writer.append_runs_row()
        self.metrics.commit_latency(report.commit_s)
        self.metrics.committed(report.totals)  # counted in plain text; stored encrypted
        if report.published:
            self.metrics.published(report.published)
            self.stats.published += report.published
        self._committed.update(tag.stored)
        self.stats.book(report.totals)
        if self.progress is not None:
            self.progress(self.stats.ok + self.stats.dead_lettered, self.source.total_rows)
        for tp, last in tag.positions.items():
            done = self._skip.get(tp)
            if done and last >= max(done):
                del self._skip[tp]
        log.debug(
            "commit %d: %d ok, %d dead, positions %s in %.0f ms",
            self.stats.commits, report.totals.rows_ok, report.totals.rows_dead, tag.positions, report.commit_s * 1e3,
        )  # fmt: skip
        if report.publish_error is not None:  # booked above: the commit is in the tables
            raise report.publish_error

    def _commit_all(self, deadline: float | None = None) -> None:
        """Commit everything the ledger can commit, and wait until it has landed (until the
        deadline at most: a commit still at the writer then lands later, or is fenced)."""
        while True:
            while self.writer.busy:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                self._land_commit(1.0)
            if not self.flight.ledger.committable_count():
                return
            if deadline is not None and time.monotonic() >= deadline:
                return  # (a commit is at most commit_max_rows: a long prefix is several, each in time)
            self._maybe_commit(force=True)

    # -- monitoring and scaling ------------------------------------------------------------------

    def _autoscale(self, every_s: float = 1.0) -> None:
        if time.monotonic() < self._next_scale_check:
            return
        self._next_scale_check = time.monotonic() + every_s
        engines = len(self.pool.slots)
        backlog = self.source.backlog()
        self.pool.autoscale(None if backlog is None else backlog + self.batcher.rows)
        # Set every check, not only on a change: a gauge set once before Ray's metrics agent was
        # up could be missing from the export until the pool changed.
        self.metrics.live_actors(len(self.pool.slots))
        if len(self.pool.slots) != engines:
            self.stats.peak_engines = max(self.stats.peak_engines, len(self.pool.slots))

    def _update_lag(self, every_s: float = 5.0) -> None:
        """Lag and engine usage gauges (monitoring only: never fails the job)."""
        if time.monotonic() < self._next_lag_check:
            return
        self._next_lag_check = time.monotonic() + every_s
        try:
            lag = self.source.lag(self._committed)
            self.metrics.lag(lag)
            if lag.partitions is not None:  # the run's live backlog (its progress line)
                self.stats.backlog = sum(lag.partitions.values())
            usage = self.pool.poll_usage()  # asked last time, answered by now
            if usage:
                f = engine_usage_fractions(usage)
                self.metrics.engine_usage(f["engine_idle"], f["engine_occupancy"], f["prefix_cache_hit_rate"])
        except Exception as e:
            log.debug("lag update failed: %s", e)

    # -- positions: the source's SourcePositions -------------------------------------------------

    def resume(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, int | None]:
        """Where these partitions stand in the sink; arms the fence and loads repair windows."""
        positions, windows = self.writer.resume(list(tps))
        self._committed.update(positions)
        for tp in tps:
            if windows.get(tp):
                self._skip[tp] = windows[tp]
            else:
                self._skip.pop(tp, None)
        return positions

    def anchor(self, positions: Mapping[TopicPartition, int]) -> None:
        """Record where partitions with no position start, before they are read (a commit of
        positions and no rows: connectors/source.py SourcePositions)."""
        self.writer.anchor(dict(positions))
        self._committed.update(positions)

    def furthest(self, tps: list[TopicPartition]) -> Mapping[TopicPartition, int | None]:
        """The furthest position either table recorded (connectors/source.py SourcePositions)."""
        both = self.writer.read_positions(list(tps))
        return {tp: max((p for p in both[tp] if p is not None), default=None) for tp in tps}

    def release(self, tps: list[TopicPartition], lost: bool = False, within_s: float | None = None) -> None:
        """The source gives these partitions away. Unless they are lost (another reader may own
        them already), finish the work in flight (for at most within_s) and commit it; drop the
        rest. Runs while the job's thread waits inside the source's poll."""
        self.batcher.drop()
        if not lost:
            self._finish(within_s)
        self._drop_uncommitted()
        self.writer.forget(list(tps), wait=False)  # after a commit still in flight, if any
        for tp in tps:
            self._skip.pop(tp, None)
        # Work of partitions this source keeps was dropped too: read them again.
        kept = sorted(self.source.assignment() - set(tps))
        if kept:
            self.source.reseek(kept)

    def _drop_uncommitted(self) -> None:
        self.pool.drop_pending()
        self.stages.drop_pending()
        self.flight.drop()
        self.batcher.drop()

    def _recover_from_fence(self, err: Exception) -> None:
        log.warning("%s; dropping uncommitted work and re-reading from the table's positions", err)
        self._drop_uncommitted()
        assigned = sorted(self.source.assignment())
        self.writer.forget(assigned)
        self.source.reseek(assigned)


def _spans(src: pa.Table) -> dict[TopicPartition, tuple[int, int]]:
    """(first, last) offset per partition of a source batch."""
    grouped = src.group_by(["topic", "partition"]).aggregate([("offset", "min"), ("offset", "max")])
    return {
        (t, p): (lo, hi)
        for t, p, lo, hi in zip(
            grouped.column("topic").to_pylist(), grouped.column("partition").to_pylist(),
            grouped.column("offset_min").to_pylist(), grouped.column("offset_max").to_pylist(),
        )
    }  # fmt: skip




def engine_usage_fractions(usage: list[dict[str, float]]) -> dict[str, float | None]:
    """Pool-wide fractions from the engines' usage counters (None when unknown)."""

    def ratio(a: str, b: str) -> float | None:
        den = sum(u.get(b, 0.0) for u in usage)
        return sum(u.get(a, 0.0) for u in usage) / den if den > 0 else None

    return {
        "engine_busy_fraction": ratio("busy_s", "up_s"),
        "engine_idle": ratio("idle_s", "span_s"),
        "engine_occupancy": ratio("occupancy_s", "busy_s"),
        "prefix_cache_hit_rate": ratio("cached_tokens", "prompt_tokens"),
        "engine_peak_batches": max((int(u["peak_batches"]) for u in usage if "peak_batches" in u), default=None),
    }


__all__ = ["CommitTag", "JobComponents", "JobStats", "PipelineJob", "engine_usage_fractions"]
