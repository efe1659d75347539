"""The real vLLM engine (in this process, no Ray) on the tiny model, checked against transformers."""

from __future__ import annotations

import pyarrow as pa
import pytest

from schemas.records import COMPLETION_SCHEMA
from schemas.spec import ModelSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def engine(tiny_model):
    from compute.engine import EngineWorker

    return EngineWorker(ModelSpec(path=str(tiny_model), dtype="float32"), {"max_tokens": 12, "temperature": 0})


def requests(prompts: list[str]) -> pa.Table:
    n = len(prompts)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "prompt": prompts,
            "source_topic": ["t"] * n,
            "source_partition": pa.array([0] * n, pa.int32()),
            "source_offset": pa.array(range(n), pa.int64()),
            "received_ns": pa.array([0] * n, pa.int64()),
        }
    )


def test_greedy_output_matches_transformers(engine, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [f"Answer for user-{i}: what is the status of order {i * 37}?" for i in range(6)]
    out = engine.generate(requests(prompts))
    assert out.schema == COMPLETION_SCHEMA
    assert out.column("error").null_count == out.num_rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:]
        assert out.column("prompt_tokens")[i].as_py() == ids.shape[1]
        assert out.column("completion_tokens")[i].as_py() == len(new)
        assert out.column("output_text")[i].as_py() == tok.decode(new, skip_special_tokens=True)


def test_too_long_prompt_is_an_error_row_not_a_failed_batch(engine):
    out = engine.generate(requests(["short question", "order " * 1000, "another short one"])).to_pylist()
    assert [r["error_class"] for r in out] == [None, "prompt_too_long", None]
    assert out[1]["error_stage"] == "prompt"
    assert f"the model context is {engine.max_model_len} tokens" in out[1]["error"]
    assert out[0]["output_text"] and out[2]["output_text"]
