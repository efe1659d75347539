"""Structured logs: one JSON object per line, with the run and batch they belong to, secrets masked.

    configure_json_logging(level, run_id)    like jobs.run.configure_logging, JSON lines on stderr
    with log_context(batch_id=seq): ...      records inside carry "batch_id": seq
    log.info("...", extra={"batch_id": 7})   the same for one record (extra wins over the context)

Each line: {"ts": "2026-11-27T03:44:19.398Z", "level": "INFO", "logger": "jobs.pipeline",
"message": "...", "run_id": "...", "batch_id": 7} plus "exc" (the traceback) when there is one and
any other `extra` fields.

`redact` (a logging.Filter, installed on the handler by configure_json_logging) masks the values
of secret keys (password, sasl_plain_password, ssl_password, token, secret, api_key, and keys
containing them) in a record's message and args: `sasl_plain_password=hunter2` logs as
`sasl_plain_password=***`, a dict argument {"ssl_password": "x"} as {"ssl_password": "***"}.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

MASK = "***"

run_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tidegate_run_id", default=None)
batch_id_var: contextvars.ContextVar[Any] = contextvars.ContextVar("tidegate_batch_id", default=None)

# Attributes every LogRecord has: whatever else a record carries came from `extra`.
_RECORD_ATTRS = set(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {"message", "asctime"}
_OWN_FIELDS = ("run_id", "batch_id")


@contextmanager
def log_context(run_id: str | None = None, batch_id: Any = None) -> Iterator[None]:
    """Records logged inside carry these run_id / batch_id (those given; the others unchanged)."""
    tokens = []
    if run_id is not None:
        tokens.append((run_id_var, run_id_var.set(run_id)))
    if batch_id is not None:
        tokens.append((batch_id_var, batch_id_var.set(batch_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# -- secrets ---------------------------------------------------------------------------------------

SECRET_KEYS = ("password", "sasl_plain_password", "ssl_password", "token", "secret", "api_key")
_SECRET_PARTS = ("password", "passwd", "secret", "api_key", "apikey", "access_key", "account_key", "private_key", "credential")


def is_secret_key(name: str) -> bool:
    """password, sasl_plain_password, ssl_password, token, secret, api_key, and keys containing
    password/secret/api_key/access_key/account_key/private_key/credential or ending in "token"
    (sas_token, access_token; not max_tokens or prompt_tokens)."""
    n = name.lower().replace("-", "_")
    return n in SECRET_KEYS or any(p in n for p in _SECRET_PARTS) or n.endswith("token")


# key, a separator (= or :), then a value: quoted, or up to a delimiter.
_KV = re.compile(
    r"""(?P<kq>["']?)(?P<key>[A-Za-z0-9_.\-]+)(?P=kq)(?P<sep>\s*[=:]\s*)"""
    r"""(?P<val>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&)\]}]+)"""
)


def redact_text(text: str) -> str:
    """Mask the values of secret keys in `key=value`, `key: value`, `"key": "value"` forms."""

    def sub(m: re.Match) -> str:
        if not is_secret_key(m.group("key")):
            return m.group(0)
        val = m.group("val")
        quote = val[0] if val[:1] in ("'", '"') else ""
        return f"{m.group('kq')}{m.group('key')}{m.group('kq')}{m.group('sep')}{quote}{MASK}{quote}"

    return _KV.sub(sub, text)


def redact_value(value: Any) -> Any:
    """A copy of `value` with secret keys' values masked (dicts, lists, tuples, strings)."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and v is not None else redact_value(v))
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactFilter(logging.Filter):
    """Masks secrets in a record's args, rendered message and `extra` fields; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            if isinstance(record.args, dict):
                record.args = redact_value(record.args)
            else:
                record.args = tuple(redact_value(a) for a in record.args)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it for logging's own error handling
            return True
        masked = redact_text(message)
        if masked != message or not isinstance(record.msg, str):
            record.msg, record.args = masked, ()  # the rendered, masked message replaces template + args
        for key, value in list(vars(record).items()):
            if key in _RECORD_ATTRS:
                continue
            if is_secret_key(key) and value is not None:
                setattr(record, key, MASK)
            elif isinstance(value, (dict, list, tuple, str)):
                setattr(record, key, redact_value(value))
        return True


redact = RedactFilter()


# -- formatting ------------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, message, run_id, batch_id, [exc], extras.

    run_id / batch_id: the record's own (`extra`), else the context (`log_context`), else the
    formatter's `run_id` for run_id.
    """

    def __init__(self, run_id: str | None = None):
        super().__init__()
        self.run_id = run_id

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None) or run_id_var.get() or self.run_id,
            "batch_id": getattr(record, "batch_id", None) if getattr(record, "batch_id", None) is not None
            else batch_id_var.get(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _OWN_FIELDS and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_json_logging(level: str | None = None, run_id: str | None = None, stream=None) -> logging.Handler:
    """Root logging as JSON lines (stderr by default), secrets redacted; same levels as
    jobs.run.configure_logging (TIDEGATE_LOG_LEVEL, noisy libraries at WARNING). Returns the handler."""
    level = (level or os.environ.get("TIDEGATE_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter(run_id))
    handler.addFilter(redact)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet_libraries()
    return handler


def quiet_libraries() -> None:
    """Libraries that talk a lot log warnings and errors only."""
    for noisy in ("kafka", "ray", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("kafka.coordinator.consumer").addFilter(_quiet_async_listener)


def _quiet_async_listener(record: logging.LogRecord) -> bool:
    """kafka-python warns when a rebalance listener takes over 1 s, assuming it blocks heartbeats.
    Tidegate's listener is asynchronous (connectors/kafka.py): finishing work in flight may take
    longer, and heartbeats go on meanwhile. Drop that one warning."""
    return not str(record.msg).startswith("Rebalance listener %s.%s for group %s took")
