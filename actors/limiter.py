"""serve.limits shared by every replica of one online endpoint (serve.limits.scope: application).

    shared_limits(app, spec)       -> the application's SharedTenantLimits actor (created on first use)
    SharedTenantLimits
      admit(tenant, tokens)        -> None, or (message, retry_after_s) when the budget is spent
      spend(tenant, tokens)        settle a request: what it used beyond its reservation

The buckets are compute/limits.py's; this actor only puts them where every replica sees them, so a
tenant's budget is the application's whatever the replica count. One named, detached actor per
application (actors/remote.py app_actor): a replica that starts or restarts finds the existing
one; if the actor itself dies, Ray restarts it with full buckets (a budget is at most refilled).
Each admit is one actor call (1-3 ms here, bench/limiter.py); the actor runs calls one at a time,
so it is the ceiling for a whole application's request rate (docs/serving.md).
"""

from __future__ import annotations

import ray

from actors.remote import app_actor
from compute.limits import TenantLimits
from schemas.errors import LimitExceededError
from schemas.spec import ServeLimitsSpec


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=2)
class SharedTenantLimits:
    def __init__(self, spec: ServeLimitsSpec):
        self.limits = TenantLimits(spec)

    def configure(self, spec: ServeLimitsSpec) -> None:
        """A redeploy with other budgets starts them afresh; the same budgets keep the buckets."""
        if spec != self.limits.spec:
            self.limits = TenantLimits(spec)

    def admit(self, tenant: str, tokens: int) -> tuple[str, float] | None:
        try:
            self.limits.admit(tenant, tokens)
        except LimitExceededError as e:  # returned, not raised: a refusal is an answer, not a failure
            return str(e), e.retry_after_s
        return None

    def spend(self, tenant: str, tokens: int) -> None:
        self.limits.spend(tenant, tokens)


def shared_limits(app: str, spec: ServeLimitsSpec):
    """The application's limiter, created if no replica has created it yet, and set to `spec`."""
    handle = app_actor(SharedTenantLimits, "limits", app, spec)
    ray.get(handle.configure.remote(spec))
    return handle
