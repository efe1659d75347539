"""The batch stages' code, one request at a time: what the online endpoint runs (jobs/serve.py).

    OnlineGuards(spec, run_id, engine, lineage, encryption)
      event_source(event bytes, route, position)        -> SOURCE_SCHEMA row (the request as a source record)
      chat_request(body bytes, prompt, messages, ...)   -> (SOURCE_SCHEMA row, REQUEST_SCHEMA row + messages)
      await run(src, requests=None)                     -> Outcome

`run` is the batch path for one source row: render (compute/prompts.py, with the event contract
when source.event_schema is set), generate (`engine.complete`, compute/engine.py: concurrent requests
share the engine's running set), validate and assemble (compute/assemble.py), and the retries the
rules ask for, inside the request, until no row waits for one. It returns the plain rows: the
result row, or the dead-letter row with its reason; encryption happens where they are stored
(the audit log), as in batch.

A request's position is (source_topic "serve:<route>", source_partition 0, source_offset =
its request number, a 63-bit integer from the request id or the Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from compute.assemble import BatchAssembler
from compute.event_contract import EventContract
from compute.prompts import PromptRenderer
from compute.validation import Validator
from crypto.stage import EncryptionStage
from schemas.records import REQUEST_SCHEMA, RESULTS_SCHEMA, SOURCE_SCHEMA, empty_table
from schemas.spec import JobSpec


def request_offset(*parts: str) -> int:
    """The request's position in the audit tables: a 63-bit number from its id parts (tenant and
    Idempotency-Key, or a fresh request id), so a retried request finds its first answer by it."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class Outcome:
    """The plain rows of one request: results (0 or 1 row) and dead letters (0 or 1 row), and the
    tokens its generations used: every attempt's prompt and completion, a rejected one's too."""

    results: pa.Table
    dead: pa.Table
    used_tokens: int = 0

    def tokens(self) -> int:
        return self.used_tokens


def _tokens_of(completions: pa.Table) -> int:
    return sum(pc.sum(completions.column(c)).as_py() or 0 for c in ("prompt_tokens", "completion_tokens"))


class OnlineGuards:
    def __init__(self, spec: JobSpec, run_id: str, engine, lineage: dict, encryption: EncryptionStage):
        self.spec = spec
        self.run_id = run_id
        self.engine = engine
        # An online request's completion budget is at most this (sampling.max_tokens): admission
        # reserved tokens for it, whatever an event's prompt.max_tokens_field asks.
        self.max_tokens = int(spec.sampling.get("max_tokens") or 16)
        self.encryption = encryption
        self.results_schema = encryption.plain_results_schema(RESULTS_SCHEMA)
        contract = EventContract(spec) if spec.source.event_schema is not None else None
        # Online events are JSON bodies whatever the Kafka topic's format is.
        self.renderer = PromptRenderer(spec.prompt, spec.source.max_message_bytes, run_id, spec.encryption,
                                       encryption.has_key, contract=contract)  # fmt: skip
        self.validator = Validator(spec)
        self.assembler = BatchAssembler(spec, self.validator, self.results_schema, run_id, lineage)
        # With rules that can block (custom: trusted code; semantic_grounding: an embedding model)
        # the guards' CPU work (render, rules, assembly) runs on a thread of its own,
        # one call at a time as the batch path's stage worker runs it. On the event loop such a
        # rule held every other request of the replica, and one that never returned hung them all
        # past serve.request_timeout_s, health checks included. The built-in rules are linear (the
        # regex rule's patterns run with a timeout) and stay on the loop: the thread costs a
        # request ~400 µs of CPU (bench/online_request.py, docs/performance.md).
        blocking = any(getattr(r, "rule", None) in ("custom", "semantic_grounding") for r in spec.rules)
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-guards") if blocking else None
        self._busy_since: float | None = None

    async def _on_cpu(self, fn, *args):
        if self._cpu is None:
            return fn(*args)

        def timed():
            self._busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._busy_since = None

        return await asyncio.get_running_loop().run_in_executor(self._cpu, timed)

    def busy_for(self) -> float:
        """Seconds the guards' current call has run (0: idle): a replica's health check."""
        since = self._busy_since
        return time.monotonic() - since if since is not None else 0.0

    def _render(self, src: pa.Table):
        self.encryption.refresh()
        return self.renderer.render(src)

    def semantic_rules(self) -> list:
        return self.validator.semantic_rules()

    @staticmethod
    def event_source(value: bytes, route: str, offset: int) -> pa.Table:
        """One SOURCE_SCHEMA row holding the request's bytes."""
        return pa.table(
            {
                "topic": [f"serve:{route}"], "partition": [0], "offset": [offset], "key": [None], "value": [value],
                "timestamp_ms": [int(time.time() * 1000)], "received_ns": [time.monotonic_ns()], "source_change": [None],
            },
            schema=SOURCE_SCHEMA,
        )  # fmt: skip

    def chat_request(self, body: bytes, route: str, offset: int, request_id: str, prompt: str,
                     messages: list[dict] | None, tenant: str | None, max_tokens: int | None) -> tuple[pa.Table, pa.Table]:  # fmt: skip
        """An OpenAI-style request as a source row (its body, for a dead letter's `raw`) and a
        request row: `prompt` is the text the rules and a repair prompt see, `messages` (JSON) what
        the engine's chat template renders on the first attempt."""
        src = self.event_source(body, route, offset)
        req = pa.table(
            {
                "id": [request_id], "prompt": [prompt], "source_topic": [f"serve:{route}"], "source_partition": [0],
                "source_offset": [offset], "received_ns": src.column("received_ns"), "attempt": [1],
                "first_prompt": [None], "context": [None], "tenant": [tenant], "max_tokens": [max_tokens],
            },
            schema=REQUEST_SCHEMA,
        )  # fmt: skip
        if messages is not None:
            req = req.append_column("messages", pa.array([json.dumps(messages)], pa.string()))
        return src, req

    async def run(self, src: pa.Table, requests: pa.Table | None = None) -> Outcome:
        carried: dict = {}
        if requests is None:
            rendered = await self._on_cpu(self._render, src)
            if rendered.dead.num_rows:
                return Outcome(empty_table(self.results_schema), rendered.dead)
            requests, carried = rendered.requests, rendered.carried or {}
            if self.spec.prompt.max_tokens_field is not None:  # an event's own budget: at most the spec's
                i = requests.schema.get_field_index("max_tokens")
                capped = pc.min_element_wise(requests.column(i), pa.scalar(self.max_tokens, pa.int32()), skip_nulls=False)
                requests = requests.set_column(i, requests.schema.field(i), capped)
        results, dead = [], []
        used = 0
        while requests is not None and requests.num_rows:
            completions = await self.engine.complete(requests)
            used += _tokens_of(completions)
            a = await self._on_cpu(self.assembler.assemble, src, requests, completions, carried)
            results.append(a.output.results)
            dead.append(a.output.dead)
            requests = a.retries if a.retries is not None and a.retries.num_rows else None
        if len(results) == 1:  # no retry: the tables as they are
            return Outcome(results[0], dead[0], used)
        return Outcome(pa.concat_tables(results), pa.concat_tables(dead), used)

    def pii_rules(self) -> set[str]:
        """Labels of the rules that look for personal data: a rejection they caused answers
        without the output text."""
        return {r.label for r in self.spec.rules if getattr(r, "rule", None) == "pii_leakage"}
