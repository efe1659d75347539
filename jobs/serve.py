"""`tidegate serve`: a job spec's online twin, a Ray Serve application (docs/serving.md).

    build_app(spec, engine_cls)     -> the Serve application (one deployment, TidegateEndpoint)
    deploy(spec, address, ...)      serve.run it (local Ray, or a cluster's)
    ingress_env(spec)               the environment a local Ray needs for serve.ingress
    TidegateEndpoint (replica)      FastAPI routes; holds one engine, the guards, the audit log

Routes (the HTTP contract):
    POST /v1/chat/completions, /v1/completions   OpenAI-compatible (stream: true answers SSE)
    GET  /v1/models
    POST /v1/jobs/{name}/invoke                  one event, as the Kafka job would consume it
    POST /v1/jobs/{name}/events                  a batch of events -> the job's Kafka topic
    GET  /healthz, /readyz

Handle methods (Ray calls from inside the cluster, no HTTP): engine_info, engine_usage and run_batch,
the engine of a batch job with pool.backend serve (actors/serve_engine.py); its rows run at vLLM
priority BATCH_PRIORITY, behind the online requests.

Every route but the health checks needs `Authorization: Bearer <API key>` (serve.auth): the key's
tenant is the request's tenant (its encryption key, its budget). A request runs the batch
stages' code (compute/online.py), and its rows are stored in the job's results and dead-letter
tables by the audit log (connectors/audit.py), several requests per append; with serve.ack
durable (default) a request is answered once its rows are committed, with journal once they are
fsync'd in the replica's journal (connectors/journal.py; the journals of dead replicas are replayed
by the next replica before it answers).

Answers: 200 with the result; 400 the event or request could not be used (dead letter of stage
decode/prompt); 401 no or unknown API key; 403 the event names another tenant, or the tenant
has no encryption key; 404 unknown job or model; 422 the rules rejected the output (no output
text when a pii_leakage rule failed); 429 serve.limits (Retry-After); 502 the engine failed the
row; 413 an OpenAI route's body over the job's max_message_bytes; 503 the audit store failed
(durable ack) or Serve's queue is full; 504 serve.request_timeout_s.
No answer or log line quotes a value of the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError

from actors.idempotency import AFTER_ANOTHER, BUSY
from compute.engine import engine_threads
from compute.idempotency import Answer, RecentAnswers, fingerprint_of, request_fingerprint
from compute.limits import TenantLimits
from schemas.errors import AuthError, EventContractError, LimitExceededError, ProduceError, SinkError, TidegateError
from schemas.records import AUDIT_DEAD_LETTER_SCHEMA
from schemas.spec import BATCH_PRIORITY, SERVE_DEPLOYMENT, JobSpec

log = logging.getLogger(__name__)

api = FastAPI(title="Tidegate online endpoint", docs_url=None, redoc_url=None)


class _Refused(Exception):
    """An answer other than 200, decided before any work (auth, limits, bad request)."""

    def __init__(self, code: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.code, self.kind, self.headers = code, kind, headers


def _key_in_use() -> _Refused:
    return _Refused(409, "idempotency_key_in_use", "a request with this Idempotency-Key is still running; retry later",
                    {"Retry-After": "5"})  # fmt: skip


def _key_reused() -> _Refused:
    # The IETF Idempotency-Key draft's answer to a key reused with another payload.
    return _Refused(422, "idempotency_key_reused", "this Idempotency-Key was sent before with another request body: "
                    "send the same body to get its answer again, or use a new key")  # fmt: skip


def _error(code: int, kind: str, message: str, **extra) -> dict:
    return {"error": {"message": message, "type": kind, "code": code, **extra}}


# A journal that has not emptied is rewritten with its uncommitted groups once it is this large.
JOURNAL_REWRITE_BYTES = 4 * 2**20


class _AuditBuffer:
    """Rows waiting for the audit; one write per group. durable: a request awaits its group's
    commit to the tables (group commit: the next append starts as soon as the previous one
    ended, or serve.group_commit_ms later if requests came in while it ran); journal: its
    group's fsync in the replica's journal (connectors/journal.py), the journaled groups
    committed every sink.commit_interval_s; buffered: an append every sink.commit_interval_s,
    nobody waits. Every sink.maintenance.compact_every_commits commits to the tables, a
    maintenance round runs beside the appends (one at a time; a round still running when the
    next is due skips that one), in the replica's low-priority maintenance process
    (actors/maintainer.py): an endpoint that runs for days keeps its tables' file count bounded
    as a batch job does. A checkpoint an append made due is written after that group's answers.

    journal and buffered store a group's rows (encrypted) once, as a numbered record kept until
    both tables hold it; each table's transaction for `records_name` says up to which record
    (AuditLog.replay), so a commit that failed half-way (its dead letters in, its results not) is
    finished by the next one, never repeated.

    The backlog (journal, buffered): rows held for the tables and not in them yet, stored records
    and buffered rows waiting for their interval. It grows while the store is down or slower than
    the requests; `full()` past backlog_max_bytes, and the endpoint then refuses new requests
    (503 audit_backlog_full) instead of holding more in memory (and in the journal) without bound.
    durable has none: its requests wait for their own commit."""

    def __init__(self, audit, ack: str, interval_s: float, journal=None, compact_every_commits: int | None = None,
                 group_commit_s: float = 0.0, maintenance_runner=None, backlog_max_bytes: int | None = None,
                 ack_timeout_s: float | None = None):  # fmt: skip
        self.backlog_max_bytes = backlog_max_bytes
        # durable/journal: the longest a request waits for its group's write (None: no limit). Past
        # it the request is not acknowledged (503 audit_unavailable); its rows may still land, and a
        # retry with its Idempotency-Key then finds them. A store that hangs never hangs a request.
        self.ack_timeout_s = ack_timeout_s
        self.on_backlog = None  # called with backlog_bytes() after each commit of stored records (a gauge)
        self._stored_bytes = 0  # the stored records' (journal_lock)
        self._pending_bytes = 0  # buffered: rows added, not stored yet (the event loop's), until their write
        self.audit = audit
        self.maintenance_runner = maintenance_runner  # where a round runs (AuditLog.maintain); None: a thread here
        # ack durable: the wait before a commit when requests came in while the last one ran
        self.group_commit_s = group_commit_s if ack == "durable" else 0.0
        self._loaded = False  # requests reached the buffer while the last write ran
        self.compact_every_commits = compact_every_commits
        self.commits = 0  # appends to the tables (a group, or a round of stored records)
        self._maintaining: asyncio.Future | None = None
        self.durable = ack in ("durable", "journal")  # the request waits for its group's write
        self.journal = journal
        self.records_name = journal.name if journal is not None else f"{audit.run_id}-buffer" if ack == "buffered" else None
        self.interval_s = interval_s
        self.lock = threading.Lock()  # the audit's Delta handles are used by one thread at a time
        self.journal_lock = threading.Lock()  # the journal file and the list of its uncommitted groups
        self._pending: list[tuple[pa.Table, pa.Table, asyncio.Future | None]] = []
        self._writing: list[tuple[pa.Table, pa.Table, asyncio.Future | None]] = []  # the group being written
        self._journaled: list = []  # JournalRecord: stored rows (journal, buffered), not yet in both tables
        self._seq = 0
        self._wake: asyncio.Event | None = None
        self._step: asyncio.Lock | None = None  # held while a group is written: drain waits for it
        self._task: asyncio.Task | None = None
        self._commit_task: asyncio.Task | None = None
        self._committing: asyncio.Future | None = None  # the journal commit round's thread

    @property
    def _direct(self) -> bool:
        """durable: each group is appended to the tables as it is (no records)."""
        return self.journal is None and self.durable

    def _write(self, results: pa.Table, dead: pa.Table) -> None:
        if self._direct:
            with self.lock:
                self.audit.write(results, dead)
            return
        from connectors.journal import JournalRecord

        with self.journal_lock:
            stored = self.audit.protect(results, dead)
            self._seq += 1
            if self.journal is not None:
                self.journal.append(self._seq, *stored)
            self._journaled.append(JournalRecord(self._seq, *stored))
            self._stored_bytes += _nbytes(stored)

    def commit_journaled(self) -> int:
        """Commit the stored records to the tables; once none is left uncommitted a journal
        starts again (truncated). Returns the rows committed."""
        with self.journal_lock:
            records = list(self._journaled)
        if not records:
            return 0
        with self.lock:
            n = self.audit.replay(records, self.records_name)
        self._checkpoint_now()  # nobody waits for a stored record's commit
        with self.journal_lock:
            last = records[-1].seq
            self._journaled = [r for r in self._journaled if r.seq > last]
            self._stored_bytes -= sum(_nbytes((r.results, r.dead)) for r in records)
            if self.journal is not None and not self._journaled:
                self.journal.truncate()
            elif self.journal is not None and self.journal.size() > JOURNAL_REWRITE_BYTES:
                # Under steady load groups arrive during every commit and the file never empties.
                try:
                    self.journal.rewrite(self._journaled)
                except OSError as e:  # the old journal stays, complete: replay skips what is committed
                    log.warning("audit journal not rewritten (%s); kept as it is", type(e).__name__)
        if self.on_backlog is not None:
            self.on_backlog(self.backlog_bytes())
        return n

    def backlog_bytes(self) -> int:
        """Arrow bytes of the rows held for the tables and not in them yet (journal, buffered)."""
        return self._stored_bytes + self._pending_bytes

    def full(self) -> bool:
        return self.backlog_max_bytes is not None and self.backlog_bytes() >= self.backlog_max_bytes

    def waiting(self) -> list[tuple[pa.Table, pa.Table]]:
        """buffered: the rows of answered requests not stored yet, in plain (an Idempotency-Key
        lookup; durable's are their requests', which have not answered). Call it on the event
        loop: only the loop moves rows into and out of these lists, on their way to the stored
        records (journaled()) and then the tables, so a lookup of this, then those, then the
        tables, in that order, cannot miss a row moving between them."""
        if self.durable:
            return []
        return [(results, dead) for results, dead, _ in self._writing + self._pending]

    def journaled(self) -> tuple[pa.Table, pa.Table] | None:
        """The stored rows not in the tables yet (an Idempotency-Key lookup)."""
        with self.journal_lock:
            records = list(self._journaled)
        if not records:
            return None
        return (pa.concat_tables([r.results for r in records], promote_options="default"),
                pa.concat_tables([r.dead for r in records], promote_options="default"))  # fmt: skip

    async def add(self, results: pa.Table, dead: pa.Table) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():  # done: ended by something no handler took (logged)
            self._wake, self._step = self._wake or asyncio.Event(), self._step or asyncio.Lock()
            self._task = loop.create_task(self._run())
            self._task.add_done_callback(_log_end("audit writer"))
        if self.journal is not None and (self._commit_task is None or self._commit_task.done()):
            self._commit_task = loop.create_task(self._commit_loop())
            self._commit_task.add_done_callback(_log_end("audit commits"))
        fut = loop.create_future() if self.durable else None
        self._pending.append((results, dead, fut))
        if not self.durable:
            self._pending_bytes += _nbytes((results, dead))
        self._wake.set()
        if fut is not None:
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.ack_timeout_s)
            except asyncio.TimeoutError:
                fut.add_done_callback(_log_late_write)  # nobody awaits it now
                raise AuditAckTimeout(fut) from None

    async def _write_group(self, group: list) -> None:
        """One write for a group's rows; its waiting requests are released once it landed."""
        self._writing = group  # (until _write has them among the stored records: waiting() finds them)
        try:
            await asyncio.to_thread(self._write, pa.concat_tables([g[0] for g in group], promote_options="default"),
                                    pa.concat_tables([g[1] for g in group], promote_options="default"))  # fmt: skip
        finally:
            self._writing = []
        if not self.durable:  # buffered: counted as stored records now (_write), no longer as waiting rows
            self._pending_bytes -= sum(_nbytes(g[:2]) for g in group)
        if self._direct:
            self._committed()
        for _, _, fut in group:
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def _checkpoint(self) -> None:
        """A checkpoint the last write made due (the audit's appends never write one): after its
        requests have their answers, before the next group's write."""
        if self._direct:  # stored records' commits (commit_journaled) write their own
            await asyncio.to_thread(self._checkpoint_now)

    def _checkpoint_now(self) -> None:
        try:
            with self.lock:
                self.audit.checkpoint()
        except BaseException as e:  # rows and answers are unaffected; the next interval's is written
            if not _store_failure(e):
                raise
            log.warning("audit checkpoint not written (%s)", type(e).__name__)

    async def _run(self) -> None:
        while True:
            if self.durable:
                await self._wake.wait()
                if self._loaded and self.group_commit_s:  # under load: let more requests join this commit
                    await asyncio.sleep(self.group_commit_s)
            else:
                await asyncio.sleep(self.interval_s)
            async with self._step:
                self._wake.clear()
                group, self._pending = self._pending, []
                await self._step_once(group)

    async def _step_once(self, group: list) -> None:
        if group:
            try:
                await self._write_group(group)
                self._loaded = bool(self._pending)  # arrived during the write, not the checkpoint
            except BaseException as e:  # the store failed after its retries (a Rust panic too)
                if not _store_failure(e):
                    raise
                log.error("audit append failed (%s): %d request(s)", type(e).__name__, len(group))
                if not self.durable:  # not stored, and nobody was told: keep the rows for the next append
                    self._pending = group + self._pending  # (their bytes stay counted)
                for _, _, fut in group:
                    if fut is not None and not fut.done():
                        fut.set_exception(e if isinstance(e, Exception) else SinkError(type(e).__name__))
                return
            await self._checkpoint()
        if not self.durable:  # buffered: the stored records, this group's and any a failed commit left
            try:
                if await asyncio.to_thread(self.commit_journaled):
                    self._committed()
            except BaseException as e:  # the records stay: the next interval finishes their commit
                if not _store_failure(e):
                    raise
                log.error("audit append failed (%s); its rows are kept for the next append", type(e).__name__)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            # Shielded: cancelling this loop (drain) leaves the round's thread to finish, and drain
            # waits for it before its own commit and the journal's close.
            self._committing = asyncio.get_running_loop().run_in_executor(None, self.commit_journaled)
            try:
                if await asyncio.shield(self._committing):
                    self._committed()
            except BaseException as e:  # the groups stay journaled: the next round retries
                if not _store_failure(e):
                    raise
                log.error("audit commit of journaled requests failed (%s); retrying in %.1fs", type(e).__name__,
                          self.interval_s)  # fmt: skip

    def _committed(self) -> None:
        """Count a commit to the tables; start a maintenance round when one is due."""
        self.commits += 1
        every = self.compact_every_commits
        if every is None or self.commits % every:
            return
        if self._maintaining is not None and not self._maintaining.done():
            log.info("audit maintenance round at commit %d skipped: the last one still runs", self.commits)
            return  # the next is due in `every`
        self._maintaining = asyncio.ensure_future(asyncio.to_thread(self.audit.maintain, self.commits,
                                                                    self.maintenance_runner))  # fmt: skip

    async def drain(self) -> None:
        """Write what waits now (replica shutdown), after the group being written, if any; then
        the stored records are committed and a journal removed (kept, for the next replica to
        replay, if the commit fails)."""
        step = self._step or asyncio.Lock()
        async with step:  # the writer is between groups: stopped there, it leaves nothing half-done
            for task in (self._task, self._commit_task):
                if task is not None:
                    task.cancel()
            if self._committing is not None:  # a journal commit round's thread, if one runs
                await asyncio.gather(self._committing, return_exceptions=True)
            group, self._pending = self._pending, []
            if group:
                await self._write_group(group)
                await self._checkpoint()
            if not self._direct:
                await asyncio.to_thread(self.commit_journaled)
            if self.journal is not None:
                self.journal.close(remove=True)


