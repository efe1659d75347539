"""Idempotency-Key claims shared by the replicas of one online endpoint (serve.max_replicas > 1).

    shared_claims(app, keep)        -> the application's IdempotencyClaims actor (created on first use)
    IdempotencyClaims               the Ray actor around compute/idempotency.py's KeyClaims (claim,
                                    renew, finish: the logic and its answers are documented there)

A request with a key asks before it runs, so a second request with the same key on another
replica waits for the first one's answer instead of running (and writing its row) again. The
holder renews its claim while it runs; a claim lapses only when renewals stop (its replica died),
and the next request with the key runs it then. Answers of the last `keep` keys stay here; older
ones, and all of them after this actor restarts, are found in the audit tables (jobs/serve.py looks
there first). One replica's own duplicates never get here (it shares one run among them first).
"""

from __future__ import annotations

import ray

from actors.remote import app_actor
from compute.idempotency import AFTER_ANOTHER, BUSY, Answer, KeyClaims

__all__ = ["AFTER_ANOTHER", "BUSY", "IdempotencyClaims", "shared_claims"]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=2)
class IdempotencyClaims:
    def __init__(self, keep: int):
        self._claims = KeyClaims(keep)

    async def claim(self, key: int, holder: str, lease_s: float, wait_s: float) -> Answer | str | None:
        return await self._claims.claim(key, holder, lease_s, wait_s)

    async def renew(self, key: int, holder: str, lease_s: float) -> bool:
        return self._claims.renew(key, holder, lease_s)

    async def configure(self, keep: int) -> None:
        """A redeploy with another serve.idempotency_cache: the answers kept follow it (the newest stay)."""
        self._claims.configure(keep)

    async def finish(self, key: int, holder: str, answer: Answer | None) -> None:
        self._claims.finish(key, holder, answer)


def shared_claims(app: str, keep: int):
    """The application's claims actor, told this deployment's `keep` (it outlives redeploys)."""
    handle = app_actor(IdempotencyClaims, "idempotency-claims", app, keep)
    ray.get(handle.configure.remote(keep))
    return handle
