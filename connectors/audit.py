"""The online endpoint's audit: every request and its answer as rows of the job's own results and
dead-letter tables (same columns as batch; source_topic "serve:<route>", source_offset the
request number: compute/online.py), plus the audit's own columns (schemas/records.py AUDIT_COLUMNS).

    AuditLog(spec, encryption)
      open()                           create or check the tables; bind the encryption to them
      write(results, dead)             plain rows -> encrypted like a batch commit -> one append per table
      protect(results, dead)           plain rows -> the rows as stored (write = protect, then append)
      replay(records, journal_name)    a replica's journal (connectors/journal.py): the groups each
                                       table has not recorded yet
      checkpoint()                     the checkpoints the appends made due (they never write one)
      find(route, offset)              -> (results, dead) already stored for that request, decrypted
      find_in(results, dead, route, offset)  the same, among stored rows not committed yet
      rows_of(results, dead, route, offset)  that request's rows among these, as they are
      maintain(commits, runner=None)   one sink.maintenance round on the tables, with handles of its
                                       own (it runs beside the appends, not between them); runner:
                                       where maintain_tables runs (default: this thread)

A group of requests is one append (jobs/serve.py batches them). Appends from several replicas
are plain Delta appends (delta-rs retries them on conflict); a retried append whose answer was
lost is recognised by its write marker (connectors/delta.py), so a row is never written twice.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from connectors.delta import DeltaSink
from connectors.journal import app_id
from connectors.maintenance import maintenance_round
from crypto.reader import decrypt_table
from connectors.sink import adopt_stored_twin
from crypto.stage import EncryptionStage
from schemas.records import AUDIT_DEAD_LETTER_SCHEMA, AUDIT_RESULTS_SCHEMA, with_columns_of
from schemas.spec import JobSpec


class AuditLog:
    def __init__(self, spec: JobSpec, encryption: EncryptionStage, run_id: str):
        self.encryption = encryption
        self.job = spec.name
        self.run_id = run_id
        self.spec = spec
        self.sink = DeltaSink.from_spec(spec)
        adopt_stored_twin(encryption, self.sink)
        self.plain_results = encryption.plain_results_schema(AUDIT_RESULTS_SCHEMA)
        self.stored_results = encryption.stored_results_schema(AUDIT_RESULTS_SCHEMA)
        self.stored_dead = encryption.stored_dead_schema(AUDIT_DEAD_LETTER_SCHEMA)
        self.sink.use_schemas(self.stored_results, self.stored_dead)
        self.sink.defer_checkpoints()  # written by checkpoint(), after the answers (jobs/serve.py)

    def open(self) -> None:
        self.sink.open()
        self.encryption.bind(*self.sink.bindings())

    def write(self, results: pa.Table, dead: pa.Table) -> None:
        self.sink.append_unpositioned(*self.protect(results, dead))

    def checkpoint(self) -> dict[str, int]:
        """The tables' checkpoints that appends since the last call made due (role -> version): a
        request's answer does not wait for one."""
        return self.sink.write_checkpoints()

    def protect(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Plain rows as they are stored: a tenant whose key was revoked meanwhile gets a dead
        letter (nothing of its row in clear), the rest encrypted as the spec says."""
        enc = self.encryption
        results = with_columns_of(results, self.plain_results)  # a request without a key: no fingerprint
        results, dead = enc.route_unkeyed(results, with_columns_of(dead, AUDIT_DEAD_LETTER_SCHEMA), self.run_id,
                                          AUDIT_DEAD_LETTER_SCHEMA)  # fmt: skip
        out = enc.protect_results(results, self.stored_results), enc.protect_dead(dead, self.stored_dead)
        enc.record_usage()
        return out

    def replay(self, records: list, journal_name: str) -> int:
        """Append the groups of a journal (connectors/journal.py JournalRecord, in seq order) that a
        table has not recorded yet: each table's transaction for the journal says up to which seq it
        holds them (a table without a group's rows needs no record of it). Also the live commit
        of a replica's own pending groups: a commit that failed half-way is finished, not
        repeated. Returns the number of rows appended."""
        if not records:
            return 0
        last = records[-1].seq
        app = app_id(self.job, journal_name)
        have_results, have_dead = self.sink.audit_versions(app)
        # In the tables' stored columns: a journal a replica left behind before a deploy that added
        # a column (a new input field, a newer Tidegate) has its rows without it. Before stop 44
        # that stopped every replica starting after the deploy (each replays the orphan first).
        results = [with_columns_of(r.results, self.stored_results) for r in records if r.seq > (have_results or 0)]
        dead = [with_columns_of(r.dead, self.stored_dead) for r in records if r.seq > (have_dead or 0)]
        r = pa.concat_tables(results) if results else self.stored_results.empty_table()
        d = pa.concat_tables(dead) if dead else self.stored_dead.empty_table()
        self.sink.append_unpositioned(r, d, txn=(app, last))
        return r.num_rows + d.num_rows

    def maintain(self, commits: int, runner=None) -> dict | None:
        """Compact, checkpoint and vacuum the tables (sink.maintenance; connectors/maintenance.py)
        through a sink of its own, so the appends' handles are not held for the seconds a round
        takes: a compaction that races an append is retried on a fresh snapshot and never drops a
        row. `runner(spec, results schema, dead-letter schema)` runs maintain_tables elsewhere (an
        online replica: a low-priority process, actors/maintainer.py); None: in this thread.
        Returns the round's report (None: it failed, logged)."""
        run = runner or maintain_tables
        return maintenance_round(lambda: run(self.spec, self.stored_results, self.stored_dead), commits,
                                 f"audit of {self.run_id}")  # fmt: skip

    def find(self, route: str, offset: int) -> tuple[pa.Table, pa.Table]:
        """The rows stored for request `offset` of `route` (an Idempotency-Key seen before),
        decrypted with the endpoint's keyring."""
        results, dead = self.sink.rows_above((f"serve:{route}", 0), offset - 1, offset)
        return self._decrypted(results, dead)

    def find_in(self, results: pa.Table, dead: pa.Table, route: str, offset: int) -> tuple[pa.Table, pa.Table]:
        """find() among stored rows that are not in the tables yet (a journal's pending groups)."""
        return self._decrypted(*self.rows_of(results, dead, route, offset))

    @staticmethod
    def rows_of(results: pa.Table, dead: pa.Table, route: str, offset: int) -> tuple[pa.Table, pa.Table]:
        """The rows of request `offset` of `route` among these (as they are: stored or plain)."""

        def rows(t: pa.Table) -> pa.Table:
            if not t.num_rows:
                return t
            mask = pc.and_(pc.equal(t.column("source_topic"), f"serve:{route}"), pc.equal(t.column("source_offset"), offset))
            return t.filter(mask)

        return rows(results), rows(dead)

    def _decrypted(self, results: pa.Table, dead: pa.Table) -> tuple[pa.Table, pa.Table]:
        keyring = self.encryption.keyring
        if keyring is not None:
            if results.num_rows:
                results = decrypt_table(results, keyring, binding=self.encryption.results)
            if dead.num_rows:
                dead = decrypt_table(dead, keyring, binding=self.encryption.dead)
        return results, dead


def maintain_tables(spec: JobSpec, results_schema: pa.Schema, dead_schema: pa.Schema) -> dict:
    """One sink.maintenance round on the job's results and dead-letter tables (rows stored with
    these schemas), through a sink of its own: DeltaSink.maintain's report."""
    sink = DeltaSink.from_spec(spec)
    sink.use_schemas(results_schema, dead_schema)
    sink.open()
    return sink.maintain()
