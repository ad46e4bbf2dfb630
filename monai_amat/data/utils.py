"""Data helpers shared by every data set."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_amat.utils import _umask, read_json, write_json

EMBEDDED_MARKER = "embedded.json"

__all__ = [
    "data_root",
    "EMBEDDED_MARKER",
    "add_sample_index",
    "embedded_meta",
    "find_nested_root",
    "generate_once",
    "move_into_place",
    "smooth_noise",
]


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

    A concurrent writer (e.g. another rank) that got there first with the same set wins, and its set is left in
    place (another rank may be reading it); the caller removes ``tmp``.

    Args:
        tmp: the complete new folder, beside ``out_dir``.
        out_dir: its final place.
        is_same: tells whether ``out_dir`` now holds the very set ``tmp`` holds.

    Raises:
        OSError: when the rename fails for another reason.
    """
    os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would make it, not mkdtemp's 0700
    if out_dir.exists():
        if is_same():  # checked here, just before replacing: another rank may have just put the same set in place
            return
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


def embedded_meta(out_dir: str | os.PathLike, generator: str) -> dict | None:
    """The marker (``embedded.json``) of a generated set in ``out_dir``, or None when it holds none from ``generator``.

    Args:
        out_dir: the data set folder.
        generator: the generating function's dotted name, as recorded in the marker.

    Returns:
        The recorded parameters, or None.
    """
    marker = Path(out_dir) / EMBEDDED_MARKER
    if not marker.is_file():
        return None
    try:
        meta = read_json(marker)
    except ValueError:
        return None
    return meta if meta.get("generator") == generator else None


def generate_once(out_dir: str | os.PathLike, meta: dict, write: Callable[[Path], None]) -> Path:
    """Generate a synthetic data set into ``out_dir`` unless it already holds the very same one.

    ``write`` fills a temporary folder beside ``out_dir``; the marker ``embedded.json`` (``meta``) is added and the
    folder renamed into place, so a killed run never leaves half a data set. An older set from the same generator is
    replaced; any other folder is left alone.

    Args:
        out_dir: the data set folder.
        meta: the generation parameters, with ``"generator"`` (the generating function's dotted name).
        write: writes the data set into the folder it is given.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: when ``out_dir`` exists and is not a set from this generator.
    """
    out_dir = Path(out_dir)
    found = embedded_meta(out_dir, meta["generator"])
    if found == meta:
        return out_dir
    if out_dir.exists() and found is None:
        raise FileExistsError(
            f"{out_dir} exists and is not a synthetic set from {meta['generator']}; not replacing it."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        write(tmp)
        write_json(tmp / EMBEDDED_MARKER, meta)
        move_into_place(tmp, out_dir, lambda: embedded_meta(out_dir, meta["generator"]) == meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def find_nested_root(dataset_dir: str | os.PathLike, marker: str, name: str, sources: str) -> Path:
    """The folder holding the sub-folder ``marker``: ``dataset_dir`` itself or one of its sub-folders.

    Mirrors of public data sets often nest them one level deeper. Hidden folders are skipped.

    Args:
        dataset_dir: the data set folder, or the folder holding it.
        marker: the sub-folder that marks the data set root, e.g. ``"RawImage"``.
        name: the data set's name, for messages.
        sources: where to get the data, for the error message.

    Returns:
        The absolute data set root.

    Raises:
        FileNotFoundError: when neither ``dataset_dir/marker`` nor ``dataset_dir/*/marker`` exists; the message
            lists what was looked for and where to get the data.
        ValueError: when several sub-folders hold a ``marker``.
    """
    root = Path(dataset_dir).absolute()
    if (root / marker).is_dir():
        return root
    nested = (
        sorted(p.parent for p in root.glob(f"*/{marker}") if p.is_dir() and not p.parent.name.startswith("."))
        if root.is_dir()
        else []
    )
    if len(nested) > 1:
        raise ValueError(f"{root} holds several {name} data sets {[str(p) for p in nested]}; pass one of them.")
    if nested:
        return nested[0]
    state = "" if root.is_dir() else " (the folder does not exist)"
    raise FileNotFoundError(
        f"no {name} data set found in {root}{state}: looked for {root / marker} and {root / '*' / marker}. "
        f"Get {sources}."
    )


def data_root(
    data_source: str,
    dataset_dir: str | os.PathLike | None,
    embedded_dir: str | os.PathLike | None,
    make_embedded: Callable[[str | os.PathLike], Path],
    holds: str,
) -> str | os.PathLike:
    """The folder a bundle reads: the embedded set, generated once into ``embedded_dir``, or ``dataset_dir``.

    Args:
        data_source: ``"embedded"`` or ``"real"``.
        dataset_dir: the real data set folder.
        embedded_dir: where the embedded set is generated.
        make_embedded: generates the embedded set into a folder and returns its root.
        holds: how to describe the real folder in errors, e.g. ``"the BCCD folder holding JPEGImages/"``.

    Returns:
        The data set root.

    Raises:
        ValueError: for an unknown ``data_source`` or a missing folder argument.
    """
    if data_source == "embedded":
        if embedded_dir is None:
            raise ValueError("data_source 'embedded' needs embedded_dir.")
        return make_embedded(embedded_dir)
    if data_source == "real":
        if not dataset_dir:
            raise ValueError(f"data_source 'real' needs dataset_dir: {holds}.")
        return dataset_dir
    raise ValueError(f"data_source must be 'embedded' or 'real', got {data_source!r}.")


def split_by_position(items: Sequence[Any], fraction: float = 0.2) -> dict[str, list]:
    """A small set's split by position.

    The last ``max(1, round(fraction * n))`` items are the test set, as many before them the validation set, the rest
    the training set (12 items: 8 / 2 / 2; 3 items: 1 / 1 / 1). With 2 items: train 1, test 1; with 1 item: train 1.
    Shuffle the items first for a random split.

    Args:
        items: the items, in the order to cut.
        fraction: the share of each held-out set.

    Returns:
        ``{"train", "val", "test"}``: consecutive, disjoint lists covering ``items``.
    """
    n = len(items)
    num_held = max(1, round(fraction * n)) if n >= 3 else 0
    num_test = num_held if n >= 3 else max(n - 1, 0)
    cut = n - num_held - num_test
    items = list(items)
    return {"train": items[:cut], "val": items[cut : cut + num_held], "test": items[cut + num_held :]}
