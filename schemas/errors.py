"""Named exceptions a user (or a job) can catch. Messages never include event payloads."""

from __future__ import annotations


class TidegateError(Exception):
    """Base class of every error Tidegate raises on purpose."""


class SpecError(TidegateError):
    """The job spec is invalid; the message names each field path and the reason."""


class SourceError(TidegateError):
    """The source cannot be read (broker unreachable, topic missing, ...)."""


class SinkSchemaError(TidegateError):
    """An existing output table has a schema this job cannot write to."""


class PartitionFencedError(TidegateError):
    """Another writer moved a partition's committed position: this job no longer owns it."""

    def __init__(self, message: str, partitions: list[tuple[str, int]]):
        super().__init__(message)
        self.partitions = partitions


class EngineError(TidegateError):
    """The inference engine failed to start or to run (not a per-row failure)."""