def _nbytes(tables) -> int:
    return sum(t.nbytes for t in tables)


def _store_failure(e: BaseException) -> bool:
    """What the audit's loops survive and log: an Exception (the store's errors, after their
    retries) or a Rust panic, which delta-rs raises as pyo3's PanicException, a BaseException
    (its class is not importable before the first panic). Cancellation and the process's own exit
    end a loop; one that ends anyway is started again by the next request (_AuditBuffer.add)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _log_end(what: str):
    def done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped (%s); the next request starts it again", what, type(task.exception()).__name__)

    return done


def _dead_code(row: dict) -> int:
    """The HTTP status a request's dead-letter row answers."""
    if row["error_class"] == "timeout":
        return 504
    return {"decode": 400, "prompt": 400, "source": 400, "validate": 422, "encrypt": 403}.get(row["stage"], 502)


def _is_template_error(e: BaseException) -> bool:
    from jinja2 import TemplateError

    return isinstance(e, TemplateError)


# /events: a body holds at most this many times source.kafka.max_message_bytes.
EVENTS_BODY_MESSAGES = 64
# check_health: a guard call running this long past serve.request_timeout_s fails the replica.
GUARDS_STUCK_S = 60.0
# durable/journal: a request waits at most this long past serve.request_timeout_s for its audit write.
AUDIT_ACK_TIMEOUT_S = 60.0
# An Idempotency-Key claim (actors/idempotency.py) lives this long unless its holder renews it, every
# CLAIM_RENEW_S while the request runs: a replica that died frees its keys within CLAIM_LEASE_S.
CLAIM_LEASE_S, CLAIM_RENEW_S = 60.0, 15.0
# An Idempotency-Key request's body larger than this is hashed in a thread (request_fingerprint
# parses JSON): 64 KiB takes well under a millisecond, an /invoke body may be up to 16 MiB.
FINGERPRINT_ON_LOOP_BYTES = 64 * 2**10
# Keys of an OpenAI request that say how its answer is sent, not what is asked: the same request
# with or without `stream` gets the same first answer (rendered as asked), not 422.
STREAM_KEYS = ("stream", "stream_options")
LIMITER_TIMEOUT_S = 10.0  # the application's limiter answers an admission within this, or the request gets 503


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past `limit` bytes before it is all in memory: by its
    Content-Length, or as its chunks arrive."""

    too_large = _Refused(413, "request_too_large", f"the body is over this route's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class AuditAckTimeout(asyncio.TimeoutError):
    """A request's audit write outran _AuditBuffer.ack_timeout_s; `write` resolves when it ends."""

    def __init__(self, write: asyncio.Future):
        super().__init__("the audit write did not end in time")
        self.write = write


