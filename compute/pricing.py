"""What a model's tokens cost (model.pricing): the cost columns of the runs table and `tidegate usage`.

A cost is priced when it is incurred (the runs-table row records the price of its day, and its
currency); `tidegate usage` prices token counts that have no recorded cost (rows written before
`model.pricing` was set, result rows per tenant) with the spec's current prices.
"""

from __future__ import annotations

from schemas.spec import PricingSpec


def token_cost(pricing: PricingSpec | None, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    """The price of these tokens, or None without pricing.

    >>> token_cost(PricingSpec(prompt_per_1k=0.5, completion_per_1k=1.5), 2000, 1000)
    2.5
    """
    if pricing is None:
        return None
    return round((prompt_tokens or 0) / 1000 * pricing.prompt_per_1k
                 + (completion_tokens or 0) / 1000 * pricing.completion_per_1k, 10)  # fmt: skip


def cost_fields(pricing: PricingSpec | None, prompt_tokens: int | None, completion_tokens: int | None) -> dict:
    """{"cost", "currency"} of a runs-table row (both None without pricing)."""
    return {
        "cost": token_cost(pricing, prompt_tokens, completion_tokens),
        "currency": pricing.currency if pricing is not None else None,
    }
