"""Guardrails end to end: real tansu -> `python -m jobs.run` (Ray, vLLM tiny model) -> Delta.

The tiny model's outputs are random token soup, so rules fail naturally: useful here.
"""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest

from schemas.examples import TicketTriage
from tests.conftest import event, make_spec, send, write_spec

pytestmark = pytest.mark.slow

DOCS = [
    "Order 4411 from Acme Corp shipped on March 5, 2024 by express courier.",
    "Refunds are approved by the support lead within two working days.",
]


def test_structured_output_never_writes_an_invalid_object(tmp_path, broker, topic, tiny_model, job_processes):
    n = 60
    send(broker, topic, (event(i) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{"sampling.max_tokens": 80, "output": {"schema": "schemas.examples:TicketTriage"}, "validation": []},
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(300) == 0, job.log()[-4000:]

    res = pl.read_delta(spec["sink"]["results"])
    dead = pl.read_delta(spec["sink"]["dead_letter"])
    assert sorted(res["id"].to_list() + dead["id"].to_list()) == [f"e{i:06d}" for i in range(n)]
    assert res.height > n // 2  # constrained decoding: most objects fit in 80 tokens
    for text, obj in zip(res["output_text"].to_list(), res["output_json"].to_list()):
        parsed = TicketTriage.model_validate_json(obj)  # raises if the table held an invalid object
        assert parsed == TicketTriage.model_validate_json(text)
    assert res["attempts"].is_in([1, 2]).all()
    assert res["rule_results"].to_list()[0] == [{"rule": "json_schema", "passed": True, "score": None, "message": ""}]
    # What did not fit was retried once (max_attempts 2), then dead-lettered with the reason and the output.
    if dead.height:
        assert (dead["stage"] == "validate").all() and (dead["error_class"] == "validation_failed").all()
        assert (dead["attempts"] == 2).all() and dead["output_text"].null_count() == 0
        assert dead["error"].str.starts_with("json_schema: not valid JSON").all()


def test_retry_loop_grounding_and_semantic_grounding(tmp_path, broker, topic, tiny_model, job_processes):
    n = 24
    send(broker, topic, (event(i, docs=DOCS) for i in range(n)))
    spec = make_spec(
        tmp_path, broker, topic, tiny_model,
        **{
            "prompt.template": "Context: {{ docs | join(' ') }}\nAnswer for {{ user }}: {{ question }}",
            "prompt.context_field": "docs",
            # Two stage workers: a batch's retries are validated by either, both call the one
            # embedding actor.
            "stages.actors": 2,
            "validation": [
                # Never satisfiable: every row goes back to the engine until max_attempts, then is flagged.
                {"rule": "regex", "must_match": ["^IMPOSSIBLE$"], "on_fail": "retry", "max_attempts": 3, "then": "flag"},
                {"rule": "grounding", "threshold": 0.5, "on_fail": "flag"},
                {"rule": "semantic_grounding", "threshold": 0.99, "on_fail": "flag"},
            ],
        },
    )  # fmt: skip
    job = job_processes(write_spec(tmp_path, spec))
    assert job.wait(400) == 0, job.log()[-4000:]

    res = pl.read_delta(spec["sink"]["results"]).sort("id")
    assert res["id"].to_list() == [f"e{i:06d}" for i in range(n)]
    assert pl.read_delta(spec["sink"]["dead_letter"]).height == 0
    assert (res["status"] == "flagged").all() and (res["attempts"] == 3).all()
    # The engine really ran the repair prompt: it is longer than the first prompt.
    first_prompt_tokens = _first_prompt_tokens(tiny_model, spec, n)
    assert (res["prompt_tokens"].to_numpy() > np.array(first_prompt_tokens) + 20).all()
    assert re.search(rf"retried generations\s*│\s*{2 * n}\b", job.log()), job.log()[-3000:]

    by_rule = res.select("id", "rule_results").explode("rule_results").unnest("rule_results")
    regex = by_rule.filter(pl.col("rule") == "regex")
    assert regex.height == n and not regex["passed"].any()
    assert (regex["message"] == "does not match '^IMPOSSIBLE$'").all()
    grounding = by_rule.filter(pl.col("rule") == "grounding")
    assert grounding.height == n and grounding["score"].is_between(0, 1).all()
    semantic = by_rule.filter(pl.col("rule") == "semantic_grounding")
    assert semantic.height == n and semantic["score"].is_between(-1, 1).all()
    assert not semantic["passed"].any()  # random text is never 0.99-similar to the context
    assert semantic["message"].str.contains(r"sentence\(s\) below similarity 0.99").all()


def _first_prompt_tokens(model, spec, n) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    out = []
    for i in sorted(range(n), key=lambda i: f"e{i:06d}"):
        body = json.loads(event(i, docs=DOCS)[1])
        prompt = f"Context: {' '.join(DOCS)}\nAnswer for {body['user']}: {body['question']}"
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        out.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def test_semantic_similarity_of_the_real_embedding_model():
    """all-MiniLM-L6-v2 through vLLM's pooling runner: a paraphrase scores high, an unrelated text low."""
    from compute.rules import Candidate
    from compute.semantic import EmbeddingWorker, SemanticGrounding
    from schemas.validation import SemanticGroundingRule

    worker = EmbeddingWorker()
    rule = SemanticGrounding(SemanticGroundingRule(rule="semantic_grounding", threshold=0.6), worker.embed)
    grounded, unrelated, empty_ctx = rule.check_batch(
        [
            Candidate("The parcel for order 4411 left Acme Corp on March 5 by courier.", context=DOCS),
            Candidate("Bananas are rich in potassium. Penguins live in Antarctica.", context=DOCS),
            Candidate("Anything at all here.", context=[]),
        ]
    )
    assert grounded.passed and grounded.score > 0.6, grounded
    assert not unrelated.passed and unrelated.score < 0.3, unrelated
    assert unrelated.message.startswith("2/2 sentence(s) below similarity 0.60")
    assert not empty_ctx.passed and empty_ctx.message == "no context to ground the output in"
    # One "sentence" past the model's 256 tokens, in the output and in the context (JSON, a list,
    # text whose sentences end in "。"): before, vLLM refused the whole embed call, and the job
    # stopped on that row at every restart. Now it is checked in pieces.
    long_json = '{"items": [' + ", ".join(f'"parcel {i} for order 4411 left Acme Corp"' for i in range(150)) + "]}"
    long_ctx = [DOCS[0].replace(". ", "; ") * 30]
    (judged,) = rule.check_batch([Candidate(long_json, context=long_ctx)])
    assert judged.score is not None and -1 <= judged.score <= 1, judged
    assert worker.embed(["word " * 2000]).shape == (1, 384)
    # Each piece the rule embeds fits the model's 256 tokens whole (nothing of it cut off unseen),
    # English or CJK (about a token per character: a long CJK sentence used to lose two thirds).
    from compute.semantic import chunks, sentences

    tokenizer = worker.llm.get_tokenizer()
    cjk = "订单4411已于三月五日由快递发出，退款由支持主管在两个工作日内批准" * 40  # one "sentence", 1,320 characters
    digits = " ".join(str(7919 * i % 10**9) for i in range(400))  # ~1.9 characters a token
    flags = "{\"scores\":[" + ",".join(str(i % 2) for i in range(1500)) + "]}"  # a token per character
    spaced = " ".join(str(i % 2) for i in range(1500))  # the densest: 2 characters a token
    # Greek and Cyrillic prose: about a token a letter (counted 1 unit a letter before stop 44, a
    # 480-unit piece was ~400 tokens, its last third cut off unseen).
    greek = "Η παραγγελία 4411 στάλθηκε στις 5 Μαρτίου και η επιστροφή εγκρίθηκε από την υποστήριξη " * 20
    cyrillic = "Заказ 4411 отправлен пятого марта, возврат одобрен службой поддержки в течение двух дней " * 20
    for text in (long_json, cjk, cjk.replace("，", "。"), digits, flags, spaced, greek, cyrillic):
        pieces = sentences(text) + chunks([text], 480)
        assert len(pieces) > 1 and all(len(tokenizer(p).input_ids) <= 256 for p in pieces), text[:40]
