"""The job spec: the public contract of a Tidegate job, as a pydantic model.

A spec is YAML on disk. `load_spec(path)` validates it completely before any work starts; a bad
spec raises `SpecError` whose message lists every bad field by its dotted path and the reason.

    name: support-triage
    source:
      kafka: {bootstrap_servers: "broker:9092", topic: requests, group_id: triage}
    prompt: {template: "Summarise: {{ text }}", id_field: ticket_id}
    model: {path: /models/llama-3-8b-instruct}
    sampling: {max_tokens: 64, temperature: 0}
    pool: {actors: 2, batch_size: 64, num_cpus: 1, num_gpus: 1}
    sink: {results: s3://lake/triage/results, dead_letter: s3://lake/triage/dead_letter}
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, TypeAdapter, ValidationError, ValidationInfo, field_validator,
    model_serializer,
    model_validator,
)  # fmt: skip

from schemas.errors import SpecError
from schemas.encryption import EncryptionSpec
from schemas.records import PARTITION_COLUMNS
from schemas.validation import JsonSchemaRule, OutputSpec, RuleSpec, default_rules


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# kafka-python settings that carry secrets: never written in a spec, always read from the environment.
SECRET_KAFKA_KEYS = frozenset({"sasl_plain_password", "ssl_password", "sasl_oauth_token_provider"})
MASK = "***"
# kafka-python settings the job sets itself (after consumer_config), and where they come from.
JOB_KAFKA_KEYS = {
    "bootstrap_servers": "source.kafka.bootstrap_servers", "group_id": "source.kafka.group_id",
    "enable_auto_commit": "the job: positions are committed in Delta", "auto_offset_reset": "source.kafka.start_from",
    "session_timeout_ms": "source.kafka.session_timeout_ms", "heartbeat_interval_ms": "source.kafka.heartbeat_interval_ms",
    "key_deserializer": "the job", "value_deserializer": "the job",
    "max_partition_fetch_bytes": "source.kafka.max_message_bytes", "fetch_max_bytes": "source.kafka.max_message_bytes",
}  # fmt: skip


class KafkaSecuritySpec(_Strict):
    """TLS and SASL for the Kafka client. Secrets are named by environment variable, never inlined."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_env: str | None = Field(default=None, description="Environment variable holding the SASL password.")
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password_env: str | None = Field(default=None, description="Environment variable holding the key's password.")
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecuritySpec:
        sasl = self.protocol.startswith("SASL")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password_env):
            raise ValueError(f"protocol {self.protocol} needs sasl_mechanism, sasl_username and sasl_password_env")
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password_env):
            raise ValueError(f"sasl_* settings need protocol SASL_PLAINTEXT or SASL_SSL, not {self.protocol}")
        ssl_set = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_env") if getattr(self, n)]
        if not self.ssl_check_hostname:
            ssl_set.append("ssl_check_hostname")
        if ssl_set and not self.protocol.endswith("SSL"):  # they would be dropped: a plaintext connection
            raise ValueError(f"{', '.join(ssl_set)} need protocol SSL or SASL_SSL, not {self.protocol}")
        return self

    def client_config(self, environ: dict[str, str] | None = None) -> dict[str, Any]:
        """kafka-python client arguments; secrets are read from the environment here, at use time."""
        env = os.environ if environ is None else environ
        cfg: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.startswith("SASL"):
            cfg["sasl_mechanism"] = self.sasl_mechanism
            cfg["sasl_plain_username"] = self.sasl_username
            cfg["sasl_plain_password"] = _secret_from_env(self.sasl_password_env, "sasl_password_env", env)
        if self.protocol.endswith("SSL"):
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                path = getattr(self, name)
                if path is not None:
                    if not os.path.isfile(path):
                        raise SpecError(f"source.kafka.security.{name}: no such file: {path}")
                    cfg[name] = path
            cfg["ssl_check_hostname"] = self.ssl_check_hostname
            if self.ssl_password_env:
                cfg["ssl_password"] = _secret_from_env(self.ssl_password_env, "ssl_password_env", env)
        return cfg


# Characters delta-rs percent-encodes in a local table's URI, or cannot take at all (a panic):
# polars then looks for the files under the encoded name, and readers fail (measured, stop 44).
_UNSAFE_PATH_CHARS = set(' "#<>?`{}%[]^|')


def _local_table_path(v: str) -> str:
    """A local Delta table path (no scheme, or file://) with only characters every reader takes."""
    if "://" in v and not v.startswith("file://"):
        return v
    bad = sorted({c for c in v if c in _UNSAFE_PATH_CHARS or not c.isascii() or not c.isprintable()})
    if bad:
        shown = " ".join("space" if c == " " else repr(c) for c in bad)
        raise ValueError(f"a local table path cannot hold {shown}: delta-rs percent-encodes such paths (or refuses "
                         "them) and polars then cannot find the table's files; rename the folder")  # fmt: skip
    return v


def _server_list(v: Any) -> Any:
    """bootstrap_servers as written: "a:1,b:2" or a list; empty means none."""
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    return v or None


def _secret_from_env(var: str | None, field_name: str, env) -> str:
    value = env.get(var or "")
    if not value:
        raise SpecError(f"source.kafka.security.{field_name}: environment variable {var!r} is not set")
    return value


class SourceSettings(_Strict):
    """Base of a source kind's spec section: `source: {<kind>: {...}}` (one kind per job).

    A source kind is a settings class (here, or in the module that implements the source) and a
    `connectors.source.Source` registered under the same name (connectors/source.py)."""