def _log_late_write(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("an audit write whose request had been answered 503 failed (%s)", type(fut.exception()).__name__)


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a request's answer failed (%s)", type(task.exception()).__name__)


def _with_text(table: pa.Table, name: str, value: str) -> pa.Table:
    """`table` with string column `name` set to `value` in every row (added when it has none)."""
    column = pa.repeat(pa.scalar(value, pa.string()), table.num_rows)
    if name not in table.column_names:
        return table.append_column(name, column)
    i = table.column_names.index(name)
    return table.set_column(i, table.schema.field(i), column)


def _usage(row: dict) -> dict:
    p, c = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _ok_body(route: str, rid: str, row: dict, model: str) -> dict:
    guard = {"status": row["status"], "attempts": row["attempts"], "rule_results": row["rule_results"] or []}
    # When the row was made, not when this body is: a replay (from the answers kept or the tables)
    # carries the first answer's stamp, so it is the first answer byte for byte.
    made = row.get("processed_at")
    created = int(made.timestamp()) if made is not None else int(time.time())
    finish = row["finish_reason"] or "stop"
    if route == "chat/completions":
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": row["output_text"]},
                             "finish_reason": finish}],
                "usage": _usage(row), "tidegate": guard}  # fmt: skip
    if route == "completions":
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": row["output_text"], "finish_reason": finish, "logprobs": None}],
                "usage": _usage(row), "tidegate": guard}  # fmt: skip
    output_json = json.loads(row["output_json"]) if row.get("output_json") else None
    return {"id": row["id"], "output": row["output_text"], "output_json": output_json, "finish_reason": finish,
            "usage": _usage(row), **guard}  # fmt: skip


