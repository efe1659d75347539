"""The commit writer: the last stages of every commit, in one Ray actor, one commit at a time.

    CommitWriter (actor)
      open()                                 create or check the sink's tables (fails before any work)
      resume(tps) -> (positions, windows)    the sink's committed positions and repair windows (opens
                                             the tables first in a writer Ray restarted)
      read_positions(tps)                    (results, dead-letter) positions, read only
      forget(tps)                            partitions given away
      write(outputs, positions, rec)         the batches' BatchOutput refs -> plain rows -> Sink.prepare
                                             -> EncryptionStage -> Sink.commit -> CommitReport (with the
                                             commit's CommitTotals)
      append_runs_row()                      the runs-table row of the last commit (after it is booked)
    CommitWriterClient (in the driver)       blocking calls for positions; at most one write in flight

The sink object lives in this actor (connectors/sink.py: the job's `sink.kind`, or a replay's
ReplaySink), with its fencing state. A commit is never retried blindly: one whose writer died may
or may not have landed, so the job treats it like a fence (drop the uncommitted work, re-read the
positions from the table, read on from there). A writer Ray restarted between commits knows no
positions: it refuses to write (WriterRestarted) until the job has read them again through it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.remote import actor_error, cause, kill, on_driver_node, wait_started
from compute.pricing import cost_fields
from compute.totals import CommitTotals
from connectors.maintenance import maintenance_round
from connectors.results_topic import ResultsTopic
from connectors.sink import Sink, adopt_stored_twin, open_sink
from crypto.stage import EncryptionStage
from schemas.errors import PartitionFencedError, SinkError, SpecError, StageError
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


@dataclass
class CommitReport:
    totals: CommitTotals  # what the commit stored, counted from its plain rows
    commit_s: float  # prepare, encryption and the commits
    ended_at: datetime  # when the commit landed (the next commit's start, in the runs table)
    published: int = 0  # messages sent to sink.topic with it (and a restart's catch-up before it)
    # sink.topic's publish after the commit failed: the commit landed and is booked, then the job
    # stops with this error (a restart sends what the topic lacks: connectors/results_topic.py).
    publish_error: Exception | None = None


class CommitWriter:
    """A plain class: Ray runs it as an actor (tests build it directly over tables on disk)."""

    def __init__(self, spec: JobSpec, sink: Sink | None = None):
        """sink: the job's sink object (default: the spec's sink.kind, from the registry)."""
        self.encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        self.sink = sink if sink is not None else open_sink(spec)
        adopt_stored_twin(self.encryption, self.sink)
        self.plain_results, self.stored_results, self.stored_dead = job_schemas(self.encryption)
        self.sink.use_schemas(self.stored_results, self.stored_dead)
        self.runs = self.sink.history()
        self.pricing = spec.model.pricing  # a cost on each runs-table row (compute/pricing.py)
        self._runs_row: dict | None = None
        # The sink's fencing state lives in this process: after Ray restarted it, no commit until
        # the job has read the positions again (resume), or one could pass a stale check.
        self._resumed = False
        # Ray re-runs only the constructor: a restarted writer opens its tables again in resume()
        # (the sink's partitioning and writer properties, the encryption's binding to the tables'
        # ids, the results topic's producer), or its values would be bound to the wrong tables.
        self._opened = False
        # sink.topic: rows are published after their commit; the marks of what was published ride
        # on the next commit (connectors/results_topic.py). A replay's sink does not publish.
        self.topic = None
        self._marks: dict[TopicPartition, dict[str, int]] = {}
        # sink.topic: a repair window's dead letters (committed, results half lost in a crash) are
        # published with the commit that covers their offsets, as if they were its own rows.
        self._window_dead: dict[TopicPartition, pa.Table] = {}
        self._published = 0  # sent by resume(), not yet reported
        self.maintenance = spec.sink.maintenance
        self._commits = 0
        if spec.sink.topic is not None and getattr(self.sink, "publishes", True):
            missing = [m for m in ("stage_marks", "read_marks", "rows_above") if not callable(getattr(self.sink, m, None))]
            if missing:
                raise SpecError(f"sink.topic: sink.kind {spec.sink.kind!r} cannot record what was published "
                                f"(it lacks {', '.join(missing)})")  # fmt: skip
            self.topic = ResultsTopic(spec, self.stored_results, self.stored_dead)

    def ping(self) -> int:
        return os.getpid()

    def open(self) -> int:
        if not self._opened:
            self.sink.open()
            self.encryption.bind(*self.sink.bindings())  # how the tables bind values (crypto/binding.py)
            if self.topic is not None:
                self.topic.open()
            self._opened = True
        return os.getpid()

    def resume(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int | None], dict]:
        """Committed positions of these partitions, and the dead-letter offsets above them. With
        sink.topic, committed rows the topic lacks (a crash between commit and publish) are sent first."""
        self.open()  # a writer Ray restarted has not (the driver opened the first one only)
        positions = self.sink.load_positions(tps)
        self._resumed = True
        if self.topic is not None:
            sent, marks = self.topic.resume(self.sink, positions)
            self._keep_marks(marks)
            self._published += sent  # reported with the next commit
            if sent:
                log.warning("sink.topic %s: published %d committed row(s) a previous run had not", self.topic.topic, sent)
        windows = {tp: self.sink.repair_window(tp) for tp in tps}
        if self.topic is not None:
            for tp, window in windows.items():
                if window:  # above the position, so never published: they go out with the commit past them
                    low = positions[tp] if positions[tp] is not None else -1
                    self._window_dead[tuple(tp)] = self.sink.rows_above(tp, low, max(window))[1]
                else:
                    self._window_dead.pop(tuple(tp), None)
        return positions, windows

    def read_positions(self, tps: list[TopicPartition]) -> dict[TopicPartition, tuple[int | None, int | None]]:
        """(results position, dead-letter position) per partition, read only (no fence armed)."""
        return self.sink.read_positions(tps)

    def anchor(self, positions: dict[TopicPartition, int]) -> None:
        """A commit of these positions and no rows (where partitions with no position start),
        fenced like any commit. Nothing is encrypted, published or counted: there are no rows."""
        if not self._resumed:
            raise WriterRestarted("the commit writer was restarted since the positions were read")
        self.sink.commit(self.stored_results.empty_table(), self.stored_dead.empty_table(), positions)

    def _keep_marks(self, marks: dict[TopicPartition, dict[str, int]]) -> None:
        for tp, named in marks.items():
            self._marks.setdefault(tp, {}).update(named)

    def forget(self, tps: list[TopicPartition]) -> None:
        self.sink.forget(tps)
        for tp in tps:
            self._marks.pop(tuple(tp), None)
            self._window_dead.pop(tuple(tp), None)  # the partition's next owner loads its window itself

    def write(self, outputs: list, positions: dict, record: dict | None) -> CommitReport:
        """outputs: object refs to the committed batches' BatchOutput objects (the driver only
        routes them): their rows are joined here."""
        parts = ray.get(outputs)
        results = pa.concat_tables([p.results for p in parts]) if parts else self.plain_results.empty_table()
        dead = pa.concat_tables([p.dead for p in parts]) if parts else DEAD_LETTER_SCHEMA.empty_table()
        return self.write_tables(results, dead, positions, record)

    def write_tables(self, results: pa.Table, dead: pa.Table, positions: dict, record: dict | None) -> CommitReport:
        """The commit itself, from plain results and dead-letter tables."""
        if not self._resumed:
            raise WriterRestarted("the commit writer was restarted since the positions were read")
        t0 = time.monotonic()
        enc = self.encryption
        # A tenant whose key was revoked meanwhile: dead letters, nothing in clear (and a rotation
        # made since the last commit applies to this one).
        results, dead = enc.route_unkeyed(results, dead, (record or {}).get("run_id", ""))
        plain_results, plain_dead = results, dead
        results, dead = self.sink.prepare(results, dead)
        results = enc.protect_results(results, self.stored_results)
        dead = enc.protect_dead(dead, self.stored_dead)
        staged = self._marks if positions else {}
        if staged:
            self.sink.stage_marks({name: v for marks in staged.values() for name, v in marks.items()})
            self._marks = {}
        try:
            self.sink.commit(results, dead, positions)
        except BaseException as e:
            # Kept for the next commit, per partition, but a fenced partition's: another writer
            # owns it now (before stop 46 they stayed staged in the sink and rode on this writer's
            # next commit, moving the new owner's marks back).
            fenced = {tuple(tp) for tp in e.partitions} if isinstance(e, PartitionFencedError) else set()
            for tp, named in staged.items():
                if tuple(tp) not in fenced:
                    self._marks.setdefault(tp, {}).update(named)
            raise
        ended_at = datetime.now(timezone.utc)
        published, self._published = self._published, 0
        publish_error = None
        if self.topic is not None and positions:  # after the commit: what a consumer reads is in the table
            try:
                sent, marks = self.topic.publish(results, dead, positions, also_dead=self._window_dead_through(positions))
            except Exception as e:  # noqa: BLE001 - the commit landed: reported with it, not instead of it
                # (before stop 46 the commit went uncounted in the run's totals and runs row)
                publish_error = e if isinstance(e, SinkError) else SinkError(
                    f"publishing to topic {self.topic.topic!r} failed after the commit: {type(e).__name__}")
            else:
                self._keep_marks(marks)
                published += sent
        self._maintain_if_due()
        try:
            enc.record_usage()  # values per key version; rotates at encryption.rotate_after_values
        except Exception as e:  # the commit landed: a keyring that cannot be written now is noted, not fatal
            log.warning("could not record key usage in the keyring (kept for the next try): %s", e)
        totals = CommitTotals.of(plain_results, plain_dead, positions, ended_at)
        if record is not None and self.runs is not None:
            # Appended by append_runs_row(): the job books the commit without waiting for the
            # informational runs table.
            self._runs_row = dict(**record, ended_at=ended_at, **totals.runs_fields())
        return CommitReport(totals, time.monotonic() - t0, ended_at, published, publish_error)

    def _window_dead_through(self, positions: dict) -> pa.Table | None:
        """The repair windows' dead letters this commit's positions now cover (taken out of the
        windows): published with the commit, so what a `published` mark covers is in the topic."""
        parts = []
        for tp, last in positions.items():
            window = self._window_dead.get(tuple(tp))
            if window is None:
                continue
            offsets = window.column("source_offset")
            parts.append(window.filter(pa.compute.less_equal(offsets, last)))
            rest = window.filter(pa.compute.greater(offsets, last))
            if rest.num_rows:
                self._window_dead[tuple(tp)] = rest
            else:
                del self._window_dead[tuple(tp)]
        parts = [p for p in parts if p.num_rows]
        return pa.concat_tables(parts) if parts else None

    def _maintain_if_due(self) -> None:
        """sink.maintenance: compact, checkpoint and vacuum every compact_every_commits commits, here
        between two commits of this writer (never racing itself). Failures are logged, never raised."""
        every = self.maintenance.compact_every_commits
        maintain = getattr(self.sink, "maintain", None)
        self._commits += 1
        if every is None or maintain is None or self._commits % every:
            return
        maintenance_round(maintain, self._commits, "commit writer")

    def append_runs_row(self) -> None:
        """The runs-table row of the last commit (informational: a failure is logged, not raised)."""
        row, self._runs_row = self._runs_row, None
        if row is None:
            return
        try:
            self.runs.append_commit(**row, **cost_fields(self.pricing, row["prompt_tokens"], row["completion_tokens"]))
        except Exception as e:
            log.warning("could not append to the runs table %s: %s", self.runs.uri, e)

    def append_run_row(self, row: dict) -> None:
        """The row of a run that ended (informational, like append_runs_row); the key usage
        counted since the last record is written to the keyring first."""
        try:
            self.encryption.record_usage(force=True)
        except Exception as e:
            log.warning("could not record key usage in the keyring: %s", type(e).__name__)
        if self.runs is None:
            return
        try:
            self.runs.append_run(**row, **cost_fields(self.pricing, row["prompt_tokens"], row["completion_tokens"]))
        except Exception as e:
            log.warning("could not append to the runs table %s: %s", self.runs.uri, e)


class CommitWriterClient:
    """The job loop's handle on the CommitWriter actor: blocking calls for positions, and at most
    one commit in flight (commits are ordered; the next is prepared while this one is written)."""

    def __init__(self, spec: JobSpec, sink: Sink):
        self.spec = spec
        # Restarted if it dies (its state is re-read from the table), but a call is never re-run:
        # a commit is not a pure function of its input.
        options = on_driver_node(spec, max_restarts=-1, max_task_retries=0)
        self.actor = ray.remote(CommitWriter).options(**options).remote(spec, sink)
        self.pid: int | None = None
        self._writing: tuple[ray.ObjectRef, Any] | None = None

    def open(self) -> None:
        self.pid = wait_started([self._idempotent("open")], self.spec, "the commit writer")[0]

    def resume(self, tps: list[TopicPartition]):
        self._after_commit()
        return self._get(self._idempotent("resume", list(tps)))

    def read_positions(self, tps: list[TopicPartition]) -> dict:
        self._after_commit()
        return self._get(self._idempotent("read_positions", list(tps)))

    def anchor(self, positions: dict[TopicPartition, int]) -> None:
        # Not re-run by Ray on a restarted writer: that one has no fence armed (WriterRestarted).
        self._after_commit()
        try:
            self._get(self.actor.anchor.remote(positions))
        except RayActorError as e:
            raise WriterDied(f"the commit writer died while recording start positions: {actor_error(e)}") from None

    def forget(self, tps: list[TopicPartition], wait: bool = True) -> None:
        """wait=False: queued behind the commit in flight, not awaited."""
        if wait:
            self._after_commit()
        ref = self._idempotent("forget", list(tps))
        if wait:
            self._get(ref)

    def append_run_row(self, row: dict, timeout_s: float = 30.0) -> None:
        try:
            ray.get(self._idempotent("append_run_row", row), timeout=timeout_s)
        except Exception as e:  # informational: never fail (or mask the failure of) a run over it
            log.warning("could not append the run's row to the runs table: %s", actor_error(e))

    def _after_commit(self) -> None:
        """Wait for the commit in flight, however long it runs: the writer is sequential, so a call
        sent now is answered after it (a maintenance round inside a commit, a store's retries with
        backoff), and stages.start_timeout_s is for the call's own work. Before stop 44 it counted
        the wait too, and a rebalance's resume behind a long commit failed the run. (The commit's
        outcome stays for finished() to report.)"""
        if self._writing is not None:
            ref = self._writing[0]
            while not ray.wait([ref], timeout=60.0)[0]:
                log.info("waiting for the commit in flight before the commit writer's next call")

    def _idempotent(self, method: str, *args) -> ray.ObjectRef:
        # Safe to run again: sent to a writer that is restarting, they wait for it instead of failing.
        return getattr(self.actor, method).options(max_task_retries=-1).remote(*args)

    def _get(self, ref):
        try:
            return ray.get(ref, timeout=self.spec.stages.start_timeout_s)
        except RayTaskError as e:
            raise cause(e) from None
        except GetTimeoutError:
            raise StageError(
                f"the commit writer did not answer within stages.start_timeout_s={self.spec.stages.start_timeout_s:g}s"
            ) from None

    @property
    def busy(self) -> bool:
        return self._writing is not None

    def write(self, outputs: list, positions: dict, record: dict | None, tag: Any) -> None:
        """outputs: object refs to BatchOutput objects; the writer reads them, not the driver."""
        assert self._writing is None, "one commit at a time"
        self._writing = (self.actor.write.remote(outputs, positions, record), tag)

    def append_runs_row(self) -> None:
        """Queue the last commit's runs-table row at the writer (before any later commit)."""
        self._idempotent("append_runs_row")

    def waitable(self) -> list:
        return [self._writing[0]] if self._writing is not None else []

    def finished(self, timeout_s: float = 0.0, ready: set | None = None) -> tuple[Any, CommitReport] | None:
        """(tag, report) once the commit in flight has landed; None while it runs. Raises what
        the commit raised (PartitionFencedError, ...), or WriterDied."""
        if self._writing is None:
            return None
        ref, tag = self._writing
        if ready is not None and not timeout_s:
            if ref not in ready:
                return None
        elif not ray.wait([ref], timeout=timeout_s)[0]:
            return None
        self._writing = None
        try:
            return tag, ray.get(ref)
        except RayActorError as e:
            raise WriterDied(f"the commit writer died during a commit: {actor_error(e)}") from None
        except RayTaskError as e:
            raise cause(e) from None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Let the calls queued at the writer finish (the last runs-table row), then stop it."""
        try:
            ray.get(self.actor.ping.remote(), timeout=timeout_s)
        except Exception as e:
            log.warning("the commit writer did not finish its queued calls: %s", actor_error(e))
        kill(self.actor)


