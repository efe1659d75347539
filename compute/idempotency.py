"""The answers kept for Idempotency-Keys, held by a replica (jobs/serve.py) and, with several
replicas, the claims on keys in flight, held by the application's claims actor (actors/idempotency.py).

    RecentAnswers(keep)
      get(key)              -> the answer (status code, body, fingerprint), or None
      put(key, answer)      the first answer of a key stays; past `keep` keys the oldest is dropped
                            (keep 0: none is kept, the audit tables answer)
    KeyClaims(keep)                          (asyncio; the actor's state and logic)
      claim(key, holder, lease_s, wait_s)   -> None: the caller holds the key and runs the request;
                                              AFTER_ANOTHER: it holds the key, given up by a holder
                                              that finished with no answer kept here: look in the
                                              audit tables before running; BUSY: another holder
                                              still runs it after wait_s; else the first answer
      renew(key, holder, lease_s) -> bool    the holder is alive: its claim runs lease_s from now
                                              (False: it lapsed and is another's now)
      finish(key, holder, answer)            the holder's answer; None when it failed on our side

    request_fingerprint(tenant, route, key, body, ignore=()) -> str
                                              the body's keyed hash, kept with its answer (the
                                              audit rows' request_fingerprint): the key sent
                                              again with another body is refused (jobs/serve.py)

Keys are request offsets (compute/online.py request_offset), so no key text is held. An answer is
(status code, body, request fingerprint or None); an older replica's is (status code, body). Plain
Python.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field


Answer = tuple  # (status code, body, request fingerprint or None); an older replica's: (status code, body)


def request_fingerprint(tenant: str, route: str, key: str, body: bytes, ignore: tuple[str, ...] = ()) -> str:
    """A keyed hash of a request's body: HMAC-SHA256 keyed by (tenant, route, Idempotency-Key),
    128 bits as hex. A JSON body is hashed in a canonical form (keys sorted, no spaces), so a
    client that serialises the same request again differently is not refused; anything else as
    its bytes. `ignore`: top-level keys of a JSON object left out (how the answer is sent, not
    what is asked: an OpenAI request's `stream`).

    The audit stores it only encrypted, under the tenant's key (schemas/records.py
    SEALED_AUDIT_COLUMNS; null where the spec has no keys): keyed only by what the client sends,
    the hash would let whoever guesses the key (an event id used as the key, say) confirm a
    guessed body."""
    canonical = body
    try:
        parsed = json.loads(body)
        if ignore and isinstance(parsed, dict):
            parsed = {k: v for k, v in parsed.items() if k not in ignore}
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        pass  # not JSON: its bytes
    secret = hashlib.sha256("\x1f".join(("tidegate/request-fingerprint/v1", tenant, route, key)).encode()).digest()
    return hmac.new(secret, canonical, hashlib.sha256).hexdigest()[:32]


def fingerprint_of(answer: Answer) -> str | None:
    """The request fingerprint an answer was kept with (None: an older replica's, or no key)."""
    return answer[2] if len(answer) > 2 else None


class RecentAnswers:
    def __init__(self, keep: int):
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, not {keep}")
        self.keep = keep
        self._answers: OrderedDict[int, Answer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def items(self) -> list[tuple[int, Answer]]:
        """(key, answer), oldest first."""
        return list(self._answers.items())

    def get(self, key: int) -> Answer | None:
        return self._answers.get(key)

    def put(self, key: int, answer: Answer) -> None:
        if key in self._answers:
            return  # the first answer is the answer
        self._answers[key] = answer
        while len(self._answers) > self.keep:
            self._answers.popitem(last=False)


# KeyClaims.claim's answers besides a first answer and None:
AFTER_ANOTHER = "after_another"  # the key is the caller's now; the holder before may have stored its rows
BUSY = "busy"  # another holder, alive (renewing), still runs the request after the caller's wait_s


@dataclass
class _Claim:
    holder: str
    expires: float
    done: asyncio.Event = field(default_factory=asyncio.Event)


class KeyClaims:
    """Who runs each key's request now. A holder renews its claim while it runs (its work can
    outlast any fixed lease: a store that hangs, an audit write the answer gave up on), so a claim
    lapses only when its holder stopped renewing, i.e. its replica died. A second request waits for
    the holder's answer at most wait_s, then is told BUSY (the endpoint answers 409, as the IETF
    Idempotency-Key draft does for a key whose first request is still in progress)."""

    def __init__(self, keep: int):
        self.answers = RecentAnswers(keep)
        self._claims: dict[int, _Claim] = {}

    def configure(self, keep: int) -> None:
        """Another `keep` (a redeploy's serve.idempotency_cache): the newest answers stay."""
        if keep != self.answers.keep:
            kept, self.answers = self.answers, RecentAnswers(keep)
            for key, answer in kept.items():
                self.answers.put(key, answer)

    async def claim(self, key: int, holder: str, lease_s: float, wait_s: float) -> Answer | str | None:
        waited = False
        give_up = time.monotonic() + wait_s
        while True:
            answer = self.answers.get(key)
            if answer is not None:
                return answer
            now = time.monotonic()
            c = self._claims.get(key)
            if c is None or c.expires <= now or c.holder == holder:
                self._claims[key] = _Claim(holder, now + lease_s)
                # The holder before may have stored its rows and answered, its answer not kept
                # here: the caller must not run the request before it looked in the tables again.
                return AFTER_ANOTHER if waited else None
            if now >= give_up:
                return BUSY
            waited = True
            try:  # the first request is running: wait for its answer, its lease to lapse, or wait_s
                await asyncio.wait_for(c.done.wait(), min(c.expires, give_up) - now)
            except asyncio.TimeoutError:
                pass

    def renew(self, key: int, holder: str, lease_s: float) -> bool:
        c = self._claims.get(key)
        if c is None or c.holder != holder:
            return False
        # Waiters time their waits by the old expiry: they wake, see the claim alive, and wait again.
        c.expires = max(c.expires, time.monotonic() + lease_s)
        return True

    def finish(self, key: int, holder: str, answer: Answer | None) -> None:
        if answer is not None:
            self.answers.put(key, answer)
        c = self._claims.get(key)
        if c is not None and c.holder == holder:
            del self._claims[key]
            c.done.set()
