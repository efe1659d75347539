"""Structured logs: one JSON object per line, with the run and batch they belong to, secrets masked.

    configure_json_logging(level, run_id)    like jobs.run.configure_logging, JSON lines on stderr
    with log_context(batch_id=seq): ...      records inside carry "batch_id": seq
    log.info("...", extra={"batch_id": 7})   the same for one record (extra wins over the context)

Each line: {"ts": "2026-11-27T03:44:19.398Z", "level": "INFO", "logger": "jobs.pipeline",
"message": "...", "run_id": "...", "batch_id": 7} plus "exc" (the traceback) when there is one and
any other `extra` fields.

`redact` (a logging.Filter, installed on the handler by configure_json_logging and by
configure_text_logging, which jobs.run.configure_logging uses) masks secrets in a record's message,
args, `extra` fields, traceback and stack:

    the values of secret keys     password, sasl_plain_password, ssl_password, token, secret, api_key,
                                  keys containing them, keys ending in master_key
                                  (`sasl_plain_password=hunter2` -> `sasl_plain_password=***`,
                                  `TIDEGATE_MASTER_KEY=...` -> `TIDEGATE_MASTER_KEY=***`, a dict
                                  argument {"ssl_password": "x"} -> {"ssl_password": "***"})
    URL credentials               s3://user:pass@host -> s3://***@host
    Authorization credentials     Authorization: Bearer abc -> Authorization: Bearer ***
                                  (also Basic, Digest, ...; and a bare `Bearer <token>`)
    Tidegate API keys             tg_<key id>_<secret> -> tg_<key id>_***
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
_SECRET_PARTS = ("password", "passwd", "secret", "api_key", "apikey", "access_key", "account_key", "private_key", "credential",
                 "authorization")  # fmt: skip
_SECRET_ENDS = ("token", "master_key")


def is_secret_key(name: str) -> bool:
    """password, sasl_plain_password, ssl_password, token, secret, api_key; keys containing
    password/secret/api_key/access_key/account_key/private_key/credential/authorization; keys ending
    in "token" (sas_token, access_token; not max_tokens or prompt_tokens) or in "master_key"
    (master_key, TIDEGATE_MASTER_KEY; not master_key_id or master_key_env, which name a key)."""
    n = name.lower().replace("-", "_")
    return n in SECRET_KEYS or any(p in n for p in _SECRET_PARTS) or n.endswith(_SECRET_ENDS)


# key, a separator (= or :), then a value: quoted, or up to a delimiter.
_KV = re.compile(
    r"""(?P<kq>["']?)(?P<key>[A-Za-z0-9_.\-]+)(?P=kq)(?P<sep>\s*[=:]\s*)"""
    r"""(?P<val>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&)\]}]+)"""
)


# scheme://userinfo@ : user:password (the password may hold / ? #), or a lone token (https://TOKEN@host).
_URL_USERINFO = re.compile(
    r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"""
    r"""(?:[^\s:/?#@'"<>]*:[^\s@'"<>]*|[^\s:/?#@'"<>]+)@"""
)
# Authorization / Proxy-Authorization header values: `Authorization: Bearer abc`, `"Authorization": "Basic
# dXM6cHc="`, `authorization=abc` (no scheme). The scheme stays, the credentials go.
_AUTH_HEADER = re.compile(
    r"""(?P<head>\b(?:proxy[-_])?authorization["']?\s*[:=]\s*["']?)"""
    r"""(?P<scheme>(?:bearer|basic|digest|negotiate|token|apikey|aws4-hmac-sha256)\s+)?"""
    r"""(?P<cred>[^\s"',;)\]}]+)""",
    re.IGNORECASE,
)
# A bare bearer token anywhere (`Bearer eyJhbGciOi...`): the capitalised scheme word and a token68 value.
_BEARER = re.compile(r"""\bBearer\s+[A-Za-z0-9\-._~+/]{8,}=*""")
# A Tidegate API key (crypto/api_keys.py) anywhere: its key id stays (it names the key), the secret goes.
_API_KEY = re.compile(r"""\b(tg_[0-9a-f]{12}_)[A-Za-z0-9_-]{43}""")


def redact_text(text: str) -> str:
    """Mask secrets in text: the values of secret keys in `key=value`, `key: value`, `"key": "value"`
    forms, the userinfo of URLs (`s3://***@host`), and Authorization credentials (`Bearer ***`)."""

    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m.group('head')}{m.group('scheme') or ''}{MASK}", text)
    if "Bearer" in text:
        text = _BEARER.sub(f"Bearer {MASK}", text)
    if "tg_" in text:
        text = _API_KEY.sub(lambda m: m.group(1) + MASK, text)
    out, done, at = [], 0, 0
    while m := _KV.search(text, at):
        key = m.group("key")
        if not is_secret_key(key) or "authorization" in key.lower():  # headers: _AUTH_HEADER keeps the scheme
            at = m.end("sep")  # the value may hold pairs itself: `ValueError: password=x`, `line: token=y`
            continue
        val = m.group("val")
        quote = val[0] if val[:1] in ("'", '"') else ""
        out += [text[done : m.start("val")], quote, MASK, quote]
        done = at = m.end()
    return "".join(out) + text[done:] if out else text


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


@contextmanager
def reading_store(what: str, doing: str = "read") -> Iterator[None]:
    """Turn a store's or reader's own error while reading `what` (words naming the table, its URI
    among them) into one SinkError that says so (URI credentials masked) with the error's type:
    their messages can quote paths, credentials and stored values. Tidegate's own errors pass."""
    from schemas.errors import SinkError, TidegateError

    try:
        yield
    except TidegateError:
        raise
    except Exception as e:  # noqa: BLE001 - see above
        raise SinkError(f"cannot {doing} {redact_text(what)} ({type(e).__name__})") from None


class RedactFilter(logging.Filter):
    """Masks secrets in a record's args, rendered message, `extra` fields, traceback and stack; never
    drops a record.

    A traceback is rendered here, masked, and kept as `exc_text` with `exc_info` cleared, so every
    formatter (logging's own, JsonLogFormatter, a third party's) prints the masked text and none can
    render the exception again from the live objects.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
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
        if record.exc_text:  # set (and masked) by the redact filter
            out["exc"] = record.exc_text
        elif record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
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


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_text_logging(level: str | None = None, stream=None) -> logging.Handler:
    """Root logging as text lines (stderr by default), secrets redacted like the JSON lines
    (TIDEGATE_LOG_LEVEL, noisy libraries at WARNING). Returns the handler."""
    level = (level or os.environ.get("TIDEGATE_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(redact)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet_libraries()
    return handler


def configure_worker_logging() -> None:
    """Every Ray worker process of a job (stage actors, engines, the commit writer, Serve replicas)
    runs this first (through jobs/worker.py's hook; it also works as a hook on its own): its log
    records go through the same redaction as the driver's, in the worker's log file and in what
    Ray forwards to the driver."""
    configure_text_logging()


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