async def _sse(route: str, body: dict):
    """A validated answer as OpenAI stream chunks. The rules need the whole output, so nothing is
    sent before it passed them: streaming changes the framing, not when the first token is known."""
    chat = route == "chat/completions"
    text = body["choices"][0]["message"]["content"] if chat else body["choices"][0]["text"]
    base = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"]}  # fmt: skip

    def chunk(piece: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if piece is not None:
                delta["content"] = piece
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    if chat:
        yield chunk(None, None, role=True)
    words = (text or "").split(" ")
    for i, w in enumerate(words):
        yield chunk(w if i == 0 else " " + w, None)
    final = json.loads(chunk(None, body["choices"][0]["finish_reason"])[6:])
    final["usage"] = body["usage"]
    yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"


class _ServeMetrics:
    """tidegate_serve_requests_total{job, route, code} and tidegate_serve_latency_seconds{job, route}
    through Ray's metrics export (no value of a request in a label)."""

    def __init__(self, job: str):
        self.job = job
        try:
            from ray.util.metrics import Counter, Gauge, Histogram

            self.requests = Counter("tidegate_serve_requests_total", "Online requests by route and HTTP status.",
                                    tag_keys=("job", "route", "code"))  # fmt: skip
            self.latency = Histogram("tidegate_serve_latency_seconds", "Online request latency by route.",
                                     boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                                     tag_keys=("job", "route"))  # fmt: skip
            self.audit_backlog = Gauge("tidegate_serve_audit_backlog_bytes", "Audit rows a replica holds that are "
                                       "not in the tables yet (serve.ack journal, buffered).", tag_keys=("job",))  # fmt: skip
        except Exception:  # noqa: BLE001 - metrics are never fatal
            self.requests = self.latency = self.audit_backlog = None

    def backlog(self, n: int) -> None:
        if self.audit_backlog is None:
            return
        try:
            self.audit_backlog.set(n, {"job": self.job})
        except Exception:  # noqa: BLE001
            pass

    def record(self, route: str, code: int, t0: float) -> None:
        if self.requests is None:
            return
        try:
            self.requests.inc(1, {"job": self.job, "route": route, "code": str(code)})
            self.latency.observe(time.monotonic() - t0, {"job": self.job, "route": route})
        except Exception:  # noqa: BLE001
            pass


def journal_directory(spec: JobSpec) -> str:
    """serve.ack journal: this job's journals, <serve.journal_dir or ~/.tidegate/journal>/<job name>."""
    base = spec.serve.journal_dir or os.path.join(os.path.expanduser("~"), ".tidegate", "journal")
    return os.path.join(base, spec.name)


def replay_orphans(audit, directory: str) -> int:
    """Commit what the journals of dead replicas in `directory` hold and the tables do not
    (connectors/journal.py), then remove them. Returns the rows appended."""
    from connectors.journal import orphans, read_records

    total = 0
    for journal in orphans(directory):
        records = read_records(journal.path)
        n = audit.replay(records, journal.name)
        log.info("audit journal of replica %s: %d group(s), %d row(s) were not in the tables and are now",
                 journal.name, len(records), n)  # fmt: skip
        journal.close(remove=True)
        total += n
    audit.checkpoint()
    return total


# The deployment comes after every helper it uses: Serve serialises the class when it is decorated.
@serve.deployment(name=SERVE_DEPLOYMENT)
@serve.ingress(api)
class TidegateEndpoint:
    def __init__(self, spec: JobSpec, engine_cls: type | None = None):
        from compute.engine import EngineWorker
        from compute.lineage import lineage_columns
        from compute.online import OnlineGuards
        from compute.validation import Validator
        from connectors.audit import AuditLog
        from crypto.stage import EncryptionStage
        from jobs.run import configure_logging
        from schemas.trusted_code import refuse_untrusted

        # The job's log format, secrets masked (jobs/logs.py), on the process's own stderr (the
        # worker's log file, which Ray forwards). Not sys.stderr: with Serve's throughput-optimized
        # settings (serve.ingress: haproxy) that is a stream into Serve's logger, whose file handler
        # sits behind a 1,000-record buffer flushed only when full or at an ERROR: the replica's
        # warnings reached no file while it ran, and a killed replica's never did.
        configure_logging(stream=sys.__stderr__)
        refuse_untrusted(spec.code_refs(), spec.allowed_modules)  # as `run` does, before anything starts
        self.spec = spec
        self.run_id = f"serve-{uuid.uuid4().hex[:12]}"
        self.model_label = spec.model.label
        engine_cls = engine_cls or EngineWorker
        self.json_schema = Validator(spec).json_schema
        # priority_scheduling: a batch job's rows (pool.backend serve, run_batch) wait behind online requests.
        self.engine = engine_cls(spec.model, spec.sampling, chat=spec.prompt.chat, system=spec.prompt.system,
                                 json_schema=self.json_schema, priority_scheduling=True,
                                 batch_share=spec.serve.batch_share,
                                 separate_process=spec.serve.engine_process == "separate")  # fmt: skip
        self.encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        from actors.writer import job_schemas

        self.encryption.check_output_fields(job_schemas(self.encryption)[0])
        self.model_revision = self.engine.model_revision()
        self.guards = OnlineGuards(spec, self.run_id, self.engine, lineage_columns(spec, self.model_revision),
                                   self.encryption)  # fmt: skip
        embedders: dict[str, Any] = {}
        for rule in self.guards.semantic_rules():
            if rule.spec.model not in embedders:
                from compute.semantic import EmbeddingWorker

                embedders[rule.spec.model] = EmbeddingWorker(rule.spec.model).embed
            rule.embed = embedders[rule.spec.model]
        self.audit = AuditLog(spec, self.encryption, self.run_id)
        self.audit.open()
        journal = None
        journal_dir = journal_directory(spec)
        # Before this replica answers anything, whatever its ack: a spec moved off `journal` still
        # has the acknowledged rows of replicas that died under it to commit.
        replay_orphans(self.audit, journal_dir)
        if spec.serve.ack == "journal":
            from connectors.journal import AuditJournal

            journal = AuditJournal.create(journal_dir, self.run_id)
        # A round in a thread here would share the GIL and delta-rs's threads with the answers' appends.
        # Its process starts now, beside the engine's load: started at the first round, under load,
        # its start-up took the CPU from the answers of that moment.
        from actors.maintainer import LowPriorityRounds

        rounds = LowPriorityRounds()
        if spec.sink.maintenance.compact_every_commits:
            rounds.start()
        self.buffer = _AuditBuffer(self.audit, spec.serve.ack, spec.sink.commit_interval_s, journal,
                                   spec.sink.maintenance.compact_every_commits,
                                   spec.serve.group_commit_ms / 1000, rounds,
                                   max(1, int(spec.serve.audit_backlog_max_mb * 2**20)),
                                   ack_timeout_s=AUDIT_ACK_TIMEOUT_S + spec.serve.request_timeout_s)  # fmt: skip
        self.verifier = None
        if spec.serve.auth:
            from crypto.api_keys import ApiKeyVerifier
            from crypto.keyring import Keyring

            self.verifier = ApiKeyVerifier(Keyring.open(spec.serve.api_keys or spec.encryption.keyring))
        # serve.limits: this replica's own buckets (scope replica) or the application's actor.
        self._limits: TenantLimits | Any = None  # Any: the actor's handle
        if spec.serve.limits.enabled and spec.serve.limits.scope == "application":
            from actors.limiter import shared_limits

            self._limits = shared_limits(spec.name, spec.serve.limits)
        elif spec.serve.limits.enabled:
            self._limits = TenantLimits(spec.serve.limits)
        self._claims = None  # Idempotency-Key across replicas: only when there can be several
        if spec.serve.max_replicas > 1:
            from actors.idempotency import shared_claims

            self._claims = shared_claims(spec.name, spec.serve.idempotency_cache)
        self.pii_rules = self.guards.pii_rules()
        self._answers = RecentAnswers(spec.serve.idempotency_cache)  # this replica's Idempotency-Key answers
        self._in_flight: dict[int, asyncio.Future] = {}
        self._unsettled: dict[int, asyncio.Future] = {}  # offset -> its audit write, answered 503 before it ended
        self._producer = None
        self._producer_lock = asyncio.Lock()  # one producer made at a time (_kafka)
        self._metrics = _ServeMetrics(spec.name)
        self.buffer.on_backlog = self._metrics.backlog  # the gauge falls as commits empty the backlog
        log.info("tidegate serve %s: replica ready (run %s)", spec.name, self.run_id)

    async def __del__(self):
        """Replica shutdown (serve stop, a scale-down, SIGTERM of `tidegate serve`): the audit rows
        still buffered (serve.ack buffered) are written before the replica goes."""
        buffer = getattr(self, "buffer", None)
        if buffer is None:
            return
        try:
            await buffer.drain()
        except Exception as e:  # noqa: BLE001 - the store failed: say so, the process ends anyway
            log.error("audit rows not written at shutdown (%s)", type(e).__name__)

    # -- health ----------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Serve's periodic replica check: a replica whose engine failed a step (compute/engine.py
        `broken`) is replaced, with a fresh engine, instead of answering 502 to every request."""
        broken = getattr(self.engine, "broken", None)
        if broken:
            raise RuntimeError(f"the replica's engine failed a step ({broken}): replace the replica")
        # A guard call that never returns (a custom rule's loop) holds the guards' one thread: every
        # later request answers 504. Past the longest a sane call takes, the replica is replaced.
        stuck = self.guards.busy_for()
        if stuck > GUARDS_STUCK_S + self.spec.serve.request_timeout_s:
            raise RuntimeError(f"the replica's guards have run one call for {stuck:.0f} s: replace the replica")
        # ack journal: a journal whose failed write could not even be cut off takes no record again,
        # so every request would answer 503; a fresh replica opens a journal of its own (and
        # commits what this one's holds, up to its last whole record).
        journal = self.buffer.journal
        if journal is not None and journal.broken:
            raise RuntimeError(f"the audit journal {journal.path.name} is unusable after a failed write: replace the replica")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """503 while the audit backlog is full: this replica refuses audited requests until its
        commits catch up (a load balancer that checks /readyz sends them elsewhere meanwhile)."""
        full = self.buffer.full()
        return JSONResponse({"status": "audit_backlog_full" if full else "ready", "job": self.spec.name,
                             "model": self.model_label, "run_id": self.run_id, "pid": os.getpid(),
                             "audit_backlog_bytes": self.buffer.backlog_bytes()}, status_code=503 if full else 200)  # fmt: skip

    # -- a batch job's engine (pool.backend serve; handle calls, not routes) ----------------------

    def engine_info(self) -> dict:
        """What a batch job checks before it sends this engine its batches: the engine's sizes, and
        what the engine generates with (its model, sampling, prompt chat/system, output schema)."""
        return {**self.engine.info(), "model": self.model_label, "model_revision": self.model_revision,
                "sampling": self.spec.sampling, "chat": self.spec.prompt.chat, "system": self.spec.prompt.system,
                "json_schema": self.json_schema}  # fmt: skip

    def engine_usage(self) -> dict:
        return self.engine.usage()

    async def run_batch(self, requests: pa.Table) -> tuple[dict, pa.Table]:
        """A batch job's batch (REQUEST_SCHEMA) -> (counts, COMPLETION_SCHEMA table); its rows run
        behind this replica's online requests. Cancelled, it aborts the rows in the engine."""
        return await self.engine.run_batch(requests, priority=BATCH_PRIORITY)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            await self._principal(request)
        except _Refused as r:
            return self._refusal(r, "models")
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_label, "object": "model", "created": 0, "owned_by": "tidegate"},
            {"id": self.spec.name, "object": "model", "created": 0, "owned_by": "tidegate"},
        ]})  # fmt: skip

    # -- the job's own routes --------------------------------------------------------------------

    @api.post("/v1/jobs/{name}/invoke")
    async def invoke(self, name: str, request: Request) -> JSONResponse:
        route = "invoke"
        try:
            principal = await self._principal(request)
            self._job(name)
            self._tenant_of(principal)  # whatever the body is: a key of no usable tenant is refused first
            # Over max_message_bytes an event is dead-lettered (oversized_message, its bytes kept,
            # encrypted); past 16 times that it is refused unread, as a Kafka broker would.
            raw = await _body(request, 16 * self.spec.source.max_message_bytes)
            body, event_id = self._event_for(raw, principal)
            self._audit_room()
            # A body over max_message_bytes never reaches the engine (oversized_message): its bytes
            # are not reserved, or one legal-looking request could hold the tenant's budget at once.
            estimate = min(len(body), self.spec.source.max_message_bytes) // 4 + self._budget(None)
            await self._admit(principal, estimate)
        except _Refused as r:
            return self._refusal(r, route)
        return await self._answer(request, principal, route, lambda offset: self.guards.run(
            self.guards.event_source(body, route, offset)), request_id=event_id, estimate=estimate, payload=raw)  # fmt: skip

    @api.post("/v1/jobs/{name}/events")
    async def events(self, name: str, request: Request) -> JSONResponse:
        t0 = time.monotonic()
        try:
            principal = await self._principal(request)
            self._job(name)
            try:
                events = json.loads(await _body(request, EVENTS_BODY_MESSAGES * self.spec.source.max_message_bytes))
            except (ValueError, RecursionError):
                raise _Refused(400, "invalid_json", "the body is not JSON (or nested too deeply)") from None
            if isinstance(events, dict):
                events = events.get("events")
            if not isinstance(events, list):
                raise _Refused(400, "invalid_request", "the body is a JSON list of events (or {\"events\": [...]})")
            events = [self._tenant_event(e, principal) if isinstance(e, dict) else e for e in events]
            await self._admit(principal, 0)
            producer = await self._kafka()
        except _Refused as r:
            return self._refusal(r, "events")
        try:
            outcomes = await asyncio.to_thread(producer.send_each, events)
        except TidegateError as e:
            self._metrics.record("events", 503, t0)
            return JSONResponse(_error(503, "kafka_unavailable", str(e)), status_code=503)
        sent = [o for o in outcomes if not isinstance(o, EventContractError)]
        if sent and all(isinstance(o, ProduceError) for o in sent):  # the broker took none: nothing to report per event
            self._metrics.record("events", 503, t0)
            return JSONResponse(_error(503, "kafka_unavailable", str(sent[0])), status_code=503)
        out = []
        for i, o in enumerate(outcomes):
            if isinstance(o, Exception):
                out.append({"index": i, "accepted": False, "error": str(o)})
            else:
                out.append({"index": i, "accepted": True, "id": o.id, "topic": o.topic, "partition": o.partition,
                            "offset": o.offset})  # fmt: skip
        accepted = sum(1 for o in out if o["accepted"])
        self._metrics.record("events", 200, t0)
        return JSONResponse({"accepted": accepted, "rejected": len(out) - accepted, "events": out})

    # -- OpenAI-compatible -----------------------------------------------------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, "chat/completions")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, "completions")

    async def _openai(self, request: Request, route: str):
        try:
            principal = await self._principal(request)
            raw = await _body(request, self.spec.source.max_message_bytes)  # as for an event (invoke dead-letters those)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise _Refused(400, "invalid_json", "the body is not JSON (or nested too deeply)") from None
            if not isinstance(body, dict):
                raise _Refused(400, "invalid_request", "the body is a JSON object")
            if body.get("model") not in (self.model_label, self.spec.name):
                raise _Refused(404, "model_not_found", f"this endpoint serves model {self.model_label!r} "
                               f"(or the job name {self.spec.name!r})")  # fmt: skip
            prompt, messages = self._prompt_of(route, body)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
                raise _Refused(400, "invalid_request", "max_tokens must be a positive integer")
            tenant = self._tenant_of(principal)
            budget = self._budget(max_tokens)
            self._audit_room()
            estimate = len(raw) // 4 + budget
            await self._admit(principal, estimate)
        except _Refused as r:
            return self._refusal(r, route)
        request_id = f"{'chatcmpl' if route.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"

        def work(offset: int):
            src, req = self.guards.chat_request(raw, route, offset, request_id, prompt, messages, tenant, budget)
            return self.guards.run(src, req)

        answer = await self._answer(request, principal, route, work, request_id=request_id, estimate=estimate,
                                    payload=raw, payload_ignores=STREAM_KEYS)  # fmt: skip
        if body.get("stream") and answer.status_code == 200:
            replayed = {k: v for k, v in answer.headers.items() if k.lower() == "idempotent-replayed"}
            return StreamingResponse(_sse(route, json.loads(answer.body)), media_type="text/event-stream", headers=replayed)
        return answer

    def _prompt_of(self, route: str, body: dict) -> tuple[str, list[dict] | None]:
        if route == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise _Refused(400, "invalid_request", "prompt must be one non-empty string")
            return prompt, None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refused(400, "invalid_request", "messages must be a non-empty list")
        clean = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: the text ones
                texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(content, str):
                raise _Refused(400, "invalid_request", f"messages[{i}]: needs a role (system|user|assistant) and text content")
            clean.append({"role": m["role"], "content": content})
        users = [m["content"] for m in clean if m["role"] == "user"]
        if not users:
            raise _Refused(400, "invalid_request", "messages: no user message")
        return users[-1], clean

    # -- the shared path -------------------------------------------------------------------------

    async def _answer(self, request: Request, principal, route: str, work, request_id: str | None = None,
                      estimate: int = 0, payload: bytes = b"", payload_ignores: tuple[str, ...] = ()) -> JSONResponse:  # fmt: skip
        """Run (or find) the request; store its rows; answer. With an Idempotency-Key, a request
        seen before (this replica's memory, the audit tables, or, with several replicas, the
        application's claims: actors/idempotency.py) gets the first answer again, if its body is
        the first one's (`payload` without its `payload_ignores` keys, compared by
        request_fingerprint; else 422 idempotency_key_reused). `estimate`: the tokens admission
        reserved (settled against what the generations used).

        Shielded from the handler's cancellation (Serve cancels it when the client disconnects):
        once admitted, a request runs to its stored rows and its answer is kept, whoever is still
        listening. Cancelled halfway, its rows could be written while the key's other waiters, told
        it failed, ran it again (two rows at one offset), or a generation's row never be written."""
        task = asyncio.ensure_future(self._answer_now(request, principal, route, work, request_id, estimate, payload,
                                                      payload_ignores))  # fmt: skip
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieve)  # nobody awaits it now: a failure of it is logged, not lost
            raise

    async def _answer_now(self, request: Request, principal, route: str, work, request_id: str | None,
                          estimate: int, payload: bytes, payload_ignores: tuple[str, ...]) -> JSONResponse:  # fmt: skip
        from compute.online import request_offset

        t0 = time.monotonic()
        key = request.headers.get("idempotency-key")
        tenant = principal.tenant if principal is not None else ""
        if not key:
            offset = request_offset("req", uuid.uuid4().hex)
            code, body, _ = await self._run_and_store(route, offset, work, principal, request_id, estimate, None)
            self._unsettled.pop(offset, None)  # no key: nobody retries it as the same request
            self._metrics.record(route, code, t0)
            return JSONResponse(body, status_code=code)
        offset = request_offset("idem", tenant, route, key)
        fingerprint = (request_fingerprint(tenant, route, key, payload, payload_ignores)
                       if len(payload) <= FINGERPRINT_ON_LOOP_BYTES  # a larger body is parsed off the event loop
                       else await asyncio.to_thread(request_fingerprint, tenant, route, key, payload, payload_ignores))
        code_body = self._answers.get(offset)
        give_up = time.monotonic() + self._key_wait_s()
        while code_body is None and offset in self._in_flight:  # this replica runs it: wait for that
            try:
                code_body = await asyncio.wait_for(asyncio.shield(self._in_flight[offset]),
                                                   max(0.0, give_up - time.monotonic()))  # fmt: skip
            except asyncio.TimeoutError:  # still running (its audit write, say): as on another replica
                self._settle(principal, -estimate)
                return self._refusal(_key_in_use(), route)
            code_body = code_body or self._answers.get(offset)
        holder = renewal = None
        if code_body is None:
            # Registered before the first await: from here this replica's other requests with the key
            # wait on this one (None if it fails on our side: then the next of them runs it).
            fut = asyncio.get_running_loop().create_future()
            self._in_flight[offset] = fut
            code = 500
            ran = False  # _run_and_store settles the reservation itself
            try:
                code_body = await self._stored_answer(route, offset, fingerprint)
                if code_body is None and self._claims is not None:  # another replica may be running it
                    claimant = uuid.uuid4().hex
                    got = await self._claim(offset, claimant)
                    if got == BUSY:
                        raise _key_in_use()
                    if got is None or got == AFTER_ANOTHER:
                        holder = claimant  # ours now: finished below, whatever happens
                        renewal = asyncio.ensure_future(self._keep_claim(offset, holder))
                        if got == AFTER_ANOTHER:  # the request before may have stored its rows meanwhile
                            code_body = await self._stored_answer(route, offset, fingerprint)
                    else:
                        code_body = got
                if code_body is None:
                    ran = True
                    code, body, _ = await self._run_and_store(route, offset, work, principal, request_id, estimate,
                                                              fingerprint)  # fmt: skip
                    if code < 500:
                        self._answers.put(offset, (code, body, fingerprint))
            except _Refused as r:
                if not ran:
                    self._settle(principal, -estimate)  # nothing ran
                return self._refusal(r, route)
            except Exception:
                if not ran:  # the lookup failed (a store error): nothing ran either
                    self._settle(principal, -estimate)
                raise
            finally:
                answer = code_body if code_body is not None else ((code, body, fingerprint) if code < 500 else None)
                write = self._unsettled.pop(offset, None)

                def release(_=None, answer=answer, fut=fut, holder=holder, renewal=renewal) -> None:
                    fut.set_result(answer)
                    self._in_flight.pop(offset, None)
                    if holder is not None:
                        renewal.cancel()
                        self._finish_claim(offset, holder, answer)

                if write is not None and not write.done():
                    # Answered 503 while its audit write goes on: a retry with the key (here, or on
                    # another replica through the claim) waits for the write, then finds its rows
                    # if it landed, instead of running the request a second time beside them.
                    write.add_done_callback(release)
                else:
                    release()
            if code_body is None:
                self._metrics.record(route, code, t0)
                return JSONResponse(body, status_code=code)
        self._settle(principal, -estimate)  # the first answer again (or none): no generation
        stored = fingerprint_of(code_body)
        if stored is not None and stored != fingerprint:  # None: a first answer stored before stop 47
            return self._refusal(_key_reused(), route)
        self._metrics.record(route, code_body[0], t0)
        return JSONResponse(code_body[1], status_code=code_body[0], headers={"Idempotent-Replayed": "true"})

    async def _run_and_store(self, route: str, offset: int, work, principal, request_id, estimate: int,
                             fingerprint: str | None) -> tuple[int, dict, str | None]:  # fmt: skip
        from compute.online import Outcome
        from compute.prompts import dead_letter_table
        from schemas.records import empty_table

        def failed(stage: str, kind: str, error: str) -> Outcome:
            dead = dead_letter_table([dict(id=request_id, stage=stage, error_class=kind, error=error,
                                           source_topic=f"serve:{route}", source_partition=0, source_offset=offset,
                                           tenant=principal.tenant if principal is not None else self._tenant_of(None))],
                                     self.run_id)  # fmt: skip
            return Outcome(empty_table(self.guards.results_schema), dead, estimate)  # its cost is not known: the reservation

        try:
            outcome: Outcome = await asyncio.wait_for(work(offset), self.spec.serve.request_timeout_s)
        except asyncio.TimeoutError:
            outcome = failed("engine", "timeout", f"no answer within serve.request_timeout_s={self.spec.serve.request_timeout_s}")
        except Exception as e:  # noqa: BLE001 - the request fails, audited; the replica goes on
            # Its type only: a chat template's or the engine's message may quote the request.
            if _is_template_error(e):  # a chat template refusing the messages (e.g. roles out of order)
                outcome = failed("prompt", "render_error", f"the chat template refused the messages ({type(e).__name__})")
            else:
                log.warning("request on %s failed in the engine (%s)", route, type(e).__name__)
                outcome = failed("engine", "engine_error", f"the engine failed ({type(e).__name__})")
        results, dead = outcome.results, outcome.dead
        if fingerprint is not None:  # stored with the rows: the key's retries are checked against it
            results, dead = (_with_text(t, "request_fingerprint", fingerprint) for t in (results, dead))
        if principal is not None:  # who asked, for the audit: a body that does not parse is the key's tenant's too
            results, dead = (_with_text(t, "tenant", principal.tenant) for t in (results, dead))
        results, dead = self._split_revoked(results, dead)
        self._settle(principal, outcome.tokens() - estimate)
        try:
            await self.buffer.add(results, dead)
        except AuditAckTimeout as e:  # not acknowledged; the write goes on, and its key waits for it (_answer_now)
            self._unsettled[offset] = e.write
            return 503, _error(503, "audit_unavailable", "the request's audit rows were not stored in time; retry"), None
        except Exception as e:  # noqa: BLE001 - durable ack: not stored, so not answered
            return (503, _error(503, "audit_unavailable", f"the request's audit rows could not be stored "
                                f"({type(e).__name__}); retry"), None)  # fmt: skip
        return self._render(route, results, dead, request_id)

    def _split_revoked(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        """A tenant whose key was revoked (or removed) while its request ran: its row becomes the
        dead letter the audit would store (stage encrypt, key_revoked: AuditLog.protect makes the
        same split), so the answer is what the tables hold, 403, not the output. Before, the
        client got a 200 with the output while the tables said 403."""
        if not results.num_rows or self.encryption.keyring is None:
            return results, dead
        try:
            return self.encryption.route_unkeyed(results, dead, self.run_id, AUDIT_DEAD_LETTER_SCHEMA)
        except Exception as e:  # noqa: BLE001 - a keyring briefly unreadable: the audit's protect splits them again
            log.warning("could not check the request's tenant key before answering (%s)", type(e).__name__)
            return results, dead

    def _settle(self, principal, tokens: int) -> None:
        """Settle a request's token reservation: what it used beyond it (negative: a refund)."""
        if principal is None or self._limits is None or not tokens:
            return
        if isinstance(self._limits, TenantLimits):
            self._limits.spend(principal.tenant, tokens)
        else:  # not awaited: the answer does not wait for it
            self._limits.spend.remote(principal.tenant, tokens)

    def _key_wait_s(self) -> float:
        """The longest a request waits for the first request with its Idempotency-Key, here or on
        another replica (then 409): a request answers within its generation's timeout and its
        audit write's ack timeout."""
        return self.spec.serve.request_timeout_s + (self.buffer.ack_timeout_s or 0.0) + CLAIM_RENEW_S

    async def _claim(self, offset: int, holder: str) -> Answer | str | None:
        """None or AFTER_ANOTHER: this request holds the key (actors/idempotency.py); BUSY: another
        replica still runs it after the longest a request can take here; else its answer."""
        wait_s = self._key_wait_s()
        try:
            return await asyncio.wait_for(self._claims.claim.remote(offset, holder, CLAIM_LEASE_S, wait_s),
                                          wait_s + 30)  # fmt: skip
        except (RayActorError, asyncio.TimeoutError):
            raise _Refused(503, "idempotency_unavailable", "the application's idempotency record is restarting or "
                           "not answering; retry", {"Retry-After": "1"}) from None  # fmt: skip

    async def _keep_claim(self, offset: int, holder: str) -> None:
        """Renew this request's claim while it runs (cancelled when it is finished): its work can
        outlast any fixed lease (an audit write the answer gave up on, which its key waits for), and
        a lapsed claim would let a duplicate run beside it."""
        while True:
            await asyncio.sleep(CLAIM_RENEW_S)
            try:
                alive = await asyncio.wait_for(self._claims.renew.remote(offset, holder, CLAIM_LEASE_S), CLAIM_RENEW_S)
            except (RayActorError, asyncio.TimeoutError) as e:  # restarting: the next round tries again
                log.warning("Idempotency-Key claim not renewed (%s); trying again", type(e).__name__)
                continue
            if not alive:  # lapsed (the claims actor restarted, or this loop was held past the lease)
                log.warning("an Idempotency-Key claim lapsed while its request ran: a duplicate may run beside it")
                return

    def _finish_claim(self, offset: int, holder: str, answer: Answer | None) -> None:
        """Not awaited: the answer does not wait for it (the claim's waiters do)."""
        self._claims.finish.remote(offset, holder, answer)

    async def _stored_answer(self, route: str, offset: int, fingerprint: str) -> tuple[int, dict, str | None] | None:
        waiting = self.buffer.waiting()  # here, on the event loop (_AuditBuffer.waiting says why)

        def find():
            for group_results, group_dead in waiting:  # buffered, answered and not stored yet: in plain
                results, dead = self.audit.rows_of(group_results, group_dead, route, offset)
                if results.num_rows or dead.num_rows:  # (one request's rows are in one group)
                    return results, dead
            journaled = self.buffer.journaled()  # then: a group leaves this list only once committed
            if journaled is not None:
                results, dead = self.audit.find_in(*journaled, route, offset)
                if results.num_rows or dead.num_rows:
                    return results, dead
            with self.buffer.lock:
                return self.audit.find(route, offset)

        results, dead = await asyncio.to_thread(find)
        if not results.num_rows and not dead.num_rows:
            return None
        answer = self._render(route, results, dead, None, fingerprint)  # the first answer's id
        # A first try that failed on our side (timeout, engine) is not an answer to repeat: run it again.
        return answer if answer[0] < 500 else None

    def _render(self, route: str, results: pa.Table, dead: pa.Table, request_id: str | None,
                fingerprint: str | None = None) -> tuple[int, dict, str | None]:  # fmt: skip
        """The answer of a request's rows: (status code, body, the row's request_fingerprint).
        Several result rows at one offset (two replicas ran the key: a claim that lapsed): the
        one of this `fingerprint`'s body, if there is one."""
        if results.num_rows:
            rows = results.to_pylist()
            row = next((r for r in rows if fingerprint and r.get("request_fingerprint") == fingerprint), rows[0])
            rid = request_id or row["id"]
            return 200, _ok_body(route, rid, row, self.model_label), row.get("request_fingerprint")
        # Several rows at one offset: a first try that failed on our side (5xx) and its rerun. The
        # rerun's answer is the one to repeat (the tables' order is not the writes').
        rows = dead.to_pylist()
        d = next((r for r in rows if _dead_code(r) < 500), rows[0])
        stage, kind = d["stage"], d["error_class"]
        code = _dead_code(d)
        extra: dict[str, Any] = {"stage": stage}
        if stage == "validate":
            rules = d.get("rule_results") or []
            extra["rule_results"] = rules
            if not any(r["rule"] in self.pii_rules and not r["passed"] for r in rules):
                extra["output"] = d.get("output_text")
        return code, _error(code, kind, d["error"] or kind, **extra), d.get("request_fingerprint")

    # -- checks before any work ------------------------------------------------------------------

    async def _principal(self, request: Request):
        if self.verifier is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _Refused(401, "unauthorized", "an API key is needed: Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip
        try:
            return await self.verifier.verify_async(token)
        except AuthError as e:
            raise _Refused(401, "unauthorized", str(e), {"WWW-Authenticate": "Bearer"}) from None

    def _job(self, name: str) -> None:
        if name != self.spec.name:
            raise _Refused(404, "job_not_found", f"this endpoint serves job {self.spec.name!r}")

    def _tenant_of(self, principal) -> str | None:
        enc = self.spec.encryption
        if principal is None:
            return enc.tenant if enc.enabled else None
        if enc.enabled:
            if enc.tenant_field is None and enc.tenant != principal.tenant:
                raise _Refused(403, "forbidden", "this job encrypts for one fixed tenant; the API key is another's")
            if not self.encryption.has_key(principal.tenant):
                raise _Refused(403, "forbidden", "the API key's tenant has no encryption key in the keyring")
        return principal.tenant

    def _tenant_event(self, event: dict, principal) -> dict:
        """The event as the principal's: its tenant field filled in, or refused if it names another."""
        enc = self.spec.encryption
        if principal is None or not enc.enabled:
            return event
        self._tenant_of(principal)
        field = enc.tenant_field
        if field is None:
            return event
        have = event.get(field)
        if have is None:
            return {**event, field: principal.tenant}
        if have != principal.tenant:
            raise _Refused(403, "forbidden", f"the event's {field} is not the API key's tenant")
        return event

    def _event_for(self, body: bytes, principal) -> tuple[bytes, str | None]:
        """The event's bytes as the principal's (its tenant field filled in), and its id if it has
        one (a dead letter the request gets before its renderer ran, such as an engine failure's)."""
        from compute.prompts import PARSE_LIMIT_FACTOR

        if len(body) > self.spec.source.max_message_bytes * PARSE_LIMIT_FACTOR:
            return body, None  # not parsed on the event loop: the renderer dead-letters it (oversized_message)
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            return body, None  # not JSON: the renderer dead-letters it (invalid_json), as in batch
        if not isinstance(event, dict):
            return body, None
        event_id = event.get(self.spec.prompt.id_field)
        event_id = event_id if isinstance(event_id, str) else None
        fixed = self._tenant_event(event, principal)
        return (body if fixed is event else json.dumps(fixed).encode()), event_id

    def _budget(self, max_tokens: int | None) -> int:
        spec_max = self.guards.max_tokens
        return min(max_tokens, spec_max) if max_tokens else spec_max

    def _audit_room(self) -> None:
        """Refuse a request whose audit rows would go past serve.audit_backlog_max_mb (before its
        budget is charged or its engine time spent); Retry-After: the next commit."""
        backlog = self.buffer.backlog_bytes()
        self._metrics.backlog(backlog)
        if self.buffer.full():
            raise _Refused(503, "audit_backlog_full",
                           f"this replica holds {backlog / 2**20:.1f} MiB of audit rows not in the tables yet "
                           f"(serve.audit_backlog_max_mb={self.spec.serve.audit_backlog_max_mb:g}); retry",
                           {"Retry-After": str(max(1, math.ceil(self.spec.sink.commit_interval_s)))})  # fmt: skip

    async def _admit(self, principal, tokens: int) -> None:
        if principal is None or self._limits is None:
            return
        try:
            if isinstance(self._limits, TenantLimits):
                self._limits.admit(principal.tenant, tokens)
            else:
                ref = self._limits.admit.remote(principal.tenant, tokens)
                try:
                    refused = await asyncio.wait_for(ref, LIMITER_TIMEOUT_S)
                except (asyncio.CancelledError, asyncio.TimeoutError) as e:
                    # The client left, or the limiter did not answer: what it may still reserve goes back.
                    asyncio.ensure_future(self._refund_if_admitted(ref, principal.tenant, tokens))
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    raise _Refused(503, "limits_unavailable", "the application's limiter is not answering; retry",
                                   {"Retry-After": "1"}) from None  # fmt: skip
                except RayActorError:
                    raise _Refused(503, "limits_unavailable", "the application's limiter is restarting; retry",
                                   {"Retry-After": "1"}) from None  # fmt: skip
                if refused is not None:
                    raise LimitExceededError(*refused)
        except LimitExceededError as e:
            raise _Refused(429, "rate_limited", str(e), {"Retry-After": str(max(1, round(e.retry_after_s + 0.5)))}) from None

    async def _refund_if_admitted(self, ref, tenant: str, tokens: int) -> None:
        """A request cancelled while the application's limiter admitted it: its tokens go back."""
        try:
            if await ref is None and tokens:
                self._limits.spend.remote(tenant, -tokens)
        except Exception as e:  # noqa: BLE001 - the limiter restarted meanwhile: nothing was kept
            log.debug("refund after a cancelled admission: %s", type(e).__name__)

    async def _kafka(self):
        """The replica's producer, made on first use off the event loop: kafka-python's producer
        connects in its constructor (up to 30 s with no broker), which on the loop held every other
        request of the replica, its health check and its audit writer for that long. One at a time."""
        if self._producer is None:
            from jobs.producer import EventProducer

            if self.spec.source.kafka is None:
                raise _Refused(404, "no_topic", f"job {self.spec.name!r} reads {self.spec.source.kind}, not Kafka")
            async with self._producer_lock:
                if self._producer is None:
                    try:
                        self._producer = await asyncio.to_thread(EventProducer.from_spec, self.spec)
                    except TidegateError as e:
                        raise _Refused(503, "kafka_unavailable", str(e)) from None
        return self._producer

    def _refusal(self, r: _Refused, route: str) -> JSONResponse:
        self._metrics.record(route, r.code, time.monotonic())
        return JSONResponse(_error(r.code, r.kind, str(r)), status_code=r.code, headers=r.headers)


# -- deployment ------------------------------------------------------------------------------------


def build_app(spec: JobSpec, engine_cls: type | None = None, master_key_file: str | None = None):
    """The Serve application of a spec: serve.* sizes the deployment (replicas, autoscaling,
    queue), pool.* the engine's resources unless serve.num_cpus / num_gpus say otherwise.
    `master_key_file`: where the replicas' nodes keep the master key, given to the replicas alone
    as <encryption.master_key_env>_FILE (as `tidegate submit --master-key-file` gives it to a job)."""
    from jobs.submit import job_env_vars

    key_env = job_env_vars(spec, master_key_file)  # SpecError for a spec that encrypts nothing
    s = spec.serve
    options: dict[str, Any] = dict(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={
            "num_cpus": s.num_cpus if s.num_cpus is not None else spec.pool.num_cpus,
            "num_gpus": s.num_gpus if s.num_gpus is not None else spec.pool.num_gpus,
        },
    )
    # The replica's engine (and its engine core's process) gets the node's cores, as batch engines do.
    threads = engine_threads(spec.pool.engine_threads, options["ray_actor_options"]["num_gpus"], s.max_replicas)
    env_vars = {**({"OMP_NUM_THREADS": threads} if threads else {}), **key_env}
    if env_vars:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env_vars}
    if s.min_replicas == s.max_replicas:
        options["num_replicas"] = s.min_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.target_ongoing_requests}  # fmt: skip
    return TidegateEndpoint.options(**options).bind(spec, engine_cls)


