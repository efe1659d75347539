"""Field-level encryption over Arrow columns: pure logic (no Ray, no I/O besides os.urandom).

    encrypt_column(values: string|binary Array, row_ids, table=, column=, tenants=, keyring=)  -> binary Array
    decrypt_column(values: binary Array, row_ids, table=, column=, keyring=)                   -> string|binary Array
    protect_pii(values: string Array, row_ids, find_pii, mode, ...) -> string Array with [REDACTED:kind] or [PII:kind:token]
    reveal_pii(values: string Array, row_ids, ...)                  -> string Array with the tokens decrypted in place

Nulls stay null. Each value is encrypted under its row's tenant's current key version (the keyring
is anything with `current(tenant) -> int` and `data_key(tenant, version) -> bytes`, normally
connectors.keyring.Keyring).

Stored value (one Arrow `binary` cell; binary, not text, to save base64's third on every value):

    offset  size  field
    0       3     magic  A7 54 47  ("\\xa7TG"; 0xA7 cannot start UTF-8 text, so JSON or text never matches)
    3       1     format version = 1
    4       1     flags: bit 0 = deterministic (AES-SIV), bit 1 = plaintext is bytes (else UTF-8 text)
    5       1     n = length of the tenant id
    6       n     tenant id (ASCII, schemas.encryption.TENANT_RE)
    6+n     4     key version, unsigned big-endian
    10+n    ...   random mode:        nonce (12) || AES-256-GCM ciphertext || tag (16)   -> 38+n bytes of overhead
                  deterministic mode: SIV (16) || AES-SIV ciphertext                      -> 26+n bytes of overhead

The first 10+n bytes are "the header". Associated data (what a value is bound to):

    random (GCM):        header || u16 len || table || u16 len || column || row id (UTF-8, the rest)
    deterministic (SIV): [header, table, column]  (AES-SIV's vector of associated data; no row id, so equal
                         values are equal tokens within one column, tenant and key version: joinable)

so a value moved to another row (GCM), column or table, or with any header byte changed, fails
to decrypt (DecryptionError naming table, column and row id). Keys: the keyring's 256-bit data
key of (tenant, version) is expanded with HKDF-SHA256 into an AES-256-GCM key (info
"tidegate/v1/aes-256-gcm|<tenant>|<version>") and a 512-bit AES-SIV key ("tidegate/v1/aes-siv-512|...").

`table` is a stable logical name (see `table_label`), `column` the column name, and the row id a
string unique within the table (`row_ids_from`: "source_topic:source_partition:source_offset").

Inline PII token (inside a text column): `[PII:<kind>:<base64url, unpadded, of a stored value>]`,
GCM, with column `<column>#pii:<kind>` in the associated data. Text that already contained
"[PII:" is escaped to "[PII::" when tokens are inserted (and unescaped by reveal_pii), so a token
copied into the text by a model never passes for one of this row's.

A value that stays encrypted in a text column (decrypt_column(on_missing_key="keep") on text) is
written as `tgenc1:<base64url of the stored value>`; decrypt_column accepts that form too.

Speed (bench/crypto_fields.py): no Python bytecode runs per value. Columns go in batches
(CHUNK_ROWS rows per tenant group); per batch, one os.urandom call gives all nonces,
struct.unpack_from cuts all plaintexts (and row ids, stored nonces and ciphertexts) out of the
Arrow buffers, `map` drives the AAD concatenation and the AEAD method, and struct.pack_into
writes the results into the output Arrow buffer; headers are parsed and grouped with numpy.
"""

from __future__ import annotations

import base64
import functools
import hmac
import os
import re
import struct
import weakref
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.encryption import ROW_ID_COLUMNS, TENANT_RE
from schemas.errors import DecryptionError, KeyPermissionError, KeyRevokedError

MAGIC = b"\xa7TG"
FORMAT_VERSION = 1
FLAG_DETERMINISTIC = 0x01
FLAG_BYTES = 0x02
NONCE_BYTES = 12
TAG_BYTES = 16
SIV_BYTES = 16
ARMOR_PREFIX = "tgenc1:"

OnMissingKey = Literal["raise", "keep"]
PiiMode = Literal["encrypt", "redact", "off"]

_PII_KIND_RE = re.compile(r"[A-Za-z0-9_]+")
# one pass over the text: either an escaped literal "[PII::" or a token
_PII_TOKEN_RE = re.compile(r"\[PII:(?::|([A-Za-z0-9_]+):([A-Za-z0-9_-]+)\])")


class KeySource(Protocol):
    """What the ciphers need from a keyring (connectors.keyring.Keyring is one)."""

    def current(self, tenant: str) -> int: ...

    def data_key(self, tenant: str, version: int) -> bytes: ...


# -- keys


class _Keys:
    __slots__ = ("gcm", "siv")

    def __init__(self, data_key: bytes, tenant: str, version: int):
        info = f"|{tenant}|{version}".encode()
        self.gcm = AESGCM(HKDF(SHA256(), 32, salt=None, info=b"tidegate/v1/aes-256-gcm" + info).derive(data_key))
        self.siv = AESSIV(HKDF(SHA256(), 64, salt=None, info=b"tidegate/v1/aes-siv-512" + info).derive(data_key))


# Derived ciphers per keyring object, dropped with it. The keyring is asked for the data key on
# every call (so a revocation applies at once); the cache only saves the HKDF and cipher set-up.
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], tuple[bytes, _Keys]]] = weakref.WeakKeyDictionary()


def _keys(keyring: KeySource, tenant: str, version: int) -> _Keys:
    key = keyring.data_key(tenant, version)
    try:
        per = _CACHE.setdefault(keyring, {})
    except TypeError:  # not weak-referenceable: no cache
        per = {}
    hit = per.get((tenant, version))
    if hit is not None and hmac.compare_digest(hit[0], key):
        return hit[1]
    keys = _Keys(key, tenant, version)
    per[(tenant, version)] = (key, keys)
    return keys


def _header(tenant: str, version: int, flags: int) -> bytes:
    t = tenant.encode("ascii")
    return MAGIC + bytes((FORMAT_VERSION, flags, len(t))) + t + version.to_bytes(4, "big")


def _lp(text: str) -> bytes:
    b = text.encode()
    if len(b) > 0xFFFF:
        raise ValueError("table and column names must be under 64 KiB")
    return len(b).to_bytes(2, "big") + b


def _check_tenant(tenant: Any) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        # not repeated: a tenant column holding something else (an e-mail, say) must not leak here
        raise KeyPermissionError("no key for a tenant id that is not valid (1-64 of A-Z a-z 0-9 . _ -)", "<invalid>")
    return tenant


# -- Arrow plumbing


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    if not isinstance(values, pa.Array):
        values = pa.array(values)
    t = values.type
    if pa.types.is_null(t):  # all nulls, e.g. pa.array([None, None])
        values = values.cast(pa.string())
    elif pa.types.is_string_view(t):
        values = values.cast(pa.large_string())
    elif pa.types.is_binary_view(t):
        values = values.cast(pa.large_binary())
    return values


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _buffers(arr: pa.Array) -> tuple[memoryview, np.ndarray, np.ndarray]:
    """(data, starts, ends) of a string/binary array: value i is data[starts[i]:ends[i]].

    `data` is a memoryview of the Arrow buffer itself (no copy), as unsigned bytes: the format
    the AEAD functions accept."""
    n = len(arr)
    if n == 0:
        return memoryview(b""), np.zeros(0, np.int64), np.zeros(0, np.int64)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    dtype = np.int64 if large else np.int32
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=dtype, count=n + 1, offset=arr.offset * dtype().itemsize).astype(np.int64)
    o0, o1 = int(offs[0]), int(offs[-1])
    data = memoryview(bufs[2]).cast("B")[o0:o1] if bufs[2] is not None and o1 > o0 else memoryview(b"")
    offs -= o0
    return data, offs[:-1], offs[1:]


