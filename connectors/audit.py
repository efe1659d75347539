"""The online endpoint's audit: every request and its answer as rows of the job's own results and
dead-letter tables (same columns as batch; source_topic "serve:<route>", source_offset the
request number: compute/online.py).

    AuditLog(spec, encryption)
      open()                           create or check the tables; bind the encryption to them
      write(results, dead)             plain rows -> encrypted like a batch commit -> one append per table
      find(route, offset)              -> (results, dead) already stored for that request, decrypted

A group of requests is one append (jobs/serve.py batches them). Appends from several replicas
are plain Delta appends (delta-rs retries them on conflict); a retried append whose answer was
lost is recognised by its write marker (connectors/delta.py), so a row is never written twice.
"""

from __future__ import annotations

import pyarrow as pa

from connectors.delta import DeltaSink
from crypto.reader import decrypt_table
from crypto.stage import EncryptionStage
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA, with_columns_of
from schemas.spec import JobSpec


class AuditLog:
    def __init__(self, spec: JobSpec, encryption: EncryptionStage, run_id: str):
        self.encryption = encryption
        self.run_id = run_id
        self.stored_results = encryption.stored_results_schema(RESULTS_SCHEMA)
        self.stored_dead = encryption.stored_dead_schema(DEAD_LETTER_SCHEMA)
        self.sink = DeltaSink.from_spec(spec)
        self.sink.use_schemas(self.stored_results, self.stored_dead)

    def open(self) -> None:
        self.sink.open()
        self.encryption.bind(*self.sink.bindings())

    def write(self, results: pa.Table, dead: pa.Table) -> None:
        """Store plain rows: a tenant whose key was revoked meanwhile gets a dead letter (nothing
        of its row in clear), the rest encrypted as the spec says."""
        enc = self.encryption
        enc.refresh()
        results, unkeyed = enc.split_unkeyed(results, self.run_id)
        dead = with_columns_of(dead, DEAD_LETTER_SCHEMA)
        if unkeyed is not None:
            dead = pa.concat_tables([dead, with_columns_of(unkeyed, DEAD_LETTER_SCHEMA)])
        self.sink.append_unpositioned(enc.protect_results(results, self.stored_results), enc.protect_dead(dead, self.stored_dead))
        enc.record_usage()

    def find(self, route: str, offset: int) -> tuple[pa.Table, pa.Table]:
        """The rows stored for request `offset` of `route` (an Idempotency-Key seen before),
        decrypted with the endpoint's keyring."""
        results, dead = self.sink.rows_above((f"serve:{route}", 0), offset - 1, offset)
        keyring = self.encryption.keyring
        if keyring is not None:
            if results.num_rows:
                results = decrypt_table(results, keyring, binding=self.encryption.results)
            if dead.num_rows:
                dead = decrypt_table(dead, keyring, binding=self.encryption.dead)
        return results, dead
