"""The embedding model of semantic_grounding rules as a Ray actor beside the engines.

    start_embedding_actor(model_dir, timeout_s) -> RemoteEmbedder   texts -> unit vectors (np.ndarray)

The stage workers that run the rules call it through the picklable RemoteEmbedder; the model
itself is compute.semantic.EmbeddingWorker (a plain class, usable in-process).
"""

from __future__ import annotations

import os

import numpy as np
import ray

from compute.semantic import EMBEDDING_ENV, EmbeddingWorker
from schemas.errors import EngineError


class RemoteEmbedder:
    """The embed function of an EmbeddingWorker actor: picklable, so the stage workers that run
    the validation rules can call the one embedding actor the job started."""

    def __init__(self, actor, timeout_s: float):
        self.actor = actor
        self.timeout_s = timeout_s

    def __call__(self, texts: list[str]) -> np.ndarray:
        return ray.get(self.actor.embed.remote(texts), timeout=self.timeout_s)


def start_embedding_actor(model_dir: str | None, timeout_s: float) -> RemoteEmbedder:
    """Run an EmbeddingWorker as a Ray actor; returns its embed function (blocking, bounded)."""
    env = {k: v for k, v in os.environ.items() if k in ("VLLM_CACHE_ROOT", "VLLM_LOGGING_LEVEL")}
    env.update(EMBEDDING_ENV)
    # A small model beside the engines: a fraction of a CPU so it never blocks their placement.
    actor = (
        ray.remote(EmbeddingWorker)
        .options(num_cpus=0.25, max_restarts=-1, max_task_retries=1, runtime_env={"env_vars": env})
        .remote(model_dir)
    )
    try:
        ray.get(actor.ready.remote(), timeout=timeout_s)
    except Exception as e:
        ray.kill(actor)
        raise EngineError(f"semantic_grounding: the embedding model did not start: {e}") from None
    return RemoteEmbedder(actor, timeout_s)
