"""Lineage: what produced a result row (pure, no Ray).

Columns meant for the results table (docs/operations.md, "Lineage columns"):

    model_path            spec.model.path
    model_revision        model_revision(spec.model.path): "sha256:<16 hex>" over the model's files
    prompt_template_hash  template_hash(spec.prompt.template)
    sampling_params       sampling_json(spec): the sampling parameters as canonical JSON
    spec_hash             spec_hash(spec): the whole spec without its secrets
    run_id                (already a column)

`lineage_columns(spec)` computes all five once per job. Hashes are "sha256:" plus the first 16
hex digits (64 bits: ample to tell revisions apart, short enough to read in a table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "sha256:"
DIGEST_HEX = 16
CHUNK_BYTES = 8 * 2**20

# Files of a model directory that decide what it generates (besides the weights).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json: which tensor lives in which shard

# consumer_config keys holding secrets contain one of these (spec_hash leaves them out).
SECRET_KEY_PARTS = ("password", "secret", "key", "token")

# Per-file digests, keyed by (absolute path, size, mtime_ns): a file is hashed again only when it
# changes, so a 16 GB model is read once per process.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()
hashed_bytes = 0  # bytes actually read and hashed by this process (observable by tests)


def _short(h: hashlib._Hash) -> str:
    return PREFIX + h.hexdigest()[:DIGEST_HEX]


def model_files(model_dir: str | Path) -> list[Path]:
    """The files `model_revision` hashes: config, generation config, tokenizer files, chat
    template, weight files (*.safetensors, *.bin) and their shard index, sorted by name."""
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    out = []
    for p in root.iterdir():
        if not p.is_file():
            continue
        if p.name in MODEL_FILES or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(INDEX_SUFFIX):
            out.append(p)
    return sorted(out, key=lambda p: p.name)


def file_digest(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a file's contents, read in chunks; cached by (path, size, mtime). on_bytes(n):
    called with each chunk's size (a cached file counts as read at once)."""
    global hashed_bytes
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        cached = _FILE_DIGESTS.get(key)
    if cached is not None:
        if on_bytes is not None:
            on_bytes(st.st_size)
        return cached
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            n += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    digest = h.hexdigest()
    with _LOCK:
        _FILE_DIGESTS[key] = digest
        hashed_bytes += n
    return digest


def model_revision(model_dir: str | Path, progress: Callable[[int, int], None] | None = None) -> str:
    """"sha256:<16 hex>" identifying a model directory's contents (see `model_files`).

    Combines each file's name and content digest, so renaming, adding, removing or changing a
    file changes it. Raises FileNotFoundError when `model_dir` has no config.json.
    progress(bytes_done, bytes_total): after each chunk read (a model's weights are gigabytes).
    """
    files = model_files(model_dir)
    total = sum(p.stat().st_size for p in files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    if progress is not None:
        progress(0, total)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(file_digest(p, advance if progress is not None else None).encode())
        h.update(b"\n")
    return _short(h)


def template_hash(template: str) -> str:
    return _short(hashlib.sha256(template.encode("utf-8")))


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, non-ASCII kept: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sampling_json(spec) -> str:
    """The spec's sampling parameters as canonical JSON (the `sampling_params` column)."""
    return canonical_json(spec.sampling)


def _without_storage_secrets(node: Any) -> Any:
    """Every `storage_options` mapping anywhere keeps its keys, its values are dropped."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "storage_options" and isinstance(v, dict):
                out[k] = {opt: None for opt in v}
            else:
                out[k] = _without_storage_secrets(v)
        return out
    if isinstance(node, list):
        return [_without_storage_secrets(v) for v in node]
    return node


def spec_public_dict(spec) -> dict:
    """spec.model_dump(mode="json", by_alias=True) without secrets: source.kafka.consumer_config
    entries whose key contains password/secret/key/token are removed; storage_options values
    (sink, source.delta, anywhere) are replaced by null."""
    data = spec.model_dump(mode="json", by_alias=True)
    kafka = (data.get("source") or {}).get("kafka") or {}
    cc = kafka.get("consumer_config")
    if isinstance(cc, dict):
        kafka["consumer_config"] = {
            k: v for k, v in cc.items() if not any(part in k.lower() for part in SECRET_KEY_PARTS)
        }
    return _without_storage_secrets(data)


def spec_hash(spec) -> str:
    """"sha256:<16 hex>" of the spec's canonical JSON, secrets excluded (`spec_public_dict`)."""
    return _short(hashlib.sha256(canonical_json(spec_public_dict(spec)).encode("utf-8")))


LINEAGE_COLUMNS = ("model_path", "model_revision", "prompt_template_hash", "sampling_params", "spec_hash")


def lineage_columns(spec, model_rev: str | None = None) -> dict[str, str | None]:
    """The lineage column values of a job's result rows, computed once per job.

    model_rev: pass it when the driver cannot read the model directory (remote clusters, where
    only the engine nodes have it: compute `model_revision` in the engine actor); otherwise it is
    computed here, and is None (logged) when the directory is not readable from this process.
    """
    if model_rev is None:
        try:
            model_rev = model_revision(spec.model.path)
        except OSError as e:
            log.warning("model_revision: cannot read the model directory from this process: %s", e)
    return {
        "model_path": spec.model.path,
        "model_revision": model_rev,
        "prompt_template_hash": template_hash(spec.prompt.template),
        "sampling_params": sampling_json(spec),
        "spec_hash": spec_hash(spec),
    }


def clear_cache(paths: Iterable[str | Path] | None = None) -> None:
    """Forget cached file digests (all, or those of `paths`)."""
    with _LOCK:
        if paths is None:
            _FILE_DIGESTS.clear()
            return
        wanted = {str(Path(p).resolve()) for p in paths}
        for key in [k for k in _FILE_DIGESTS if k[0] in wanted]:
            del _FILE_DIGESTS[key]
