"""BCCD blood cell detection data (364 light-microscopy images of 640 x 480, boxes of RBC, WBC and Platelets).

Reading the real Pascal VOC layout into a datalist and a small synthetic stand-in in the same layout.
Boxes are ``(xmin, ymin, xmax, ymax)`` in pixels, as written in the VOC XML files.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monai_amat.data.utils import find_nested_root

__all__ = [
    "BCCD_CLASSES",
    "BCCD_SOURCES",
    "BCCD_SPLITS",
    "find_bccd_root",
    "read_voc_annotation",
    "bccd_datalist",
]

BCCD_CLASSES = ("RBC", "WBC", "Platelets")
"""The class names of the VOC files, in label order (RBC 0, WBC 1, Platelets 2)."""

BCCD_SOURCES = (
    "the BCCD blood cell detection data set (Pascal VOC layout: JPEGImages/, Annotations/, ImageSets/Main/), "
    "available from https://github.com/Shenggan/BCCD_Dataset (MIT licence; the data set is its BCCD/ folder); "
    "for a small synthetic stand-in in the same layout, run monai_amat.data.synthetic.make_embedded_bccd(root_dir)"
)
"""Where to get the data, as said in "data not found" errors."""

BCCD_SPLITS = ("train", "val", "test", "trainval")
"""The split files of ``ImageSets/Main``."""

_IMAGES, _ANNOTATIONS = "JPEGImages", "Annotations"
_SPLIT_DIR = Path("ImageSets") / "Main"
_EMBEDDED_NAME = "BCCD"
_EMBEDDED_GENERATOR = "monai_amat.data.make_embedded_bccd"
_MIN_SIZE = 64
_MIN_IMAGES = 3


def find_bccd_root(dataset_dir: str | os.PathLike) -> Path:
    """The folder holding ``JPEGImages/``: ``dataset_dir`` itself or one of its subfolders (a mirror nested deeper).

    Hidden subfolders (such as the temporary folders of :py:func:`make_embedded_bccd`) are not looked in.

    Args:
        dataset_dir: the data set folder, or the folder holding it (e.g. a clone of the BCCD repository).

    Returns:
        The absolute data set root.

    Raises:
        FileNotFoundError: when neither ``dataset_dir/JPEGImages`` nor ``dataset_dir/*/JPEGImages`` exists; the
            message lists what was looked for and where to get the data.
        ValueError: when several subfolders of ``dataset_dir`` hold a ``JPEGImages/``.
    """
    return find_nested_root(dataset_dir, _IMAGES, "BCCD", BCCD_SOURCES)


def _class_map(class_map: Mapping[str, int] | None) -> dict[str, int]:
    """The checked class map, defaulting to :py:data:`BCCD_CLASSES` in order."""
    if class_map is None:
        return {name: label for label, name in enumerate(BCCD_CLASSES)}
    out = {}
    for name, label in class_map.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"class_map must map class names to integer labels >= 0, got {name!r}: {label!r}.")
        out[str(name)] = int(label)
    return out


def _number(parent: ET.Element, tag: str, xml_path: Path, where: str) -> float:
    """The number in ``parent``'s child ``tag``, with an error naming the file when it is absent or not a number."""
    text = parent.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{xml_path}: {where} <{tag}> should be a number, got {text!r}.") from None
    if not np.isfinite(value):
        raise ValueError(f"{xml_path}: {where} <{tag}> should be a finite number, got {text!r}.")
    return value


def _box_text(box: np.ndarray) -> str:
    """``[xmin, ymin, xmax, ymax]`` with at most one decimal."""
    return "[" + ", ".join(f"{v:g}" for v in np.round(box, 1)) + "]"


def read_voc_annotation(
    xml_path: str | os.PathLike, images_dir: str | os.PathLike, class_map: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Read one Pascal VOC annotation file and check it against its image.

    The image is ``images_dir/<filename>`` (the file name of the XML's ``<filename>``); it is decoded once with
    Pillow (so a truncated file is named here) and its size must equal the XML's ``<size>`` (when the XML has no
    ``<size>``, or a zero one, as some VOC tools write, the image's size is used). ``<difficult>`` objects are kept.

    Boxes running past the image border are clipped to it (``[0, width] x [0, height]``) and boxes of zero or
    negative area after clipping are dropped (BCCD has such a box, in ``BloodImage_00338.xml``); each issues one
    warning naming the file and the objects.

    Args:
        xml_path: the VOC ``.xml`` file.
        images_dir: the folder holding the images (``JPEGImages``).
        class_map: class name (``<name>``, without surrounding spaces) to integer label; defaults to
            ``{"RBC": 0, "WBC": 1, "Platelets": 2}``.

    Returns:
        ``{"image": absolute image path, "boxes": (N, 4) float32 xmin, ymin, xmax, ymax in pixels,
        "labels": (N,) int64, "size": (width, height)}``.

    Raises:
        FileNotFoundError: when the XML file does not exist, or its image does not (the message names both).
        ValueError: when the XML does not parse or lacks ``<filename>``, a box coordinate or size is not a number,
            the XML's size differs from the image's (the message names both files and both sizes), the image is not
            readable, ``class_map`` holds a label that is not an integer >= 0, or an object's class is not in
            ``class_map`` (the message lists the names found in the file and says to set ``class_map``).
    """
    xml_path = Path(xml_path).absolute()
    mapping = _class_map(class_map)
    if not xml_path.is_file():
        raise FileNotFoundError(f"{xml_path}: no such annotation file.")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not a readable VOC XML annotation ({e}).") from e
    if root.tag != "annotation":
        raise ValueError(f"{xml_path}: expected a VOC <annotation> element, got <{root.tag}>.")
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        raise ValueError(f"{xml_path}: no <filename> naming its image.")
    image = Path(images_dir).absolute() / Path(filename).name
    if not image.is_file():
        raise FileNotFoundError(f"{xml_path}: its image {image} (<filename>{filename}</filename>) does not exist.")
    try:
        with Image.open(image) as im:
            width, height = im.size
            im.load()  # decode once: a truncated JPEG is named here, not deep in the data loader
    except OSError as e:
        raise ValueError(f"{image} (the image of {xml_path}): not a readable image ({type(e).__name__}: {e}).") from e
    size_element = root.find("size")
    if size_element is not None:
        xml_size = tuple(int(_number(size_element, tag, xml_path, "<size>")) for tag in ("width", "height"))
        if 0 not in xml_size and xml_size != (width, height):
            raise ValueError(
                f"{xml_path}: <size> says {xml_size[0]} x {xml_size[1]} (width x height) but its image {image} is "
                f"{width} x {height}."
            )

    names, boxes = [], []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"object {k} ({name or 'no <name>'})"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{xml_path}: {where} has no <bndbox>.")
        names.append(name)
        boxes.append([_number(bndbox, tag, xml_path, where) for tag in ("xmin", "ymin", "xmax", "ymax")])
    unknown = sorted(set(names) - set(mapping))
    if unknown:
        suggested = {**mapping, **{n: max(mapping.values(), default=-1) + 1 + i for i, n in enumerate(unknown)}}
        raise ValueError(
            f"{xml_path}: class name(s) {unknown} are not in class_map (which maps {sorted(mapping)}); the names in "
            f"this file are {sorted(set(names))}. Set the config key `class_map` to map every name to a label, e.g. "
            f"class_map={suggested}."
        )

    raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = np.clip(raw, 0.0, [width, height, width, height])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = keep & (clipped != raw).any(axis=1)
    if moved.any():
        listed = "; ".join(
            f"object {k} ({names[k]}) {_box_text(raw[k])} -> {_box_text(clipped[k])}" for k in np.flatnonzero(moved)
        )
        warnings.warn(
            f"{xml_path}: {int(moved.sum())} box(es) run past the {width} x {height} image; clipped: {listed}.",
            stacklevel=2,
        )
    if not keep.all():
        listed = "; ".join(f"object {k} ({names[k]}) {_box_text(raw[k])}" for k in np.flatnonzero(~keep))
        warnings.warn(
            f"{xml_path}: dropped {int((~keep).sum())} box(es) of zero or negative area (after clipping to the "
            f"image): {listed}.",
            stacklevel=2,
        )
    return {
        "image": str(image),
        "boxes": clipped[keep].astype(np.float32),
        "labels": np.array([mapping[n] for n, k in zip(names, keep) if k], dtype=np.int64),
        "size": (width, height),
    }


def bccd_datalist(
    dataset_dir: str | os.PathLike, split: str, class_map: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """The images of one BCCD split as a MONAI-style datalist, with their boxes.

    The split file ``ImageSets/Main/<split>.txt`` lists one image stem per line (further words on a line and blank
    lines are ignored); each stem's ``Annotations/<stem>.xml`` is read with :py:func:`read_voc_annotation`, its image
    being in ``JPEGImages/``. Both the data set folder and a folder holding it (``BCCD/JPEGImages/...``, as in the
    BCCD repository) are accepted.

    Args:
        dataset_dir: the data set folder (see :py:func:`find_bccd_root`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        class_map: class name to integer label (see :py:func:`read_voc_annotation`).

    Returns:
        One dict per listed stem, in the file's order, as from :py:func:`read_voc_annotation`.

    Raises:
        ValueError: when ``split`` is not one of the four, the split file lists no image, or an annotation is
            invalid (see :py:func:`read_voc_annotation`).
        FileNotFoundError: when the data set is not found, the split file is missing (the message names it), or
            annotation files or images are missing (the message lists all of them).
    """
    if split not in BCCD_SPLITS:
        raise ValueError(f"split must be one of {list(BCCD_SPLITS)}, got {split!r}.")
    root = find_bccd_root(dataset_dir)
    split_file = root / _SPLIT_DIR / f"{split}.txt"
    if not split_file.is_file():
        found = sorted(p.name for p in split_file.parent.glob("*.txt"))
        raise FileNotFoundError(
            f"BCCD data set {root}: no split file {split_file} (that folder holds {found or 'no split file'}). "
            f"Get {BCCD_SOURCES}."
        )
    stems = [line.split()[0] for line in split_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not stems:
        raise ValueError(f"{split_file}: lists no image.")
    items, missing = [], []
    for stem in stems:
        xml_path = root / _ANNOTATIONS / f"{stem}.xml"
        if not xml_path.is_file():
            missing.append(f"{xml_path} (the annotation of {stem!r}, listed in {split_file.name})")
            continue
        try:
            items.append(read_voc_annotation(xml_path, root / _IMAGES, class_map))
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing:
        listed = "\n  ".join(missing)
        raise FileNotFoundError(f"BCCD data set {root}, split {split!r}: {len(missing)} missing file(s):\n  {listed}")
    return items


# Cell diameters in pixels of the real 640 x 480 images.
