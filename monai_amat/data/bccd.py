"""BCCD blood cell detection data (364 light-microscopy images of 640 x 480, boxes of RBC, WBC and Platelets).

Reading the real Pascal VOC layout into a datalist and a small synthetic stand-in in the same layout.
Boxes are ``(xmin, ymin, xmax, ymax)`` in pixels, as written in the VOC XML files.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from monai_amat.data.utils import find_nested_root, generate_once, smooth_noise

__all__ = [
    "BCCD_CLASSES",
    "BCCD_SOURCES",
    "BCCD_SPLITS",
    "find_bccd_root",
    "read_voc_annotation",
    "bccd_datalist",
    "make_embedded_bccd",
]

BCCD_CLASSES = ("RBC", "WBC", "Platelets")
"""The class names of the VOC files, in label order (RBC 0, WBC 1, Platelets 2)."""

BCCD_SOURCES = (
    "the BCCD blood cell detection data set (Pascal VOC layout: JPEGImages/, Annotations/, ImageSets/Main/), "
    "available from https://github.com/Shenggan/BCCD_Dataset (MIT licence; the data set is its BCCD/ folder); "
    "for a small synthetic stand-in in the same layout, run monai_amat.data.make_embedded_bccd(root_dir)"
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
_REFERENCE_SIZE = (640, 480)
_DIAMETERS = {"RBC": (80.0, 110.0), "WBC": (150.0, 230.0), "Platelets": (20.0, 35.0)}


@dataclass(frozen=True)
class _Cell:
    """A cell outline: a rotated ellipse of radii ``rx, ry`` whose radius wobbles with a few angular harmonics."""

    name: str
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]

    @property
    def radius(self) -> float:
        """The mean radius."""
        return (self.rx + self.ry) / 2.0

    @property
    def reach(self) -> float:
        """A bound on the distance from the centre to the outline."""
        return max(self.rx, self.ry) * (1.0 + sum(abs(a) for _, a, _ in self.harmonics))

    def rho(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The normalised radius at pixels ``(xs, ys)``: below 1 inside the outline."""
        dx, dy = xs - self.cx, ys - self.cy
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = (c * dx + s * dy) / self.rx, (c * dy - s * dx) / self.ry
        theta = np.arctan2(v, u)
        wobble = 1.0 + sum(a * np.cos(k * theta + phase) for k, a, phase in self.harmonics)
        return np.hypot(u, v) / wobble


def _random_cell(
    rng: np.random.Generator, name: str, center: tuple[float, float], diameter: float, wobble: float
) -> _Cell:
    """A cell of mean ``diameter`` with aspect ratio 0.8-1, random orientation and outline wobble up to ``wobble``."""
    ratio = rng.uniform(0.8, 1.0)
    radius = max(diameter / 2.0, 1.5)
    harmonics = tuple((k, rng.uniform(0.0, wobble) / k, rng.uniform(0.0, 2 * np.pi)) for k in (2, 3, 4))
    return _Cell(
        name, center[0], center[1], radius / np.sqrt(ratio), radius * np.sqrt(ratio), rng.uniform(0, np.pi), harmonics
    )


# Per new cell: the least centre distance to a placed cell, as a fraction of the sum of their mean radii.
_MIN_GAP = {
    "WBC": {"WBC": 1.05},
    "Platelets": {"WBC": 1.2, "Platelets": 1.5},
    "RBC": {"WBC": 0.95, "Platelets": 1.1, "RBC": 0.72},
}


def _place(
    rng: np.random.Generator, cells: list[_Cell], name: str, count: int, scale: float, size: tuple[int, int]
) -> None:
    """Add up to ``count`` cells of class ``name`` to ``cells``, at random free places (centres inside the image).

    WBCs keep at least 70% of their radius inside the image and platelets all of it; RBCs may be cut by the border.
    """
    w, h = size
    low, high = _DIAMETERS[name]
    inside = {"WBC": 0.7, "Platelets": 1.0, "RBC": 0.0}[name]
    wobble = {"WBC": 0.05, "Platelets": 0.25, "RBC": 0.04}[name]
    added = 0
    for _ in range(60 * count):
        if added == count:
            return
        diameter = rng.uniform(low, high) * scale
        margin = inside * diameter / 2.0
        center = (rng.uniform(margin, w - 1 - margin), rng.uniform(margin, h - 1 - margin))
        cell = _random_cell(rng, name, center, diameter, wobble)
        gaps = _MIN_GAP[name]
        if all(
            np.hypot(cell.cx - c.cx, cell.cy - c.cy) >= gaps[c.name] * (cell.radius + c.radius)
            for c in cells
            if c.name in gaps
        ):
            cells.append(cell)
            added += 1


