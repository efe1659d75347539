"""Whole-value encryption of Arrow columns (stored format: crypto/format.py).

    encrypt_column(values: string|binary Array, row_ids, table=, column=, tenants=, keyring=)  -> binary Array
    decrypt_column(values: binary Array, row_ids, table=, column=, keyring=)                   -> string|binary Array

Nulls stay null. Each value is encrypted under its row's tenant's current key version (the keyring
is anything with `current(tenant) -> int` and `data_key(tenant, version) -> bytes`, normally
crypto.keyring.Keyring). A value that stays encrypted in a text column (on_missing_key="keep" on
text) is written as `tgenc1:<base64url of the stored value>`; decrypt_column accepts that form too.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag

from crypto.arrow import (
    RowIds, buffers, chunk_groups, cut_sealed, cuts, flat, groups_by_code, in_row_order, is_bytes, is_text,
    make_array, new_output, nonce_cutter, offsets_of, pack, tenant_groups, valid_mask,
)  # fmt: skip
from crypto.format import (
    ARMOR_PREFIX, FLAG_BYTES, FLAG_DETERMINISTIC, FORMAT_VERSION, MAGIC, NONCE_BYTES, SIV_BYTES, TAG_BYTES,
    KeySource, OnMissingKey, armor, derive_keys, header, lp, parse_header,
)  # fmt: skip
from schemas.encryption import ROW_ID_COLUMNS
from schemas.errors import DecryptionError, KeyPermissionError, KeyRevokedError



def encrypt_column(
    values: pa.Array | pa.ChunkedArray,
    row_ids: pa.Array | pa.ChunkedArray | Sequence | None,
    *,
    table: str,
    column: str,
    tenants: str | pa.Array | pa.ChunkedArray | Sequence[str],
    keyring: KeySource,
    deterministic: bool = False,
) -> pa.Array:
    """Encrypt each value of a string or binary column under its tenant's current key version.

    values   string/large_string/binary/large_binary (cast or JSON-encode other types first)
    row_ids  one id per row (strings or integers), unique within the table; unused when deterministic
    tenants  one tenant id for all rows, or one per row (an Array or a list)
    returns  binary Array (stored format in the module docstring); nulls stay null

    Raises KeyPermissionError (no key for a tenant), KeyRevokedError (a tenant with no active version).
    """
    return _encrypt(values, row_ids, table, column, tenants, keyring, deterministic)


# Rows per inner batch and group. The per-value objects (plaintexts, nonces, ciphertexts) of one
# batch stay in the CPU caches and the allocator reuses their memory batch after batch (whole-column
# lists were measured 1.3-1.5x slower on 200k values), while the numpy and struct set-up per batch
# and group stays small next to the AEAD calls.
CHUNK_ROWS = 4096


def _batch_rows(groups: int) -> int:
    # rows of several tenants interleaved: a batch splits into one run per group, so take more rows
    return CHUNK_ROWS * max(1, min(groups, 16))


def _encrypt(values, row_ids, table, column, tenants, keyring, deterministic) -> pa.Array:
    values = flat(values)
    if is_text(values.type):
        flags = 0
    elif is_bytes(values.type):
        flags = FLAG_BYTES
    else:
        raise TypeError(f"{table}.{column}: encrypt_column takes string or binary values, not {values.type}")
    if deterministic:
        flags |= FLAG_DETERMINISTIC
    n = len(values)
    what = f"{table}.{column}"
    rows = RowIds(row_ids, n)
    valid = valid_mask(values)
    data, starts, ends = buffers(values)
    codes = np.full(n, -1, dtype=np.int64)  # row -> index in `groups`; -1: null
    groups: list[tuple[bytes, Callable, Any]] = []  # (header, AEAD encrypt, AAD prefix (GCM) or AAD list (SIV))
    for code, (tenant, idx) in enumerate(tenant_groups(tenants, n, valid, rows, what)):
        version = keyring.current(tenant)
        keys = derive_keys(keyring, tenant, version)
        hdr = header(tenant, version, flags)
        codes[idx] = code
        if deterministic:
            groups.append((hdr, keys.siv.encrypt, [hdr, table.encode(), column.encode()]))
        else:
            rows.check(idx, what)
            groups.append((hdr, keys.gcm.encrypt, hdr + lp(table) + lp(column)))
    header_len = np.array([len(g[0]) for g in groups] + [0], dtype=np.int64)  # [-1] -> 0 for nulls
    overhead = SIV_BYTES if deterministic else NONCE_BYTES + TAG_BYTES
    sealed_len = np.where(codes >= 0, ends - starts + (SIV_BYTES if deterministic else TAG_BYTES), 0)
    offsets = offsets_of(np.where(codes >= 0, header_len[codes] + overhead + (ends - starts), 0))
    # byte length of each piece written: header, [nonce,] ciphertext (0, 0, 0 for a null)
    pieces = (
        [header_len[codes], sealed_len]
        if deterministic
        else [header_len[codes], (codes >= 0) * NONCE_BYTES, sealed_len]
    )
    piece_len = np.stack(pieces, axis=1)
    out, view = new_output(int(offsets[-1]))
    k = len(pieces)
    step = _batch_rows(len(groups))
    for a in range(0, n, step):
        b = min(n, a + step)
        hdrs, nonces, cts = [], [], []
        for code, loc in chunk_groups(codes, a, b):
            hdr, seal, aad = groups[code]
            at = loc + a
            m = len(at)
            pts = cuts(data, starts[at], ends[at])
            if deterministic:
                sealed = list(map(seal, pts, repeat(aad, m)))
            else:
                # one urandom call per batch; 96-bit random nonces (collision odds stay negligible
                # below ~2^32 values per key version: rotate long before that)
                ns = nonce_cutter(m).unpack(os.urandom(NONCE_BYTES * m))
                aads = list(map(aad.__add__, cuts(rows.data, rows.starts[at], rows.ends[at])))
                sealed = list(map(seal, ns, pts, aads))
                nonces.append((loc, ns))
            hdrs.append((loc, [hdr] * m))
            cts.append((loc, sealed))
        mc = b - a
        parts: list = [b""] * (k * mc)
        parts[0::k] = in_row_order(mc, hdrs)
        if not deterministic:
            parts[1::k] = in_row_order(mc, nonces)
        parts[k - 1 :: k] = in_row_order(mc, cts)
        pack(view, int(offsets[a]), parts, piece_len[a:b])
    return make_array(valid, offsets, out, text=False)


class _Parsed:
    """Headers of a binary column's valid values, checked and grouped (vectorised).

    The first 16 bytes of every value are gathered in one numpy fancy-index over an unaligned
    strided view of the buffer (16-byte items starting at every byte), then read as two
    little-endian 64-bit words: magic, format, flags, tenant length and, for tenant ids of up to 6
    characters, the whole header. Longer headers take one more gather."""

    def __init__(self, values: pa.Array, rows: RowIds, table: str, column: str):
        self.n = len(values)
        self.valid = valid_mask(values)
        self.data, starts, ends = buffers(values)
        self.starts, self.ends = starts, ends
        self.hl = np.zeros(self.n, dtype=np.int64)
        self.groups: list[tuple[bytes, np.ndarray]] = []
        vidx = np.flatnonzero(self.valid)
        if not len(vidx):
            return
        u8 = np.frombuffer(self.data, dtype=np.uint8)
        s = starts[vidx]
        ln = ends[vidx] - s
        # every stored value has at least 10 + 1 + 16 bytes (header with a 1-char tenant, tag)
        ok = ln >= 27
        if len(u8) < 27:
            self._bad(vidx, ~ok, rows, table, column)
        all_ok = bool(ok.all())
        head = _gather(u8, s if all_ok else np.minimum(s, len(u8) - 16), 16)  # short values: garbage, rejected
        w0 = head[:, 0]
        if all_ok and (w0 == w0[0]).all():
            # the usual column: one tenant and key version, so one first word: check it once
            flags, tlen, bad = w0[:1] >> 32 & 0xFF, w0[:1] >> 40 & 0xFF, np.zeros(1, dtype=bool)
        else:
            flags, tlen, bad = w0 >> 32 & 0xFF, w0 >> 40 & 0xFF, ~ok
        magic = int.from_bytes(MAGIC + bytes((FORMAT_VERSION,)), "little")
        bad = (
            bad | (w0[: len(flags)] & 0xFFFFFFFF != magic) | (flags & ~np.uint64(FLAG_DETERMINISTIC | FLAG_BYTES) != 0)
        )
        hl = 10 + tlen.astype(np.int64)
        need = hl + np.where(flags & FLAG_DETERMINISTIC, SIV_BYTES, NONCE_BYTES + TAG_BYTES)
        bad = bad | (ln < need)  # broadcasts when one header was checked for all
        if bad.any():
            self._bad(vidx, bad, rows, table, column)
        hl = np.broadcast_to(hl, ln.shape)
        self.hl[vidx] = hl
        # Group rows by their whole header (flags, tenant, version), one distinct header length at a
        # time. A value is at least header + 16 bytes long: every gather stays inside its value.
        lengths = [int(hl[0])] if (hl == hl[0]).all() else np.unique(hl).tolist()  # np.unique sorts: avoid
        for h in lengths:
            sel = np.arange(len(hl)) if len(lengths) == 1 else np.flatnonzero(hl == h)
            at = s[sel]
            nw = (h + 7) // 8
            key = head[sel, :nw].copy() if nw <= 2 else _gather(u8, at, 8 * nw)
            key[:, -1] &= np.uint64((1 << (8 * (h - 8 * (nw - 1)))) - 1)  # drop bytes past the header
            if (key == key[0]).all():
                self.groups.append((bytes(u8[at[0] : at[0] + h]), vidx[sel]))
                continue
            # several headers: hash them (Arrow's dictionary encoding, no sort); the masked key bytes
            # start with the header itself
            keys = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * nw), len(sel), [None, pa.py_buffer(key)])
            encoded = keys.dictionary_encode()
            headers = [v[:h] for v in encoded.dictionary.to_pylist()]
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            for code, idx in groups_by_code(codes, vidx[sel]):
                self.groups.append((headers[code], idx))

    @staticmethod
    def _bad(vidx: np.ndarray, bad: np.ndarray, rows: RowIds, table: str, column: str) -> None:
        i = int(vidx[np.argmax(bad)])
        raise DecryptionError(
            f"{table}.{column} row {rows.name(i)}: not a Tidegate encrypted value (bad header or truncated)",
            table,
            column,
            rows.name(i),
        )


def _gather(u8: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """u8[at[i] : at[i] + width] for each i as little-endian 64-bit words, shape (len(at), width // 8)."""
    items = np.ndarray(shape=(len(u8) - width + 1,), dtype=f"V{width}", buffer=u8, strides=(1,))
    return items[at].view("<u8").reshape(len(at), width // 8)




def _dearmor(values: pa.Array, table: str, column: str, rows: RowIds) -> pa.Array:
    out = []
    for i, s in enumerate(values.to_pylist()):
        if s is None:
            out.append(None)
            continue
        if not s.startswith(ARMOR_PREFIX):
            raise DecryptionError(
                f"{table}.{column} row {rows.name(i)}: not a Tidegate encrypted value", table, column, rows.name(i)
            )
        b = s[len(ARMOR_PREFIX) :]
        try:
            out.append(base64.urlsafe_b64decode(b + "=" * (-len(b) % 4)))
        except (binascii.Error, ValueError):  # truncated, or not ASCII: named, never quoted
            raise DecryptionError(f"{table}.{column} row {rows.name(i)}: an encrypted value whose text is not "
                                  "base64", table, column, rows.name(i)) from None  # fmt: skip
    return pa.array(out, pa.binary())


def decrypt_column(
    values: pa.Array | pa.ChunkedArray,
    row_ids: pa.Array | pa.ChunkedArray | Sequence | None = None,
    *,
    table: str,
    column: str,
    keyring: KeySource,
    tenants: str | pa.Array | pa.ChunkedArray | Sequence[str] | None = None,
    on_missing_key: OnMissingKey = "raise",
) -> pa.Array:
    """Decrypt a column written by encrypt_column (or its `tgenc1:` text form).

    row_ids         the same ids given to encrypt_column (needed for random-mode values)
    tenants         optional: the tenant each row must belong to (a value of another tenant -> DecryptionError)
    on_missing_key  "raise": KeyPermissionError / KeyRevokedError; "keep": such values stay encrypted
    returns         string Array if every value was text, else binary; kept values are the stored bytes
                    (binary result) or their `tgenc1:` text form (string result); nulls stay null

    Raises DecryptionError (tampered, truncated, moved to another row/column/table) naming table,
    column and row id, never the value.
    """
    return _decrypt(values, row_ids, table, column, keyring, tenants, on_missing_key)


def _decrypt(values, row_ids, table, column, keyring, tenants, on_missing_key) -> pa.Array:
    values = flat(values)
    what = f"{table}.{column}"
    n = len(values)
    rows = RowIds(row_ids, n)
    if is_text(values.type):
        values = _dearmor(values, table, column, rows)
    elif not is_bytes(values.type):
        raise TypeError(f"{what}: decrypt_column takes a binary column, not {values.type}")
    parsed = _Parsed(values, rows, table, column)
    data, starts, ends, hl = parsed.data, parsed.starts, parsed.ends, parsed.hl
    expected = None
    if tenants is not None and not isinstance(tenants, str):
        expected = flat(tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray)) else pa.array(list(tenants)))
    text = all(not (parse_header(h)[0] & FLAG_BYTES) for h, _ in parsed.groups)
    codes = np.full(n, -1, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    # per group: (open function or None when kept, deterministic, AAD prefix (GCM) or AAD list (SIV))
    groups: list[tuple[Callable | None, bool, Any]] = []
    for code, (hdr, idx) in enumerate(parsed.groups):
        flags, tenant, version = parse_header(hdr)
        codes[idx] = code
        stored = ends[idx] - starts[idx]
        if tenants is not None:
            if expected is None:  # one tenant for every row
                mismatch = np.full(len(idx), tenants != tenant)
            else:
                same = pc.equal(expected.take(pa.array(idx)), tenant).fill_null(False)
                mismatch = ~same.to_numpy(zero_copy_only=False)
            if mismatch.any():
                rid = rows.name(int(idx[np.argmax(mismatch)]))
                raise DecryptionError(f"{what} row {rid}: value belongs to another tenant", table, column, rid)
        deterministic = bool(flags & FLAG_DETERMINISTIC)
        try:
            keys = derive_keys(keyring, tenant, version)
        except (KeyPermissionError, KeyRevokedError) as e:
            if on_missing_key != "keep":
                raise type(e)(f"{what}: {e}", tenant, version) from None
            groups.append((None, deterministic, None))  # stays encrypted
            lengths[idx] = len(ARMOR_PREFIX) + (4 * stored + 2) // 3 if text else stored
            continue
        if deterministic:
            groups.append((keys.siv.decrypt, True, [hdr, table.encode(), column.encode()]))
            lengths[idx] = stored - hl[idx] - SIV_BYTES
        else:
            rows.check(idx, what)
            groups.append((keys.gcm.decrypt, False, hdr + lp(table) + lp(column)))
            lengths[idx] = stored - hl[idx] - NONCE_BYTES - TAG_BYTES
    offsets = offsets_of(lengths)
    out, view = new_output(int(offsets[-1]))
    step = _batch_rows(len(groups))
    for a in range(0, n, step):
        b = min(n, a + step)
        pieces = []
        for code, loc in chunk_groups(codes, a, b):
            open_, deterministic, aad = groups[code]
            at = loc + a
            if open_ is None:
                kept = cuts(data, starts[at], ends[at])
                pieces.append((loc, [armor(k).encode("ascii") for k in kept] if text else kept))
                continue
            if deterministic:
                args = (cuts(data, starts[at] + hl[at], ends[at]), [aad] * len(at))
            else:
                cut = cut_sealed(data, starts[at], ends[at], hl[at])  # nonce and ciphertext of each value
                aads = list(map(aad.__add__, cuts(rows.data, rows.starts[at], rows.ends[at])))
                args = (cut[0::2], cut[1::2], aads)
            try:
                pieces.append((loc, list(map(open_, *args))))
            except InvalidTag:
                bad = next(j for j in range(len(at)) if not _opens(open_, *(x[j] for x in args)))
                rid = rows.name(int(at[bad]))
                raise DecryptionError(f"{what} row {rid}: value does not decrypt here", table, column, rid) from None
        pack(view, int(offsets[a]), in_row_order(b - a, pieces), lengths[a:b, None])
    return make_array(parsed.valid, offsets, out, text=text)


def _opens(fn: Callable, *args: Any) -> bool:
    try:
        fn(*args)
        return True
    except InvalidTag:
        return False


def is_encrypted(values: pa.Array | pa.ChunkedArray) -> bool:
    """True if `values` is a binary column whose every non-null value has a valid stored-value header
    (and there is at least one). This is how the reader finds encrypted columns."""
    values = flat(values)
    if not is_bytes(values.type) or values.null_count == len(values):
        return False
    try:
        _Parsed(values, RowIds(None, len(values)), "?", "?")
    except DecryptionError:
        return False
    return True


def stored_groups(values: pa.Array | pa.ChunkedArray) -> list[tuple[str, int, bool, np.ndarray]]:
    """The non-null stored values of an encrypted column grouped by header:
    [(tenant, key version, deterministic, row indices)]. Raises DecryptionError for a value that is not one."""
    values = flat(values)
    parsed = _Parsed(values, RowIds(None, len(values)), "?", "?")
    out = []
    for hdr, idx in parsed.groups:
        flags, tenant, version = parse_header(hdr)
        out.append((tenant, version, bool(flags & FLAG_DETERMINISTIC), idx))
    return out


def key_versions(values: pa.Array | pa.ChunkedArray) -> list[tuple[str, int] | None]:
    """(tenant, version) of each stored value; None for nulls. For audits and tests."""
    out: list[tuple[str, int] | None] = [None] * len(values)
    for tenant, version, _, idx in stored_groups(values):
        for i in idx.tolist():
            out[i] = (tenant, version)
    return out


def is_deterministic(values: pa.Array | pa.ChunkedArray) -> bool:
    """True if the stored values of an encrypted column are deterministic (AES-SIV) ones."""
    groups = stored_groups(values)
    return bool(groups) and all(det for _, _, det, _ in groups)



def row_ids_from(table: pa.Table, columns: Sequence[str] = ROW_ID_COLUMNS) -> pa.Array:
    """Row ids of a results or dead-letter table: its source position, 'topic:partition:offset'."""
    parts = [pc.cast(flat(table.column(c)), pa.string()) for c in columns]
    if len(parts) == 1:
        return parts[0]
    return flat(pc.binary_join_element_wise(*parts, ":"))
