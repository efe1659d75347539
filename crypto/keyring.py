"""Keys: per-tenant data keys, wrapped by a master key (envelope encryption), kept in a JSON file.

    master key (env TIDEGATE_MASTER_KEY, or a KMS key)  --wraps-->  data key of (tenant, version)
    data key  --HKDF-->  AES-256-GCM key and AES-SIV key used by crypto.columns on each value

The keyring file never holds a key in clear; it is written atomically (temp file + os.replace),
mode 0600, under an advisory lock (`<file>.lock`) so two `tidegate keys` commands do not lose
each other's changes:

    {
      "format": "tidegate-keyring/1",
      "master_key_id": "local:5f0c9e1a2b3c4d5e",
      "tenants": {
        "acme": [
          {"version": 1, "wrapped_key": "<base64>", "created_at": "2025-05-01T10:00:00Z", "state": "retired"},
          {"version": 2, "wrapped_key": "<base64>", "created_at": "2025-06-01T10:00:00Z", "state": "active",
           "values": 120400}
        ]
      }
    }

`values` counts what jobs encrypted under a version (record_usage; `encryption.rotate_after_values`
rotates a tenant whose current version reached it). States: `active` (the current version: new values use the highest active version), `retired`
(replaced by a rotation; still decrypts), `revoked` (the wrapped key is deleted from the file:
nothing under that version decrypts again, KeyRevokedError; there is no undo).

Each data key is wrapped with the context {"purpose": "tidegate-data-key", "tenant": T,
"version": "N"} as associated data, so a wrapped key moved to another tenant or version entry
does not unwrap (KeyringError).

Access control is which wrapped keys a keyring file holds: `Keyring.export(path, ["a"], provider=P)`
writes a keyring with tenant a only, its keys re-wrapped under the recipient's master key P, and a
reader holding it opens tenant a's values and gets KeyPermissionError for tenant b's. Copying the
keys still wrapped by the production master key (whose holder opens every tenant of the production
keyring) takes an explicit `same_master_key=True`.

Plugging in a KMS. A provider is three members (`KeyProvider`): `key_id`, `wrap`, `unwrap`. A
provider for a cloud KMS maps them onto the KMS's own calls, passing `context` through as the
KMS's encryption context / associated data so the KMS enforces and audits the binding:

    class AwsKmsProvider(KeyProvider):            # boto3.client("kms")
        key_id = "arn:aws:kms:...:key/..."
        wrap   -> kms.encrypt(KeyId=key_id, Plaintext=key, EncryptionContext=context)["CiphertextBlob"]
        unwrap -> kms.decrypt(CiphertextBlob=wrapped, KeyId=key_id, EncryptionContext=context)["Plaintext"]
    GCP KMS:       KeyManagementServiceClient.encrypt/decrypt(name=key_id, plaintext|ciphertext=...,
                   additional_authenticated_data=canonical_context(context))
    Vault Transit: POST transit/encrypt/<key> {plaintext: b64(key), context: b64(canonical_context(context))}
                   and transit/decrypt/<key> (derived keys); the "vault:v1:..." string is the wrapped bytes.

A KMS provider's IAM/policy then decides who may unwrap which tenant (e.g. an AWS key policy
condition on kms:EncryptionContext:tenant). Nothing here calls a cloud service.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.encryption import MASTER_KEY_ENV, check_tenant, default_keyring_path
from schemas.errors import KeyPermissionError, KeyRevokedError, KeyringError

FORMAT = "tidegate-keyring/1"
STATES = ("active", "retired", "revoked")
KEY_BYTES = 32


def canonical_context(context: dict[str, str]) -> bytes:
    """The bytes a context dict is bound as: sorted-key compact JSON (same on every platform)."""
    return json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_context(tenant: str, version: int) -> dict[str, str]:
    return {"purpose": "tidegate-data-key", "tenant": tenant, "version": str(version)}


class KeyProvider(ABC):
    """Wraps and unwraps data keys with a master key the provider holds (or a KMS holds for it)."""

    @property
    @abstractmethod
    def key_id(self) -> str:
        """Names the master key (no secret in it); recorded in the keyring to catch a wrong master key early."""

    @abstractmethod
    def wrap(self, plaintext_key: bytes, context: dict[str, str]) -> bytes:
        """Encrypt a data key; `context` is authenticated and must be given again to unwrap."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        """Decrypt a wrapped data key; raise KeyringError if it does not open with this key and context."""


def _decode_master_key(text: str, env_var: str) -> bytes:
    # Messages name the variable and what is wrong with it, never its value (not even its length in chars).
    s = text.strip()
    if not s:
        raise KeyringError(f"master key variable {env_var} is empty")
    key: bytes | None = None
    if len(s) == 64:
        with contextlib.suppress(ValueError):
            key = bytes.fromhex(s)
    if key is None:
        try:
            key = base64.b64decode(s.replace("-", "+").replace("_", "/") + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"master key variable {env_var} is neither base64 nor hex") from None
    if len(key) != KEY_BYTES:
        raise KeyringError(f"master key variable {env_var} must hold 32 bytes (256 bits), base64 or hex encoded")
    return key


def _read_key_file(path: str, env_var: str) -> str:
    """The master key from a file (a mounted secret: `<env var>_FILE`). Refused when anyone on the
    machine may read it: a key file is for the job's user (and group) only."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o004:
            raise KeyringError(f"{env_var}: {path} can be read by every user (chmod o-r, or a secret "
                               "volume with defaultMode 0440)")  # fmt: skip
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise KeyringError(f"{env_var}: cannot read {path}: {e.strerror}") from None