class KafkaSourceSpec(SourceSettings):
    bootstrap_servers: list[str] | None = Field(
        default=None,
        description="Kafka brokers, 'host:port'. Empty or absent: Tidegate starts an embedded broker.",
    )
    topic: str = Field(min_length=1)
    group_id: str | None = Field(default=None, description="Consumer group; default 'tidegate-<name>'.")
    start_from: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where a partition with no committed position in Delta starts. latest: its end, recorded in Delta "
        "(a commit of positions, no rows) before anything is read, so a restart starts there too.",
    )
    max_message_bytes: int = Field(default=1_048_576, gt=0, description="Larger values are dead-lettered.")
    poll_timeout_ms: int = Field(default=200, gt=0)
    connect_timeout_s: float = Field(
        default=30.0, ge=0, description="At start, how long to keep trying to reach the brokers (with backoff)."
    )
    session_timeout_ms: int = Field(default=6000, ge=1000)
    revoke_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="On a rebalance, how long work in flight on revoked partitions may take to finish and be "
        "committed (the group waits meanwhile); what is not done by then is dropped and read again by the new owner.",
    )
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    security: KafkaSecuritySpec = Field(default_factory=KafkaSecuritySpec)
    consumer_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra kafka-python KafkaConsumer arguments (no secrets: see security)."
    )
    embedded_data_dir: str | None = Field(
        default=None,
        description="No bootstrap_servers: the embedded broker keeps its topics in this folder, so they survive a "
        "restart (demos); absent: in memory.",
    )
    format: Literal["json", "avro"] = Field(
        default="json", description="Message values: JSON objects, or Avro records (schema below)."
    )
    avro_schema: str | dict[str, Any] | None = Field(
        default=None,
        description="format avro without a registry: the writer schema of every message (an Avro schema mapping, "
        "or the path of an .avsc file); values are plain Avro binary, no framing.",
    )
    schema_registry: str | None = Field(
        default=None,
        description="format avro: values in the Confluent wire format (magic byte 0, 4-byte schema id, Avro body); "
        "ids are resolved from this Schema Registry URL (http[s]://...) or a local file mapping {id: schema}.",
    )

    @model_validator(mode="after")
    def _format_settings(self) -> KafkaSourceSpec:
        if self.format == "json" and (self.avro_schema is not None or self.schema_registry is not None):
            raise ValueError("avro_schema and schema_registry are for format: avro")
        if self.format == "avro" and self.avro_schema is None and self.schema_registry is None:
            raise ValueError("format avro needs avro_schema (plain Avro) or schema_registry (Confluent wire format)")
        if self.avro_schema is not None and self.schema_registry is not None:
            raise ValueError("give avro_schema (plain Avro) or schema_registry (Confluent wire format), not both")
        return self

    @field_validator("consumer_config")
    @classmethod
    def _no_inline_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        inline = sorted(k for k in v if k in SECRET_KAFKA_KEYS)
        if inline:
            raise ValueError(
                f"{', '.join(inline)}: secrets do not go in a spec; use security.sasl_password_env / "
                "security.ssl_password_env (the name of an environment variable)"
            )
        # How the client connects and authenticates is source.kafka.security's alone, and what the
        # job manages is its own: consumer_config cannot weaken or override either.
        security = sorted(k for k in v if k == "security_protocol" or k.startswith(("ssl_", "sasl_")))
        if security:
            raise ValueError(f"{', '.join(security)}: TLS and SASL settings go in source.kafka.security, "
                             "not consumer_config")  # fmt: skip
        managed = sorted(k for k in v if k in JOB_KAFKA_KEYS)
        if managed:
            raise ValueError(f"{', '.join(managed)}: set by the job (" + ", ".join(
                f"{k} from {JOB_KAFKA_KEYS[k]}" for k in managed) + ")")  # fmt: skip
        return v

    def group(self, job_name: str) -> str:
        """The consumer group: group_id, else 'tidegate-<job name>'."""
        return self.group_id or f"tidegate-{job_name}"

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, v: Any) -> Any:
        return _server_list(v)


class DeltaSourceSpec(SourceSettings):
    uri: str = Field(min_length=1, description="Delta table URI (local path or any deltalake URI).")
    mode: Literal["snapshot", "incremental"] = Field(
        default="snapshot",
        description="snapshot: every row of the table at one version; incremental: rows added since the last run.",
    )
    version: int | None = Field(default=None, ge=0, description="snapshot mode: pin this table version.")
    storage_options: dict[str, str] = Field(default_factory=dict)
    poll_interval_s: float = Field(default=5.0, gt=0, description="With --follow: how often to look for new versions.")

    _uri_readable = field_validator("uri")(classmethod(lambda cls, v: _local_table_path(v)))

    @model_validator(mode="after")
    def _version_only_for_snapshots(self) -> DeltaSourceSpec:
        if self.version is not None and self.mode != "snapshot":
            raise ValueError("version: only for mode: snapshot")
        return self


# Source kinds a spec may name: kind -> its settings class. The connectors register the kinds they
# implement (connectors.source.register_source); the built-in ones are known here, so a spec can be
# checked without importing any connector.
_SOURCE_KINDS: dict[str, type[SourceSettings]] = {"kafka": KafkaSourceSpec, "delta": DeltaSourceSpec}


# Called with a kind the spec names that is not registered yet (connectors.source installs one that
# imports the module implementing it): so schemas never imports a connector itself.
_kind_loader = None


def set_source_kind_loader(loader) -> None:
    global _kind_loader
    _kind_loader = loader


def register_source_kind(kind: str, settings: type[SourceSettings]) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", kind):
        raise ValueError(f"source kind {kind!r}: use lower-case letters, digits and '_'")
    known = _SOURCE_KINDS.get(kind)
    if known is not None and known is not settings:
        raise ValueError(f"source kind {kind!r} is already registered ({known.__name__})")
    _SOURCE_KINDS[kind] = settings


def source_kinds() -> list[str]:
    return sorted(_SOURCE_KINDS)


