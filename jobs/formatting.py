"""How the CLI's tables and the report page write a value: one formatter, a precision per caller."""

from __future__ import annotations

from datetime import datetime, timezone


def format_value(value, *, decimals: int = 1, none: str = "-") -> str:
    """None -> `none`; bools yes/no; thousands separators; floats to `decimals` places; datetimes in UTC."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{decimals}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)
