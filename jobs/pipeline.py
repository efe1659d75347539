"""The source -> engine pool -> Delta job loop (Kafka or Delta sources).

One driver thread runs the loop; Ray runs the engines. Per iteration:

    poll   source.poll_batch          -> SOURCE_SCHEMA table  (only while the pool has capacity)
    render   PromptRenderer.render      -> requests + dead letters    (CommitLedger.open numbers it)
    infer    EnginePool.submit/collect  -> COMPLETION_SCHEMA table    (out of order across actors)
    validate Validator.validate         -> keep / reject / retry per row; retries go back to infer
    join     _assemble                  -> RESULTS rows + DEAD_LETTER rows (CommitLedger.complete once
                                           no row of the source batch waits for a retry)
    commit   DeltaSink.commit           <- the complete prefix, every commit_interval_s

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

from actors.lineage import LINEAGE_COLUMNS, lineage_columns
from actors.pool import EnginePool
from actors.encryption import EncryptionStage, input_column
from actors.prompts import PromptRenderer, dead_letter_table
from actors.validation import Validator
from connectors.delta import DeltaSink
from connectors.offsets import CommitLedger
from connectors.runs import RunsTable, commit_totals, span_positions
from jobs.logs import log_context
from jobs.metrics import JobMetrics, partition_lag, source_versions_behind
from schemas.errors import PartitionFencedError
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

# Fault injection for the backpressure test: every commit takes this much longer (a slow sink).
_SLOW_COMMIT_S = float(os.environ.get("TIDEGATE_FAULT_SLOW_COMMIT_S", "0") or 0)


@dataclass
class BatchOutput:
    results: pa.Table
    dead: pa.Table
    consumed: int = 0  # source rows the batch covers (for the in-flight bound)


@dataclass
class _OpenBatch:
    """A source batch whose rows are still at the engine (first generation or a retry)."""

    src: pa.Table
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
        # Encryption (spec `encryption:`): rows are assembled in plain text (with the carried input
        # fields) and encrypted right before the commit; the tables store the encrypted schema.
        self.encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        self.encryption.check_output_fields(RESULTS_SCHEMA)
        self.results_schema = self.encryption.plain_results_schema(RESULTS_SCHEMA)
        stored_results = self.encryption.stored_results_schema(RESULTS_SCHEMA)
        stored_dead = self.encryption.stored_dead_schema(DEAD_LETTER_SCHEMA)
        self.sink = sink or DeltaSink(
            spec.name, spec.sink.results, spec.sink.dead_letter, spec.sink.storage_options, source_kind=spec.source.kind
        )
        self.sink.use_schemas(stored_results, stored_dead)
        self.renderer = PromptRenderer(
            spec.prompt, spec.source.max_message_bytes, self.run_id, spec.encryption, self.encryption.has_key
        )
        self.ledger = CommitLedger()
        self.validator = Validator(spec)  # imports output.schema and custom rules: fails before any work
        self.pool = EnginePool(spec, json_schema=self.validator.json_schema if spec.output.structured else None)
        self._open: dict[int, _OpenBatch] = {}
        self._uncommitted = 0  # source rows handed to the ledger and not committed yet
        self._embedders: list = []  # embed functions of semantic_grounding's embedding actors
        # Monitoring (docs/operations.md): Prometheus metrics through Ray, lineage columns on every
        # result row, the runs table (informational: written after each results commit).
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
        self.sink.open()  # fails on an incompatible table before any GPU work
        self.source = self.make_source(self._on_assign, self._on_revoke)
        self.source.check_columns(self.renderer.required_fields())  # before any GPU work
        # Connect the source before the engines load: an unreachable broker fails in seconds.
        self.source.start()
        try:
            self.pool.start(fixed_cluster=self.fixed_cluster)
        except BaseException:
            self.source.close()
            raise
        # The engines hash the model they loaded: the driver may not see the model directory.
        self.lineage = lineage_columns(self.spec, model_rev=self.pool.model_revision or "unknown")
        self.metrics.live_actors(len(self.pool.slots))
        self.stats.peak_engines = len(self.pool.slots)
        self._start_embedders()
        self.stats.engines_ready_s = time.monotonic() - self.stats.started
        status, error = "failed", None
        try:
            log.info("run %s: reading %s %s", self.run_id, self.spec.source.kind, self.source.topic)
            self._loop(until_drained, stop)
            self._shutdown()
            usage = self.pool.usage()
            if usage:
                self.stats.engine_busy_fraction = sum(u["busy_s"] for u in usage) / sum(u["up_s"] for u in usage)
                span = sum(u.get("span_s", 0.0) for u in usage)
                if span > 0:
                    self.stats.engine_idle_between_batches = sum(u.get("gaps_s", 0.0) for u in usage) / span
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
            self._record_run(status, error)
        return self.stats

    def _record_run(self, status: str, error: str | None) -> None:
        st = self.stats
        try:
            self.runs.append_run(
                run_id=self.run_id, job=self.spec.name, started_at=self.started_at, ended_at=datetime.now(timezone.utc),
                status=status, commits=st.commits, rows_ok=st.ok, rows_flagged=st.flagged, rows_dead=st.dead_lettered,
                dead_by_class=dict(st.dead_by_class), prompt_tokens=st.prompt_tokens,
                completion_tokens=st.completion_tokens, retries=st.retried,
                positions={tp: pos for tp, pos in self._committed.items() if pos is not None},
                lineage=self.lineage, error=error,
            )  # fmt: skip
        except Exception as e:  # informational table: never fail (or mask the failure of) a run over it
            log.warning("could not append to the runs table %s: %s", self.runs.uri, e)

    def _start_embedders(self) -> None:
        from actors.semantic import start_embedding_actor

        started: dict[str | None, object] = {}
        for rule in self.validator.semantic_rules():
            model = rule.spec.model
            if model not in started:
                started[model] = start_embedding_actor(model, self.spec.pool.actor_start_timeout_s)
            rule.embed = started[model]
        self._embedders = list(started.values())

    def _loop(self, until_drained: bool, stop: threading.Event) -> None:
        spec = self.spec
        poll_ms = spec.source.kafka.poll_timeout_ms if spec.source.kafka else 200
        max_ready = max(spec.sink.commit_max_rows, spec.pool.batch_size) * 2
        while not stop.is_set():
            admitted = False
            ready_rows = self.ledger.committable_count() * spec.pool.batch_size
            if self.pool.has_capacity() and ready_rows < max_ready:
                self._fill_buffer(poll_ms)
                if self._should_submit():
                    self._admit(self._take_buffer())
                    admitted = True
            for tag, completions in self.pool.collect(0 if admitted else 0.02):
                self._complete(tag, completions)
            self.metrics.queue_depth(self.pool.in_flight)
            self._update_lag()
            self._autoscale()
            drained = until_drained and not self.pool.in_flight and not self._buffered and self.source.drained()
            try:
                # Once drained there is nothing to batch commits with: commit right away.
                self._maybe_commit(force=drained)
            except PartitionFencedError as e:
                self._recover_from_fence(e)
                continue
            if drained and not self.ledger.open_count:
                log.info("run %s: every partition is consumed to its end and committed", self.run_id)
                return

    # -- batching --------------------------------------------------------------------------------
    # A poll returns what the consumer has buffered, often less than a batch. The engine's cost per
    # call is dominated by its decode steps whatever the batch size, so small batches waste it:
    # records accumulate until a full batch, an idle engine, or `pool.batch_linger_ms`.

    def _fill_buffer(self, poll_ms: int) -> None:
        need = self.spec.pool.batch_size - self._buffered
        if need <= 0:
            return
        # Block in poll only when nothing is in flight or buffered; otherwise keep collecting.
        src = self.source.poll_batch(need, 0 if (self.pool.in_flight or self._buffered) else poll_ms)
        if src is not None:
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append(src)
            self._buffered += src.num_rows

    def _should_submit(self) -> bool:
        if not self._buffered:
            return False
        if self._buffered >= self.spec.pool.batch_size or self.pool.in_flight < len(self.pool.slots):
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
        while self.pool.in_flight and time.monotonic() < deadline:
            for tag, completions in self.pool.collect(min(0.5, max(0.0, deadline - time.monotonic()))):
                self._complete(tag, completions)
        if self.pool.in_flight:
            log.warning("abandoning %d batch(es) still in flight; the next run reads them again", self.pool.in_flight)
            self.pool.drop_pending()
        try:
            self._maybe_commit(force=True)
        except PartitionFencedError as e:
            log.warning("not committing at shutdown: %s", e)

    # -- stages ----------------------------------------------------------------------------------

    def _admit(self, src: pa.Table) -> None:
        spans = {}
        for (topic, partition), offsets in _group_offsets(src).items():
            spans[(topic, partition)] = (min(offsets), max(offsets))
        seq = self.ledger.open(spans)
        with log_context(batch_id=seq):
            self._render_and_submit(seq, src)

    def _render_and_submit(self, seq: int, src: pa.Table) -> None:
        self.stats.consumed += src.num_rows
        self._uncommitted += src.num_rows
        self.stats.peak_uncommitted = max(self.stats.peak_uncommitted, self._uncommitted + self._buffered)
        self.metrics.rows_in(src.num_rows)
        rendered = self.renderer.render(src, skip=self._is_done)
        if rendered.requests.num_rows:
            self._open[seq] = _OpenBatch(
                src, [BatchOutput(self.results_schema.empty_table(), rendered.dead)], carried=rendered.carried or {}
            )
            self.pool.submit(rendered.requests, (seq, rendered.requests, time.monotonic()))
        else:
            self.ledger.complete(seq, BatchOutput(self.results_schema.empty_table(), rendered.dead, src.num_rows))

    def _is_done(self, topic: str, partition: int, offset: int) -> bool:
        done = self._skip.get((topic, partition))
        return bool(done) and offset in done

    def _complete(self, tag, completions: pa.Table) -> None:
        with log_context(batch_id=tag[0]):  # JSON logs carry the batch (ledger sequence number)
            self._complete_batch(tag, completions)

    def _complete_batch(self, tag, completions: pa.Table) -> None:
        seq, requests, submitted = tag
        batch = self._open.get(seq)
        if batch is None:  # dropped by a fence or a revocation while at the engine
            return
        self.metrics.batch_latency(time.monotonic() - submitted)
        prompt_tokens = pc.sum(completions.column("prompt_tokens")).as_py() or 0
        completion_tokens = pc.sum(completions.column("completion_tokens")).as_py() or 0
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.metrics.tokens(prompt_tokens, completion_tokens)
        output, retries = self._assemble(batch.src, requests, completions, batch.carried)
        batch.parts.append(output)
        batch.waiting -= 1
        if retries is not None and retries.num_rows:
            self.stats.retried += retries.num_rows
            self.metrics.retries(retries.num_rows)
            batch.waiting += 1
            self.pool.submit(retries, (seq, retries, time.monotonic()))
        if not batch.waiting:
            del self._open[seq]
            self.ledger.complete(
                seq,
                BatchOutput(
                    pa.concat_tables([p.results for p in batch.parts]),
                    pa.concat_tables([p.dead for p in batch.parts]),
                    batch.src.num_rows,
                ),
            )

    def _assemble(
        self, src: pa.Table, req: pa.Table, completions: pa.Table, carried: dict | None = None
    ) -> tuple[BatchOutput, pa.Table | None]:
        """Join requests with their completions and validate them: failed rows become dead
        letters, rows a rule sends back are returned as retry requests."""
        failed = completions.column("error_stage").is_valid()
        ok_mask = pc.invert(failed)
        ok_req = req.filter(ok_mask)
        ok_comp = completions.filter(ok_mask)
        verdicts = self.validator.validate(ok_req, ok_comp)
        keep = [a == "keep" for a in verdicts.action]
        keep_req, keep_comp = ok_req.filter(pa.array(keep, pa.bool_())), ok_comp.filter(pa.array(keep, pa.bool_()))
        n = keep_req.num_rows
        now_ns = time.monotonic_ns()
        latency_ms = pc.divide(
            pc.subtract(pa.scalar(now_ns, pa.int64()), keep_req.column("received_ns")).cast(pa.float64()), 1e6
        )
        results = pa.table(
            {
                "id": keep_req.column("id"),
                "status": pa.array([s for s, k in zip(verdicts.status, keep) if k], pa.string()),
                "output_text": pa.array([t for t, k in zip(verdicts.output_text, keep) if k], pa.string()),
                "output_json": pa.array([j for j, k in zip(verdicts.output_json, keep) if k], pa.string()),
                "finish_reason": keep_comp.column("finish_reason"),
                "model": pa.array([self.spec.model.label] * n, pa.string()),
                "prompt_tokens": keep_comp.column("prompt_tokens"),
                "completion_tokens": keep_comp.column("completion_tokens"),
                "latency_ms": latency_ms,
                "attempts": keep_req.column("attempt"),
                "rule_results": verdicts.rule_results_array(keep),
                "source_topic": keep_req.column("source_topic"),
                "source_partition": keep_req.column("source_partition"),
                "source_offset": keep_req.column("source_offset"),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "processed_at": pa.array([datetime.now(timezone.utc)] * n, RESULTS_SCHEMA.field("processed_at").type),
                **{name: pa.array([self.lineage.get(name)] * n, pa.string()) for name in LINEAGE_COLUMNS},
                "tenant": keep_req.column("tenant"),
                **self._carried_columns(keep_req, carried or {}),
            },
            schema=self.results_schema,
        )
        for rr in verdicts.rule_results:
            for r in rr:
                if not r["passed"]:
                    self.stats.rule_failures[r["rule"]] += 1
                    self.metrics.validation_failures(r["rule"])
        rows = []
        if n < req.num_rows:
            raw_by_pos = {
                (p, o): v
                for p, o, v in zip(
                    src.column("partition").to_pylist(), src.column("offset").to_pylist(), src.column("value").to_pylist()
                )
            }
            for r, c in zip(req.filter(failed).to_pylist(), completions.filter(failed).to_pylist()):
                rows.append(
                    dict(
                        id=r["id"],
                        stage=c["error_stage"],
                        error_class=c["error_class"],
                        error=c["error"] if r["attempt"] == 1 else f"on attempt {r['attempt']}: {c['error']}",
                        source_topic=r["source_topic"],
                        source_partition=r["source_partition"],
                        source_offset=r["source_offset"],
                        raw=raw_by_pos[(r["source_partition"], r["source_offset"])],
                        attempts=r["attempt"],
                        tenant=r["tenant"],
                    )
                )
            for i, r in enumerate(ok_req.to_pylist()):
                if verdicts.action[i] != "reject":
                    continue
                rows.append(
                    dict(
                        id=r["id"],
                        stage="validate",
                        error_class="validation_failed",
                        error=verdicts.error[i],
                        source_topic=r["source_topic"],
                        source_partition=r["source_partition"],
                        source_offset=r["source_offset"],
                        raw=raw_by_pos[(r["source_partition"], r["source_offset"])],
                        output_text=verdicts.output_text[i],
                        attempts=r["attempt"],
                        rule_results=verdicts.rule_results[i],
                        tenant=r["tenant"],
                    )
                )
        dead = dead_letter_table(rows, self.run_id)
        return BatchOutput(results, dead), verdicts.retries

    def _carried_columns(self, req: pa.Table, carried: dict) -> dict[str, pa.Array]:
        fields = self.spec.encryption.input_fields
        if not fields:
            return {}
        keys = list(zip(req.column("source_partition").to_pylist(), req.column("source_offset").to_pylist()))
        return {
            input_column(f.name): pa.array([carried.get(k, {}).get(f.name) for k in keys], pa.string()) for f in fields
        }

    # -- commits ---------------------------------------------------------------------------------

    def _maybe_commit(self, force: bool) -> None:
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
        st = self.stats
        # Counted in plain text; stored encrypted, at the rows' final positions (the sink's prepare).
        flagged = pc.sum(pc.equal(results.column("status"), "flagged")).as_py() or 0
        dead_classes = dead.column("error_class").to_pylist()
        plain_results, plain_dead = results, dead
        results, dead = self.sink.prepare(results, dead)
        results = self.encryption.protect_results(results, self.sink.results.schema)
        dead = self.encryption.protect_dead(dead, self.sink.dead_letter.schema)
        t0 = time.monotonic()
        if _SLOW_COMMIT_S:
            time.sleep(_SLOW_COMMIT_S)
        self.sink.commit(results, dead, positions)
        self._uncommitted -= sum(p.consumed for p in group.payloads)
        self.source.commit_offsets(group.positions)
        self._last_commit = time.monotonic()
        self.metrics.commit_latency(self._last_commit - t0)
        self.metrics.committed(plain_results, plain_dead)
        self._committed.update(positions)
        st.commits += 1
        st.ok += results.num_rows
        st.dead_lettered += dead.num_rows
        st.flagged += flagged
        for cls in dead_classes:
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
            st.commits, results.num_rows, dead.num_rows, group.positions, (self._last_commit - t0) * 1e3,
        )  # fmt: skip
        self._record_commit(plain_results, plain_dead, positions)

    def _record_commit(self, results: pa.Table, dead: pa.Table, positions) -> None:
        now = datetime.now(timezone.utc)
        try:
            self.runs.append_commit(
                run_id=self.run_id, job=self.spec.name, commit_seq=self.stats.commits, started_at=self._last_commit_at,
                ended_at=now, positions=span_positions(results, dead, positions), lineage=self.lineage,
                **commit_totals(results, dead),
            )  # fmt: skip
        except Exception as e:  # informational table: never fail a run over it
            log.warning("could not append to the runs table %s: %s", self.runs.uri, e)
        self._last_commit_at = now

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
        while self.pool.in_flight:
            for tag, completions in self.pool.collect(0.5):
                self._complete(tag, completions)
        self._maybe_commit(force=True)

    # -- assignment ------------------------------------------------------------------------------

    def _on_assign(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        positions = self.sink.load_positions(tps)
        self._committed.update(positions)
        for tp in tps:
            window = self.sink.repair_window(tp)
            if window:
                self._skip[tp] = window
            else:
                self._skip.pop(tp, None)
        return positions

    def _on_revoke(self, tps: list[TopicPartition]) -> None:
        self._drop_buffer()
        try:
            self._flush_all()
        except PartitionFencedError as e:
            log.warning("on revocation: %s", e)
            self.pool.drop_pending()
            self.ledger.reset()
            self._open.clear()
            self._uncommitted = 0
        self.sink.forget(tps)
        for tp in tps:
            self._skip.pop(tp, None)

    def _recover_from_fence(self, err: PartitionFencedError) -> None:
        log.warning("%s; dropping uncommitted work and re-reading from the table's positions", err)
        self.pool.drop_pending()
        self.ledger.reset()
        self._open.clear()
        self._uncommitted = 0
        self._drop_buffer()
        assigned = sorted(self.source.assignment())
        self.sink.forget(assigned)
        self.source.reseek(assigned)


def _group_offsets(src: pa.Table) -> dict[TopicPartition, list[int]]:
    out: dict[TopicPartition, list[int]] = defaultdict(list)
    for t, p, o in zip(
        src.column("topic").to_pylist(), src.column("partition").to_pylist(), src.column("offset").to_pylist()
    ):
        out[(t, p)].append(o)
    return out