class SourceSpec(BaseModel):
    """`source: {<kind>: {...}}`: exactly one registered kind, validated by that kind's settings
    class (a discriminated union keyed by the section's name). In code: `kind` and `settings`."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    settings: SerializeAsAny[SourceSettings]
    event_schema: str | dict[str, Any] | None = Field(
        default=None,
        description="The events' contract, checked at decode (a violation is a dead letter schema_violation): an "
        "inline JSON Schema, a .json/.yaml file holding one, or a pydantic model 'pkg.module:Model'. Its fields "
        "override the types inferred from the prompt (`tidegate schema SPEC` prints the result).",
    )

    @field_validator("event_schema")
    @classmethod
    def _event_schema_form(cls, v: Any) -> Any:
        if isinstance(v, str) and not (re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v)
                                       or v.endswith((".json", ".yaml", ".yml"))):  # fmt: skip
            raise ValueError("give an inline JSON Schema, a .json/.yaml file, or a pydantic model 'pkg.module:Model'")
        if isinstance(v, dict) and not v:
            raise ValueError("the inline JSON Schema is empty")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _one_kind(cls, data: Any, handler) -> SourceSpec:
        if isinstance(data, SourceSpec):
            return data
        kinds = " or ".join(f"source.{k}" for k in source_kinds())
        extra = {}
        if isinstance(data, dict) and "event_schema" in data:  # a setting of every source kind
            data = dict(data)
            extra["event_schema"] = data.pop("event_schema")
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"give exactly one of {kinds}")
        ((kind, body),) = data.items()
        if kind not in _SOURCE_KINDS and _kind_loader is not None:
            _kind_loader(kind)
        settings_cls = _SOURCE_KINDS.get(kind)
        if settings_cls is None:
            raise ValueError(f"unknown source kind {kind!r}: give exactly one of {kinds}")
        try:
            settings = settings_cls.model_validate(body if body is not None else {})
        except ValidationError as e:  # keep every error's path, under the kind's name
            raise ValidationError.from_exception_data(
                cls.__name__, [_under(kind, err) for err in e.errors(include_url=False)]
            ) from None
        return handler({"kind": kind, "settings": settings, **extra})

    @model_serializer(mode="wrap")
    def _as_section(self, handler) -> dict[str, Any]:
        out = handler(self)
        section = {self.kind: out["settings"]}
        if out.get("event_schema") is not None:
            section["event_schema"] = out["event_schema"]
        return section

    @property
    def kafka(self) -> KafkaSourceSpec | None:
        return self.settings if self.kind == "kafka" else None  # type: ignore[return-value]

    @property
    def delta(self) -> DeltaSourceSpec | None:
        return self.settings if self.kind == "delta" else None  # type: ignore[return-value]

    @property
    def max_message_bytes(self) -> int:
        """Larger events are dead-lettered (oversized_message); only message sources set a limit."""
        return getattr(self.settings, "max_message_bytes", 2**31 - 1)


def _under(kind: str | None, err: dict) -> dict:
    loc = err["loc"] if kind is None else (kind, *err["loc"])
    out = {"type": err["type"], "loc": loc, "input": err.get("input")}
    if "ctx" in err:
        out["ctx"] = err["ctx"]
    return out


_RULES = TypeAdapter(list[RuleSpec])

REPAIR_VARIABLES = frozenset({"prompt", "output", "violations", "attempt"})  # what a repair template is given
DEFAULT_REPAIR_TEMPLATE = """{{ prompt }}

Your previous answer was:
{{ output }}

It was rejected: {{ violations }}
Answer again and fix this."""


class PromptSpec(_Strict):
    template: str = Field(min_length=1, description="Jinja2 template over the event's fields.")
    id_field: str = Field(min_length=1, description="Event field holding the request id.")
    system: str | None = Field(
        default=None,
        description="Optional system message (chat models). With chat: false a batch prompt is the template as it is "
        "(no system message); the online /v1/chat/completions route still sends it.",
    )
    chat: bool = Field(default=True, description="Wrap the prompt in the model's chat template.")
    context_field: str | None = Field(
        default=None,
        description="Event field with the context documents (a string or a list of strings) for grounding rules.",
    )
    max_tokens_field: str | None = Field(
        default=None,
        description="Event field with this row's completion budget (a positive integer); absent: sampling.max_tokens.",
    )
    repair_template: str = Field(
        default=DEFAULT_REPAIR_TEMPLATE,
        description="Prompt for a retry after a failed rule; variables: prompt, output, violations, attempt.",
    )

    @field_validator("template", "repair_template")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            ImmutableSandboxedEnvironment().parse(v)
        except TemplateSyntaxError as e:
            raise ValueError(f"not a valid Jinja2 template: {e.message} (line {e.lineno})") from None
        return v

    @field_validator("repair_template")
    @classmethod
    def _repair_variables(cls, v: str) -> str:
        """Only prompt, output, violations and attempt are given to it (an event's fields are not:
        before stop 44 `{{ question }}` there passed `tidegate check` and stopped the job at its
        first retry)."""
        from jinja2 import meta

        env = ImmutableSandboxedEnvironment()
        unknown = sorted(meta.find_undeclared_variables(env.parse(v)) - REPAIR_VARIABLES - set(env.globals))
        if unknown:
            raise ValueError(f"uses {', '.join(unknown)}: a repair template is given {', '.join(sorted(REPAIR_VARIABLES))} "
                             "only (the event's fields are in `prompt`, as rendered)")  # fmt: skip
        return v


class PricingSpec(_Strict):
    """What the model's tokens cost: every runs-table row and run summary gets a cost from it."""

    prompt_per_1k: float = Field(ge=0, description="Price of 1,000 prompt tokens.")
    completion_per_1k: float = Field(ge=0, description="Price of 1,000 completion tokens.")
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. USD, EUR.")


