"""Idempotency-Key claims shared by the replicas of one online endpoint (serve.max_replicas > 1).

    shared_claims(app, keep)        -> the application's IdempotencyClaims actor (created on first use)
    IdempotencyClaims
      claim(key, holder, lease_s)   -> None: the caller holds the key and runs the request;
                                       AFTER_ANOTHER: it holds the key, given up by a holder that
                                       finished with no answer kept here (keep 0, dropped, or it
                                       failed): look in the audit tables before running;
                                       else the first answer, (status code, body)
      finish(key, holder, answer)   the holder's answer; None when it failed on our side (a timeout,
                                       the engine, the audit store): the next claim runs it again

A request with a key asks before it runs, so a second request with the same key on another
replica waits for the first one's answer instead of running (and writing its row) again. A claim
lapses after lease_s (its replica died mid-request): the next request with the key runs it.
Answers of the last `keep` keys stay here; older ones, and all of them after this actor restarts,
are found in the audit tables (jobs/serve.py looks there first). Keys are the 63-bit request
offsets (compute/online.py request_offset), so no key text is held. One replica's own duplicates
never get here (it shares one run among them first).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import ray

from actors.remote import app_actor
from compute.idempotency import RecentAnswers


@dataclass
class _Claim:
    holder: str
    expires: float
    done: asyncio.Event = field(default_factory=asyncio.Event)


# claim's answer when the key was held by another request that finished (or lapsed) meanwhile.
AFTER_ANOTHER = "after_another"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=2)
class IdempotencyClaims:
    def __init__(self, keep: int):
        self._answers = RecentAnswers(keep)
        self._claims: dict[int, _Claim] = {}

    async def claim(self, key: int, holder: str, lease_s: float) -> tuple[int, dict] | str | None:
        waited = False
        while True:
            answer = self._answers.get(key)
            if answer is not None:
                return answer
            now = time.monotonic()
            c = self._claims.get(key)
            if c is None or c.expires <= now or c.holder == holder:
                self._claims[key] = _Claim(holder, now + lease_s)
                # The holder before may have stored its rows and answered, its answer not kept
                # here: the caller must not run the request before it looked in the tables again.
                return AFTER_ANOTHER if waited else None
            waited = True
            try:  # the first request is running: wait for its answer (or its lease to lapse)
                await asyncio.wait_for(c.done.wait(), c.expires - now)
            except asyncio.TimeoutError:
                pass

    async def configure(self, keep: int) -> None:
        """A redeploy with another serve.idempotency_cache: the answers kept follow it (the newest stay)."""
        if keep != self._answers.keep:
            kept = self._answers
            self._answers = RecentAnswers(keep)
            for key, answer in kept.items():
                self._answers.put(key, answer)

    async def finish(self, key: int, holder: str, answer: tuple[int, dict] | None) -> None:
        if answer is not None:
            self._answers.put(key, answer)
        c = self._claims.get(key)
        if c is not None and c.holder == holder:
            del self._claims[key]
            c.done.set()


def shared_claims(app: str, keep: int):
    """The application's claims actor, told this deployment's `keep` (it outlives redeploys)."""
    handle = app_actor(IdempotencyClaims, "idempotency", app, keep)
    ray.get(handle.configure.remote(keep))
    return handle
