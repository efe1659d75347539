"""The `tidegate` command line.

    tidegate run SPEC.yaml [--until-drained] [--address ADDR]
    tidegate demo [--events N]
    tidegate broker [--port PORT]
    tidegate produce --bootstrap HOST:PORT --topic T FILE.jsonl
    tidegate model make-tiny DIR [--seed N]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tidegate: event-driven batch LLM inference.")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(model_app, name="model")


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    until_drained: Annotated[bool, typer.Option("--until-drained", help="Stop once every partition is consumed and committed.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")] = None,
) -> None:
    """Consume a spec's source and write results to Delta, exactly once."""
    from jobs.run import main

    raise typer.Exit(main(str(spec), until_drained, address))


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Valid request events to produce.")] = 300,
    lake: Annotated[Path, typer.Option(help="Folder for the demo's tables (emptied first).")] = Path("lake/demo"),
) -> None:
    """Start a broker, produce sample events, run the demo job until drained, show the output."""
    from jobs.demo import run_demo

    raise typer.Exit(run_demo(events=events, lake=lake))


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 0,
) -> None:
    """Run the embedded Kafka-protocol broker (tansu, in-memory) in the foreground."""
    from connectors.broker import EmbeddedBroker

    b = EmbeddedBroker(port=port or None).start()
    typer.echo(f"bootstrap_servers: {b.bootstrap_servers}  (pid {b.process.pid}; Ctrl-C stops it)")
    try:
        while b.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one event per line ('-' for stdin).")],
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers.")],
    topic: Annotated[str, typer.Option(help="Topic to send to.")],
    key_field: Annotated[Optional[str], typer.Option(help="Event field to use as the message key.")] = None,
    partitions: Annotated[int, typer.Option(help="Partitions if the topic must be created.")] = 4,
) -> None:
    """Send events from a JSON Lines file (each line as is, no re-encoding)."""
    import json

    from connectors.kafka import create_topic, produce as send

    stream = sys.stdin.buffer if str(file) == "-" else open(file, "rb")

    def records():
        for line in stream:
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            key = None
            if key_field:
                try:
                    key = str(json.loads(line).get(key_field, "")).encode() or None
                except (ValueError, AttributeError):
                    key = None
            yield key, line

    create_topic(bootstrap, topic, partitions)
    n = send(bootstrap, topic, records())
    typer.echo(f"sent {n} event(s) to {topic}")


@model_app.command("make-tiny")
def make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the model.")],
    seed: Annotated[int, typer.Option(help="Seed for the weights and the tokenizer corpus.")] = 0,
) -> None:
    """Build a tiny random Llama model with tokenizer and chat template, offline."""
    from jobs.tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed)
    typer.echo(f"tiny model written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
