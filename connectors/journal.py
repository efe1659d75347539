"""The online endpoint's audit journal (`serve.ack: journal`): a request is answered once its audit
rows are on the replica's disk, fsync'd; the Delta commit follows every sink.commit_interval_s.

    AuditJournal.create(directory, name)  a replica's own journal file, held (an exclusive flock)
      append(seq, results, dead)          one group of stored rows (already encrypted), fsync'd
      truncate()                          every group in it is committed: start the file again
      rewrite(records)                    only these groups (the uncommitted ones) are left in it
      close(remove)
    orphans(directory)                    journals whose replica is gone (their flock is free), held
    read_records(path)                    -> [JournalRecord]; a torn last record (a write the crash
                                          cut short, never acknowledged) is left out

A record: magic, seq, the two tables' byte lengths, a CRC-32 of both, then the results and the
dead-letter rows as Arrow IPC streams. The rows are the stored ones (connectors/audit.py protects
them first): nothing is in this file in clear that the tables would not hold in clear.

Exactly once across a crash: a replica commits its journal's groups to Delta with the application
transaction (`app_id(job, name)`, version = the last group's seq) in the same commit, so whoever
replays an orphan appends only the groups above each table's recorded version
(connectors/audit.py `AuditLog.replay`).
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from schemas.errors import SinkError

MAGIC = b"TGJ1"
HEADER = struct.Struct(">4sQQQI")  # magic, seq, results bytes, dead bytes, crc32
SUFFIX = ".journal"


def app_id(job: str, name: str) -> str:
    """The Delta application transaction that records how far journal `name` is committed."""
    return f"tidegate/{job}/journal/{name}"


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


@dataclass
class JournalRecord:
    seq: int
    results: pa.Table
    dead: pa.Table


class AuditJournal:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.broken = False

    @property
    def name(self) -> str:
        return self.path.name[: -len(SUFFIX)]

    @classmethod
    def create(cls, directory: str | os.PathLike, name: str) -> AuditJournal:
        d = Path(directory)
        path = d / f"{name}{SUFFIX}"
        # Locked under a name orphans() does not look at, then renamed: a replica replaying
        # orphans never finds this journal unlocked (and removes it) between creation and lock.
        new = d / f"{name}{SUFFIX}.new"
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(new, path)
            _fsync_dir(d)
        except OSError as e:
            raise SinkError(f"serve.journal_dir {str(d)!r}: cannot create the journal ({e.strerror})") from None
        return cls(path, fd)

    def append(self, seq: int, results: pa.Table, dead: pa.Table) -> None:
        """Raises OSError if the record is not durable (its request is then not answered 200)."""
        self._write(seq, results, dead, sync=True)

    def _write(self, seq: int, results: pa.Table, dead: pa.Table, sync: bool) -> None:
        if self.broken:
            raise OSError(f"journal {self.path.name} is unusable after a failed write")
        r, d = _ipc(results), _ipc(dead)
        record = HEADER.pack(MAGIC, seq, len(r), len(d), zlib.crc32(d, zlib.crc32(r))) + r + d
        end = os.fstat(self.fd).st_size
        try:
            view = memoryview(record)
            while view:  # O_APPEND: at the end; a short write (a full disk) goes on or raises
                view = view[os.write(self.fd, view):]
            if sync:
                os.fsync(self.fd)
        except OSError:
            # A part of the record may be in the file: cut it off, or a replay would stop at it and
            # miss the records after it. If even that fails, no record goes after it.
            try:
                os.ftruncate(self.fd, end)
            except OSError:
                self.broken = True
            raise

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def rewrite(self, records: list[JournalRecord]) -> None:
        """The journal with only `records` (the groups not committed yet): a journal that never
        empties (requests arrive during every commit) does not grow for ever. Written to a new
        file, locked before it takes the journal's name (orphans() never finds it unlocked), and
        renamed over the old one: a crash at any point leaves one complete journal under the name.
        Raises OSError with the old journal in place."""
        new = self.path.with_name(self.path.name + ".new")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            replacement = AuditJournal(new, fd)
            for r in records:
                replacement._write(r.seq, r.results, r.dead, sync=False)
            os.fsync(fd)
            os.rename(new, self.path)
        except OSError:
            os.close(fd)
            new.unlink(missing_ok=True)
            raise
        os.close(self.fd)  # the old file, nameless now
        self.fd = fd
        _fsync_dir(self.path.parent)  # if this raises, the new file is the journal all the same

    def close(self, remove: bool = False) -> None:
        if self.fd < 0:
            return
        if remove:
            self.path.unlink(missing_ok=True)  # before the lock goes: nobody replays a removed file
        os.close(self.fd)
        self.fd = -1


def orphans(directory: str | os.PathLike) -> Iterator[AuditJournal]:
    """The journals in `directory` that no living replica holds, each held by us while the caller
    replays it (close(remove=True) when done). A journal held by a living replica is skipped."""
    d = Path(directory)
    if not d.is_dir():
        return
    for path in sorted(d.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:  # another replica replayed and removed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # The name must still be the file we locked. Removed between our open and our lock: already
        # replayed. Another file under it: its replica's rewrite() renamed a new journal (locked,
        # live) over the one we opened, then closed the old one, which let our lock through.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        yield AuditJournal(path, fd)


def read_records(path: str | os.PathLike) -> list[JournalRecord]:
    data = Path(path).read_bytes()
    out: list[JournalRecord] = []
    at = 0
    while at + HEADER.size <= len(data):
        magic, seq, nr, nd, crc = HEADER.unpack_from(data, at)
        body_at = at + HEADER.size
        end = body_at + nr + nd
        if magic != MAGIC or end > len(data):
            break  # a torn write: its request was never answered
        r, d = data[body_at : body_at + nr], data[body_at + nr : end]
        if zlib.crc32(d, zlib.crc32(r)) != crc:
            break
        out.append(JournalRecord(seq, _table(r), _table(d)))
        at = end
    return out


def _fsync_dir(d: Path) -> None:
    """The journal's directory entry is durable too (a new file's name survives a crash)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
