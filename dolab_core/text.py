"""Words for sentences users read."""

from __future__ import annotations

from typing import Any

__all__ = ["shown"]


def shown(value: Any, limit: int = 40) -> str:
    """``value`` as a refusal may quote it: its repr, cut to about ``limit`` characters (a user's megabyte
    string or 4000-digit number must not come back whole, nor break the message)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a number too long to show"
    return text if len(text) <= limit else text[:limit] + "..."