class ModelSpec(_Strict):
    path: str = Field(min_length=1, description="Local model directory (config.json, weights, tokenizer).")
    name: str | None = Field(default=None, description="Value of the results' `model` column; default: path.")
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: str = "auto"
    kv_cache_gib: float = Field(default=1.0, gt=0, description="KV cache size on CPU engines, in whole GiB (vLLM's unit).")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="Rows decoded together per step (vLLM's running set); default: vLLM's."
    )
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="Tokens per engine step; default: vLLM's.")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV cache of a shared prompt prefix (system prompt, template head)."
    )
    seed: int = 0
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM arguments.")
    pricing: PricingSpec | None = Field(default=None, description="Token prices: a cost on every runs-table row.")

    @property
    def label(self) -> str:
        return self.name or self.path

    @field_validator("kv_cache_gib")
    @classmethod
    def _whole_gib(cls, v: float) -> float:
        if not math.isfinite(v) or v != int(v):  # vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE): whole GiB (0.25 was 1)
            raise ValueError(f"must be a whole number of GiB, not {v:g}")
        return v

    @field_validator("engine_args")
    @classmethod
    def _no_remote_code(cls, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("trust_remote_code"):
            raise ValueError("trust_remote_code runs the model directory's own Python, which the code policy "
                             "(README, \"A spec is code\") cannot check: not allowed in a spec")  # fmt: skip
        for field, value in _strings(args, "engine_args"):
            if value.strip().endswith(".py"):  # e.g. reasoning_parser_plugin: vLLM runs the file
                raise ValueError(f"{field} names a Python file, which the code policy (README, \"A spec is code\") "
                                 "cannot check: not allowed in a spec")  # fmt: skip
        return args

    def engine_code(self) -> list[tuple[str, str]]:
        """(field, module:Name) of each class engine_args make vLLM import by name (worker_cls,
        worker_extension_cls, logits_processors, a distributed_executor_backend that is not one of
        vLLM's own, kv_transfer_config's connector module): the code policy judges them as it
        judges output.schema and custom rules."""
        args, named = self.engine_args, []
        for key in ("worker_cls", "worker_extension_cls"):
            if isinstance(args.get(key), str) and args[key] not in ("", "auto"):
                named.append((f"model.engine_args.{key}", args[key]))
        backend = args.get("distributed_executor_backend")
        if isinstance(backend, str) and backend not in _EXECUTOR_BACKENDS:
            named.append(("model.engine_args.distributed_executor_backend", backend))
        processors = args.get("logits_processors") or []
        for i, name in enumerate(processors if isinstance(processors, list) else [processors]):
            named.append((f"model.engine_args.logits_processors.{i}", str(name)))
        kv = args.get("kv_transfer_config")
        if isinstance(kv, dict) and kv.get("kv_connector_module_path"):
            named.append(("model.engine_args.kv_transfer_config.kv_connector_module_path",
                          f"{kv['kv_connector_module_path']}.{kv.get('kv_connector') or '?'}"))  # fmt: skip
        compilation = args.get("compilation_config")
        if isinstance(compilation, dict) and "." in str(compilation.get("backend") or ""):  # else a torch backend's name
            named.append(("model.engine_args.compilation_config.backend", str(compilation["backend"])))
        speculative = args.get("speculative_config")
        if isinstance(speculative, dict) and speculative.get("model") and (
            speculative.get("method") == "custom_class"
            or (speculative.get("method") is None and _DOTTED.fullmatch(str(speculative["model"])))
        ):  # vLLM takes a dotted model with no method for a custom proposer class, and imports it
            named.append(("model.engine_args.speculative_config.model", str(speculative["model"])))
        passes = compilation.get("inductor_passes") if isinstance(compilation, dict) else None
        for name, target in (passes.items() if isinstance(passes, dict) else ()):  # imported by qualified name
            named.append((f"model.engine_args.compilation_config.inductor_passes.{name}", str(target)))
        # Any other argument vLLM resolves by name follows its naming (scheduler_cls,
        # encoder_cache_manager_cls, kv_connector_extra_config.spec_module_path, ...): judged too.
        seen = {field for field, _ in named} | {"model.engine_args.kv_transfer_config.kv_connector_module_path"}
        for field, value in _strings(args, "model.engine_args"):
            key = next(part for part in reversed(field.split(".")) if not part.isdigit())
            in_kv = field.startswith("model.engine_args.kv_transfer_config.") and key != "kv_connector"
            if field not in seen and value not in ("", "auto") and (
                _CODE_KEY.search(key) or (in_kv and _DOTTED.fullmatch(value))
            ):
                named.append((field, value))
        # vLLM names a class "pkg.module.Name"; the policy's form is "pkg.module:Name"
        return [(field, dotted if ":" in dotted else ":".join(dotted.rsplit(".", 1))) for field, dotted in named]


# distributed_executor_backend values that are vLLM's own executors (any other string is a class path)
_EXECUTOR_BACKENDS = {"mp", "ray", "uni", "external_launcher"}
# Names of engine arguments whose value vLLM imports (a class, a module, a plugin), and, inside a
# KV transfer config (connectors and offloading tiers, named by the user), any dotted name.
_CODE_KEY = re.compile(r"(_cls|_class|(^|_)module_path|_module|_plugin|_processors?)$")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _strings(value: Any, path: str):
    """(dotted field, string) for every string inside nested dicts and lists."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}.{i}")


# Field names of vllm.SamplingParams (0.32) that a job may set. Checked here so a typo fails
# before any work, without importing vLLM (7-11 s) in the driver.
SAMPLING_FIELDS = frozenset(
    """n presence_penalty frequency_penalty repetition_penalty temperature top_p top_k min_p seed
    stop stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs detokenize
    skip_special_tokens spaces_between_special_tokens include_stop_str_in_output logit_bias
    allowed_token_ids bad_words""".split()
)


# vllm.SamplingParams' own checks (0.32, _verify_args), here so that `tidegate check` and a job's
# start refuse them before any engine loads: name -> (lowest, highest, lowest included, integer)
_SAMPLING_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "temperature": (0.0, 2.0, True, False), "top_p": (0.0, 1.0, False, False), "min_p": (0.0, 1.0, True, False),
    "presence_penalty": (-2.0, 2.0, True, False), "frequency_penalty": (-2.0, 2.0, True, False),
    "repetition_penalty": (0.0, float("inf"), False, False), "top_k": (-1, float("inf"), True, True),
    "max_tokens": (1, float("inf"), True, True), "min_tokens": (0, float("inf"), True, True),
}  # fmt: skip


def _check_sampling_ranges(v: dict[str, Any]) -> None:
    for name, (low, high, low_in, integer) in _SAMPLING_RANGES.items():
        x = v.get(name)
        if x is None:
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not isinstance(x, int)):
            raise ValueError(f"{name}: must be {'an integer' if integer else 'a number'}")
        if not math.isfinite(x) or not (x >= low if low_in else x > low) or x > high:
            shown = f"{'[' if low_in else '('}{low:g}, {high:g}]" if high != float("inf") else f"{'at least' if low_in else 'above'} {low:g}"
            raise ValueError(f"{name}: must be {shown}, not {x}")
    if v.get("max_tokens") is not None and (v.get("min_tokens") or 0) > v["max_tokens"]:
        raise ValueError(f"min_tokens: must be at most max_tokens ({v['max_tokens']})")


SERVE_DEPLOYMENT = "tidegate"  # the deployment in a spec's Serve application (jobs/serve.py)
BATCH_PRIORITY = 1  # vLLM priority of a batch job's rows in a Serve replica's engine (online requests: 0)


class PoolSpec(_Strict):
    backend: Literal["engines", "serve"] = Field(
        default="engines",
        description="engines: the job starts its own engine actors. serve: the job's batches run on the engines of "
        "a running Serve application (`tidegate serve`, pool.serve_app), so online and batch share GPUs; its rows wait "
        "behind online requests (vLLM priority scheduling). pool.actors then counts the job's clients of it, each "
        "with batches_in_flight batches; the application's replicas scale with serve.*.",
    )
    serve_app: str | None = Field(
        default=None,
        description="pool.backend serve: the Serve application (default: the job's name, i.e. `tidegate serve` of "
        "this spec). It must run the same model, sampling, prompt chat/system and output schema as this spec.",
    )
    actors: int = Field(default=1, ge=1, description="Engine actors (the starting count when min/max_actors are set).")
    min_actors: int | None = Field(default=None, ge=1, description="Autoscaling: the fewest engines (default: actors).")
    max_actors: int | None = Field(default=None, ge=1, description="Autoscaling: the most engines (default: actors).")
    scale_up_after_s: float = Field(default=30.0, ge=0, description="Backlog this long with every engine busy: add one.")
    scale_down_after_s: float = Field(default=120.0, ge=0, description="An engine idle this long is removed.")
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per engine (vLLM tensor parallelism); a placement group per engine."
    )
    batch_size: int = Field(default=256, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_linger_ms: float = Field(
        default=100.0, ge=0, description="How long a partial batch waits for more events while engines are busy."
    )
    batches_in_flight: int = Field(
        default=2, ge=1, description="Batches inside each engine at once; the next one's rows join as others finish."
    )
    max_batches_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="The most batches inside one engine: beyond batches_in_flight, one more is sent whenever the "
        "engine holds no more unfinished rows than its running set (max_num_seqs), which is when long outputs' "
        "tails hold their batches' places. Default: 2 x batches_in_flight; equal to it: never more.",
    )
    engine_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads per engine (OMP_NUM_THREADS). Default on CPU engines: the node's cores / actors.",
    )
    max_attempts: int = Field(
        default=2, ge=1, description="Times a single row may fail its engine, alone, before it is dead-lettered."
    )
    actor_start_timeout_s: float = Field(default=300.0, gt=0)
    batch_timeout_s: float | None = Field(
        default=600.0,
        gt=0,
        description="A batch running longer is a hang: its rows are aborted in the engine, the batch isolated. null: never.",
    )
    stuck_after_s: float = Field(
        default=10.0,
        gt=0,
        description="After a hang, an engine that does not answer a ping this long is stuck (a blocked kernel, "
        "not a slow row) and is restarted.",
    )

    @model_validator(mode="after")
    def _sizes(self) -> PoolSpec:
        if self.min_engines > self.max_engines:
            raise ValueError(f"min_actors ({self.min_engines}) is above max_actors ({self.max_engines})")
        if self.max_batches_in_flight is not None and self.max_batches_in_flight < self.batches_in_flight:
            raise ValueError(
                f"max_batches_in_flight ({self.max_batches_in_flight}) is below batches_in_flight ({self.batches_in_flight})"
            )
        if self.serve_app is not None and self.backend != "serve":
            raise ValueError("serve_app is only read with backend: serve")
        if self.backend == "serve":
            engine_keys = [k for k in ("min_actors", "max_actors", "tensor_parallel_size") if k in self.model_fields_set]
            if engine_keys:
                raise ValueError(
                    f"{', '.join(engine_keys)}: size the engines a job starts; with backend: serve the application's "
                    "replicas are the engines (serve.min_replicas, serve.max_replicas)"
                )
        if self.tensor_parallel_size > 1 and self.num_gpus != self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs num_gpus={self.tensor_parallel_size} "
                f"(GPUs per engine), not {self.num_gpus:g}"
            )
        return self

    @property
    def min_engines(self) -> int:
        return self.min_actors if self.min_actors is not None else min(self.actors, self.max_actors or self.actors)

    @property
    def max_engines(self) -> int:
        return self.max_actors if self.max_actors is not None else max(self.actors, self.min_actors or self.actors)

    @property
    def initial_engines(self) -> int:
        return min(max(self.actors, self.min_engines), self.max_engines)

    @property
    def batches_cap(self) -> int:
        """The most batches one engine holds (max_batches_in_flight, or its default)."""
        return self.max_batches_in_flight if self.max_batches_in_flight is not None else 2 * self.batches_in_flight


class StagesSpec(_Strict):
    """The CPU stages around the engines (decode + render, validate + assemble, encrypt + commit)
    run in their own Ray actors on the driver's node, so the engines never wait on them."""

    actors: int = Field(
        default=1, ge=1, description="Stage workers (decode/render, validate); the commit writer is one more actor."
    )
    num_cpus: float = Field(
        default=0.0,
        ge=0,
        description="Logical CPUs reserved per stage actor. 0: they share the driver node's cores like the driver "
        "does (a head node often has num_cpus=0).",
    )
    start_timeout_s: float = Field(default=120.0, gt=0, description="How long the stage actors may take to start.")


class TopicSinkSpec(_Strict):
    """`sink.topic`: every committed result and dead letter is also published to a Kafka topic, after
    its Delta commit, exactly once (docs/exactly-once.md, "Results to Kafka")."""

    name: str = Field(min_length=1, description="The topic (created with `partitions` if missing).")
    format: Literal["json", "avro"] = Field(
        default="json", description="json: one JSON object per row; avro: Confluent wire format (needs schema_registry)."
    )
    include: list[str] | None = Field(
        default=None, description="Columns to publish (default: all). Encrypted columns stay encrypted (base64 in JSON)."
    )
    bootstrap_servers: list[str] | None = Field(
        default=None, description="Brokers of the topic; default: the Kafka source's (its security settings too)."
    )
    security: KafkaSecuritySpec | None = Field(
        default=None, description="TLS/SASL for bootstrap_servers; default: the Kafka source's settings."
    )
    schema_registry: str | None = Field(
        default=None,
        description="format avro: a Schema Registry URL (the rows' schema is registered under '<name>-value') or a "
        "local {id: schema} file that holds it.",
    )
    partitions: int = Field(default=4, ge=1, description="Partitions when the topic has to be created.")
    transactional: bool = Field(
        default=False,
        description="Publish each commit's rows in one Kafka transaction (brokers that support transactions; a job "
        "run as one replica: the transactional id is per job and topic); exactly once holds either way "
        "(docs/exactly-once.md).",
    )
    scan_idle_ms: int = Field(
        default=1500, ge=100,
        description="On restart, reading back the topic's tail ends after this long without a record, once "
        "every partition has answered a fetch and is read to its high watermark.",
    )  # fmt: skip
    max_message_bytes: int = Field(
        default=1_000_000, ge=4096, le=15 * 2**20,
        description="A row whose message (key, value and headers) would be larger is published without its largest "
        "columns (null), named in the header tidegate.omitted; the tables keep it whole. Keep it below the broker's "
        "message.max.bytes (Kafka's default: 1,048,588).",
    )  # fmt: skip

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, v: Any) -> Any:
        return _server_list(v)

    @model_validator(mode="after")
    def _registry_for_avro(self) -> TopicSinkSpec:
        if self.format == "avro" and self.schema_registry is None:
            raise ValueError("format avro needs schema_registry (the Confluent wire format carries a schema id)")
        return self


