"""Chaos: replicas of one job over a durable broker, under a seeded schedule of random faults.

    python -m tests.chaos [--seed 7] [--events 100000] [--faults 24] [--replicas 2] [--out report.json]
    make chaos                      (the long form; tests/test_chaos.py runs a short one in `make test`)

The world: a tansu broker whose storage is an S3 bucket on a local S3 server (localbucket), so
topics, records and group offsets survive the broker; one topic of `--partitions` partitions
holding `--events` events, about 1 % of them poison (not JSON, each one distinct); `--replicas`
replicas of one job spec (`python -m tests.job_runner --instant-engine`: the engine is the instant
stand-in, so the faults, not the model, decide the pace), each with its own local Ray.

The faults, drawn with `random.Random(seed)` and printed before anything starts (rerun with the
same seed to replay them), each struck while events are still flowing:

    kill_driver        SIGKILL a replica's driver; a supervisor restarts it at once
    kill_replica       SIGKILL a replica; a new one joins a few seconds later
    kill_engine        SIGKILL a replica's engine actor (Ray restarts it, its batches run again)
    kill_stage_worker  SIGKILL a replica's stage worker (its calls are re-run)
    kill_writer        SIGKILL a replica's commit writer (the job re-reads its positions)
    restart_broker     SIGKILL the broker, bring it back on the same port 1-3 s later

Then the replicas finish (SIGTERM once every event is committed) and the report says: lost and
duplicated events (both must be 0), poison events dead-lettered once each, orphan processes (0),
each fault with its time, and rows/s. Exit code 0 only when all of that holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
FAULTS = ("kill_driver", "kill_replica", "kill_engine", "kill_stage_worker", "kill_writer", "restart_broker")
# Process titles of the actors (Ray names an actor's process after its class). The replicas run the
# instant engine, so the engine actor is `ray::InstantEngine`, not `ray::EngineWorker`.
ACTOR_OF = {"kill_engine": "ray::InstantEngine", "kill_stage_worker": "ray::StageWorker", "kill_writer": "ray::CommitWriter"}


@dataclass
class Report:
    seed: int
    events: int
    poison: int
    partitions: int
    replicas: int
    schedule: list[str]
    faults: list[dict] = field(default_factory=list)  # {kind, at_s, target}
    lost: int = -1
    duplicated: int = -1
    poison_dead_lettered_once: bool = False
    unexpected_dead_letters: int = -1
    orphans: list[int] = field(default_factory=list)
    orphan_names: list[str] = field(default_factory=list)  # "PID name (ppid P, born Ns after replica R started)"
    replica_runs: int = 0
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    ok: bool = False


def schedule(rng: random.Random, n: int) -> list[str]:
    """n faults: every kind at least once when n allows, the rest drawn at random, shuffled."""
    kinds = list(FAULTS)[:n] + [rng.choice(FAULTS) for _ in range(max(0, n - len(FAULTS)))]
    rng.shuffle(kinds)
    return kinds


def make_events(rng: random.Random, n: int) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    records, poison = [], set()
    for i in range(n):
        if rng.random() < 0.01:
            value = f'{{"id": "p{i:07d}", "broken'.encode()  # not JSON: a dead letter (decode)
            poison.add(value)
        else:
            value = json.dumps({"id": f"e{i:07d}", "user": f"user-{i % 17}", "question": f"status of order {i}?"}).encode()
        records.append((f"k{i}".encode(), value))
    return records, poison


class Replica:
    """One `python -m tests.job_runner` process (a replica), started and killed by PID."""

    def __init__(self, spec_path: Path, workdir: Path, index: int):
        import subprocess

        self.ray_tmp = Path(tempfile.mkdtemp(prefix="tgch", dir="/tmp"))
        self.log_path = workdir / f"replica-{index}.log"
        env = dict(os.environ, TIDEGATE_RAY_TEMP_DIR=str(self.ray_tmp), TIDEGATE_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "tests.job_runner", str(spec_path), "--instant-engine"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.family: set[int] = {self.proc.pid}
        self.started = time.time()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.family |= {p.pid for p in kids}
        return kids

    def actor(self, prefix: str) -> psutil.Process | None:
        for p in self.descendants():
            try:
                # comm is cut at 15 characters ("ray::InstantEng"); psutil restores the full name
                # only sometimes, so compare what both forms share.
                if p.name().startswith(prefix[:15]) and p.status() != psutil.STATUS_ZOMBIE:
                    return p
            except psutil.NoSuchProcess:
                pass
        return None

    def kill(self) -> None:
        self.descendants()
        self.killed = True
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def crashed(self) -> bool:
        """Exited on its own (replicas run until told to stop)."""
        return not getattr(self, "killed", False) and self.proc.poll() is not None


ORPHAN_GRACE_S = 10.0


def describe(pid: int, replicas: list[Replica]) -> str:
    """What a process is (a process name and its parent, never an argument: it could hold a value)."""
    owner = next((i for i, r in enumerate(replicas) if pid in r.family), None)
    try:
        p = psutil.Process(pid)
        born = f"{p.create_time() - replicas[owner].started:.1f}s" if owner is not None else "?"
        return f"{pid} {p.name()} (ppid {p.ppid()}, born {born} after replica {owner} started)"
    except psutil.Error:
        return f"{pid} (gone)"


def committed(results: str, dead: str) -> int:
    from tests.conftest import table_rows

    return table_rows(results) + table_rows(dead)


def run(seed: int, events: int, faults: int, partitions: int, replicas: int, workdir: Path,
        timeout_s: float = 1800.0, log=print) -> Report:  # fmt: skip
    from connectors.broker import EmbeddedBroker, free_port
    from connectors.kafka import create_topic, produce
    from connectors.broker import LocalObjectStore

    rng = random.Random(seed)
    kinds = schedule(rng, faults)
    records, poison = make_events(rng, events)
    report = Report(seed, events, len(poison), partitions, replicas, kinds)
    log(f"chaos seed {seed}: {events} events ({len(poison)} poison) on {partitions} partitions, {replicas} replicas")
    log(f"fault schedule: {', '.join(kinds)}")
    s3 = LocalObjectStore(workdir / "s3").start()
    s3.bucket("tansu")
    broker = EmbeddedBroker(port=free_port(), storage="s3://tansu/", env=s3.env(), log_path=workdir / "broker.log")
    broker.start()
    all_replicas: list[Replica] = []
    started = time.monotonic()
    try:
        topic = f"chaos-{uuid.uuid4().hex[:8]}"
        create_topic(broker.bootstrap_servers, topic, partitions)
        produce(broker.bootstrap_servers, topic, records)
        spec = {
            "name": f"chaos-{seed}",
            "source": {"kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": topic, "poll_timeout_ms": 100,
                                 "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "revoke_timeout_s": 5}},
            "prompt": {"template": "Answer for {{ user }}: {{ question }}", "id_field": "id"},
            "model": {"path": str(workdir / "no-model")},  # the instant engine reads no model
            "sampling": {"max_tokens": 8},
            "pool": {"batch_size": 256, "num_cpus": 0.25},
            "validation": [],
            "sink": {"results": str(workdir / "lake" / "results"), "dead_letter": str(workdir / "lake" / "dead_letter"),
                     "commit_interval_s": 0.5, "write_backoff_s": 0.2},
            "run": {"shutdown_timeout_s": 30},
        }  # fmt: skip
        (workdir / "no-model").mkdir(exist_ok=True)
        (workdir / "no-model" / "config.json").write_text("{}")
        spec_path = workdir / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        res_uri, dl_uri = spec["sink"]["results"], spec["sink"]["dead_letter"]

        def start() -> Replica:
            r = Replica(spec_path, workdir, len(all_replicas))
            all_replicas.append(r)
            return r

        def check_no_crash() -> None:
            for r in all_replicas:
                if r.crashed():
                    raise RuntimeError(f"replica pid {r.proc.pid} exited with code {r.proc.returncode}: see {r.log_path}")

        live = [start() for _ in range(replicas)]
        step = max(1, events // (faults + 2))
        for i, kind in enumerate(kinds):
            # Strike while events still flow: after the next slice of them is committed.
            target_rows = min(events - 1, (i + 1) * step)
            deadline = time.monotonic() + 300
            while committed(res_uri, dl_uri) < target_rows and time.monotonic() < deadline:
                check_no_crash()
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 1.5))
            live = [r for r in live if r.alive()] or [start()]
            at = round(time.monotonic() - started, 2)
            victim = rng.choice(live)
            target = ""
            if kind == "kill_driver":
                target = f"driver pid {victim.proc.pid}"
                victim.kill()
                live.remove(victim)
                live.append(start())
            elif kind == "kill_replica":
                target = f"replica pid {victim.proc.pid}"
                victim.kill()
                live.remove(victim)
                time.sleep(rng.uniform(2.0, 5.0))
                live.append(start())
            elif kind in ACTOR_OF:
                proc = None
                for _ in range(300):  # a replica may still be starting its actors: any live one will do
                    for r in [victim] + [r for r in live if r is not victim]:
                        proc = r.actor(ACTOR_OF[kind])
                        if proc is not None:
                            victim = r
                            break
                    if proc is not None:
                        break
                    time.sleep(0.2)
                if proc is not None:
                    target = f"{ACTOR_OF[kind]} pid {proc.pid} of driver {victim.proc.pid}"
                    proc.send_signal(signal.SIGKILL)
                else:
                    target = "no such actor running (skipped)"
            elif kind == "restart_broker":
                broker.kill()
                time.sleep(rng.uniform(1.0, 3.0))
                broker.start()
                target = f"broker {broker.bootstrap_servers}"
            report.faults.append({"kind": kind, "at_s": at, "target": target})
            log(f"  fault {i + 1}/{len(kinds)} at {at:7.2f}s: {kind} ({target})")

        deadline = time.monotonic() + timeout_s
        while committed(res_uri, dl_uri) < events and time.monotonic() < deadline:
            check_no_crash()
            time.sleep(0.5)
        report.elapsed_s = round(time.monotonic() - started, 2)
        for r in live:
            if r.alive():
                r.descendants()
                r.proc.send_signal(signal.SIGTERM)
        for r in live:
            try:
                r.proc.wait(timeout=120)
            except Exception:
                r.kill()
            r.killed = True  # stopped by us
    finally:
        for r in all_replicas:
            r.kill()
        broker.stop()
        s3.stop()

    import polars as pl

    from tests.conftest import living, table_rows

    res = pl.read_delta(res_uri) if table_rows(res_uri) else pl.DataFrame({"id": []})
    dead = pl.read_delta(dl_uri) if table_rows(dl_uri) else pl.DataFrame({"raw": [], "id": []})
    expected = {json.loads(v)["id"] for _, v in records if v not in poison}
    counts = Counter(res["id"].to_list())
    report.lost = len(expected - set(counts))
    report.duplicated = sum(c - 1 for c in counts.values() if c > 1)
    raw = Counter(bytes(v) for v in dead["raw"].to_list())
    report.poison_dead_lettered_once = all(raw.get(p) == 1 for p in poison)
    report.unexpected_dead_letters = sum(c for v, c in raw.items() if v not in poison)
    # A process still exiting (a worker that has yet to notice its raylet is gone, a reaper on its
    # last sweep) is not an orphan: an orphan outlives its replica. The grace is short on purpose:
    # a worker the reaper missed lives on for tens of seconds, and must still be caught here.
    family = {pid for r in all_replicas for pid in r.family}
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while living(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    report.orphans = living(family)
    report.orphan_names = [describe(pid, all_replicas) for pid in report.orphans]
    report.replica_runs = len(all_replicas)
    report.rows_per_s = round(events / report.elapsed_s, 1) if report.elapsed_s else 0.0
    report.ok = (report.lost == 0 and report.duplicated == 0 and report.poison_dead_lettered_once
                 and report.unexpected_dead_letters == 0 and not report.orphans)  # fmt: skip
    log(f"chaos seed {seed}: lost {report.lost}, duplicated {report.duplicated}, poison dead-lettered once: "
        f"{report.poison_dead_lettered_once}, unexpected dead letters {report.unexpected_dead_letters}, "
        f"orphans {len(report.orphans)} {report.orphan_names}, {report.elapsed_s}s, {report.replica_runs} replica runs")  # fmt: skip
    return report


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--faults", type=int, default=24)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    a = p.parse_args()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="tidegate-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = run(a.seed, a.events, a.faults, a.partitions, a.replicas, workdir)
    if a.out:
        a.out.write_text(json.dumps(asdict(report), indent=2))
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "faults"}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
