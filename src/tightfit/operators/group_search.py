"""Finding the members of a set that fail a check, by halving (group testing)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def failing_members(items: Sequence[str], works: Callable[[list[str]], bool]) -> list[str]:
    """The items of ``items`` that make ``works`` fail, checking halves of a failing set: when few
    fail, most of the set is cleared in a few checks (each check here prunes a copy of a model)."""
    items = list(items)
    if not items or works(items):
        return []
    if len(items) == 1:
        return items
    half = len(items) // 2
    return failing_members(items[:half], works) + failing_members(items[half:], works)
