"""The per-row CPU stages as Ray actors, so the engines never wait on the job loop.

    StageWorker (spec.stages.actors of them)
      render(src, skip)                      SOURCE_SCHEMA -> (counts, requests, BatchOutput, carried)
      assemble(config, src, requests,        -> (counts, BatchOutput, retries or None)
               completions, carried)            config: lineage columns + embedders, one stored object
    StagePool (in the driver)                calls go to the least busy worker; (tag, counts, refs) come back

Every call has several returns (Ray's num_returns): small counts the driver reads (rows, rule
failures, retries) and the tables, which stay in the object store as refs that the driver only
passes on (to the engines, to assemble, to the commit writer). The driver never reads a table.

The commit writer (encryption and the commits) is actors/writer.py.

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
calls re-run on its restarted self (max_task_retries).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.remote import actor_error, cause, kill, on_driver_node, wait_started
from actors.writer import job_schemas
from compute.assemble import Assembled, BatchAssembler, BatchOutput
from compute.event_contract import EventContract
from compute.event_formats import event_decoder
from compute.prompts import PromptRenderer, RenderedBatch
from compute.validation import Validator
from connectors.schema_registry import open_registry
from crypto.stage import EncryptionStage
from schemas.errors import StageError
from schemas.spec import JobSpec

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


def job_renderer(spec: JobSpec, run_id: str, encryption: EncryptionStage) -> PromptRenderer:
    """The job's decode + render stage: its message format (JSON, Avro, the Confluent wire format
    with the spec's schema registry) and, with source.event_schema, its event contract."""
    decoder = event_decoder(spec.source.kafka, open_registry)
    contract = EventContract(spec) if spec.source.event_schema is not None else None
    return PromptRenderer(spec.prompt, spec.source.max_message_bytes, run_id, spec.encryption, encryption.has_key,
                          decoder=decoder, contract=contract)  # fmt: skip


class StageWorker:
    """Decode + render and validate + assemble for one job. A plain class: Ray runs it as an actor."""

    def __init__(self, spec: JobSpec, run_id: str):
        self.spec = spec
        self.run_id = run_id
        self.encryption = EncryptionStage(spec.encryption, spec.sink.results, spec.sink.dead_letter)
        self.results_schema = job_schemas(self.encryption)[0]
        self.renderer = job_renderer(spec, run_id, self.encryption)
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

    def render(self, src: pa.Table, skip: dict[TopicPartition, set[int]]) -> tuple[dict, pa.Table, BatchOutput, dict]:
        def done(topic: str, partition: int, offset: int) -> bool:
            offsets = skip.get((topic, partition))
            return bool(offsets) and offset in offsets

        self.encryption.refresh()  # tenants whose key was revoked or added since the last batch
        r: RenderedBatch = self.renderer.render(src, skip=done if skip else None)
        counts = {"requests": r.requests.num_rows, "dead": r.dead.num_rows}
        return counts, r.requests, BatchOutput(self.results_schema.empty_table(), r.dead), r.carried or {}

    def assemble(
        self, config: dict, src: pa.Table, requests: pa.Table, completions: pa.Table, carried: dict
    ) -> tuple[dict, BatchOutput, pa.Table | None]:
        a: Assembled = self._configure(config).assemble(src, requests, completions, carried)
        retries = a.retries if a.retries is not None and a.retries.num_rows else None
        counts = {"rule_failures": a.rule_failures, "retries": 0 if retries is None else retries.num_rows}
        return counts, a.output, retries


class StagePool:
    """spec.stages.actors StageWorkers; calls go to the least busy one, results come back tagged."""

    def __init__(self, spec: JobSpec, run_id: str):
        self.spec = spec
        self.run_id = run_id
        self.workers: list[Any] = []
        self._load: list[int] = []
        self._pending: dict[ray.ObjectRef, tuple[int, Any, list]] = {}
        self._methods: dict[tuple[int, str], Any] = {}
        self._config: ray.ObjectRef | None = None
        self.pids: list[int] = []

    def start(self) -> None:
        """Start the workers (they load while the engines do; configure() waits for them)."""
        # Pure calls: a worker that dies is restarted and the calls it held run again.
        options = on_driver_node(self.spec, max_restarts=-1, max_task_retries=3)
        self.workers = [
            ray.remote(StageWorker).options(**options).remote(self.spec, self.run_id) for _ in range(self.spec.stages.actors)
        ]
        self._load = [0] * len(self.workers)

    def configure(self, lineage: dict, embedders: dict) -> None:
        """Wait for the workers; lineage and embedders go with every assemble call from now on."""
        self._config = ray.put({"lineage": lineage, "embedders": embedders})
        self.pids = wait_started([w.ping.remote() for w in self.workers], self.spec, f"{len(self.workers)} stage worker(s)")

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def waitable(self) -> list:
        return list(self._pending)

    def render(self, src: Any, skip: dict, tag: Any) -> None:
        """src: the SOURCE_SCHEMA table's ref. Comes back as (tag, counts, [requests, output, carried])."""
        self._call("render", 4, tag, src, skip)

    def assemble(self, src: Any, requests: Any, completions: Any, carried: Any, tag: Any) -> None:
        """Refs in; comes back as (tag, counts, [output, retries])."""
        self._call("assemble", 3, tag, self._config, src, requests, completions, carried)

    def _call(self, method: str, returns: int, tag: Any, *args) -> None:
        i = min(range(len(self.workers)), key=self._load.__getitem__)
        key = (i, method)
        handle = self._methods.get(key)
        if handle is None:  # made once: Ray's options() costs the driver ~0.1 ms a call
            handle = self._methods[key] = getattr(self.workers[i], method).options(num_returns=returns)
        counts, *refs = handle.remote(*args)
        self._load[i] += 1
        self._pending[counts] = (i, tag, refs)

    def collect(self, timeout_s: float, ready: set | None = None) -> list[tuple[Any, dict, list]]:
        """(tag, counts, refs) of the calls that finished, waiting up to timeout_s for them (or
        those among `ready`, refs a shared wait found ready)."""
        if not self._pending:
            return []
        if ready is None:
            done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout_s)
        else:
            done = [ref for ref in self._pending if ref in ready]
        out = []
        for ref in done:
            i, tag, refs = self._pending.pop(ref)
            self._load[i] -= 1
            try:
                out.append((tag, ray.get(ref), refs))
            except RayTaskError as e:  # first: it may wrap a RayActorError of another actor (embedding)
                raise cause(e) from None  # a bug in a stage (or a custom rule): the job fails, loudly
            except RayActorError as e:
                raise StageError(f"a stage worker died repeatedly: {actor_error(e)}") from None
        return out

    def drop_pending(self) -> None:
        """Forget calls in flight (after a fence): what they return is never looked at."""
        self._pending.clear()
        self._load = [0] * len(self.workers)

    def shutdown(self) -> None:
        for w in self.workers:
            kill(w)
        self.workers, self._pending = [], {}
