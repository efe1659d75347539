"""What each stored value is bound to, per table (docs/encryption.md, "What a value is bound to").

    Binding(label, row_id_columns, pii_columns)

A value's associated data holds the table's label, the column and (random mode) the row id, so a
value moved to another table, column or row does not decrypt. Tables Tidegate creates record how
they bind their values in the Delta table itself:

    label           "delta:<the table's Delta id>": the unique id Delta gives a table when it is
                    created (metadata.id). Two tables never share it, whatever their URIs; a table
                    copied or moved keeps it. (Tables created before binding 2: the Delta
                    table's name, else the last part of its URI.)
    row id          results: "source_topic:source_partition:source_offset" (one row per position);
                    dead letters: the same + ":run_id" (a replay that fails again writes a new row
                    at the event's position, under its own run id). (Before binding 2: the position.)
    pii columns     text columns that may hold inline [PII:...] tokens carry the column metadata
                    {"tidegate.pii": "tokens"}; a reader reveals tokens there only (tables created
                    before binding 2: output_text and output_json, the only columns Tidegate puts
                    tokens in). A token in any other column is text, never decrypted.

The binding version and role live in the table description as JSON: {"tidegate": {"binding": 2,
"role": "results" | "dead_letter"}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from crypto.format import table_label
from schemas.encryption import ROW_ID_COLUMNS

BINDING = 2
PII_METADATA = {"tidegate.pii": "tokens"}
LEGACY_PII_COLUMNS = ("output_text", "output_json")
ROW_ID_COLUMNS_BY_ROLE = {"results": ROW_ID_COLUMNS, "dead_letter": (*ROW_ID_COLUMNS, "run_id")}


@dataclass(frozen=True)
class Binding:
    label: str
    row_id_columns: tuple[str, ...] = ROW_ID_COLUMNS
    pii_columns: tuple[str, ...] = LEGACY_PII_COLUMNS  # text columns that may hold [PII:...] tokens


def legacy_binding(uri: str, name: str | None = None) -> Binding:
    """How tables created before binding 2 (or outside Tidegate) bind their values."""
    return Binding(table_label(uri, name), ROW_ID_COLUMNS, LEGACY_PII_COLUMNS)


def new_table_description(role: str) -> str:
    """The description a table Tidegate creates carries (its binding version and role)."""
    return json.dumps({"tidegate": {"binding": BINDING, "role": role}})


def binding_of(metadata: Any, schema: pa.Schema, uri: str) -> Binding:
    """A Delta table's binding from its metadata (deltalake Metadata: id, name, description) and
    its Arrow schema (field metadata marks PII-token columns)."""
    pii = tuple(f.name for f in schema if f.metadata and f.metadata.get(b"tidegate.pii") == b"tokens")
    info = _tidegate_info(getattr(metadata, "description", None))
    if info.get("binding") == BINDING and info.get("role") in ROW_ID_COLUMNS_BY_ROLE:
        return Binding(f"delta:{metadata.id}", ROW_ID_COLUMNS_BY_ROLE[info["role"]], pii)
    legacy = legacy_binding(uri, getattr(metadata, "name", None))
    return Binding(legacy.label, legacy.row_id_columns, pii or LEGACY_PII_COLUMNS)


def is_tidegate_table(metadata: Any) -> bool:
    """Whether a Delta table says it was created by Tidegate (binding 2 and a role). In such a
    table every binary column but dead-letter `raw` holds stored values of text."""
    info = _tidegate_info(getattr(metadata, "description", None))
    return info.get("binding") == BINDING and info.get("role") in ROW_ID_COLUMNS_BY_ROLE


def mark_pii(schema: pa.Schema, columns: set[str]) -> pa.Schema:
    """`schema` with the PII-token metadata on these text columns."""
    return pa.schema([f.with_metadata({**(f.metadata or {}), **PII_METADATA}) if f.name in columns else f for f in schema])


def _tidegate_info(description: str | None) -> dict:
    if not description:
        return {}
    try:
        info = json.loads(description).get("tidegate")
    except (ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}
