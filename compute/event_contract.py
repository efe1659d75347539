"""The event contract: which events a job accepts, as a JSON Schema (and its Avro form).

    in : the job spec (prompt template, id / context / budget fields, encryption's tenant and input
         fields, source.event_schema)
    out: EventContract.json_schema (draft 2020-12 object schema), .avro_schema(), .check(event)

What the spec implies is inferred first: the id field (string or integer), every template
variable (an array where the template loops over it or takes `| length`, an object where it
reads `.attr` / `["key"]`, else a scalar rendered as text), the context field, the budget field,
the tenant and encryption input fields. `source.event_schema` (inline, a file, or a pydantic
model) then overrides field by field; its `required` list adds to the inferred one.

`check(event)` raises BadEvent("decode", "schema_violation") naming the failing field paths and
constraints, never a value (a key the schema does not declare is shown as <key>: it is data).
Pure logic: no Ray, no I/O except reading an event_schema file named in the spec.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compute.rules import _schema_names, _short, import_path, json_schema_validator, schema_errors, schema_path
from schemas.errors import EventContractError, SpecError
from schemas.spec import JobSpec

SCALAR = {"type": ["string", "number", "boolean"]}  # a template variable used as text
# Filters that take a sequence: `{{ x | length }}` says x is an array.
_SEQUENCE_FILTERS = {"length", "count", "join", "first", "last", "sort", "unique", "map", "select", "reject",
                     "selectattr", "rejectattr", "batch", "slice", "sum", "list", "min", "max"}  # fmt: skip
_AVRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def template_variable_schemas(template: str) -> dict[str, dict[str, Any]]:
    """JSON Schema of each variable a Jinja2 template reads from the event, from how it uses it."""
    ast = ImmutableSandboxedEnvironment().parse(template)
    names = meta.find_undeclared_variables(ast)
    uses: dict[str, set[str]] = {n: set() for n in names}
    attrs: dict[str, set[str]] = {n: set() for n in names}

    def name_of(node: nodes.Node) -> str | None:
        return node.name if isinstance(node, nodes.Name) and node.name in uses else None

    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if (n := name_of(it)) is not None:
            uses[n].add("array")
        elif isinstance(it, nodes.Call) and isinstance(it.node, nodes.Getattr) and it.node.attr in ("items", "keys", "values"):
            if (n := name_of(it.node.node)) is not None:
                uses[n].add("object")
    for f in ast.find_all(nodes.Filter):
        if f.name in _SEQUENCE_FILTERS and (n := name_of(f.node)) is not None:
            uses[n].add("array")
    for g in ast.find_all(nodes.Getattr):
        if (n := name_of(g.node)) is not None and g.attr not in ("items", "keys", "values", "get"):
            uses[n].add("object")
            attrs[n].add(g.attr)
    for g in ast.find_all(nodes.Getitem):
        if (n := name_of(g.node)) is not None and isinstance(g.arg, nodes.Const):
            if isinstance(g.arg.value, int):
                uses[n].add("array")
            elif isinstance(g.arg.value, str):
                uses[n].add("object")
                attrs[n].add(g.arg.value)
    out: dict[str, dict[str, Any]] = {}
    for n in sorted(names):
        kinds = uses[n]
        if kinds == {"array"}:
            out[n] = {"type": "array", "description": "template variable (iterated or measured)"}
        elif kinds == {"object"}:
            fields = sorted(attrs[n])
            out[n] = {"type": "object", "description": "template variable (fields read)",
                      "properties": {a: dict(SCALAR) for a in fields}, "required": fields}  # fmt: skip
        else:
            out[n] = {**SCALAR, "description": "template variable (rendered as text)"}
    return out


def inferred_schema(spec: JobSpec) -> dict[str, Any]:
    """The contract the spec implies, before source.event_schema."""
    p = spec.prompt
    props: dict[str, dict[str, Any]] = {p.id_field: {"type": ["string", "integer"], "description": "prompt.id_field"}}
    required = [p.id_field]
    for name, schema in template_variable_schemas(p.template).items():
        if name not in props:
            props[name] = schema
            required.append(name)
    if p.context_field:
        props[p.context_field] = {
            "description": "prompt.context_field: a document or a list of documents",
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [
                {"type": "string"},
                {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}]}}],
        }  # fmt: skip
        if p.context_field not in required:
            required.append(p.context_field)
    if p.max_tokens_field:
        props[p.max_tokens_field] = {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31 - 1,
                                     "description": "prompt.max_tokens_field: this row's completion budget"}  # fmt: skip
    enc = spec.encryption
    if enc.enabled:
        props.setdefault(enc.tenant_field, {"type": "string", "description": "encryption.tenant_field"})
        if enc.tenant is None and enc.tenant_field not in required:
            required.append(enc.tenant_field)
        for f in enc.input_fields:
            props.setdefault(f.name, {"description": "encryption.input_fields: stored encrypted with the result"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{spec.name} event",
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": True,
    }


def load_event_schema(ref: str | dict[str, Any], allowed_modules: list[str] | None = None) -> dict[str, Any]:
    """source.event_schema as a JSON Schema mapping: inline, from a .json/.yaml file, or a pydantic
    model's (imported under the trust policy, schemas/trusted_code.py)."""
    if isinstance(ref, dict):
        return ref
    if ":" in ref and not ref.endswith((".json", ".yaml", ".yml")):
        model = import_path(ref, "source.event_schema", allowed_modules)
        if not (isinstance(model, type) and hasattr(model, "model_json_schema")):
            raise SpecError(f"source.event_schema: {ref} is not a pydantic model class")
        return model.model_json_schema()
    try:
        text = Path(ref).read_text()
    except OSError as e:
        raise SpecError(f"source.event_schema: cannot read {ref}: {e.strerror}") from None
    try:
        data = json.loads(text) if ref.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SpecError(f"source.event_schema: {ref} is not valid {'JSON' if ref.endswith('.json') else 'YAML'}: "
                        f"{type(e).__name__}") from None  # fmt: skip
    if not isinstance(data, dict) or not data:
        raise SpecError(f"source.event_schema: {ref} does not hold a JSON Schema mapping")
    return data


