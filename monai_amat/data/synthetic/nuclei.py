"""Crowded fluorescence-microscopy nuclei in the Pascal VOC layout: many small touching objects per image.

The BCCD stand-in holds about 15 large cells per image; real detection data (nuclei, colonies, particles) are as
often crowded with small objects. This set has that character and the BCCD reader's layout, so the detection bundle
reads it as ``--data_source real --dataset_dir DIR --class_names "['nucleus']"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from monai_amat.data.bccd import _ANNOTATIONS, _IMAGES, _MIN_IMAGES, _MIN_SIZE, _SPLIT_DIR
from monai_amat.data.synthetic.bccd import _footprint, _random_cell, _split_stems, _write_voc
from monai_amat.data.utils import generate_once, smooth_noise

__all__ = ["NUCLEUS", "make_crowded_nuclei"]

NUCLEUS = "nucleus"
"""The one class name of :py:func:`make_crowded_nuclei`'s annotations."""

_GENERATOR = "monai_amat.data.make_crowded_nuclei"
# least centre distance between two nuclei, as a fraction of the sum of their mean radii: below 1, so they touch
_MIN_GAP = 0.85


def _nuclei_image(
    rng: np.random.Generator, size: tuple[int, int], count: tuple[int, int], diameter: tuple[float, float]
) -> tuple[Image.Image, list[tuple[str, list[int]]]]:
    """One image: ``count`` (a range) bright textured nuclei of ``diameter`` (a range, pixels) on a dark background."""
    w, h = size
    wanted = int(rng.integers(count[0], count[1] + 1))
    cells = []
    for _ in range(60 * wanted):
        if len(cells) == wanted:
            break
        d = rng.uniform(*diameter)
        cell = _random_cell(rng, NUCLEUS, (rng.uniform(0, w - 1), rng.uniform(0, h - 1)), d, 0.12)
        if all(np.hypot(cell.cx - c.cx, cell.cy - c.cy) >= _MIN_GAP * (cell.radius + c.radius) for c in cells):
            cells.append(cell)
    grain = smooth_noise(rng, (h, w), 1.2)
    image = 18.0 + 6.0 * smooth_noise(rng, (h, w), 0.1 * h)
    objects = []
    for cell in cells:
        found = _footprint(cell, h, w)
        if found is None:
            continue
        (y0, y1, x0, x1), _, _, rho, box = found
        alpha = np.clip((1.0 - rho) * min(cell.rx, cell.ry), 0.0, 1.0)
        brightness = rng.uniform(110.0, 220.0)
        value = brightness * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - rho, 0.0, 1.0))) + 14.0 * grain[y0:y1, x0:x1]
        window = image[y0:y1, x0:x1]
        np.maximum(window, alpha * value + (1.0 - alpha) * window, out=window)
        objects.append((NUCLEUS, box))
    image = image + rng.normal(0.0, 4.0, image.shape)
    grey = np.round(np.clip(image, 0, 255)).astype(np.uint8)
    pil = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    return pil.filter(ImageFilter.GaussianBlur(0.6)), objects


def make_crowded_nuclei(
    root_dir: str | os.PathLike,
    num_images: int = 12,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    count: tuple[int, int] = (20, 125),
    diameter: tuple[float, float] = (8.0, 30.0),
) -> Path:
    """Generate a deterministic set of crowded fluorescence-nuclei images in the Pascal VOC layout of BCCD.

    Writes ``root_dir/Nuclei/JPEGImages/Nuclei_00000.jpg``, ... (grey values in three equal RGB channels),
    ``Annotations/Nuclei_00000.xml``, ... (VOC XML, one class ``"nucleus"``), ``ImageSets/Main/{train,val,test,
    trainval}.txt`` (the BCCD stand-in's seeded 60/20/20 % split; 12 images: 8 / 2 / 2) and a marker
    ``embedded.json`` recording the parameters. Each image holds ``count`` nuclei (drawn uniformly per image; fewer
    when no free place is found) of mean diameter ``diameter`` pixels, slightly elliptic with a wobbling outline,
    touching and overlapping a little (centres at least 0.85 of the sum of the radii apart), possibly cut by the
    border, bright and textured on a dark uneven background; then noise and a slight blur. Every box is the tight
    box of its nucleus's painted pixels.

    The set is written into a temporary folder and renamed at the end; when the marker records the same parameters
    nothing is written.

    Args:
        root_dir: the folder to write ``Nuclei`` into.
        num_images: the number of images, at least 3 (one per split).
        seed: the generation seed; image ``i`` depends only on ``(seed, size, i)`` and the ranges.
        size: ``(width, height)``, each at least 64.
        count: the least and most nuclei per image.
        diameter: the least and most mean diameter of a nucleus, in pixels.

    Returns:
        ``root_dir/Nuclei``, the folder to pass as ``dataset_dir``.

    Raises:
        ValueError: for ``num_images`` below 3, a ``size`` that is not two sizes >= 64, or an empty or non-positive
            ``count`` or ``diameter`` range.
        FileExistsError: when ``root_dir/Nuclei`` exists and is not a set made by this function.
    """
    if num_images < _MIN_IMAGES:
        raise ValueError(f"make_crowded_nuclei: num_images must be >= {_MIN_IMAGES} (one per split), got {num_images}.")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < _MIN_SIZE:
        raise ValueError(f"make_crowded_nuclei: size must be (width, height), each >= {_MIN_SIZE}, got {size}.")
    for name, (low, high) in (("count", count), ("diameter", diameter)):
        if not 0 < low <= high:
            raise ValueError(f"make_crowded_nuclei: {name} must be a range 0 < low <= high, got {(low, high)}.")
    count = (int(count[0]), int(count[1]))
    diameter = (float(diameter[0]), float(diameter[1]))
    meta = {
        "generator": _GENERATOR,
        "num_images": num_images,
        "seed": seed,
        "size": list(size),
        "count": list(count),
        "diameter": list(diameter),
    }

    def write(tmp: Path) -> None:
        for folder in (_IMAGES, _ANNOTATIONS, _SPLIT_DIR):
            (tmp / folder).mkdir(parents=True)
        stems = [f"Nuclei_{i:05d}" for i in range(num_images)]
        for i, stem in enumerate(stems):
            image, objects = _nuclei_image(np.random.default_rng([seed, *size, i]), size, count, diameter)
            image.save(tmp / _IMAGES / f"{stem}.jpg", quality=92)
            _write_voc(tmp / _ANNOTATIONS / f"{stem}.xml", f"{stem}.jpg", size, objects, f"Synthetic ({_GENERATOR})")
        for split, part in _split_stems(stems, seed).items():
            (tmp / _SPLIT_DIR / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in part))

    return generate_once(Path(root_dir) / "Nuclei", meta, write)