class LocalMasterKeyProvider(KeyProvider):
    """A 256-bit master key from an environment variable (base64 or 64 hex digits), or from the file
    that `<variable>_FILE` names (a secret mounted for one job); wraps with AES-256-GCM.

    Wrapped key = nonce (12 bytes) || AES-GCM(master, nonce, data key, aad=canonical_context(context)).
    Generate a master key with: python -c "import os, base64; print(base64.b64encode(os.urandom(32)).decode())"
    """

    def __init__(self, env_var: str = MASTER_KEY_ENV, *, key: bytes | None = None):
        self.env_var = env_var
        if key is None:
            text = os.environ.get(env_var)
            if text is None and os.environ.get(env_var + "_FILE"):
                text = _read_key_file(os.environ[env_var + "_FILE"], env_var + "_FILE")
            if text is None:
                raise KeyringError(
                    f"master key variable {env_var} is not set, nor {env_var}_FILE (a file holding it): a base64 "
                    "or hex 256-bit key; see docs/encryption.md"
                )
            key = _decode_master_key(text, env_var)
        elif len(key) != KEY_BYTES:
            raise KeyringError("a local master key must be 32 bytes")
        self._aead = AESGCM(key)
        # A fingerprint, not the key: HMAC of a fixed label, 64 bits. Enough to tell two keys apart.
        self._key_id = "local:" + hmac.new(key, b"tidegate master key id", hashlib.sha256).hexdigest()[:16]

    @property
    def key_id(self) -> str:
        return self._key_id

    def wrap(self, plaintext_key: bytes, context: dict[str, str]) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext_key, canonical_context(context))

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], canonical_context(context))
        except (InvalidTag, ValueError):
            raise KeyringError(
                f"wrapped key of tenant {context.get('tenant')!r} version {context.get('version')} does not open "
                f"with master key {self._key_id} (wrong master key, or the entry was moved or altered)"
            ) from None