def _valid(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


# Cutting values out of a buffer, and writing them into one: one struct.unpack_from / pack_into
# call per batch, with a format like "=14x200s14x180s" (skip 14 bytes, take 200, ...), makes or
# copies every bytes object in C. Python-level slicing (a slice object, a getitem and a memoryview
# per value) cost 4-6x more; bytes.join into a fresh buffer then a copy, about 3x more.
_DIGITS: np.ndarray | None = None


def _digits(values: np.ndarray) -> np.ndarray:
    """Decimal digits (ASCII) of non-negative integers, zero-padded to the widest, as an (m, width) matrix."""
    global _DIGITS
    top = int(values.max()) if len(values) else 0
    width = len(str(top))
    if top < 100_000:
        if _DIGITS is None:
            table = "".join(f"{i:05d}" for i in range(100_000)).encode("ascii")
            _DIGITS = np.frombuffer(table, dtype=np.uint8).reshape(100_000, 5)
        return _DIGITS[:, 5 - width :][values]
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (48 + (values[:, None] // powers) % 10).astype(np.uint8)


def _format(counts: np.ndarray, letters: str) -> str:
    """A struct format for m rows of k items: counts is (m, k), letters the k format codes.

    [[14, 200], [14, 180]], "xs" -> "=14x200s14x180s" (each column zero-padded to its widest; a
    column with one count for every row is one constant token)."""
    m = counts.shape[0]
    if m == 0:
        return "="
    cols = []
    for j, letter in enumerate(letters):
        c = counts[:, j]
        if (c == c[0]).all():
            token = np.frombuffer(f"{int(c[0])}{letter}".encode("ascii"), dtype=np.uint8)
            cols.append(np.broadcast_to(token, (m, len(token))))
        else:
            d = _digits(c)
            cols.append(np.concatenate([d, np.full((m, 1), ord(letter), dtype=np.uint8)], axis=1))
    return "=" + np.concatenate(cols, axis=1).tobytes().decode("ascii")


def _cuts(buf: Any, starts: np.ndarray, ends: np.ndarray) -> tuple[bytes, ...]:
    """buf[starts[i]:ends[i]] for each i, as bytes; the ranges must be ascending and not overlap."""
    m = len(starts)
    if m == 0:
        return ()
    gaps = np.empty(m, dtype=np.int64)
    gaps[0] = 0
    np.subtract(starts[1:], ends[:-1], out=gaps[1:])
    if gaps.any():
        fmt = _format(np.stack([gaps, ends - starts], axis=1), "xs")
    else:
        fmt = _format((ends - starts)[:, None], "s")
    return struct.unpack_from(fmt, buf, int(starts[0]))


def _cut_sealed(buf: Any, starts: np.ndarray, ends: np.ndarray, hl: np.ndarray) -> tuple[bytes, ...]:
    """(nonce, ciphertext) pairs of GCM stored values, flattened: skip the header, take 12, take the rest."""
    if len(starts) and (starts[1:] == ends[:-1]).all():
        # values back to back (a batch of one group): skip header, take nonce, take ciphertext
        counts = np.stack([hl, np.full(len(hl), NONCE_BYTES), ends - starts - hl - NONCE_BYTES], axis=1)
        return struct.unpack_from(_format(counts, "xss"), buf, int(starts[0]))
    body = starts + hl
    lo = np.stack([body, body + NONCE_BYTES], axis=1).ravel()
    hi = np.stack([body + NONCE_BYTES, ends], axis=1).ravel()
    return _cuts(buf, lo, hi)


@functools.lru_cache(maxsize=8)
def _nonce_cutter(m: int) -> struct.Struct:
    return struct.Struct("=" + f"{NONCE_BYTES}s" * m)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _array(valid: np.ndarray, offsets: np.ndarray, data: Any, text: bool) -> pa.Array:
    """An Arrow string/binary array from its parts (large_* only past 2 GiB of data)."""
    n = len(valid)
    large = int(offsets[-1]) > 2**31 - 1
    typ = (pa.large_string() if large else pa.string()) if text else (pa.large_binary() if large else pa.binary())
    offsets = offsets if large else offsets.astype(np.int32)
    nulls = n - int(valid.sum())
    validity = pa.array(valid).buffers()[1] if nulls else None
    return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets), data], null_count=nulls)


def _output(size: int) -> tuple[pa.Buffer, memoryview]:
    """A fresh Arrow buffer for a result column and a writable view of it. Arrow's pool (mimalloc or
    jemalloc) reuses freed memory, where a large malloc would be a fresh mmap to fault in each time."""
    buf = pa.allocate_buffer(size)
    return buf, memoryview(buf).cast("B")


def _pack(view: memoryview, offset: int, parts: Sequence[bytes], lengths: np.ndarray) -> None:
    """Write `parts` back to back into view[offset:] in one struct.pack_into call; `lengths` is their
    byte lengths as an (m, k) matrix (m rows of k parts each)."""
    struct.pack_into(_format(lengths, "s" * lengths.shape[1]), view, offset, *parts)


def _chunk_groups(codes: np.ndarray, a: int, b: int) -> list[tuple[int, np.ndarray]]:
    """Rows a..b-1 split by group code (-1: null, in no group), as (code, local row indices)."""
    cc = codes[a:b]
    if len(cc) and cc[0] >= 0 and (cc == cc[0]).all():
        return [(int(cc[0]), np.arange(b - a))]
    sel = np.flatnonzero(cc >= 0)
    return _groups(cc[sel], sel)