class MaintenanceSpec(_Strict):
    """`sink.maintenance`: what the commit writer does to the job's tables between commits
    (connectors/maintenance.py); `tidegate maintain SPEC` runs the same steps by hand."""

    compact_every_commits: int | None = Field(
        default=600, ge=1, description="Compact, checkpoint and vacuum after this many commits (null: never in the job)."
    )
    target_file_mb: int = Field(default=128, ge=1, description="Compaction's target file size.")
    vacuum_retention_hours: float | None = Field(
        default=168.0, ge=1,
        description="Vacuum files unreferenced for this long (readers' time travel window); null: never vacuum.",
    )  # fmt: skip
    checkpoint_interval: int = Field(
        default=100, ge=1,
        description="delta.checkpointInterval of the tables: a checkpoint every this many commits. A writer's "
        "table handle is loaded again from each new checkpoint, and a commit costs more the more commits its "
        "handle carries since: fewer (20) makes small commits cheaper while the checkpoints are small, more "
        "makes fewer checkpoints to write, each one carrying every live file and tombstone (docs/lakehouse.md).",
    )  # fmt: skip
    log_retention_hours: float = Field(
        default=24, ge=0.1,
        description="delta.logRetentionDuration: log files older than this (and before a checkpoint) are deleted "
        "at checkpoints; also the limit of time travel by version. A commit's cost grows with the log's file "
        "count (measured on a local disk, docs/lakehouse.md): with 1 s commits keep it short, with an online "
        "endpoint's durable audit (tens of commits a second under load) shorter still (fractions of an hour: 0.25).",
    )  # fmt: skip

    def table_properties(self) -> dict[str, str]:
        hours = self.log_retention_hours
        retention = f"interval {int(hours)} hours" if hours == int(hours) else f"interval {round(hours * 3600)} seconds"
        props = {"delta.checkpointInterval": str(self.checkpoint_interval),
                 "delta.logRetentionDuration": retention}  # fmt: skip
        if self.vacuum_retention_hours is not None:
            # Tombstones of removed files (every checkpoint carries them) live past vacuum's window,
            # by as much again (at most a day): a vacuum reads the log only, so it deletes a file
            # only while its tombstone is still there and older than vacuum_retention_hours. Equal
            # to the window, a tombstone left the next checkpoint as it came due, and most files
            # compaction replaced were never deleted. Delta's own default is a week whatever vacuum
            # keeps, and compaction removes about one file per commit.
            hours = self.vacuum_retention_hours + min(self.vacuum_retention_hours, 24.0)
            props["delta.deletedFileRetentionDuration"] = f"interval {round(hours * 3600)} seconds"
        return props


