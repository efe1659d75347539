"""Message formats of events and published rows: JSON, plain Avro, and the Confluent wire format.

    decode: bytes -> the event object (a dict for a record)   raises DecodeError(error_class, message)
    encode: the event object -> bytes                          raises EventContractError (producer side)

The Confluent wire format is one magic byte 0, the schema id (4 bytes, big-endian) and the Avro
body. Schema ids are resolved through a `SchemaLookup` (connectors/schema_registry.py: a registry
URL or a local {id: schema} file); a lookup answers None for an id it does not know, which makes
the message a dead letter `unknown_schema_id` (never a crash). JSON decoding stays in
compute/prompts.py, the fast path. Error messages name schema ids and byte positions, never values.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import EventContractError, SpecError

MAGIC = 0
_HEADER = struct.Struct(">bI")


class DecodeError(Exception):
    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


class SchemaLookup(Protocol):
    def schema(self, schema_id: int) -> dict[str, Any] | None:
        """The Avro schema registered under this id, or None if there is none."""

    def id_of(self, subject: str, schema: dict[str, Any]) -> int:
        """The id of this schema (registering it under `subject` where the registry allows)."""


def parse_avro(schema: Any, where: str) -> Any:
    """A parsed Avro schema, or SpecError naming where it came from."""
    try:
        return fastavro.parse_schema(schema)
    except Exception as e:  # fastavro raises several kinds (SchemaParseException, UnknownType, ...)
        raise SpecError(f"{where}: not a valid Avro schema: {type(e).__name__}: {e}") from None


def load_avro_schema(ref: str | dict[str, Any], where: str) -> Any:
    """An Avro schema given inline or as the path of an .avsc (JSON) file, parsed."""
    if isinstance(ref, str):
        try:
            ref = json.loads(Path(ref).read_text())
        except OSError as e:
            raise SpecError(f"{where}: cannot read {ref}: {e.strerror}") from None
        except ValueError:
            raise SpecError(f"{where}: {ref} is not JSON (an .avsc file is)") from None
    return parse_avro(ref, where)


def canonical(schema: Any) -> str:
    """Avro's Parsing Canonical Form: two schemas that read the same bytes the same way are equal."""
    return to_parsing_canonical_form(fastavro.parse_schema(schema))


class AvroDecoder:
    """Plain Avro with one writer schema, or the Confluent wire format with ids from `lookup`."""

    def __init__(self, writer_schema: Any = None, lookup: SchemaLookup | None = None):
        if (writer_schema is None) == (lookup is None):
            raise ValueError("give a writer schema (plain Avro) or a schema lookup (Confluent wire format)")
        self.writer = writer_schema
        self.lookup = lookup
        self._by_id: dict[int, Any] = {}  # ids are immutable in a registry: cached for the run

    def _schema(self, schema_id: int) -> Any:
        parsed = self._by_id.get(schema_id)
        if parsed is None:
            found = self.lookup.schema(schema_id)
            if found is None:
                raise DecodeError("unknown_schema_id", f"schema id {schema_id} is not in the schema registry")
            try:
                parsed = fastavro.parse_schema(found)
            except Exception as e:
                raise DecodeError("invalid_schema", f"schema id {schema_id} is not a usable Avro schema: "
                                  f"{type(e).__name__}") from None  # fmt: skip
            self._by_id[schema_id] = parsed
        return parsed

    def __call__(self, value: bytes) -> Any:
        if self.lookup is not None:
            if len(value) < _HEADER.size or value[0] != MAGIC:
                raise DecodeError("invalid_framing", "value is not in the Confluent wire format "
                                  "(magic byte 0, then a 4-byte schema id)")  # fmt: skip
            schema_id = _HEADER.unpack_from(value)[1]
            schema, body, label = self._schema(schema_id), memoryview(value)[_HEADER.size:], f"schema id {schema_id}"
        else:
            schema, body, label = self.writer, memoryview(value), "source.kafka.avro_schema"
        buf = io.BytesIO(body)
        try:
            event = fastavro.schemaless_reader(buf, schema, None)
        except Exception as e:  # truncated or corrupt bodies raise EOFError, ValueError, IndexError, ...
            raise DecodeError("invalid_avro", f"value is not valid Avro for {label}: {type(e).__name__}") from None
        if buf.tell() != len(body):
            raise DecodeError("invalid_avro", f"value is not valid Avro for {label}: "
                              f"{len(body) - buf.tell()} bytes left after the record")  # fmt: skip
        return event


