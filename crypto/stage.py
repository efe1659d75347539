"""The encryption stage: sensitive values leave the job only encrypted (spec `encryption:`).

    in : results rows in plain text (RESULTS_SCHEMA + `input_<field>` string columns carried from
         the events) and dead-letter rows (DEAD_LETTER_SCHEMA), each with its row's `tenant`
    out: the same rows with
           input_<field>              encrypted (binary) under the row's tenant key
           output_fields              encrypted (binary): output_text, output_json, ...
           PII in output text         encrypted in place ([PII:kind:token]) or redacted (encryption.pii)
           dead-letter raw            encrypted (binary) when encryption.dead_letter_raw
           dead-letter output_text    protected like the results' output_text

Runs in the job loop right before the Delta commit, after the sink has put every row at its final
source position: a value's associated data binds it to (table, column, row id = topic:partition:
offset, tenant, key version), so it must be computed from the position the row is stored at.
The formats and the keyring: crypto/format.py, crypto/keyring.py, docs/encryption.md.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from crypto import pii
from crypto import encrypt_column, protect_pii, row_ids_from, table_label
from schemas.encryption import EncryptionSpec
from schemas.errors import KeyPermissionError, KeyRevokedError

log = logging.getLogger(__name__)

RAW_WITHHELD = "; raw event withheld: no key for its tenant"


def input_column(field: str) -> str:
    """Result column of a carried input field."""
    return f"input_{field}"


class EncryptionStage:
    def __init__(self, spec: EncryptionSpec, results_uri: str, dead_letter_uri: str):
        self.spec = spec
        self.keyring = None
        if spec.needs_keys:
            from crypto.keyring import Keyring, LocalMasterKeyProvider

            self.keyring = Keyring.open(spec.keyring, LocalMasterKeyProvider(spec.master_key_env))
        self.results_label = table_label(results_uri)
        self.dead_label = table_label(dead_letter_uri)
        self.output_fields = {f.name: f for f in spec.output_fields}

    # -- schemas ---------------------------------------------------------------------------------

    def plain_results_schema(self, base: pa.Schema) -> pa.Schema:
        """What the job assembles: the results plus the carried input fields as text."""
        return pa.schema([*base, *(pa.field(input_column(f.name), pa.string()) for f in self.spec.input_fields)])

    def stored_results_schema(self, base: pa.Schema) -> pa.Schema:
        """What the results table holds: encrypted columns are binary."""
        plain = self.plain_results_schema(base)
        encrypted = set(self.output_fields) | {input_column(f.name) for f in self.spec.input_fields}
        return pa.schema([pa.field(f.name, pa.binary()) if f.name in encrypted else f for f in plain])

    def stored_dead_schema(self, base: pa.Schema) -> pa.Schema:
        if "output_text" in self.output_fields:
            return pa.schema([pa.field(f.name, pa.binary()) if f.name == "output_text" else f for f in base])
        return base

    def check_output_fields(self, base: pa.Schema) -> None:
        from schemas.errors import SpecError

        unknown = sorted(set(self.output_fields) - set(base.names))
        if unknown:
            raise SpecError(f"encryption.output_fields: no such result column(s): {', '.join(unknown)}")

    # -- tenants ---------------------------------------------------------------------------------

    def has_key(self, tenant: str) -> bool:
        """Whether rows of this tenant can be encrypted (a key with an active version)."""
        if self.keyring is None:
            return True
        try:
            self.keyring.current(tenant)
            return True
        except (KeyPermissionError, KeyRevokedError):
            return False

    # -- the stage -------------------------------------------------------------------------------

    def protect_results(self, results: pa.Table, stored: pa.Schema) -> pa.Table:
        if not results.num_rows:
            return stored.empty_table()
        ids = row_ids_from(results)
        tenants = results.column("tenant")
        cols = {}
        for name in ("output_text", "output_json"):
            if name not in self.output_fields and self.spec.pii != "off":
                cols[name] = self._pii(results.column(name), ids, self.results_label, name, tenants)
        for name, f in self.output_fields.items():
            cols[name] = self._encrypt(results.column(name), ids, self.results_label, name, tenants, f.deterministic)
        for f in self.spec.input_fields:
            name = input_column(f.name)
            cols[name] = self._encrypt(results.column(name), ids, self.results_label, name, tenants, f.deterministic)
        for name, arr in cols.items():
            results = results.set_column(results.schema.get_field_index(name), name, arr)
        return results.cast(stored)

    def protect_dead(self, dead: pa.Table, stored: pa.Schema) -> pa.Table:
        if not dead.num_rows:
            return stored.empty_table()
        ids = row_ids_from(dead)
        tenants = dead.column("tenant")  # unreadable events: encryption.tenant (set by the renderer)
        names = tenants.to_pylist()
        usable = {t: self.has_key(t) for t in set(names) if t is not None}  # one keyring lookup per tenant
        keyed = pa.array([t is not None and usable[t] for t in names], pa.bool_())
        if self.spec.encrypt_dead_letter_raw:
            # Without a tenant key the raw event cannot be stored encrypted: it is not stored.
            withheld = pc.and_(pc.invert(keyed), dead.column("raw").is_valid())
            raw = pc.if_else(keyed, dead.column("raw"), pa.scalar(None, pa.binary()))
            enc = self._encrypt_where(raw, ids, self.dead_label, "raw", tenants, keyed)
            dead = dead.set_column(dead.schema.get_field_index("raw"), "raw", enc)
            if pc.any(withheld).as_py():
                err = pc.if_else(withheld, pc.binary_join_element_wise(dead.column("error"), RAW_WITHHELD, ""),
                                 dead.column("error"))  # fmt: skip
                dead = dead.set_column(dead.schema.get_field_index("error"), "error", err)
        if "output_text" in self.output_fields:
            text = pc.if_else(keyed, dead.column("output_text"), pa.scalar(None, pa.string()))
            enc = self._encrypt_where(text, ids, self.dead_label, "output_text", tenants, keyed)
            dead = dead.set_column(dead.schema.get_field_index("output_text"), "output_text", enc)
        elif self.spec.pii != "off":
            text = self._pii(dead.column("output_text"), ids, self.dead_label, "output_text", tenants)
            dead = dead.set_column(dead.schema.get_field_index("output_text"), "output_text", text)
        return dead.cast(stored)

    def _encrypt(self, values, ids, table, column, tenants, deterministic=False) -> pa.Array:
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if not pa.types.is_binary(values.type) and not pa.types.is_string(values.type):
            values = values.cast(pa.string())
        return encrypt_column(values, ids, table=table, column=column, tenants=tenants, keyring=self.keyring,
                              deterministic=deterministic)  # fmt: skip

    def _encrypt_where(self, values, ids, table, column, tenants, mask) -> pa.Array:
        """Encrypt the rows of `mask` (the others are null already)."""
        if pc.all(mask).as_py():
            return self._encrypt(values, ids, table, column, tenants)
        idx = pc.indices_nonzero(mask)
        out = [None] * len(values)
        if len(idx):
            enc = self._encrypt(pc.take(values, idx), pc.take(ids, idx), table, column, pc.take(tenants, idx))
            for i, v in zip(idx.to_pylist(), enc.to_pylist()):
                out[i] = v
        return pa.array(out, pa.binary())

    def _pii(self, values, ids, table, column, tenants) -> pa.Array:
        if self.spec.pii == "encrypt":
            return protect_pii(values, ids, pii.find_pii, "encrypt", table=table, column=column, tenants=tenants,
                               keyring=self.keyring)  # fmt: skip
        return protect_pii(values, ids, pii.find_pii, "redact", table=table, column=column)
