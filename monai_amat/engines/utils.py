"""Deprecated: the engines' keys and events moved to :py:mod:`monai_amat.keys` (``AttackKeys``, ``AttackEvents``)."""

from __future__ import annotations

import warnings
from typing import Any

from monai_amat.keys import AttackEvents, AttackKeys

_RENAMED = {"AdversarialEvents": AttackEvents, "AdversarialKeys": AttackKeys}


def deprecated_name(module: str, name: str) -> Any:
    """The new object behind an old public name, with a ``FutureWarning``.

    Args:
        module: the module the old name was imported from, for the message.
        name: the old name.

    Returns:
        The object now named in :py:mod:`monai_amat.keys`.

    Raises:
        AttributeError: when ``name`` is not an old name.
    """
    if name not in _RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = _RENAMED[name]
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed in the next release: use monai_amat.keys.{new.__name__} "
        f"(renamed to keep it apart from monai.utils.{name}).",
        FutureWarning,
        stacklevel=3,
    )
    return new


def __getattr__(name: str) -> Any:
    return deprecated_name(__name__, name)