class ParquetSpec(_Strict):
    """`sink.parquet`: how data files are written (appends and compaction alike)."""

    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = "zstd"
    compression_level: int | None = Field(default=3, description="zstd / gzip level (null: the codec's default).")
    max_row_group_rows: int = Field(default=131_072, ge=1024, description="Rows per Parquet row group.")


class SinkSpec(_Strict):
    kind: str = Field(default="delta", description="The sink implementation (connectors/sink.py registry).")
    results: str = Field(min_length=1, description="Delta table URI for results.")
    dead_letter: str = Field(min_length=1, description="Delta table URI for dead letters.")
    storage_options: dict[str, str] = Field(default_factory=dict)
    commit_interval_s: float = Field(default=1.0, ge=0)

    @field_validator("results", "dead_letter")
    @classmethod
    def _delta_tables_readable(cls, v: str, info: ValidationInfo) -> str:
        """Delta tables only: a sink plugin's results / dead_letter are its own (a file, a URL)."""
        return _local_table_path(v) if info.data.get("kind", "delta") == "delta" else v
    commit_max_rows: int = Field(default=8192, ge=1)
    write_attempts: int = Field(
        default=5, ge=1, description="Tries of one table write on store errors (backoff between); then the job stops."
    )
    write_backoff_s: float = Field(default=0.5, ge=0, description="First wait between tries; doubles each time.")
    topic: TopicSinkSpec | None = Field(
        default=None, description="Also publish every committed row to a Kafka topic (exactly once, after the commit)."
    )
    maintenance: MaintenanceSpec = Field(default_factory=MaintenanceSpec)
    partition_by: list[str] = Field(
        default_factory=list,
        description="Partition columns of the results table: processed_date (UTC date of processed_at), tenant, "
        "status, model, source_topic. Fixed when the table is created.",
    )
    parquet: ParquetSpec = Field(default_factory=ParquetSpec)

    @field_validator("partition_by")
    @classmethod
    def _partition_columns(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in PARTITION_COLUMNS]
        if bad:
            raise ValueError(f"{', '.join(bad)}: partition by one of {', '.join(PARTITION_COLUMNS)}")
        if len(set(v)) != len(v):
            raise ValueError("a column is named twice")
        return v


class RaySpec(_Strict):
    address: str | None = Field(default=None, description="Ray cluster; default RAY_ADDRESS or a local one.")
    metrics_export_port: int | None = Field(
        default=None, ge=1, le=65535, description="A local cluster's Prometheus metrics port (default: Ray picks one)."
    )


class RunSpec(_Strict):
    shutdown_timeout_s: float = Field(default=60.0, ge=0)


