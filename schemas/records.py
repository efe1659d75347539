"""Arrow schemas of the data that moves between stages, and of the output tables.

Data flows as Arrow record batches:

    SOURCE_SCHEMA      one row per source record, as read      (connectors.kafka|delta_source -> compute.prompts)
                       (Delta rows: topic = table URI, partition = table version, offset = row ordinal
                       within that version's rows, value = the row as JSON)
    REQUEST_SCHEMA     one row per rendered prompt             (compute.prompts   -> compute.engine)
    COMPLETION_SCHEMA  one row per request, output or error    (compute.engine    -> jobs.pipeline)
    RESULTS_SCHEMA     the results Delta table                 (jobs.pipeline    -> connectors.delta)
    DEAD_LETTER_SCHEMA the dead-letter Delta table             (every stage      -> connectors.delta)
    AUDIT_RESULTS_SCHEMA, AUDIT_DEAD_LETTER_SCHEMA  the same tables as the online endpoint writes
                       them: plus AUDIT_COLUMNS              (jobs.serve        -> connectors.audit)

The column names of RESULTS_SCHEMA and DEAD_LETTER_SCHEMA are a public contract.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

# One entry per rule the output was checked against (compute.rules.RuleResult).
RULE_RESULTS_TYPE = pa.list_(
    pa.struct(
        [
            ("rule", pa.string()),
            ("passed", pa.bool_()),
            ("score", pa.float64()),  # null for pass/fail rules; e.g. the groundedness in [0, 1]
            ("message", pa.string()),
        ]
    )
)

SOURCE_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("timestamp_ms", pa.int64()),
        ("received_ns", pa.int64()),  # monotonic clock when the job read it, for latency_ms
        ("source_change", pa.string()),  # null, "update"/"delete": a change reported, not processed; or UNREADABLE
    ]
)
# source_change of a Kafka record the client could not read (no key, no value): dead-lettered at the
# source stage, with what made it unreadable (connectors/kafka.py KafkaSource._skip_unreadable).
UNREADABLE = {
    "unreadable": "the Kafka client could not read this record (a header name that is not UTF-8, or a failed "
                  "CRC); its bytes are not stored here: read them by topic, partition and offset",
    "unreadable_batch": "the Kafka client could not read this record: an unreadable record before it in the "
                        "same producer batch stops the client there; read it by topic, partition and offset",
}  # fmt: skip

REQUEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("received_ns", pa.int64()),
        ("attempt", pa.int32()),  # 1 for the first generation, n for the (n-1)th retry
        ("first_prompt", pa.string()),  # null on attempt 1; the original prompt on retries
        ("context", pa.list_(pa.string())),  # context documents (prompt.context_field), or null
        ("tenant", pa.string()),  # encryption: whose key protects the row's values (null: no encryption)
        ("max_tokens", pa.int32()),  # prompt.max_tokens_field: this row's budget (null: sampling.max_tokens)
    ]
)

COMPLETION_SCHEMA = pa.schema(
    [
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("output_text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("error_stage", pa.string()),  # null when the row succeeded
        ("error_class", pa.string()),
        ("error", pa.string()),
    ]
)

RESULTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # "ok" | "flagged" (a rule with on_fail: flag failed)
        ("output_text", pa.string()),  # after any `fix` repairs
        ("output_json", pa.string()),  # the validated object as JSON when output.schema is set, else null
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_ms", pa.float64()),  # from the job reading the event to its completion
        ("attempts", pa.int32()),  # generations it took (retries after failed rules + 1)
        ("rule_results", RULE_RESULTS_TYPE),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("run_id", pa.string()),
        ("processed_at", TIMESTAMP),
        ("tenant", pa.string()),  # encryption: the tenant whose key encrypted the row's values
        # Lineage (compute/lineage.py): what produced the row.
        ("model_path", pa.string()),
        ("model_revision", pa.string()),  # sha256 of the model's config, tokenizer and weights files
        ("prompt_template_hash", pa.string()),
        ("sampling_params", pa.string()),  # canonical JSON of the spec's sampling section
        ("spec_hash", pa.string()),  # of the whole spec, secrets excluded
    ]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # null when the id could not be read
        ("stage", pa.string()),  # source | decode | prompt | engine | validate
        ("error_class", pa.string()),  # machine-readable reason, e.g. invalid_json, validation_failed
        ("error", pa.string()),  # human-readable reason
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("raw", pa.binary()),  # the original message bytes
        ("run_id", pa.string()),
        ("failed_at", TIMESTAMP),
        ("output_text", pa.string()),  # stage validate: the rejected output
        ("attempts", pa.int32()),  # stage validate: generations tried
        ("rule_results", RULE_RESULTS_TYPE),  # stage validate: every rule's result
        ("tenant", pa.string()),  # encryption: the tenant whose key encrypted `raw` / output_text
        ("replayed_by", pa.string()),  # `tidegate dlq replay`: the replay that took this row (its run_id)
        ("replayed_at", TIMESTAMP),  # ... and when that replay was committed (null while in progress)
    ]
)


# Columns only the online endpoint's audit writes (jobs/serve.py), after the shared ones: a batch
# job's rows read them as null (connectors/delta.py fills a nullable column a writer does not
# write), and a table gets them the first time an endpoint writes to it.
AUDIT_COLUMNS = [
    # A request sent with an Idempotency-Key: a keyed hash of its body (compute/idempotency.py
    # request_fingerprint), so the key sent again with another body is refused, not answered with
    # the first body's answer. Null without a key (and in rows written before stop 47).
    ("request_fingerprint", pa.string()),
]
# Audit columns stored only encrypted, under the row's tenant key (crypto/stage.py): binary in
# every table, null where the spec has no keys. A body's hash, keyed by what the client sends,
# would let whoever guesses the key confirm a guessed body.
SEALED_AUDIT_COLUMNS = frozenset({"request_fingerprint"})
AUDIT_RESULTS_SCHEMA = pa.schema([*RESULTS_SCHEMA, *(pa.field(n, t) for n, t in AUDIT_COLUMNS)])
AUDIT_DEAD_LETTER_SCHEMA = pa.schema([*DEAD_LETTER_SCHEMA, *(pa.field(n, t) for n, t in AUDIT_COLUMNS)])


_EMPTY_TABLES: list[tuple[pa.Schema, pa.Table]] = []


def empty_table(schema: pa.Schema) -> pa.Table:
    """`schema.empty_table()`, built once per schema: building one costs ~150 µs for these schemas,
    and the online path needs one or two per request (a request without a dead letter)."""
    for known, table in _EMPTY_TABLES:
        if known is schema or known.equals(schema, check_metadata=True):
            return table
    table = schema.empty_table()
    if len(_EMPTY_TABLES) < 64:  # a process uses a handful of schemas
        _EMPTY_TABLES.append((schema, table))
    return table


def with_columns_of(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """`rows` with exactly the columns of `schema`, in its order (the missing ones null)."""
    if rows.schema.equals(schema, check_metadata=True):  # the usual case: nothing to add or move
        return rows
    n, have = rows.num_rows, set(rows.column_names)
    return pa.table({f.name: rows.column(f.name) if f.name in have else pa.nulls(n, f.type) for f in schema}, schema=schema)


# Columns whose Parquet and Delta-log statistics (min/max) are kept: positions, times, counts,
# labels. Free text, ids, raw bytes and encrypted columns get none, so no prefix of a value is
# copied into file footers or the _delta_log (read by catalogs and tools that never see the data).
STATS_SAFE_COLUMNS = frozenset(
    """status finish_reason model prompt_tokens completion_tokens latency_ms attempts source_topic
    source_partition source_offset run_id processed_at processed_date tenant model_path model_revision
    prompt_template_hash spec_hash stage error_class failed_at replayed_by replayed_at""".split()
)
# sink.partition_by may name these (processed_date is derived from processed_at, UTC).
PARTITION_COLUMNS = ("processed_date", "tenant", "status", "model", "source_topic")
