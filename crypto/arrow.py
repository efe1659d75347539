"""Arrow buffer plumbing for the column ciphers: values cut out of and packed into Arrow buffers.

Speed (bench/crypto_fields.py): no Python bytecode runs per value. Columns go in batches
(CHUNK_ROWS rows per tenant group); per batch, one os.urandom call gives all nonces,
struct.unpack_from cuts all plaintexts (and row ids, stored nonces and ciphertexts) out of the
Arrow buffers, `map` drives the AAD concatenation and the AEAD method, and struct.pack_into
writes the results into the output Arrow buffer; headers are parsed and grouped with numpy.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crypto.format import NONCE_BYTES, tenant_for_key



def flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
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


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def buffers(arr: pa.Array) -> tuple[memoryview, np.ndarray, np.ndarray]:
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


def valid_mask(arr: pa.Array) -> np.ndarray:
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


def cuts(buf: Any, starts: np.ndarray, ends: np.ndarray) -> tuple[bytes, ...]:
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


def cut_sealed(buf: Any, starts: np.ndarray, ends: np.ndarray, hl: np.ndarray) -> tuple[bytes, ...]:
    """(nonce, ciphertext) pairs of GCM stored values, flattened: skip the header, take 12, take the rest."""
    if len(starts) and (starts[1:] == ends[:-1]).all():
        # values back to back (a batch of one group): skip header, take nonce, take ciphertext
        counts = np.stack([hl, np.full(len(hl), NONCE_BYTES), ends - starts - hl - NONCE_BYTES], axis=1)
        return struct.unpack_from(_format(counts, "xss"), buf, int(starts[0]))
    body = starts + hl
    lo = np.stack([body, body + NONCE_BYTES], axis=1).ravel()
    hi = np.stack([body + NONCE_BYTES, ends], axis=1).ravel()
    return cuts(buf, lo, hi)


@functools.lru_cache(maxsize=8)
def nonce_cutter(m: int) -> struct.Struct:
    return struct.Struct("=" + f"{NONCE_BYTES}s" * m)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def make_array(valid: np.ndarray, offsets: np.ndarray, data: Any, text: bool) -> pa.Array:
    """An Arrow string/binary array from its parts (large_* only past 2 GiB of data)."""
    n = len(valid)
    large = int(offsets[-1]) > 2**31 - 1
    typ = (pa.large_string() if large else pa.string()) if text else (pa.large_binary() if large else pa.binary())
    offsets = offsets if large else offsets.astype(np.int32)
    nulls = n - int(valid.sum())
    validity = pa.array(valid).buffers()[1] if nulls else None
    return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets), data], null_count=nulls)


def new_output(size: int) -> tuple[pa.Buffer, memoryview]:
    """A fresh Arrow buffer for a result column and a writable view of it. Arrow's pool (mimalloc or
    jemalloc) reuses freed memory, where a large malloc would be a fresh mmap to fault in each time."""
    buf = pa.allocate_buffer(size)
    return buf, memoryview(buf).cast("B")


def pack(view: memoryview, offset: int, parts: Sequence[bytes], lengths: np.ndarray) -> None:
    """Write `parts` back to back into view[offset:] in one struct.pack_into call; `lengths` is their
    byte lengths as an (m, k) matrix (m rows of k parts each)."""
    struct.pack_into(_format(lengths, "s" * lengths.shape[1]), view, offset, *parts)


def chunk_groups(codes: np.ndarray, a: int, b: int) -> list[tuple[int, np.ndarray]]:
    """Rows a..b-1 split by group code (-1: null, in no group), as (code, local row indices)."""
    cc = codes[a:b]
    if len(cc) and cc[0] >= 0 and (cc == cc[0]).all():
        return [(int(cc[0]), np.arange(b - a))]
    sel = np.flatnonzero(cc >= 0)
    return groups_by_code(cc[sel], sel)


class RowIds:
    """Row ids as strings, for associated data (bytes) and error messages (str)."""

    def __init__(self, row_ids: pa.Array | pa.ChunkedArray | Sequence | None, n: int):
        self.present = row_ids is not None
        if row_ids is None:
            return
        arr = flat(row_ids if isinstance(row_ids, (pa.Array, pa.ChunkedArray)) else pa.array(row_ids))
        if len(arr) != n:
            raise ValueError(f"row_ids has {len(arr)} rows, values {n}")
        if not is_text(arr.type):
            arr = pc.cast(arr, pa.string())
        self.data, self.starts, self.ends = buffers(arr)
        self.valid = valid_mask(arr)

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
        return cuts(self.data, self.starts[idx], self.ends[idx])


def groups_by_code(codes: np.ndarray, idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
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


def tenant_groups(tenants: Any, n: int, valid: np.ndarray, rows: RowIds, what: str) -> list[tuple[str, np.ndarray]]:
    vidx = np.flatnonzero(valid)
    if isinstance(tenants, str):
        return [(tenant_for_key(tenants), vidx)] if len(vidx) else []
    arr = flat(tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray)) else pa.array(list(tenants)))
    if len(arr) != n:
        raise ValueError(f"{what}: tenants has {len(arr)} rows, values {n}")
    enc = arr.dictionary_encode()
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[vidx]
    if len(codes) and codes.min() < 0:
        raise ValueError(f"{what}: row {rows.name(int(vidx[np.argmin(codes)]))} has a value but no tenant")
    names = enc.dictionary.to_pylist()
    return [(tenant_for_key(str(names[c])), idx) for c, idx in groups_by_code(codes, vidx)]


def in_row_order(n: int, groups: list[tuple[np.ndarray, Sequence[bytes]]]) -> Sequence[bytes]:
    """Scatter per-group sequences of bytes back into one list in row order; rows in no group get b""."""
    if len(groups) == 1 and len(groups[0][0]) == n:
        return groups[0][1]
    # an object array scatters in C (numpy keeps bytes as objects for an object target: no 'S' dtype
    # conversion, which would strip trailing NUL bytes)
    out = np.full(n, b"", dtype=object)
    for idx, items in groups:
        out[idx] = items
    return out.tolist()
