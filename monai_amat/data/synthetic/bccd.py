"""A small synthetic stand-in for the BCCD blood cell images, written in the real Pascal VOC layout."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from monai_amat.data.bccd import (
    _ANNOTATIONS,
    _EMBEDDED_GENERATOR,
    _EMBEDDED_NAME,
    _IMAGES,
    _MIN_IMAGES,
    _MIN_SIZE,
    _SPLIT_DIR,
)
from monai_amat.data.utils import generate_once, smooth_noise, split_by_position

__all__ = ["make_embedded_bccd"]

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


def _footprint(
    cell: _Cell, h: int, w: int
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, np.ndarray, list[int]] | None:
    """Where ``cell`` lies in an image of ``h x w`` pixels.

    Returns:
        ``((y0, y1, x0, x1), xs, ys, rho, box)``: the window around the cell, its pixel coordinates, the normalised
        radius there (below 1 inside) and the tight box ``[xmin, ymin, xmax, ymax]`` (pixel edges) of the inside
        pixels; ``None`` when none of them is in the image.
    """
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
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = [x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1]
    return (y0, y1, x0, x1), xs, ys, rho, box


def _paint(image: np.ndarray, cell: _Cell, grain: np.ndarray, rng: np.random.Generator) -> list[int] | None:
    """Paint ``cell`` onto ``image`` ``(height, width, 3)`` float in place.

    Returns:
        The tight box ``[xmin, ymin, xmax, ymax]`` (pixel edges) of the painted pixels, or ``None`` when none is in
        the image.
    """
    found = _footprint(cell, image.shape[0], image.shape[1])
    if found is None:
        return None
    (y0, y1, x0, x1), xs, ys, rho, box = found
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
    return box


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


def _write_voc(
    path: Path,
    filename: str,
    size: tuple[int, int],
    objects: list[tuple[str, list]],
    database: str = "Synthetic (monai_amat.data.make_embedded_bccd)",
) -> None:
    """Write a VOC annotation laid out as BCCD's (tab indents, no XML declaration), naming ``database`` as source."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = _IMAGES
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = database
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
    parts = split_by_position([stems[i] for i in np.random.default_rng([seed, n]).permutation(n)])
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
