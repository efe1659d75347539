"""Inline PII tokens inside text columns.

    protect_pii(values: string Array, row_ids, find_pii, mode, ...) -> string Array with [REDACTED:kind] or [PII:kind:token]
    reveal_pii(values: string Array, row_ids, ...)                  -> string Array with the tokens decrypted in place
    reseal_pii(values, row_ids, ...)                                -> tokens of old key versions re-encrypted

Token: `[PII:<kind>:<base64url, unpadded, of a stored value>]` (crypto/format.py), GCM, with column
`<column>#pii:<kind>` in the associated data. Text that already contained "[PII:" is escaped to
"[PII::" when tokens are inserted (and unescaped by reveal_pii), so a token copied into the text by
a model never passes for one of this row's.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.arrow import RowIds, flat, is_text, tenant_groups, valid_mask
from crypto.pii import Offsets, shown
from crypto.format import (
    FORMAT_VERSION, MAGIC, NONCE_BYTES, TAG_BYTES, KeySource, OnMissingKey, b64, derive_keys, header, lp, parse_header,
)  # fmt: skip
from schemas.errors import DecryptionError, KeyPermissionError, KeyRevokedError

log = logging.getLogger(__name__)

PiiMode = Literal["encrypt", "redact", "off"]

# Carried input values shorter than this are not looked for in outputs: "no", "42" would match
# everywhere and say nothing about the value (docs/encryption.md, threat model).
ECHO_MIN_CHARS = 4
_PII_KIND_RE = re.compile(r"[A-Za-z0-9_]+")
# one pass over the text: either an escaped literal "[PII::" or a token
_PII_TOKEN_RE = re.compile(r"\[PII:(?::|([A-Za-z0-9_]+):([A-Za-z0-9_-]+)\])")


def _pii_aad_column(column: str, kind: str) -> str:
    return f"{column}#pii:{kind}"


def _kind(kind: Any) -> str:
    k = str(kind)
    return k if _PII_KIND_RE.fullmatch(k) else re.sub(r"[^A-Za-z0-9_]", "_", k) or "pii"


def _spans(text: str, found: Sequence[Any]) -> list[tuple[int, int, str]]:
    """Detected spans, in order, clipped to the text; overlapping spans are merged into one with
    the kind of the one that starts first (the longer, at the same start). Before stop 45 a span
    that began inside another was dropped whole, and its text past the overlap stayed in clear
    (echoes "Jane Doe" and "Doe, 14 Elm Street" left the street in the table)."""
    spans = sorted(
        ((max(0, int(p.start)), min(len(text), int(p.end)), _kind(p.kind)) for p in found),
        key=lambda s: (s[0], -s[1]),
    )
    out: list[tuple[int, int, str]] = []
    for a, b, k in spans:
        if b <= a:
            continue
        if out and a < out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b, out[-1][2])
        else:
            out.append((a, b, k))
    return out


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
    echoes: Sequence[Sequence[str]] | None = None,
    json_text: bool = False,
) -> pa.Array:
    """Replace the PII that `find_pii(text) -> [span with .kind, .start, .end]` finds in each text,
    and (echoes: per row, strings the text must not show, e.g. the row's encrypted input values)
    every occurrence of those strings, as kind "echo".

    mode "redact":  "mail me at a@b.c" -> "mail me at [REDACTED:email]"
    mode "encrypt": "mail me at a@b.c" -> "mail me at [PII:email:p0dHAQAEYWNtZQAAAAE...]" (tenants, keyring
                    and row_ids required; reveal_pii puts the text back)
    mode "off":     values returned as they are
    json_text: the texts are JSON (output_json): a span that is not inside one string literal (a
    card written as a JSON number, an echo of a whole "quoted" value) grows to the whole JSON
    tokens it touches and is replaced by its token in quotes, so the JSON stays valid (before stop
    45 `{"card": [REDACTED:card]}`); revealed, it is that text as a JSON string ("4111...").
    returns a string Array; nulls stay null.
    """
    values = flat(values)
    if mode == "off":
        return values
    if mode not in ("redact", "encrypt"):
        raise ValueError(f"pii mode must be encrypt, redact or off, not {mode!r}")
    if not is_text(values.type):
        raise TypeError(f"{table}.{column}: protect_pii takes a string column, not {values.type}")
    n = len(values)
    texts = values.to_pylist()
    what = f"{table}.{column}"
    out: list[str | None] = list(texts)
    if echoes is not None and len(echoes) != n:
        raise ValueError(f"{what}: echoes has {len(echoes)} rows, values {n}")

    def found(i: int, text: str) -> list:
        """What to protect in row i's text: the detectors' spans, and its echoes: as written, and
        as they read (crypto.pii.shown: a zero-width space or a full-width letter inside an echo
        hid it before stop 46)."""
        spans = list(find_pii(text))
        if echoes is None or not echoes[i]:
            return spans
        seen, where = shown(text)
        for value in echoes[i]:
            written = _as_written(value)
            for needle in written:
                spans += _occurrences(text, needle, None)
            plain = shown(value)[0]
            if len(plain) < ECHO_MIN_CHARS:
                continue
            # Composed and decomposed accents read alike ("é" and "e" + U+0301); shown() leaves
            # each as written, so the value is looked for in both forms.
            for needle in {plain, unicodedata.normalize("NFC", plain), unicodedata.normalize("NFD", plain)}:
                if where is not None or needle not in written:
                    spans += _occurrences(seen, needle, where)
        return spans

    if mode == "redact":
        for i, text in enumerate(texts):
            if text:
                spans = _spans(text, found(i, text))
                if spans:
                    if json_text:
                        spans = _json_spans(text, spans)
                    out[i] = _splice(text, spans, _redacted, escape=False)
        return pa.array(out, pa.string())
    if keyring is None or tenants is None:
        raise ValueError(f"{what}: pii mode 'encrypt' needs tenants and a keyring")
    rows = RowIds(row_ids, n)
    valid = valid_mask(values)
    for tenant, idx in tenant_groups(tenants, n, valid, rows, what):
        version = keyring.current(tenant)
        keys = derive_keys(keyring, tenant, version)
        hdr = header(tenant, version, 0)
        rids = rows.bytes_of(idx, what)
        for i, rid in zip(idx.tolist(), rids):
            text = texts[i]
            spans = _spans(text, found(i, text)) if text else []
            if json_text and spans:
                spans = _json_spans(text, spans)
            if spans or "[PII:" in text:
                token = _PiiSealer(keys.gcm, hdr, hdr + lp(table), column, rid)
                out[i] = _splice(text, spans, token, escape=True)
    return pa.array(out, pa.string())


def _occurrences(text: str, needle: str, where: Offsets | None) -> list[_Echo]:
    """Each occurrence of `needle` in `text`, as an echo span; `where` maps `text` (a shown form)
    back to the text as given."""
    out = []
    start = text.find(needle) if needle else -1
    while start >= 0:
        end = start + len(needle)
        out.append(_Echo(start, end) if where is None else _Echo(where[start], where[end - 1] + 1))
        start = text.find(needle, end)
    return out


def _as_written(value: str) -> set[str]:
    """The forms an echoed value takes in an output: as it is, and inside a JSON string (a
    structured output escapes its quotes, backslashes and control characters, and may write
    non-ASCII letters as \\uXXXX)."""
    return {value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1]}


class _Echo:
    """A span of text repeating a value the row must not show (protect_pii's echoes)."""

    __slots__ = ("start", "end")
    kind = "echo"

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end


class _PiiSealer:
    """Encrypts one span of one row's text into an inline token."""

    def __init__(self, gcm: AESGCM, hdr: bytes, aad_prefix: bytes, column: str, rid: bytes):
        self.gcm, self.hdr, self.aad_prefix, self.column, self.rid = gcm, hdr, aad_prefix, column, rid

    def __call__(self, text: str, a: int, b: int, kind: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        aad = self.aad_prefix + lp(_pii_aad_column(self.column, kind)) + self.rid
        sealed = self.hdr + nonce + self.gcm.encrypt(nonce, text[a:b].encode(), aad)
        return f"[PII:{kind}:{b64(sealed)}]"


# A JSON text's tokens: a string literal (quotes included; an unterminated one runs to the end),
# or a run of anything else but whitespace and structure (a number, true, false, null).
_JSON_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?$)|[^\s{}\[\]:,"]+')


def _json_spans(text: str, spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The spans of a JSON text as protect_pii(json_text=True) replaces them: one inside a string
    literal (not touching its quotes) stays; any other grows to the whole tokens it touches and is
    marked to be replaced in quotes (kind prefixed "\x00", _splice takes it off); spans that then
    overlap or touch merge. O(spans x log tokens)."""
    tokens = [(m.start(), m.end()) for m in _JSON_TOKEN_RE.finditer(text)]
    starts = [t[0] for t in tokens]
    out: list[tuple[int, int, str]] = []
    for a, b, k in spans:
        i = bisect.bisect_right(starts, a) - 1  # the token that starts at or before a
        if i >= 0 and text[tokens[i][0]] == '"' and tokens[i][0] < a and b < tokens[i][1]:
            out.append((a, b, k))  # inside one string literal, its quotes untouched
            continue
        if i >= 0 and a < tokens[i][1]:
            a = tokens[i][0]
        j = bisect.bisect_left(starts, b) - 1  # the last token that starts before b
        if j >= 0 and b < tokens[j][1]:
            b = tokens[j][1]
        out.append((a, b, "\x00" + k))
    out.sort(key=lambda x: (x[0], -x[1]))
    merged: list[tuple[int, int, str]] = []
    for a, b, k in out:
        quoted = k.startswith("\x00")
        if merged and (a < merged[-1][1] or (a == merged[-1][1] and quoted and merged[-1][2].startswith("\x00"))):
            pa_, pb, pk = merged[-1]
            if quoted and not pk.startswith("\x00"):
                pk = "\x00" + pk
            merged[-1] = (pa_, max(pb, b), pk)
        else:
            merged.append((a, b, k))
    return merged


def _redacted(text: str, a: int, b: int, kind: str) -> str:
    return f"[REDACTED:{kind}]"


def _splice(text: str, spans: list[tuple[int, int, str]], replace: Callable[[str, int, int, str], str],
            escape: bool) -> str:
    """`text` with each span replaced by replace(plain, a, b, kind). A span whose kind starts with
    "\x00" (_json_spans: not inside one JSON string) is replaced in quotes, from its text escaped
    as a JSON string's inside, so the JSON stays valid when it is revealed too."""
    pieces, pos = [], 0
    for a, b, k in spans:
        gap = text[pos:a]
        pieces.append(gap.replace("[PII:", "[PII::") if escape else gap)
        if k.startswith("\x00"):
            plain = json.dumps(text[a:b], ensure_ascii=False)[1:-1]
            pieces.append('"' + replace(plain, 0, len(plain), k[1:]) + '"')
        else:
            pieces.append(replace(text, a, b, k))
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
    tenants: pa.Array | pa.ChunkedArray | Sequence[str | None] | None = None,
) -> pa.Array:
    """Decrypt the inline `[PII:kind:token]` tokens of a text column in place (and unescape "[PII::").

    tenants: the tenant each row belongs to (its clear `tenant` column); a token of another tenant
    is an error for that row (DecryptionError naming it), not text to decrypt with that tenant's key.
    A token whose tenant key the keyring lacks (or is revoked), or that does not decrypt here
    (forged, moved), raises for its row; with on_missing_key="keep" it stays as it is and the other
    rows and tokens are revealed. Text without "[PII:" is returned untouched.
    """
    values = flat(values)
    if not is_text(values.type):
        raise TypeError(f"{table}.{column}: reveal_pii takes a string column, not {values.type}")
    found = _rows_with_pii(values, row_ids, f"{table}.{column}", "reveal")
    if found is None:
        return values
    texts, hits, rows = found
    owners = None if tenants is None else flat(tenants if isinstance(tenants, (pa.Array, pa.ChunkedArray))
                                              else pa.array(list(tenants), pa.string())).to_pylist()  # fmt: skip
    for i in hits:
        rid_name = rows.name(i)
        owner = owners[i] if owners is not None else None

        def sub(m: re.Match, rid_name: str = rid_name, owner=owner) -> str:
            if m.group(1) is None:
                return "[PII:"  # escaped literal
            parsed = _pii_token(m)
            if parsed is None:
                return m.group(0)  # not one of ours: literal text
            kind, raw, hl, tenant, version = parsed
            try:
                if owners is not None and tenant != owner:
                    raise DecryptionError(f"{table}.{column} row {rid_name}: inline PII token of another tenant",
                                          table, column, rid_name)  # fmt: skip
                plain = _open_pii(keyring, raw, hl, tenant, version, table, column, kind, rid_name, on_missing_key)
            except DecryptionError:
                if on_missing_key == "keep":  # this cell's token only: the rest of the read goes on
                    return m.group(0)
                raise
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
    usage: dict[tuple[str, int], int] | None = None,
    unopened: list[int] | None = None,
) -> tuple[pa.Array, np.ndarray]:
    """Re-encrypt the inline PII tokens that use a key version other than their tenant's current one.

    returns (values with those tokens replaced, boolean mask of the rows that changed); other text,
    escapes included, is left byte for byte. Used by re-encryption after a rotation. A token that
    does not open here (text that only looks like one: an unknown tenant, a version revoked, bytes
    that do not decrypt) is left as it is, as the reader leaves it with on_missing_key="keep": one
    forged token must not stop a whole table's re-encryption. `usage`: (tenant, version) -> values
    sealed, added to; `unopened`: [n], the tokens left so (not of their tenant's current version, or
    of no tenant here) added to n, so that a caller can refuse to call the table clean.
    """
    values = flat(values)
    n = len(values)
    changed = np.zeros(n, dtype=bool)
    left = [0]
    found = _rows_with_pii(values, row_ids, f"{table}.{column}", "re-encrypt") if is_text(values.type) else None
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
            try:
                current = keyring.current(tenant)
                if version == current:
                    return m.group(0)
                plain = _open_pii(keyring, raw, hl, tenant, version, table, column, kind, rid, "raise")
            except (KeyPermissionError, KeyRevokedError, DecryptionError):
                left[0] += 1
                return m.group(0)
            keys = derive_keys(keyring, tenant, current)
            hdr = header(tenant, current, 0)
            row_changed = True
            if usage is not None:
                usage[(tenant, current)] = usage.get((tenant, current), 0) + 1
            return _PiiSealer(keys.gcm, hdr, hdr + lp(table), column, rid.encode())(plain, 0, len(plain), kind)

        texts[i] = _PII_TOKEN_RE.sub(sub, texts[i])
        changed[i] = row_changed
    if left[0]:
        log.warning("%s.%s: %d text(s) shaped like a PII token did not open here; left as they are",
                    table, column, left[0])  # fmt: skip
        if unopened is not None:
            unopened[0] += left[0]
    return pa.array(texts, pa.string()), changed


def _rows_with_pii(values: pa.Array, row_ids, what: str, action: str) -> tuple[list, list[int], RowIds] | None:
    """(texts, indices of the rows holding "[PII:", their row ids) of a text column; None when no
    row does (so nothing needs row ids)."""
    if len(values) == 0:
        return None
    hits = pc.match_substring(values, "[PII:").fill_null(False).to_numpy(zero_copy_only=False)
    if not hits.any():
        return None
    rows = RowIds(row_ids, len(values))
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
    _, tenant, version = parse_header(raw[:hl])
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
        keys = derive_keys(keyring, tenant, version)
    except (KeyPermissionError, KeyRevokedError) as e:
        if on_missing_key == "keep":
            return None
        raise type(e)(f"{table}.{column} (inline PII): {e}", tenant, version) from None
    aad = raw[:hl] + lp(table) + lp(_pii_aad_column(column, kind)) + rid.encode()
    try:
        return keys.gcm.decrypt(raw[hl : hl + NONCE_BYTES], raw[hl + NONCE_BYTES :], aad).decode()
    except InvalidTag:
        raise DecryptionError(
            f"{table}.{column} row {rid}: inline PII token does not decrypt here", table, column, rid
        ) from None