class ValidationSection(BaseModel):
    """`validation:` — a list of rules, or {rules: [...], allowed_modules: [...]} (the trust policy
    for the code a spec names: schemas/trusted_code.py)."""

    model_config = ConfigDict(extra="forbid")
    rules: list[RuleSpec] | None = None  # None: the default rules
    allowed_modules: list[str] | None = Field(
        default=None,
        description="Modules (and their submodules) custom rules and output.schema may be imported from; "
        "default: modules inside the job's working directory.",
    )

    @field_validator("allowed_modules")
    @classmethod
    def _module_names(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
                raise ValueError(f"not a module name: {name!r}")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _list_or_section(cls, data: Any, handler) -> ValidationSection:
        if isinstance(data, list):  # the list form: errors keep their paths (validation.N...)
            try:
                return cls.model_construct(rules=_RULES.validate_python(data), allowed_modules=None)
            except ValidationError as e:
                raise ValidationError.from_exception_data(
                    cls.__name__, [_under(None, err) for err in e.errors(include_url=False)]
                ) from None
        return handler(data)

    @model_serializer(mode="wrap")
    def _as_written(self, handler) -> Any:
        out = handler(self)
        return out["rules"] if self.allowed_modules is None else out


class ServeLimitsSpec(_Strict):
    """Per-tenant budgets of the online endpoint (token buckets, compute/limits.py)."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="Requests a tenant may start per minute.")
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Prompt + completion tokens a tenant may spend per minute."
    )
    scope: Literal["application", "replica"] = Field(
        default="application",
        description="application: one budget per tenant shared by every replica (one Ray actor, "
        "actors/limiter.py); replica: each replica enforces the budget on what it sees (no shared "
        "actor; with N replicas a tenant gets up to N times it).",
    )

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class ServeSpec(_Strict):
    """`serve:` — the job's online twin on Ray Serve (docs/serving.md)."""

    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0: every interface).")
    port: int = Field(default=8000, ge=1, le=65535)
    ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="What takes the HTTP requests on a Ray that `tidegate serve` starts itself: haproxy: Ray Serve's "
        "HAProxy ingress with its throughput-optimized data plane (each replica answers HTTP itself; "
        "RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED); proxy: Serve's Python proxy actor. On a cluster "
        "its nodes' environment decides (cluster.yaml sets both).",
    )
    route_prefix: str = Field(default="/", pattern=r"^/", description="Where the application's routes start.")
    min_replicas: int = Field(default=1, ge=1, description="Autoscaling: the fewest replicas (each loads an engine).")
    max_replicas: int = Field(default=1, ge=1, description="Autoscaling: the most replicas.")
    target_ongoing_requests: float = Field(default=16, gt=0, description="Autoscaling target per replica.")
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        default=128, ge=1, description="Requests waiting for a replica; beyond it the answer is 503 at once."
    )
    num_cpus: float | None = Field(default=None, ge=0, description="Per replica; default pool.num_cpus.")
    num_gpus: float | None = Field(default=None, ge=0, description="Per replica; default pool.num_gpus.")
    auth: bool = Field(
        default=True, description="Every request needs a tenant's API key (`tidegate keys api-key create`)."
    )
    api_keys: str | None = Field(default=None, description="Keyring file holding the API keys; default encryption.keyring.")
    limits: ServeLimitsSpec = Field(default_factory=ServeLimitsSpec)
    ack: Literal["durable", "journal", "buffered"] = Field(
        default="durable",
        description="durable: answer once the request's audit rows are committed to the tables; journal: once "
        "they are fsync'd in the replica's journal on its node's disk (serve.journal_dir), committed every "
        "sink.commit_interval_s, replayed by the next replica started there after a crash; buffered: answer at "
        "once, rows committed every sink.commit_interval_s (a replica killed meanwhile loses them).",
    )
    audit_backlog_max_mb: float = Field(
        default=256, gt=0,
        description="ack journal, buffered: the audit rows a replica holds that are not in the tables yet (its "
        "journal's records and buffered rows, measured as Arrow bytes) may reach this many MiB; then, while the "
        "store is down or slower than the requests, the replica answers new requests 503 audit_backlog_full "
        "(Retry-After) until its commits bring the backlog back under, instead of growing its memory and journal "
        "without bound. ack durable holds no backlog (each request waits for its own commit).",
    )  # fmt: skip
    group_commit_ms: float = Field(
        default=100, ge=0, le=10_000,
        description="ack durable: when requests reached the audit while its last commit ran (the replica is "
        "under load), the next commit waits this long for more to join it: fewer, larger commits (each costs "
        "the replica tens of ms of CPU and the tables a file and a log entry); a request of a replica that is "
        "not under load never waits for it. 0: each commit starts as soon as the previous one ended.",
    )  # fmt: skip
    journal_dir: str | None = Field(
        default=None,
        description="ack journal: where replicas keep their journals (a local path; <journal_dir>/<job name>/). "
        "Default ~/.tidegate/journal. A persistent volume, or one that a replica restarted on another node "
        "also mounts, keeps the unreplayed window of a lost node.",
    )
    batch_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="The share of each replica engine's running set (model.max_num_seqs) that a batch job's rows "
        "(pool.backend serve) may hold at once; the rest is kept for online requests, which then need not wait for "
        "batch rows to finish. 1: no place kept (batch rows still start after waiting online requests).",
    )
    engine_process: Literal["separate", "inline"] = Field(
        default="separate",
        description="separate: vLLM's engine core runs in a child process of the replica (as in vLLM's own "
        "server), so HTTP handling and guards do not share a GIL with the engine steps; inline: in the replica's "
        "process (one process less; what batch engines do).",
    )
    request_timeout_s: float = Field(default=120.0, gt=0, description="Generation time a request may take (504 after).")
    idempotency_cache: int = Field(
        default=10_000, ge=0,
        description="Answers kept in memory per replica (and by the application's claims actor) for Idempotency-Key.",
    )

    @model_validator(mode="after")
    def _replicas(self) -> ServeSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self


DEFAULT_SAMPLING = {"max_tokens": 64, "temperature": 0.0}