def ingress_env(spec: JobSpec) -> dict[str, str]:
    """Environment for the Ray processes `tidegate serve` starts (read by Serve when they start:
    a cluster's nodes have their own, cluster.yaml). haproxy: Ray Serve's HAProxy ingress in front
    of replicas that answer HTTP themselves, with Serve's throughput-optimized settings (user code
    on the replica's event loop, gRPC between Serve's processes): no Python proxy, no actor call
    per request (docs/performance.md measures it).

    A stopping replica behind HAProxy stays reachable for a deregistration window, then refuses
    connections (HAProxy retries them on another replica): Ray's default window, 30 s, is made for
    load balancers outside the cluster; this HAProxy is told at once, so 5 s unless the
    environment says otherwise (`tidegate serve` stops in seconds, not half a minute).

    Two local endpoints on one machine must not share ports either: see local_ingress_ports."""
    on = "1" if spec.serve.ingress == "haproxy" else "0"
    drain = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": on, "RAY_SERVE_THROUGHPUT_OPTIMIZED": on,
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": drain}  # fmt: skip
    if on == "1":
        env.update(local_ingress_ports(spec.serve.port))
    return env


# The ports of local Rays' Serve ingress: blocks below Linux's ephemeral range (32768 up) and above
# Ray's worker ports (10002-19999), one block per process that starts a local Ray (claim_port_block).
PORT_BLOCK_SIZE = 200
PORT_BLOCKS = range(20000, 30000, PORT_BLOCK_SIZE)
# The replicas' port ranges, [min, max) as Ray's controller reads them: set together or not at all.
_RANGE_PORTS = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": 0, "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": 96,
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": 100, "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": 196}  # fmt: skip
# One port each, from the block's tail (offsets 196-199).
_SINGLE_PORTS = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 196, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 197,
                 "RAY_SERVE_HAPROXY_STATS_PORT": 198, "RAY_SERVE_HAPROXY_METRICS_PORT": 199}  # fmt: skip
