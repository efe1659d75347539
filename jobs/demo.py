"""`tidegate demo`: the whole pipeline on embedded defaults, no configuration.

Starts the embedded broker, produces sample support-ticket events (and a handful of malformed
ones, one of each kind the job must dead-letter), runs examples/demo.yaml until drained, then
shows how to read the tables with polars.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from rich.console import Console

from schemas.spec import load_spec

EXAMPLE_SPEC = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
TINY_MODEL_DIR = Path(".cache/tiny-model")

_PROBLEMS = ["late delivery", "double charge", "broken item", "password reset", "missing invoice", "wrong address"]


def sample_events(n: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        event = {
            "ticket_id": f"T{i:06d}",
            "customer": f"customer-{rng.randint(1, 50)}",
            "text": f"My order {rng.randint(1000, 9999)} has a {rng.choice(_PROBLEMS)}, please help.",
        }
        out.append((event["ticket_id"].encode(), json.dumps(event).encode()))
    return out


def malformed_events(max_message_bytes: int) -> list[tuple[bytes | None, bytes]]:
    """One of each kind of bad input the job must dead-letter (and keep running)."""
    return [
        (b"bad-json", b'{"ticket_id": "B1", "text": '),
        (b"bad-utf8", b'{"ticket_id": "B2", "text": "\xff\xfe"}'),
        (b"not-object", b'["ticket_id", "B3"]'),
        (b"no-id", json.dumps({"customer": "c", "text": "no id here"}).encode()),
        (b"empty-id", json.dumps({"ticket_id": "  ", "customer": "c", "text": "blank id"}).encode()),
        (b"no-var", json.dumps({"ticket_id": "B6", "text": "customer field missing"}).encode()),
        (b"too-long", json.dumps({"ticket_id": "B7", "customer": "c", "text": "order " * 2000}).encode()),
        (b"oversized", json.dumps({"ticket_id": "B8", "customer": "c", "text": "x" * (max_message_bytes + 1)}).encode()),
    ]


def clear_demo_tables(spec) -> None:
    """The embedded broker starts empty: so must the demo's tables. Only those: `--lake lake` once
    removed every other job's tables there too (before stop 44 the whole folder went)."""
    from connectors.runs import default_runs_uri

    for table in (spec.sink.results, spec.sink.dead_letter, default_runs_uri(spec.sink.results)):
        if Path(table).exists():
            shutil.rmtree(table)


def run_demo(events: int = 300, lake: Path = Path("lake/demo")) -> int:
    from connectors.broker import EmbeddedBroker
    from connectors.kafka import create_topic, produce
    from jobs.run import configure_logging, run_job

    configure_logging("WARNING")
    console = Console()
    if not (TINY_MODEL_DIR / "config.json").exists():
        from jobs.tiny_model import build_tiny_model

        console.print(f"building the tiny demo model in {TINY_MODEL_DIR} (offline, ~10 s)")
        build_tiny_model(TINY_MODEL_DIR)
    spec = load_spec(EXAMPLE_SPEC)
    spec.sink.results = str(lake / "results")
    spec.sink.dead_letter = str(lake / "dead_letter")
    spec.model.path = str(TINY_MODEL_DIR)
    clear_demo_tables(spec)

    with EmbeddedBroker() as broker:
        topic = spec.source.kafka.topic
        create_topic(broker.bootstrap_servers, topic, partitions=4)
        records = sample_events(events)
        bad = malformed_events(spec.source.kafka.max_message_bytes)
        for i, rec in enumerate(bad):  # spread the bad ones through the stream
            records.insert((i + 1) * len(records) // (len(bad) + 1), rec)
        produce(broker.bootstrap_servers, topic, records)
        console.print(f"produced {len(records)} events ({len(bad)} malformed) to {topic} on {broker.bootstrap_servers}")
        spec.source.kafka.bootstrap_servers = [broker.bootstrap_servers]
        console.print("running the demo job until the topic is drained (Ray start and model load take ~20 s)...")
        run_job(spec, until_drained=True, console=console)

    import polars as pl

    results = pl.read_delta(spec.sink.results)
    dead = pl.read_delta(spec.sink.dead_letter)
    console.print("\n[bold]Read the output in a notebook:[/]")
    console.print(
        "    import polars as pl\n"
        f"    results = pl.read_delta({spec.sink.results!r})\n"
        f"    dead    = pl.read_delta({spec.sink.dead_letter!r})\n"
    )
    # The tables fit the terminal (rich knows its width; 80 when it cannot tell).
    width = max(60, console.width)
    with pl.Config(tbl_cols=6, fmt_str_lengths=max(20, width // 4), tbl_width_chars=width):
        console.print(results.select("id", "status", "output_json", "attempts", "latency_ms").sort("id").head(5))
        console.print(results.group_by("status").len().sort("status"))
        console.print(dead.select("id", "stage", "error_class", "error").sort("error_class"))
    return 0
