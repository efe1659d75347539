"""Example output schemas for `output.schema` (import path `schemas.examples:<Class>`).

A job's own schemas live in the user's package, shipped with the job's working_dir; these are
the ones the README, the demo and the tests use.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TicketTriage(BaseModel):
    """Triage of a support ticket."""

    category: Literal["billing", "shipping", "account", "technical", "other"]
    priority: int = Field(ge=1, le=5, description="1 = lowest, 5 = most urgent")
    summary: str = Field(max_length=200)
