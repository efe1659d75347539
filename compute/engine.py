"""The inference engine: one vLLM engine, loaded once, batching continuously across batches.

    submit(key, requests, done)  REQUEST_SCHEMA table in; done(COMPLETION_SCHEMA table) once its last
                                 row finished (or done(exception) if the engine failed)
    complete(requests)           the same, awaited (the Ray actor's method: several batches at once)
    generate(requests)           the same, blocking (a process without Ray, tests)
    abort(key)                   stop a batch's rows (a call that ran past pool.batch_timeout_s)
    room(batches)                returns once the engine holds >= `batches` batches but no more unfinished
                                 rows than its running set (max_num_seqs): time to send one more
    usage()                      busy and idle time, running-set occupancy, prefix-cache hits

A batch's rows join the engine's running set between two decode steps and leave it one by one as
they finish, so a batch that ends with a few long outputs does not hold the next one back: the
rows of the batches behind it keep the running set full (vLLM's scheduler admits waiting rows as
others finish). One thread steps the engine (`LLMEngine.step`, vLLM's in-process engine: no extra
process per engine, unless `separate_process`: then the engine core runs in a child process and
`step` waits on it, and on CPUs this process keeps off the cores of vLLM's worker:
`keep_off_worker_cores`); submissions and aborts reach it through a queue.

Output rows come in the order of the input rows, one each: output_text, finish_reason, token
counts, or error_stage / error_class / error for a row that cannot run (a prompt longer than the
context, an invalid per-row budget) without failing the rest of its batch.

`EngineWorker` is a plain class; `actors/pool.py` runs it as a Ray actor (an async one, because of
`complete`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas.errors import EngineBroken, EngineError
from schemas.records import COMPLETION_SCHEMA
from schemas.spec import ModelSpec

log = logging.getLogger(__name__)

# Environment an engine process needs, set before vLLM is imported. The in-process engine core
# (no extra processes) is what makes vLLM usable inside a Ray actor; see docs/architecture.md.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}

Done = Callable[[Any], None]  # called with the COMPLETION_SCHEMA table, or with the exception


def engine_env(model: ModelSpec) -> dict[str, str]:
    env = dict(ENGINE_ENV)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(model.kv_cache_gib))  # whole GiB (the spec checks it)
    for name in ("VLLM_CACHE_ROOT", "VLLM_LOGGING_LEVEL", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads a model at run time
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def engine_threads(explicit: int | None, num_gpus: float, engines: int) -> str | None:
    """OMP_NUM_THREADS for an engine's process, or None to leave it be. Ray sets it to an actor's
    num_cpus (often 1); a CPU engine is the only heavy consumer on its node, so it gets the node's
    cores shared among the most engines there may be (measured: 1.7x faster with 2 threads than 1)."""
    if explicit:
        return str(explicit)
    if num_gpus == 0 and "OMP_NUM_THREADS" not in os.environ:
        return str(max(1, (os.cpu_count() or 1) // max(1, engines)))
    return None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_dtype_advice(model: ModelSpec, cpuinfo: str | None = None) -> str | None:
    """The one dtype warning that matters on CPU engines, in our words, or None.

    bf16 weights on a CPU without bf16 instructions are emulated: several times slower than
    float32. `auto` means the model's own dtype (config.json torch_dtype / dtype)."""
    dtype = model.dtype.lower()
    if dtype == "auto":
        try:
            with open(os.path.join(model.path, "config.json")) as f:
                config = json.load(f)
            dtype = str(config.get("torch_dtype") or config.get("dtype") or "").lower()
        except (OSError, ValueError):
            return None
    if dtype not in ("bfloat16", "bf16"):
        return None
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    if any(flag in cpuinfo.split() for flag in BF16_CPU_FLAGS):
        return None
    how = "model.dtype: auto picks the model's bfloat16" if model.dtype.lower() == "auto" else f"model.dtype is {model.dtype}"
    return (f"{how}, and this machine's CPUs have no bf16 instructions ({' / '.join(BF16_CPU_FLAGS)}): the CPU "
            "engines emulate it, several times slower than float32. Set model.dtype: float32.")  # fmt: skip


@dataclass
class _Batch:
    key: str
    cols: dict[str, list]
    done: Done
    priority: int = 0  # vLLM's request priority (lower runs first); 0 unless the engine schedules by priority
    pending: int = 0  # rows still in the engine
    request_ids: list[str] = field(default_factory=list)