class JobSpec(_Strict):
    name: str
    source: SourceSpec
    prompt: PromptSpec
    model: ModelSpec
    sampling: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SAMPLING),
        description="vllm.SamplingParams fields (absent: max_tokens 64, temperature 0). A section given keeps "
        "max_tokens 64 unless it sets it; its other fields not given are vLLM's defaults (temperature 1).",
    )
    pool: PoolSpec = Field(default_factory=PoolSpec)
    stages: StagesSpec = Field(default_factory=StagesSpec)
    sink: SinkSpec
    ray: RaySpec = Field(default_factory=RaySpec)
    run: RunSpec = Field(default_factory=RunSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    validation: ValidationSection | None = Field(
        default=None,
        description="Output rules as a list (absent: the default rules refusal and pii_leakage with flag; []: none), "
        "or {rules: [...], allowed_modules: [...]}.",
    )
    encryption: EncryptionSpec = Field(default_factory=EncryptionSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec, description="The online endpoint (`tidegate serve`).")
    # The file load_spec read (None for a spec built from a mapping): `tidegate.submit` ships it.
    _source_path: str | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> str | None:
        return self._source_path

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("sampling")
    @classmethod
    def _sampling(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"unknown SamplingParams field(s): {', '.join(unknown)}")
        if v.get("n", 1) != 1:
            raise ValueError("n must be 1: one completion per event")
        kept_nowhere = sorted(k for k in ("logprobs", "prompt_logprobs") if v.get(k) is not None)
        if kept_nowhere:
            raise ValueError(f"{', '.join(kept_nowhere)}: computed and then dropped (no result column holds them); "
                             "remove it")  # fmt: skip
        if v.get("detokenize", True) is False:
            raise ValueError("detokenize: false would make every output_text empty (the rules judge text)")
        _check_sampling_ranges({"max_tokens": DEFAULT_SAMPLING["max_tokens"], **v})  # as the engine will get it
        # max_tokens only: `sampling: {temperature: 0.7}` keeps 64 (vLLM's own is 16, which cut most
        # answers short). The temperature is not filled in: a section with top_p but no temperature
        # has always sampled at vLLM's 1.0, and greedy would make its top_p do nothing.
        return {"max_tokens": DEFAULT_SAMPLING["max_tokens"], **v}

    @model_validator(mode="after")
    def _distinct_tables(self) -> JobSpec:
        if self.sink.results.rstrip("/") == self.sink.dead_letter.rstrip("/"):
            raise ValueError("sink.results and sink.dead_letter must be different tables")
        return self

    @model_validator(mode="after")
    def _id_is_not_sensitive(self) -> JobSpec:
        # The id is stored in clear (both tables, the results topic's message key): a field that
        # must be encrypted cannot be it.
        if any(f.name == self.prompt.id_field for f in self.encryption.input_fields):
            raise ValueError(f"encryption.input_fields: {self.prompt.id_field!r} is prompt.id_field, stored in clear "
                             "as every row's id; give the rows another id field")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _topic_has_brokers(self) -> JobSpec:
        topic, kafka = self.sink.topic, self.source.kafka
        if topic is None:
            return self
        if not topic.bootstrap_servers and not (kafka is not None and kafka.bootstrap_servers):
            raise ValueError("sink.topic.bootstrap_servers: needed unless the source is Kafka with bootstrap_servers")
        if kafka is not None and topic.name == kafka.topic and not topic.bootstrap_servers:
            raise ValueError("sink.topic.name: the source's own topic; results go to another topic")
        return self

    def topic_client_settings(self) -> tuple[list[str], KafkaSecuritySpec]:
        """(brokers, security) of sink.topic: its own, else the Kafka source's."""
        topic, kafka = self.sink.topic, self.source.kafka
        brokers = topic.bootstrap_servers or (kafka.bootstrap_servers if kafka is not None else None) or []
        security = topic.security or (kafka.security if kafka is not None and not topic.bootstrap_servers else None)
        return brokers, security or KafkaSecuritySpec()

    @model_validator(mode="after")
    def _rules_have_inputs(self) -> JobSpec:
        for i, r in enumerate((self.validation.rules if self.validation is not None else None) or []):
            if r.rule in ("grounding", "semantic_grounding") and not self.prompt.context_field:
                raise ValueError(f"validation.{i} ({r.rule}) needs prompt.context_field: the event field with the context")
            if r.rule == "json_schema" and self.output.schema_ is None:
                raise ValueError(f"validation.{i} (json_schema) needs output.schema")
        labels = [r.label for r in self.rules]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"validation: rule names must be unique, repeated: {', '.join(dup)} (set `name:`)")
        return self

    @property
    def rules(self) -> list:
        """The rules the job runs: the listed ones (or the defaults), plus json_schema when
        output.schema is set and the list does not configure it."""
        listed = self.validation.rules if self.validation is not None else None
        rules = list(default_rules() if listed is None else listed)
        if self.output.schema_ is not None and not any(r.rule == "json_schema" for r in rules):
            rules.insert(0, JsonSchemaRule(rule="json_schema"))
        return rules

    @property
    def engines_app(self) -> str | None:
        """pool.backend serve: the Serve application whose engines run the job (pool.serve_app, or
        the job's name); None when the job starts its own engines."""
        return (self.pool.serve_app or self.name) if self.pool.backend == "serve" else None

    @property
    def allowed_modules(self) -> list[str] | None:
        """validation.allowed_modules: the modules a spec may import code from (schemas/trusted_code.py)."""
        return self.validation.allowed_modules if self.validation is not None else None

    def code_refs(self) -> list:
        """Every piece of code the spec names by import path: (field, module:attr)."""
        from schemas.trusted_code import CodeRef

        refs = []
        if isinstance(self.source.event_schema, str) and ":" in self.source.event_schema:
            refs.append(CodeRef("source.event_schema", self.source.event_schema))
        if isinstance(self.output.schema_, str):
            refs.append(CodeRef("output.schema", self.output.schema_))
        for i, r in enumerate(self.validation.rules or [] if self.validation is not None else []):
            if r.rule == "custom":
                refs.append(CodeRef(f"validation.{i}.path", r.path))
        refs += [CodeRef(field, path) for field, path in self.model.engine_code()]
        return refs

    def redacted(self) -> dict[str, Any]:
        """The spec as a plain mapping, safe to print or log: storage options and any setting whose
        name says it holds a secret are masked (secrets themselves never live in a spec)."""
        return _mask(self.model_dump(mode="json", by_alias=True, exclude_none=True))



_SECRET_NAME = re.compile(
    r"passw|secret|credential|private|api_?key|access_?key|account_key|sas_token|(^|_)token$|(^|_)key$", re.IGNORECASE
)


def _mask(node: Any, parent: str = "") -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            secret_name = _SECRET_NAME.search(str(k)) and not str(k).endswith("_env")
            if parent == "storage_options" or (secret_name and not isinstance(v, (dict, list))):
                out[k] = MASK
            else:
                out[k] = _mask(v, str(k))
        return out
    if isinstance(node, list):
        return [_mask(v, parent) for v in node]
    return node


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid job spec {origin}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def parse_spec(data: Any, origin: str = "<dict>") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {origin}: expected a mapping at the top level")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, origin)) from None


def _yaml_where(e: yaml.YAMLError) -> str:
    """Where and what, never the text: PyYAML's own message quotes the lines around the error,
    and a spec line can hold a secret (storage_options, consumer_config)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", problem)  # a token it quotes, a tag, a character
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else f": {problem}"


def load_spec(path: str | Path) -> JobSpec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read job spec {p}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"invalid job spec {p}: not UTF-8 text (an invalid byte at position {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"invalid job spec {p}: not valid YAML{_yaml_where(e)}") from None
    except ValueError as e:  # PyYAML's own conversions: an impossible date such as 2024-02-30
        raise SpecError(f"invalid job spec {p}: a value YAML cannot read ({type(e).__name__}; a date such as "
                        "2024-02-30?)") from None  # fmt: skip
    spec = parse_spec(data, str(p))
    spec._source_path = str(p)
    return spec
