"""Test-only job runner: plugins loaded first, or an engine or sink that fails on cue.

    python -m tests.job_runner SPEC.yaml [--until-drained] [--plugin MODULE ...]
                               [--crash-on TEXT] [--hang-on TEXT] [--slow-commit-s S]

runs `jobs.run.main` after importing each --plugin module (a toy source or sink registering
itself, as tests/toy_source.py does), with jobs.pipeline.JobComponents carrying:

    --crash-on TEXT    an engine whose process exits when its batch holds a prompt containing TEXT
                       (as a segfault or an OOM kill would)
    --hang-on TEXT     an engine that blocks forever on such a batch (as a stuck kernel would)
    --slow-commit-s S  a Delta sink whose every commit takes S seconds longer (a slow store)
    --flaky-writes K   a Delta sink whose first K table writes fail (every other one lands first,
                       then fails: the store's answer lost after the commit was made)
    --broken-store     a Delta sink none of whose writes land (a store that is down for good)
    --instant-engine   bench/instant_engine.py instead of vLLM (long runs: chaos, soak)
    --engine-logs LINE an engine whose process logs LINE when it starts (worker log redaction)

Production code has no fault hooks: these are subclasses handed to the job like any component.
The classes are made inside functions, so Ray ships them to the actors by value (the actors do
not need to import this test package).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from compute.engine import EngineWorker
from connectors.delta import DeltaSink


def failing_engine(crash_on: str | None = None, hang_on: str | None = None, base: type = EngineWorker) -> type:
    class FaultyEngine(base):
        async def run_batch(self, requests):
            prompts = requests.column("prompt").to_pylist()
            if crash_on and any(crash_on in p for p in prompts):
                os._exit(70)
            if hang_on and any(hang_on in p for p in prompts):
                time.sleep(3600)  # blocks the actor: it stops answering, as a stuck kernel would
            return await super().run_batch(requests)
    return FaultyEngine


def talkative_engine(line: str, base: type = EngineWorker) -> type:
    """An engine whose process logs `line` (a test puts secrets in it) once it has started."""

    class TalkativeEngine(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            import logging

            logging.getLogger("compute.engine").warning("engine settings: %s", line)

    return TalkativeEngine


def slow_sink(spec, seconds: float) -> DeltaSink:
    class SlowDeltaSink(DeltaSink):
        def commit(self, results, dead, positions):
            time.sleep(seconds)
            super().commit(results, dead, positions)

    return SlowDeltaSink.from_spec(spec)


def flaky_sink(spec, failures: int | None) -> DeltaSink:
    """failures=None: every write fails and none lands."""

    class FlakyDeltaSink(DeltaSink):
        failed = 0

        def _write(self, table, rows, txns, refresh=True, marker=None):
            if failures is None:
                raise OSError("injected store failure (the store is down)")
            if self.failed < failures:
                self.failed += 1
                if self.failed % 2 == 0:
                    super()._write(table, rows, txns, refresh, marker)  # landed, but the answer is lost
                raise OSError(f"injected store failure {self.failed} of {failures}")
            super()._write(table, rows, txns, refresh, marker)

    return FlakyDeltaSink.from_spec(spec)


def main(argv: list[str]) -> int:
    from jobs.pipeline import JobComponents
    from jobs.run import arg_parser, main as run_main
    from schemas.spec import load_spec

    parser = arg_parser("python -m tests.job_runner")
    parser.add_argument("--plugin", action="append", default=[], help="module to import before the spec is read")
    parser.add_argument("--crash-on", default=None)
    parser.add_argument("--hang-on", default=None)
    parser.add_argument("--slow-commit-s", type=float, default=0.0)
    parser.add_argument("--flaky-writes", type=int, default=0)
    parser.add_argument("--broken-store", action="store_true")
    parser.add_argument("--instant-engine", action="store_true")
    parser.add_argument("--engine-logs", default=None, help="a line the engine process logs when it starts")
    a = parser.parse_args(argv)
    for module in a.plugin:
        importlib.import_module(module)
    components = JobComponents()
    if a.instant_engine:
        from bench.instant_engine import InstantEngine

        components.engine = InstantEngine
    if a.crash_on or a.hang_on:  # on vLLM, or with --instant-engine on the instant engine
        components.engine = failing_engine(a.crash_on, a.hang_on, components.engine or EngineWorker)
    if a.engine_logs:
        components.engine = talkative_engine(a.engine_logs, components.engine or EngineWorker)
    if a.slow_commit_s:
        components.sink = slow_sink(load_spec(a.spec), a.slow_commit_s)
    if a.flaky_writes or a.broken_store:
        components.sink = flaky_sink(load_spec(a.spec), None if a.broken_store else a.flaky_writes)
    return run_main(a.spec, a.until_drained, a.address, a.follow, a.log_format, components=components)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
