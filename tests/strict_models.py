"""A strict pydantic output model for tests/test_validation.py (imported by path, as a spec names it)."""

from __future__ import annotations

import datetime
import enum
import uuid

from pydantic import BaseModel, ConfigDict


class Category(enum.Enum):
    billing = "billing"
    other = "other"


class StrictTicket(BaseModel):
    model_config = ConfigDict(strict=True)

    category: Category
    due: datetime.date
    ref: uuid.UUID
    span: tuple[int, int]
    score: float
