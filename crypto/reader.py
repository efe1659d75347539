"""Reading encrypted results in a notebook: a Delta table in, a DataFrame with clear text out.

    from crypto.reader import read_results
    df = read_results("s3://lake/triage/results", keyring="~/.tidegate/acme.json",
                      storage_options={...})                      # polars DataFrame
    df = read_results(uri, keyring=kr, backend="pandas", on_missing_key="keep")

Which columns are encrypted is read from the data, not from a side file: a binary column whose
every non-null value starts with the stored-value header (magic A7 54 47, format 1; see
crypto/format.py) is decrypted, to string if its values were text, else to binary. Then every
text column holding "[PII:" has its inline PII tokens decrypted in place.

Values are bound to their table, column and row (crypto/binding.py): the table records its
binding (its Delta id as the label, the row id columns, the columns that may hold PII tokens),
the reader follows it; tables created before binding 2 use the Delta table's `name`, else the
last part of the URI (`table=` overrides). The row id and `tenant` columns are read even when
`columns` leaves them out: every value's tenant (in its header) must be its row's tenant.

A value whose tenant's key the keyring lacks (or whose key version was revoked) raises
KeyPermissionError / KeyRevokedError naming the tenant; with on_missing_key="keep" it stays
encrypted: stored bytes in a binary column, `tgenc1:<base64url>` text in a text column, the
`[PII:...]` token as it was inside text (a token that does not decrypt, forged or moved, stays
too: that cell, not the whole read, is what fails).

The table is read with polars (read_delta), not DeltaTable.to_pyarrow_table, which was seen to
crash some processes at exit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from crypto import (
    KeySource,
    OnMissingKey,
    decrypt_column,
    is_encrypted,
    reveal_pii,
    row_ids_from,
)
from crypto.arrow import is_bytes
from crypto.binding import Binding, binding_of, is_tidegate_table
from schemas.encryption import ROW_ID_COLUMNS

if TYPE_CHECKING:
    from crypto.keyring import Keyring

Backend = Literal["polars", "pandas", "arrow"]


def open_keyring(keyring: Keyring | KeySource | str | Path | None, master_key_env: str | None = None) -> KeySource:
    """A keyring object from a Keyring, a path, or None (default path). A path's master key is read
    from the variable `master_key_env` names (default TIDEGATE_MASTER_KEY, or its _FILE twin): a
    job whose spec sets encryption.master_key_env is read with that name."""
    from crypto.keyring import Keyring, LocalMasterKeyProvider

    if keyring is None or isinstance(keyring, (str, Path)):
        provider = LocalMasterKeyProvider(master_key_env) if master_key_env else None
        return Keyring.open(Path(keyring).expanduser() if keyring is not None else None, provider)
    return keyring


class KeyringOnFirstUse:
    """A KeySource opened when a value first needs a key: a table with nothing encrypted (or a
    selection of plain columns) is read without any keyring, and a missing one is an error only
    where a key is needed. `keyring`: what open_keyring takes, or a function that opens one."""

    def __init__(self, keyring: Keyring | KeySource | str | Path | Callable[[], KeySource] | None,
                 master_key_env: str | None = None):  # fmt: skip
        self._given = keyring
        self._master_key_env = master_key_env
        self._opened: KeySource | None = None

    def _source(self) -> KeySource:
        if self._opened is None:
            given = self._given
            opener = given if callable(given) and not hasattr(given, "data_key") else None
            self._opened = opener() if opener is not None else open_keyring(given, self._master_key_env)
        return self._opened

    def current(self, tenant: str) -> int:
        return self._source().current(tenant)

    def data_key(self, tenant: str, version: int) -> bytes:
        return self._source().data_key(tenant, version)


def decrypt_table(
    data: pa.Table,
    keyring: KeySource,
    *,
    table: str | None = None,
    binding: Binding | None = None,
    columns: Sequence[str] | None = None,
    on_missing_key: OnMissingKey = "raise",
    row_id_columns: Sequence[str] | None = None,
    pii_columns: Sequence[str] | None = None,
    tenant_column: str | None = "tenant",
) -> pa.Table:
    """Decrypt an Arrow table of a results (or dead-letter) table: pure, no I/O.

    binding      what the table's values are bound to (crypto/binding.py; read_results takes it from
                 the table); or `table` (the label) with row_id_columns / pii_columns
    columns      the encrypted columns to decrypt; None: every column that `is_encrypted`
    pii_columns  the text columns to reveal inline PII tokens in; None: the binding's (default
                 output_text and output_json); a token in any other column is left as text
    tenant_column  each value's tenant must be its row's (DecryptionError naming the row if not)
    returns the table with those columns replaced (same names and order; types string or binary)
    """
    if binding is None:
        if table is None:
            raise ValueError("decrypt_table needs a binding or a table label")
        binding = Binding(table, tuple(row_id_columns or ROW_ID_COLUMNS))
    if pii_columns is not None:
        binding = Binding(binding.label, binding.row_id_columns, tuple(pii_columns))
    names = data.column_names
    rid_cols = binding.row_id_columns
    row_ids = row_ids_from(data, rid_cols) if all(c in names for c in rid_cols) else None
    tenants = data.column(tenant_column) if tenant_column and tenant_column in names else None
    targets = list(columns) if columns is not None else [c for c in names if is_encrypted(data.column(c))]
    for c in targets:
        col = data.column(c)
        if col.null_count == len(col):
            continue
        clear = decrypt_column(col, row_ids, table=binding.label, column=c, keyring=keyring, tenants=tenants,
                               on_missing_key=on_missing_key)  # fmt: skip
        data = data.set_column(names.index(c), pa.field(c, clear.type), clear)
    text = [f.name for f in data.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    for c in [c for c in text if c in binding.pii_columns]:
        clear = reveal_pii(data.column(c), row_ids, table=binding.label, column=c, keyring=keyring,
                           on_missing_key=on_missing_key, tenants=tenants)  # fmt: skip
        data = data.set_column(names.index(c), pa.field(c, clear.type), clear)
    return data


def read_results(
    uri: str,
    keyring: Keyring | KeySource | str | Path | None = None,
    columns: Sequence[str] | None = None,
    on_missing_key: OnMissingKey = "raise",
    backend: Backend = "polars",
    storage_options: dict[str, str] | None = None,
    *,
    version: int | None = None,
    table: str | None = None,
    row_id_columns: Sequence[str] | None = None,
    where: Any = None,
    master_key_env: str | None = None,
) -> Any:
    """Read a Delta results (or dead-letter) table and decrypt what the keyring opens.

    Lazy: the table is scanned with polars (`scan_delta`), `where` and the columns are applied
    before anything is read (partition pruning, file statistics), and only the selected columns of
    the selected rows are decrypted: a row filtered out never needs its tenant's key.

    uri             Delta table URI (local path, s3://, ...)
    keyring         a Keyring, a keyring file path, or None ($TIDEGATE_KEYRING or .tidegate/keyring.json;
                    the master key from $TIDEGATE_MASTER_KEY, or the variable master_key_env names)
    columns         columns to return (default: all)
    on_missing_key  "raise" (KeyPermissionError / KeyRevokedError naming the tenant) or "keep" (stay encrypted)
    backend         "polars" -> polars.DataFrame, "pandas" -> pandas.DataFrame, "arrow" -> pyarrow.Table
    version         read this table version (default: latest)
    table           the label values are bound to, when the table's own cannot say (a copy of a legacy table)
    where           a polars expression over plain columns, e.g. pl.col("tenant") == "acme" (filters on
                    encrypted columns see ciphertext)
    """
    import polars as pl
    from deltalake import DeltaTable

    if backend not in ("polars", "pandas", "arrow"):
        raise ValueError(f"backend must be polars, pandas or arrow, not {backend!r}")
    if on_missing_key not in ("raise", "keep"):
        raise ValueError(f"on_missing_key must be raise or keep, not {on_missing_key!r}")
    kr = keyring if isinstance(keyring, KeyringOnFirstUse) else KeyringOnFirstUse(keyring, master_key_env)
    dt = DeltaTable(uri, version=version, storage_options=storage_options)
    schema = pa.schema(dt.schema().to_arrow())
    binding = binding_of(dt.metadata(), schema, uri)
    if table is not None or row_id_columns is not None:  # told explicitly (a table copied elsewhere, say)
        binding = Binding(table or binding.label, tuple(row_id_columns or binding.row_id_columns), binding.pii_columns)
    present = schema.names
    wanted = list(columns) if columns is not None else present
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise ValueError(f"no such column(s) in {uri}: {', '.join(unknown)}")
    needed = [*binding.row_id_columns, "tenant"]
    read = wanted + [c for c in needed if c in present and c not in wanted]
    lazy = pl.scan_delta(dt)
    if where is not None:
        lazy = lazy.filter(where)
    frame = lazy.select(read).collect()
    data = frame.to_arrow(compat_level=pl.CompatLevel.oldest())
    encrypted = [c for c in wanted if is_encrypted(data.column(c))]
    pii = [c for c in wanted if c in binding.pii_columns]
    data = decrypt_table(
        data, kr, binding=binding, columns=encrypted, on_missing_key=on_missing_key, pii_columns=pii,
    ).select(wanted)  # fmt: skip
    if is_tidegate_table(dt.metadata()):
        # An encrypted column whose selected values are all null (a filter left none of its
        # values) is text all the same: before stop 45 it came back binary, so the frame's
        # types depended on the rows selected, and reads of one table did not concatenate.
        for i, f in enumerate(data.schema):
            col = data.column(i)
            if f.name != "raw" and is_bytes(f.type) and col.null_count == len(col):
                data = data.set_column(i, pa.field(f.name, pa.string()), pa.nulls(len(col), pa.string()))
    if backend == "arrow":
        return data
    if backend == "pandas":
        return data.to_pandas()
    return pl.from_arrow(data)
