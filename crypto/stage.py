"""The encryption stage: sensitive values leave the job only encrypted (spec `encryption:`).

    in : results rows in plain text (RESULTS_SCHEMA + `input_<field>` string columns carried from
         the events) and dead-letter rows (DEAD_LETTER_SCHEMA), each with its row's `tenant`
    out: the same rows with
           input_<field>              encrypted (binary) under the row's tenant key
           output_fields              encrypted (binary): output_text, output_json, ... (naming
                                      one of those two encrypts both: they hold the same output)
           PII in output text         encrypted in place ([PII:kind:token]) or redacted (encryption.pii)
           echoes in output text      a carried input field's value repeated by the model, protected
                                      like PII ([PII:echo:token]; encryption.protect_echoes)
           dead-letter raw            encrypted (binary) when encryption.dead_letter_raw
           dead-letter output_text    protected like the results' output_text
    and results rows of a tenant with no usable key left (its current version revoked, its key
    removed) become dead letters (stage encrypt, error_class key_revoked): nothing is written
    under a dead key.

Runs in the commit writer right before the commit, after the sink has put every row at its final
source position: a value's associated data binds it to (table, column, row id, tenant, key
version; crypto/binding.py), so it must be computed from the position the row is stored at. The
keyring is re-read when its file changed (a rotation or revocation is seen at the next commit),
and what was encrypted is counted per key version (record_usage: automatic rotation).
The formats and the keyring: crypto/format.py, crypto/keyring.py, docs/encryption.md.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from datetime import datetime, timezone

from crypto import encrypt_column, pii, protect_pii, row_ids_from
from crypto.binding import Binding, legacy_binding, mark_pii
from crypto.pii_tokens import ECHO_MIN_CHARS
from schemas.encryption import EncryptionSpec
from schemas.errors import KeyPermissionError, KeyRevokedError
from schemas.records import DEAD_LETTER_SCHEMA, SEALED_AUDIT_COLUMNS, empty_table, with_columns_of

log = logging.getLogger(__name__)

RAW_WITHHELD = "; raw event withheld: no key for its tenant"

# The model's output, twice: its text and (with an output schema) its parsed JSON. Encrypting one
# of them encrypts the other (the output is one value stored in two forms).
OUTPUT_COLUMNS = ("output_text", "output_json")


USAGE_RECORD_S = 10.0  # how often the key usage counters are written to the keyring (at most)


def input_column(field: str) -> str:
    """Result column of a carried input field."""
    return f"input_{field}"


KEY_REVOKED = "key_revoked"


class EncryptionStage:
    def __init__(self, spec: EncryptionSpec, results_uri: str, dead_letter_uri: str, keys: bool = True):
        """keys False: the schemas only (a maintenance round, a replay's table check): no keyring
        is opened, nothing can be encrypted."""
        self.spec = spec
        self.keyring = None
        if spec.needs_keys and keys:
            from crypto.keyring import Keyring, LocalMasterKeyProvider

            self.keyring = Keyring.open(spec.keyring, LocalMasterKeyProvider(spec.master_key_env))
        # Until the sink says how its tables bind values (bind()), the bindings of tables created
        # before binding 2. Only the commit writer encrypts; it binds before its first commit.
        self.results = legacy_binding(results_uri)
        self.dead = legacy_binding(dead_letter_uri)
        self.output_fields = {f.name: f for f in spec.output_fields}
        named = [c for c in OUTPUT_COLUMNS if c in self.output_fields]
        # The twin an output_fields naming one of the two encrypts too (None: both or neither named).
        self.twin: str | None = None
        self.dead_text_clear = False  # the dead-letter table stores output_text, the twin, in clear (keep_twin_as_stored)
        if len(named) == 1:
            self.twin = next(c for c in OUTPUT_COLUMNS if c not in self.output_fields)
            self.output_fields[self.twin] = self.output_fields[named[0]].model_copy(update={"name": self.twin})
        self.usage: dict[tuple[str, int], int] = {}  # values encrypted per (tenant, version), not recorded yet
        self._recorded_at = time.monotonic()

    def bind(self, results: Binding, dead: Binding) -> None:
        """How the tables the rows go to bind their values (the sink's, read from the tables)."""
        self.results, self.dead = results, dead

    @property
    def results_label(self) -> str:
        return self.results.label

    @property
    def dead_label(self) -> str:
        return self.dead.label

    @property
    def protects_echoes(self) -> bool:
        return bool(self.spec.protect_echoes and self.spec.input_fields)

    def pii_mode(self) -> str:
        """How PII (and echoes) inside text is protected: encryption.pii, or encrypt when only
        echoes are to be protected."""
        if self.spec.pii != "off":
            return self.spec.pii
        return "encrypt" if self.protects_echoes else "off"

    # -- schemas ---------------------------------------------------------------------------------

    def plain_results_schema(self, base: pa.Schema) -> pa.Schema:
        """What the job assembles: the results plus the carried input fields as text."""
        return pa.schema([*base, *(pa.field(input_column(f.name), pa.string()) for f in self.spec.input_fields)])

    def stored_results_schema(self, base: pa.Schema) -> pa.Schema:
        """What the results table holds: encrypted columns are binary; text columns that may hold
        inline PII tokens say so in their metadata (the reader reveals tokens there only)."""
        plain = self.plain_results_schema(base)
        encrypted = set(self.output_fields) | {input_column(f.name) for f in self.spec.input_fields} | self._sealed(base)
        stored = pa.schema([pa.field(f.name, pa.binary()) if f.name in encrypted else f for f in plain])
        return mark_pii(stored, {"output_text", "output_json"} - encrypted if self.pii_mode() == "encrypt" else set())

    def stored_dead_schema(self, base: pa.Schema) -> pa.Schema:
        encrypted = self._sealed(base) | ({"output_text"} if self.encrypts_dead_text else set())
        stored = pa.schema([pa.field(f.name, pa.binary()) if f.name in encrypted else f for f in base])
        if self.encrypts_dead_text:
            return stored
        return mark_pii(stored, {"output_text"} if self.pii_mode() == "encrypt" else set())

    @staticmethod
    def _sealed(base: pa.Schema) -> set[str]:
        """The audit's columns of `base` stored only encrypted (schemas/records.py
        SEALED_AUDIT_COLUMNS): binary whatever the spec (so switching encryption on or off never
        changes their type), null when it has no keys."""
        return set(SEALED_AUDIT_COLUMNS) & set(base.names)

    def check_output_fields(self, base: pa.Schema) -> None:
        from schemas.errors import SpecError

        unknown = sorted(set(self.output_fields) - set(base.names))
        if unknown:
            raise SpecError(f"encryption.output_fields: no such result column(s): {', '.join(unknown)}")
        # A value is sealed from its text: a list, a struct, a number or a timestamp column failed at
        # the first commit (rule_results: Arrow cannot cast list<struct> to string).
        not_text = [f"{f.name} ({f.type})" for f in base if f.name in self.output_fields
                    and not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]  # fmt: skip
        if not_text:
            raise SpecError(f"encryption.output_fields: only text columns can be encrypted, not {', '.join(not_text)}")

    def keep_twin_as_stored(self, results: pa.Schema | None, dead: pa.Schema | None = None) -> None:
        """Tables that exist and store the twin in clear text (written by a Tidegate that encrypted
        only the output column a spec named) keep it so: their rows stay readable and the job
        starts, with a warning. `results`, `dead`: the tables' schemas (None: no table yet), given
        before the stored schemas are taken. New tables get both columns encrypted. The dead
        letters hold output_text only, so theirs matters when the twin is output_text."""
        if self.twin is None:
            return
        named = next(c for c in OUTPUT_COLUMNS if c != self.twin)

        def clear_in(schema: pa.Schema | None) -> bool:
            return schema is not None and self.twin in schema.names and not pa.types.is_binary(schema.field(self.twin).type)

        if self.twin == "output_text" and clear_in(dead):
            self.dead_text_clear = True
            log.warning("encryption.output_fields names %s, which encrypts output_text too, but the dead-letter table "
                        "stores output_text in clear text (created before both were encrypted): it stays so there, "
                        "protected only by encryption.pii and echo protection. Write to new results and dead-letter "
                        "tables to encrypt it", named)  # fmt: skip
        if clear_in(results):
            del self.output_fields[self.twin]
            log.warning("encryption.output_fields names %s, which encrypts %s too, but the results table stores %s in "
                        "clear text (created before both were encrypted): it stays so, protected only by encryption.pii "
                        "and echo protection. Write to new results and dead-letter tables to encrypt it", named,
                        self.twin, self.twin)  # fmt: skip
            self.twin = None

    @property
    def encrypts_dead_text(self) -> bool:
        """Whether the dead letters' output_text is stored encrypted (an output_fields column)."""
        return "output_text" in self.output_fields and not self.dead_text_clear

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

    def refresh(self) -> bool:
        """Re-read the keyring if its file changed (a rotation, a revocation): call before a commit."""
        return self.keyring.refresh() if self.keyring is not None else False

    def record_usage(self, force: bool = False) -> list[tuple[str, int]]:
        """Add what was encrypted since the last record to the keyring's counters; rotates a tenant
        whose current version reached encryption.rotate_after_values. Returns the rotations.

        One keyring write (under its lock) at most every USAGE_RECORD_S, sooner when the unrecorded
        values reach 1% of the limit, or when `force`d: a crash loses at most that much counting,
        far inside the margin between the limit (default 2^30) and AES-GCM's 2^32. A keyring that
        cannot be written keeps the counts for the next try."""
        if self.keyring is None or not self.usage:
            return []
        pending = sum(self.usage.values())
        due = time.monotonic() - self._recorded_at >= USAGE_RECORD_S or pending >= self.spec.rotate_after_values / 100
        if not (force or due):
            return []
        counts, self.usage = self.usage, {}
        try:
            rotated = self.keyring.record_usage(counts, self.spec.rotate_after_values)
        except BaseException:
            for k, n in counts.items():
                self.usage[k] = self.usage.get(k, 0) + n
            raise
        self._recorded_at = time.monotonic()
        for tenant, version in rotated:
            log.info("tenant %s: key version %d after %d values (encryption.rotate_after_values)",
                     tenant, version, self.spec.rotate_after_values)  # fmt: skip
        return rotated

    def _count(self, values: pa.Array, tenants) -> None:
        """Values about to be encrypted, per tenant's current version (usage counters)."""
        if self.keyring is None:
            return
        t = tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray)) else pa.array(tenants, pa.string())
        # Array kernels, not a Table filter + group_by: those go through Acero, whose set-up
        # costs more than the counting for the small tables an online request brings.
        counts = pc.value_counts(pc.filter(t, values.is_valid()))
        for tenant, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            if tenant is not None and n:
                key = (tenant, self.keyring.current(tenant))
                self.usage[key] = self.usage.get(key, 0) + n

    # -- tenants without a key ------------------------------------------------------------------

    def split_unkeyed(self, results: pa.Table, run_id: str) -> tuple[pa.Table, pa.Table | None]:
        """(results rows that can be encrypted, DEAD_LETTER rows for the others): rows of a tenant
        whose key was revoked (or removed) since they were read. Their text is not written: there
        is no key to protect it with."""
        if self.keyring is None or not results.num_rows:
            return results, None
        tenants = results.column("tenant")
        usable = {t: self.has_key(t) for t in pc.unique(tenants).to_pylist() if t is not None}
        if all(usable.values()):
            return results, None
        keyed = pa.array([t is not None and usable.get(t, False) for t in tenants.to_pylist()], pa.bool_())
        lost = results.filter(pc.invert(keyed))
        n = lost.num_rows
        dead = {
            "id": lost.column("id"),
            "stage": pa.repeat(pa.scalar("encrypt"), n),
            "error_class": pa.repeat(pa.scalar(KEY_REVOKED), n),
            "error": pa.repeat(pa.scalar("the tenant's key was revoked while the row was processed; nothing of the "
                                         "row was written" + RAW_WITHHELD), n),  # fmt: skip
            "source_topic": lost.column("source_topic"),
            "source_partition": lost.column("source_partition"),
            "source_offset": lost.column("source_offset"),
            "run_id": pa.repeat(pa.scalar(run_id), n),
            "failed_at": pa.repeat(pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC")), n),
            "attempts": lost.column("attempts"),
            "tenant": lost.column("tenant"),
        }
        log.warning("%d result row(s) of tenant(s) without a usable key dead-lettered (%s)", n, KEY_REVOKED)
        return results.filter(keyed), pa.table(dead)

    def route_unkeyed(self, results: pa.Table, dead: pa.Table, run_id: str,
                      dead_schema: pa.Schema = DEAD_LETTER_SCHEMA) -> tuple[pa.Table, pa.Table]:  # fmt: skip
        """(results, dead letters) with the result rows of a tenant whose key was revoked (or
        removed) since they were read moved to the dead letters (split_unkeyed: key_revoked,
        nothing of them in clear), after reading the keyring again. The one place the batch commit
        writer, the online audit and the online answer make this split, so all three agree.
        `dead_schema`: the dead letters' columns (the audit's has AUDIT_COLUMNS too)."""
        if self.keyring is None:
            return results, dead
        self.refresh()  # a rotation or revocation made since the last call applies to this one
        results, unkeyed = self.split_unkeyed(results, run_id)
        if unkeyed is None:
            return results, dead
        return results, pa.concat_tables([with_columns_of(dead, dead_schema), with_columns_of(unkeyed, dead_schema)])

    # -- the stage -------------------------------------------------------------------------------

    def protect_results(self, results: pa.Table, stored: pa.Schema) -> pa.Table:
        if not results.num_rows:
            return empty_table(stored)
        ids = row_ids_from(results, self.results.row_id_columns)
        tenants = results.column("tenant")
        label = self.results.label
        mode = self.pii_mode()
        echoes = self._echoes(results) if self.protects_echoes else None
        cols = {}
        for name in ("output_text", "output_json"):
            if name not in self.output_fields and mode != "off":
                cols[name] = self._pii(results.column(name), ids, label, name, tenants, mode, echoes)
        for name, f in self.output_fields.items():
            cols[name] = self._encrypt(results.column(name), ids, label, name, tenants, f.deterministic)
        for f in self.spec.input_fields:
            name = input_column(f.name)
            cols[name] = self._encrypt(results.column(name), ids, label, name, tenants, f.deterministic)
        for name in self._sealed(results.schema):
            cols[name] = (self._encrypt(results.column(name), ids, label, name, tenants) if self.keyring is not None
                          else pa.nulls(results.num_rows, pa.binary()))  # fmt: skip
        for name, arr in cols.items():
            results = results.set_column(results.schema.get_field_index(name), name, arr)
        return results if results.schema.equals(stored, check_metadata=True) else results.cast(stored)

    def _echoes(self, results: pa.Table) -> list[list[str]]:
        """Per row, the carried input values a model may repeat in its output (ECHO_MIN_CHARS+)."""
        columns = [results.column(input_column(f.name)).to_pylist() for f in self.spec.input_fields]
        return [[v for v in row if v and len(v) >= ECHO_MIN_CHARS] for row in zip(*columns)]

    def protect_dead(self, dead: pa.Table, stored: pa.Schema) -> pa.Table:
        if not dead.num_rows:
            return empty_table(stored)
        ids = row_ids_from(dead, self.dead.row_id_columns)
        label = self.dead.label
        tenants = dead.column("tenant")  # unreadable events: encryption.tenant (set by the renderer)
        names = tenants.to_pylist()
        usable = {t: self.has_key(t) for t in set(names) if t is not None}  # one keyring lookup per tenant
        keyed = pa.array([t is not None and usable[t] for t in names], pa.bool_())
        if self.spec.encrypt_dead_letter_raw:
            # Without a tenant key the raw event cannot be stored encrypted: it is not stored.
            withheld = pc.and_(pc.invert(keyed), dead.column("raw").is_valid())
            raw = pc.if_else(keyed, dead.column("raw"), pa.scalar(None, pa.binary()))
            enc = self._encrypt_where(raw, ids, label, "raw", tenants, keyed)
            dead = dead.set_column(dead.schema.get_field_index("raw"), "raw", enc)
            if pc.any(withheld).as_py():
                err = pc.if_else(withheld, pc.binary_join_element_wise(dead.column("error"), RAW_WITHHELD, ""),
                                 dead.column("error"))  # fmt: skip
                dead = dead.set_column(dead.schema.get_field_index("error"), "error", err)
        for name in self._sealed(dead.schema):  # no key: not stored (a replay of the key is not checked)
            if self.keyring is None:
                sealed = pa.nulls(dead.num_rows, pa.binary())
            else:
                values = pc.if_else(keyed, dead.column(name), pa.scalar(None, dead.schema.field(name).type))
                sealed = self._encrypt_where(values, ids, label, name, tenants, keyed)
            dead = dead.set_column(dead.schema.get_field_index(name), name, sealed)
        if self.encrypts_dead_text:
            text = pc.if_else(keyed, dead.column("output_text"), pa.scalar(None, pa.string()))
            enc = self._encrypt_where(text, ids, label, "output_text", tenants, keyed)
            dead = dead.set_column(dead.schema.get_field_index("output_text"), "output_text", enc)
        elif (mode := self.pii_mode()) != "off":
            if mode == "encrypt":  # no key: the rejected output is not kept either
                text = pc.if_else(keyed, dead.column("output_text"), pa.scalar(None, pa.string()))
                text = self._pii_where(text, ids, label, "output_text", tenants, keyed)
            else:
                text = self._pii(dead.column("output_text"), ids, label, "output_text", tenants, mode, None)
            dead = dead.set_column(dead.schema.get_field_index("output_text"), "output_text", text)
        return dead.cast(stored)

    def _encrypt(self, values, ids, table, column, tenants, deterministic=False) -> pa.Array:
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if not pa.types.is_binary(values.type) and not pa.types.is_string(values.type):
            values = values.cast(pa.string())
        self._count(values, tenants)
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

    def _pii(self, values, ids, table, column, tenants, mode, echoes) -> pa.Array:
        if mode == "encrypt":
            out = protect_pii(values, ids, pii.find_pii, "encrypt", table=table, column=column, tenants=tenants,
                              keyring=self.keyring, echoes=echoes, json_text=column == "output_json")  # fmt: skip
            tokens = pc.subtract(pc.count_substring(out, "[PII:"), pc.count_substring(out, "[PII::"))
            self._count_tokens(tokens, tenants)
            return out
        return protect_pii(values, ids, pii.find_pii, "redact", table=table, column=column, echoes=echoes,
                           json_text=column == "output_json")  # fmt: skip

    def _pii_where(self, values, ids, table, column, tenants, mask) -> pa.Array:
        """_pii (encrypt) of the rows of `mask` (the others are null already)."""
        if pc.all(mask).as_py():
            return self._pii(values, ids, table, column, tenants, "encrypt", None)
        idx = pc.indices_nonzero(mask)
        out = [None] * len(values)
        if len(idx):
            enc = self._pii(pc.take(values, idx), pc.take(ids, idx), table, column, pc.take(tenants, idx), "encrypt", None)
            for i, v in zip(idx.to_pylist(), enc.to_pylist()):
                out[i] = v
        return pa.array(out, pa.string())

    def _count_tokens(self, tokens: pa.Array, tenants) -> None:
        """Inline PII tokens written, per tenant's current version (each one is a value encrypted)."""
        if self.keyring is None:
            return
        t = tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray)) else pa.array(tenants)
        sums = pa.table({"t": t, "n": pc.fill_null(tokens, 0)}).group_by("t").aggregate([("n", "sum")])
        for tenant, n in zip(sums.column("t").to_pylist(), sums.column("n_sum").to_pylist()):
            if tenant is not None and n:
                key = (tenant, self.keyring.current(tenant))
                self.usage[key] = self.usage.get(key, 0) + n
