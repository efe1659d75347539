"""The source -> engine pool -> Delta job loop (Kafka or Delta sources).

The driver thread only routes and keeps the books; every stage runs in a Ray actor
(actors/stages.py, actors/pool.py). A source batch's way:

    poll     source.poll_batch (driver)          -> SOURCE_SCHEMA table (only while there is room)
    render   StageWorker.render                  -> requests + dead letters   (CommitLedger.open numbers it)
    infer    EngineWorker.generate (EnginePool)  -> COMPLETION_SCHEMA table   (out of order across actors)
    validate StageWorker.assemble                -> RESULTS rows + DEAD_LETTER rows + retries (back to infer);
                                                    CommitLedger.complete once no row waits for a retry
    commit   CommitWriter.write                  <- the complete prefix, every commit_interval_s:
                                                    prepare, encrypt, Delta commits, runs-table row

The commit protocol and why it is exactly-once: docs/exactly-once.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.assemble import Assembled, BatchOutput
from actors.encryption import EncryptionStage
from actors.lineage import lineage_columns
from actors.pool import EnginePool
from actors.prompts import PromptRenderer
from actors.stages import CommitWriterClient, StagePool, WriterDied, job_schemas
from actors.validation import Validator
from connectors.delta import DeltaSink
from connectors.offsets import CommitLedger
from connectors.runs import RunsTable, stats_totals
from jobs.metrics import JobMetrics, partition_lag, source_versions_behind
from jobs.logs import log_context
from schemas.errors import PartitionFencedError
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

# Fault injection for the backpressure test: every commit takes this much longer (a slow sink).
_SLOW_COMMIT_S = float(os.environ.get("TIDEGATE_FAULT_SLOW_COMMIT_S", "0") or 0)


@dataclass
class _OpenBatch:
    """A source batch whose rows are still at the engine (first generation or a retry)."""

    src_ref: ray.ObjectRef  # the SOURCE_SCHEMA table, in the object store for the stage workers
    rows: int  # source rows it covers
    parts: list[BatchOutput]
    waiting: int = 1  # submissions not yet back
    carried: dict = field(default_factory=dict)  # encryption.input_fields per (partition, offset), plain


@dataclass
class JobStats:
    run_id: str
    consumed: int = 0
    ok: int = 0
    dead_lettered: int = 0
    dead_by_class: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flagged: int = 0
    retried: int = 0  # generations re-run after a failed rule
    rule_failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    prompt_tokens: int = 0  # every generation, retries included
    completion_tokens: int = 0
    commits: int = 0
    peak_uncommitted: int = 0  # most source rows read but not yet committed at any time (bounded)
    peak_engines: int = 0
    started: float = field(default_factory=time.monotonic)
    first_commit_s: float | None = None
    engines_ready_s: float | None = None
    engine_busy_fraction: float | None = None  # time engines spent generating / time they were up
    engine_idle_between_batches: float | None = None  # gaps between batches / first batch start..last end
    notes: list[str] = field(default_factory=list)
    finished: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rows_per_s(self) -> float:
        return (self.ok + self.dead_lettered) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def rows_per_s_after_start(self) -> float:
        """Throughput once the engines were loaded (start-up excluded)."""
        if self.engines_ready_s is None:
            return 0.0
        span = self.elapsed_s - self.engines_ready_s
        return (self.ok + self.dead_lettered) / span if span > 0 else 0.0


class PipelineJob:
    """Runs a spec's source through the engine pool into the Delta sink.

    make_source(resume_positions, on_revoke) builds the source (connectors.kafka.KafkaSource or
    connectors.delta_source.DeltaSource); it calls resume_positions on (re)assignment.
    `sink` replaces the job's DeltaSink (the dead-letter replay passes its ReplaySink); it is
    shipped to the commit writer actor, which owns it.
    """

    def __init__(
        self,
        spec: JobSpec,
        make_source,
        run_id: str | None = None,
        fixed_cluster: bool = False,
        progress=None,
        sink: DeltaSink | None = None,
    ):
        self.spec = spec
        self.make_source = make_source
        self.fixed_cluster = fixed_cluster
        self.progress = progress  # optional callable(rows_committed, rows_total) for progress bars
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.stats = JobStats(self.run_id)
        self._sink = sink
        # The driver builds every stage once itself, so a bad spec, keyring, output schema or
        # custom rule fails here, before any actor or GPU work; the stage actors build their own.
        encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        encryption.check_output_fields(RESULTS_SCHEMA)
        self.results_schema = job_schemas(encryption)[0]
        self.renderer = PromptRenderer(
            spec.prompt, spec.source.max_message_bytes, self.run_id, spec.encryption, encryption.has_key
        )
        self.validator = Validator(spec)  # imports output.schema and custom rules
        self.ledger = CommitLedger()
        self.pool = EnginePool(spec, json_schema=self.validator.json_schema if spec.output.structured else None)
        self.stages: StagePool | None = None
        self._engines_started = False
        self.writer: CommitWriterClient | None = None
        self._open: dict[int, _OpenBatch] = {}
        self._epoch = 0  # bumped when uncommitted work is dropped: late stage results are ignored
        self._rendering = 0  # source batches at a stage worker, not yet at the engines
        self._writing_batches = 0  # batches in the commit at the writer
        self._listener_error: BaseException | None = None
        self._uncommitted = 0  # source rows handed to the ledger and not committed yet
        self._embedders: list = []  # semantic_grounding's embedding actors
        # Monitoring (docs/operations.md): Prometheus metrics through Ray, lineage columns on every
        # result row, the runs table (a row per commit, written by the commit writer, and per run).
        self.metrics = JobMetrics(spec.name, self.run_id, spec.source.kind)
        self.lineage: dict[str, str | None] = {}
        self.runs = RunsTable.for_results(spec.sink.results, spec.sink.storage_options)
        self.started_at = datetime.now(timezone.utc)
        self._last_commit_at = self.started_at
        self._committed: dict[TopicPartition, int | None] = {}  # last position committed (or resumed)
        self._next_lag_check = 0.0
        self._next_scale_check = 0.0
        self.source = None
        # Offsets the dead-letter table already holds above the results position (repair window).
        self._skip: dict[TopicPartition, set[int]] = {}
        self._last_commit = time.monotonic()
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._buffer_since = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, until_drained: bool = False, stop: threading.Event | None = None) -> JobStats:
        stop = stop or threading.Event()
        status, error = "failed", None
        try:
            self._start()
            log.info("run %s: reading %s %s", self.run_id, self.spec.source.kind, self.source.topic)
            self._loop(until_drained, stop)
            self._shutdown()
            self._engine_usage()
            status = "stopped" if stop.is_set() else "finished"
        except BaseException as e:
            # Tidegate's own errors never hold values; keep the first line only, in case a
            # library's message carries more (it lands in a plain-text column).
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            raise
        finally:
            self.stats.finished = time.monotonic()
            if self.source is not None:
                self.source.close()
            self.pool.shutdown()
            self.metrics.live_actors(0)
            for embed in self._embedders:
                ray.kill(embed.actor)
            if self.stages is not None:
                self.stages.shutdown()
            if self.writer is not None:
                self.writer.shutdown()
            if self._engines_started:  # a run that failed before its engines has nothing to record
                self._record_run(status, error)
        return self.stats

    def _start(self) -> None:
        # The commit writer opens (or creates) the tables first: an incompatible table fails the
        # job before any GPU work. The stage workers load while the engines do.
        self.writer = CommitWriterClient(self.spec, self._sink, _SLOW_COMMIT_S)
        self.writer.open()
        self.stages = StagePool(self.spec, self.run_id)
        self.stages.start()
        self.source = self.make_source(self._on_assign, self._on_revoke)
        self.source.check_columns(self.renderer.required_fields())  # before any GPU work
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

    def _engine_usage(self) -> None:
        usage = self.pool.usage()
        if usage:
            self.stats.engine_busy_fraction = sum(u["busy_s"] for u in usage) / sum(u["up_s"] for u in usage)
            span = sum(u.get("span_s", 0.0) for u in usage)
            if span > 0:
                self.stats.engine_idle_between_batches = sum(u.get("gaps_s", 0.0) for u in usage) / span

    def _record_run(self, status: str, error: str | None) -> None:
        try:
            self.runs.append_run(
                run_id=self.run_id, job=self.spec.name, started_at=self.started_at, ended_at=datetime.now(timezone.utc),
                status=status, **stats_totals(self.stats),
                positions={tp: pos for tp, pos in self._committed.items() if pos is not None},
                lineage=self.lineage, error=error,
            )  # fmt: skip
        except Exception as e:  # informational table: never fail (or mask the failure of) a run over it
            log.warning("could not append to the runs table %s: %s", self.runs.uri, e)

    def _start_embedders(self) -> dict:
        """One embedding actor per model that semantic_grounding rules name: {model: embedder}."""
        from actors.semantic import start_embedding_actor

        started: dict[str | None, object] = {}
        for rule in self.validator.semantic_rules():
            model = rule.spec.model
            if model not in started:
                started[model] = start_embedding_actor(model, self.spec.pool.actor_start_timeout_s)
        self._embedders = list(started.values())
        return started

    def _loop(self, until_drained: bool, stop: threading.Event) -> None:
        spec = self.spec
        poll_ms = spec.source.kafka.poll_timeout_ms if spec.source.kafka else 200
        max_ready = max(spec.sink.commit_max_rows, spec.pool.batch_size) * 2
        while not stop.is_set():
            admitted = False
            # Bounded end to end: batches at the engines plus those at a stage worker (rendering or
            # being validated) fit the pool's capacity; complete batches, the one being written
            # included, stay under max_ready rows. A slow sink or engine thus slows the source.
            ready_rows = (self.ledger.committable_count() + self._writing_batches) * spec.pool.batch_size
            room = self.pool.has_capacity(queued_elsewhere=self.stages.in_flight) and ready_rows < max_ready
            if room:
                self._fill_buffer(poll_ms)
                if self._should_submit():
                    self._admit(self._take_buffer())
                    admitted = True
            # Wait for the next thing to route. With room, the source is polled again soon (records
            # accumulate into a batch); without, only a finished call or a due commit can change
            # anything, and the wait ends as soon as a call finishes: fewer wake-ups, same latency.
            self._pump(0 if admitted else 0.02 if room else self._idle_wait(0.2))
            self.metrics.queue_depth(self.pool.in_flight)
            self._update_lag()
            self._autoscale()
            drained = until_drained and not self._busy and not self._buffered and self.source.drained()
            try:
                self._land_commit()
                # Once drained there is nothing to batch commits with: commit right away.
                self._maybe_commit(force=drained)
            except (PartitionFencedError, WriterDied) as e:
                self._recover_from_fence(e)
                continue
            if drained and not self.ledger.open_count and not self.writer.busy:
                log.info("run %s: every partition is consumed to its end and committed", self.run_id)
                return

    def _idle_wait(self, longest: float) -> float:
        """How long the loop may wait for a call to finish: until the next commit is due at most."""
        if self.ledger.committable_count() and not self.writer.busy:
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
        if timeout_s:
            refs = self.pool.waitable() + self.stages.waitable() + self.writer.waitable()
            if refs:
                ray.wait(refs, num_returns=1, timeout=timeout_s)
        for tag, result in self.stages.collect(0):
            with log_context(batch_id=tag[2]):  # JSON logs carry the batch (ledger sequence number)
                if tag[0] == "render":
                    self._rendered(tag, result)
                else:
                    self._assembled(tag, result)
        if self.pool.in_flight:
            for tag, completions in self.pool.collect(0):
                with log_context(batch_id=tag[1]):
                    self._generated(tag, completions)

    # -- batching --------------------------------------------------------------------------------
    # A poll returns what the consumer has buffered, often less than a batch. The engine's cost per
    # call is dominated by its decode steps whatever the batch size, so small batches waste it:
    # records accumulate until a full batch, an idle engine, or `pool.batch_linger_ms`.

    def _fill_buffer(self, poll_ms: int) -> None:
        need = self.spec.pool.batch_size - self._buffered
        if need <= 0:
            return
        # Block in poll only when nothing is in flight, buffered or being committed.
        src = self.source.poll_batch(need, 0 if (self._busy or self._buffered or self.writer.busy) else poll_ms)
        if self._listener_error is not None:  # raised in a rebalance callback, which Kafka swallows
            err, self._listener_error = self._listener_error, None
            raise err
        if src is not None:
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append(src)
            self._buffered += src.num_rows

    def _should_submit(self) -> bool:
        if not self._buffered:
            return False
        if self._buffered >= self.spec.pool.batch_size or self.pool.in_flight + self._rendering < len(self.pool.slots):
            return True  # a full batch, or an engine with nothing to do
        return (time.monotonic() - self._buffer_since) * 1000 >= self.spec.pool.batch_linger_ms

    def _take_buffer(self) -> pa.Table:
        src = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        return src

    def _drop_buffer(self) -> None:
        """Forget records read but not handed out: after a seek they are read again."""
        self._buffer, self._buffered = [], 0

    def _shutdown(self) -> None:
        """Stop taking batches; finish what is in flight (bounded), commit it, never partially."""
        deadline = time.monotonic() + self.spec.run.shutdown_timeout_s
        try:
            while self._busy and time.monotonic() < deadline:
                self._pump(min(0.5, max(0.0, deadline - time.monotonic())))
                self._land_commit()
            if self._busy:
                log.warning("abandoning %d batch(es) still in flight; the next run reads them again", self.pool.in_flight)
                self.pool.drop_pending()
                self.stages.drop_pending()
            self._commit_all()
        except (PartitionFencedError, WriterDied) as e:
            log.warning("not committing at shutdown: %s", e)

    # -- stages ----------------------------------------------------------------------------------
    # A source batch goes: _admit -> stage worker (render) -> _rendered -> engine -> _generated ->
    # stage worker (assemble) -> _assembled -> (retries: engine again) -> ledger. Tags carry the
    # epoch; results of an epoch that was dropped (fence, revocation) are ignored.

    def _admit(self, src: pa.Table) -> None:
        spans = {tp: (min(offsets), max(offsets)) for tp, offsets in _group_offsets(src).items()}
        seq = self.ledger.open(spans)
        self.stats.consumed += src.num_rows
        self._uncommitted += src.num_rows
        self.stats.peak_uncommitted = max(self.stats.peak_uncommitted, self._uncommitted + self._buffered)
        self.metrics.rows_in(src.num_rows)
        skip = {tp: self._skip[tp] for tp in spans if self._skip.get(tp)}
        self._rendering += 1
        src_ref = ray.put(src)  # serialized once: render and every assemble of the batch read it
        self.stages.render(src_ref, skip, ("render", self._epoch, seq, src_ref, src.num_rows))

    def _rendered(self, tag, rendered) -> None:
        _, epoch, seq, src_ref, rows = tag
        if epoch != self._epoch:
            return
        self._rendering -= 1
        if rendered.requests.num_rows:
            self._open[seq] = _OpenBatch(
                src_ref, rows, [BatchOutput(self.results_schema.empty_table(), rendered.dead)], carried=rendered.carried or {}
            )
            self.pool.submit(rendered.requests, (self._epoch, seq, rendered.requests, time.monotonic()))
        else:
            self.ledger.complete(seq, BatchOutput(self.results_schema.empty_table(), rendered.dead, rows))

    def _generated(self, tag, completions: pa.Table) -> None:
        epoch, seq, requests, submitted = tag
        batch = self._open.get(seq)
        if epoch != self._epoch or batch is None:  # dropped by a fence or a revocation while at the engine
            return
        self.metrics.batch_latency(time.monotonic() - submitted)
        prompt_tokens = pc.sum(completions.column("prompt_tokens")).as_py() or 0
        completion_tokens = pc.sum(completions.column("completion_tokens")).as_py() or 0
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.metrics.tokens(prompt_tokens, completion_tokens)
        self.stages.assemble(batch.src_ref, requests, completions, batch.carried, ("assemble", self._epoch, seq))

    def _assembled(self, tag, assembled: Assembled) -> None:
        _, epoch, seq = tag
        batch = self._open.get(seq)
        if epoch != self._epoch or batch is None:
            return
        for rule, n in assembled.rule_failures.items():
            self.stats.rule_failures[rule] += n
            self.metrics.validation_failures(rule, n)
        batch.parts.append(assembled.output)
        batch.waiting -= 1
        retries = assembled.retries
        if retries is not None and retries.num_rows:
            self.stats.retried += retries.num_rows
            self.metrics.retries(retries.num_rows)
            batch.waiting += 1
            self.pool.submit(retries, (self._epoch, seq, retries, time.monotonic()))
        if not batch.waiting:
            del self._open[seq]
            self.ledger.complete(
                seq,
                BatchOutput(
                    pa.concat_tables([p.results for p in batch.parts]),
                    pa.concat_tables([p.dead for p in batch.parts]),
                    batch.rows,
                ),
            )

    # -- commits ---------------------------------------------------------------------------------
    # One commit in flight at the writer; the loop goes on feeding the engines meanwhile. Its
    # bookkeeping (source offsets mirror, stats, metrics) happens when it has landed.

    def _maybe_commit(self, force: bool) -> None:
        if self.writer.busy:
            return
        ready = self.ledger.committable_count()
        if not ready:
            return
        due = time.monotonic() - self._last_commit >= self.spec.sink.commit_interval_s
        full = ready * self.spec.pool.batch_size >= self.spec.sink.commit_max_rows
        if not (force or due or full):
            return
        group = self.ledger.pop_committable()
        positions = {**group.positions, **self.source.extra_positions(group.positions)}
        results = pa.concat_tables([p.results for p in group.payloads])
        dead = pa.concat_tables([p.dead for p in group.payloads]) if group.payloads else DEAD_LETTER_SCHEMA.empty_table()
        record = dict(
            run_id=self.run_id, job=self.spec.name, commit_seq=self.stats.commits + 1,
            started_at=self._last_commit_at, lineage=self.lineage,
        )  # fmt: skip
        self.writer.write(results, dead, positions, record, (group, positions, results, dead))
        self._writing_batches = len(group.payloads)

    def _land_commit(self, timeout_s: float = 0.0) -> None:
        """Book the commit in flight once it has landed (raises what the commit raised)."""
        landed = self.writer.finished(timeout_s)
        if landed is None:
            return
        (group, positions, results, dead), report = landed
        self._writing_batches = 0
        st = self.stats
        self._uncommitted -= sum(p.consumed for p in group.payloads)
        self.source.commit_offsets(group.positions)
        self._last_commit = time.monotonic()
        self._last_commit_at = report.ended_at
        self.writer.append_runs_row()
        self.metrics.commit_latency(report.commit_s)
        self.metrics.committed(results, dead)  # counted in plain text; stored encrypted
        self._committed.update(positions)
        st.commits += 1
        st.ok += report.results_rows
        st.dead_lettered += report.dead_rows
        st.flagged += pc.sum(pc.equal(results.column("status"), "flagged")).as_py() or 0
        for cls in dead.column("error_class").to_pylist():
            st.dead_by_class[cls] += 1
        if st.first_commit_s is None:
            st.first_commit_s = self._last_commit - st.started
        if self.progress is not None:
            self.progress(st.ok + st.dead_lettered, self.source.total_rows)
        for tp, last in group.positions.items():
            done = self._skip.get(tp)
            if done and last >= max(done):
                del self._skip[tp]
        log.debug(
            "commit %d: %d ok, %d dead, positions %s in %.0f ms",
            st.commits, report.results_rows, report.dead_rows, group.positions, report.commit_s * 1e3,
        )  # fmt: skip

    def _commit_all(self) -> None:
        """Commit everything the ledger can commit, and wait until it has landed."""
        while True:
            while self.writer.busy:
                self._land_commit(1.0)
            if not self.ledger.committable_count():
                return
            self._maybe_commit(force=True)

    def _autoscale(self, every_s: float = 1.0) -> None:
        if time.monotonic() < self._next_scale_check:
            return
        self._next_scale_check = time.monotonic() + every_s
        engines = len(self.pool.slots)
        backlog = self.source.backlog()
        self.pool.autoscale(None if backlog is None else backlog + self._buffered)
        if len(self.pool.slots) != engines:
            self.metrics.live_actors(len(self.pool.slots))
            self.stats.peak_engines = max(self.stats.peak_engines, len(self.pool.slots))

    def _update_lag(self, every_s: float = 5.0) -> None:
        """Lag gauges: Kafka end offset - next committed offset per partition; Delta versions behind."""
        if time.monotonic() < self._next_lag_check:
            return
        self._next_lag_check = time.monotonic() + every_s
        try:
            if self.spec.source.kind == "kafka":
                ends = self.source.end_offsets()
                committed = {tp: self._committed.get(tp) for tp in ends}
                self.metrics.partition_lags(partition_lag(ends, committed))
            else:
                latest = self.source.latest_version()
                marker = max((p for (t, part), p in self._committed.items() if part == -1 and p is not None), default=None)
                self.metrics.versions_behind(source_versions_behind(latest, marker))
        except Exception as e:  # monitoring only
            log.debug("lag update failed: %s", e)

    def _flush_all(self) -> None:
        """Finish every batch in flight and commit it (used before giving partitions away)."""
        while self._busy:
            self._pump(0.5)
            self._land_commit()
        self._commit_all()

    # -- assignment ------------------------------------------------------------------------------

    def _on_assign(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        try:
            positions, windows = self.writer.resume(list(tps))
        except BaseException as e:
            # Kafka's consumer logs and swallows what a rebalance callback raises (it would then
            # read from the group's offsets): keep it, raise it once poll returns.
            self._listener_error = e
            raise
        self._committed.update(positions)
        for tp in tps:
            if windows.get(tp):
                self._skip[tp] = windows[tp]
            else:
                self._skip.pop(tp, None)
        return positions

    def _on_revoke(self, tps: list[TopicPartition]) -> None:
        self._drop_buffer()
        try:
            try:
                self._flush_all()
            except (PartitionFencedError, WriterDied) as e:
                log.warning("on revocation: %s", e)
                self._drop_uncommitted()
            self.writer.forget(list(tps))
        except BaseException as e:
            self._listener_error = e  # see _on_assign
            raise
        for tp in tps:
            self._skip.pop(tp, None)

    def _drop_uncommitted(self) -> None:
        self._epoch += 1
        self.pool.drop_pending()
        self.stages.drop_pending()
        self._rendering = 0
        self._writing_batches = 0
        self.ledger.reset()
        self._open.clear()
        self._uncommitted = 0
        self._drop_buffer()

    def _recover_from_fence(self, err: Exception) -> None:
        log.warning("%s; dropping uncommitted work and re-reading from the table's positions", err)
        self._drop_uncommitted()
        assigned = sorted(self.source.assignment())
        self.writer.forget(assigned)
        self.source.reseek(assigned)


def _group_offsets(src: pa.Table) -> dict[TopicPartition, list[int]]:
    out: dict[TopicPartition, list[int]] = defaultdict(list)
    for t, p, o in zip(
        src.column("topic").to_pylist(), src.column("partition").to_pylist(), src.column("offset").to_pylist()
    ):
        out[(t, p)].append(o)
    return out
