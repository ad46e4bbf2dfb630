"""ISBI 2015 cephalometric landmark data (400 lateral cephalograms, 19 landmarks, two doctors' annotations).

Reading the real layout into a datalist, the paper's split and a small synthetic stand-in in the real layout.
Landmarks are ``(x, y)`` = (column, row) pixels; images are 8-bit grayscale BMP with 0.1 mm pixels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monai_amat.data.utils import embedded_meta, find_nested_root, split_by_position

__all__ = [
    "NUM_LANDMARKS",
    "PIXEL_SPACING_MM",
    "ISBI2015_SOURCES",
    "find_isbi2015_root",
    "read_annotation",
    "read_isbi2015_image",
    "isbi2015_datalist",
    "isbi2015_split",
]

NUM_LANDMARKS = 19
"""Landmarks per cephalogram."""

PIXEL_SPACING_MM = 0.1
"""Pixel size of the real images, in mm."""

ISBI2015_SOURCES = (
    "the ISBI 2015 Grand Challenge in cephalometric landmark detection data set (RawImage/, 400_senior/, "
    "400_junior/), available from https://figshare.com/s/37ec464af8e81ae6ebbf and the challenge site "
    "http://www-o.ntust.edu.tw/~cweiwang/ISBI2015/challenge1/; for a small synthetic stand-in in the same layout, "
    "run monai_amat.data.synthetic.make_embedded_isbi2015(root_dir)"
)
"""Where to get the data, as said in "data not found" errors."""

_DOCTORS = ("senior", "junior")

_IMAGE_SUBDIRS = ("TrainingData", "Test1Data", "Test2Data")
_SPLIT_RANGES = {"train": (1, 150), "val": (151, 200), "test": (201, 300)}
_MAX_ID = 400
_EMBEDDED_NAME = "ISBI2015"
_EMBEDDED_GENERATOR = "monai_amat.data.make_embedded_isbi2015"
_MIN_SIZE = 32


def _image_subdir(case_id: int) -> str:
    """The ``RawImage`` subfolder of a case in the real layout."""
    return _IMAGE_SUBDIRS[0] if case_id <= 150 else _IMAGE_SUBDIRS[1] if case_id <= 300 else _IMAGE_SUBDIRS[2]


def find_isbi2015_root(dataset_dir: str | os.PathLike) -> Path:
    """The folder holding ``RawImage/``: ``dataset_dir`` itself or one of its subfolders (a mirror nested one deeper).

    Args:
        dataset_dir: the data set folder, or the folder holding it.

    Returns:
        The absolute data set root.

    Raises:
        FileNotFoundError: when neither ``dataset_dir/RawImage`` nor ``dataset_dir/*/RawImage`` exists; the message
            lists what was looked for and where to get the data.
        ValueError: when several subfolders of ``dataset_dir`` hold a ``RawImage/``.
    """
    return find_nested_root(dataset_dir, "RawImage", "ISBI 2015", ISBI2015_SOURCES)


def read_annotation(path: str | os.PathLike, num_landmarks: int = NUM_LANDMARKS) -> np.ndarray:
    """Read one doctor's annotation file: the first ``num_landmarks`` lines are ``x,y`` pixels; later lines are ignored.

    Spaces around the comma, Windows line ends and a byte-order mark are tolerated.

    Args:
        path: the ``NNN.txt`` file.
        num_landmarks: the number of landmark lines.

    Returns:
        ``(num_landmarks, 2)`` float64 x, y in pixels.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file holds fewer than ``num_landmarks`` lines (the message gives the count), or one of
            the first ``num_landmarks`` lines is not two finite numbers separated by a comma (the message gives the
            line number and text).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file.")
    lines = path.read_text(encoding="utf-8-sig", errors="replace").rstrip().splitlines()
    if len(lines) < num_landmarks:
        raise ValueError(f"{path}: holds {len(lines)} point line(s), fewer than the {num_landmarks} landmarks needed.")
    points = np.empty((num_landmarks, 2))
    for i, line in enumerate(lines[:num_landmarks]):
        parts = line.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            points[i] = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{path}, line {i + 1}: expected 'x,y' in pixels, got {line.strip()!r}.") from None
        if not np.isfinite(points[i]).all():
            raise ValueError(f"{path}, line {i + 1}: expected finite 'x,y' in pixels, got {line.strip()!r}.")
    return points


def read_isbi2015_image(path: str | os.PathLike) -> np.ndarray:
    """Read a cephalogram as a 2D 8-bit grayscale array.

    Accepts 8-bit grayscale BMP (the real data) and 24-bit RGB BMP with equal channels (as some mirrors store them);
    other colour images are converted to grayscale with Pillow's ``convert("L")``.

    Args:
        path: the image file.

    Returns:
        ``(height, width)`` uint8.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when Pillow cannot read the file as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file.")
    try:
        with Image.open(path) as image:
            return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}).") from e


def _check_inside(landmarks: np.ndarray, shape: tuple[int, ...], files: Sequence[Path]) -> None:
    """Refuse landmarks outside the image (``shape`` = ``(height, width)``), naming the annotation files."""
    height, width = shape[:2]
    outside = np.flatnonzero(
        (landmarks[:, 0] < 0) | (landmarks[:, 0] > width) | (landmarks[:, 1] < 0) | (landmarks[:, 1] > height)
    )
    if outside.size:
        points = [tuple(round(float(v), 1) for v in landmarks[i]) for i in outside]
        raise ValueError(
            f"{', '.join(map(str, files))}: landmark(s) {[int(i) + 1 for i in outside]} at {points} lie outside the "
            f"{width} x {height} image."
        )


def _annotation_dir(root: Path, doctor: str) -> tuple[Path | None, list[Path]]:
    """A doctor's annotation folder (``400_<doctor>`` or ``AnnotationsByMD/400_<doctor>``), and the paths tried."""
    tried = [root / f"400_{doctor}", root / "AnnotationsByMD" / f"400_{doctor}"]
    return next((p for p in tried if p.is_dir()), None), tried


def _default_ids(root: Path) -> list[int]:
    """All 400 ids, or the ids of a synthetic set from :py:func:`make_embedded_isbi2015`."""
    meta = embedded_meta(root, _EMBEDDED_GENERATOR)
    if meta is not None and isinstance(meta.get("ids"), list):
        return [int(i) for i in meta["ids"]]
    return list(range(1, _MAX_ID + 1))


def _find_image(root: Path, case_id: int) -> Path | None:
    """The image of a case: in its real-layout subfolder, else in another ``RawImage`` subfolder."""
    expected = _image_subdir(case_id)
    for subdir in (expected, *(s for s in _IMAGE_SUBDIRS if s != expected)):
        path = root / "RawImage" / subdir / f"{case_id:03d}.bmp"
        if path.is_file():
            return path
    return None


def isbi2015_datalist(
    dataset_dir: str | os.PathLike, ids: Iterable[int] | None = None, use_doctors: str = "both"
) -> list[dict[str, Any]]:
    """The ISBI 2015 cases as a MONAI-style datalist, with the doctors' landmarks.

    Both the real layout (``RawImage/TrainingData/001.bmp``, ..., ``400_senior/001.txt``, ``400_junior/001.txt``)
    and its variants (annotations under ``AnnotationsByMD/``, the data set nested one folder deeper) are read.
    An image is looked for in its real-layout ``RawImage`` subfolder first (ids 1-150 ``TrainingData``, 151-300
    ``Test1Data``, above ``Test2Data``), then in the other two.

    Args:
        dataset_dir: the data set folder (see :py:func:`find_isbi2015_root`).
        ids: the case ids to list, in that order; defaults to all 400 ids (for a synthetic set made by
            :py:func:`make_embedded_isbi2015`: the ids it holds).
        use_doctors: ``"both"`` (the ground truth is the mean of the two doctors' points), ``"senior"`` or
            ``"junior"`` (that doctor's points; only that doctor's files are needed).

    Returns:
        One dict per id: ``{"image": absolute path of the BMP, "landmarks": (19, 2) float32 x, y pixels, "id": int,
        "spacing": PIXEL_SPACING_MM}``.

    Raises:
        ValueError: when ``use_doctors`` is not one of the three choices, an id is not a positive integer or repeats,
            an annotation file is malformed (see :py:func:`read_annotation`), an image cannot be read (a truncated
            BMP: every image is decoded once here), or a landmark lies outside its image.
        FileNotFoundError: when the data set is not found, or images or annotation files (or a doctor's whole
            annotation folder) are missing: the message lists all of them and, with ``use_doctors="both"`` and
            missing annotations, says how to use one doctor only.
    """
    if use_doctors not in ("both", *_DOCTORS):
        raise ValueError(f"use_doctors must be 'both', 'senior' or 'junior', got {use_doctors!r}.")
    root = find_isbi2015_root(dataset_dir)
    ids = _default_ids(root) if ids is None else [int(i) for i in ids]
    if any(i < 1 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"ids must be distinct positive integers, got {ids}.")
    doctors = _DOCTORS if use_doctors == "both" else (use_doctors,)
    if use_doctors != "both":
        warnings.warn(
            f"ISBI 2015: using the {use_doctors} doctor's landmarks only; the paper's ground truth is the mean of "
            "both doctors.",
            stacklevel=2,
        )
    missing, annotations_missing = [], False
    folders = {}
    for doctor in doctors:
        folder, tried = _annotation_dir(root, doctor)
        if folder is None:
            missing.append(f"{tried[0]}/ (the {doctor} doctor's annotation folder; also looked for {tried[1]}/)")
            annotations_missing = True
        folders[doctor] = folder
    items = []
    for case_id in ids:
        image = _find_image(root, case_id)
        if image is None:
            missing.append(str(root / "RawImage" / _image_subdir(case_id) / f"{case_id:03d}.bmp"))
        files = [folders[d] / f"{case_id:03d}.txt" for d in doctors if folders[d] is not None]
        absent = [str(f) for f in files if not f.is_file()]
        missing += absent
        annotations_missing |= bool(absent)
        if image is None or absent or len(files) < len(doctors):
            continue
        landmarks = np.mean([read_annotation(f) for f in files], axis=0).astype(np.float32)
        _check_inside(landmarks, read_isbi2015_image(image).shape, files)
        items.append({"image": str(image), "landmarks": landmarks, "id": case_id, "spacing": PIXEL_SPACING_MM})
    if missing:
        listed = "\n  ".join(missing)
        hint = ""
        if annotations_missing and use_doctors == "both":
            hint = "\nTo use one doctor's annotations only, set use_doctors='senior' or use_doctors='junior'."
        raise FileNotFoundError(f"ISBI 2015 data set {root}: {len(missing)} missing file(s):\n  {listed}{hint}")
    return items


def isbi2015_split(datalist: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The paper's split by case id: train 1-150, validation 151-200, test 201-300 (ids above 300 go nowhere).

    When one of the three ranges holds no item (e.g. a small synthetic set), a warning is issued and the items are
    split by position instead: the last ``max(1, round(0.2 * n))`` items are the test set, the ones before them
    (as many) the validation set, the rest the training set (12 items: 8 / 2 / 2; 3 items: 1 / 1 / 1). With 2 items:
    train 1, test 1; with 1 item: train 1.

    Args:
        datalist: items with an integer ``"id"``, as from :py:func:`isbi2015_datalist`.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` holding the items themselves.

    Raises:
        ValueError: when ``datalist`` is empty or an item has no ``"id"``.
    """
    if not datalist:
        raise ValueError("isbi2015_split: no items to split.")
    for i, item in enumerate(datalist):
        if "id" not in item:
            raise ValueError(f"isbi2015_split: item {i} has no 'id' (keys: {sorted(item)}).")
    split = {
        name: [item for item in datalist if lo <= int(item["id"]) <= hi] for name, (lo, hi) in _SPLIT_RANGES.items()
    }
    if all(split.values()):
        return split
    empty = [name for name, items in split.items() if not items]
    split = split_by_position(datalist)
    warnings.warn(
        f"isbi2015_split: the paper's id ranges leave {empty} empty for these {len(datalist)} item(s); splitting by "
        f"position instead: {' / '.join(str(len(split[k])) for k in ('train', 'val', 'test'))}.",
        stacklevel=2,
    )
    return split
