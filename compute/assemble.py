"""Join a batch's requests with their completions and validate them (pure, no Ray).

    in : src          SOURCE_SCHEMA rows of the source batch (for the raw events of dead letters)
         requests     REQUEST_SCHEMA rows sent to the engine (first generation or a retry)
         completions  COMPLETION_SCHEMA rows, same length and order (output, or a per-row error)
         carried      encryption.input_fields per (partition, offset), plain text
    out: Assembled
         output.results  the plain results schema: kept rows (status ok|flagged, rule_results, lineage)
         output.dead     DEAD_LETTER_SCHEMA rows: engine errors (stage from the completion) and
                         rows the rules rejected (stage validate, error_class validation_failed)
         retries         REQUEST_SCHEMA rows a rule sent back (repair prompt, attempt + 1), or None
         rule_failures   failed rule name -> count (for stats and metrics)

Run by the stage workers (actors/stages.py); the job loop only counts and routes what comes back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from crypto.pii_tokens import protect_pii
from crypto.stage import ECHO_MIN_CHARS, input_column
from compute.lineage import LINEAGE_COLUMNS
from compute.prompts import dead_letter_table
from compute.validation import Validator
from schemas.records import RESULTS_SCHEMA
from schemas.spec import JobSpec


@dataclass
class BatchOutput:
    results: pa.Table
    dead: pa.Table
    consumed: int = 0  # source rows the batch covers (for the in-flight bound)


@dataclass
class Assembled:
    output: BatchOutput
    retries: pa.Table | None
    rule_failures: dict[str, int] = field(default_factory=dict)


class BatchAssembler:
    """The validate-and-join stage of one job (its spec, run id and lineage columns)."""

    def __init__(self, spec: JobSpec, validator: Validator, results_schema: pa.Schema, run_id: str, lineage: dict):
        self.spec = spec
        self.validator = validator
        self.results_schema = results_schema
        self.run_id = run_id
        self.lineage = lineage
        # The columns every row of the job has the same value in, as Arrow scalars once.
        self._constants = {"model": pa.scalar(spec.model.label, pa.string()), "run_id": pa.scalar(run_id, pa.string()),
                           **{name: pa.scalar(lineage.get(name), pa.string()) for name in LINEAGE_COLUMNS}}  # fmt: skip

    def assemble(self, src: pa.Table, req: pa.Table, completions: pa.Table, carried: dict | None = None) -> Assembled:
        errors = completions.column("error_stage")
        failed = None  # rows the engine failed (a mask), when there are any
        if errors.null_count == completions.num_rows:  # the usual batch: no engine error
            ok_req, ok_comp = req, completions
        else:
            failed = errors.is_valid()
            ok_mask = pc.invert(failed)
            ok_req, ok_comp = req.filter(ok_mask), completions.filter(ok_mask)
        verdicts = self.validator.validate(ok_req, ok_comp)
        keep = [a == "keep" for a in verdicts.action]
        all_kept = all(keep)
        if all_kept:  # the usual batch: nothing to filter
            keep_req, keep_comp = ok_req, ok_comp
        else:
            keep_mask = pa.array(keep, pa.bool_())
            keep_req, keep_comp = ok_req.filter(keep_mask), ok_comp.filter(keep_mask)
        n = keep_req.num_rows
        # received_ns is the driver's monotonic clock: the stage workers run on the driver's node,
        # where CLOCK_MONOTONIC is one clock for every process.
        now_ns = time.monotonic_ns()
        latency_ms = pc.divide(pc.subtract(pa.scalar(now_ns, pa.int64()), keep_req.column("received_ns")), 1e6)  # float64
        results = pa.table(
            {
                "id": keep_req.column("id"),
                "status": pa.array(_kept(verdicts.status, keep, all_kept), pa.string()),
                "output_text": pa.array(_kept(verdicts.output_text, keep, all_kept), pa.string()),
                "output_json": pa.array(_kept(verdicts.output_json, keep, all_kept), pa.string()),
                "finish_reason": keep_comp.column("finish_reason"),
                "model": pa.repeat(self._constants["model"], n),
                "prompt_tokens": keep_comp.column("prompt_tokens"),
                "completion_tokens": keep_comp.column("completion_tokens"),
                "latency_ms": latency_ms,
                "attempts": keep_req.column("attempt"),
                "rule_results": verdicts.rule_results_array(None if all_kept else keep),
                "source_topic": keep_req.column("source_topic"),
                "source_partition": keep_req.column("source_partition"),
                "source_offset": keep_req.column("source_offset"),
                "run_id": pa.repeat(self._constants["run_id"], n),
                "processed_at": pa.repeat(pa.scalar(datetime.now(timezone.utc), RESULTS_SCHEMA.field("processed_at").type), n),
                **{name: pa.repeat(self._constants[name], n) for name in LINEAGE_COLUMNS},
                "tenant": keep_req.column("tenant"),
                **self._carried_columns(keep_req, carried or {}),
            },
            schema=self.results_schema,
        )
        rule_failures = verdicts.failures
        rows = []
        if n < req.num_rows:
            raw_by_pos = {
                (p, o): v
                for p, o, v in zip(
                    src.column("partition").to_pylist(), src.column("offset").to_pylist(), src.column("value").to_pylist()
                )
            }
            engine_failed = zip(req.filter(failed).to_pylist(), completions.filter(failed).to_pylist()) if failed is not None else ()
            for r, c in engine_failed:
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
                        output_text=self._without_echoes(verdicts.output_text[i], r, carried),
                        attempts=r["attempt"],
                        rule_results=verdicts.rule_results[i].as_py(),
                        tenant=r["tenant"],
                    )
                )
        dead = dead_letter_table(rows, self.run_id)
        return Assembled(BatchOutput(results, dead), verdicts.retries, dict(rule_failures))

    def _without_echoes(self, text: str | None, req_row: dict, carried: dict | None) -> str | None:
        """A rejected output as the dead-letter table keeps it: the row's carried input values it
        repeats redacted ("[REDACTED:echo]"; encryption.protect_echoes). A dead letter carries no
        input columns, so the values are not kept to encrypt them with; the writer then protects
        the text's PII as it does for results."""
        enc = self.spec.encryption
        if not text or not (enc.enabled and enc.protect_echoes and enc.input_fields):
            return text
        values = (carried or {}).get((req_row["source_partition"], req_row["source_offset"]), {})
        needles = [v for v in values.values() if v and len(v) >= ECHO_MIN_CHARS]
        if not needles:
            return text
        return protect_pii(pa.array([text]), None, lambda _: (), "redact", table="dead_letter", column="output_text",
                           echoes=[needles])[0].as_py()  # fmt: skip

    def _carried_columns(self, req: pa.Table, carried: dict) -> dict[str, pa.Array]:
        fields = self.spec.encryption.input_fields
        if not fields:
            return {}
        keys = list(zip(req.column("source_partition").to_pylist(), req.column("source_offset").to_pylist()))
        return {
            input_column(f.name): pa.array([carried.get(k, {}).get(f.name) for k in keys], pa.string()) for f in fields
        }


def _kept(values: list, keep: list[bool], all_kept: bool) -> list:
    return values if all_kept else [v for v, k in zip(values, keep) if k]
