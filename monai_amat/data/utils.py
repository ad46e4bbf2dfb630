"""Data helpers shared by every data set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["add_sample_index"]


def add_sample_index(datalist: Sequence[Mapping[str, Any]], key: str = "index") -> list[dict[str, Any]]:
    """Give every item of a datalist a stable integer sample index ``0..N-1``, as AMAT's margins need.

    Args:
        datalist: the training items (dicts), in a fixed order.
        key: the key to add.

    Returns:
        New dicts with ``key`` set to the item's position.

    Raises:
        ValueError: when an item already has ``key`` with another value.
    """
    out = []
    for i, item in enumerate(datalist):
        if key in item and item[key] != i:
            raise ValueError(f"datalist item {i} already has {key!r} = {item[key]!r}; expected {i}.")
        out.append({**item, key: i})
    return out