def empty_completions(requests: pa.Table) -> dict[str, list]:
    """COMPLETION_SCHEMA columns for the request rows, nothing filled in yet."""
    n = requests.num_rows
    cols: dict[str, list] = {name: [None] * n for name in COMPLETION_SCHEMA.names}
    cols["source_partition"] = requests.column("source_partition").to_pylist()
    cols["source_offset"] = requests.column("source_offset").to_pylist()
    return cols


def fail_row(cols: dict[str, list], i: int, stage: str, error_class: str, message: str) -> None:
    cols["error_stage"][i] = stage
    cols["error_class"][i] = error_class
    cols["error"][i] = message


class EngineWorker:
    def __init__(
        self,
        model: ModelSpec,
        sampling: dict[str, Any],
        chat: bool = True,
        system: str | None = None,
        json_schema: dict | None = None,
        tensor_parallel_size: int = 1,
        separate_process: bool = False,
        priority_scheduling: bool = False,
        batch_share: float = 1.0,
    ):
        for k, v in engine_env(model).items():
            os.environ.setdefault(k, v)
        if separate_process:
            # vLLM's engine core (scheduler, model) in a child process of this one, which keeps
            # tokenising, detokenising and whatever else this process does (an online replica's
            # HTTP handling and guards) off the GIL the steps need. The child ends with this process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
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
            # A shared system prompt or template prefix is computed once, then reused from the cache.
            enable_prefix_caching=model.enable_prefix_caching,
        )
        if priority_scheduling:
            # Waiting rows start in priority order (lower first), then arrival: an online replica's
            # requests go ahead of the rows a batch job sends it (pool.backend: serve).
            kwargs["scheduling_policy"] = "priority"
        if model.max_model_len:
            kwargs["max_model_len"] = model.max_model_len
        if model.max_num_seqs:
            kwargs["max_num_seqs"] = model.max_num_seqs
        if model.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = model.max_num_batched_tokens
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
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.max_num_seqs = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self.prefix_caching = bool(self.engine.vllm_config.cache_config.enable_prefix_caching)
        # model.engine_args may say otherwise (scheduling_policy: fcfs): then priorities are not sent.
        self.priority_scheduling = str(self.engine.vllm_config.scheduler_config.policy) == "priority"
        # batch_share < 1: rows of priority > 0 (a batch job's) hold at most this share of the running
        # set; the others wait in this process, so online requests find a place without waiting for
        # batch rows to finish (vLLM does not preempt running requests for priority).
        self.low_priority_cap = max(1, int(self.max_num_seqs * batch_share)) if batch_share < 1 else None
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
        self.worker_cores: set[int] = set()
        if separate_process and not on_gpu:
            self.worker_cores = keep_off_worker_cores()
        self._setup_loop()

    # -- the step loop ---------------------------------------------------------------------------

    def _setup_loop(self) -> None:
        self.ready_at = time.monotonic()
        self.busy_s = 0.0  # time inside engine steps
        self.idle_s = 0.0  # time with nothing in the engine, after the first submission
        self.occupancy_s = 0.0  # sum over steps of (running rows / max_num_seqs) * step time
        self.batches = 0
        self.peak_batches = 0  # most batches inside the engine at once
        self.prompt_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache
        self._first_submit: float | None = None
        self._idle_since: float | None = None  # the engine emptied at this time (after the first batch)
        self._cv = threading.Condition()
        self._commands: list[tuple[str, Any]] = []
        self._batches: dict[str, _Batch] = {}
        self._rows: dict[str, tuple[_Batch, int]] = {}  # request id -> (batch, row)
        self._held: deque[tuple[_Batch, int, list[int], Any]] = deque()  # priority > 0 rows over low_priority_cap
        self._low_in_engine = 0  # rows of priority > 0 inside vLLM
        self._room_waiters: list[tuple[int, Callable[[], None]]] = []  # (batches, wake): see room()
        self._closed = False
        # A step that raised left vLLM's engine in no known state (its engine core process gone,
        # a sticky device error): every later step would fail too. Its batches fail with
        # EngineBroken, and the pool restarts the engine actor (actors/pool.py); an online replica
        # reports itself unhealthy and is replaced (jobs/serve.py check_health).
        self.broken: str | None = None  # the exception type of the step that failed
        self._thread = threading.Thread(target=self._loop, name="engine-steps", daemon=True)
        self._thread.start()

    def submit(self, key: str, requests: pa.Table, done: Done, priority: int = 0) -> None:
        """Queue a batch (thread-safe). Prompts are tokenized here, on the caller's thread, so the
        step thread only steps. priority: its rows' vLLM priority (an engine built with
        priority_scheduling; lower starts first)."""
        if self._first_submit is None:
            self._first_submit = time.monotonic()
        cols = empty_completions(requests)
        runnable = self._runnable(requests, cols)
        batch = _Batch(key, cols, done, priority if self.priority_scheduling else 0)
        if not runnable:
            self.batches += 1
            done(pa.table(cols, schema=COMPLETION_SCHEMA))
            return
        with self._cv:
            self._commands.append(("add", (batch, runnable)))
            self._cv.notify()

    def abort(self, key: str) -> None:
        """Stop the batch's rows; its done() is not called (the caller gave up on it)."""
        with self._cv:
            self._commands.append(("abort", key))
            self._cv.notify()

    def _runnable(self, requests: pa.Table, cols: dict[str, list]) -> list[tuple[int, list[int], Any]]:
        """(row, prompt token ids, sampling params) of the rows that can run; the others get an error."""
        # "messages" (optional, not in REQUEST_SCHEMA): a whole chat as JSON, from the online endpoint
        messages = requests.column("messages").to_pylist() if "messages" in requests.column_names else None
        token_ids = self._token_ids(requests.column("prompt").to_pylist(), messages)
        budgets = requests.column("max_tokens").to_pylist() if "max_tokens" in requests.column_names else None
        out = []
        for i, ids in enumerate(token_ids):
            cols["prompt_tokens"][i] = len(ids)
            if len(ids) + 1 > self.max_model_len:  # room for at least one generated token
                fail_row(cols, i, "prompt", "prompt_too_long",
                         f"prompt is {len(ids)} tokens; the model context is {self.max_model_len} tokens")  # fmt: skip
                continue
            params = self.sampling
            if budgets is not None and budgets[i] is not None:
                params = self.sampling.clone()
                params.max_tokens = int(budgets[i])
            out.append((i, ids, params))
        return out

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._commands and not self._rows and not self._closed:
                    if self._idle_since is None and self._first_submit is not None:
                        self._idle_since = time.monotonic()
                    self._cv.wait()
                if self._idle_since is not None:
                    self.idle_s += time.monotonic() - self._idle_since
                    self._idle_since = None
                if self._closed:
                    return
                commands, self._commands = self._commands, []
            for kind, arg in commands:
                self._add(*arg) if kind == "add" else self._abort(arg)
            if self._held:
                self._release_held()
            if not self._rows:
                continue
            running = min(len(self._rows), self.max_num_seqs)
            t0 = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine failed (not a row): every batch in it fails
                self.broken = type(e).__name__
                # Its type only: a message could quote what the engine was given.
                log.warning("engine step failed (%s): every batch in the engine fails", type(e).__name__)
                self._fail_all(e)
                continue
            dt = time.monotonic() - t0
            self.busy_s += dt
            self.occupancy_s += dt * running / self.max_num_seqs
            for out in outputs:
                if out.finished:
                    self._finished(out)
            if self._held:
                self._release_held()
            if self._room_waiters:
                self._wake_room_waiters()

    def _add(self, batch: _Batch, runnable: list) -> None:
        self._batches[batch.key] = batch
        self.peak_batches = max(self.peak_batches, len(self._batches))
        cap = self.low_priority_cap if batch.priority > 0 else None
        for i, ids, params in runnable:
            if cap is not None and self._low_in_engine >= cap:
                self._held.append((batch, i, ids, params))
                batch.pending += 1
            elif self._engine_add(batch, i, ids, params):
                batch.pending += 1
        if not batch.pending:
            self._complete(batch)

    def _engine_add(self, batch: _Batch, i: int, ids: list[int], params: Any) -> bool:
        """One row into vLLM; False (and the row's error set) if vLLM refused it."""
        rid = f"{batch.key}/{i}"
        try:
            self.engine.add_request(rid, {"prompt_token_ids": ids}, params, priority=batch.priority)
        except Exception as e:  # this row only (an invalid parameter for this prompt, say)
            # Its type only: vLLM's validation messages can quote the rejected value (the row's own
            # max_tokens_field, say), and this text reaches the dead letter and an online answer.
            fail_row(batch.cols, i, "engine", "engine_error", f"vLLM refused the row ({type(e).__name__})")
            return False
        self._rows[rid] = (batch, i)
        batch.request_ids.append(rid)
        if batch.priority > 0:
            self._low_in_engine += 1
        return True

    def _release_held(self) -> None:
        """Held rows into vLLM while rows of priority > 0 are below low_priority_cap."""
        while self._held and self._low_in_engine < (self.low_priority_cap or 0):
            batch, i, ids, params = self._held.popleft()  # (an aborted batch's held rows went with it: _abort)
            if not self._engine_add(batch, i, ids, params):
                batch.pending -= 1
                if not batch.pending:
                    self._complete(batch)

    def _finished(self, out) -> None:
        found = self._rows.pop(out.request_id, None)
        if found is None:
            return
        batch, i = found
        if batch.priority > 0:
            self._low_in_engine -= 1
        completion = out.outputs[0]
        batch.cols["output_text"][i] = completion.text
        batch.cols["finish_reason"][i] = completion.finish_reason
        batch.cols["completion_tokens"][i] = len(completion.token_ids)
        self.prompt_tokens += batch.cols["prompt_tokens"][i] or 0
        self.cached_tokens += out.num_cached_tokens or 0
        batch.pending -= 1
        if not batch.pending:
            self._complete(batch)

    def _complete(self, batch: _Batch) -> None:
        self._batches.pop(batch.key, None)
        self.batches += 1
        try:
            table = pa.table(batch.cols, schema=COMPLETION_SCHEMA)
        except Exception as e:  # noqa: BLE001 - handed to the caller, never lost
            batch.done(e)
            return
        batch.done(table)

    def _wake_room_waiters(self) -> None:
        with self._cv:
            queued = [arg for kind, arg in self._commands if kind == "add"]  # submitted, not added yet
            unfinished = len(self._rows) + len(self._held) + sum(len(runnable) for _, runnable in queued)
            if unfinished > self.max_num_seqs:
                return
            batches = len(self._batches) + len(queued)
            woken = [w for w in self._room_waiters if w[0] <= batches]
            self._room_waiters = [w for w in self._room_waiters if w[0] > batches]
        for _, wake in woken:
            wake()

    def _abort(self, key: str) -> None:
        batch = self._batches.pop(key, None)
        if batch is None:
            return
        live = [rid for rid in batch.request_ids if rid in self._rows]
        for rid in live:
            self._rows.pop(rid, None)
        if batch.priority > 0:
            self._low_in_engine -= len(live)
            self._held = deque(h for h in self._held if h[0] is not batch)
        if live:
            self.engine.abort_request(live)

    def _fail_all(self, err: Exception) -> None:
        ids = list(self._rows)
        batches = list(self._batches.values())
        self._rows.clear()
        self._batches.clear()
        self._held.clear()
        self._low_in_engine = 0
        try:
            self.engine.abort_request(ids)
        except Exception:
            pass
        for b in batches:
            b.done(EngineBroken(f"the engine failed a step ({type(err).__name__})", os.getpid()))

    # -- calls -----------------------------------------------------------------------------------

    async def complete(self, requests: pa.Table, priority: int = 0) -> pa.Table:
        """The completions of a batch, once its last row finished; other batches run meanwhile.
        Cancelled (pool.batch_timeout_s), it aborts the batch's rows in the engine."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = f"b{id(future):x}"

        def done(result) -> None:
            loop.call_soon_threadsafe(_settle, future, result)

        self.submit(key, requests, done, priority)
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(key)
            raise

    async def room(self, batches: int) -> bool:
        """Returns (True) once the engine holds at least `batches` batches and no more unfinished rows
        (running or waiting) than max_num_seqs: its running set is about to run short while those
        batches' last rows (long outputs) keep them inside. The pool then sends one batch more
        (pool.max_batches_in_flight); on outputs of one length, rows run short only as a whole
        batch finishes, and the room comes with that batch's place."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiter = (batches, lambda: loop.call_soon_threadsafe(_settle, future, True))
        with self._cv:
            self._room_waiters.append(waiter)
        try:
            return await future
        finally:
            with self._cv:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)

    async def run_batch(self, requests: pa.Table, priority: int = 0) -> tuple[dict, pa.Table]:
        """What the engine pool calls (Ray's num_returns=2): the counts the driver books, and the
        completions, which stay in the object store for the stage workers."""
        table = await self.complete(requests, priority)
        return completion_counts(table), table

    def generate(self, requests: pa.Table) -> pa.Table:
        """complete(), blocking: for a process without Ray."""
        finished = threading.Event()
        box: list = []

        def done(result) -> None:
            box.append(result)
            finished.set()

        self.submit(f"g{id(box):x}", requests, done)
        finished.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- information -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"max_model_len": self.max_model_len, "load_s": self.load_s, "pid": os.getpid(),
                "max_num_seqs": self.max_num_seqs, "prefix_caching": self.prefix_caching,
                "worker_cores": sorted(self.worker_cores)}  # fmt: skip

    def model_revision(self) -> str:
        """sha256 of the loaded model's config, tokenizer and weights (lineage). Reads every weights
        file: the pool asks one engine, not each."""
        from compute.lineage import model_revision

        return model_revision(self.model_path)

    async def hash_model(self) -> str:
        """model_revision in a thread, so that `hashing_progress` answers meanwhile: the pool
        shows how far the hashing is (gigabytes of weights take a while)."""
        from compute.lineage import model_revision

        def progress(done: int, total: int) -> None:
            self._hashing = (done, total)

        return await asyncio.to_thread(model_revision, self.model_path, progress)

    def hashing_progress(self) -> tuple[int, int]:
        """(bytes hashed, bytes to hash) of the hash_model call in progress."""
        return getattr(self, "_hashing", (0, 0))

    def ping(self) -> int:
        """Cheap liveness check (the engine is loaded once this answers)."""
        return os.getpid()

    def usage(self) -> dict[str, float]:
        """Time accounting since the engine was ready:
        busy_s      inside engine steps (work in the running set)
        idle_s      nothing in the engine at all, after the first batch arrived
        occupancy   mean running rows / max_num_seqs over the busy time (how full decode steps ran)
        peak        most batches inside the engine at once
        prefix hit  prompt tokens served from the prefix cache / prompt tokens"""
        now = time.monotonic()
        with self._cv:  # the idle spell in progress counts too
            idle = self.idle_s + (now - self._idle_since if self._idle_since is not None else 0.0)
        return {
            "busy_s": self.busy_s, "up_s": now - self.ready_at, "idle_s": idle,
            "span_s": (now - self._first_submit) if self._first_submit else 0.0,
            "occupancy_s": self.occupancy_s, "batches": self.batches, "peak_batches": self.peak_batches,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
        }  # fmt: skip

    def _token_ids(self, prompts: list[str], chats: list[str | None] | None = None) -> list[list[int]]:
        if self.chat or chats is not None:
            texts = []
            for i, p in enumerate(prompts):
                if chats is not None and chats[i] is not None:
                    messages = json.loads(chats[i])
                else:
                    messages = [{"role": "user", "content": p}]
                if self.system and messages[0]["role"] != "system":
                    messages.insert(0, {"role": "system", "content": self.system})
                texts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            # The chat template already placed the special tokens.
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]