@dataclass(frozen=True)
class KeyVersion:
    """One version of a tenant's key as listed (never the key)."""

    tenant: str
    version: int
    state: str
    created_at: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` via a 0600 temp file in the same folder, then os.replace (or os.link
    when `exclusive`: fails if `path` exists, with no window where another file could be overwritten)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyringError(f"keyring {path} already exists; refusing to overwrite it") from None
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        tmp = ""
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class Keyring:
    """A keyring file: per-tenant versions of wrapped data keys.

    `data_key(tenant, version)` and `current(tenant)` are what crypto.columns needs; the
    provider (master key) is only touched when a key is unwrapped or wrapped, so listing a
    keyring needs no master key. Data keys are unwrapped once and kept in memory.
    """

    def __init__(self, path: str | Path, provider: KeyProvider | None = None, *, _doc: dict | None = None):
        self.path = Path(path)
        self._provider = provider
        # (tenant, version) -> (the wrapped key as the file held it, the data key): a cached key is
        # used only while the file still holds that wrapped key. A version whose write failed here
        # and was then written by another process with another key, or a file replaced, is
        # unwrapped again, never sealed under a key no keyring holds.
        self._keys: dict[tuple[str, int], tuple[str, bytes]] = {}
        self._stamp: tuple | None = None  # (mtime_ns, size, inode) of the file as last read
        # An online replica refreshes it from its event loop, its guards' thread and its audit
        # writer's thread: a reload, a key cached meanwhile and a write are one at a time.
        self._lock = threading.RLock()
        self._doc = _doc if _doc is not None else self._read()

    # -- opening and creating

    @classmethod
    def open(cls, path: str | Path | None = None, provider: KeyProvider | None = None) -> Keyring:
        """Open an existing keyring (default: $TIDEGATE_KEYRING or .tidegate/keyring.json)."""
        return cls(path if path is not None else default_keyring_path(), provider)

    @classmethod
    def init(cls, path: str | Path | None = None, provider: KeyProvider | None = None) -> Keyring:
        """Create an empty keyring bound to `provider`'s master key; refuses to overwrite a file."""
        p = Path(path if path is not None else default_keyring_path())
        provider = provider if provider is not None else LocalMasterKeyProvider()
        if p.exists():
            raise KeyringError(f"keyring {p} already exists; refusing to overwrite it")
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"format": FORMAT, "master_key_id": provider.key_id, "tenants": {}}
        _atomic_write(p, _dump(doc), exclusive=True)
        return cls(p, provider, _doc=doc)

    @property
    def provider(self) -> KeyProvider:
        if self._provider is None:
            self._provider = LocalMasterKeyProvider()
        if self._provider.key_id != self._doc["master_key_id"]:
            raise KeyringError(
                f"keyring {self.path} is wrapped by master key {self._doc['master_key_id']}, "
                f"not by the provider's {self._provider.key_id} (wrong master key?)"
            )
        return self._provider

    @property
    def master_key_id(self) -> str:
        return self._doc["master_key_id"]

    def _read(self) -> dict:
        try:
            st = self.path.stat()
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise KeyringError(f"keyring {self.path} does not exist (create it with: tidegate keys init)") from None
        except OSError as e:
            raise KeyringError(f"cannot read keyring {self.path}: {e.strerror}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise KeyringError(f"keyring {self.path} is not valid JSON") from None
        _check_doc(doc, self.path)
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return doc

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was read (one stat): a running job sees a
        rotation or a revocation made by `tidegate keys` at its next commit. True if it changed."""
        try:
            st = self.path.stat()
        except OSError:
            return False  # gone or unreadable for now: keep what we have (the next write fails loudly)
        with self._lock:
            if self._stamp == (st.st_mtime_ns, st.st_size, st.st_ino):
                return False
            self.reload()
            return True

    def reload(self) -> None:
        """Re-read the file (another process rotated or revoked); unwrapped keys of revoked versions are dropped."""
        with self._lock:
            self._doc = self._read()
            self._keys = {k: v for k, v in self._keys.items() if self._state(*k) != "revoked"}

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict]:
        # Read-modify-write under an exclusive lock, on the file's latest content.
        lock = self.path.with_name(self.path.name + ".lock")
        with self._lock:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._doc = self._read()
                doc = copy.deepcopy(self._doc)
                yield doc
                _check_doc(doc, self.path)
                _atomic_write(self.path, _dump(doc))
                self._doc = doc
            finally:
                os.close(fd)  # releases the lock

    # -- reading

    def tenants(self) -> list[str]:
        return sorted(self._doc["tenants"])

    def has_tenant(self, tenant: str) -> bool:
        return tenant in self._doc["tenants"]

    def versions(self, tenant: str) -> list[KeyVersion]:
        return [KeyVersion(tenant, e["version"], e["state"], e["created_at"]) for e in self._entries(tenant)]

    def _entries(self, tenant: str) -> list[dict]:
        try:
            return self._doc["tenants"][tenant]
        except KeyError:
            raise KeyPermissionError(f"keyring {self.path} holds no key for tenant {tenant!r}", tenant) from None

    def _entry(self, tenant: str, version: int) -> dict:
        for e in self._entries(tenant):
            if e["version"] == version:
                return e
        raise KeyPermissionError(
            f"keyring {self.path} holds no key version {version} for tenant {tenant!r}", tenant, version
        )

    def _state(self, tenant: str, version: int) -> str | None:
        for e in self._doc["tenants"].get(tenant, ()):
            if e["version"] == version:
                return e["state"]
        return None

    def current(self, tenant: str) -> int:
        """The version new values of `tenant` are encrypted with: its highest active version."""
        active = [e["version"] for e in self._entries(tenant) if e["state"] == "active"]
        if not active:
            raise KeyRevokedError(
                f"tenant {tenant!r} has no active key version (run: tidegate keys rotate {tenant})",
                tenant,
                max(e["version"] for e in self._entries(tenant)),
            )
        return max(active)

    def data_key(self, tenant: str, version: int) -> bytes:
        """The 256-bit data key of (tenant, version): KeyPermissionError if absent, KeyRevokedError if revoked."""
        e = self._entry(tenant, version)
        if e["state"] == "revoked":
            with self._lock:
                self._keys.pop((tenant, version), None)
            raise KeyRevokedError(f"key version {version} of tenant {tenant!r} is revoked", tenant, version)
        cached = self._keys.get((tenant, version))
        if cached is not None and cached[0] == e["wrapped_key"]:
            return cached[1]
        # (base64: _check_doc checked it when the file was read)
        key = self.provider.unwrap(base64.b64decode(e["wrapped_key"]), key_context(tenant, version))
        if len(key) != KEY_BYTES:
            raise KeyringError(f"key version {version} of tenant {tenant!r} is not a 256-bit key")
        with self._lock:
            self._keys[(tenant, version)] = (e["wrapped_key"], key)
        return key

    # -- changing

    def _new_entry(self, tenant: str, version: int, provider: KeyProvider) -> dict:
        key = os.urandom(KEY_BYTES)
        wrapped = base64.b64encode(provider.wrap(key, key_context(tenant, version))).decode()
        # Cached with its wrapped form: if this entry's write fails, the key is used only where the
        # file later holds this very entry (data_key), never under another process's version.
        self._keys[(tenant, version)] = (wrapped, key)
        return {
            "version": version,
            "wrapped_key": wrapped,
            "created_at": _now(),
            "state": "active",
        }

    def create_tenant(self, tenant: str) -> int:
        """Add a tenant with a fresh key, version 1; refuses an existing tenant. Returns 1."""
        try:
            check_tenant(tenant)
        except ValueError as e:
            raise KeyringError(str(e)) from None
        provider = self.provider
        with self._update() as doc:
            if tenant in doc["tenants"]:
                raise KeyringError(f"tenant {tenant!r} already exists in keyring {self.path}")
            doc["tenants"][tenant] = [self._new_entry(tenant, 1, provider)]
        return 1

    def rotate(self, tenant: str) -> int:
        """Add a new key version and make it current; earlier active versions become retired (they still
        decrypt). Returns the new version."""
        provider = self.provider
        with self._update() as doc:
            if tenant not in doc["tenants"]:
                raise KeyPermissionError(f"keyring {self.path} holds no key for tenant {tenant!r}", tenant)
            entries = doc["tenants"][tenant]
            version = max(e["version"] for e in entries) + 1
            for e in entries:
                if e["state"] == "active":
                    e["state"] = "retired"
            entries.append(self._new_entry(tenant, version, provider))
        return version

    def record_usage(self, counts: dict[tuple[str, int], int], rotate_after: int | None = None) -> list[tuple[str, int]]:
        """Add values encrypted per (tenant, version) to the file's counters (`values` of each
        version); with rotate_after, a tenant whose current version has encrypted that many
        values is rotated. Returns [(tenant, new version)] of the rotations made.

        Why: with random 96-bit nonces, AES-GCM stays safe for about 2^32 values per key; the
        counters and the automatic rotation keep every key far below that."""
        rotated: list[tuple[str, int]] = []
        if not any(counts.values()):
            return rotated
        provider = None
        with self._update() as doc:
            for (tenant, version), n in counts.items():
                for e in doc["tenants"].get(tenant, ()):
                    if e["version"] == version:
                        e["values"] = int(e.get("values", 0)) + int(n)
            if rotate_after is None:
                return rotated
            for tenant, entries in doc["tenants"].items():
                active = [e for e in entries if e["state"] == "active"]
                if not active:
                    continue
                current = max(active, key=lambda e: e["version"])
                if current.get("values", 0) >= rotate_after:
                    provider = provider or self.provider
                    version = max(e["version"] for e in entries) + 1
                    for e in active:
                        e["state"] = "retired"
                    entries.append(self._new_entry(tenant, version, provider))
                    rotated.append((tenant, version))
        return rotated

    def usage(self, tenant: str) -> dict[int, int]:
        """Values encrypted so far per version of a tenant (as recorded by the jobs)."""
        return {e["version"]: int(e.get("values", 0)) for e in self._entries(tenant)}

    def revoke(self, tenant: str, version: int) -> None:
        """Revoke one version: its wrapped key is deleted from the file, so nothing it encrypted decrypts
        again (KeyRevokedError). Rotate and re-encrypt first if that data is still wanted."""
        with self._update() as doc:
            entries = doc["tenants"].get(tenant)
            if entries is None:
                raise KeyPermissionError(f"keyring {self.path} holds no key for tenant {tenant!r}", tenant)
            for e in entries:
                if e["version"] == version:
                    e["state"] = "revoked"
                    e["wrapped_key"] = None
                    break
            else:
                raise KeyPermissionError(
                    f"keyring {self.path} holds no key version {version} for tenant {tenant!r}", tenant, version
                )
        self._keys.pop((tenant, version), None)

    # -- API keys of the online endpoint (crypto/api_keys.py)

    def api_keys(self) -> dict[str, dict]:
        """key id -> record (tenant, scrypt hash, state); never a token."""
        return self._doc.get("api_keys", {})

    def create_api_key(self, tenant: str) -> tuple[str, str]:
        """(key id, token) of a new key for tenant. The token is returned once and stored only hashed."""
        from crypto.api_keys import new_api_key

        try:
            check_tenant(tenant)
        except ValueError as e:
            raise KeyringError(str(e)) from None
        key_id, token, record = new_api_key(tenant, _now())
        with self._update() as doc:
            doc.setdefault("api_keys", {})[key_id] = record
        return key_id, token

    def revoke_api_keys(self, tenant: str, key_id: str | None = None) -> list[str]:
        """Revoke every active key of tenant (or the one key_id of it); returns the key ids revoked."""
        with self._update() as doc:
            revoked = []
            for kid, rec in doc.get("api_keys", {}).items():
                if rec["tenant"] == tenant and rec["state"] == "active" and key_id in (None, kid):
                    rec.update(state="revoked", salt=None, hash=None, revoked_at=_now())
                    revoked.append(kid)
            if not revoked:
                raise KeyringError(f"keyring {self.path} holds no active API key "
                                   f"{'for tenant ' + repr(tenant) if key_id is None else repr(key_id) + ' of ' + repr(tenant)}")  # fmt: skip
        return revoked

    def export(
        self,
        path: str | Path,
        tenants: Iterable[str],
        provider: KeyProvider | None = None,
        *,
        same_master_key: bool = False,
    ) -> Keyring:
        """Write a new keyring holding only `tenants` (all their versions), for a user who may read those.

        `provider` is the recipient's master key: the data keys are re-wrapped under it, so the
        recipient never holds this keyring's master key (which opens every tenant here). A provider
        with this keyring's own master key is refused. `same_master_key=True` instead copies the
        wrapped keys as they are (the reader then needs this keyring's master key); one of the two
        is required. Refuses to overwrite.
        """
        wanted = list(dict.fromkeys(tenants))
        if not wanted:
            raise KeyringError("export needs at least one tenant")
        if provider is not None and same_master_key:
            raise KeyringError("export: give a recipient master key or same_master_key=True, not both")
        if provider is None and not same_master_key:
            raise KeyringError(
                "export re-wraps the keys under the recipient's master key: give one (provider=...), or "
                "same_master_key=True to knowingly keep this keyring's master key, which opens every tenant here"
            )
        if provider is not None and provider.key_id == self.master_key_id:
            raise KeyringError(
                f"export: the recipient master key is this keyring's own ({self.master_key_id}); give the recipient's "
                "key, or same_master_key=True to knowingly keep it"
            )
        self.reload()  # the file as it is now: a version revoked since this object read it stays revoked
        for t in wanted:
            self._entries(t)  # KeyPermissionError for a tenant this keyring lacks
        doc = {"format": FORMAT, "master_key_id": self.master_key_id, "tenants": {}}
        if provider is not None:
            doc["master_key_id"] = provider.key_id
        for t in wanted:
            out = []
            for e in self._entries(t):
                e = dict(e)
                if provider is not None and e["state"] != "revoked":
                    wrapped = provider.wrap(self.data_key(t, e["version"]), key_context(t, e["version"]))
                    e["wrapped_key"] = base64.b64encode(wrapped).decode()
                out.append(e)
            doc["tenants"][t] = out
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(p, _dump(doc), exclusive=True)
        return Keyring(p, provider if provider is not None else self._provider, _doc=doc)


def _dump(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def _check_doc(doc: object, path: Path) -> None:
    def bad(why: str) -> KeyringError:
        return KeyringError(f"keyring {path} is malformed: {why}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    if not isinstance(doc.get("master_key_id"), str) or not isinstance(doc.get("tenants"), dict):
        raise bad("master_key_id or tenants missing")
    for tenant, entries in doc["tenants"].items():
        try:
            check_tenant(tenant)
        except ValueError as e:
            raise bad(str(e)) from None
        if not isinstance(entries, list) or not entries:
            raise bad(f"tenant {tenant!r} has no versions")
        seen = set()
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("version"), int) or not 1 <= e["version"] < 2**32:
                raise bad(f"tenant {tenant!r}: an entry without a version from 1 to 2^32 - 1")
            if e["version"] in seen:
                raise bad(f"tenant {tenant!r}: version {e['version']} listed twice")
            seen.add(e["version"])
            if e.get("state") not in STATES:
                raise bad(f"tenant {tenant!r} version {e['version']}: state must be one of {', '.join(STATES)}")
            if e["state"] != "revoked" and not isinstance(e.get("wrapped_key"), str):
                raise bad(f"tenant {tenant!r} version {e['version']}: wrapped_key missing")
            if e["state"] != "revoked":
                try:
                    base64.b64decode(e["wrapped_key"], validate=True)
                except (binascii.Error, ValueError):
                    raise bad(f"tenant {tenant!r} version {e['version']}: wrapped_key is not base64") from None
            if not isinstance(e.get("created_at"), str):
                raise bad(f"tenant {tenant!r} version {e['version']}: created_at missing")
            if not isinstance(e.get("values", 0), int) or e.get("values", 0) < 0:
                raise bad(f"tenant {tenant!r} version {e['version']}: values must be a count")
    if not isinstance(doc.get("api_keys", {}), dict):
        raise bad("api_keys is not an object")
    from crypto.api_keys import check_record

    for key_id, record in doc.get("api_keys", {}).items():
        why = check_record(key_id, record)
        if why:
            raise bad(why)
