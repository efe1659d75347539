"""The stored value format and key derivation (pure logic: no Ray, no I/O besides os.urandom).

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
"""

from __future__ import annotations

import base64
import hmac
import weakref
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.encryption import TENANT_RE
from schemas.errors import KeyPermissionError

MAGIC = b"\xa7TG"
FORMAT_VERSION = 1
FLAG_DETERMINISTIC = 0x01
FLAG_BYTES = 0x02
NONCE_BYTES = 12
TAG_BYTES = 16
SIV_BYTES = 16
ARMOR_PREFIX = "tgenc1:"

OnMissingKey = Literal["raise", "keep"]



class KeySource(Protocol):
    """What the ciphers need from a keyring (crypto.keyring.Keyring is one)."""

    def current(self, tenant: str) -> int: ...

    def data_key(self, tenant: str, version: int) -> bytes: ...


# -- keys


class DerivedKeys:
    __slots__ = ("gcm", "siv")

    def __init__(self, data_key: bytes, tenant: str, version: int):
        info = f"|{tenant}|{version}".encode()
        self.gcm = AESGCM(HKDF(SHA256(), 32, salt=None, info=b"tidegate/v1/aes-256-gcm" + info).derive(data_key))
        self.siv = AESSIV(HKDF(SHA256(), 64, salt=None, info=b"tidegate/v1/aes-siv-512" + info).derive(data_key))


# Derived ciphers per keyring object, dropped with it. The keyring is asked for the data key on
# every call (so a revocation applies at once); the cache only saves the HKDF and cipher set-up.
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], tuple[bytes, DerivedKeys]]] = weakref.WeakKeyDictionary()


def derive_keys(keyring: KeySource, tenant: str, version: int) -> DerivedKeys:
    key = keyring.data_key(tenant, version)
    try:
        per = _CACHE.setdefault(keyring, {})
    except TypeError:  # not weak-referenceable: no cache
        per = {}
    hit = per.get((tenant, version))
    if hit is not None and hmac.compare_digest(hit[0], key):
        return hit[1]
    keys = DerivedKeys(key, tenant, version)
    per[(tenant, version)] = (key, keys)
    return keys


def header(tenant: str, version: int, flags: int) -> bytes:
    t = tenant.encode("ascii")
    return MAGIC + bytes((FORMAT_VERSION, flags, len(t))) + t + version.to_bytes(4, "big")


def lp(text: str) -> bytes:
    b = text.encode()
    if len(b) > 0xFFFF:
        raise ValueError("table and column names must be under 64 KiB")
    return len(b).to_bytes(2, "big") + b


def tenant_for_key(tenant: Any) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        # not repeated: a tenant column holding something else (an e-mail, say) must not leak here
        raise KeyPermissionError("no key for a tenant id that is not valid (1-64 of A-Z a-z 0-9 . _ -)", "<invalid>")
    return tenant



def parse_header(hdr: bytes) -> tuple[int, str, int]:
    flags, tlen = hdr[4], hdr[5]
    return flags, hdr[6 : 6 + tlen].decode("ascii", "replace"), int.from_bytes(hdr[6 + tlen : 10 + tlen], "big")


def armor(stored: bytes) -> str:
    """A stored value as text: 'tgenc1:' + unpadded base64url."""
    return ARMOR_PREFIX + base64.urlsafe_b64encode(stored).rstrip(b"=").decode("ascii")


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def table_label(uri: str, name: str | None = None) -> str:
    """The logical table name bound into values: the Delta table's `name` if it has one, else the
    last component of its URI ("s3://lake/triage/results" -> "results"). Stable when a table moves."""
    if name:
        return name
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri
