"""Per-tenant request and token budgets of the online endpoint (serve.limits), as token buckets.

    TenantLimits(spec.serve.limits, clock)
      admit(tenant, tokens)   before a request: raises LimitExceededError(retry_after_s) if the
                              tenant's request bucket is empty or its token bucket cannot cover
                              `tokens` (the request's prompt estimate + its max_tokens); else
                              takes one request and reserves those tokens
      spend(tenant, tokens)   after it: the tokens it used beyond its reservation (every attempt's
                              prompt + completion, minus the reservation; negative: a refund)

The reservation is what keeps concurrent requests within the budget: admitted together, each takes
its estimate before any of them has run, so 64 requests at once cannot each see the whole minute.

A bucket holds a minute's budget and refills continuously, so a tenant may burst up to its
per-minute budget and then runs at the budget's rate. One instance holds every tenant's buckets;
where it lives is serve.limits.scope (in each replica, or in the application's actor,
actors/limiter.py; docs/serving.md). Plain Python, no clock of its own (tests pass one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.errors import LimitExceededError
from schemas.spec import ServeLimitsSpec


@dataclass
class _Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60.0)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is)."""
        missing = min(amount, self.capacity) - self.level
        return max(0.0, missing * 60.0 / self.capacity)


class TenantLimits:
    def __init__(self, spec: ServeLimitsSpec, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _bucket(self, buckets: dict[str, _Bucket], tenant: str, capacity: int, now: float) -> _Bucket:
        b = buckets.get(tenant)
        if b is None:
            b = buckets[tenant] = _Bucket(float(capacity), float(capacity), now)
        b.refill(now)
        return b

    def admit(self, tenant: str, tokens: int) -> None:
        now = self.clock()
        req = tok = None
        if self.spec.requests_per_minute is not None:
            req = self._bucket(self._requests, tenant, self.spec.requests_per_minute, now)
            if req.level < 1:
                raise LimitExceededError("request budget (serve.limits.requests_per_minute) spent", req.wait_for(1))
        if self.spec.tokens_per_minute is not None:
            tok = self._bucket(self._tokens, tenant, self.spec.tokens_per_minute, now)
            if tok.level < min(tokens, tok.capacity):
                raise LimitExceededError("token budget (serve.limits.tokens_per_minute) spent", tok.wait_for(tokens))
        if req is not None:
            req.level -= 1
        if tok is not None:
            tok.level -= tokens

    def spend(self, tenant: str, tokens: int) -> None:
        """Charge what a request used beyond its reservation (negative: give back what it did not
        use). The bucket may go below zero (the next requests wait); never above its capacity."""
        if self.spec.tokens_per_minute is not None and tokens:
            b = self._bucket(self._tokens, tenant, self.spec.tokens_per_minute, self.clock())
            b.level = min(b.capacity, b.level - tokens)