def merge(inferred: dict[str, Any], declared: dict[str, Any]) -> dict[str, Any]:
    """declared's fields replace inferred ones; its `required` adds to the inferred list; its other
    keywords ($defs, additionalProperties, title, ...) win."""
    if declared.get("type", "object") != "object":
        raise SpecError("source.event_schema: must describe an object (type: object)")
    out = {**inferred, **{k: v for k, v in declared.items() if k not in ("properties", "required")}}
    out["properties"] = {**inferred.get("properties", {}), **declared.get("properties", {})}
    out["required"] = list(dict.fromkeys([*inferred.get("required", []), *declared.get("required", [])]))
    out["type"] = "object"
    return out


class EventContract:
    """The job's event contract; `enforced` when the spec declares source.event_schema."""

    def __init__(self, spec: JobSpec, allowed_modules: list[str] | None = None):
        declared = spec.source.event_schema
        schema = inferred_schema(spec)
        if declared is not None:
            schema = merge(schema, load_event_schema(declared, allowed_modules or spec.allowed_modules))
        self._use(spec.name, schema, enforced=declared is not None)

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any], name: str) -> EventContract:
        """A contract from a JSON Schema alone (a producer without a spec)."""
        self = cls.__new__(cls)
        self._use(name, schema, enforced=True)
        return self

    def _use(self, name: str, schema: dict[str, Any], enforced: bool) -> None:
        self.name = name
        self.enforced = enforced
        self.json_schema = schema
        self._validator = json_schema_validator(schema, "source.event_schema")
        self._names = _schema_names(schema)

    def path(self, parts) -> str:
        return schema_path(parts, self._names)

    def violations(self, event: Any) -> list[str]:
        """What breaks the contract, as field paths and constraints (never values); [] if none."""
        msgs: list[str] = []
        for e in schema_errors(self._validator, event):
            if e.validator == "required" and isinstance(e.instance, dict):
                missing = [r for r in e.validator_value if r not in e.instance]
                where = self.path(e.path)
                msgs.append(f"{where + '.' if e.path else ''}{', '.join(missing)}: required field missing")
            elif e.validator in ("enum", "const"):
                msgs.append(f"{self.path(e.path)}: not one of the allowed values")
            else:
                msgs.append(f"{self.path(e.path)}: fails {e.validator!r} {_short(e.validator_value)}")
        return list(dict.fromkeys(msgs))[:5]  # one per missing-fields list (jsonschema reports each field)

    def check(self, event: Any) -> None:
        msgs = self.violations(event)
        if msgs:
            raise EventContractError("; ".join(msgs))

    def avro_schema(self) -> dict[str, Any]:
        """The contract as an Avro record schema (what `tidegate schema --format avro` prints and the
        producer registers when the spec names no writer schema)."""
        name = re.sub(r"[^A-Za-z0-9_]", "_", self.name)
        if not _AVRO_NAME.fullmatch(name):
            name = "_" + name
        return to_avro(self.json_schema, name, self.json_schema)


def to_avro(schema: dict[str, Any], name: str, root: dict[str, Any]) -> Any:
    """JSON Schema -> Avro: objects with properties become records (optional fields: a union with
    null, default null), other objects maps of strings; untyped values and text scalars strings."""
    schema = _deref(schema, root)
    if "anyOf" in schema or "oneOf" in schema:
        branches = [to_avro(s, f"{name}_{i}", root) for i, s in enumerate(schema.get("anyOf") or schema["oneOf"])]
        return _union(branches)
    types = schema.get("type")
    if isinstance(types, list):
        if set(types) <= {"string", "number", "integer", "boolean"} and "string" in types:
            return "string"  # a scalar rendered as text: carried as text
        return _union([to_avro({**schema, "type": t}, f"{name}_{t}", root) for t in types])
    if types == "string":
        return "string"
    if types == "integer":
        return "long"
    if types == "number":
        return "double"
    if types == "boolean":
        return "boolean"
    if types == "null":
        return "null"
    if types == "array":
        items = schema.get("items")
        return {"type": "array", "items": to_avro(items, f"{name}_item", root) if isinstance(items, dict) else "string"}
    if types == "object" and isinstance(schema.get("properties"), dict):
        required = set(schema.get("required", []))
        fields = []
        for field, sub in schema["properties"].items():
            if not _AVRO_NAME.fullmatch(field):
                raise SpecError(f"event field {field!r} is not a valid Avro field name (letters, digits, '_')")
            t = to_avro(sub if isinstance(sub, dict) else {}, f"{name}_{field}", root)
            if field in required:
                fields.append({"name": field, "type": t})
            else:
                fields.append({"name": field, "type": _union(["null", t]), "default": None})
        return {"type": "record", "name": name, "fields": fields}
    if types == "object":
        return {"type": "map", "values": "string"}
    return "string"  # untyped


def _union(branches: list[Any]) -> Any:
    flat: list[Any] = []
    for b in branches:
        for x in b if isinstance(b, list) else [b]:
            if x not in flat:
                flat.append(x)
    if "null" in flat:  # null first: the default of an optional field must match the first branch
        flat.remove("null")
        flat.insert(0, "null")
    return flat[0] if len(flat) == 1 else flat


def _deref(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema
