"""Send events to a Tidegate job: checked against the job's contract, in the job's format.

    from tidegate.producer import EventProducer

    with EventProducer.from_spec("jobs/triage.yaml") as producer:
        producer.send({"ticket_id": "T-1", "text": "My card was charged twice"})
        deliveries = producer.send_many(frame)   # list of dicts, a polars or pandas DataFrame
    # deliveries: [Delivery(id="T-1", topic="requests", partition=2, offset=41), ...]

Every event is checked against the event contract (compute/event_contract.py: what the spec's
template and fields need, plus source.event_schema) and serialised before anything is sent: a bad
event raises EventContractError naming the field path (never the value) and, in send_many, its
position; nothing of that call is sent. Messages are keyed by the event id (one id, one
partition: its events stay in order), sent idempotently with acks=all, batched by the client,
and each call returns where its events landed once the broker has them.

Formats follow the job's source.kafka: JSON; plain Avro with source.kafka.avro_schema; or the
Confluent wire format with source.kafka.schema_registry (the contract's Avro schema is registered
under the subject '<topic>-value', or looked up in a local {id: schema} file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compute.event_contract import EventContract
from compute.event_formats import AvroEncoder, encode_json, load_avro_schema
from compute.prompts import BadEvent, event_id_of
from connectors.schema_registry import open_registry
from schemas.errors import EventContractError, ProduceError, SpecError
from schemas.spec import JobSpec, KafkaSecuritySpec, load_spec

__all__ = ["Delivery", "EventProducer", "EventContractError", "ProduceError"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_SIZE = 1_048_576  # kafka-python's max_request_size
REQUEST_ROOM = 64 * 2**10  # a request's framing and the event's key, beyond the event itself


@dataclass(frozen=True)
class Delivery:
    id: str
    topic: str
    partition: int
    offset: int


class EventProducer:
    def __init__(
        self,
        bootstrap_servers: str | list[str],
        topic: str,
        id_field: str,
        *,
        contract: EventContract | None = None,
        json_schema: dict[str, Any] | None = None,
        format: str = "json",
        avro_schema: dict[str, Any] | str | None = None,
        schema_registry: str | None = None,
        security: KafkaSecuritySpec | None = None,
        producer_config: Mapping[str, Any] | None = None,
        max_message_bytes: int | None = None,
    ):
        """A producer for `topic`. The contract: `contract` (from a spec) or `json_schema` (a JSON
        Schema of the events; None and no contract: only the id is required). format avro needs
        avro_schema (plain Avro), schema_registry (Confluent framing), or both (the schema to
        register; default: the contract's Avro form). max_message_bytes: the job's
        source.kafka.max_message_bytes (from_spec), a larger event would only be dead-lettered."""
        from kafka import KafkaProducer

        self.topic = topic
        self.id_field = id_field
        self.bootstrap_servers = bootstrap_servers
        self.max_message_bytes = max_message_bytes
        if contract is None:
            # No contract: the id only, but a usable one (a null, boolean or object id was sent
            # before stop 44, keyed b"None", and dead-lettered by the job).
            schema = json_schema or {"type": "object", "required": [id_field],
                                     "properties": {id_field: {"type": ["string", "integer"]}}}  # fmt: skip
            contract = EventContract.from_json_schema(schema, name=topic)
        self.contract = contract
        self.encode = self._encoder(format, avro_schema, schema_registry)
        config = dict(producer_config or {})
        if max_message_bytes is not None and max_message_bytes > DEFAULT_MAX_REQUEST_SIZE:
            # Room for the largest event the job takes: kafka-python's default (1 MiB) refused
            # events a job with a larger source.kafka.max_message_bytes reads. (At or below 1 MiB
            # the default stays: a topic's own default limit is about as large.)
            config.setdefault("max_request_size", max_message_bytes + REQUEST_ROOM)
        config.update((security or KafkaSecuritySpec()).client_config())
        config.update(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,  # a retried send is not written twice
            max_in_flight_requests_per_connection=5,
            linger_ms=config.get("linger_ms", 10),
        )
        self._config = config
        self._lock = threading.Lock()  # a new client in place of one failed for good (_renew_if_failed)
        try:
            self._producer = KafkaProducer(**config)
        except Exception as e:  # NoBrokersAvailable, bad settings: one named error
            raise ProduceError(f"cannot connect to Kafka at {bootstrap_servers}: {type(e).__name__}") from None

    def _renew_if_failed(self) -> None:
        """kafka-python (3.0) puts an idempotent producer in a fatal state, for good, on any error
        the broker answers a batch with that it cannot retry (a message over the topic's
        max.message.bytes, a denied ACL, a policy): every later send then fails with that error.
        A shared producer (the online /events route) refused every event until its replica was
        replaced. Now such a client is closed and a new one takes its place, for the next send;
        the events of the batch that hit it were reported as not taken."""
        from kafka import KafkaProducer

        with self._lock:
            failed = self._producer
            tm = getattr(failed, "_transaction_manager", None)
            if tm is None or not tm.has_fatal_error():
                return
            log.warning("Kafka producer for topic %r failed for good (%s); a new one takes its place", self.topic,
                        type(tm.last_error).__name__)  # fmt: skip
            try:
                self._producer = KafkaProducer(**self._config)
            except Exception as e:  # noqa: BLE001 - the broker is away: the next send tries again
                log.warning("a new Kafka producer could not be made (%s)", type(e).__name__)
                return
        threading.Thread(target=_close_failed, args=(failed,), name="tidegate-producer-close", daemon=True).start()

    @classmethod
    def from_spec(cls, spec: JobSpec | str | Path, bootstrap_servers: str | list[str] | None = None,
                  topic: str | None = None, **kw) -> EventProducer:  # fmt: skip
        """A producer for the job's source topic, contract and format (a Kafka source's spec)."""
        if not isinstance(spec, JobSpec):
            spec = load_spec(spec)
        kafka = spec.source.kafka
        if kafka is None:
            raise SpecError(f"{spec.name}: the source is {spec.source.kind}, not Kafka: there is no topic to produce to")
        brokers = bootstrap_servers or kafka.bootstrap_servers
        if not brokers:
            raise SpecError(f"{spec.name}: source.kafka.bootstrap_servers is not set: give bootstrap_servers")
        kw.setdefault("security", kafka.security)
        kw.setdefault("max_message_bytes", kafka.max_message_bytes)
        return cls(brokers, topic or kafka.topic, spec.prompt.id_field, contract=EventContract(spec),
                   format=kafka.format, avro_schema=kafka.avro_schema, schema_registry=kafka.schema_registry, **kw)  # fmt: skip

    def _encoder(self, fmt: str, avro_schema, schema_registry):
        if fmt == "json":
            if avro_schema is not None or schema_registry is not None:
                raise SpecError("avro_schema and schema_registry are for format avro")
            return encode_json
        if fmt != "avro":
            raise SpecError(f"format {fmt!r}: use json or avro")
        if schema_registry is None:
            if avro_schema is None:
                raise SpecError("format avro needs avro_schema or schema_registry")
            return AvroEncoder(load_avro_schema(avro_schema, "avro_schema"))
        schema = avro_schema if isinstance(avro_schema, dict) else (
            load_avro_schema(avro_schema, "avro_schema") if avro_schema else self.contract.avro_schema())  # fmt: skip
        schema_id = open_registry(schema_registry).id_of(f"{self.topic}-value", _plain(schema))
        return AvroEncoder(schema, schema_id)

    def _prepare(self, event: Any, record: int | None) -> tuple[bytes, bytes, str]:
        if not isinstance(event, Mapping):
            raise EventContractError(f"an event is a mapping of fields, not {type(event).__name__}", record)
        event = dict(event)
        msgs = self.contract.violations(event)
        if msgs:
            raise EventContractError("; ".join(msgs), record)
        try:  # the job's own rule (a json_schema or event_schema may allow ids the job dead-letters)
            event_id = event_id_of(event, self.id_field)
        except BadEvent as e:
            raise EventContractError(f"{self.id_field}: {e}", record) from None
        sent, encode = event, self.encode
        if isinstance(self.encode, AvroEncoder):
            # A number sent as text where the Avro schema takes text only: the job checks the event
            # it decodes, so the contract must hold for that one too (a schema typing as text a
            # field the contract wants as a number: the job would dead-letter it).
            sent, encode = self.encode.as_sent(event), self.encode.write
            if sent != event and (msgs := self.contract.violations(sent)):
                raise EventContractError("; ".join(msgs) + " (as the Avro schema sends it: as text)", record)
        try:
            value = encode(sent)
        except EventContractError as e:
            raise EventContractError(str(e), record) from None
        except (TypeError, ValueError) as e:
            raise EventContractError(f"cannot be serialised: {type(e).__name__}", record) from None
        return event_id.encode("utf-8"), value, event_id

    def send(self, event: Mapping[str, Any]) -> Delivery:
        """Check, serialise and send one event; returns where it landed (waits for the broker)."""
        prepared = self._prepare(event, None)
        self._check_size(None, *prepared[:2])  # (before stop 47 send() sent one the job dead-letters)
        return self._send([prepared])[0]

    def send_many(self, events: Iterable[Mapping[str, Any]] | Any) -> list[Delivery]:
        """Check and serialise every event first (a bad one raises naming its position and field:
        nothing is sent), then send them all and wait for the broker. Accepts an iterable of
        mappings or a polars / pandas DataFrame."""
        prepared = [self._prepare(e, i) for i, e in enumerate(_rows(events))]
        for i, (key, value, _) in enumerate(prepared):  # all or nothing: an event too large is refused first
            self._check_size(i, key, value)
        return self._send(prepared)

    # kafka-python's estimate of a record's framing is below this (a v2 record: varints, no headers)
    RECORD_OVERHEAD = 128

    def _check_size(self, i: int | None, key: bytes, value: bytes) -> None:
        """EventContractError (nothing sent) for an event kafka-python would refuse (over its
        max_request_size) or the job would dead-letter (over its max_message_bytes): before stop
        44 send_many had sent the events before it by the time the client refused it, and
        send_each (/events) accepted one the job then dead-lettered."""
        limit = self._producer.config["max_request_size"]
        if len(key) + len(value) + self.RECORD_OVERHEAD > limit:
            what = f"the producer's max_request_size ({limit} bytes)"
        elif self.max_message_bytes is not None and len(value) > self.max_message_bytes:
            what = f"the job's source.kafka.max_message_bytes ({self.max_message_bytes})"
        else:
            return
        raise EventContractError(f"{len(value)} bytes encoded, over {what}", i)

    def send_each(self, events: Iterable[Mapping[str, Any]]) -> list[Delivery | EventContractError | ProduceError]:
        """Check every event on its own: the good ones are sent (one flush), each bad one comes back
        (or too large: _check_size) in its place as its EventContractError (`.record` = its
        position), and each one the broker did not take as its ProduceError, instead of raising."""
        out: list[Delivery | EventContractError] = []
        good: list[tuple[int, tuple[bytes, bytes, str]]] = []
        for i, event in enumerate(events):
            try:
                prepared = self._prepare(event, i)
                self._check_size(i, *prepared[:2])
                good.append((i, prepared))
                out.append(None)  # type: ignore[arg-type]
            except EventContractError as e:
                out.append(e)
        for (i, _), delivery in zip(good, self._send_each([p for _, p in good], [i for i, _ in good]) if good else []):
            out[i] = delivery
        return out

    def _send(self, prepared: list[tuple[bytes, bytes, str]]) -> list[Delivery]:
        """All or an error: the first event the broker did not take raises its ProduceError."""
        out = self._send_each(prepared)
        failed = [(i, o) for i, o in enumerate(out) if isinstance(o, ProduceError)]
        if failed:
            i, first = failed[0]
            delivered = len(out) - len(failed)
            raise ProduceError(f"{first}; {delivered} of the call's {len(out)} event(s) were delivered",
                               record=i, delivered=delivered)  # fmt: skip
        return out

    def _send_each(self, prepared: list[tuple[bytes, bytes, str]],
                   numbers: list[int] | None = None) -> list[Delivery | ProduceError]:  # fmt: skip
        """Each event's own outcome: where it landed, or why the broker (or the client, before
        sending: too large, no metadata in time) did not take it. One event's failure is its own.
        numbers: each event's number in the caller's list (default: its place here)."""
        from kafka.errors import KafkaError, KafkaTimeoutError

        def failed(i: int, e: Exception) -> ProduceError:
            n = numbers[i] if numbers is not None else i
            return ProduceError(f"topic {self.topic!r}: the broker did not take event {n}: {type(e).__name__}")

        self._renew_if_failed()  # a client a refusal left failed for good: not used again
        producer = self._producer
        sent: list[Any] = []
        no_metadata = None
        for i, (key, value, _) in enumerate(prepared):
            if no_metadata is not None:  # each send would wait max_block_ms again (60 s an event)
                sent.append(failed(i, no_metadata))
                continue
            try:
                sent.append(producer.send(self.topic, key=key, value=value))
            except KafkaTimeoutError as e:  # no metadata for the topic within max_block_ms
                no_metadata = e
                sent.append(failed(i, e))
            except KafkaError as e:  # raised by send() itself: over max_request_size
                sent.append(failed(i, e))
        producer.flush()
        out: list[Delivery | ProduceError] = []
        for i, ((_, _, eid), fut) in enumerate(zip(prepared, sent)):
            if isinstance(fut, ProduceError):
                out.append(fut)
                continue
            try:
                md = fut.get(timeout=60)
            except KafkaError as e:
                out.append(failed(i, e))
                continue
            out.append(Delivery(eid, md.topic, md.partition, md.offset))
        self._renew_if_failed()
        return out

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_failed(producer: Any) -> None:
    """Close a client left failed for good, off the caller's thread. kafka-python's close() first
    flushes, and raises if records are still queued (a thread's send to it just before it was
    replaced): then its sender thread is stopped here, or it would run until the process ends."""
    try:
        producer.close(timeout=5)
    except Exception as e:  # noqa: BLE001 - nothing of a failed client is needed
        log.debug("closing a failed Kafka producer raised %s; stopping its sender", type(e).__name__)
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()


def _rows(events: Any) -> Iterable[Any]:
    """Rows of a polars or pandas DataFrame as dicts of plain values; anything else as it is."""
    module = type(events).__module__
    if module.startswith("polars"):
        return events.to_dicts()
    if module.startswith("pandas"):
        import json

        # pandas' own JSON writer turns NaN into null and timestamps into ISO text (numpy scalars
        # are not JSON): the rows a JSON consumer would see.
        return json.loads(events.to_json(orient="records", date_format="iso"))
    return events


def _plain(schema: Any) -> Any:
    """A schema as written (fastavro's parsed form carries private keys a registry should not see)."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if not str(k).startswith("__")}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema
