"""Data helpers shared by every data set."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_sample_index", "move_into_place"]


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


def move_into_place(tmp: Path, out_dir: Path, is_same: Callable[[], bool]) -> None:
    """Rename a freshly written folder ``tmp`` to ``out_dir``, replacing an older generated set there.

    A concurrent writer (e.g. another rank) that got there first with the same set wins; the caller removes ``tmp``.

    Args:
        tmp: the complete new folder, beside ``out_dir``.
        out_dir: its final place.
        is_same: tells whether ``out_dir`` now holds the very set ``tmp`` holds.

    Raises:
        OSError: when the rename fails for another reason.
    """
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old)
        shutil.rmtree(old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not is_same():
            raise
