"""An online replica's maintenance rounds in a process of their own (actors/maintainer.py), on a
real local Ray and real Delta tables: the round compacts the tables, and every thread of the
process that ran it, delta-rs's runtime included, runs at the lowered priority."""

from __future__ import annotations

import os

import polars as pl
import pytest
import ray

from compute.prompts import dead_letter_table
from connectors.delta import DeltaSink
from schemas.records import DEAD_LETTER_SCHEMA, RESULTS_SCHEMA
from tests.conftest import make_spec, results_table


def test_a_round_runs_in_a_low_priority_process_and_compacts_the_tables(local_ray, tmp_path, monkeypatch):
    from actors.maintainer import NICE, LowPriorityRounds
    from schemas.spec import parse_spec

    spec = parse_spec(make_spec(tmp_path, None, "t", tmp_path / "no-model", **{"source": {"kafka": {"topic": "t"}}}))
    sink = DeltaSink.from_spec(spec)
    sink.open()
    for i in range(12):  # 12 one-row files
        sink.append_unpositioned(results_table([i]), dead_letter_table([], "r"))
    rounds = LowPriorityRounds()
    report = rounds(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)
    assert report["results"]["before"]["files"] == 12 and report["results"]["after"]["files"] == 1
    assert sorted(pl.read_delta(spec.sink.results)["source_offset"].to_list()) == list(range(12))
    priorities = ray.get(rounds.actor.priorities.remote())
    assert os.getpid() not in priorities  # thread ids: another process's
    names = {open(f"/proc/{tid}/comm").read().strip() for tid in priorities}
    assert any(n.startswith("tokio") for n in names), names  # delta-rs's runtime, started by the round
    assert min(priorities.values()) >= NICE, priorities  # Ray's own start its threads at 0 (its main one at 15)
    ray.kill(rounds.actor)  # the process died (OOM, a node's loss): that round fails, the next starts a new one
    with pytest.raises(ray.exceptions.RayActorError):
        rounds(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)
    report = rounds(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)
    assert report["results"]["after"]["files"] == 1
    # A round past ROUND_TIMEOUT_S is given up and its process killed; the next starts a new one.
    import actors.maintainer as maintainer

    stuck = rounds.actor
    monkeypatch.setattr(maintainer, "ROUND_TIMEOUT_S", 0.001)
    with pytest.raises(ray.exceptions.GetTimeoutError):
        rounds(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)
    assert rounds.actor is None
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(stuck.priorities.remote())
    monkeypatch.undo()
    assert rounds(spec, RESULTS_SCHEMA, DEAD_LETTER_SCHEMA)["results"]["after"]["files"] == 1
    rounds.stop()
