"""Table rows as Avro: an Arrow schema's Avro record, and rows in the Confluent wire format.

    avro_record("Result", RESULTS_SCHEMA, columns) -> {"type": "record", "name": "Result", "fields": [...]}
    confluent_encoder(parsed, schema_id, "ns.Result", columns) -> row dict -> bytes

Every field is nullable (a union with null, default null): a column a row does not have, or a
value the writer left empty, is null. Timestamps are timestamp-micros; binary (encrypted columns,
raw message bytes) is bytes, as stored.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import fastavro
import pyarrow as pa

from schemas.errors import SinkError

_HEADER = struct.Struct(">bI")


def _avro_type(t: pa.DataType, name: str) -> Any:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_int32(t):
        return "int"
    if pa.types.is_integer(t):
        return "long"
    if pa.types.is_float32(t):
        return "float"
    if pa.types.is_floating(t):
        return "double"
    if pa.types.is_timestamp(t):
        return {"type": "long", "logicalType": "timestamp-micros"}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"type": "array", "items": ["null", _avro_type(t.value_type, name + "_item")]}
    if pa.types.is_struct(t):
        return {"type": "record", "name": name,
                "fields": [{"name": f.name, "type": ["null", _avro_type(f.type, f"{name}_{f.name}")], "default": None}
                           for f in t]}  # fmt: skip
    raise SinkError(f"column type {t} has no Avro form here (sink.topic.format avro)")


def avro_record(name: str, schema: pa.Schema, columns: list[str]) -> dict[str, Any]:
    fields = [{"name": c, "type": ["null", _avro_type(schema.field(c).type, f"{name}_{c}")], "default": None}
              for c in columns]  # fmt: skip
    return {"type": "record", "name": name, "fields": fields}


def confluent_encoder(parsed: Any, schema_id: int, record_name: str, columns: list[str]):
    header = _HEADER.pack(0, schema_id)

    def encode(row: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(header)
        # (name, record): the union branch named, not guessed from the fields
        fastavro.schemaless_writer(buf, parsed, (record_name, {c: row.get(c) for c in columns}))
        return buf.getvalue()

    return encode
