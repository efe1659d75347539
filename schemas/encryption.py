"""The `encryption:` section of a job spec: which fields are encrypted, under which tenant's key.

An absent section means encryption off (every default below is "nothing encrypted"):

    encryption:
      keyring: /secrets/tidegate/keyring.json     # default: $TIDEGATE_KEYRING or .tidegate/keyring.json
      tenant_field: customer_id                   # event field holding the tenant id ...
      tenant: default                             # ... and/or a fixed tenant (the fallback when the field is absent)
      input_fields: [email, {name: user_id, deterministic: true}]   # event fields carried into results, encrypted
      output_fields: [output_text]                # result columns encrypted
      pii: encrypt                                # PII found in outputs: encrypt | redact | off
      dead_letter_raw: true                       # encrypt dead-letter `raw` (default: true if input_fields)

`deterministic: true` makes equal values give equal ciphertexts within a column (AES-SIV), so the
column can be joined and grouped on without decrypting; it also reveals which rows share a value,
so use it only for identifiers that need it. The formats are in docs/encryption.md.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_KEYRING = ".tidegate/keyring.json"
KEYRING_ENV = "TIDEGATE_KEYRING"
MASTER_KEY_ENV = "TIDEGATE_MASTER_KEY"

# Tenant ids are stored in every encrypted value (one length byte): short, ASCII, no separators
# that the keyring file or the CLI would have to escape.
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Result columns that make up a row's id (the associated data of its encrypted values) and the
# exactly-once positions: they must stay in clear text.
ROW_ID_COLUMNS = ("source_topic", "source_partition", "source_offset")
# Result columns encryption.output_fields cannot name, besides the row-id ones: what a reader
# without keys, the reader's tenant check, the answers lookup and the audit need in clear.
CLEAR_RESULT_COLUMNS = ("id", "status", "tenant", "run_id")
CLEAR_RESULT_COLUMNS_WHY = ("the row's id, its status, its tenant (the reader checks each value against it) and its "
                            "run are what readers without keys, the answers lookup and the audit go by")  # fmt: skip


def default_keyring_path() -> str:
    return os.environ.get(KEYRING_ENV) or DEFAULT_KEYRING


def check_tenant(tenant: Any) -> str:
    """Return `tenant` if it is a valid tenant id, else raise ValueError saying why."""
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise ValueError(
            f"invalid tenant id {tenant!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return tenant


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncryptedField(_Strict):
    """One encrypted field; in YAML either its name or {name, deterministic}."""

    name: str = Field(min_length=1)
    deterministic: bool = Field(
        default=False, description="AES-SIV: equal values give equal ciphertexts within the column (joinable)."
    )

    @field_validator("name")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("field name must not be blank")
        if v != v.strip():
            raise ValueError("field name must not start or end with spaces")
        return v


def _fields(v: Any) -> Any:
    # "email" is shorthand for {name: email}
    if isinstance(v, list):
        return [{"name": e} if isinstance(e, str) else e for e in v]
    return v


def _no_duplicates(fields: list[EncryptedField], what: str) -> list[EncryptedField]:
    seen: set[str] = set()
    dups = sorted({f.name for f in fields if f.name in seen or seen.add(f.name)})
    if dups:
        raise ValueError(f"{what} listed more than once: {', '.join(dups)}")
    return fields


class EncryptionSpec(_Strict):
    keyring: str = Field(
        default_factory=default_keyring_path,
        min_length=1,
        description=f"Keyring file (tidegate keys init); default ${KEYRING_ENV} or {DEFAULT_KEYRING}.",
    )
    master_key_env: str = Field(
        default=MASTER_KEY_ENV, min_length=1, description="Environment variable holding the master key."
    )
    tenant: str | None = Field(default=None, description="Fixed tenant id, or the fallback for tenant_field.")
    tenant_field: str | None = Field(default=None, min_length=1, description="Event field holding the tenant id.")
    input_fields: list[EncryptedField] = Field(
        default_factory=list, description="Sensitive event fields carried into the results table, encrypted."
    )
    output_fields: list[EncryptedField] = Field(
        default_factory=list,
        description="Result columns to encrypt (e.g. output_text); naming output_text or output_json encrypts "
        "both (they hold the same output).",
    )
    pii: Literal["encrypt", "redact", "off"] = Field(
        default="off", description="PII found in outputs: encrypted in place, replaced by [REDACTED:<kind>], or kept."
    )
    dead_letter_raw: bool | None = Field(
        default=None, description="Encrypt the raw event of dead-letter rows; default: true when input_fields is set."
    )
    protect_echoes: bool = Field(
        default=True,
        description="A carried input field's value repeated in an output (output_text, output_json) is protected "
        "like PII: encrypted in place ([PII:echo:...]), or redacted with pii: redact.",
    )
    rotate_after_values: int = Field(
        default=2**30,
        ge=1,
        description="Rotate a tenant's key once its current version encrypted this many values (AES-GCM with "
        "random 96-bit nonces stays safe up to about 2^32 per key).",
    )

    @field_validator("input_fields", "output_fields", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return _fields(v)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str | None:
        return None if v is None else check_tenant(v)

    @field_validator("input_fields")
    @classmethod
    def _input_unique(cls, v: list[EncryptedField]) -> list[EncryptedField]:
        return _no_duplicates(v, "input_fields")

    @field_validator("output_fields")
    @classmethod
    def _output_unique(cls, v: list[EncryptedField]) -> list[EncryptedField]:
        clear = sorted({f.name for f in v} & set(ROW_ID_COLUMNS))
        if clear:
            raise ValueError(f"{', '.join(clear)}: row-id columns stay in clear text (they bind the ciphertexts)")
        clear = sorted({f.name for f in v} & set(CLEAR_RESULT_COLUMNS))
        if clear:  # before stop 45 accepted: an encrypted tenant made every row unreadable (its check
            # compares the column with the value's header), an encrypted id broke lookups by id
            raise ValueError(f"{', '.join(clear)}: stay in clear text ({CLEAR_RESULT_COLUMNS_WHY})")
        return _no_duplicates(v, "output_fields")

    @model_validator(mode="after")
    def _needs_a_tenant(self) -> EncryptionSpec:
        if self.needs_keys and self.tenant is None and self.tenant_field is None:
            raise ValueError("encryption needs a tenant: give encryption.tenant and/or encryption.tenant_field")
        return self

    @property
    def encrypt_dead_letter_raw(self) -> bool:
        return bool(self.input_fields) if self.dead_letter_raw is None else self.dead_letter_raw

    @property
    def needs_keys(self) -> bool:
        """True when anything is encrypted (pii: redact alone needs no key)."""
        return bool(self.input_fields or self.output_fields or self.pii == "encrypt" or self.encrypt_dead_letter_raw)

    @property
    def enabled(self) -> bool:
        """False for an absent section: nothing encrypted, nothing redacted."""
        return self.needs_keys or self.pii != "off"

    def tenant_of(self, event: dict[str, Any]) -> str | None:
        """The tenant id of a decoded event: `tenant_field`'s value, else the fixed `tenant`.

        Returns None when neither gives one (the caller dead-letters the event); raises ValueError
        for a value that is not a valid tenant id (the message does not repeat the value: events are
        not to leak into error texts).
        """
        if self.tenant_field is not None:
            value = event.get(self.tenant_field)
            if value is not None:
                if isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if not isinstance(value, str) or not TENANT_RE.fullmatch(value):
                    raise ValueError(f"event field {self.tenant_field!r} does not hold a valid tenant id")
                return value
        return self.tenant