def keep_off_worker_cores() -> set[int]:
    """A CPU engine in a child process: vLLM binds its worker's threads to all cores but the one it
    keeps for the engine core's loop. This process (an online replica: HTTP, guards, audit) is
    moved off the worker's cores, onto the engine core's, every thread of it (threads started
    later inherit it), so that it no longer takes the model's cores from it (measured: 45.5 ->
    62.7 req/s on 2 cores, docs/performance.md). Returns the worker's cores (empty: nothing moved,
    e.g. no bound worker found, or it has every core)."""
    import psutil

    try:
        workers = [c for c in psutil.Process().children(recursive=True) if c.name().startswith("VLLM::Worker")]
        cores = set().union(*(c.cpu_affinity() for c in workers)) if workers else set()
        rest = set(os.sched_getaffinity(0)) - cores
    except (psutil.Error, OSError, AttributeError):  # AttributeError: no affinity on this platform
        return set()
    if not cores or not rest:
        return set()
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), rest)
        except OSError:  # a thread that ended meanwhile
            pass
    log.info("engine worker on cores %s; this process's threads on %s", sorted(cores), sorted(rest))
    return cores


def completion_counts(table: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    return {
        "rows": table.num_rows,
        "prompt_tokens": pc.sum(table.column("prompt_tokens")).as_py() or 0,
        "completion_tokens": pc.sum(table.column("completion_tokens")).as_py() or 0,
    }


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
