"""Encryption of sensitive values: one package for the whole concept (docs/encryption.md).

    format.py      the stored value format and key derivation (HKDF-SHA256 -> AES-256-GCM / AES-SIV)
    arrow.py       Arrow buffer plumbing shared by the ciphers
    columns.py     encrypt_column / decrypt_column: whole values of an Arrow column
    pii.py         PII detectors (email, phone, card, IBAN, national ids): what counts as PII
    pii_tokens.py  protect_pii / reveal_pii / reseal_pii: PII encrypted (or redacted) inside text
    keyring.py     the keyring file: per-tenant data keys wrapped by a master key provider
    stage.py       EncryptionStage: what a job encrypts before each commit (spec `encryption:`)
    reader.py      decrypt_table / read_results: the notebook side

Layering: depends on `schemas` only (and cryptography, pyarrow, numpy; deltalake/polars in the
reader). Nothing here imports Ray, `connectors`, `compute` or `actors`.
"""

from crypto.columns import (
    decrypt_column,
    encrypt_column,
    is_deterministic,
    is_encrypted,
    key_versions,
    row_ids_from,
    stored_groups,
)
from crypto.format import ARMOR_PREFIX, MAGIC, KeySource, OnMissingKey, armor, table_label
from crypto.pii_tokens import PiiMode, protect_pii, reseal_pii, reveal_pii

__all__ = [
    "ARMOR_PREFIX", "MAGIC", "KeySource", "OnMissingKey", "PiiMode", "armor", "decrypt_column", "encrypt_column",
    "is_deterministic", "is_encrypted", "key_versions", "protect_pii", "reseal_pii", "reveal_pii", "row_ids_from",
    "stored_groups", "table_label",
]  # fmt: skip
