"""The inference engine: one vLLM engine, loaded once, turning prompts into completions.

    in : REQUEST_SCHEMA table (id, prompt, source_partition, source_offset, ...)
    out: COMPLETION_SCHEMA table, one row per request, in the same order:
         output_text, finish_reason, token counts; or error_stage/error_class/error

`EngineWorker` is a plain class (usable in a process without Ray); `actors.pool` runs it as a
Ray actor. Rows that cannot run (a prompt longer than the context) or that make the engine fail
come back as error rows, never as an exception that would fail the whole batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa

from schemas.errors import EngineError
from schemas.records import COMPLETION_SCHEMA
from schemas.spec import ModelSpec

log = logging.getLogger(__name__)

# Environment an engine process needs, set before vLLM is imported. The in-process engine core
# (no extra processes) is what makes vLLM usable inside a Ray actor; see docs/architecture.md.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}



def engine_env(model: ModelSpec) -> dict[str, str]:
    env = dict(ENGINE_ENV)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(model.kv_cache_gib)))
    for name in ("VLLM_CACHE_ROOT", "VLLM_LOGGING_LEVEL", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads a model at run time
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


class EngineWorker:
    def __init__(
        self,
        model: ModelSpec,
        sampling: dict[str, Any],
        chat: bool = True,
        system: str | None = None,
        json_schema: dict | None = None,
        tensor_parallel_size: int = 1,
    ):
        for k, v in engine_env(model).items():
            os.environ.setdefault(k, v)
        if not os.path.isfile(os.path.join(model.path, "config.json")):
            raise EngineError(f"model.path {model.path!r} is not a model directory (no config.json)")
        import torch
        from vllm import LLM, SamplingParams

        on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=model.path,
            dtype=model.dtype,
            seed=model.seed,
            # One process per engine, except for tensor parallelism: then vLLM's Ray executor puts
            # a worker on each GPU of the placement group this actor runs in (actors/pool.py).
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "ray",
            tensor_parallel_size=tensor_parallel_size,
            # CUDA graphs pay off on GPUs; on CPUs eager mode loads in seconds instead of a minute.
            enforce_eager=not on_gpu,
        )
        if model.max_model_len:
            kwargs["max_model_len"] = model.max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = model.gpu_memory_utilization
        if json_schema is not None:
            # Structured outputs are configured per engine: the per-request whitespace flag is
            # ignored, and without it a weak model fills its token budget with spaces. guidance
            # (llguidance) honours the schema's bounds; xgrammar emits raw control characters in
            # strings, outlines ignored integer bounds (docs/validation.md).
            kwargs["structured_outputs_config"] = {
                "backend": "guidance",
                "disable_any_whitespace": True,
                "disable_additional_properties": True,  # extra keys only spend tokens
            }
        kwargs.update(model.engine_args)
        self.model_path = model.path
        t0 = time.monotonic()
        self.llm = LLM(**kwargs)
        self.load_s = time.monotonic() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        params = dict(sampling)
        if json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            params["structured_outputs"] = StructuredOutputsParams(json=json_schema)
        try:
            self.sampling = SamplingParams(**params)
        except (TypeError, ValueError) as e:
            raise EngineError(f"sampling: {e}") from None
        self.chat = chat
        self.system = system
        self.ready_at = time.monotonic()
        self.busy_s = 0.0  # time spent inside generate(): the rest of the time the engine idles
        self.batches = 0
        # Idle time between consecutive batches (end of one generate() to the start of the next),
        # and the span from the first batch's start to the last one's end.
        self.gaps_s = 0.0
        self._first_start: float | None = None
        self._last_end: float | None = None

    def info(self) -> dict[str, Any]:
        return {"max_model_len": self.max_model_len, "load_s": self.load_s, "pid": os.getpid()}

    def model_revision(self) -> str:
        """sha256 of the loaded model's config, tokenizer and weights (lineage). Reads every weights
        file: the pool asks one engine, not each."""
        from compute.lineage import model_revision

        return model_revision(self.model_path)

    def ping(self) -> int:
        """Cheap liveness check (the engine is loaded once this answers)."""
        return os.getpid()

    def usage(self) -> dict[str, float]:
        """Busy time and batches since the engine was ready (for idle-fraction reporting)."""
        span = (self._last_end - self._first_start) if self._first_start is not None else 0.0
        return {"busy_s": self.busy_s, "up_s": time.monotonic() - self.ready_at, "batches": self.batches,
                "gaps_s": self.gaps_s, "span_s": span}  # fmt: skip

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        if self.chat:
            texts = []
            for p in prompts:
                messages = [{"role": "user", "content": p}]
                if self.system:
                    messages.insert(0, {"role": "system", "content": self.system})
                texts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            # The chat template already placed the special tokens.
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def generate(self, requests: pa.Table) -> pa.Table:
        t0 = time.monotonic()
        if self._first_start is None:
            self._first_start = t0
        elif self._last_end is not None:
            self.gaps_s += t0 - self._last_end
        try:
            return self._generate(requests)
        finally:
            self._last_end = time.monotonic()
            self.busy_s += self._last_end - t0
            self.batches += 1

    def _generate(self, requests: pa.Table) -> pa.Table:
        n = requests.num_rows
        cols: dict[str, list] = {name: [None] * n for name in COMPLETION_SCHEMA.names}
        cols["source_partition"] = requests.column("source_partition").to_pylist()
        cols["source_offset"] = requests.column("source_offset").to_pylist()
        if n == 0:
            return pa.table(cols, schema=COMPLETION_SCHEMA)
        token_ids = self._token_ids(requests.column("prompt").to_pylist())
        runnable = []
        for i, ids in enumerate(token_ids):
            cols["prompt_tokens"][i] = len(ids)
            if len(ids) + 1 > self.max_model_len:  # room for at least one generated token
                self._fail(cols, i, "prompt", "prompt_too_long",
                           f"prompt is {len(ids)} tokens; the model context is {self.max_model_len} tokens")  # fmt: skip
            else:
                runnable.append(i)
        self._run(cols, runnable, token_ids)
        return pa.table(cols, schema=COMPLETION_SCHEMA)

    def _run(self, cols: dict[str, list], rows: list[int], token_ids: list[list[int]]) -> None:
        if not rows:
            return
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": token_ids[i]} for i in rows], self.sampling, use_tqdm=False
            )
        except Exception as e:
            if len(rows) == 1:
                self._fail(cols, rows[0], "engine", "engine_error", f"{type(e).__name__}: {e}")
                return
            # Isolate the row(s) that make the engine fail; the others still get their output.
            log.warning("engine failed on a batch of %d rows (%s); retrying rows one by one", len(rows), e)
            for i in rows:
                self._run(cols, [i], token_ids)
            return
        for i, out in zip(rows, outputs):
            completion = out.outputs[0]
            cols["output_text"][i] = completion.text
            cols["finish_reason"][i] = completion.finish_reason
            cols["completion_tokens"][i] = len(completion.token_ids)

    @staticmethod
    def _fail(cols: dict[str, list], i: int, stage: str, error_class: str, message: str) -> None:
        cols["error_stage"][i] = stage
        cols["error_class"][i] = error_class
        cols["error"][i] = message
