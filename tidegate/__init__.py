"""Tidegate's Python API: the documented entry point for notebooks and scripts.

    import tidegate

    spec = tidegate.load_spec("examples/demo.yaml")
    run = tidegate.Job(spec).run(until_drained=True)       # in the background; run.progress, run.stop()
    stats = run.wait()
    results = tidegate.read_results(spec, where=pl.col("status") == "flagged")
    tidegate.usage(spec, by="tenant")                      # tokens and cost per tenant

It re-exports the layered packages (docs/architecture.md), it does not hold the code: names are
imported on first use, so `import tidegate` is cheap and starts nothing (no Ray).

Specs:      load_spec, parse_spec, Spec
Jobs:       Job, RunHandle, RunProgress (a local run); submit, SubmittedJob (a Ray cluster's job)
Tables:     read_results, read_dead_letters, read_runs, status, usage, report (an HTML page)
Producing:  EventProducer, Delivery (tidegate.producer); EmbeddedBroker (a laptop's Kafka)
Models:     make_tiny_model (the offline test model)
Errors:     TidegateError and its subclasses (schemas/errors.py), e.g. SpecError, KeyPermissionError
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, tuple[str, str]] = {
    "load_spec": ("tidegate.api", "load_spec"),
    "parse_spec": ("tidegate.api", "parse_spec"),
    "Spec": ("schemas.spec", "JobSpec"),
    "Job": ("tidegate.api", "Job"),
    "RunHandle": ("tidegate.api", "RunHandle"),
    "RunProgress": ("tidegate.api", "RunProgress"),
    "submit": ("tidegate.api", "submit"),
    "SubmittedJob": ("tidegate.api", "SubmittedJob"),
    "read_results": ("tidegate.api", "read_results"),
    "read_dead_letters": ("tidegate.api", "read_dead_letters"),
    "read_runs": ("tidegate.api", "read_runs"),
    "status": ("tidegate.api", "status"),
    "usage": ("tidegate.api", "usage"),
    "report": ("tidegate.api", "report"),
    "EventProducer": ("jobs.producer", "EventProducer"),
    "Delivery": ("jobs.producer", "Delivery"),
    "EmbeddedBroker": ("connectors.broker", "EmbeddedBroker"),
    "make_tiny_model": ("jobs.tiny_model", "build_tiny_model"),
    "JobStats": ("jobs.stats", "JobStats"),
}
_ERRORS = (
    "TidegateError SpecError SourceError SinkError SinkSchemaError EngineError KeyringError KeyPermissionError "
    "KeyRevokedError DecryptionError EventContractError ProduceError"
).split()
_EXPORTS.update({name: ("schemas.errors", name) for name in _ERRORS})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'tidegate' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)  # importlib caches the module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from connectors.broker import EmbeddedBroker
    from jobs.producer import Delivery, EventProducer
    from jobs.stats import JobStats
    from jobs.tiny_model import build_tiny_model as make_tiny_model
    from schemas.errors import (
        DecryptionError, EngineError, EventContractError, KeyPermissionError, KeyringError, KeyRevokedError,
        ProduceError, SinkError, SinkSchemaError, SourceError, SpecError, TidegateError,
    )  # fmt: skip
    from schemas.spec import JobSpec as Spec
    from tidegate.api import (
        Job, RunHandle, RunProgress, SubmittedJob, load_spec, parse_spec, read_dead_letters, read_results,
        read_runs, report, status, submit, usage,
    )  # fmt: skip
