"""API keys of the online endpoint: one or more per tenant, stored hashed with scrypt in the keyring file.

    token  "tg_<key id>_<secret>"   shown once, at creation; the key id (12 hex digits) finds the
                                    record, the secret (32 random bytes, base64url) proves it
    record {"tenant": T, "salt": b64, "hash": b64, "n": 16384, "r": 8, "p": 1,
            "created_at": ISO, "state": "active" | "revoked"}   under "api_keys" by key id

scrypt costs ~50 ms of CPU a check by design, so `ApiKeyVerifier` remembers the tokens it verified
(by their SHA-256, never the token) while their key's record is unchanged: a revocation takes
effect at the next request after the file is written (one stat per request). On a server's event
loop `verify_async` runs the scrypt in a worker thread (cryptography releases the GIL for it), so
a key's first request, or a wrong secret for a known key id, does not stop the loop's other
requests for that long; at most VERIFY_THREADS checks run at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from schemas.errors import AuthError

PREFIX = "tg_"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_TOKEN = re.compile(r"tg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
# scrypt checks of one verifier at once in verify_async: each takes a core for ~50-70 ms, and the
# event loop's own threads (the audit's writes use asyncio.to_thread too) keep the executor's rest.
VERIFY_THREADS = 2


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret.encode())


def new_api_key(tenant: str, created_at: str) -> tuple[str, str, dict]:
    """(key id, token, record to store). The token is not stored anywhere."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = {
        "tenant": tenant, "salt": _b64(salt), "hash": _b64(_scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)),
        "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "created_at": created_at, "state": "active",
    }  # fmt: skip
    return key_id, f"{PREFIX}{key_id}_{secret}", record


def parse_token(token: str) -> tuple[str, str]:
    """(key id, secret); AuthError for anything that is not a Tidegate API key (never quoted)."""
    m = _TOKEN.fullmatch(token.strip())
    if m is None:
        raise AuthError("not a Tidegate API key")
    return m.group(1), m.group(2)


def check_record(key_id: str, record: object) -> str | None:
    """What is wrong with a stored record, or None (the keyring's file check)."""
    if not re.fullmatch(r"[0-9a-f]{12}", key_id):
        return "an API key id that is not 12 hex digits"
    if not isinstance(record, dict) or not isinstance(record.get("tenant"), str):
        return f"API key {key_id}: tenant missing"
    if record.get("state") not in ("active", "revoked"):
        return f"API key {key_id}: state must be active or revoked"
    if record["state"] == "active" and not all(isinstance(record.get(k), str) for k in ("salt", "hash")):
        return f"API key {key_id}: salt or hash missing"
    return None


def verify_record(secret: str, record: dict) -> bool:
    try:
        salt, want = base64.b64decode(record["salt"]), base64.b64decode(record["hash"])
        got = _scrypt(secret, salt, int(record["n"]), int(record["r"]), int(record["p"]))
    except (KeyError, ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_REFUSED = "unknown or revoked API key"


@dataclass(frozen=True)
class Principal:
    """Who a request runs as."""

    tenant: str
    key_id: str


class ApiKeyVerifier:
    """token -> Principal, against the keyring's api_keys (a `crypto.keyring.Keyring`)."""

    def __init__(self, keyring):
        self.keyring = keyring
        self._verified: dict[bytes, Principal] = {}
        self._records = keyring.api_keys()  # the records the verified tokens were checked against
        self._checks: asyncio.Semaphore | None = None  # verify_async's scrypt threads

    def verify(self, token: str) -> Principal:
        """The token's tenant; AuthError (unknown, revoked or wrong secret: one message for all).
        Its timing is not equalised: an unknown or revoked key id is refused without the scrypt
        check, so a caller can tell, by time, that a 48-bit random key id is active (not that its
        secret is right)."""
        hit = self.remembered(token)
        if hit is not None:
            return hit
        key_id, secret, record = self._record_for(token)
        if not verify_record(secret, record):
            raise AuthError(_REFUSED)
        return self._remember(token, key_id, record)

    async def verify_async(self, token: str) -> Principal:
        """verify, for an event loop: a token not remembered is checked in a worker thread (at most
        VERIFY_THREADS at once), and the loop serves other requests meanwhile."""
        hit = self.remembered(token)
        if hit is not None:
            return hit
        key_id, secret, record = self._record_for(token)
        if self._checks is None:  # made here: an asyncio primitive belongs to the loop that uses it
            self._checks = asyncio.Semaphore(VERIFY_THREADS)
        async with self._checks:
            ok = await asyncio.to_thread(verify_record, secret, record)
        if not ok:
            raise AuthError(_REFUSED)
        # The keyring may have been written during the check (a revocation): what was checked must
        # still be the key's record, or the token is refused as that record would have it.
        if self._current_records().get(key_id) != record:
            raise AuthError(_REFUSED)
        return self._remember(token, key_id, record)

    def remembered(self, token: str) -> Principal | None:
        """The token's principal if it was verified against its key's current record; one stat of
        the keyring file, no scrypt."""
        self._current_records()
        return self._verified.get(hashlib.sha256(token.encode()).digest())

    def _current_records(self) -> dict[str, dict]:
        """The keyring's API key records as the file holds them now (one stat; a re-read file gives
        new records, and the tokens verified against changed ones are forgotten)."""
        self.keyring.refresh()
        if self.keyring.api_keys() is not self._records:
            self._forget_changed_keys()
        return self._records

    def _record_for(self, token: str) -> tuple[str, str, dict]:
        """(key id, secret, its active record), or AuthError: no scrypt for an unknown or revoked key."""
        key_id, secret = parse_token(token)
        record = self._records.get(key_id)
        if record is None or record.get("state") != "active":
            raise AuthError(_REFUSED)
        return key_id, secret, record

    def _remember(self, token: str, key_id: str, record: dict) -> Principal:
        principal = Principal(record["tenant"], key_id)
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[hashlib.sha256(token.encode()).digest()] = principal
        return principal

    def _forget_changed_keys(self) -> None:
        """The keyring file changed: a token stays verified only while its key's record (tenant,
        salt, hash, state) is what it was checked against. Most writes leave the API keys alone
        (the encryption's usage counters rewrite a shared keyring at most every 10 s, a rotation
        adds a tenant key): those cost no key its verification, which is an scrypt (tens of ms
        of CPU) on the request's path."""
        before, self._records = self._records, self.keyring.api_keys()
        self._verified = {digest: p for digest, p in self._verified.items()
                          if self._records.get(p.key_id) == before.get(p.key_id)}  # fmt: skip