# (first port, the lock file's descriptor, the process that claimed it), for that process's life
_claimed_block: tuple[int, int, int] | None = None


def local_ingress_ports(avoid: int | None = None) -> dict[str, str]:
    """The ports one local Ray's Serve ingress (HAProxy) uses, none of them another local Ray's.
    Ray's defaults are the same for every Ray on a machine, and two local endpoints (two specs,
    a test beside another) would share them:

    - the fallback Serve proxy, HAProxy's backup server for an application none of whose
      replicas is up (one starting, or restarting), listens on 8500 (gRPC 9500), bound with
      SO_REUSEPORT: the second Ray's binds too, and the kernel splits connections between the two.
      A request to one endpoint could be answered, and audited, by the other spec's application
      (seen: a valid API key refused 401 by the other application's keyring).
    - the replicas' HTTP and gRPC ports come from 30000-31000 and 40000-41000, lowest first; each
      controller quarantines a released port from its own replicas only, so one endpoint's
      HAProxy could still send to a port the other's replica had just taken.
    - HAProxy's stats page and metrics (8404, 9101): the second HAProxy would not start.

    Each gets ports of a block no other process on the machine holds and that does not hold
    `avoid` (the spec's serve.port) (claim_port_block). Variables the environment names are kept;
    the four range bounds are named together or not at all (TidegateError)."""
    env = {var: os.environ[var] for var in (*_RANGE_PORTS, *_SINGLE_PORTS) if os.environ.get(var)}
    named = [var for var in _RANGE_PORTS if var in env]
    if 0 < len(named) < len(_RANGE_PORTS):  # Ray would take the rest from its shared defaults
        raise TidegateError(f"{', '.join(named)} set without {', '.join(v for v in _RANGE_PORTS if v not in env)}: "
                            "set the four replica port range bounds together, or none")  # fmt: skip
    own_range = not named
    if all(var in env for var in _SINGLE_PORTS) and not own_range:
        return env
    first = claim_port_block(avoid)
    for var, offset in (*(_RANGE_PORTS.items() if own_range else ()), *_SINGLE_PORTS.items()):
        env.setdefault(var, str(first + offset))
    return env


def _port_in_use(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on now, or None. Serve's Python proxy binds its port
    with SO_REUSEPORT, so a second local endpoint on the same port would not fail: the kernel would
    split the connections between the two applications. Checked without it, before Ray starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed endpoint's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as e:
            return os.strerror(e.errno) if e.errno else type(e).__name__
    return None


PORT_LOCKS = Path("/tmp/tidegate-serve-ports")  # machine-wide, as ports are (not $TMPDIR, which differs by user)


def claim_port_block(avoid: int | None = None) -> int:
    """The first port of a block of PORT_BLOCKS that no other process on this machine has claimed,
    none of whose ports is in use now, and that does not hold `avoid` (the spec's serve.port).
    The claim is an exclusive lock on a file in PORT_LOCKS, held until this process exits (a local
    Ray lives as long as the process that started it); later local Rays of the same process reuse
    the block. The folder is shared by every user, as /tmp is (sticky); a lock file another user
    made and this one cannot open is that user's block."""
    import fcntl
    import socket

    global _claimed_block
    if _claimed_block is not None and _claimed_block[2] != os.getpid():
        _claimed_block = None  # a forked child's: its parent's block, not one to start a second Ray on
    if _claimed_block is not None and (avoid is None or not 0 <= avoid - _claimed_block[0] < PORT_BLOCK_SIZE):
        return _claimed_block[0]
    try:
        PORT_LOCKS.mkdir(exist_ok=True)
        if PORT_LOCKS.stat().st_uid == os.getuid():
            PORT_LOCKS.chmod(0o1777)
    except OSError as e:
        raise TidegateError(f"cannot use {PORT_LOCKS} for the endpoint's port claims ({e.strerror})") from None

    def in_use(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return True
        return False

    for first in PORT_BLOCKS:
        if avoid is not None and 0 <= avoid - first < PORT_BLOCK_SIZE:
            continue
        try:  # read-only is enough for flock, and lets every user open a file one of them made
            fd = os.open(PORT_LOCKS / f"{first}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:  # another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process's block
            os.close(fd)
            continue
        if any(in_use(port) for port in range(first, first + PORT_BLOCK_SIZE)):
            os.close(fd)  # some other program's ports: not a block to share
            continue
        if _claimed_block is not None:
            os.close(_claimed_block[1])
        _claimed_block = (first, fd, os.getpid())
        return first
    raise TidegateError(f"no free block of {PORT_BLOCK_SIZE} ports in {PORT_BLOCKS.start}-{PORT_BLOCKS.stop - 1} "
                        "for this endpoint's Serve ingress; set " + ", ".join((*_RANGE_PORTS, *_SINGLE_PORTS)))  # fmt: skip


def deploy(spec: JobSpec, engine_cls: type | None = None, blocking: bool = False,
           master_key_file: str | None = None) -> str:  # fmt: skip
    """serve.run the spec's application on the Ray this process is connected to; returns its URL."""
    serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
    serve.run(build_app(spec, engine_cls, master_key_file), name=spec.name, route_prefix=spec.serve.route_prefix,
              blocking=False)  # fmt: skip
    host = "127.0.0.1" if spec.serve.host in ("0.0.0.0", "::") else spec.serve.host
    return f"http://{host}:{spec.serve.port}{spec.serve.route_prefix.rstrip('/')}"


def main(spec_path: str, address: str | None, blocking: bool, master_key_file: str | None = None) -> int:
    """`tidegate serve SPEC`: deploy; with a local Ray (no --address) or --blocking, serve until
    SIGINT/SIGTERM, then delete the application."""
    import ray

    from actors.remote import delete_app_actors
    from jobs.run import configure_logging, init_ray, load_job_spec
    from jobs.submit import job_env_vars
    from schemas.trusted_code import refuse_untrusted

    configure_logging()
    try:
        spec = load_job_spec(spec_path)
        job_env_vars(spec, master_key_file)  # a --master-key-file the spec has no use for fails here
        refuse_untrusted(spec.code_refs(), spec.allowed_modules)  # before anything is deployed
    except TidegateError as e:
        print(f"error: {e}")
        return 2
    remote = bool(address or spec.ray.address or os.environ.get("RAY_ADDRESS"))
    if not remote:  # a cluster's Serve runs with its nodes' environment (cluster.yaml)
        busy = _port_in_use(spec.serve.host, spec.serve.port)
        if busy:
            print(f"error: serve.port {spec.serve.port} on {spec.serve.host} cannot be listened on ({busy}); "
                  "in use: another endpoint, or another program")  # fmt: skip
            return 2
        try:
            os.environ.update(ingress_env(spec))
        except TidegateError as e:
            print(f"error: {e}")
            return 2
    init_ray(spec, address)
    # Ours right after ray.init (a local Ray installs its own SIGTERM handler, which exits at once):
    # the replica may answer before serve.run returns, so a SIGTERM can come while we deploy.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = deploy(spec, master_key_file=master_key_file)
    print(f"tidegate serve: {spec.name} at {url} (OpenAI base URL {url}/v1)", flush=True)
    if remote and not blocking:
        return 0
    stop.wait()
    print(f"tidegate serve: stopping {spec.name}", flush=True)
    serve.delete(spec.name)
    delete_app_actors(spec.name)
    if not remote:
        serve.shutdown()
        ray.shutdown()
    return 0
