"""serve.limits shared by every replica of one online endpoint (serve.limits.scope: application).

    shared_limits(app, spec)       -> the application's SharedTenantLimits actor (created on first use)
    delete_shared_limits(app)      kill it (`tidegate serve stop`, the end of `tidegate serve`)
    SharedTenantLimits
      admit(tenant, tokens)        -> None, or (message, retry_after_s) when the budget is spent
      spend(tenant, tokens)        charge what a request used

The buckets are compute/limits.py's; this actor only puts them where every replica sees them, so a
tenant's budget is the application's whatever the replica count. One named, detached actor per
application, found by name: a replica that starts or restarts finds the existing one; if the actor
itself dies, Ray restarts it with full buckets (a budget is at most refilled, never lost work).
Each admit is one actor call (1-3 ms here, bench/limiter.py); the actor runs calls one at a time,
so it is the ceiling for a whole application's request rate (docs/serving.md).
"""

from __future__ import annotations

import ray

from compute.limits import TenantLimits
from schemas.errors import LimitExceededError
from schemas.spec import ServeLimitsSpec

NAMESPACE = "tidegate"


def limiter_name(app: str) -> str:
    return f"tidegate-limits:{app}"


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
    handle = SharedTenantLimits.options(
        name=limiter_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(spec)
    ray.get(handle.configure.remote(spec))
    return handle


def delete_shared_limits(app: str) -> bool:
    """Kill the application's limiter; False if it has none (no limits, or scope replica)."""
    try:
        handle = ray.get_actor(limiter_name(app), namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True
