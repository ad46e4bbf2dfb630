"""What the comparison's stages, report and command line share: its errors, value parsing, records."""

from __future__ import annotations

import argparse
import ast
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class CompareError(ValueError):
    """A bad argument or a conflict with an earlier comparison in the same output folder.

    Args:
        message: what is wrong.
        argument: the command-line argument at fault (e.g. ``"--sat_eps"``), if any.
    """

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(f"argument {argument}: {message}" if argument else message)
        self.argument = argument


def say(message: str) -> None:
    """Print a line of the runner's progress.

    Args:
        message: the line, shown after ``[compare]``.
    """
    print(f"[compare] {message}", flush=True)


def eps_label(eps: float) -> str:
    """A noise level as the run folders and tables name it (``5.0`` -> ``"5"``).

    Args:
        eps: the level.

    Returns:
        Its shortest form.
    """
    return f"{float(eps):g}"


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so recorded settings compare equal."""
    return json.loads(json.dumps(value))


def literal(text: str) -> Any:
    """A command-line value: a Python literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_sat_eps(text: str | float | Sequence[float]) -> list[float]:
    """The SAT noise levels of ``--sat_eps``: a number or a list of numbers, each finite and >= 0, no repeats.

    Args:
        text: e.g. ``"[1, 5, 10]"``, ``"5"``, or already a number or list.

    Returns:
        The levels, ascending.

    Raises:
        argparse.ArgumentTypeError: when the value is not such a list.
    """
    value = literal(text) if isinstance(text, str) else text
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    example = 'expected a number or a list of numbers >= 0, e.g. "[1, 5, 10]"'
    if not isinstance(values, (list, tuple)) or not values:
        raise argparse.ArgumentTypeError(f"{example}; got {text!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{example}; got {text!r} (bad value {v!r})")
    labels = [eps_label(v) for v in values]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"repeated level in {text!r}")
    return sorted(float(v) for v in values)


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """The seeds of ``--seeds``: a list of distinct integers >= 0.

    Args:
        text: e.g. ``"[0, 1, 2]"``, or already a list.

    Returns:
        The seeds, in the given order.

    Raises:
        argparse.ArgumentTypeError: when the value is not such a list.
    """
    value = literal(text) if isinstance(text, str) else text
    example = 'expected a list of distinct integers >= 0, e.g. "[0, 1, 2]"'
    if not isinstance(value, (list, tuple)) or not value:
        raise argparse.ArgumentTypeError(f"{example}; got {text!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise argparse.ArgumentTypeError(f"{example}; got {text!r} (bad value {v!r})")
    if len(set(value)) != len(value):
        raise argparse.ArgumentTypeError(f"{example}; got {text!r} (repeated seed)")
    return list(value)


def read_record(path: Path) -> dict[str, Any] | None:
    """A stage's record (``compare_*.json``).

    Args:
        path: the record file.

    Returns:
        Its content; None when it is missing or unreadable (the stage then counts as not finished).
    """
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