class _RowIds:
    """Row ids as strings, for associated data (bytes) and error messages (str)."""

    def __init__(self, row_ids: pa.Array | pa.ChunkedArray | Sequence | None, n: int):
        self.present = row_ids is not None
        if row_ids is None:
            return
        arr = _flat(row_ids if isinstance(row_ids, (pa.Array, pa.ChunkedArray)) else pa.array(row_ids))
        if len(arr) != n:
            raise ValueError(f"row_ids has {len(arr)} rows, values {n}")
        if not _is_text(arr.type):
            arr = pc.cast(arr, pa.string())
        self.data, self.starts, self.ends = _buffers(arr)
        self.valid = _valid(arr)

    def name(self, i: int) -> str:
        if not self.present or not self.valid[i]:
            return f"#{i}"
        return bytes(self.data[self.starts[i] : self.ends[i]]).decode("utf-8", "replace")

    def check(self, idx: np.ndarray, what: str) -> None:
        """Rows `idx` hold values: each needs a row id."""
        if not self.present:
            raise ValueError(f"{what}: row_ids are required (random-mode values are bound to their row id)")
        if not self.valid[idx].all():
            raise ValueError(f"{what}: row #{int(idx[np.argmin(self.valid[idx])])} has a value but no row id")

    def bytes_of(self, idx: np.ndarray, what: str) -> tuple[bytes, ...]:
        """Row ids of rows `idx` (ascending) as bytes."""
        self.check(idx, what)
        return _cuts(self.data, self.starts[idx], self.ends[idx])


def _groups(codes: np.ndarray, idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split row indices `idx` by their code (codes[k] is the code of idx[k]), keeping row order within a group."""
    if len(idx) == 0:
        return []
    if (codes == codes[0]).all():
        return [(int(codes[0]), idx)]
    if codes.max() < 64:  # few codes (tenants interleaved row by row, say): one mask per code beats a sort
        return [(int(c), idx[codes == c]) for c in np.flatnonzero(np.bincount(codes))]
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    cut = np.flatnonzero(np.diff(sc)) + 1
    return [(int(sc[a]), idx[order[a:b]]) for a, b in zip(np.r_[0, cut], np.r_[cut, len(sc)])]


def _tenant_groups(tenants: Any, n: int, valid: np.ndarray, rows: _RowIds, what: str) -> list[tuple[str, np.ndarray]]:
    vidx = np.flatnonzero(valid)
    if isinstance(tenants, str):
        return [(_check_tenant(tenants), vidx)] if len(vidx) else []
    arr = _flat(tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray)) else pa.array(list(tenants)))
    if len(arr) != n:
        raise ValueError(f"{what}: tenants has {len(arr)} rows, values {n}")
    enc = arr.dictionary_encode()
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[vidx]
    if len(codes) and codes.min() < 0:
        raise ValueError(f"{what}: row {rows.name(int(vidx[np.argmin(codes)]))} has a value but no tenant")
    names = enc.dictionary.to_pylist()
    return [(_check_tenant(str(names[c])), idx) for c, idx in _groups(codes, vidx)]


def _in_row_order(n: int, groups: list[tuple[np.ndarray, Sequence[bytes]]]) -> Sequence[bytes]:
    """Scatter per-group sequences of bytes back into one list in row order; rows in no group get b""."""
    if len(groups) == 1 and len(groups[0][0]) == n:
        return groups[0][1]
    # an object array scatters in C (numpy keeps bytes as objects for an object target: no 'S' dtype
    # conversion, which would strip trailing NUL bytes)
    out = np.full(n, b"", dtype=object)
    for idx, items in groups:
        out[idx] = items
    return out.tolist()


# -- whole values


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
    values = _flat(values)
    if _is_text(values.type):
        flags = 0
    elif _is_bytes(values.type):
        flags = FLAG_BYTES
    else:
        raise TypeError(f"{table}.{column}: encrypt_column takes string or binary values, not {values.type}")
    if deterministic:
        flags |= FLAG_DETERMINISTIC
    n = len(values)
    what = f"{table}.{column}"
    rows = _RowIds(row_ids, n)
    valid = _valid(values)
    data, starts, ends = _buffers(values)
    codes = np.full(n, -1, dtype=np.int64)  # row -> index in `groups`; -1: null
    groups: list[tuple[bytes, Callable, Any]] = []  # (header, AEAD encrypt, AAD prefix (GCM) or AAD list (SIV))
    for code, (tenant, idx) in enumerate(_tenant_groups(tenants, n, valid, rows, what)):
        version = keyring.current(tenant)
        keys = _keys(keyring, tenant, version)
        hdr = _header(tenant, version, flags)
        codes[idx] = code
        if deterministic:
            groups.append((hdr, keys.siv.encrypt, [hdr, table.encode(), column.encode()]))
        else:
            rows.check(idx, what)
            groups.append((hdr, keys.gcm.encrypt, hdr + _lp(table) + _lp(column)))
    header_len = np.array([len(g[0]) for g in groups] + [0], dtype=np.int64)  # [-1] -> 0 for nulls
    overhead = SIV_BYTES if deterministic else NONCE_BYTES + TAG_BYTES
    sealed_len = np.where(codes >= 0, ends - starts + (SIV_BYTES if deterministic else TAG_BYTES), 0)
    offsets = _offsets(np.where(codes >= 0, header_len[codes] + overhead + (ends - starts), 0))
    # byte length of each piece written: header, [nonce,] ciphertext (0, 0, 0 for a null)
    pieces = (
        [header_len[codes], sealed_len]
        if deterministic
        else [header_len[codes], (codes >= 0) * NONCE_BYTES, sealed_len]
    )
    piece_len = np.stack(pieces, axis=1)
    out, view = _output(int(offsets[-1]))
    k = len(pieces)
    step = _batch_rows(len(groups))
    for a in range(0, n, step):
        b = min(n, a + step)
        hdrs, nonces, cts = [], [], []
        for code, loc in _chunk_groups(codes, a, b):
            hdr, seal, aad = groups[code]
            at = loc + a
            m = len(at)
            pts = _cuts(data, starts[at], ends[at])
            if deterministic:
                sealed = list(map(seal, pts, repeat(aad, m)))
            else:
                # one urandom call per batch; 96-bit random nonces (collision odds stay negligible
                # below ~2^32 values per key version: rotate long before that)
                ns = _nonce_cutter(m).unpack(os.urandom(NONCE_BYTES * m))
                aads = list(map(aad.__add__, _cuts(rows.data, rows.starts[at], rows.ends[at])))
                sealed = list(map(seal, ns, pts, aads))
                nonces.append((loc, ns))
            hdrs.append((loc, [hdr] * m))
            cts.append((loc, sealed))
        mc = b - a
        parts: list = [b""] * (k * mc)
        parts[0::k] = _in_row_order(mc, hdrs)
        if not deterministic:
            parts[1::k] = _in_row_order(mc, nonces)
        parts[k - 1 :: k] = _in_row_order(mc, cts)
        _pack(view, int(offsets[a]), parts, piece_len[a:b])
    return _array(valid, offsets, out, text=False)


class _Parsed:
    """Headers of a binary column's valid values, checked and grouped (vectorised).

    The first 16 bytes of every value are gathered in one numpy fancy-index over an unaligned
    strided view of the buffer (16-byte items starting at every byte), then read as two
    little-endian 64-bit words: magic, format, flags, tenant length and, for tenant ids of up to 6
    characters, the whole header. Longer headers take one more gather."""

    def __init__(self, values: pa.Array, rows: _RowIds, table: str, column: str):
        self.n = len(values)
        self.valid = _valid(values)
        self.data, starts, ends = _buffers(values)
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
            for code, idx in _groups(codes, vidx[sel]):
                self.groups.append((headers[code], idx))

    @staticmethod
    def _bad(vidx: np.ndarray, bad: np.ndarray, rows: _RowIds, table: str, column: str) -> None:
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


def _parse_header(hdr: bytes) -> tuple[int, str, int]:
    flags, tlen = hdr[4], hdr[5]
    return flags, hdr[6 : 6 + tlen].decode("ascii", "replace"), int.from_bytes(hdr[6 + tlen : 10 + tlen], "big")


def armor(stored: bytes) -> str:
    """A stored value as text: 'tgenc1:' + unpadded base64url."""
    return ARMOR_PREFIX + base64.urlsafe_b64encode(stored).rstrip(b"=").decode("ascii")


def _dearmor(values: pa.Array, table: str, column: str, rows: _RowIds) -> pa.Array:
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
        out.append(base64.urlsafe_b64decode(b + "=" * (-len(b) % 4)))
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
    values = _flat(values)
    what = f"{table}.{column}"
    n = len(values)
    rows = _RowIds(row_ids, n)
    if _is_text(values.type):
        values = _dearmor(values, table, column, rows)
    elif not _is_bytes(values.type):
        raise TypeError(f"{what}: decrypt_column takes a binary column, not {values.type}")
    parsed = _Parsed(values, rows, table, column)
    data, starts, ends, hl = parsed.data, parsed.starts, parsed.ends, parsed.hl
    expected = None
    if tenants is not None and not isinstance(tenants, str):
        expected = _flat(tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray)) else pa.array(list(tenants)))
    text = all(not (_parse_header(h)[0] & FLAG_BYTES) for h, _ in parsed.groups)
    codes = np.full(n, -1, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    # per group: (open function or None when kept, deterministic, AAD prefix (GCM) or AAD list (SIV))
    groups: list[tuple[Callable | None, bool, Any]] = []
    for code, (hdr, idx) in enumerate(parsed.groups):
        flags, tenant, version = _parse_header(hdr)
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
            keys = _keys(keyring, tenant, version)
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
            groups.append((keys.gcm.decrypt, False, hdr + _lp(table) + _lp(column)))
            lengths[idx] = stored - hl[idx] - NONCE_BYTES - TAG_BYTES
    offsets = _offsets(lengths)
    out, view = _output(int(offsets[-1]))
    step = _batch_rows(len(groups))
    for a in range(0, n, step):
        b = min(n, a + step)
        pieces = []
        for code, loc in _chunk_groups(codes, a, b):
            open_, deterministic, aad = groups[code]
            at = loc + a
            if open_ is None:
                kept = _cuts(data, starts[at], ends[at])
                pieces.append((loc, [armor(k).encode("ascii") for k in kept] if text else kept))
                continue
            if deterministic:
                args = (_cuts(data, starts[at] + hl[at], ends[at]), [aad] * len(at))
            else:
                cut = _cut_sealed(data, starts[at], ends[at], hl[at])  # nonce and ciphertext of each value
                aads = list(map(aad.__add__, _cuts(rows.data, rows.starts[at], rows.ends[at])))
                args = (cut[0::2], cut[1::2], aads)
            try:
                pieces.append((loc, list(map(open_, *args))))
            except InvalidTag:
                bad = next(j for j in range(len(at)) if not _opens(open_, *(x[j] for x in args)))
                rid = rows.name(int(at[bad]))
                raise DecryptionError(f"{what} row {rid}: value does not decrypt here", table, column, rid) from None
        _pack(view, int(offsets[a]), _in_row_order(b - a, pieces), lengths[a:b, None])
    return _array(parsed.valid, offsets, out, text=text)


def _opens(fn: Callable, *args: Any) -> bool:
    try:
        fn(*args)
        return True
    except InvalidTag:
        return False


def is_encrypted(values: pa.Array | pa.ChunkedArray) -> bool:
    """True if `values` is a binary column whose every non-null value has a valid stored-value header
    (and there is at least one). This is how the reader finds encrypted columns."""
    values = _flat(values)
    if not _is_bytes(values.type) or values.null_count == len(values):
        return False
    try:
        _Parsed(values, _RowIds(None, len(values)), "?", "?")
    except DecryptionError:
        return False
    return True


def stored_groups(values: pa.Array | pa.ChunkedArray) -> list[tuple[str, int, bool, np.ndarray]]:
    """The non-null stored values of an encrypted column grouped by header:
    [(tenant, key version, deterministic, row indices)]. Raises DecryptionError for a value that is not one."""
    values = _flat(values)
    parsed = _Parsed(values, _RowIds(None, len(values)), "?", "?")
    out = []
    for hdr, idx in parsed.groups:
        flags, tenant, version = _parse_header(hdr)
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


# -- tables and row ids


def table_label(uri: str, name: str | None = None) -> str:
    """The logical table name bound into values: the Delta table's `name` if it has one, else the
    last component of its URI ("s3://lake/triage/results" -> "results"). Stable when a table moves."""
    if name:
        return name
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def row_ids_from(table: pa.Table, columns: Sequence[str] = ROW_ID_COLUMNS) -> pa.Array:
    """Row ids of a results or dead-letter table: its source position, 'topic:partition:offset'."""
    parts = [pc.cast(_flat(table.column(c)), pa.string()) for c in columns]
    if len(parts) == 1:
        return parts[0]
    return _flat(pc.binary_join_element_wise(*parts, ":"))


# -- PII inside text


def _pii_aad_column(column: str, kind: str) -> str:
    return f"{column}#pii:{kind}"


def _kind(kind: Any) -> str:
    k = str(kind)
    return k if _PII_KIND_RE.fullmatch(k) else re.sub(r"[^A-Za-z0-9_]", "_", k) or "pii"


def _spans(text: str, found: Sequence[Any]) -> list[tuple[int, int, str]]:
    """Detected spans, in order, overlaps dropped (the earlier, then the longer, wins), clipped to the text."""
    spans = sorted(
        ((max(0, int(p.start)), min(len(text), int(p.end)), _kind(p.kind)) for p in found),
        key=lambda s: (s[0], -s[1]),
    )
    out, end = [], 0
    for a, b, k in spans:
        if a >= end and b > a:
            out.append((a, b, k))
            end = b
    return out


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def protect_pii(
    values: pa.Array | pa.ChunkedArray,
    row_ids: pa.Array | pa.ChunkedArray | Sequence | None,
    find_pii: Callable[[str], Sequence[Any]],
    mode: PiiMode,
    *,
    table: str,
    column: str,
    tenants: str | pa.Array | pa.ChunkedArray | Sequence[str] | None = None,
    keyring: KeySource | None = None,
) -> pa.Array:
    """Replace the PII that `find_pii(text) -> [span with .kind, .start, .end]` finds in each text.

    mode "redact":  "mail me at a@b.c" -> "mail me at [REDACTED:email]"
    mode "encrypt": "mail me at a@b.c" -> "mail me at [PII:email:p0dHAQAEYWNtZQAAAAE...]" (tenants, keyring
                    and row_ids required; reveal_pii puts the text back)
    mode "off":     values returned as they are
    returns a string Array; nulls stay null.
    """
    values = _flat(values)
    if mode == "off":
        return values
    if mode not in ("redact", "encrypt"):
        raise ValueError(f"pii mode must be encrypt, redact or off, not {mode!r}")
    if not _is_text(values.type):
        raise TypeError(f"{table}.{column}: protect_pii takes a string column, not {values.type}")
    n = len(values)
    texts = values.to_pylist()
    what = f"{table}.{column}"
    out: list[str | None] = list(texts)
    if mode == "redact":
        for i, text in enumerate(texts):
            if text:
                spans = _spans(text, find_pii(text))
                if spans:
                    out[i] = _splice(text, spans, lambda a, b, k: f"[REDACTED:{k}]", escape=False)
        return pa.array(out, pa.string())
    if keyring is None or tenants is None:
        raise ValueError(f"{what}: pii mode 'encrypt' needs tenants and a keyring")
    rows = _RowIds(row_ids, n)
    valid = _valid(values)
    for tenant, idx in _tenant_groups(tenants, n, valid, rows, what):
        version = keyring.current(tenant)
        keys = _keys(keyring, tenant, version)
        hdr = _header(tenant, version, 0)
        rids = rows.bytes_of(idx, what)
        for i, rid in zip(idx.tolist(), rids):
            text = texts[i]
            spans = _spans(text, find_pii(text)) if text else []
            if spans or "[PII:" in text:
                token = _PiiSealer(keys.gcm, hdr, hdr + _lp(table), column, rid, text)
                out[i] = _splice(text, spans, token, escape=True)
    return pa.array(out, pa.string())


class _PiiSealer:
    """Encrypts one span of one row's text into an inline token."""

    def __init__(self, gcm: AESGCM, hdr: bytes, aad_prefix: bytes, column: str, rid: bytes, text: str):
        self.gcm, self.hdr, self.aad_prefix, self.column, self.rid, self.text = gcm, hdr, aad_prefix, column, rid, text

    def __call__(self, a: int, b: int, kind: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        aad = self.aad_prefix + _lp(_pii_aad_column(self.column, kind)) + self.rid
        sealed = self.hdr + nonce + self.gcm.encrypt(nonce, self.text[a:b].encode(), aad)
        return f"[PII:{kind}:{_b64(sealed)}]"


def _splice(text: str, spans: list[tuple[int, int, str]], replace: Callable[[int, int, str], str], escape: bool) -> str:
    pieces, pos = [], 0
    for a, b, k in spans:
        gap = text[pos:a]
        pieces.append(gap.replace("[PII:", "[PII::") if escape else gap)
        pieces.append(replace(a, b, k))
        pos = b
    tail = text[pos:]
    pieces.append(tail.replace("[PII:", "[PII::") if escape else tail)
    return "".join(pieces)


def reveal_pii(
    values: pa.Array | pa.ChunkedArray,
    row_ids: pa.Array | pa.ChunkedArray | Sequence | None,
    *,
    table: str,
    column: str,
    keyring: KeySource,
    on_missing_key: OnMissingKey = "raise",
) -> pa.Array:
    """Decrypt the inline `[PII:kind:token]` tokens of a text column in place (and unescape "[PII::").

    A token whose tenant key the keyring lacks (or is revoked) raises, or with on_missing_key="keep"
    stays as it is. A token that does not decrypt here raises DecryptionError. Text without "[PII:"
    is returned untouched.
    """
    values = _flat(values)
    if not _is_text(values.type):
        raise TypeError(f"{table}.{column}: reveal_pii takes a string column, not {values.type}")
    found = _rows_with_pii(values, row_ids, f"{table}.{column}", "reveal")
    if found is None:
        return values
    texts, hits, rows = found
    for i in hits:
        rid_name = rows.name(i)

        def sub(m: re.Match, rid_name: str = rid_name) -> str:
            if m.group(1) is None:
                return "[PII:"  # escaped literal
            parsed = _pii_token(m)
            if parsed is None:
                return m.group(0)  # not one of ours: literal text
            kind, raw, hl, tenant, version = parsed
            plain = _open_pii(keyring, raw, hl, tenant, version, table, column, kind, rid_name, on_missing_key)
            return m.group(0) if plain is None else plain

        texts[i] = _PII_TOKEN_RE.sub(sub, texts[i])
    return pa.array(texts, pa.string())


def reseal_pii(
    values: pa.Array | pa.ChunkedArray,
    row_ids: pa.Array | pa.ChunkedArray | Sequence | None,
    *,
    table: str,
    column: str,
    keyring: KeySource,
) -> tuple[pa.Array, np.ndarray]:
    """Re-encrypt the inline PII tokens that use a key version other than their tenant's current one.

    returns (values with those tokens replaced, boolean mask of the rows that changed); other text,
    escapes included, is left byte for byte. Used by re-encryption after a rotation.
    """
    values = _flat(values)
    n = len(values)
    changed = np.zeros(n, dtype=bool)
    found = _rows_with_pii(values, row_ids, f"{table}.{column}", "re-encrypt") if _is_text(values.type) else None
    if found is None:
        return values, changed
    texts, hits, rows = found
    for i in hits:
        rid = rows.name(i)
        row_changed = False

        def sub(m: re.Match, rid: str = rid) -> str:
            nonlocal row_changed
            parsed = _pii_token(m)
            if parsed is None:
                return m.group(0)
            kind, raw, hl, tenant, version = parsed
            current = keyring.current(tenant)
            if version == current:
                return m.group(0)
            plain = _open_pii(keyring, raw, hl, tenant, version, table, column, kind, rid, "raise")
            keys = _keys(keyring, tenant, current)
            hdr = _header(tenant, current, 0)
            row_changed = True
            return _PiiSealer(keys.gcm, hdr, hdr + _lp(table), column, rid.encode(), plain)(0, len(plain), kind)

        texts[i] = _PII_TOKEN_RE.sub(sub, texts[i])
        changed[i] = row_changed
    return pa.array(texts, pa.string()), changed


def _rows_with_pii(values: pa.Array, row_ids, what: str, action: str) -> tuple[list, list[int], _RowIds] | None:
    """(texts, indices of the rows holding "[PII:", their row ids) of a text column; None when no
    row does (so nothing needs row ids)."""
    if len(values) == 0:
        return None
    hits = pc.match_substring(values, "[PII:").fill_null(False).to_numpy(zero_copy_only=False)
    if not hits.any():
        return None
    rows = _RowIds(row_ids, len(values))
    if not rows.present:
        raise ValueError(f"{what}: row_ids are required to {action} inline PII")
    return values.to_pylist(), np.flatnonzero(hits).tolist(), rows


def _pii_token(m: re.Match) -> tuple[str, bytes, int, str, int] | None:
    """(kind, stored bytes, header length, tenant, version) of a token match; None for an escape or text
    that only looks like a token (not base64, or not a stored value of ours)."""
    if m.group(1) is None:
        return None
    kind, token = m.group(1), m.group(2)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        return None
    if len(raw) < 10 or raw[:3] != MAGIC or raw[3] != FORMAT_VERSION or raw[4] != 0:
        return None
    hl = 10 + raw[5]
    if len(raw) < hl + NONCE_BYTES + TAG_BYTES:
        return None
    _, tenant, version = _parse_header(raw[:hl])
    return kind, raw, hl, tenant, version


def _open_pii(
    keyring: KeySource,
    raw: bytes,
    hl: int,
    tenant: str,
    version: int,
    table: str,
    column: str,
    kind: str,
    rid: str,
    on_missing_key: OnMissingKey,
) -> str | None:
    """The plaintext of one inline token; None when its key is missing and on_missing_key is "keep"."""
    try:
        keys = _keys(keyring, tenant, version)
    except (KeyPermissionError, KeyRevokedError) as e:
        if on_missing_key == "keep":
            return None
        raise type(e)(f"{table}.{column} (inline PII): {e}", tenant, version) from None
    aad = raw[:hl] + _lp(table) + _lp(_pii_aad_column(column, kind)) + rid.encode()
    try:
        return keys.gcm.decrypt(raw[hl : hl + NONCE_BYTES], raw[hl + NONCE_BYTES :], aad).decode()
    except InvalidTag:
        raise DecryptionError(
            f"{table}.{column} row {rid}: inline PII token does not decrypt here", table, column, rid
        ) from None