class AvroEncoder:
    """Event -> Avro bytes (plain, or framed with `schema_id`). A value the schema cannot hold
    raises EventContractError naming the schema, never the value."""

    def __init__(self, schema: Any, schema_id: int | None = None):
        self.schema = fastavro.parse_schema(schema)
        self.header = _HEADER.pack(MAGIC, schema_id) if schema_id is not None else b""
        self._named: dict[str, Any] = {}  # named types by full name, as parse_schema refers to them
        _collect_named(self.schema, self._named)

    def as_sent(self, event: Any) -> Any:
        """The event as it is encoded: a number or boolean where the schema takes text and no
        number or boolean (at any depth: record fields, array items, map values, unions) is its
        text (str(), what the job's template renders of it from JSON). The contract's Avro form
        types an id or a template variable that JSON allows as a number ("string or integer") as
        a string: an integer ticket id passed the contract, then failed here (TypeError)."""
        return _as_text_where_text(self.schema, event, self._named)

    def __call__(self, event: Any) -> bytes:
        return self.write(self.as_sent(event))

    def write(self, event: Any) -> bytes:
        """An event already as_sent, as Avro bytes."""
        buf = io.BytesIO()
        buf.write(self.header)
        try:
            fastavro.schemaless_writer(buf, self.schema, event, strict_allow_default=True)
        except Exception as e:  # fastavro's messages quote the datum: only the class and field names
            fields = [f["name"] for f in self.schema.get("fields", []) if isinstance(event, dict) and f["name"] not in event]
            extra = f" (missing: {', '.join(fields)})" if fields else ""
            raise EventContractError(f"does not fit the Avro schema {self.schema.get('name', '')}: "
                                     f"{type(e).__name__}{extra}") from None  # fmt: skip
        return buf.getvalue()


_NOT_TEXT = {"int", "long", "float", "double", "boolean"}


def _collect_named(schema: Any, named: dict[str, Any]) -> None:
    """Every named type (record, enum, fixed) of a parsed schema by its name: a later field refers
    to it by name, and an event's fields may come in another order than the schema's."""
    if isinstance(schema, list):
        for branch in schema:
            _collect_named(branch, named)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "error", "enum", "fixed") and schema.get("name"):
            named.setdefault(schema["name"], schema)
        for f in schema.get("fields", []) if schema.get("type") in ("record", "error") else []:
            _collect_named(f["type"], named)
        for key in ("items", "values"):
            if key in schema:
                _collect_named(schema[key], named)
        if isinstance(schema.get("type"), (dict, list)):
            _collect_named(schema["type"], named)


def _branch_for(union: list, value: Any, named: dict[str, Any]) -> Any:
    """The union branch a record, map or array value goes to: for a dict, the first record whose
    fields hold its keys and that it gives every field without a default, else a map; for a list,
    an array. None: no such branch (fastavro decides, or refuses)."""
    resolved = [named.get(b, b) if isinstance(b, str) else b for b in union]
    complex_ = [b for b in resolved if isinstance(b, dict)]
    if isinstance(value, dict):
        for b in complex_:
            if b.get("type") in ("record", "error"):
                fields = b.get("fields", [])
                names = {f["name"] for f in fields}
                if set(value) <= names and all(f["name"] in value for f in fields if "default" not in f):
                    return b
        return next((b for b in complex_ if b.get("type") == "map"), None)
    if isinstance(value, list):
        return next((b for b in complex_ if b.get("type") == "array"), None)
    return None


def _as_text_where_text(schema: Any, value: Any, named: dict[str, Any]) -> Any:
    """AvroEncoder.as_sent over one value and its (parsed) schema; a value the schema cannot hold
    is left as it is (fastavro refuses it)."""
    if isinstance(schema, str):
        if schema in named:
            return _as_text_where_text(named[schema], value, named)
        return str(value) if schema == "string" and isinstance(value, (int, float)) else value
    if isinstance(schema, list):  # a union
        kinds = {b if isinstance(b, str) else b.get("type") for b in schema}
        if isinstance(value, (int, float)):
            return str(value) if "string" in kinds and not kinds & _NOT_TEXT else value
        branch = _branch_for(schema, value, named)
        return value if branch is None else _as_text_where_text(branch, value, named)
    if not isinstance(schema, dict):
        return value
    kind = schema.get("type")
    if kind in ("record", "error"):
        if not isinstance(value, dict):
            return value
        fields = {f["name"]: f["type"] for f in schema.get("fields", [])}
        return {k: _as_text_where_text(fields[k], v, named) if k in fields else v for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [_as_text_where_text(schema["items"], v, named) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: _as_text_where_text(schema["values"], v, named) for k, v in value.items()}
    if kind in ("enum", "fixed"):
        return value
    return _as_text_where_text(kind, value, named) if isinstance(kind, str) else value


def encode_json(event: Any) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def event_decoder(kafka_settings: Any, lookup_for: Callable[[str], SchemaLookup]) -> Callable[[bytes], Any] | None:
    """The decoder of a Kafka source's `format` (None: JSON, PromptRenderer's own fast path).
    lookup_for(ref) opens source.kafka.schema_registry."""
    if kafka_settings is None or getattr(kafka_settings, "format", "json") == "json":
        return None
    if kafka_settings.schema_registry is not None:
        return AvroDecoder(lookup=lookup_for(kafka_settings.schema_registry))
    return AvroDecoder(writer_schema=load_avro_schema(kafka_settings.avro_schema, "source.kafka.avro_schema"))
