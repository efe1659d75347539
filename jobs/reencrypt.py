"""Re-encryption after a key rotation: move a Delta table's values to each tenant's current key version.

    tidegate keys rotate acme                                   # new values use version N+1
    tidegate keys reencrypt --table s3://lake/triage/results    # old values rewritten under N+1
    tidegate keys revoke acme N                                 # now nothing needs version N

`reencrypt_table` reads the table at one version, and for each encrypted column (given, or every
column `is_encrypted` finds) rewrites the values whose key version is not their tenant's current
one, keeping mode (random/deterministic), tenant and row binding; inline PII tokens inside text
columns (clear or encrypted) are re-sealed the same way. Every other cell is kept byte for byte.
The result replaces the table in one Delta commit (overwrite from the snapshot read), with the
table's own schema and partitioning; the log's application transactions (the pipeline's
exactly-once positions) are table metadata and survive it. Rows another writer appends meanwhile
are not in the snapshot: an overwrite only removes the files it read, so they are kept; they may
still hold values under the old version (sealed before their writer read the rotated keyring:
a job's commit in flight, an online replica's buffered or journaled audit rows), which is why
`tidegate keys reencrypt` passes over the table again until a pass finds nothing stale, waiting
`--settle-s` (the writers' longest commit interval) before each. Any other commit meanwhile (a compaction, a replay's update)
rewrote rows the snapshot holds: delta-rs does not take it for a conflict, and the overwrite would
keep the rewritten files beside the snapshot's rows (every compacted row twice), so the write is
refused (ReencryptConflict: run it again; pausing maintenance avoids it). The check (the snapshot's files are all
still in the table, and the log names no rewriting commit) is made just before the commit, so a
rewrite landing in between (milliseconds) is not seen. Nothing is written
when nothing is stale.

A value under a revoked version cannot be re-encrypted (KeyRevokedError): rotate and re-encrypt
before revoking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crypto import (
    KeySource,
    decrypt_column,
    encrypt_column,
    is_encrypted,
    reseal_pii,
    row_ids_from,
    stored_groups,
)
from crypto.arrow import is_bytes
from crypto.binding import binding_of
from schemas.errors import DecryptionError, KeyPermissionError, KeyRevokedError, SinkError, SpecError, TidegateError

if TYPE_CHECKING:
    from crypto.keyring import Keyring

log = logging.getLogger(__name__)


class ReencryptConflict(TidegateError):
    """A commit that rewrote rows landed while the table was being re-encrypted: nothing written."""


@dataclass
class ReencryptReport:
    """What reencrypt_table did: rows rewritten per column, and the table versions before and after."""

    table: str
    read_version: int
    written_version: int | None  # None: nothing was stale, nothing written
    rows_rewritten: dict[str, int] = field(default_factory=dict)
    # Text in PII columns shaped like a token under an old key version (or of a tenant the keyring
    # lacks) that did not open here: left as it is. Forged, or a wrong table label (`table=`).
    unopened_tokens: int = 0
    # Likewise, values of a column of stored and clear values (dead-letter `raw`) shaped like a
    # stored value under an old key version (or of a tenant the keyring lacks) that did not open.
    unopened_values: int = 0

    @property
    def total(self) -> int:
        return sum(self.rows_rewritten.values())


def reencrypt_values(
    values: pa.Array | pa.ChunkedArray,
    row_ids: pa.Array | None,
    *,
    table: str,
    column: str,
    keyring: KeySource,
    pii: bool = True,
    usage: dict[tuple[str, int], int] | None = None,
    unopened: list[int] | None = None,
    unopened_values: list[int] | None = None,
) -> tuple[pa.Array, int]:
    """Rewrite the stale values of one column (pure): returns (new column, rows rewritten).

    values  an encrypted binary column, or a text column that may hold inline PII tokens
    pii     whether the column may hold inline PII tokens (the table binding's pii_columns: the
            only columns the encryption stage writes tokens into); elsewhere "[PII:" is text
    usage   (tenant, version) -> values sealed, added to (the keyring's counters)
    unopened, unopened_values  [n]: PII tokens, and stored values of a column that also holds clear
            bytes, under an old key version that did not open here, added to (left as they are)
    """
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    n = len(values)
    if not is_encrypted(values):
        if pii and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            new, changed = reseal_pii(values, row_ids, table=table, column=column, keyring=keyring, usage=usage,
                                      unopened=unopened)  # fmt: skip
            return (new.cast(values.type), int(changed.sum())) if changed.any() else (values, 0)
        if is_bytes(values.type):
            return _reencrypt_mixed(values, row_ids, table=table, column=column, keyring=keyring, pii=pii, usage=usage,
                                    unopened=unopened, unopened_values=unopened_values)  # fmt: skip
        return values, 0
    stale = np.zeros(n, dtype=bool)
    current: dict[str, int] = {}
    groups = stored_groups(values)
    for tenant, version, _, idx in groups:
        if tenant not in current:
            current[tenant] = keyring.current(tenant)
        if version != current[tenant]:
            stale[idx] = True
    # text values may hold inline PII tokens: look inside them all (a fresh outer value can wrap stale tokens)
    clear = decrypt_column(values, row_ids, table=table, column=column, keyring=keyring)
    if pii and pa.types.is_string(clear.type):
        resealed, changed = reseal_pii(clear, row_ids, table=table, column=column, keyring=keyring, usage=usage,
                                       unopened=unopened)  # fmt: skip
        if changed.any():
            clear, stale = resealed, stale | changed
    if not stale.any():
        return values, 0
    owner = np.full(n, None, dtype=object)  # each row's tenant, from its stored value
    det = np.zeros(n, dtype=bool)
    for tenant, _, deterministic, idx in groups:
        owner[idx] = tenant
        det[idx] = deterministic
    tenants = pa.array(owner, pa.string())
    replaced = values
    for mode in (False, True):
        pick = np.flatnonzero(stale & (det == mode))
        if not len(pick):
            continue
        take = pa.array(pick)
        if usage is not None:
            for tenant in owner[pick]:
                key = (tenant, current[tenant] if tenant in current else keyring.current(tenant))
                usage[key] = usage.get(key, 0) + 1
        fresh = encrypt_column(
            clear.take(take),
            row_ids.take(take) if row_ids is not None else None,
            table=table,
            column=column,
            tenants=tenants.take(take),
            keyring=keyring,
            deterministic=mode,
        )
        replaced = pc.replace_with_mask(replaced, _mask(n, pick), fresh.cast(values.type))
    return replaced, int(stale.sum())


def _reencrypt_mixed(values: pa.Array, row_ids: pa.Array | None, *, table: str, column: str,
                     keyring: KeySource, pii: bool, usage: dict | None, unopened: list[int] | None,
                     unopened_values: list[int] | None) -> tuple[pa.Array, int]:  # fmt: skip
    """A binary column some of whose values are stored values and some clear bytes (dead-letter
    `raw` from before `dead_letter_raw` was turned on): the stored ones are re-encrypted, the clear
    ones kept. Before, the whole column was taken for clear and skipped, and revoking the old
    version then destroyed its encrypted values. One check per value: only for such columns."""
    from crypto.format import FORMAT_VERSION, MAGIC

    # Only values that start like a stored value are checked one by one (a clear column: none), and
    # one counts as stored only if it decrypts: clear bytes can look like a header (a client's
    # event dead-lettered as it came), and one such value must not stop the whole table's pass.
    # When none opens, those under an old version of their tenant (or of a tenant the keyring
    # lacks) are counted (unopened_values): a wrong table label makes every stored value so, and
    # before stop 45 they were all kept as clear bytes ("nothing to re-encrypt", and a revoke
    # destroyed them). When some open, the label is right and the others are not ours (a client's
    # bytes shaped like a header, dead-lettered as they came): counted, they would block every
    # `reencrypt && revoke` for good.
    maybe = pc.fill_null(pc.starts_with(values, pattern=MAGIC + bytes((FORMAT_VERSION,))), False)
    sealed = np.zeros(len(values), dtype=bool)
    not_opened = 0  # shaped like a stored value under an old version (or an unknown tenant), not opened
    for i in np.flatnonzero(maybe.to_numpy(zero_copy_only=False)):
        one = values.slice(int(i), 1)
        if not is_encrypted(one):
            continue
        try:
            decrypt_column(one, row_ids.slice(int(i), 1) if row_ids is not None else None, table=table, column=column,
                           keyring=keyring)  # fmt: skip
        except (DecryptionError, KeyPermissionError, KeyRevokedError):  # not ours, or cannot tell: kept as the bytes it is
            not_opened += _under_an_old_version(one, keyring)
            continue
        sealed[i] = True
    if not sealed.any():
        if not_opened and unopened_values is not None:
            unopened_values[0] += not_opened
        return values, 0
    if not_opened:
        log.warning("%s.%s: %d value(s) shaped like a stored value did not open here, beside %d that did; left as "
                    "they are", table, column, not_opened, int(sealed.sum()))  # fmt: skip
    pick = pa.array(np.flatnonzero(sealed))
    fresh, rewritten = reencrypt_values(values.take(pick), row_ids.take(pick) if row_ids is not None else None,
                                        table=table, column=column, keyring=keyring, pii=pii, usage=usage,
                                        unopened=unopened)  # fmt: skip
    if not rewritten:
        return values, 0
    return pc.replace_with_mask(values, pa.array(sealed), fresh.cast(values.type)), rewritten


def _under_an_old_version(one: pa.Array, keyring: KeySource) -> bool:
    """Whether one stored value's header names a key version other than its tenant's current one
    (or a tenant the keyring has no key for): a value a revoke could strand."""
    try:
        groups = stored_groups(one)
    except DecryptionError:  # not even a header
        return False
    for tenant, version, _, _ in groups:
        try:
            return version != keyring.current(tenant)
        except (KeyPermissionError, KeyRevokedError):
            return True
    return False


def _mask(n: int, idx: np.ndarray) -> pa.Array:
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return pa.array(m)


def reencrypt_table(
    uri: str,
    keyring: Keyring | KeySource,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, str] | None = None,
    *,
    table: str | None = None,
    row_id_columns: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ReencryptReport:
    """Rewrite a Delta table's values that use an old key version, in one overwrite commit.

    columns  encrypted columns to look at (and text columns with inline PII); None: every encrypted
             column and every text column
    table    the label values are bound to, when the table's own binding cannot say (crypto/binding.py)
    progress progress(step, done, total) after each step: "read", each column's name, "write"
    """
    def step(name: str, done: int, total: int) -> None:
        if progress is not None:
            progress(name, done, total)

    import polars as pl
    from deltalake import DeltaTable, write_deltalake

    from deltalake.exceptions import TableNotFoundError

    from jobs.logs import redact_text

    try:
        dt = DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        raise SinkError(f"no Delta table at {redact_text(uri)}") from None
    schema = pa.schema(dt.schema().to_arrow())
    binding = binding_of(dt.metadata(), schema, uri)
    label = table or binding.label
    row_id_columns = tuple(row_id_columns or binding.row_id_columns)
    data = pl.read_delta(dt).to_arrow(compat_level=pl.CompatLevel.oldest())
    names = data.column_names
    if columns is not None:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise SpecError(f"--column: no such column(s) in the table: {', '.join(unknown)} (it has {', '.join(names)})")
    targets = list(columns) if columns is not None else [c for c in names if c not in row_id_columns]
    row_ids = row_ids_from(data, row_id_columns) if all(c in names for c in row_id_columns) else None
    report = ReencryptReport(table=label, read_version=dt.version(), written_version=None)
    steps = len(targets) + 2  # read, each column, write
    step("read", 1, steps)
    usage: dict[tuple[str, int], int] = {}
    unopened, unopened_values = [0], [0]
    for i, c in enumerate(targets, start=2):
        new, count = reencrypt_values(data.column(c), row_ids, table=label, column=c, keyring=keyring,
                                      pii=c in binding.pii_columns, usage=usage, unopened=unopened,
                                      unopened_values=unopened_values)  # fmt: skip
        if count:
            data = data.set_column(names.index(c), data.schema.field(c), new)
            report.rows_rewritten[c] = count
        step(c, i, steps)
    report.unopened_tokens, report.unopened_values = unopened[0], unopened_values[0]
    if not report.total:
        step("write (nothing stale)", steps, steps)
        return report
    from deltalake.exceptions import CommitFailedError

    from connectors.delta import safe_writer_properties
    from schemas.spec import ParquetSpec

    partitions = dt.metadata().partition_columns
    if usage and callable(getattr(keyring, "record_usage", None)):
        # Counted before the write (a write that fails over-counts, the safe way): the values sealed
        # here count toward rotate_after_values like the job's own (before stop 43 they did not).
        keyring.record_usage(usage)
    _no_rewrite_since(DeltaTable(uri, storage_options=storage_options), dt, report.read_version, uri)
    try:
        write_deltalake(
            dt,
            data.cast(schema),
            mode="overwrite",
            partition_by=partitions or None,
            storage_options=storage_options,
            # As the sink writes: statistics on the safe columns only (none on ids, text, raw bytes).
            writer_properties=safe_writer_properties(ParquetSpec(), names),
        )
    except CommitFailedError as e:  # delta-rs's own conflict check (a metadata change, say): nothing written
        # (the URI, and delta-rs's message that may quote it, masked: an object store URI may carry credentials)
        why = redact_text((str(e).splitlines() or [""])[0])[:200]  # masked before it is cut (a cut URI escapes the mask)
        raise ReencryptConflict(f"{redact_text(uri)}: a commit since version {report.read_version} conflicts with the "
                                f"re-encryption ({why}); nothing was written. Run it again") from None  # fmt: skip
    report.written_version = DeltaTable(uri, storage_options=storage_options).version()
    step("write", steps, steps)
    return report


# Commits that change no row the snapshot holds: appends, and table metadata or housekeeping.
# Anything else (OPTIMIZE, UPDATE, DELETE, MERGE, an overwrite, an unknown operation) refuses.
_LEAVES_ROWS = {"VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "ADD COLUMN", "CHANGE COLUMN",
                "UPDATE FIELD METADATA", "ADD CONSTRAINT", "DROP CONSTRAINT", "CREATE TABLE"}  # fmt: skip


def _no_rewrite_since(latest, read, read_version: int, uri: str) -> None:
    """Raise ReencryptConflict if a commit after read_version did more than append rows: a file
    of the snapshot read (`read`) is no longer in the table (`latest`), or the log names such a
    commit. The files first: the log's history lists only the commit files still there, and a
    table that checkpoints and cleans its log (log_retention_hours: 0.25 for online endpoints)
    may have dropped a compaction's commit file by the time a long re-encryption ends."""
    from jobs.logs import redact_text

    gone = set(read.file_uris()) - set(latest.file_uris())
    if gone:
        raise ReencryptConflict(
            f"{redact_text(uri)}: {len(gone)} file(s) of version {read_version} were rewritten or removed while the table was being "
            "re-encrypted (a compaction, an update); nothing was written. Run it again (pause the table's maintenance "
            "to avoid this)"
        )
    newer = latest.version() - read_version
    if newer <= 0:
        return
    for commit in latest.history(newer):
        op = commit.get("operation")
        append = op == "WRITE" and (commit.get("operationParameters") or {}).get("mode") == "Append"
        if not append and op not in _LEAVES_ROWS:
            raise ReencryptConflict(
                f"{redact_text(uri)}: version {commit.get('version')} ({commit.get('operation')}) rewrote rows while the table was "
                "being re-encrypted; nothing was written. Run it again (pause the table's maintenance to avoid this)"
            )
