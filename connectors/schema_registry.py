"""Schema ids of the Confluent wire format: a Schema Registry over HTTP, or a local {id: schema} file.

    open_registry("http://registry:8081")   the registry's REST API: GET /schemas/ids/{id},
                                            POST /subjects/{subject}/versions (register or look up)
    open_registry("schemas/ids.yaml")       a mapping id -> Avro schema (a mapping or its JSON text)

Both answer `schema(id)` with the Avro schema or None when the id is unknown (that message is a
dead letter, compute/event_formats.py). A registry that cannot be reached is an error after a few
tries (SourceError): the job stops and resumes from its committed positions; nothing is
dead-lettered because of an outage. Only Avro schemas are served (schemaType AVRO or absent).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import fastavro
import yaml
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import SourceError, SpecError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


def _canonical(schema: Any) -> str:
    return to_parsing_canonical_form(fastavro.parse_schema(schema))


def _as_schema(value: Any, where: str) -> dict[str, Any] | str | list:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise SpecError(f"{where}: not an Avro schema (JSON text or a mapping)") from None
    return value


class HttpSchemaRegistry:
    """A Confluent-compatible Schema Registry (also Redpanda's, Apicurio's ccompat API)."""

    def __init__(self, url: str, attempts: int = 4, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.attempts = attempts
        self.timeout_s = timeout_s

    def _call(self, path: str, body: dict | None = None) -> dict | None:
        """JSON of a 2xx answer, None for 404; retried with backoff on other failures."""
        data = json.dumps(body).encode() if body is not None else None
        wait, last = 0.5, ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(wait)
                wait *= 2
            req = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET",
                                         headers={"Accept": CONTENT_TYPE, "Content-Type": CONTENT_TYPE})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read() or b"{}")
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                last = f"HTTP {e.code}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # the request is wrong, not the registry busy
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = type(e).__name__
            log.warning("schema registry %s: %s failed (%s), try %d of %d", self.url, path.split("/")[1], last,
                        attempt + 1, self.attempts)  # fmt: skip
        raise SourceError(f"schema registry {self.url}: {path} failed: {last}")

    def schema(self, schema_id: int) -> dict[str, Any] | None:
        answer = self._call(f"/schemas/ids/{int(schema_id)}")
        if answer is None:
            return None
        if answer.get("schemaType", "AVRO") != "AVRO":
            return None  # a JSON Schema or Protobuf id: not an Avro message
        return _as_schema(answer.get("schema"), f"schema registry id {schema_id}")

    def id_of(self, subject: str, schema: dict[str, Any]) -> int:
        from urllib.parse import quote

        answer = self._call(f"/subjects/{quote(subject, safe='')}/versions", {"schema": json.dumps(schema)})
        if not answer or "id" not in answer:
            raise SourceError(f"schema registry {self.url}: registering under subject {subject!r} gave no id")
        return int(answer["id"])


class FileSchemaRegistry:
    """A local mapping id -> schema (YAML or JSON), for clusters without a registry and for tests."""

    def __init__(self, path: str):
        self.path = path
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise SpecError(f"schema registry file {path}: {e.strerror}") from None
        except yaml.YAMLError:
            raise SpecError(f"schema registry file {path}: not YAML or JSON") from None
        if not isinstance(data, dict):
            raise SpecError(f"schema registry file {path}: expected a mapping of schema id -> schema")
        self.schemas: dict[int, Any] = {}
        for key, value in data.items():
            try:
                sid = int(key)
            except (TypeError, ValueError):
                raise SpecError(f"schema registry file {path}: key {key!r} is not a schema id (an integer)") from None
            self.schemas[sid] = _as_schema(value, f"schema registry file {path}, id {sid}")

    def schema(self, schema_id: int) -> dict[str, Any] | None:
        return self.schemas.get(schema_id)

    def id_of(self, subject: str, schema: dict[str, Any]) -> int:
        want = _canonical(schema)
        for sid, known in self.schemas.items():
            try:
                if _canonical(known) == want:
                    return sid
            except Exception:  # noqa: BLE001 - an unusable entry is not this schema
                continue
        raise SpecError(f"schema registry file {self.path}: no id holds this schema (subject {subject!r}); "
                        "add it under a new id")  # fmt: skip


def open_registry(ref: str) -> HttpSchemaRegistry | FileSchemaRegistry:
    if ref.startswith(("http://", "https://")):
        return HttpSchemaRegistry(ref)
    return FileSchemaRegistry(ref)
