"""A run's counters: what the summary, the runs table's run row and the tests read."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from compute.totals import CommitTotals


@dataclass
class JobStats:
    run_id: str
    consumed: int = 0
    ok: int = 0
    dead_lettered: int = 0
    dead_by_class: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flagged: int = 0
    retried: int = 0  # generations re-run after a failed rule
    rule_failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    prompt_tokens: int = 0  # every generation, retries included
    completion_tokens: int = 0
    commits: int = 0
    published: int = 0  # sink.topic: committed rows sent to the results topic
    peak_uncommitted: int = 0  # most source rows read but not yet committed at any time (bounded)
    peak_engines: int = 0
    started: float = field(default_factory=time.monotonic)
    first_commit_s: float | None = None
    engines_ready_s: float | None = None
    engine_busy_fraction: float | None = None  # time engines spent in decode steps / time they were up
    engine_idle: float | None = None  # time with nothing in an engine / time since its first batch
    engine_occupancy: float | None = None  # mean running rows / max_num_seqs over the decode steps
    prefix_cache_hit_rate: float | None = None  # prompt tokens served from the prefix cache / prompt tokens
    engine_peak_batches: int | None = None  # most batches inside one engine at once
    backlog: int | None = None  # source rows not committed yet (Kafka lag), as last measured (every ~5 s)
    notes: list[str] = field(default_factory=list)
    finished: float | None = None

    def book(self, totals: CommitTotals) -> None:
        """A commit landed."""
        self.commits += 1
        self.ok += totals.rows_ok
        self.dead_lettered += totals.rows_dead
        self.flagged += totals.rows_flagged
        for cls, n in totals.dead_by_class.items():
            self.dead_by_class[cls] += n
        if self.first_commit_s is None:
            self.first_commit_s = time.monotonic() - self.started

    def runs_fields(self) -> dict:
        """The run totals of connectors.runs.RunsTable.append_run."""
        return dict(
            commits=self.commits, rows_ok=self.ok, rows_flagged=self.flagged, rows_dead=self.dead_lettered,
            dead_by_class=dict(self.dead_by_class), prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, retries=self.retried,
            engine={"engine_idle": self.engine_idle, "engine_occupancy": self.engine_occupancy,
                    "prefix_cache_hit_rate": self.prefix_cache_hit_rate},
        )  # fmt: skip

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rows_per_s(self) -> float:
        return (self.ok + self.dead_lettered) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def rows_per_s_after_start(self) -> float:
        """Throughput once the engines were loaded (start-up excluded)."""
        if self.engines_ready_s is None:
            return 0.0
        span = self.elapsed_s - self.engines_ready_s
        return (self.ok + self.dead_lettered) / span if span > 0 else 0.0
