"""A test engine for the online endpoint: answers each prompt with the prompt's text itself (plus an
e-mail address that is not in the prompt when it says "leak"), so a
test decides what the guards see by what it sends (a PII value, a denied word). Same interface
as compute.engine.EngineWorker (bench/instant_engine.py's)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from bench.instant_engine import InstantEngine
from compute.engine import completion_counts
from schemas.errors import EngineError
from schemas.records import COMPLETION_SCHEMA


FREEZE_MARKER = "freeze-the-guards"  # an output holding it holds the freezes_on_marker rule's call


def freezes_on_marker(candidate, seconds: float = 8.0) -> bool:
    """A custom rule that holds its call for `seconds` on an output holding `FREEZE_MARKER:<token>`
    (a rule that hangs), and passes. It first creates <temp dir>/<token>.frozen: the test knows
    the call is inside the rule."""
    if FREEZE_MARKER in candidate.output:
        token = candidate.output.split(FREEZE_MARKER + ":", 1)[1].split()[0]
        (Path(tempfile.gettempdir()) / f"{token}.frozen").touch()
        time.sleep(seconds)
    return True


LEAKED_EMAIL = "zq.canary.7731@example.org"  # added to the output of a prompt that says "leak"


class EchoEngine(InstantEngine):
    cancelled = 0  # batch calls cancelled while they hung (see run_batch)

    def generate(self, requests: pa.Table) -> pa.Table:
        prompts = [p + f" write to {LEAKED_EMAIL}" if "leak" in p else p for p in requests.column("prompt").to_pylist()]
        words = [len(p.split()) for p in prompts]
        out = pa.table(
            {
                "source_partition": requests.column("source_partition"),
                "source_offset": requests.column("source_offset"),
                "output_text": pa.array(prompts, pa.string()),
                "finish_reason": pa.array(["stop"] * len(prompts), pa.string()),
                "prompt_tokens": pa.array(words, pa.int32()),
                "completion_tokens": pa.array(words, pa.int32()),
            }
        )
        for f in COMPLETION_SCHEMA:
            if f.name not in out.column_names:
                out = out.append_column(f.name, pa.nulls(out.num_rows, f.type))
        return out.select(COMPLETION_SCHEMA.names).cast(COMPLETION_SCHEMA)

    async def complete(self, requests: pa.Table, priority: int = 0) -> pa.Table:
        prompts = " ".join(requests.column("prompt").to_pylist())
        if "hang" in prompts:
            await asyncio.sleep(3600)
        if "explode" in prompts:  # an engine failure whose message quotes the request (as vLLM's may)
            raise EngineError(f"engine step failed on {prompts!r}")
        if "slow" in prompts:  # a request still running when its duplicate arrives
            await asyncio.sleep(1.5)
        return self.generate(requests)

    async def run_batch(self, requests: pa.Table, priority: int = 0) -> tuple[dict, pa.Table]:
        """A batch job's batch (pool.backend serve): hangs as complete() does; counts the calls
        cancelled while they hung (engine_usage), so a test sees the cancellation reach the replica.
        A prompt holding "touch:PATH" creates that file when the batch reaches the replica."""
        import re
        from pathlib import Path

        for prompt in requests.column("prompt").to_pylist():
            if m := re.search(r"touch:(\S+)", prompt):
                Path(m.group(1)).touch()
        try:
            table = await self.complete(requests, priority)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return completion_counts(table), table

    def usage(self) -> dict[str, float]:
        return {**super().usage(), "cancelled": self.cancelled}
