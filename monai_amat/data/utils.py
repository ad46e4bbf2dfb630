"""Data helpers shared by every data set."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_sample_index", "move_into_place", "smooth_noise"]


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


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Gaussian-smoothed white noise (periodic, via FFT), zero mean, unit standard deviation, for synthetic images.

    Args:
        rng: the random generator.
        shape: the array shape (any number of dimensions).
        sigma: the Gaussian's standard deviation, in the units of ``spacing``.
        spacing: the size of a pixel along each axis; None: 1 (``sigma`` in pixels).

    Returns:
        A float64 array of ``shape``.
    """
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    freqs = [np.fft.fftfreq(n, d=d) for n, d in zip(shape[:-1], spacing[:-1])]
    freqs.append(np.fft.rfftfreq(shape[-1], d=spacing[-1]))
    grids = np.meshgrid(*freqs, indexing="ij")
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * sum(g**2 for g in grids))
    out = np.fft.irfftn(np.fft.rfftn(rng.standard_normal(shape)) * kernel, s=shape)
    out -= out.mean()
    return out / max(float(out.std()), 1e-12)