def _paint(image: np.ndarray, cell: _Cell, grain: np.ndarray, rng: np.random.Generator) -> list[int] | None:
    """Paint ``cell`` onto ``image`` ``(height, width, 3)`` float in place.

    Returns:
        The tight box ``[xmin, ymin, xmax, ymax]`` (pixel edges) of the painted pixels, or ``None`` when none is in
        the image.
    """
    h, w = image.shape[:2]
    reach = cell.reach + 1.0
    x0, x1 = max(int(np.floor(cell.cx - reach)), 0), min(int(np.ceil(cell.cx + reach)) + 1, w)
    y0, y1 = max(int(np.floor(cell.cy - reach)), 0), min(int(np.ceil(cell.cy + reach)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    rho = cell.rho(xs, ys)
    inside = rho < 1.0
    if not inside.any():
        return None
    alpha = np.clip((1.0 - rho) * min(cell.rx, cell.ry), 0.0, 1.0)[..., None]
    texture = grain[y0:y1, x0:x1, None]
    if cell.name == "RBC":
        body = np.array([214.0, 122.0, 134.0]) + rng.normal(0.0, 6.0, 3)
        pale = np.array([238.0, 196.0, 200.0])
        pallor = np.exp(-((rho / 0.55) ** 2))[..., None]
        rim = np.exp(-(((rho - 0.88) / 0.1) ** 2))[..., None]
        colour = body + 0.8 * pallor * (pale - body) - 16.0 * rim + 5.0 * texture
    elif cell.name == "WBC":
        cytoplasm = np.array([190.0, 162.0, 212.0]) + rng.normal(0.0, 5.0, 3) + 6.0 * texture
        nucleus_colour = np.array([92.0, 48.0, 138.0]) + rng.normal(0.0, 6.0, 3) + 14.0 * texture
        nucleus = np.zeros_like(rho)
        for _ in range(int(rng.integers(2, 5))):
            offset = rng.uniform(0.0, 0.35 * cell.radius) * np.exp(1j * rng.uniform(0.0, 2 * np.pi))
            lobe = _random_cell(
                rng, "lobe", (cell.cx + offset.real, cell.cy + offset.imag), rng.uniform(0.5, 0.85) * cell.radius, 0.1
            )
            nucleus = np.maximum(nucleus, np.clip((1.0 - lobe.rho(xs, ys)) * lobe.radius, 0.0, 1.0))
        colour = cytoplasm + nucleus[..., None] * (nucleus_colour - cytoplasm)
    else:
        colour = np.array([146.0, 94.0, 172.0]) + rng.normal(0.0, 6.0, 3) + 12.0 * texture
    window = image[y0:y1, x0:x1]
    window += alpha * (colour - window)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    return [x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1]


def _embedded_image(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, list[tuple[str, list]]]:
    """One synthetic blood smear: an RGB image and its ``(class name, box)`` objects."""
    w, h = size
    scale = float(np.sqrt(w * h / (_REFERENCE_SIZE[0] * _REFERENCE_SIZE[1])))
    cells: list[_Cell] = []
    _place(rng, cells, "WBC", 1 if rng.random() < 0.85 else 2, scale, size)
    _place(rng, cells, "Platelets", int(rng.integers(1, 4)), scale, size)
    _place(rng, cells, "RBC", int(rng.integers(12, 20)), scale, size)

    base = np.array([230.0, 210.0, 222.0]) + rng.normal(0.0, 4.0, 3)
    coarse = smooth_noise(rng, (h, w), 0.06 * h)
    grain = smooth_noise(rng, (h, w), max(1.5 * scale, 0.7))
    image = base + coarse[..., None] * np.array([5.0, 7.0, 4.0]) + 2.0 * grain[..., None]
    objects = []
    for name in ("RBC", "WBC", "Platelets"):  # painting order: platelets and WBCs lie on top
        for cell in cells:
            if cell.name == name:
                box = _paint(image, cell, grain, rng)
                if box is not None:
                    objects.append((name, box))
    image += rng.normal(0.0, 3.0, image.shape)
    pil = Image.fromarray(np.round(np.clip(image, 0, 255)).astype(np.uint8), mode="RGB")
    return pil.filter(ImageFilter.GaussianBlur(max(0.5, 0.8 * scale))), objects


def _write_voc(path: Path, filename: str, size: tuple[int, int], objects: list[tuple[str, list]]) -> None:
    """Write a VOC annotation laid out as BCCD's (tab indents, no XML declaration)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = _IMAGES
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "Synthetic (monai_amat.data.make_embedded_bccd)"
    size_element = ET.SubElement(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3)):
        ET.SubElement(size_element, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, box in objects:
        obj = ET.SubElement(root, "object")
        truncated = box[0] == 0 or box[1] == 0 or box[2] == size[0] or box[3] == size[1]
        for tag, value in (("name", name), ("pose", "Unspecified"), ("truncated", int(truncated)), ("difficult", 0)):
            ET.SubElement(obj, tag).text = str(value)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root, space="\t")
    path.write_text(ET.tostring(root, encoding="unicode") + "\n", encoding="utf-8")


def _split_stems(stems: list[str], seed: int) -> dict[str, list[str]]:
    """A seeded 60/20/20% split (at least one image in each), each part sorted, plus ``trainval``."""
    n = len(stems)
    order = [stems[i] for i in np.random.default_rng([seed, n]).permutation(n)]
    held = max(1, round(0.2 * n))
    parts = {"train": order[: n - 2 * held], "val": order[n - 2 * held : n - held], "test": order[n - held :]}
    parts["trainval"] = parts["train"] + parts["val"]
    return {name: sorted(part) for name, part in parts.items()}


def make_embedded_bccd(
    root_dir: str | os.PathLike, num_images: int = 12, seed: int = 0, size: tuple[int, int] = (320, 240)
) -> Path:
    """Generate a small deterministic synthetic data set in the real BCCD (Pascal VOC) layout.

    Writes ``root_dir/BCCD/JPEGImages/BloodImage_00000.jpg``, ... (RGB JPEG), ``Annotations/BloodImage_00000.xml``,
    ... (VOC XML as BCCD's: ``<filename>``, ``<size>``, objects with ``<name>``, ``<truncated>`` and integer
    ``<bndbox>``), ``ImageSets/Main/{train,val,test,trainval}.txt`` (a seeded split: the last ``max(1, round(0.2 n))``
    images of a shuffle are the test set, as many before them the validation set, the rest the training set;
    12 images: 8 / 2 / 2) and a marker ``embedded.json`` recording the parameters.

    Each image is a blood smear on a light pink-purple textured background: 12-19 red blood cells (pink discs with
    a pale centre and a darker rim, 80-110 pixels across at 640 x 480, overlapping a little, possibly cut by the
    border), one white blood cell (two in 15% of the images; 150-230 pixels, pale lilac cytoplasm around a dark purple
    lobed nucleus) and 1-3 platelets (small irregular purple blobs, 20-35 pixels), sizes scaled by
    ``sqrt(width * height / (640 * 480))``; then noise and a slight blur. Every box is the tight box of its cell's
    painted pixels (the whole cell, also where another cell covers part of it; clipped to the image).

    The set is written into a temporary folder beside ``root_dir/BCCD`` and renamed at the end. When the marker
    records the same parameters nothing is written; an older synthetic set is replaced.

    Args:
        root_dir: the folder to write ``BCCD`` into.
        num_images: the number of images, at least 3 (one per split).
        seed: the generation seed; image ``i`` depends only on ``(seed, size, i)``, the split on ``(seed, num_images)``.
        size: ``(width, height)`` of the images, each at least 64.

    Returns:
        ``root_dir/BCCD``, the folder to pass as ``dataset_dir``.

    Raises:
        ValueError: when ``num_images`` is below 3 or ``size`` is not two sizes >= 64.
        FileExistsError: when ``root_dir/BCCD`` exists and is not a synthetic set made by this function.
    """
    if num_images < _MIN_IMAGES:
        raise ValueError(f"make_embedded_bccd: num_images must be >= {_MIN_IMAGES} (one per split), got {num_images}.")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < _MIN_SIZE:
        raise ValueError(f"make_embedded_bccd: size must be (width, height), each >= {_MIN_SIZE}, got {size}.")
    meta = {"generator": _EMBEDDED_GENERATOR, "num_images": num_images, "seed": seed, "size": list(size)}

    def write(tmp: Path) -> None:
        for folder in (_IMAGES, _ANNOTATIONS, _SPLIT_DIR):
            (tmp / folder).mkdir(parents=True)
        stems = [f"BloodImage_{i:05d}" for i in range(num_images)]
        for i, stem in enumerate(stems):
            image, objects = _embedded_image(np.random.default_rng([seed, *size, i]), size)
            image.save(tmp / _IMAGES / f"{stem}.jpg", quality=92)
            _write_voc(tmp / _ANNOTATIONS / f"{stem}.xml", f"{stem}.jpg", size, objects)
        for split, part in _split_stems(stems, seed).items():
            (tmp / _SPLIT_DIR / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in part))

    return generate_once(Path(root_dir) / _EMBEDDED_NAME, meta, write)
