"""Decode Kafka records into events and render their prompts (pure logic, no Ray, no I/O).

    in : SOURCE_SCHEMA table (topic, partition, offset, key, value, ...)
    out: RenderedBatch(requests: REQUEST_SCHEMA table, dead: DEAD_LETTER_SCHEMA table)

Every input row ends up in exactly one of the two outputs (or is skipped because an earlier run
already dead-lettered it, see docs/exactly-once.md). Event fields are passed to the template as
variables; event data is never itself compiled as a template. Error messages name fields and
positions, never event values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
from jinja2 import StrictUndefined, TemplateError, UndefinedError, meta
from jinja2.runtime import new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compute.event_contract import EventContract
from compute.event_formats import DecodeError
from schemas.records import DEAD_LETTER_SCHEMA, REQUEST_SCHEMA, UNREADABLE, empty_table
from schemas.spec import PromptSpec


_JSON = json.JSONDecoder()
PARSE_LIMIT_FACTOR = 16  # messages up to 16x max_message_bytes are parsed for their tenant and id


@dataclass
class RenderedBatch:
    requests: pa.Table
    dead: pa.Table
    carried: dict = None  # encryption.input_fields: (partition, offset) -> {field: text}, plain text


class BadEvent(Exception):
    def __init__(self, stage: str, error_class: str, message: str, event_id: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.error_class = error_class
        self.event_id = event_id


def event_id_of(event: dict, field: str) -> str:
    """The event's id as the job keys its row: a string or an integer, stripped, not empty (else
    BadEvent: missing_id or invalid_id). The producer checks events with it too (jobs/producer.py)."""
    if field not in event or event[field] is None:
        raise BadEvent("decode", "missing_id", f"id field {field!r} is missing")
    raw_id = event[field]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise BadEvent("decode", "invalid_id", f"id field {field!r} is {_json_kind(raw_id)}, expected a string")
    event_id = str(raw_id).strip()
    if not event_id:
        raise BadEvent("decode", "missing_id", f"id field {field!r} is empty")
    return event_id


def dead_letter_table(rows: list[dict], run_id: str) -> pa.Table:
    """Build a DEAD_LETTER_SCHEMA table from dicts holding the per-row columns."""
    if not rows:  # most batches, and nearly every online request: no dead letter to build
        return empty_table(DEAD_LETTER_SCHEMA)
    now = datetime.now(timezone.utc)
    cols = {name: [] for name in DEAD_LETTER_SCHEMA.names}
    for r in rows:
        for name in DEAD_LETTER_SCHEMA.names:
            cols[name].append(r.get(name))
    cols["run_id"] = [run_id] * len(rows)
    cols["failed_at"] = [now] * len(rows)
    return pa.table(cols, schema=DEAD_LETTER_SCHEMA)


class PromptRenderer:
    def __init__(self, spec: PromptSpec, max_message_bytes: int, run_id: str, encryption=None, has_key=None,
                 decoder: Callable[[bytes], object] | None = None, contract: EventContract | None = None):  # fmt: skip
        """decoder: bytes -> event for non-JSON formats (compute/event_formats.py; None: JSON);
        contract: checked on every event when the spec declares source.event_schema."""
        self.spec = spec
        self.decoder = decoder
        self.contract = contract if contract is not None and contract.enforced else None
        self.encryption = encryption if encryption is not None and encryption.enabled else None
        self.has_key = has_key or (lambda tenant: True)
        self.max_message_bytes = max_message_bytes
        self.run_id = run_id
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.template = env.from_string(spec.template)
        self._env = env
        self._globals = dict(self.template.globals)
        self.variables = sorted(meta.find_undeclared_variables(env.parse(spec.template)))
        # Field names the spec declares: messages may name these (other keys of an event may be data).
        enc = self.encryption
        self.known_fields = frozenset(
            [*self.variables, spec.id_field, spec.context_field, spec.max_tokens_field,
             *((enc.tenant_field, *(f.name for f in enc.input_fields)) if enc is not None else ())]
        ) - {None}  # fmt: skip

    def required_fields(self) -> dict[str, str]:
        """Event fields every event needs: field -> why (for schema checks of table sources)."""
        need = {self.spec.id_field: "prompt.id_field"}
        for var in self.variables:
            need.setdefault(var, "used by prompt.template")
        if self.spec.context_field:
            need.setdefault(self.spec.context_field, "prompt.context_field")
        return need

    def context(self, event_id: str, event: dict) -> list[str] | None:
        """The event's context documents: prompt.context_field as a string or a list of strings
        (or of objects with a "text" field). None when the spec has no context_field."""
        name = self.spec.context_field
        if not name:
            return None
        value = event.get(name)
        if value is None:
            raise BadEvent("prompt", "missing_context", f"context field {name!r} is missing", event_id)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            docs = []
            for i, d in enumerate(value):
                if isinstance(d, dict) and isinstance(d.get("text"), str):
                    d = d["text"]
                if not isinstance(d, str):
                    raise BadEvent("prompt", "invalid_context",
                                   f"context field {name!r}[{i}] is {_json_kind(d)}, expected a string", event_id)  # fmt: skip
                docs.append(d)
            return docs
        raise BadEvent("prompt", "invalid_context",
                       f"context field {name!r} is {_json_kind(value)}, expected a string or a list", event_id)  # fmt: skip

    def max_tokens(self, event_id: str, event: dict) -> int | None:
        """The row's completion budget (prompt.max_tokens_field), None for the job's."""
        name = self.spec.max_tokens_field
        if not name or event.get(name) is None:
            return None
        value = event[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadEvent("prompt", "invalid_max_tokens",
                           f"field {name!r} is {_json_kind(value)}, expected a positive integer", event_id)  # fmt: skip
        if not 0 < value < 2**31:
            raise BadEvent("prompt", "invalid_max_tokens", f"field {name!r} is out of range (1 to 2^31-1)", event_id)
        return value

    def decode(self, value: bytes | None) -> tuple[str, dict]:
        """Bytes -> (id, event). Raises BadEvent with the reason."""
        event = self.parse(value)
        event_id = self.event_id(event)
        self.check_size(value, event_id)
        self.check_contract(event, event_id)
        return event_id, event

    def check_contract(self, event: dict, event_id: str | None) -> None:
        if self.contract is not None:
            violations = self.contract.violations(event)
            if violations:
                raise BadEvent("decode", "schema_violation", "; ".join(violations), event_id)

    def parse(self, value: bytes | None) -> dict:
        """Bytes -> the event object; BadEvent when they are not one. A message over the size limit
        is still parsed (up to PARSE_LIMIT_FACTOR x the limit): its tenant and id are read, so its
        dead letter is encrypted under the right key and names the event (check_size refuses it)."""
        if value is None:
            raise BadEvent("decode", "empty_message", "message has no value (tombstone)")
        if len(value) > self.max_message_bytes * PARSE_LIMIT_FACTOR:
            raise self._oversized(value, None)
        if self.decoder is not None:
            try:
                event = self.decoder(value)
            except DecodeError as e:
                raise BadEvent("decode", e.error_class, str(e)) from None
            if not isinstance(event, dict):
                raise BadEvent("decode", "not_an_object", f"Avro value is {_json_kind(event)}, expected a record")
            return event
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadEvent(
                "decode", "invalid_utf8", f"value is not UTF-8: an invalid byte at position {e.start}"  # not its value
            ) from None
        try:
            event = _JSON.decode(text)  # what json.loads does, without its argument checks
        except json.JSONDecodeError as e:
            raise BadEvent(
                "decode", "invalid_json", f"value is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        except RecursionError:
            raise BadEvent("decode", "invalid_json", "value is not valid JSON: nested too deeply") from None
        except ValueError:  # an integer literal longer than Python converts (sys.get_int_max_str_digits)
            raise BadEvent("decode", "invalid_json", "value is not valid JSON: a number has too many digits") from None
        if "\\u" in text and (path := _unpaired_surrogate(event, self.known_fields)) is not None:
            # JSON may escape half a UTF-16 pair ("\ud800"): no UTF-8 text holds it, so no table could.
            raise BadEvent("decode", "invalid_unicode", f"{path} holds an unpaired UTF-16 surrogate escape")
        if not isinstance(event, dict):
            raise BadEvent("decode", "not_an_object", f"JSON value is {_json_kind(event)}, expected an object")
        return event

    def event_id(self, event: dict) -> str:
        return event_id_of(event, self.spec.id_field)

    def check_size(self, value: bytes, event_id: str | None) -> None:
        if len(value) > self.max_message_bytes:
            raise self._oversized(value, event_id)

    def _oversized(self, value: bytes, event_id: str | None) -> BadEvent:
        return BadEvent("decode", "oversized_message",
                        f"message is {len(value)} bytes, over source.kafka.max_message_bytes={self.max_message_bytes}",
                        event_id)  # fmt: skip

    def render_one(self, event_id: str, event: dict) -> str:
        try:
            # Template.render without its per-call copies (measured 17.8 -> 2.7 us a row): the
            # template's globals (range, namespace, ...) then the event's fields, as render() sees
            # them; a mapping, so any field name works ("self").
            context = new_context(self._env, self.template.name, self.template.blocks, {**self._globals, **event}, True)
            return "".join(self.template.root_render_func(context))
        except UndefinedError as e:
            # Jinja names what is undefined: a template variable (a field name, fine to show) or an
            # attribute / item looked up with a value from the event (never shown).
            m = re.fullmatch(r"'(\w+)' is undefined", e.message or "")
            if m and m.group(1) in self.variables:
                raise BadEvent("prompt", "missing_variable", f"template: {e.message}", event_id) from None
            raise BadEvent("prompt", "missing_variable", "template: an attribute or item it looks up is undefined",
                           event_id) from None  # fmt: skip
        except TemplateError as e:  # the template's own errors (raise_exception, sandbox), never event values
            raise BadEvent("prompt", "render_error", f"template: {type(e).__name__}", event_id) from None
        except Exception as e:  # a sandbox violation or a value that cannot be formatted
            raise BadEvent("prompt", "render_error", f"template: {type(e).__name__}", event_id) from None

    def render(self, source: pa.Table, skip: Callable[[str, int, int], bool] | None = None) -> RenderedBatch:
        topics = source.column("topic").to_pylist()
        partitions = source.column("partition").to_pylist()
        offsets = source.column("offset").to_pylist()
        values = source.column("value").to_pylist()
        changes = source.column("source_change")
        changes = changes.to_pylist() if changes.null_count < len(changes) else None
        kept: list[int] = []  # source rows that become requests
        rendered: list[tuple] = []  # (id, prompt, context, tenant, budget) of each kept row
        dead: list[dict] = []
        carried: dict = {}
        enc = self.encryption
        fallback_tenant = enc.tenant if enc is not None else None
        carry = enc.input_fields if enc is not None else None
        for i, value in enumerate(values):
            if skip is not None and skip(topics[i], partitions[i], offsets[i]):
                continue
            event_id = None
            tenant = fallback_tenant  # bytes that do not parse are the fallback tenant's
            try:
                if changes is not None and changes[i] in UNREADABLE:  # no bytes to parse (connectors/kafka.py)
                    raise BadEvent("source", "unreadable_record", UNREADABLE[changes[i]], None)
                event = self.parse(value)
                tenant_error = None
                if enc is not None:
                    # The event's own tenant whenever the bytes parse, before any other check: its
                    # dead letter is then encrypted under its key. A tenant that is missing,
                    # invalid or unknown to the keyring gets the fallback's (or none: raw withheld).
                    tenant, tenant_error = self.tenant(event)
                event_id = self.event_id(event)
                if changes is not None and changes[i] is not None:
                    # A source row that changed after it was first read: reported, not re-processed.
                    raise BadEvent("source", f"source_{changes[i]}", f"row {changes[i]}d in the source at version "
                                   f"{partitions[i]}; changes are reported, not processed", event_id)  # fmt: skip
                self.check_size(value, event_id)
                if tenant_error is not None:
                    tenant_error.event_id = event_id
                    raise tenant_error
                self.check_contract(event, event_id)
                prompt = self.render_one(event_id, event)
                context = self.context(event_id, event)
                budget = self.max_tokens(event_id, event)
                if carry:
                    carried[(partitions[i], offsets[i])] = {f.name: _as_text(event.get(f.name)) for f in carry}
            except BadEvent as e:
                dead.append(
                    dict(
                        id=e.event_id or event_id, stage=e.stage, error_class=e.error_class, error=str(e),
                        source_topic=topics[i], source_partition=partitions[i], source_offset=offsets[i],
                        raw=value, tenant=tenant,
                    )
                )  # fmt: skip
                continue
            kept.append(i)
            rendered.append((event_id, prompt, context, tenant, budget))
        return RenderedBatch(self._requests(source, kept, rendered), dead_letter_table(dead, self.run_id), carried)

    @staticmethod
    def _requests(source: pa.Table, kept: list[int], rendered: list[tuple]) -> pa.Table:
        """REQUEST_SCHEMA rows: the rendered fields, and the positions taken from the source
        columns as they are (Arrow take, no Python per value)."""
        n = len(kept)
        ids, prompts, contexts, tenants, budgets = zip(*rendered) if rendered else ((),) * 5
        same = n == source.num_rows
        idx = None if same else pa.array(kept, pa.int64())

        def col(name: str) -> pa.Array:
            c = source.column(name)
            return c if same else c.take(idx)

        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()), pa.array(prompts, pa.string()), col("topic"), col("partition"),
                col("offset"), col("received_ns"), pa.repeat(pa.scalar(1, pa.int32()), n), pa.nulls(n, pa.string()),
                pa.array(contexts, REQUEST_SCHEMA.field("context").type), pa.array(tenants, pa.string()),
                pa.array(budgets, pa.int32()),
            ],
            schema=REQUEST_SCHEMA,
        )  # fmt: skip

    def tenant(self, event: dict) -> tuple[str | None, BadEvent | None]:
        """(the tenant whose key protects the event's values, the reason it cannot be processed).

        The event's own tenant when the keyring holds an active key for it; else the fallback
        (encryption.tenant, None if unset) with a BadEvent: missing_tenant, invalid_tenant or
        unknown_tenant. The message never repeats the value."""
        fallback = self.encryption.tenant
        try:
            tenant = self.encryption.tenant_of(event)
        except ValueError as e:
            return fallback, BadEvent("decode", "invalid_tenant", str(e))
        if tenant is None:
            return None, BadEvent("decode", "missing_tenant", f"tenant field {self.encryption.tenant_field!r} is "
                                  "missing and no encryption.tenant is set")  # fmt: skip
        if not self.has_key(tenant):
            usable = fallback if fallback is not None and fallback != tenant and self.has_key(fallback) else None
            return usable, BadEvent("decode", "unknown_tenant", "the keyring holds no active key for this event's tenant")
        return tenant, None


def _as_text(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False, sort_keys=True, default=_not_json)
    except (RecursionError, ValueError, TypeError):
        raise BadEvent("prompt", "invalid_input_field", "an encryption.input_fields value cannot be carried "
                       "(nested too deeply)") from None


def _not_json(v: object) -> object:
    """Avro values JSON has no type for: bytes as base64, timestamps and decimals as text."""
    if isinstance(v, (bytes, bytearray)):
        import base64

        return base64.b64encode(v).decode("ascii")
    return str(v)


def _unpaired_surrogate(event: object, known: frozenset[str] = frozenset()) -> str | None:
    """Where the first string or key holding a lone surrogate is: the event's top-level field by
    name when the spec names that field (`known`; other keys may be data, so they are not
    shown), or None."""
    top = event.items() if isinstance(event, dict) else [(None, event)]
    for name, item in top:
        where = "a field name" if name is not None and not _utf8(name) else None
        label = f"field {name!r}" if name in known else "a field" if name is not None else None
        stack = [item]
        while stack and where is None:
            v = stack.pop()
            if isinstance(v, str):
                where = None if _utf8(v) else (label or "the value")
            elif isinstance(v, dict):
                if not all(_utf8(k) for k in v):
                    where = f"a key inside {label}" if label else "a key"
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
        if where is not None:
            return where
    return None


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _json_kind(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if v is None:
        return "null"
    return "an object"
