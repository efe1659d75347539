"""A Schema Registry for tests: the two calls of Confluent's REST API that Tidegate and
librdkafka-era serializers use, served over real HTTP on a free port.

    GET  /schemas/ids/{id}                 -> {"schema": "<json text>"}            (404: unknown id)
    POST /subjects/{subject}/versions      {"schema": "<json text>"} -> {"id": n}  (same schema: same id)

(No Java registry can run on the test machine; this is the wire contract, not a mock of our code.)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from fastavro.schema import parse_schema, to_parsing_canonical_form


class SchemaRegistryServer:
    def __init__(self):
        self.by_id: dict[int, str] = {}
        self.subjects: dict[str, tuple[int, dict]] = {}
        self.lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and parts[2].isdigit():
                    text = registry.by_id.get(int(parts[2]))
                    if text is not None:
                        return self._reply(200, {"schema": text})
                return self._reply(404, {"error_code": 40403, "message": "Schema not found"})

            def do_POST(self):
                parts = self.path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions":
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    schema_id = registry.register(unquote(parts[1]), json.loads(body["schema"]))
                    return self._reply(200, {"id": schema_id})
                return self._reply(404, {"error_code": 404, "message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def register(self, subject: str, schema, schema_id: int | None = None) -> int:
        canon = to_parsing_canonical_form(parse_schema(schema))
        with self.lock:
            for sid, text in self.by_id.items():
                if to_parsing_canonical_form(parse_schema(json.loads(text))) == canon:
                    self.subjects[subject] = (sid, schema)
                    return sid
            sid = schema_id or (max(self.by_id, default=100) + 1)
            self.by_id[sid] = json.dumps(schema)
            self.subjects[subject] = (sid, schema)
            return sid

    def start(self) -> SchemaRegistryServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
