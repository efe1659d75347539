"""Named exceptions a user (or a job) can catch. Messages never include event payloads."""

from __future__ import annotations


class TidegateError(Exception):
    """Base class of every error Tidegate raises on purpose."""

    def __reduce__(self):
        # Raised inside Ray actors and re-raised in the driver: pickled with its fields (tenant,
        # partitions, ...), whatever the subclass's constructor takes.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> TidegateError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class SpecError(TidegateError):
    """The job spec is invalid; the message names each field path and the reason."""


class SourceError(TidegateError):
    """The source cannot be read (broker unreachable, topic missing, ...)."""


class SinkError(TidegateError):
    """The sink's store kept failing a write (after sink.write_attempts tries): the job stops."""


class SinkSchemaError(TidegateError):
    """An existing output table has a schema this job cannot write to."""


class PartitionFencedError(TidegateError):
    """Another writer moved a partition's committed position: this job no longer owns it."""

    def __init__(self, message: str, partitions: list[tuple[str, int]]):
        super().__init__(message)
        self.partitions = partitions


class EngineError(TidegateError):
    """The inference engine failed to start or to run (not a per-row failure)."""


class EngineBroken(EngineError):
    """An engine step raised: every batch inside the engine failed, and the engine is in no known
    state (vLLM's engine core gone, a sticky device error). The pool restarts that engine.
    `pid`: the engine process's (the pool restarts the process that failed, never its successor)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message, pid)  # both in args: they survive the pickling between processes
        self.pid = pid

    def __str__(self) -> str:
        return str(self.args[0])


class StageError(TidegateError):
    """A CPU stage actor (render, validate, commit writer) failed to start or died repeatedly."""


# -- encryption
# Messages name the table, column, row id, tenant and key version involved: never a value, never key material.


class KeyringError(TidegateError):
    """The keyring file or the master key cannot be used (missing, malformed, wrong master key, ...)."""


class KeyPermissionError(TidegateError):
    """The caller's keyring holds no key for this tenant (or for this key version of it)."""

    def __init__(self, message: str, tenant: str, version: int | None = None):
        super().__init__(message)
        self.tenant = tenant
        self.version = version


class KeyRevokedError(TidegateError):
    """The key version that encrypted a value was revoked: the value can no longer be decrypted."""

    def __init__(self, message: str, tenant: str, version: int):
        super().__init__(message)
        self.tenant = tenant
        self.version = version


class DecryptionError(TidegateError):
    """A stored value does not decrypt: tampered, truncated, or moved to another row, column or table."""

    def __init__(self, message: str, table: str, column: str, row_id: str | None):
        super().__init__(message)
        self.table = table
        self.column = column
        self.row_id = row_id


class EventContractError(TidegateError, ValueError):
    """An event breaks the job's event contract (compute/event_contract.py). The message names the
    failing field paths and constraints, never a value; `record` is the event's position in the
    call that was refused (EventProducer.send_many), when there is one."""

    def __init__(self, message: str, record: int | None = None):
        super().__init__(message if record is None else f"event #{record}: {message}")
        self.record = record


class ProduceError(TidegateError):
    """The broker did not take an event (EventProducer): the message names the topic and the error
    class. `record`: the event's position in the call (when known); `delivered`: how many of that
    call's events the broker did take (send_many: they are in the topic)."""

    def __init__(self, message: str, record: int | None = None, delivered: int | None = None):
        super().__init__(message)
        self.record = record
        self.delivered = delivered


class AuthError(TidegateError):
    """An API key is missing, malformed, unknown or revoked (the online endpoint answers 401)."""


class LimitExceededError(TidegateError):
    """A tenant's request or token budget (serve.limits) is spent for now; retry_after_s says when to come back."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s
